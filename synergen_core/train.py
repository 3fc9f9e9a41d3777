"""Training loop: joint search + recommendation retrieval, ranking and semantic-ID losses.

One step (shapes for a batch of B windows trimmed to width L, C ranking candidates):

* forward the windows with the ranking candidates appended -> hidden [B, L + C, d];
* retrieval, per task with its weight (``train.w_search``, ``train.w_rec``): every position with a
  target (``Windows.target``), search at query tokens, recommendation at item tokens; full softmax over
  the catalog (``train.negatives=full``) or in-batch + popularity-sampled InfoNCE with log-Q
  (``sampled``; ``auto``, the default, picks by catalog size: ``retrieval_negatives``); plus the
  semantic-ID loss of the same positions when the model has that head;
* ranking: each window's last position is a request whose candidates are its target item (label 1)
  and negatives (label 0): the items logged as shown with the target's event when the logs have
  impressions (``Windows.shown``), else popularity-sampled items and hard negatives, i.e. the
  catalog items nearest the target in the current retrieval space.

Reproducibility: model init and dropout use torch's global RNG, seeded by ``train.seed``; the negatives
of step s are drawn from a generator seeded by ``(seed, s)`` (``negative_stream``), so that data-parallel
ranks draw the same ones; the batch order of epoch e comes from ``numpy.random.default_rng((seed, e))``.
A checkpoint holds the RNG state with the weights and optimizer, so stopping after any step and
resuming gives the same weights as an uninterrupted run (on the same device and thread count).
Early stopping keeps the weights of the best validation epoch (``checkpoint.MODEL``); with
``train.ema_decay`` those are the moving average of the weights (validated and kept in their place).

Started by ``torchrun`` with several processes, the same loop trains data-parallel
(``synergen_core.distributed``: DDP, each rank a part of every step's batch, rank 0 writes the files),
the same steps as one process; each loss is then a part's sum over the whole batch's count of targets
(``whole_batch``).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from synergen_core import checkpoint, distributed, warm_start
from synergen_core.config import Config, TrainConfig
from synergen_core.data import N_ACTIONS, N_SURFACES, SplitData, Windows, to_batch
from synergen_core.errors import PipelineError
from synergen_core.evaluate import ModelScorer, evaluate_catalog, validation_requests
from synergen_core.features import Features
from synergen_core.model import RECOMMEND, SEARCH, SynerGen, prediction_task
from synergen_core.model.losses import Whole, ranking_counts

TASKS = (("search", SEARCH), ("rec", RECOMMEND))  # retrieval tasks: name, prediction_task code


def pick_device(tcfg: TrainConfig) -> torch.device:
    if tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA; the CPU trains in float32 (bf16 matmuls are slower on most CPUs)."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_dims(data: SplitData, feats: Features) -> dict:
    return {"n_items": data.n_items, "n_queries": data.n_queries, "n_actions": N_ACTIONS,
            "n_surfaces": N_SURFACES, "codebook_size": feats.codebook_size}


def build_model(cfg: Config, data: SplitData, feats: Features) -> SynerGen:
    """A fresh model for ``data`` with the side inputs its config switches on."""
    m = cfg.model
    wants_codes = m.use_semantic_ids or m.semantic_head
    if wants_codes and feats.rec_codes is None:
        raise ValueError("model.use_semantic_ids / semantic_head are on but no semantic IDs were computed")
    return SynerGen(
        m, **{k: v for k, v in model_dims(data, feats).items() if k != "codebook_size"},
        item_text=feats.item_text if m.use_text_emb else None,
        query_text=feats.query_text if m.use_text_emb else None,
        item_codes=feats.rec_codes if wants_codes else None,
        search_codes=feats.search_codes if wants_codes else None,
        codebook_size=feats.codebook_size if wants_codes else None,
    )


# ---- one step -----------------------------------------------------------------------------------


@dataclass
class Sampler:
    """Popularity distribution of the training items, for negatives."""

    probs: Tensor  # [n_items] sampling probability, 0 at padding
    log_q: Tensor  # [n_items] log probability (log-Q correction)

    @classmethod
    def from_counts(cls, counts: np.ndarray, device) -> Sampler:
        c = torch.from_numpy(counts.astype(np.float64)) + 1.0  # every item can be drawn
        c[0] = 0.0
        p = (c / c.sum()).float().to(device)
        return cls(p, torch.log(p.clamp_min(1e-30)))


def negative_stream(seed: int, step: int, kind: int, device) -> torch.Generator:
    """The generator of step ``step``'s negatives of one kind (0 ranking, 1 retrieval): a function of its
    arguments alone, so every data-parallel rank draws what one process draws and a resumed run what an
    uninterrupted one drew, whatever dropout took from the global RNG."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence((seed, step, kind)).generate_state(1, np.uint64)[0] >> 1))
    return g


def make_batch(model: SynerGen, win: Windows, rows: np.ndarray, tcfg: TrainConfig, sampler: Sampler, device,
               step: int = 0, ranks: distributed.Ranks = distributed.Ranks()) -> dict:
    """Windows ``rows`` (step ``step``'s batch) -> the model's batch of this rank's part of them (all of
    them in one process) with targets, the retrieval negatives (``negatives`` [n_negatives], when sampled)
    and (when ranking is trained) candidates.

    Negatives are drawn for the whole batch from ``negative_stream``, then cut to the part's rows. A rank
    whose part is empty (a last batch shorter than the world size) gets the batch's first row as a stand-in
    with no targets and no candidates: DDP needs a forward and backward on every rank, and it adds nothing.
    """
    lo, hi = distributed.part(len(rows), ranks)
    stand_in = lo == hi
    if stand_in:
        lo, hi = 0, 1
    mine = rows[lo:hi]
    batch = to_batch(win.history, mine, win.lengths, device)
    L = batch["token_type"].shape[1]
    batch["target"] = torch.from_numpy(win.target[mine, -L:]).to(device)  # [B, L]
    if stand_in:
        batch["target"].zero_()
    if retrieval_negatives(tcfg, model.n_items) == "sampled":
        g = negative_stream(tcfg.seed, step, 1, device)
        batch["negatives"] = torch.multinomial(sampler.probs, tcfg.n_negatives, replacement=True, generator=g)  # [M]
    shown = torch.from_numpy(win.shown[mine, :tcfg.rank_impression_negatives]).to(device)  # [B, M]
    if model.cfg.w_ranking == 0 or shown.shape[1] + tcfg.rank_pop_negatives + tcfg.rank_hard_negatives == 0:
        return batch
    pos = batch["target"][:, -1]  # [B] the request's engaged item (0 for a stand-in: no candidates)
    task = prediction_task(batch)[:, -1]
    weight = torch.where(task == SEARCH, tcfg.w_search, tcfg.w_rec)
    B = hi - lo
    sampled = []
    logged = (shown > 0).any(1, keepdim=True)  # [B, 1]
    need_sampled = not bool(logged.all())  # else skip the draws and the [B, n_items] similarity search
    if tcfg.rank_pop_negatives and need_sampled:
        g, k = negative_stream(tcfg.seed, step, 0, device), tcfg.rank_pop_negatives
        drawn = torch.multinomial(sampler.probs, len(rows) * k, replacement=True, generator=g)
        sampled.append(drawn.view(len(rows), k)[lo:hi])  # [B, k] the part's rows of the whole batch's draws
    if tcfg.rank_hard_negatives and need_sampled:
        with torch.no_grad():
            items = model.item_vectors()  # [n_items, d]
            sims = items[pos] @ items.T  # [B, n_items]
            sims[:, 0] = float("-inf")
            sims[torch.arange(B, device=device), pos] = float("-inf")
            sampled.append(sims.topk(tcfg.rank_hard_negatives, dim=1).indices)
    parts = [pos[:, None], shown]
    if sampled:  # only for requests without logged impressions
        parts.append(torch.cat(sampled, 1).masked_fill(logged, 0))
    cand = torch.cat(parts, 1)  # [B, C]
    cand[:, 1:] = cand[:, 1:].masked_fill(cand[:, 1:] == pos[:, None], 0)
    cand = cand.masked_fill(((pos == 0) | (weight == 0))[:, None], 0)
    labels = torch.zeros(cand.shape, device=device)
    labels[:, 0] = 1.0
    batch.update(candidates=cand, labels=labels, request_ts=torch.from_numpy(win.next_ts[mine]).to(device))
    return batch


def retrieval_negatives(tcfg: TrainConfig, n_items: int) -> str:
    """``train.negatives`` for a catalog of ``n_items`` rows: "auto" is "full" up to
    ``full_softmax_max_items``, "sampled" above."""
    if tcfg.negatives != "auto":
        return tcfg.negatives
    return "full" if n_items <= tcfg.full_softmax_max_items else "sampled"


def batch_targets(batch: dict) -> dict:
    """A batch's (or a rank's part's) targets of each loss term: each retrieval task's items, in batch
    order ([N_task]), and the ranking loss's ``ranking_counts``."""
    target, task = batch["target"], prediction_task(batch)
    out: dict = {name: target[(target > 0) & (task == code)] for name, code in TASKS}
    out["ranking"] = ranking_counts(batch["labels"], batch["candidates"] > 0) if "candidates" in batch else (0, 0)
    return out


def whole_batch(parts: list[dict], rank: int) -> dict:
    """The whole batch's targets from its parts' ``batch_targets`` (in rank order), for part ``rank``'s
    losses: each task's ``Whole`` and the ranking counts."""
    out: dict = {}
    for name, _ in TASKS:
        ids = [p[name] for p in parts]
        out[name] = Whole(sum(len(i) for i in ids), torch.cat(ids), sum(len(i) for i in ids[:rank]))
    out["ranking"] = tuple(sum(p["ranking"][j] for p in parts) for j in range(2))
    return out


def gather_targets(batch: dict, ranks: distributed.Ranks) -> dict:
    """``whole_batch`` of this rank's part: every rank's ``batch_targets``, gathered (one collective)."""
    mine = batch_targets(batch)
    if not ranks.active:
        return whole_batch([mine], 0)
    parts = distributed.gather({k: v.cpu() if torch.is_tensor(v) else v for k, v in mine.items()})
    dev = batch["target"].device
    return {k: v._replace(positives=v.positives.to(dev)) if isinstance(v, Whole) else v
            for k, v in whole_batch(parts, ranks.rank).items()}


def step_losses(model: SynerGen, batch: dict, tcfg: TrainConfig, sampler: Sampler,
                whole: dict | None = None) -> dict[str, Tensor]:
    """One forward pass -> named losses and their weighted ``total``.

    ``whole``: ``whole_batch`` when ``batch`` is a rank's part of a batch (default: the batch is whole);
    every term is then a sum over the part's targets divided by the whole batch's count, so the ranks'
    losses add up to the whole batch's."""
    if whole is None:
        whole = whole_batch([batch_targets(batch)], 0)
    mcfg = model.cfg
    hidden = model(batch)  # [B, L + C, d]
    L = batch["token_type"].shape[1]
    target, task = batch["target"], prediction_task(batch)
    total = hidden.sum() * 0.0
    out: dict[str, Tensor] = {}
    negatives = retrieval_negatives(tcfg, model.n_items)
    items = model.item_vectors() if negatives == "full" else None  # [n_items, d]
    for (name, code), w in zip(TASKS, (tcfg.w_search, tcfg.w_rec)):
        n = whole[name].count  # the task's targets in the whole batch (this part may have none)
        if w == 0 or n == 0:
            continue
        sel = (target > 0) & (task == code)  # [B, L]
        sub = {**batch, "target": target * sel}
        if items is not None:
            search = torch.full((int(sel.sum()),), code == SEARCH, device=sel.device)  # [N]
            logits = model.retrieval_logits(hidden[:, :L][sel], items, search).float()  # [N, n_items]
            ret = F.cross_entropy(logits, target[sel], reduction="sum") / n
        else:
            ret = model.retrieval_loss(sub, hidden, batch["negatives"], sampler.log_q, whole[name])
        out[f"retrieval_{name}"] = ret
        loss = mcfg.w_retrieval * ret
        if model.semantic is not None:
            out[f"semantic_{name}"] = model.semantic_loss(sub, hidden, n)
            loss = loss + mcfg.w_semantic * out[f"semantic_{name}"]
        total = total + w * loss
    if "candidates" in batch and whole["ranking"][0] > 0:
        out["ranking"] = model.ranking_loss(batch, hidden, whole["ranking"])
        total = total + mcfg.w_ranking * out["ranking"]
    out["total"] = total
    return out


# ---- validation ---------------------------------------------------------------------------------


def validation_figures(model: SynerGen, data: SplitData, tcfg: TrainConfig, batch_size: int = 512,
                       exclude_consumed: tuple[str, ...] = ()) -> tuple[float, dict]:
    """(geometric mean over trained tasks of ``train.valid_metric``, per-task metrics) on the validation targets,
    ranked as the evaluation ranks them (``exclude_consumed``: ``evaluate.exclude_consumed``).

    Geometric, so that a task's relative change counts the same whatever its scale: on MovieLens
    search NDCG@10 is ~0.5 and recommendation's ~0.04, and an arithmetic mean would select the epoch
    best for search alone.
    """
    req = validation_requests(data.valid, tcfg.valid_max_rows, tcfg.seed)
    k = int(tcfg.valid_metric.split("@")[1])
    was_training = model.training
    metrics = evaluate_catalog(ModelScorer(model), req, [k], batch_size, exclude_consumed)
    model.train(was_training)
    weights = {"search": tcfg.w_search, "rec": tcfg.w_rec}
    vals = [m[tcfg.valid_metric] for t, m in metrics.items() if weights[t] > 0 and tcfg.valid_metric in m]
    return task_score(vals), metrics


def task_score(vals: list[float]) -> float:
    """Geometric mean of the tasks' validation metrics; a task at 0 is floored at 1e-6 so that the
    other tasks' progress still raises the score (a plain product would stay 0 and stop the run)."""
    if not vals:
        return float("nan")
    return float(np.exp(np.mean(np.log(np.maximum(vals, 1e-6)))))


def batch_order(lengths: np.ndarray, tcfg: TrainConfig, epoch: int) -> list[np.ndarray]:
    """Row indices of each batch of an epoch, a function of (seed, epoch) only.

    With ``bucket_by_length`` the shuffled rows are cut into chunks of ``BUCKET_BATCHES`` batches, each
    chunk is sorted by length before it is cut into batches, and the batch order is shuffled: batches
    are trimmed to their longest row, so similar lengths together skip most of the padding (most
    users' histories are far shorter than model.max_seq_len).
    """
    rng = np.random.default_rng((tcfg.seed, epoch))
    R, B = len(lengths), tcfg.batch_size
    perm = rng.permutation(R)
    if tcfg.bucket_by_length:
        chunk = B * BUCKET_BATCHES
        perm = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.split(perm, range(chunk, R, chunk))])
    batches = [perm[i:i + B] for i in range(0, R, B)]
    if tcfg.bucket_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


BUCKET_BATCHES = 50


# ---- the loop -----------------------------------------------------------------------------------


# Settings that change what a step computes; the others (epochs, patience, max_steps, progress, ...)
# may differ between a killed run and its resumption.
_STEP_FIELDS = ("seed", "batch_size", "lr", "lr_schedule", "warmup_steps", "weight_decay", "clip_grad", "amp", "max_windows", "w_search", "w_rec",
                "negatives", "n_negatives", "rank_impression_negatives", "rank_pop_negatives", "rank_hard_negatives",
                "bucket_by_length", "ema_decay")


def learning_rate(tcfg: TrainConfig, step: int, horizon: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a run of ``horizon`` steps."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    if tcfg.lr_schedule == "constant":
        return tcfg.lr
    done = min(1.0, (step - tcfg.warmup_steps) / max(1, horizon - tcfg.warmup_steps))
    return tcfg.lr * 0.5 * (1.0 + math.cos(math.pi * done))


def _horizon(tcfg: TrainConfig, n_windows: int) -> int:
    """Optimizer steps of a run that is not stopped early (the cosine schedule's length; data-parallel
    ranks split each step's batch, so the same)."""
    per_epoch = len(batch_order(np.zeros(n_windows, np.int64), tcfg, 0))
    steps = tcfg.epochs * per_epoch
    return min(steps, tcfg.max_steps) if tcfg.max_steps else steps


def _fingerprint(cfg: Config, data: SplitData, dims: dict) -> dict:
    return {"rows": len(data.windows), "dims": dims, "model": cfg.model.model_dump(mode="json"),
            "train": {k: getattr(cfg.train, k) for k in _STEP_FIELDS}}


def moving_average(model: SynerGen, tcfg: TrainConfig):
    """The exponential moving average of ``model``'s parameters (``train.ema_decay``), or None.

    Buffers (text vectors, semantic IDs) are copied, not averaged: they never change."""
    if tcfg.ema_decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tcfg.ema_decay), use_buffers=False)


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    cfg: Config, data: SplitData, feats: Features, out_dir: Path,
    on_step: Callable[[int], None] | None = None, daily: tuple[str, warm_start.Champion | None] | None = None,
) -> dict:
    """Train one model on ``data`` into ``out_dir`` (see ``checkpoint``); returns the run summary.

    ``on_step(step)`` runs after every optimizer step and its checkpoint (tests raise from it to
    simulate a kill). Under ``torchrun`` (several processes) it trains data-parallel. ``daily``: (ds, the
    champion or None) for the model the daily job registers, which starts warm from the champion when
    ``warm_start.plan`` allows (the plan is the summary's ``start``).
    """
    with distributed.session(cfg.train) as ranks:
        return _train(cfg, data, feats, out_dir, on_step, ranks, daily)


@dataclass
class _Run:
    """One run's parts, shared by the steps of ``_train``; ``state`` is the loop's, kept by its checkpoints."""

    cfg: Config
    data: SplitData
    out_dir: Path
    ranks: distributed.Ranks
    device: torch.device
    model: SynerGen
    dims: dict
    opt: torch.optim.Optimizer
    sampler: Sampler
    ema: torch.optim.swa_utils.AveragedModel | None
    fingerprint: dict
    horizon: int
    state: dict
    step_losses_of: Callable | None = None
    start: warm_start.Plan | None = None

    @property
    def kept(self) -> SynerGen:
        """What is validated and saved as the best model: the moving average when there is one."""
        return self.model if self.ema is None else self.ema.module


def _train(cfg: Config, data: SplitData, feats: Features, out_dir: Path,
           on_step: Callable[[int], None] | None, ranks: distributed.Ranks,
           daily: tuple[str, warm_start.Champion | None] | None = None) -> dict:
    out_dir = Path(out_dir)
    if len(data.windows) == 0:  # 0 steps would still write an untrained model.pt for evaluation and promotion
        raise PipelineError(f"nothing to train {out_dir} on: the {data.protocol} training split has no windows "
                            f"({len(data.train.lengths)} user sequences); the day's upstream data is empty")
    run = _start(cfg, data, feats, out_dir, ranks, daily)
    resumed = _resume(run)
    negatives = {"retrieval_negatives": retrieval_negatives(cfg.train, run.model.n_items),
                 **({"start": run.start.note()} if run.start is not None else {})}
    if run.state["done"]:
        return _summary(run.state, out_dir, resumed, run.device, write=ranks.is_main, extra=negatives)
    cfg, tcfg = run.cfg, run.cfg.train  # a warm start's epochs and learning rate
    run.step_losses_of = lambda batch, whole: step_losses(run.model, batch, tcfg, run.sampler, whole)
    if ranks.active:
        if not resumed:
            distributed.seed_rank(tcfg.seed, ranks)
        run.step_losses_of = distributed.wrap_step(run.model, step_losses, tcfg, run.sampler, run.device)
    stop = False
    while run.state["epoch"] < tcfg.epochs and not stop:
        stop = _epoch(run, on_step)
    summary = _summary(run.state, out_dir, resumed, run.device, write=ranks.is_main,
                       extra={**negatives, **({"world_size": ranks.world_size} if ranks.active else {})})
    if ranks.active:
        summary["weights_digest"] = distributed.check_in_sync(run.model.state_dict())
    return summary


def _start(cfg: Config, data: SplitData, feats: Features, out_dir: Path, ranks: distributed.Ranks,
           daily: tuple[str, warm_start.Champion | None] | None = None) -> _Run:
    """A fresh run: the seeded model (or the champion's weights in it, for a warm start), optimizer,
    sampler, moving average and fingerprint (what resumes)."""
    tcfg = cfg.train
    device = distributed.device(pick_device(tcfg), ranks)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg, data, feats).to(device)
    start = None
    if daily is not None:
        start = warm_start.plan(tcfg, daily[0], model, data.windows.next_ts, daily[1])
        if start.mode == warm_start.WARM:
            warm_start.transfer(model, start.champion.state_dict)
            tcfg = tcfg.model_copy(update={"epochs": tcfg.warm_epochs, "lr": tcfg.warm_lr or tcfg.lr})
            cfg = cfg.model_copy(update={"train": tcfg})
            data = replace(data, windows=data.windows.select(data.windows.next_ts >= start.since_ts))
    dims = model_dims(data, feats)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tcfg.lr,
                            weight_decay=tcfg.weight_decay)
    sampler = Sampler.from_counts(data.counts, device)
    ema = moving_average(model, tcfg)
    state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": -math.inf, "best_epoch": None,
             "bad_epochs": 0, "done": False, "history": [], "train_seconds": 0.0}
    fingerprint = _fingerprint(cfg, data, dims)
    if start is not None:
        fingerprint["start"] = start.note()
    if ranks.active:  # the checkpoint holds each rank's dropout RNG and share of the epoch loss
        fingerprint["world_size"] = ranks.world_size
    horizon = _horizon(tcfg, len(data.windows))
    if tcfg.lr_schedule != "constant":  # then epochs and max_steps change every step's rate
        fingerprint["lr_horizon"] = horizon
    return _Run(cfg, data, out_dir, ranks, device, model, dims, opt, sampler, ema, fingerprint, horizon, state,
                start=start)


def _resume(run: _Run) -> bool:
    """Continue from the same run's checkpoint (same fingerprint) when ``train.resume`` allows it."""
    path = run.out_dir / checkpoint.CHECKPOINT
    if not (run.cfg.train.resume and path.is_file()):
        return False
    ck = checkpoint.load(path)  # on the CPU: RNG states must stay CPU tensors; weights are copied over
    if ck["fingerprint"] != run.fingerprint:
        return False
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    if run.ema is not None:
        run.ema.load_state_dict(ck["ema"])
    run.state = ck["state"]
    if run.ranks.active:  # this rank's RNG stream and running epoch loss
        rng, run.state["loss_sum"], run.state["loss_n"] = ck["rng"]["ranks"][run.ranks.rank]
        _set_rng_state(rng, run.device)
    else:
        _set_rng_state(ck["rng"], run.device)
    return True


def _save_checkpoint(run: _Run) -> None:
    rng = _rng_state(run.device)
    state = run.state
    if run.ranks.active:
        rng = {"ranks": distributed.gather((rng, state.get("loss_sum", 0.0), state.get("loss_n", 0)))}
    if run.ranks.is_main:
        checkpoint.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "state": state,
                         "ema": None if run.ema is None else run.ema.state_dict(), "rng": rng,
                         "fingerprint": run.fingerprint}, run.out_dir / checkpoint.CHECKPOINT)


def _epoch(run: _Run, on_step: Callable[[int], None] | None) -> bool:
    """The rest of the epoch, its validation and checkpoint; True when the run stops (budget, early stop)."""
    from tqdm.auto import tqdm

    tcfg, state = run.cfg.train, run.state
    batches = batch_order(run.data.windows.lengths, tcfg, state["epoch"])  # every rank takes a part of each
    run.model.train()
    bar = tqdm(total=len(batches), initial=state["step_in_epoch"], desc=f"epoch {state['epoch']}",
               disable=not tcfg.progress or not run.ranks.is_main, leave=False, dynamic_ncols=True)
    stop = False
    for b in range(state["step_in_epoch"], len(batches)):
        rows = batches[b]
        loss, dt = _step(run, rows)
        state.update(step=state["step"] + 1, step_in_epoch=b + 1, loss_sum=state.get("loss_sum", 0.0) + loss,
                     loss_n=state.get("loss_n", 0) + 1, train_seconds=state["train_seconds"] + dt)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{int(run.data.windows.lengths[rows].sum() / max(dt, 1e-9))}")
        budget_hit = tcfg.max_steps is not None and state["step"] >= tcfg.max_steps
        if state["step"] % tcfg.checkpoint_every == 0 and not budget_hit:
            _save_checkpoint(run)
        if on_step is not None:
            on_step(state["step"])
        if budget_hit:
            stop = True
            break
    bar.close()
    return _end_epoch(run, stop)


def _step(run: _Run, rows: np.ndarray) -> tuple[float, float]:
    """One optimizer step on the windows ``rows``: (its loss, this rank's share under torchrun; its seconds)."""
    tcfg = run.cfg.train
    t0 = time.perf_counter()
    batch = make_batch(run.model, run.data.windows, rows, tcfg, run.sampler, run.device, run.state["step"], run.ranks)
    whole = gather_targets(batch, run.ranks)
    with autocast(run.device, tcfg.amp):
        losses = run.step_losses_of(batch, whole)
    run.opt.zero_grad(set_to_none=True)
    # The ranks' losses add up to the batch's; DDP averages their gradients, so world_size x the mean is the sum.
    (losses["total"] * run.ranks.world_size).backward()
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(tcfg, run.state["step"], run.horizon)
    if tcfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), tcfg.clip_grad)
    run.opt.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    loss = float(losses["total"].detach())
    return loss, time.perf_counter() - t0


def _end_epoch(run: _Run, stop: bool) -> bool:
    """Validate the epoch (rank 0 under torchrun, which then shares its state and verdict), start the next
    one and checkpoint; True when the run stops."""
    loss_sum, loss_n = run.state.get("loss_sum", 0.0), run.state.get("loss_n", 0)
    if run.ranks.active:  # rank 0 validates and decides; every rank continues with its state
        run.state["epoch_loss"] = distributed.sum_over_ranks(loss_sum) / max(loss_n, 1)  # ranks' shares of each step
        verdict = _keep_best(run) if run.ranks.is_main else None
        # pickled between this job's own ranks (no file): counters and the per-epoch history, bounded by epochs
        run.state, verdict = distributed.broadcast((run.state, verdict))
        stop = verdict or stop
    else:
        run.state["epoch_loss"] = loss_sum / max(loss_n, 1)
        stop = _keep_best(run) or stop
    run.state.update(epoch=run.state["epoch"] + 1, step_in_epoch=0, loss_sum=0.0, loss_n=0)
    run.state["done"] = stop or run.state["epoch"] >= run.cfg.train.epochs
    _save_checkpoint(run)
    if run.ranks.active:
        distributed.barrier()
    return stop


def _keep_best(run: _Run) -> bool:
    """Validate, keep the best weights; True when early stopping says stop."""
    tcfg, state = run.cfg.train, run.state
    score, per_task = validation_figures(run.kept, run.data, tcfg,
                                         exclude_consumed=tuple(run.cfg.evaluate.exclude_consumed))
    state["history"].append({"epoch": state["epoch"], "step": state["step"], "valid": per_task,
                             tcfg.valid_metric: score, "loss": state.get("epoch_loss"),
                             "train_seconds": round(state["train_seconds"], 2)})  # so far: per-epoch speed
    if not math.isfinite(score) or score > state["best"]:  # no validation targets: keep the latest
        state["best"] = score if math.isfinite(score) else state["best"]
        state["best_epoch"], state["bad_epochs"] = state["epoch"], 0
        checkpoint.save(checkpoint.model_record(run.kept, run.dims), run.out_dir / checkpoint.MODEL)
    else:
        state["bad_epochs"] += 1
    return state["bad_epochs"] >= tcfg.patience


def _summary(state: dict, out_dir: Path, resumed: bool, device: torch.device, write: bool = True,
             extra: dict | None = None) -> dict:
    summary = {
        "out_dir": str(out_dir), "device": device.type, "resumed": resumed,
        "epochs_run": state["epoch"], "steps": state["step"], "best_epoch": state["best_epoch"],
        "best_valid": state["best"] if math.isfinite(state["best"]) else None,
        "train_seconds": round(state["train_seconds"], 2), "history": state["history"], **(extra or {}),
    }
    if write:
        checkpoint.save_json(summary, out_dir / checkpoint.SUMMARY)
    return summary
