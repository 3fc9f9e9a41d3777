"""Offline evaluation, the same code for the model, its variants and the baselines.

* Full-catalog retrieval: every evaluation target is ranked against the whole catalog (no sampled
  negatives): Recall@K, NDCG@K, MRR per task (``metrics`` has the tie rules).
* Ranking quality: each target gets a candidate list of itself plus ``evaluate.rank_negatives`` items
  sampled by training popularity or uniformly over the items seen in training
  (``evaluate.rank_negatives_by``; seeded, so every model scores the same lists); AUC and NDCG@K of
  each scorer's order. The model is scored twice on the lists: by its ranking head and by its
  retrieval scores, which shows what the ranking stage adds.

A scorer has ``name``, ``tasks`` (the prediction tasks it can serve), ``catalog(requests) -> [N,
n_items]`` scores (-inf at padding) and ``candidates(requests, cand [N, C]) -> [N, C]`` scores.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from synergen_core.config import EvaluateConfig
from synergen_core.data import TASK_NAMES, Requests, to_batch
from synergen_core.metrics import catalog_metrics, list_metrics, rank_stats
from synergen_core.model import RECOMMEND, SEARCH, SynerGen


class ModelScorer:
    """A SynerGen model as a scorer: retrieval logits over the catalog, ranking head on candidates."""

    tasks = (SEARCH, RECOMMEND)

    def __init__(self, model: SynerGen, name: str = "synergen", device=None, use_ranking_head: bool = True):
        self.model, self.name = model, name
        self.device = device or next(model.parameters()).device
        self.use_ranking_head = use_ranking_head
        with torch.no_grad():
            model.eval()
            self.items = model.item_vectors()  # [n_items, d], reused for every chunk

    def _batch(self, req: Requests) -> dict[str, Tensor]:
        rows = np.arange(len(req))
        return to_batch(req.history, rows, req.lengths, self.device)

    @torch.no_grad()
    def catalog(self, req: Requests) -> Tensor:
        """[N, n_items] float32 on the scorer's device (the training device): ranks are counted there, so an
        [N x catalog] matrix never crosses to the host."""
        batch = self._batch(req)
        hidden = self.model(batch)
        return self.model.request_logits(batch, hidden, self.items).float()

    @torch.no_grad()
    def retrieval_candidates(self, req: Requests, cand: np.ndarray) -> np.ndarray:
        """[N, C] the retrieval logits of the listed items only (``catalog``'s values there, no [N, n_items])."""
        batch = self._batch(req)
        c = torch.from_numpy(cand).to(self.device)  # [N, C]
        q = self.model.request_query(batch, self.model(batch))  # [N, d]
        scores = torch.einsum("nd,ncd->nc", q, self.items[c])
        return scores.masked_fill(c == 0, float("-inf")).float().cpu().numpy()  # 0: padding, as in catalog

    @torch.no_grad()
    def candidates(self, req: Requests, cand: np.ndarray) -> np.ndarray:
        if not self.use_ranking_head:
            return self.retrieval_candidates(req, cand)
        batch = self._batch(req)
        batch["candidates"] = torch.from_numpy(cand).to(self.device)
        batch["request_ts"] = torch.from_numpy(req.ts).to(self.device)
        hidden = self.model(batch)
        return self.model.ranking_scores(batch, hidden).float().cpu().numpy()


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield np.arange(i, min(i + size, n))


def _by_task(scorer, req: Requests, compute) -> dict[str, dict]:
    out = {}
    for task in scorer.tasks:
        rows = np.nonzero(req.task == task)[0]
        if len(rows):
            out[TASK_NAMES[task]] = compute(rows)
    return out


def evaluate_catalog(
    scorer, req: Requests, ks: list[int], batch_size: int = 512, exclude_consumed: tuple[str, ...] = ()
) -> dict[str, dict]:
    """Full-catalog Recall@K / NDCG@K / MRR of ``scorer`` per task: {"search": {...}, "rec": {...}}.

    ``exclude_consumed``: the tasks ("rec", "search") whose requests rank the catalog without the items in
    ``req.consumed``, as the served lists do (``score.exclude_consumed``); a target the user had already
    engaged with then ranks below every other item (a miss at any K short of the catalog), as it is
    missing from the served list.
    """
    ranks = catalog_ranks(scorer, req, batch_size, exclude_consumed)
    return {task: catalog_metrics(greater, ties, ks) for task, (greater, ties) in ranks.items()}


def catalog_ranks(
    scorer, req: Requests, batch_size: int = 512, exclude_consumed: tuple[str, ...] = ()
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task, (greater, ties) [n] of each request's target in its full-catalog ranking, in request
    order: the per-target figures ``evaluate_catalog`` averages (for paired comparisons of two models)."""
    unknown = set(exclude_consumed) - set(TASK_NAMES.values())
    if unknown:
        raise ValueError(f"exclude_consumed: unknown tasks {sorted(unknown)}")

    def compute(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sub = req.select(rows)
        exclude = TASK_NAMES[int(sub.task[0])] in exclude_consumed
        if exclude and sub.consumed is None:
            raise ValueError("exclude_consumed needs requests with their consumed items (Requests.consumed)")
        greater, ties = [], []
        for chunk in _chunks(len(sub), batch_size):
            part = sub.select(chunk)
            scores = scorer.catalog(part)  # [n, n_items]
            if exclude:  # out of place: a scorer may return a broadcast view; column 0 is padding anyway
                consumed = torch.from_numpy(part.consumed).long().to(scores.device)  # [n, M] scatter indices
                consumed = consumed.masked_fill(consumed >= scores.shape[1], 0)  # items the scorer cannot rank
                scores = scores.scatter(1, consumed, float("-inf"))
            g, t = rank_stats(scores, torch.from_numpy(part.target).to(scores.device))  # on the scores' device
            greater.append(g.cpu().numpy())
            ties.append(t.cpu().numpy())
        return np.concatenate(greater), np.concatenate(ties)

    return _by_task(scorer, req, compute)


def candidate_lists(req: Requests, counts: np.ndarray, n_neg: int, seed: int, batch_size: int = 1024) -> np.ndarray:
    """[N, 1 + n_neg]: the target first, then distinct items sampled without replacement with
    probability proportional to training count, never the target.

    Successive sampling (the distribution Gumbel top-k gives) by draws with replacement from the
    cumulative weights, repeats and the target skipped: a chunk of rows holds [rows, ~3 n_neg] draws and
    the catalog one cumulative sum, never a rows x catalog matrix (1,024 rows x 10M items would be 80 GB).
    When fewer than ``n_neg`` other items have a count, every item gets one pseudo-count.
    """
    c = counts.astype(np.float64).copy()
    c[0] = 0.0
    if (c > 0).sum() <= n_neg:
        c[1:] += 1.0
    support = np.flatnonzero(c > 0)
    n_neg = max(min(n_neg, len(support) - 1), 0)
    out = np.zeros((len(req), n_neg + 1), np.int64)
    out[:, 0] = req.target
    if n_neg == 0:
        return out
    cdf = np.cumsum(c[support])
    rng = np.random.default_rng(seed)
    for rows in _chunks(len(req), batch_size):
        out[rows, 1:] = _distinct_draws(support, cdf, c, req.target[rows], n_neg, rng)
    return out


def _distinct_draws(support: np.ndarray, cdf: np.ndarray, weights: np.ndarray, targets: np.ndarray, k: int,
                    rng: np.random.Generator, rounds: int = 32) -> np.ndarray:
    # support [S] items with weight, cdf [S] their cumulative weights, targets [R] -> [R, k] distinct items
    got = np.full((len(targets), k), -1, np.int64)
    todo = np.arange(len(targets))
    for _ in range(rounds):
        u = rng.random((len(todo), 2 * k + 8)) * cdf[-1]
        draws = support[np.minimum(np.searchsorted(cdf, u, side="right"), len(support) - 1)]
        got[todo], done = _first_distinct(np.concatenate([got[todo], draws], 1), targets[todo], k)
        todo = todo[~done]
        if not len(todo):
            return got
    # Rows still short: the items left hold little weight next to those drawn. Their remaining picks one at
    # a time from the weights with the drawn items (and the target) taken out, O(rows x k) per pick.
    for _ in range(k):
        have = (got[todo] >= 0).sum(1)
        todo = todo[have < k]
        if not len(todo):
            break
        pick = _draw_without(support, cdf, weights, np.concatenate([got[todo], targets[todo, None]], 1), rng)
        got[todo, have[have < k]] = pick
    return got


def _draw_without(support: np.ndarray, cdf: np.ndarray, weights: np.ndarray, out: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    # one item per row of out [R, m] (distinct items to leave out, -1: none), by weight among the rest: a
    # uniform point over the remaining mass, pushed past each left-out item's interval of the cumulative
    # weights in ascending order
    w = np.where(out >= 0, weights[np.maximum(out, 0)], 0.0)
    start = np.where(w > 0, cdf[np.minimum(np.searchsorted(support, np.maximum(out, 0)), len(cdf) - 1)] - w, np.inf)
    order = np.argsort(start, 1)
    start, w = np.take_along_axis(start, order, 1), np.take_along_axis(w, order, 1)
    pick = np.full(len(out), -1, np.int64)
    redo = np.arange(len(out))
    while len(redo):  # a point rounded into a left-out interval (rare) is drawn again
        x = rng.random(len(redo)) * (cdf[-1] - w[redo].sum(1))
        for j in range(out.shape[1]):
            x = x + np.where(x >= start[redo, j], w[redo, j], 0.0)
        pick[redo] = support[np.minimum(np.searchsorted(cdf, x, side="right"), len(support) - 1)]
        redo = redo[(pick[redo, None] == out[redo]).any(1)]
    return pick


def _first_distinct(cand: np.ndarray, targets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # cand [R, M] (-1: none) -> the first k distinct non-target items of each row in order [R, k] (-1 pads),
    # and whether the row has k
    cand = np.where(cand == targets[:, None], -1, cand)
    order = np.argsort(cand, axis=1, kind="stable")  # equal items: the earliest first
    ranked = np.take_along_axis(cand, order, 1)
    repeat = np.zeros_like(cand, bool)
    np.put_along_axis(repeat, order, np.pad(ranked[:, 1:] == ranked[:, :-1], ((0, 0), (1, 0))), 1)
    valid = (cand >= 0) & ~repeat
    rank = np.cumsum(valid, 1)
    keep = valid & (rank <= k)
    out = np.full((len(cand), k), -1, np.int64)
    rows, _ = np.nonzero(keep)
    out[rows, rank[keep] - 1] = cand[keep]
    return out, rank[:, -1] >= k


def ranking_lists(req: Requests, counts: np.ndarray, cfg: EvaluateConfig) -> np.ndarray:
    """The evaluation's candidate lists (``candidate_lists``) for training item counts ``counts``."""
    weights = counts if cfg.rank_negatives_by == "popularity" else (counts > 0).astype(np.float64)
    return candidate_lists(req, weights, cfg.rank_negatives, cfg.seed)


def evaluate_lists(score, scorer, req: Requests, cand: np.ndarray, ks: list[int], batch_size: int = 512) -> dict[str, dict]:
    """AUC and NDCG@K of ``score(requests, cand) -> [n, C]`` on the candidate lists, per task."""
    labels = np.zeros(cand.shape, np.float32)
    labels[:, 0] = 1.0
    valid = cand > 0

    def compute(rows: np.ndarray) -> dict:
        scores = np.concatenate([score(req.select(rows[c]), cand[rows[c]]) for c in _chunks(len(rows), batch_size)])
        return list_metrics(scores, labels[rows], valid[rows], ks)

    return _by_task(scorer, req, compute)


def evaluate_scorer(scorer, req: Requests, cand: np.ndarray, cfg: EvaluateConfig) -> dict:
    """{"catalog": per-task retrieval metrics, "ranking": per-task list metrics[, "ranking_retrieval"]}."""
    out = {"catalog": evaluate_catalog(scorer, req, cfg.ks, cfg.batch_size, tuple(cfg.exclude_consumed)),
           "ranking": evaluate_lists(scorer.candidates, scorer, req, cand, cfg.ks, cfg.batch_size)}
    if isinstance(scorer, ModelScorer) and scorer.use_ranking_head:
        out["ranking_retrieval"] = evaluate_lists(retrieval_order(scorer), scorer, req, cand, cfg.ks, cfg.batch_size)
    return out


def retrieval_order(scorer: ModelScorer):
    """``(requests, cand) -> [n, C]``: the model's retrieval scores of the candidates, the order the lists
    have without the ranking head (what the head is measured against)."""
    return scorer.retrieval_candidates


def validation_requests(req: Requests, max_rows: int, seed: int) -> Requests:
    """At most ``max_rows`` of the validation requests, a seeded sample (``train.valid_max_rows``)."""
    if len(req) <= max_rows:
        return req
    return req.select(np.sort(np.random.default_rng(seed).choice(len(req), max_rows, replace=False)))


# ---- a model trained on smaller vocabularies ----------------------------------------------------


def model_vocab(model: SynerGen) -> tuple[int, int | None]:
    """(item rows, query rows) of a model's tables; None queries: any index (text read from the batch)."""
    emb = model.embed
    if emb.query_id_emb is not None:
        return model.n_items, emb.query_id_emb.num_embeddings
    if emb.query_table is not None:  # a model built from content tables (serving)
        return model.n_items, int(emb.query_table.shape[0])
    return model.n_items, None if emb.query_text is None else int(emb.query_text.shape[0])


def fit_history(history: dict[str, np.ndarray], n_items: int, n_queries: int | None) -> dict[str, np.ndarray]:
    """Token arrays with item / query indices a model's tables lack mapped to 0 (padding: "unknown").

    Vocabulary indices are stable across days and new keys are appended, so a model trained on an older
    day knows exactly the indices below its table sizes; the token keeps its type, action and time.
    """
    out = dict(history)
    out["item_idx"] = np.where(history["item_idx"] < n_items, history["item_idx"], 0)
    if n_queries is not None:
        out["query_idx"] = np.where(history["query_idx"] < n_queries, history["query_idx"], 0)
    return out


class OlderVocabScorer(ModelScorer):
    """A model scored on requests of a later day, whose vocabularies have ``n_items`` items (>= the
    model's): unknown items and queries in histories become padding indices, items the model cannot
    score rank below every item it knows (in the catalog and in candidate lists), and a target it does
    not know is a miss (ranked last). With ``n_items`` = the model's own size it equals ``ModelScorer``."""

    def __init__(self, model: SynerGen, n_items: int, name: str = "synergen", device=None,
                 use_ranking_head: bool = True):
        super().__init__(model, name, device, use_ranking_head)
        self.known_items, self.known_queries = model_vocab(model)
        self.n_items = max(n_items, self.known_items)

    def _batch(self, req: Requests) -> dict[str, Tensor]:
        history = fit_history(req.history, self.known_items, self.known_queries)
        return to_batch(history, np.arange(len(req)), req.lengths, self.device)

    def catalog(self, req: Requests) -> Tensor:
        scores = super().catalog(req)
        extra = self.n_items - scores.shape[1]
        if extra > 0:
            scores = torch.cat([scores, torch.full((len(req), extra), float("-inf"), device=scores.device)], 1)
        miss = torch.from_numpy(np.nonzero(req.target >= self.known_items)[0]).to(scores.device)
        if len(miss):
            scores[miss] = 0.0
            scores[miss, torch.from_numpy(req.target).to(scores.device)[miss]] = float("-inf")
        return scores

    def retrieval_candidates(self, req: Requests, cand: np.ndarray) -> np.ndarray:
        scores = self.catalog(req).gather(1, torch.from_numpy(cand).to(self.device))  # catalog's rules for unknown targets
        return scores.cpu().numpy()

    def candidates(self, req: Requests, cand: np.ndarray) -> np.ndarray:
        known = cand < self.known_items
        scores = super().candidates(req, np.where(known, cand, 0)).astype(np.float64)
        low = np.finfo(np.float32).min  # finite: ties among unknown items stay ties in the list metrics
        scores = np.where(known, scores, low)
        miss = ~known[:, 0]  # the target is the first candidate
        scores[miss] = 0.0
        scores[miss, 0] = low
        return scores
