"""GenSAR-style RQ-VAE: semantic IDs for search (text view) and recommendation (collaborative view).

Each view has its own MLP encoder into a d-dim latent. The first ``shared_levels`` codebooks quantize the
concatenated latents [z_text; z_collab] (codewords of dim 2d), as in GenSAR: one code per level is chosen
jointly, and each view's residual is quantized by its half of that same codeword. The remaining residual is
split per view and quantized by ``specific_levels`` view-specific codebooks. So:

    search ID = shared codes + text codes          rec ID = shared codes + collab codes

Codes are a [n, S + 2T] int64 array laid out as [shared (S) | text-specific (T) | collab-specific (T)].

Codebooks are trained with the straight-through estimator plus the VQ-VAE codebook and commitment losses
(not EMA): every parameter stays under one optimizer, so a warm start is just ``load_state_dict`` plus a short
low-lr fine-tune; k-means initialization and dead-code reset cover the collapse that EMA is usually chosen for.

Every codebook has ``codebook_size`` codes except the last specific level of each view, whose size grows
with the catalog (``synergen_core.rqvae_capacity``: the rule, and the seeded sample of at most
``train_sample`` items the model trains on).

Collisions (two items with the same view ID) are resolved per view after ``assign``, in process
(``resolve_collisions``) or per prefix on Spark (``jobs.semantic_ids_spark``), with the same rules:
- "reassign": a colliding item moves to its next-nearest last-level code that is free under its prefix,
  keeping IDs at S + T codes; it fails only if a prefix holds more items than the last level has codes.
- "extra_code": TIGER's approach, one more code (0, 1, ...) that numbers the items sharing an ID; its range is
  the largest collision group (``max_extra_code`` in the metrics), which the generative model's vocabulary needs.
With a ``previous`` assignment both are sticky: an item whose prefix is unchanged keeps its old ID when it can.

Daily stability: warm start (load yesterday's state, fine-tune briefly, no k-means re-init, no dead-code
reset), hysteresis in ``assign`` (yesterday's code is kept at a level unless another code is more than
1 + ``hysteresis`` times nearer in squared distance), then the sticky collision handling above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn as nn

from synergen_core.config import SemanticIdConfig
from synergen_core.rqvae_capacity import last_size, level_sizes, train_rows, with_capacity
from synergen_core.vectors import unit_rows


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _sq_dists(r: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    # r [B, D], cb [K, D] -> [B, K] squared euclidean distances
    return (r * r).sum(1, keepdim=True) - 2 * r @ cb.T + (cb * cb).sum(1)


def _kmeans(x: torch.Tensor, k: int, niter: int, seed: int) -> torch.Tensor:
    x = x.detach().float().contiguous()  # [n, D]
    if x.shape[0] < k:
        raise ValueError(f"k-means init needs at least codebook_size={k} rows in the first batch, got {x.shape[0]}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, min_points_per_centroid=1, verbose=False)
    km.train(x.numpy())
    return torch.from_numpy(km.centroids.copy())  # [k, D]


class RQVAE(nn.Module):
    def __init__(self, text_dim: int, collab_dim: int, cfg: SemanticIdConfig):
        super().__init__()
        self.cfg, self.text_dim, self.collab_dim = cfg, text_dim, collab_dim
        d, h, K, S = cfg.latent_dim, list(cfg.hidden_dims), level_sizes(cfg), cfg.shared_levels
        self.enc_t, self.enc_c = _mlp([text_dim, *h, d]), _mlp([collab_dim, *h, d])
        self.dec_t, self.dec_c = _mlp([d, *h[::-1], text_dim]), _mlp([d, *h[::-1], collab_dim])
        self.shared = nn.ParameterList([nn.Parameter(torch.zeros(K[j], 2 * d)) for j in range(S)])
        self.spec_t = nn.ParameterList([nn.Parameter(torch.zeros(K[S + j], d)) for j in range(cfg.specific_levels)])
        self.spec_c = nn.ParameterList([nn.Parameter(torch.zeros(K[S + j], d)) for j in range(cfg.specific_levels)])
        self.register_buffer("initialized", torch.tensor(False))

    def codebooks(self) -> list[nn.Parameter]:
        return [*self.shared, *self.spec_t, *self.spec_c]  # the codes' column order

    def _level(self, r: torch.Tensor, cb: nn.Parameter, init: bool, topk: int, prev: torch.Tensor | None,
               keep: torch.Tensor | None):
        # r [B, D] residual into this level -> code [B], codeword [B, D], vq loss, top-k (codes, dists) [B, k], keep
        if init:
            cb.data.copy_(_kmeans(r, cb.shape[0], self.cfg.kmeans_iters, self.cfg.seed))
        dist = _sq_dists(r.detach(), cb.detach())  # [B, K]
        code = dist.argmin(1)
        if prev is not None:
            # hysteresis: an item keeps yesterday's code unless the nearest one is clearly nearer, so a
            # fine-tuned model does not flip items that sit on a boundary; only while its prefix is unchanged
            d_prev = dist.gather(1, prev.clamp(min=0)[:, None]).squeeze(1)
            hold = keep & (prev >= 0) & (d_prev <= (1 + self.cfg.hysteresis) * dist.min(1).values)
            code = torch.where(hold, prev, code)
            keep = keep & (code == prev)
        e = cb[code]
        vq = (r.detach() - e).pow(2).sum(1).mean() + self.cfg.beta * (r - e.detach()).pow(2).sum(1).mean()
        top = dist.topk(min(topk, cb.shape[0]), dim=1, largest=False) if topk else None
        return code, e, vq, top, keep

    def quantize(self, zt: torch.Tensor, zc: torch.Tensor, init: bool = False, topk: int = 0,
                 prev: torch.Tensor | None = None) -> dict:
        # zt, zc [B, d]; prev [B, S + 2T] yesterday's codes (-1: none) -> codes [B, S + 2T] and per-view codewords
        d, S, T = self.cfg.latent_dim, len(self.shared), len(self.spec_t)
        r = torch.cat([zt, zc], 1)  # [B, 2d]
        q = torch.zeros_like(r)
        keep = None if prev is None else torch.ones(len(r), dtype=torch.bool)
        col = lambda j: None if prev is None else prev[:, j]  # noqa: E731
        codes, residuals, vq, last = [], [], r.new_zeros(()), [None, None]
        for j, cb in enumerate(self.shared):
            residuals.append(r.detach())
            code, e, loss, top, keep = self._level(r, cb, init, topk, col(j), keep)
            codes.append(code)
            vq, q, r = vq + loss, q + e, r - e.detach()
        views, keep_shared = [], keep
        for v, books in enumerate([self.spec_t, self.spec_c]):
            rv, qv, keep = r[:, v * d:(v + 1) * d], q[:, v * d:(v + 1) * d], keep_shared  # [B, d]
            for j, cb in enumerate(books):
                residuals.append(rv.detach())
                code, e, loss, top, keep = self._level(rv, cb, init, topk, col(S + v * T + j), keep)
                codes.append(code)
                vq, qv, rv, last[v] = vq + loss, qv + e, rv - e.detach(), top
            views.append(qv)
        return {"codes": torch.stack(codes, 1), "qt": views[0], "qc": views[1], "vq": vq,
                "residuals": residuals, "last_top": last}

    def forward(self, xt: torch.Tensor, xc: torch.Tensor, init: bool = False) -> dict:
        # xt [B, text_dim], xc [B, collab_dim]
        zt, zc = self.enc_t(xt), self.enc_c(xc)  # [B, d] each
        out = self.quantize(zt, zc, init=init)
        # straight-through: decoders see the codewords, encoders get the decoders' gradient
        qt = zt + (out["qt"] - zt).detach()
        qc = zc + (out["qc"] - zc).detach()
        out["recon_t"] = (self.dec_t(qt) - xt).pow(2).sum(1).mean()
        out["recon_c"] = (self.dec_c(qc) - xc).pow(2).sum(1).mean()
        out["loss"] = out["recon_t"] + out["recon_c"] + out["vq"]
        return out


def build_rqvae(text_dim: int, collab_dim: int, cfg: SemanticIdConfig, state: dict | None = None) -> RQVAE:
    """A new model, or yesterday's (``state`` = its ``state_dict()``) for a warm start; unless ``cfg`` pins
    the last level's size, a state's own size is kept (``model.cfg`` then has it)."""
    last = f"spec_t.{cfg.specific_levels - 1}"
    if state is not None and cfg.last_codebook_size is None and last in state \
            and state[last].shape[0] != cfg.codebook_size:
        cfg = cfg.model_copy(update={"last_codebook_size": int(state[last].shape[0])})
    model = RQVAE(text_dim, collab_dim, cfg)
    if state is not None:
        model.load_state_dict(state)
    return model


def _reset_dead_codes(model: RQVAE, usage: list[torch.Tensor], residuals: list[torch.Tensor], gen: torch.Generator):
    # a code no item chose over the interval gets no codebook gradient: move it onto a live residual
    for cb, used, r in zip(model.codebooks(), usage, residuals):
        dead = (used == 0).nonzero().squeeze(1)
        if len(dead) == 0:
            continue
        pick = torch.randint(0, r.shape[0], (len(dead),), generator=gen)
        noise = 1e-3 * r.std() * torch.randn(len(dead), r.shape[1], generator=gen)  # splits duplicate picks
        cb.data[dead] = r[pick] + noise


def train_rqvae(
    text_vecs: np.ndarray, collab_vecs: np.ndarray, cfg: SemanticIdConfig, state: dict | None = None,
    log_every: int = 0, n_items: int | None = None,
) -> tuple[RQVAE, list[dict]]:
    """Train from scratch, or fine-tune ``state`` (warm start: warm_epochs at warm_lr, no k-means re-init,
    no dead-code reset). A cold start sizes the last level for ``n_items`` (default: the rows given; a
    caller that passes a sample gives the catalog's size) unless ``cfg`` pins it; either trains on
    ``train_rows`` of the rows given.

    Returns the model (eval mode, ``model.cfg`` with the size it has) and per-epoch mean losses. Trains on one torch thread: with more, float
    sums are split differently from run to run, weights differ by ~1e-6, and some items' codes (and so
    every downstream model and list) would change on a rerun of the same day. The model is small.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_rqvae(text_vecs, collab_vecs, cfg, state, log_every, n_items)
    finally:
        torch.set_num_threads(threads)


def _train_rqvae(text_vecs, collab_vecs, cfg: SemanticIdConfig, state: dict | None, log_every: int,
                 n_items: int | None):
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if state is None:  # the whole catalog's capacity, not the sample's
        cfg = with_capacity(cfg, len(text_vecs) if n_items is None else n_items)
    rows = train_rows(len(text_vecs), cfg)
    if rows is not None:
        text_vecs, collab_vecs = np.asarray(text_vecs)[rows], np.asarray(collab_vecs)[rows]
    xt_all = torch.as_tensor(np.asarray(text_vecs, np.float32))  # [n, text_dim]
    xc_all = torch.as_tensor(np.asarray(collab_vecs, np.float32))  # [n, collab_dim]
    n = xt_all.shape[0]
    model = build_rqvae(xt_all.shape[1], xc_all.shape[1], cfg, state)
    epochs, lr = (cfg.warm_epochs, cfg.warm_lr) if state is not None else (cfg.epochs, cfg.lr)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    usage = [torch.zeros(cb.shape[0], dtype=torch.long) for cb in model.codebooks()]
    seed_rows = max(level_sizes(model.cfg))  # k-means seeds every level from one batch of at least this
    history, step = [], 0
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "recon_t": 0.0, "recon_c": 0.0, "vq": 0.0}
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            init = not bool(model.initialized)
            if init:
                with torch.no_grad():
                    seed = perm[:max(len(idx), seed_rows)]  # = idx unless a level outgrows batch_size
                    model(xt_all[seed], xc_all[seed], init=True)
                model.initialized.fill_(True)
            out = model(xt_all[idx], xc_all[idx])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            for j, u in enumerate(usage):
                u += torch.bincount(out["codes"][:, j], minlength=u.shape[0])
            step += 1
            # not in a warm start: re-seeding a code onto a live residual pulls items off their IDs
            if state is None and step % cfg.dead_code_interval == 0:
                _reset_dead_codes(model, usage, out["residuals"], gen)
                for u in usage:
                    u.zero_()
            for k in sums:
                sums[k] += float(out[k].detach()) * len(idx) / n
        history.append({"epoch": epoch, **sums})
        if log_every and (epoch % log_every == 0 or epoch == epochs - 1):
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in history[-1].items()))
    return model.eval(), history


@torch.no_grad()
def _assign_batches(model: RQVAE, text_vecs: np.ndarray, collab_vecs: np.ndarray, previous: np.ndarray | None,
                    topk: int, batch_size: int):
    model.eval()
    n, n_cols = len(text_vecs), model.cfg.shared_levels + 2 * model.cfg.specific_levels
    if previous is not None and np.shape(previous) != (n, n_cols):
        raise ValueError(f"previous raw codes have shape {np.shape(previous)}, expected {(n, n_cols)}")
    codes, cands, cand_d = [np.zeros((0, n_cols), np.int64)], [], []
    for i in range(0, n, batch_size):
        xt = torch.as_tensor(np.asarray(text_vecs[i:i + batch_size], np.float32))
        xc = torch.as_tensor(np.asarray(collab_vecs[i:i + batch_size], np.float32))
        prev = None if previous is None else torch.as_tensor(np.asarray(previous[i:i + batch_size], np.int64))
        out = model.quantize(model.enc_t(xt), model.enc_c(xc), topk=topk, prev=prev)
        codes.append(out["codes"].numpy())
        if topk:
            cands.append(np.stack([t.indices.numpy() for t in out["last_top"]], 1))  # [B, 2, k]
            cand_d.append(np.stack([t.values.numpy() for t in out["last_top"]], 1))
    if not topk:
        return np.concatenate(codes), None, None
    k = min(topk, last_size(model.cfg))
    cands = cands or [np.zeros((0, 2, k), np.int64)]
    cand_d = cand_d or [np.zeros((0, 2, k), np.float32)]
    return np.concatenate(codes), np.concatenate(cands), np.concatenate(cand_d)


def assign(
    model: RQVAE, text_vecs: np.ndarray, collab_vecs: np.ndarray, previous: np.ndarray | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Raw codes [n, S + 2T] int64 for items [n, text_dim], [n, collab_dim]: per row, batched, CPU, no state.

    ``previous``: yesterday's raw codes for these rows ([n, S + 2T], -1 rows for new items), for hysteresis.
    Safe in Spark ``mapInArrow`` (ship the model, call per partition). Collisions are not resolved here:
    that needs every item of a prefix at once (``resolve_collisions``).
    """
    return _assign_batches(model, text_vecs, collab_vecs, previous, 0, batch_size or model.cfg.assign_batch_size)[0]


def assign_with_candidates(
    model: RQVAE, text_vecs: np.ndarray, collab_vecs: np.ndarray, previous: np.ndarray | None = None,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``assign`` plus each view's nearest last-level codes, nearest first.

    Returns codes [n, S + 2T], cands [n, 2, k] (text, collab), their squared distances [n, 2, k].
    """
    return _assign_batches(model, text_vecs, collab_vecs, previous, model.cfg.candidates,
                           batch_size or model.cfg.assign_batch_size)


@dataclass
class SemanticIds:
    raw: np.ndarray  # [n, S + 2T] codes before collision handling
    search: np.ndarray  # [n, S + T (+1 with extra_code)]
    rec: np.ndarray  # [n, S + T (+1 with extra_code)]


def view_codes(raw: np.ndarray, cfg: SemanticIdConfig) -> tuple[np.ndarray, np.ndarray]:
    S, T = cfg.shared_levels, cfg.specific_levels
    return raw[:, :S + T], np.concatenate([raw[:, :S], raw[:, S + T:]], 1)


def _keys(codes: np.ndarray, base: int) -> np.ndarray:
    # each row of codes [n, L] as one int64, last code least significant, so key // base is the prefix
    key = np.zeros(len(codes), np.int64)
    for j in range(codes.shape[1]):
        key = key * base + codes[:, j]
    return key


def _previous_ok(previous: np.ndarray | None, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    if previous is None:
        return np.full((n, width), -1, np.int64), np.zeros(n, bool)
    previous = np.asarray(previous, np.int64)
    if previous.shape != (n, width):
        raise ValueError(f"previous IDs have shape {previous.shape}, expected {(n, width)} (-1 rows for new items)")
    return previous, (previous >= 0).all(1)


def reassign_collisions(codes: np.ndarray, cands: np.ndarray, dists: np.ndarray, K: int, prev: np.ndarray | None,
                        same_raw: np.ndarray | None = None, base: int | None = None) -> np.ndarray:
    # codes [n, L], cands/dists [n, k] last-level candidates nearest first, same_raw [n]: raw codes as
    # yesterday's -> unique IDs [n, L]; K: the last level's codes, base: above every level's codes
    base = base or K
    n = len(codes)
    prev, has_prev = _previous_ok(prev, n, codes.shape[1])
    ids = codes.copy()
    prio = dists[:, 0].copy()  # who keeps a contested code: the nearest item, and old owners before anyone
    # sticky: an old item keeps its previous last code if its prefix is unchanged and that code is still a
    # candidate, or its raw codes did not change at all (then yesterday's resolution still holds)
    same_prefix = has_prev & (prev[:, :-1] == codes[:, :-1]).all(1)
    in_cands = (cands == prev[:, -1:]).any(1)
    sticky = same_prefix & (in_cands | (False if same_raw is None else same_raw))
    ids[sticky, -1] = prev[sticky, -1]
    prio[sticky] = -1.0
    key = _keys(ids, base)
    order = np.lexsort((prio, key))  # by ID, then priority
    first = np.ones(n, bool)
    first[1:] = key[order][1:] != key[order][:-1]
    movers = order[~first]
    if len(movers) == 0:
        return ids
    prefix = key // base
    mover_set = set(movers.tolist())
    taken: dict[int, set[int]] = {}
    hit = np.isin(prefix, np.unique(prefix[movers]))
    for i in np.nonzero(hit)[0]:
        if int(i) not in mover_set:
            taken.setdefault(int(prefix[i]), set()).add(int(ids[i, -1]))
    for i in movers[np.argsort(dists[movers, 0], kind="stable")]:
        used = taken.setdefault(int(prefix[i]), set())
        free = [int(c) for c in cands[i] if int(c) not in used]
        if not free:
            free = [c for c in range(K) if c not in used]  # beyond its candidates: any free code
        if not free:
            raise ValueError(
                f"prefix {codes[i, :-1].tolist()} holds more than the last level's {K} codes: use "
                "semantic_ids.collision=extra_code, a lower capacity_load or a larger last_codebook_size")
        ids[i, -1] = free[0]
        used.add(free[0])
    return ids


def extra_code_collisions(codes: np.ndarray, dists: np.ndarray, K: int, prev: np.ndarray | None) -> np.ndarray:
    # codes [n, L] -> [n, L + 1]; the extra code numbers the items sharing an ID, nearest first
    n = len(codes)
    prev, has_prev = _previous_ok(prev, n, codes.shape[1] + 1)
    sticky = has_prev & (prev[:, :-1] == codes).all(1)
    key = _keys(codes, K)
    order = np.lexsort((dists, key))  # by ID, then distance to the code
    is_start = np.r_[True, key[order][1:] != key[order][:-1]]
    starts = np.nonzero(is_start)[0]
    ends = np.r_[starts[1:], n]
    gid = np.cumsum(is_start) - 1  # group of each sorted position
    extra = np.empty(n, np.int64)
    extra[order] = np.arange(n) - starts[gid]
    # only groups where an old item's previous extra code differs from its rank need the slow path
    redo = np.unique(gid[sticky[order] & (extra[order] != prev[order, -1])])
    for g in redo:
        group = order[starts[g]:ends[g]]
        used = {int(prev[i, -1]) for i in group if sticky[i]}
        nxt = 0
        for i in group:
            if sticky[i]:
                extra[i] = prev[i, -1]
                continue
            while nxt in used:
                nxt += 1
            extra[i], nxt = nxt, nxt + 1
    return np.concatenate([codes, extra[:, None]], 1)


def resolve_collisions(
    raw: np.ndarray, cands: np.ndarray, dists: np.ndarray, cfg: SemanticIdConfig,
    previous: SemanticIds | None = None,
) -> SemanticIds:
    """Unique search and rec IDs for a catalog in one process, from ``assign_with_candidates`` output.

    ``previous``: yesterday's IDs aligned to these rows (-1 rows for new items); their holders keep them when
    the prefix is unchanged, so a retrain moves few IDs and new items never take an old item's ID.
    ``cfg``: the assigning model's (``model.cfg``), whose last level may be larger than ``codebook_size``.
    """
    # key base above every code, also when cfg lost a grown last size (features' extra_code fallback)
    out, base = [], max(*level_sizes(cfg), int(raw.max(initial=0)) + 1, int(np.max(cands, initial=0)) + 1)
    prev_raw = None if previous is None else view_codes(np.asarray(previous.raw), cfg)
    for v, codes in enumerate(view_codes(raw, cfg)):
        prev = None if previous is None else (previous.search, previous.rec)[v]
        if cfg.collision == "reassign":
            same_raw = None if prev_raw is None else (prev_raw[v] == codes).all(1)
            out.append(reassign_collisions(codes, cands[:, v], dists[:, v], last_size(cfg), prev, same_raw, base))
        else:
            out.append(extra_code_collisions(codes, dists[:, v, 0], base, prev))
    return SemanticIds(raw=raw, search=out[0], rec=out[1])


def semantic_ids(
    model: RQVAE, text_vecs: np.ndarray, collab_vecs: np.ndarray, previous: SemanticIds | None = None,
) -> SemanticIds:
    """``assign_with_candidates`` + ``resolve_collisions`` in one call, for a catalog that fits one process."""
    prev_raw = None if previous is None else previous.raw
    raw, cands, dists = assign_with_candidates(model, text_vecs, collab_vecs, prev_raw)
    return resolve_collisions(raw, cands, dists, model.cfg, previous)


def _collision_rate(ids: np.ndarray) -> float:
    # share of items whose ID another item also has
    if len(ids) == 0:
        return 0.0
    _, inv, counts = np.unique(ids, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inv.ravel()] > 1).mean())


def _utilization(col: np.ndarray, K: int) -> tuple[float, float]:
    p = np.bincount(col, minlength=K) / max(len(col), 1)
    nz = p[p > 0]
    return float((p > 0).mean()), float(math.exp(-(nz * np.log(nz)).sum()))


def _prefix_similarity(
    first: np.ndarray, vecs: list[tuple[str, np.ndarray]], pairs: int, rng: np.random.Generator,
) -> dict:
    # mean cosine of pairs sharing a first code vs random pairs, per vector set
    order = np.argsort(first, kind="stable")
    _, start, counts = np.unique(first[order], return_index=True, return_counts=True)
    multi = counts > 1
    if not multi.any():
        return {}
    g = rng.choice(np.nonzero(multi)[0], size=pairs, p=counts[multi] / counts[multi].sum())
    a_pos = rng.integers(0, counts[g])
    b_pos = (a_pos + rng.integers(1, counts[g])) % counts[g]  # a different member of the same group
    a, b = order[start[g] + a_pos], order[start[g] + b_pos]
    ra, rb = rng.integers(0, len(first), pairs), rng.integers(0, len(first), pairs)
    ra, rb = ra[ra != rb], rb[ra != rb]
    cos = lambda x, i, j: float((unit_rows(x[i], None) * unit_rows(x[j], None)).sum(1).mean())  # noqa: E731
    return {name: {"same_prefix": cos(x, a, b), "random": cos(x, ra, rb)} for name, x in vecs}


@torch.no_grad()
def id_metrics(
    model: RQVAE, text_vecs: np.ndarray, collab_vecs: np.ndarray, ids: SemanticIds,
    previous: SemanticIds | None = None, pairs: int = 20_000, seed: int = 0,
) -> dict:
    """Quality figures of one assignment (see module doc); ``previous`` aligned to the rows, -1 for new items."""
    cfg, n = model.cfg, len(ids.raw)
    model.eval()
    rt = rc = 0.0
    for i in range(0, n, cfg.assign_batch_size):
        out = model(torch.as_tensor(np.asarray(text_vecs[i:i + cfg.assign_batch_size], np.float32)),
                    torch.as_tensor(np.asarray(collab_vecs[i:i + cfg.assign_batch_size], np.float32)))
        m = out["codes"].shape[0]
        rt, rc = rt + float(out["recon_t"]) * m / n, rc + float(out["recon_c"]) * m / n
    names = ([f"shared_{j}" for j in range(cfg.shared_levels)] + [f"text_{j}" for j in range(cfg.specific_levels)]
             + [f"collab_{j}" for j in range(cfg.specific_levels)])
    levels = {}
    for j, (name, size) in enumerate(zip(names, level_sizes(cfg))):
        u, ppl = _utilization(ids.raw[:, j], size)
        levels[name] = {"utilization": u, "perplexity": ppl}
    rng = np.random.default_rng(seed)
    views = {}
    for v, (name, raw_v, final) in enumerate(zip(["search", "rec"], view_codes(ids.raw, cfg), [ids.search, ids.rec])):
        stats = {
            "collision_rate_before": _collision_rate(raw_v),
            "collision_rate_after": _collision_rate(final),
            "unique_id_share": len(np.unique(final, axis=0)) / max(n, 1),
            # differs from the raw codes: moved off a collision, or held at yesterday's code
            "moved_by_resolution": float((final[:, :raw_v.shape[1]] != raw_v).any(1).mean()) if n else 0.0,
            # headroom of "reassign": it fails once a prefix holds more than the last level has codes
            "max_prefix_group": int(np.unique(raw_v[:, :-1], axis=0, return_counts=True)[1].max()) if n else 0,
            "max_extra_code": int(final[:, -1].max()) if n and final.shape[1] > raw_v.shape[1] else None,
            "prefix_similarity": _prefix_similarity(
                final[:, 0], [("text", text_vecs), ("collab", collab_vecs)], pairs, rng) if n > 1 else {},
        }
        if previous is not None:
            prev = (previous.search, previous.rec)[v]
            old = (prev >= 0).all(1)
            stats["old_items"] = int(old.sum())
            stats["id_change_share"] = float((prev[old] != final[old]).any(1).mean()) if old.any() else 0.0
        views[name] = stats
    if previous is not None:
        old = (previous.search >= 0).all(1)
        changed = (previous.search[old] != ids.search[old]).any(1) | (previous.rec[old] != ids.rec[old]).any(1)
        views["either_id_change_share"] = float(changed.mean()) if old.any() else 0.0
    return {"n_items": n, "recon_text": rt, "recon_collab": rc, "levels": levels, **views}
