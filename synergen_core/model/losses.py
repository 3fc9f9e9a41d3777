"""Training losses: InfoNCE for retrieval, hybrid pointwise + pairwise for ranking, per-level
cross-entropy for semantic IDs. Plain functions over tensors so each can be checked by hand.

Each is a mean over its targets. For data-parallel training over one batch split among processes, each
takes the whole batch's target counts (and InfoNCE the whole batch's positives): a process's loss is then
the sum over its part's targets divided by the whole's count, and the parts' losses (and gradients) add up
to the whole batch's mean (``Whole``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Whole(NamedTuple):
    """One retrieval task's targets in the whole batch, when a process computes the loss of a part of it.

    A NamedTuple so that DistributedDataParallel moves ``positives`` to the device with the inputs."""

    count: int  # target positions of the task in the whole batch
    positives: torch.Tensor  # [count] their items, in batch order: InfoNCE's in-batch candidates
    first: int = 0  # where the part's own targets start in ``positives``


def info_nce(
    query: Tensor,
    pos: Tensor,
    pos_ids: Tensor,
    neg: Tensor | None = None,
    neg_ids: Tensor | None = None,
    *,
    temperature: float | Tensor,
    pos_log_q: Tensor | None = None,
    neg_log_q: Tensor | None = None,
    first: int = 0,
    count: int | None = None,
) -> Tensor:
    """Softmax cross-entropy of each query's positive against in-batch positives and sampled negatives.

    query: [N, d]; pos: [K, d], pos_ids: [K] item ids (K = N); neg: [M, d], neg_ids: [M] (optional).
    Candidates of row i are every row's positive (column i is its own) then the M negatives.

    * Part of a batch (data-parallel): ``pos`` / ``pos_ids`` are the whole batch's K positives, the query
      rows are those from ``first`` on (row i's own column is ``first + i``), and the loss is the rows'
      summed cross-entropy over ``count``, the whole batch's K; by default their mean.

    * Log-Q correction: ``pos_log_q`` [N] / ``neg_log_q`` [M] are the log probabilities with which each
      candidate column was sampled (e.g. popularity); they are subtracted from its logits so popular
      items are not over-penalised as negatives. Give one for every candidate group present, or none.
    * Accidental hits: a column whose id equals row i's positive id, other than column i itself (a
      duplicate positive in the batch or a sampled negative that is the positive), is masked out.
    """
    cands, ids = pos, pos_ids  # [K, d], [K]
    log_q = pos_log_q
    if neg is not None:
        if neg_ids is None:
            raise ValueError("neg_ids are needed with neg to mask accidental hits")
        if (pos_log_q is None) != (neg_log_q is None):
            raise ValueError("log-Q correction needs pos_log_q and neg_log_q together (or neither)")
        cands, ids = torch.cat([pos, neg]), torch.cat([pos_ids, neg_ids])
        log_q = None if pos_log_q is None else torch.cat([pos_log_q, neg_log_q])
    elif neg_log_q is not None:
        raise ValueError("neg_log_q given without neg")
    logits = query @ cands.T / temperature  # [N, K + M]
    if log_q is not None:
        logits = logits - log_q[None, :]
    n = query.shape[0]
    rows = torch.arange(n, device=query.device)
    own = rows + first  # [N] each row's own column
    hit = ids[None, :] == pos_ids[own][:, None]  # [N, K + M]
    hit[rows, own] = False
    logits = logits.masked_fill(hit, float("-inf"))
    return F.cross_entropy(logits, own, reduction="sum") / (n if count is None else count)


def _pairs(labels: Tensor, valid: Tensor) -> Tensor:
    """-> [B, i, j] bool: candidate j is valid and labelled lower than valid candidate i of the same request."""
    return valid[:, :, None] & valid[:, None, :] & (labels[:, :, None] > labels[:, None, :])


def ranking_counts(labels: Tensor, valid: Tensor) -> tuple[int, int]:
    """``hybrid_ranking_loss``'s denominators: (valid candidates, candidates with a lower-labelled one)."""
    return int(valid.sum()), int(_pairs(labels, valid).any(-1).sum())


def hybrid_ranking_loss(
    scores: Tensor, labels: Tensor, valid: Tensor, w_point: float = 1.0, w_pair: float = 1.0,
    counts: tuple[int, int] | None = None,
) -> Tensor:
    """w_point * BCE + w_pair * pairwise, over each request's candidates.

    scores: [B, C] logits; labels: [B, C] in [0, 1] (graded labels allowed); valid: [B, C] bool.
    Pairwise: for every candidate i with a lower-labelled candidate j in the same request,
    mean_j softplus(s_j - s_i); then averaged over such i across the batch. Requests without such a
    pair contribute only to the pointwise part. ``counts``: the whole batch's ``ranking_counts`` when
    these requests are a part of it (data-parallel); the two parts are then sums over them.
    """
    if not valid.any():
        return scores.sum() * 0.0
    n_point, n_pair = ranking_counts(labels, valid) if counts is None else counts
    labels = labels.to(scores.dtype)
    point = F.binary_cross_entropy_with_logits(scores[valid], labels[valid], reduction="sum") / n_point
    pairs = _pairs(labels, valid)  # [B, i, j]
    margin = F.softplus(scores[:, None, :] - scores[:, :, None])  # [B, i, j] = softplus(s_j - s_i)
    n_neg = pairs.sum(-1)  # [B, i]
    per_pos = (margin * pairs).sum(-1) / n_neg.clamp(min=1)
    has = n_neg > 0
    pair = per_pos[has].sum() / n_pair if has.any() else scores.sum() * 0.0
    return w_point * point + w_pair * pair


def semantic_id_loss(logits: Tensor, codes: Tensor) -> Tensor:
    """logits: [N, levels, K]; codes: [N, levels] -> [levels] mean cross-entropy of each level."""
    N, levels, K = logits.shape
    ce = F.cross_entropy(logits.reshape(N * levels, K), codes.reshape(N * levels), reduction="none")
    return ce.view(N, levels).mean(0)
