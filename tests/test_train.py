"""Training: data layout, resume-after-kill equivalence, early stopping, budgets, variants."""
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from schemas import C
from schemas import sequences as S
from synergen_core import checkpoint
from synergen_core import train as train_mod
from synergen_core.baselines import VARIANTS, variant_config
from synergen_core.config import Config, TrainConfig, VariantName
from synergen_core.data import (
    SplitData, holdout_last, item_counts, make_windows, next_targets, pad_left, requests_from_eval, to_batch,
    tokens_from_arrow,
)
from synergen_core.model import RECOMMEND, SEARCH, next_item_targets
from synthetic_training import (
    N_ITEMS, N_QUERIES, I, Q, synthetic_config, synthetic_features, synthetic_split, synthetic_tokens, tokens_of,
)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ---- data layout --------------------------------------------------------------------------------


def test_next_targets_match_the_model_rule():
    tok = synthetic_tokens(6)
    L = int(tok.lengths.max())
    starts, lengths = tok.offsets[:-1], tok.lengths
    batch = {
        "token_type": torch.from_numpy(pad_left(tok.token_type, starts, lengths, L)),
        "item_idx": torch.from_numpy(pad_left(tok.item_idx, starts, lengths, L)),
        "ts": torch.from_numpy(pad_left(tok.ts, starts, lengths, L)),
    }
    want = next_item_targets(batch)
    got = torch.from_numpy(pad_left(next_targets(tok), starts, lengths, L))
    assert torch.equal(got, want)


def test_windows_cut_from_the_end_and_targets_cross_window_borders():
    # one row: items 1..7 (ts 1..7), then a search event (query 3 engaging item 9 at ts 8)
    row = [(I, k, 0, float(k)) for k in range(1, 8)] + [(Q, 0, 3, 8.0), (I, 9, 0, 8.0)]
    win = make_windows(tokens_of([row]), L=4)
    # 8 input tokens (the last token is only a target) -> two windows, latest first
    assert win.lengths.tolist() == [4, 4]
    assert win.history["item_idx"].tolist() == [[5, 6, 7, 0], [1, 2, 3, 4]]
    assert win.history["token_type"][0].tolist() == [I, I, I, Q]
    # the query predicts its engaged item; item 7 is followed by a query: no target there
    assert win.target.tolist() == [[6, 7, 0, 9], [2, 3, 4, 5]]
    assert win.next_ts.tolist() == [8.0, 5.0]
    short = make_windows(tokens_of([row[:3]]), L=4)  # fewer tokens than L: left padding
    assert short.history["item_idx"].tolist() == [[0, 0, 1, 2]]
    assert make_windows(tokens_of([row]), L=4, max_windows=1).lengths.tolist() == [4]


def test_holdout_last_takes_the_whole_last_event():
    search_last = [(I, 1, 0, 1.0), (I, 2, 0, 2.0), (I, 3, 0, 3.0), (Q, 0, 5, 4.0), (I, 4, 0, 4.0)]
    browse_last = [(I, 1, 0, 1.0), (I, 2, 0, 2.0), (I, 6, 0, 3.0)]
    too_short = [(I, 1, 0, 1.0), (I, 2, 0, 2.0)]
    train, valid = holdout_last(tokens_of([search_last, browse_last, too_short]), L=8)
    assert train.lengths.tolist() == [3, 2, 2]
    assert valid.target.tolist() == [4, 6]
    assert valid.task.tolist() == [SEARCH, RECOMMEND]
    assert valid.query_idx.tolist() == [5, 0]
    assert valid.lengths.tolist() == [4, 2]  # the search request's history ends with its query
    assert valid.history["token_type"][0, -1] == Q
    assert valid.consumed.tolist() == [[1, 2, 3, 0], [1, 2, 0, 0]]  # the items before the held-out event


def test_tokens_from_arrow_and_eval_requests():
    ts = pa.array([1_000_000, 2_000_000, 2_000_000], pa.timestamp("us", tz="UTC"))
    tokens = pa.StructArray.from_arrays(
        [pa.array([0, 1, 2], pa.int32()), ts, pa.array(["item", "query", "item"]),
         pa.array([7, None, 8], pa.int32()), pa.array([None, 3, None], pa.int32()),
         pa.array(["rate", "tag", "tag"]), pa.array(["recommendation", "search", "search"]),
         pa.array([0, 0, 0], pa.int32()), pa.array([None, 1.0, 1.0]),
         pa.array([[4, 5, 6], None, [6]], pa.list_(pa.int32()))],
        fields=list(S.TOKEN))
    lists = pa.ListArray.from_arrays(pa.array([0, 2, 2], pa.int32()), tokens.slice(0, 2))
    table = pa.table({
        C.USER_ID: ["u", "v"], C.TASK: ["search", "recommendation"], C.SPLIT: ["test", "test"],
        C.TARGET_POS: pa.array([2, 0], pa.int32()), C.TARGET_TS: pa.array([2_000_000, 5], pa.timestamp("us", tz="UTC")),
        C.ITEM_INDEX: pa.array([8, 9], pa.int32()), C.QUERY_INDEX: pa.array([3, None], pa.int32()),
        C.ACTION: ["tag", "rate"], C.CONTEXT: lists.cast(S.TOKENS_TYPE),
    })
    tok = tokens_from_arrow(table[C.CONTEXT])
    assert tok.token_type.tolist() == [I, Q] and tok.item_idx.tolist() == [7, 0] and tok.query_idx.tolist() == [0, 3]
    assert tok.ts.tolist() == [1.0, 2.0] and tok.lengths.tolist() == [2, 0]
    assert tok.shown.shape == (2, 0)  # impressions only when asked for
    assert tokens_from_arrow(table[C.CONTEXT], max_shown=2).shown.tolist() == [[4, 5], [0, 0]]
    req, dropped = requests_from_eval(table, L=4, split="test")
    assert dropped == 1  # the user without any context
    assert req.task.tolist() == [SEARCH] and req.target.tolist() == [8] and req.query_idx.tolist() == [3]
    assert req.consumed.tolist() == [[7, 0]]  # the context's items (the query token is not one)
    assert req.select(np.array([0])).consumed.tolist() == [[7, 0]]
    batch = to_batch(req.history, np.arange(1), req.lengths, "cpu")
    assert batch["token_type"].tolist() == [[I, Q]] and batch["ts"].dtype == torch.float64


# ---- the loop -----------------------------------------------------------------------------------


class Killed(Exception):
    pass


def _weights(run_dir):
    return checkpoint.load(run_dir / checkpoint.CHECKPOINT)["model"]


@pytest.mark.parametrize("negatives, schedule, ema", [("full", "constant", None), ("sampled", "constant", None),
                                                      ("full", "cosine", None), ("full", "constant", 0.8)])
def test_resume_after_kill_gives_identical_weights_and_losses(tmp_path, negatives, schedule, ema):
    data, feats = synthetic_split(), synthetic_features()
    cfg = synthetic_config(negatives=negatives, n_negatives=16, lr_schedule=schedule, warmup_steps=2, ema_decay=ema)
    straight = train_mod.train(cfg, data, feats, tmp_path / "straight")
    assert straight["steps"] > 5
    elapsed = [h["train_seconds"] for h in straight["history"]]  # the optimizer time so far, epoch by epoch
    assert 0 < elapsed[0] and elapsed == sorted(elapsed) and elapsed[-1] == straight["train_seconds"]

    def kill_at_5(step):
        if step == 5:  # mid-epoch, two steps after the checkpoint of step 3
            raise Killed

    with pytest.raises(Killed):
        train_mod.train(cfg, data, feats, tmp_path / "killed", on_step=kill_at_5)
    assert checkpoint.load(tmp_path / "killed" / checkpoint.CHECKPOINT)["state"]["step"] == 3
    resumed = train_mod.train(cfg, data, feats, tmp_path / "killed")
    assert resumed["resumed"] and resumed["steps"] == straight["steps"]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["history"][-1]["valid"] == straight["history"][-1]["valid"]
    kept_a = checkpoint.load(tmp_path / "straight" / checkpoint.MODEL)["state_dict"]
    kept_b = checkpoint.load(tmp_path / "killed" / checkpoint.MODEL)["state_dict"]
    assert all(torch.equal(kept_a[k], kept_b[k]) for k in kept_a)  # the moving average too, when there is one


def test_auto_negatives_are_the_full_softmax_up_to_the_configured_catalog_size(tmp_path):
    """train.negatives=auto (the default): the full softmax on a catalog up to full_softmax_max_items, sampled
    softmax with log-Q above; the same run as naming the mode, and the summary says which it was."""
    data, feats = synthetic_split(), synthetic_features()
    assert TrainConfig().negatives == "auto"
    runs = {}
    for name, train in (("small", dict(negatives="auto")), ("large", dict(negatives="auto", full_softmax_max_items=5)),
                        ("full", dict(negatives="full")), ("sampled", dict(negatives="sampled"))):
        cfg = synthetic_config(n_negatives=16, epochs=1, **train)
        runs[name] = train_mod.train(cfg, data, feats, tmp_path / name)
    assert [runs[n]["retrieval_negatives"] for n in ("small", "large", "full", "sampled")] == [
        "full", "sampled", "full", "sampled"]
    losses = {n: [h["loss"] for h in r["history"]] for n, r in runs.items()}
    assert losses["small"] == losses["full"] and losses["large"] == losses["sampled"] != losses["full"]


def test_learning_rate_warms_up_then_decays_to_zero_at_the_horizon():
    cosine = TrainConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=4)
    rates = [train_mod.learning_rate(cosine, step, 104) for step in range(105)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert rates[4] == pytest.approx(1e-3) and rates[54] == pytest.approx(5e-4) and rates[104] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    constant = TrainConfig(lr=1e-3)
    assert {train_mod.learning_rate(constant, step, 104) for step in range(200)} == {1e-3}


KILL_AT_STEP_5 = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from synthetic_training import synthetic_config, synthetic_features, synthetic_split
from synergen_core import train
kill = lambda step: step == 5 and os.kill(os.getpid(), signal.SIGKILL)
train.train(synthetic_config(), synthetic_split(), synthetic_features(), {out!r}, on_step=kill)
"""


def test_resume_after_sigkill_of_the_process_gives_identical_weights(tmp_path):
    """A real kill: no exception handler or finally block runs; the files on disk are all there is."""
    import subprocess
    import sys
    from pathlib import Path

    straight = train_mod.train(synthetic_config(), synthetic_split(), synthetic_features(), tmp_path / "straight")
    code = KILL_AT_STEP_5.format(tests=str(Path(__file__).parent), out=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoint.load(tmp_path / "killed" / checkpoint.CHECKPOINT)["state"]["step"] == 3
    resumed = train_mod.train(synthetic_config(), synthetic_split(), synthetic_features(), tmp_path / "killed")
    assert resumed["resumed"] and resumed["steps"] == straight["steps"]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "killed").glob(".*.tmp-*"))  # no half-written file left behind


def test_finished_run_is_not_retrained_and_model_file_rebuilds(tmp_path):
    data, feats = synthetic_split(), synthetic_features()
    cfg = synthetic_config()
    first = train_mod.train(cfg, data, feats, tmp_path)
    again = train_mod.train(cfg, data, feats, tmp_path)
    assert again["resumed"] and again["steps"] == first["steps"]
    model = checkpoint.load_model(tmp_path)
    assert not model.training and model.embed.codes("search").shape == (N_ITEMS, 2)
    cfg.train.resume = False  # --fresh
    assert not train_mod.train(cfg, data, feats, tmp_path)["resumed"]


def test_early_stopping_keeps_the_best_epoch(tmp_path, monkeypatch):
    scores = iter([0.3, 0.5, 0.4, 0.2, 0.1, 0.0])
    monkeypatch.setattr(train_mod, "validation_figures", lambda *a, **k: (next(scores), {}))
    cfg = synthetic_config(epochs=6, patience=2)
    out = train_mod.train(cfg, synthetic_split(), synthetic_features(), tmp_path)
    assert out["epochs_run"] == 4 and out["best_epoch"] == 1 and out["best_valid"] == 0.5


def test_validation_score_is_the_geometric_mean_over_the_trained_tasks():
    data, feats, cfg = synthetic_split(), synthetic_features(), synthetic_config()
    torch.manual_seed(0)
    model = train_mod.build_model(cfg, data, feats)
    score, per_task = train_mod.validation_figures(model, data, cfg.train)
    search, rec = per_task["search"]["ndcg@10"], per_task["rec"]["ndcg@10"]
    assert search > 0 and rec > 0 and search != rec
    # scale-free: a task at 10x the other's scale does not decide alone which epoch is best
    assert score == pytest.approx(math.sqrt(search * rec))
    rec_only = variant_config(cfg, "rec_only").train
    assert train_mod.validation_figures(model, data, rec_only)[0] == pytest.approx(rec)
    assert 0 < train_mod.task_score([0.0, 0.2]) < train_mod.task_score([0.0, 0.3])  # a task at 0 stops nothing
    # validation ranks as the evaluation does: without the consumed items where the evaluation leaves them out
    assert (data.valid.consumed == data.valid.target[:, None]).any(1).any()  # some targets repeat an item
    _, excluded = train_mod.validation_figures(model, data, cfg.train, exclude_consumed=("rec",))
    assert excluded["search"] == per_task["search"] and excluded["rec"]["mrr"] != per_task["rec"]["mrr"]


def test_moving_average_of_the_weights_is_what_is_validated_and_kept(tmp_path):
    """model.pt holds decay * w1 + (1 - decay) * w2 after two steps (the first step's weights w1 start
    the average), not the raw weights w2; buffers are copied, not averaged."""
    data, feats = synthetic_split(), synthetic_features()
    raw = {}
    for steps in (1, 2):
        train_mod.train(synthetic_config(max_steps=steps, ema_decay=0.75), data, feats, tmp_path / f"s{steps}")
        raw[steps] = _weights(tmp_path / f"s{steps}")
    kept = checkpoint.load(tmp_path / "s2" / checkpoint.MODEL)["state_dict"]
    model = train_mod.build_model(synthetic_config(), data, feats)
    params = dict(model.named_parameters())
    moved = [k for k in params if not torch.equal(raw[1][k], raw[2][k])]
    assert moved  # the second step changed weights, so the average differs from both
    for k in params:
        assert torch.allclose(kept[k], 0.75 * raw[1][k] + 0.25 * raw[2][k], atol=1e-7), k
    assert not any(torch.equal(kept[k], raw[2][k]) for k in moved)
    buffers = [k for k in model.state_dict() if k not in params]
    assert buffers and all(torch.equal(kept[k], raw[2][k]) for k in buffers)
    # without an average the kept weights are the raw ones
    train_mod.train(synthetic_config(max_steps=2), data, feats, tmp_path / "plain")
    plain = checkpoint.load(tmp_path / "plain" / checkpoint.MODEL)["state_dict"]
    assert all(torch.equal(plain[k], raw[2][k]) for k in params)


def test_step_budget_stops_training(tmp_path):
    out = train_mod.train(synthetic_config(max_steps=4, epochs=5), synthetic_split(), synthetic_features(), tmp_path)
    assert out["steps"] == 4 and (tmp_path / checkpoint.MODEL).is_file()


def test_one_step_losses_per_task_and_ranking():
    data, feats, cfg = synthetic_split(), synthetic_features(), synthetic_config()
    torch.manual_seed(0)
    model = train_mod.build_model(cfg, data, feats)
    sampler = train_mod.Sampler.from_counts(data.counts, "cpu")
    batch = train_mod.make_batch(model, data.windows, np.arange(8), cfg.train, sampler, "cpu")
    cand = batch["candidates"]
    assert cand.shape == (8, 1 + 2 + 1)
    has = batch["target"][:, -1] > 0
    assert torch.equal(cand[has, 0], batch["target"][has, -1])  # the positive is the window's next item
    assert not (cand[:, 1:] == cand[:, :1]).any()  # never a negative equal to the positive
    losses = train_mod.step_losses(model, batch, cfg.train, sampler)
    assert {"retrieval_search", "retrieval_rec", "semantic_search", "semantic_rec", "ranking"} <= losses.keys()
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    rec_only = train_mod.step_losses(model, batch, variant_config(cfg, "rec_only").train, sampler)
    assert "retrieval_search" not in rec_only and "retrieval_rec" in rec_only


def test_logged_impressions_replace_the_sampled_ranking_negatives():
    # two users; the first one's last browse logged items 30 and 31 as shown with it, the second's nothing
    rows = [[(I, 1, 0, 1.0), (I, 2, 0, 2.0), (I, 3, 0, 3.0)], [(I, 11, 0, 1.0), (I, 12, 0, 2.0), (I, 13, 0, 3.0)]]
    tok = tokens_of(rows)
    tok.shown = np.zeros((len(tok.ts), 3), np.int64)
    tok.shown[2, :2] = [30, 31]
    tok.shown[1, :1] = [20]  # inside the window: not the request's
    data = SplitData("loo", N_ITEMS, N_QUERIES, None, None, tok, make_windows(tok, 8), None,
                     item_counts(tok, N_ITEMS))
    assert data.windows.shown.tolist() == [[30, 31, 0], [0, 0, 0]]  # the token after each window
    cfg = synthetic_config(rank_impression_negatives=3)
    torch.manual_seed(0)
    model = train_mod.build_model(cfg, data, synthetic_features())
    sampler = train_mod.Sampler.from_counts(data.counts, "cpu")
    cand = train_mod.make_batch(model, data.windows, np.arange(2), cfg.train, sampler, "cpu")["candidates"]
    assert cand.shape == (2, 1 + 3 + 2 + 1)
    assert cand[0].tolist() == [3, 30, 31, 0, 0, 0, 0]  # shown items only: no sampled ones
    assert cand[1, 0] == 13 and (cand[1, 1:4] == 0).all() and (cand[1, 4:] > 0).all()  # sampled ones
    only_logged = train_mod.make_batch(model, data.windows, np.arange(1), cfg.train, sampler, "cpu")["candidates"]
    assert only_logged.tolist() == [[3, 30, 31, 0]]  # nothing sampled when every request has impressions
    no_impressions = synthetic_config(rank_impression_negatives=0)
    cand = train_mod.make_batch(model, data.windows, np.arange(2), no_impressions.train, sampler, "cpu")["candidates"]
    assert cand.shape == (2, 1 + 2 + 1) and (cand[:, 1:] > 0).all()


def test_variants_switch_what_they_say():
    from typing import get_args

    assert set(VARIANTS) == set(get_args(VariantName))
    cfg = Config()
    sas = variant_config(cfg, "sasrec")
    assert not (sas.model.use_text_emb or sas.model.use_semantic_ids or sas.model.semantic_head)
    assert sas.model.rope == "position" and sas.train.negatives == "full" and sas.model.w_ranking == 0
    assert variant_config(cfg, "no_time_rope").model.rope == "position"
    tuned = Config(train=TrainConfig(w_search=0.05, w_rec=2.0))  # the joint model's balance ...
    only = {v: variant_config(tuned, v).train for v in ("rec_only", "search_only")}
    assert (only["rec_only"].w_search, only["rec_only"].w_rec) == (0.0, 1.0)  # ... is not a single task's
    assert (only["search_only"].w_search, only["search_only"].w_rec) == (1.0, 0.0)
    assert cfg.model.rope == "time"  # the base config is untouched
    data, feats = synthetic_split(), synthetic_features()
    model = train_mod.build_model(sas, data, feats)
    assert model.embed.text_proj is None and model.semantic is None
