"""Data-parallel training: ``synergen_core.distributed`` alone, and a real 2-process ``torchrun`` on gloo."""
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import stages
from synergen_core import checkpoint, distributed
from synergen_core import train as train_mod
from synergen_core.lake import Layout

TESTS = Path(__file__).parent
TORCHRUN = Path(sys.executable).parent / "torchrun"


# ---- the pieces, in this process ----------------------------------------------------------------


def test_part_splits_a_batch_into_contiguous_parts_in_rank_order():
    parts = lambda n, w: [distributed.part(n, distributed.Ranks(r, w)) for r in range(w)]  # noqa: E731
    assert parts(7, 3) == [(0, 3), (3, 5), (5, 7)]  # np.array_split's sizes
    assert [np.arange(7)[lo:hi].tolist() for lo, hi in parts(7, 3)] == [a.tolist() for a in np.array_split(np.arange(7), 3)]
    assert parts(8, 2) == [(0, 4), (4, 8)] and parts(5, 1) == [(0, 5)]
    assert parts(1, 2) == [(0, 1), (1, 1)]  # rank 1 has nothing: make_batch gives it a stand-in row


def _grads(model, batch, tcfg, sampler, whole) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    total = train_mod.step_losses(model, batch, tcfg, sampler, whole)["total"]
    total.backward()
    return float(total.detach()), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("negatives", ["full", "sampled"])
def test_the_parts_losses_and_gradients_add_up_to_the_whole_batchs(negatives):
    """What each rank computes (its part of the batch, over the whole batch's target counts) sums to one
    process's loss and gradient: retrieval (full softmax, or InfoNCE whose in-batch candidates are the whole
    batch's positives), semantic IDs and ranking (with the whole batch's sampled negatives)."""
    from synthetic_training import synthetic_config, synthetic_features, synthetic_split

    data, cfg = synthetic_split(), synthetic_config(negatives=negatives, n_negatives=5)
    cfg.model.dropout = 0.0
    torch.manual_seed(0)
    model = train_mod.build_model(cfg, data, synthetic_features())
    sampler = train_mod.Sampler.from_counts(data.counts, "cpu")
    for rows in (np.arange(10, 15), np.array([7])):  # 3 + 2 rows; 1 + a stand-in
        one = train_mod.make_batch(model, data.windows, rows, cfg.train, sampler, "cpu", step=3)
        loss, grads = _grads(model, one, cfg.train, sampler, None)
        parts = [train_mod.make_batch(model, data.windows, rows, cfg.train, sampler, "cpu", 3, distributed.Ranks(r, 2))
                 for r in range(2)]
        targets = [train_mod.batch_targets(p) for p in parts]
        got = [_grads(model, p, cfg.train, sampler, train_mod.whole_batch(targets, r)) for r, p in enumerate(parts)]
        assert sum(g[0] for g in got) == pytest.approx(loss, rel=1e-5)
        for k, g in grads.items():
            summed = sum(p[1].get(k, torch.zeros_like(g)) for p in got)
            torch.testing.assert_close(summed, g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=k)


def test_launch_detection_reads_torchrun_environment():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert distributed.from_env(env) == distributed.Ranks(1, 4, 1)
    assert distributed.launched(env)
    assert not distributed.launched({**env, "WORLD_SIZE": "1"})  # torchrun with one process: plain training
    assert not distributed.launched({"RANK": "0"})
    assert distributed.from_env({}) is None
    assert distributed.current() == distributed.Ranks()  # no process group here
    assert distributed.backend("cpu") == "gloo"
    cpu = torch.device("cpu")
    assert distributed.device(cpu, distributed.Ranks(1, 2, 1)) == cpu
    assert distributed.device(torch.device("cuda"), distributed.Ranks(1, 2, 1)) == torch.device("cuda", 1)


def test_session_is_a_no_op_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with distributed.session(type("T", (), {"device": "cpu"})()) as ranks:
        assert ranks == distributed.Ranks() and ranks.is_main and not ranks.active
    assert not torch.distributed.is_initialized()


def test_digest_sees_every_byte():
    a = {"w": torch.zeros(3), "t": torch.tensor(1.5)}
    b = {"w": torch.zeros(3), "t": torch.tensor(1.5)}
    assert distributed.digest(a) == distributed.digest(b)
    b["w"][1] = 1e-30
    assert distributed.digest(a) != distributed.digest(b)


def test_only_rank_0_tracks_the_stage(monkeypatch):
    """Under torchrun the other ranks train without opening an MLflow run."""
    import contextlib

    from jobs import stages
    from jobs import train as job

    calls = []
    monkeypatch.setattr(job, "run", lambda cfg, ds, **kw: calls.append("run") or {"ds": ds})
    monkeypatch.setattr(job.distributed, "session",
                        lambda tcfg: contextlib.nullcontext(distributed.Ranks(1, 2, 1)))
    monkeypatch.setattr(stages, "stage_run", lambda *a, **k: pytest.fail("rank 1 tracked"))
    from synergen_core.config import Config

    assert stages.run_stage("train", Config(), "2026-01-03") == {"ds": "2026-01-03"} and calls == ["run"]


# ---- a real torchrun: 2 CPU processes, gloo --------------------------------------------------------

# Runs jobs.stages.run_stage, what `synergen train` runs (process group, rank 0 first for the side inputs, DDP
# training, rank 0 alone tracking in MLflow), on the synthetic split of tests/synthetic_training.py, with the
# lake's loaders replaced by it; each rank writes what it ended with.
RANK_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from synthetic_training import synthetic_config, synthetic_features, synthetic_split
from jobs import stages
from jobs import train as job
from synergen_core import distributed

job.load_training_split = lambda cfg, ds, protocol: synthetic_split()
job.load_features = lambda *a, **k: synthetic_features()
cfg = synthetic_config(epochs={epochs}, patience={epochs}, variants=["synergen"], protocols=["loo"], ema_decay={ema})
cfg.lake.root = {lake!r}
cfg.mlflow.tracking_uri = "sqlite:///" + os.path.join({lake!r}, "mlflow.db")
cfg.mlflow.artifact_root = os.path.join({lake!r}, "mlartifacts")
kill = lambda step: step == {kill_at} and os._exit(3)  # both ranks, right after the same step
out = stages.run_stage("train", cfg, "2026-01-03", on_step=kill)
rank = int(os.environ["RANK"])
summary = out["loo"]["models"]["synergen"]
with open(os.path.join({lake!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"rank": rank, "summary": summary,
               "group_left": torch.distributed.is_available() and torch.distributed.is_initialized()}}, f)
"""


# Trains ``_one_process_runs`` data-parallel (one process group for both) and writes what each rank ended with.
EQUAL_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_distributed import _one_process_runs
from synergen_core import distributed
from synergen_core.config import TrainConfig

with distributed.session(TrainConfig(device="cpu")):
    runs = _one_process_runs(Path({lake!r}))
with open(os.path.join({lake!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(runs, f)
"""


def _torchrun(tmp_path: Path, epochs: int = 0, kill_at: int | None = None, ema: float | None = None,
              nodes: int = 1, script_text: str = RANK_SCRIPT) -> tuple[subprocess.CompletedProcess, float]:
    """2 ranks: one node of 2 processes (``--standalone``), or ``nodes=2`` nodes of one process each, two
    torchrun agents meeting at a c10d rendezvous on 127.0.0.1 (with the options the train stage uses)."""
    from synergen_core.config import TrainConfig

    script = tmp_path / "rank.py"
    (tmp_path / "lake").mkdir(parents=True, exist_ok=True)
    script.write_text(script_text.format(tests=str(TESTS), lake=str(tmp_path / "lake"), epochs=epochs,
                                         kill_at=kill_at, ema=ema))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    tcfg = TrainConfig(processes=2 // nodes, nodes=nodes, rendezvous=f"127.0.0.1:{_free_port()}" if nodes > 1 else None)
    cmd = [str(TORCHRUN), *stages.torchrun_args(tcfg, f"test-{tmp_path.name}"), str(script)]
    t0 = time.perf_counter()
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
              for _ in range(nodes)]
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    code = next((a.returncode for a in agents if a.returncode), 0)
    return subprocess.CompletedProcess(cmd, code, "\n".join(outputs), ""), time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_ranks_train_one_model(tmp_path):
    from synthetic_training import synthetic_config, synthetic_split

    epochs = 4
    proc, seconds = _torchrun(tmp_path, epochs, ema=0.9)  # with the moving average of the weights
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lake = tmp_path / "lake"
    ranks = [json.loads((lake / f"rank{r}.json").read_text()) for r in (0, 1)]
    run_dir = Layout(lake).model_dir("2026-01-03", "loo", "synergen")

    # One model: both ranks ended with the same weights, which are the ones rank 0 saved.
    digests = {r["summary"]["weights_digest"] for r in ranks}
    assert len(digests) == 1
    final = checkpoint.load(run_dir / checkpoint.CHECKPOINT)
    assert distributed.digest(final["model"]) in digests
    assert final["fingerprint"]["world_size"] == 2 and len(final["rng"]["ranks"]) == 2
    assert checkpoint.load_model(run_dir).embed.codes("rec").shape[0] > 0
    kept = checkpoint.load(run_dir / checkpoint.MODEL)["state_dict"]  # the average, not the raw weights
    assert final["ema"] is not None and any(not torch.equal(kept[k], v) for k, v in final["model"].items())

    # Each rank took a part of every batch of every epoch: one process's steps.
    data = synthetic_split()
    cfg = synthetic_config(epochs=epochs)
    per_epoch = [len(train_mod.batch_order(data.windows.lengths, cfg.train, e)) for e in range(epochs)]
    for r in ranks:
        s = r["summary"]
        assert s["world_size"] == 2 and s["epochs_run"] == epochs and s["steps"] == sum(per_epoch)
        assert not r["group_left"]  # the process group was destroyed at the end of the run
    assert ranks[0]["summary"]["history"] == ranks[1]["summary"]["history"]  # rank 0's validation, shared

    # It learned: the mean training loss over both ranks went down.
    losses = [h["loss"] for h in ranks[0]["summary"]["history"]]
    assert losses[-1] < losses[0], losses
    with sqlite3.connect(lake / "mlflow.db") as db:  # one MLflow run: rank 0's
        assert db.execute("select count(*) from runs").fetchone()[0] == 1
    written = json.loads((run_dir / checkpoint.SUMMARY).read_text())
    assert written["world_size"] == 2 and [h["loss"] for h in written["history"]] == losses
    print(f"torchrun 2 ranks x {epochs} epochs: {seconds:.1f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")


@pytest.mark.slow
def test_two_nodes_train_the_model_of_one_node_and_resume_after_a_kill_with_the_same_weights(tmp_path):
    """The same two ranks as one node of two processes and as two nodes of one process (c10d rendezvous,
    the multi-node launch), the latter killed mid-epoch (both ranks) and started again: the same model and
    losses as the one-node run that was never stopped."""
    epochs = 2
    straight, _ = _torchrun(tmp_path / "straight", epochs)
    assert straight.returncode == 0, straight.stdout[-4000:]
    killed, _ = _torchrun(tmp_path / "killed", epochs, kill_at=5, nodes=2)  # synthetic_config checkpoints every 3 steps
    assert killed.returncode != 0
    run_dir = Layout(tmp_path / "killed" / "lake").model_dir("2026-01-03", "loo", "synergen")
    assert checkpoint.load(run_dir / checkpoint.CHECKPOINT)["state"]["step"] == 3
    resumed, _ = _torchrun(tmp_path / "killed", epochs, nodes=2)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    a = json.loads((tmp_path / "straight" / "lake" / "rank1.json").read_text())["summary"]
    b = json.loads((tmp_path / "killed" / "lake" / "rank1.json").read_text())["summary"]
    assert a["world_size"] == b["world_size"] == 2
    assert b["resumed"] and b["steps"] == a["steps"]
    assert b["weights_digest"] == a["weights_digest"]
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]


def _one_process_runs(out: Path) -> dict:
    """Trains the synthetic split into ``out/<negatives>`` with full-softmax and with sampled retrieval
    negatives, without dropout (a rank's masks cannot be one process's), with a cosine schedule (its horizon
    counts the steps), gradient clipping (the gradient's norm) and a moving average; under torchrun
    data-parallel. 41 windows in batches of 5: parts of 3 and 2 rows, and a last batch of one row, where
    rank 1 forwards a stand-in. -> {negatives: (summary, final weights as lists)}."""
    from synthetic_training import synthetic_config, synthetic_features, synthetic_split

    data = synthetic_split()
    data = replace(data, windows=data.windows.select(np.arange(41)))
    runs = {}
    for negatives in ("full", "sampled"):
        cfg = synthetic_config(epochs=2, patience=2, batch_size=5, negatives=negatives, n_negatives=6,
                               lr=3e-3, lr_schedule="cosine", clip_grad=0.5, ema_decay=0.8, device="cpu")
        cfg.model.dropout = 0.0
        summary = train_mod.train(cfg, data, synthetic_features(), out / negatives)
        weights = checkpoint.load(out / negatives / checkpoint.CHECKPOINT)["model"]
        runs[negatives] = (summary, {k: v.tolist() for k, v in weights.items()})
    return runs


@pytest.mark.slow
def test_two_nodes_train_the_model_of_one_process(tmp_path):
    """Two single-process "nodes" (c10d rendezvous on 127.0.0.1, gloo) split every batch of one process: the
    same steps, epoch losses, validation and final weights as one process on the same data, to float
    rounding, with full-softmax and with sampled retrieval negatives."""
    alone = _one_process_runs(tmp_path / "alone")
    proc, seconds = _torchrun(tmp_path / "ddp", nodes=2, script_text=EQUAL_SCRIPT)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = [json.loads((tmp_path / "ddp" / "lake" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for negatives, (one, weights) in alone.items():
        two, two_weights = ranks[0][negatives]
        assert two["world_size"] == 2 and two["steps"] == one["steps"] == 2 * 9
        assert two["weights_digest"] == ranks[1][negatives][0]["weights_digest"]
        assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]]
        np.testing.assert_allclose([h["loss"] for h in two["history"]], [h["loss"] for h in one["history"]], rtol=1e-4)
        np.testing.assert_allclose([h["ndcg@10"] for h in two["history"]], [h["ndcg@10"] for h in one["history"]],
                                   rtol=1e-4)
        assert two["best_epoch"] == one["best_epoch"]
        for k, w in weights.items():
            np.testing.assert_allclose(two_weights[k], w, rtol=1e-4, atol=1e-6, err_msg=f"{negatives}: {k}")
    print(f"2 nodes x 2 runs: {seconds:.1f} s; losses {[h['loss'] for h in alone['full'][0]['history']]}")


def test_multi_node_launch_options():
    from synergen_core.config import TrainConfig

    assert stages.torchrun_args(TrainConfig(processes=4), "x") == ["--standalone", "--nproc_per_node=4"]
    args = stages.torchrun_args(TrainConfig(processes=8, nodes=2, rendezvous="gpu-0:29400"),
                                "2026-01-03-manual__2026-01-03T00:00:00+00:00")
    assert args == ["--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-0:29400",
                    "--rdzv-id=synergen-2026-01-03-manual__2026-01-03T00-00-00-00-00"]
