"""Ranking metrics, defined so that ties are never resolved in a model's favour.

Full-catalog retrieval (one relevant item per request): the target's rank is summarised as
``greater`` (items scored strictly higher) and ``ties`` (other items scored exactly the same). With ties
broken uniformly at random the target's 0-based rank is uniform on [greater, greater + ties], and
Recall@K / NDCG@K are their EXPECTED values under that tie-break, computed exactly. So a constant
scorer (everything tied) gets the recall of a random ranking, not a perfect one, and popularity with
many zero-count items is not flattered or punished by the tie order.

Candidate lists (ranking head): AUC counts a tied positive/negative pair as one half; NDCG@K gives each
member of a tied group the mean discount of the ranks the group spans (expected DCG under a random
tie-break), with ideal DCG from the labels sorted.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor


def rank_stats(scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """scores: [N, M] (-inf = never ranked); target: [N] column of each row's relevant item ->
    (greater [N], ties [N]) as long tensors."""
    t = scores.gather(1, target[:, None])  # [N, 1]
    greater = (scores > t).sum(1)
    ties = (scores == t).sum(1) - 1
    return greater, ties


def _discount_cumsum(k: int) -> np.ndarray:
    """D[j] = sum_{r < j} 1 / log2(r + 2), j = 0..k."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])


def recall_at_k(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """[N] expected Recall@k (= hit rate with one relevant item) under a random tie-break."""
    greater, ties = np.asarray(greater, np.float64), np.asarray(ties, np.float64)
    return np.clip(k - greater, 0, ties + 1) / (ties + 1)


def ndcg_at_k(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """[N] expected NDCG@k with one relevant item (ideal DCG = 1) under a random tie-break."""
    greater, ties = np.asarray(greater, np.int64), np.asarray(ties, np.int64)
    D = _discount_cumsum(k)
    lo, hi = np.minimum(greater, k), np.minimum(greater + ties + 1, k)
    return (D[hi] - D[lo]) / (ties + 1)


def mrr(greater: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """[N] expected reciprocal rank under a random tie-break (mean of 1/(r+1) over the tied ranks)."""
    greater, ties = np.asarray(greater, np.int64), np.asarray(ties, np.int64)
    top = int((greater + ties).max()) + 1 if len(greater) else 1
    H = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1))])  # harmonic numbers H[n]
    return (H[greater + ties + 1] - H[greater]) / (ties + 1)


def catalog_metrics(greater: np.ndarray, ties: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Mean Recall@k and NDCG@k for every k, plus MRR and the request count."""
    out: dict[str, float] = {"n": int(len(greater))}
    if len(greater) == 0:
        return out
    for k in ks:
        out[f"recall@{k}"] = float(recall_at_k(greater, ties, k).mean())
        out[f"ndcg@{k}"] = float(ndcg_at_k(greater, ties, k).mean())
    out["mrr"] = float(mrr(greater, ties).mean())
    return out


def auc(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per list: scores, labels, valid [N, C] -> [N] AUC (NaN for a list without both classes).

    Positives are labels > 0. A tied positive/negative pair counts one half.
    """
    scores, labels, valid = np.asarray(scores, np.float64), np.asarray(labels), np.asarray(valid, bool)
    pos = valid & (labels > 0)
    neg = valid & (labels <= 0)
    # compared, not subtracted: -inf - -inf is NaN (a RuntimeWarning on padding), yet two -inf
    # scores are a tie
    s_i, s_j = scores[:, :, None], scores[:, None, :]  # [N, i, j]
    pair = pos[:, :, None] & neg[:, None, :]
    wins = ((s_i > s_j) + 0.5 * (s_i == s_j)) * pair
    n_pairs = pair.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pairs > 0, wins.sum((1, 2)) / n_pairs, np.nan)


def list_ndcg(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Per list: [N, C] -> [N] expected NDCG@k under a random tie-break (NaN where no label > 0)."""
    scores, labels, valid = np.asarray(scores, np.float64), np.asarray(labels, np.float64), np.asarray(valid, bool)
    N, Cn = scores.shape
    s = np.where(valid, scores, -np.inf)
    g = np.where(valid, labels, 0.0)
    # rank span of each candidate's tie group: [#strictly greater, #greater-or-equal)
    above = (s[:, None, :] > s[:, :, None]).sum(2)  # [N, C]
    upto = (s[:, None, :] >= s[:, :, None]).sum(2)
    D = _discount_cumsum(max(Cn, k) + 1)
    lo, hi = np.minimum(above, k), np.minimum(upto, k)
    disc = (D[hi] - D[lo]) / np.maximum(upto - above, 1)
    dcg = (g * disc * valid).sum(1)
    ideal_g = -np.sort(-g, axis=1)[:, :k]
    idcg = (ideal_g / np.log2(np.arange(ideal_g.shape[1]) + 2.0)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan)


def list_metrics(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Mean AUC and NDCG@k over candidate lists (lists without a positive left out)."""
    a = auc(scores, labels, valid)
    out: dict[str, float] = {"lists": int(np.isfinite(a).sum())}
    if out["lists"] == 0:
        return out
    out["auc"] = float(np.nanmean(a))
    for k in ks:
        out[f"ndcg@{k}"] = float(np.nanmean(list_ndcg(scores, labels, valid, k)))
    return out
