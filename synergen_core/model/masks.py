"""Every attention mask of the model, built in one place, and the sequence layout they encode.

Layout of one row (T = L + C tokens)::

    [ history: L tokens, chronological, padded ] [ candidates: C tokens, padded ]

* History tokens are queries and engaged items in time order. A query token precedes the item it
  retrieved, so the hidden state *at a query token* is the search prediction (it has seen the query and
  everything before it) and the hidden state *at an item token* is the next-item recommendation
  prediction. Both follow from one rule: history is causal (token i sees history tokens j <= i).
* Ranking candidates are appended after the history. Each sees every valid history token (which, for a
  search request, ends with the request's query token) and itself, never another candidate, so a
  candidate's score cannot depend on which other candidates were shown. History never sees candidates,
  so adding, removing or changing candidates leaves every history output unchanged.
* Padding may sit on the left or the right of the history (or anywhere): masks are built from the
  validity flags, and the causal order is the tensor order of the valid tokens, which must be
  chronological. Rotary angles come from the batch's ``position`` and ``ts``, not from tensor indices,
  so the amount and side of padding changes nothing.
* No token attends to padding. Every token, padding included, attends to itself so that no softmax row
  is empty (scaled_dot_product_attention returns NaN for a row with nothing to attend to); outputs at
  padding are finite and ignored.

Masks are boolean, True = may attend, shaped [B, 1, T, T] to broadcast over heads.
"""
from __future__ import annotations

import torch
from torch import Tensor


def history_mask(valid: Tensor) -> Tensor:
    """valid: [B, L] bool -> [B, L, L]: causal over valid tokens, plus the diagonal."""
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()  # [L, L]
    allowed = causal & valid[:, None, :] & valid[:, :, None]  # [B, L, L]
    return allowed | torch.eye(L, dtype=torch.bool, device=valid.device)


def candidate_mask(valid: Tensor, cand_valid: Tensor) -> tuple[Tensor, Tensor]:
    """valid: [B, L], cand_valid: [B, C] -> (candidates->history [B, C, L], candidates->candidates [B, C, C])."""
    to_history = cand_valid[:, :, None] & valid[:, None, :]  # [B, C, L]
    C = cand_valid.shape[1]
    to_self = torch.eye(C, dtype=torch.bool, device=valid.device).expand(cand_valid.shape[0], C, C)
    return to_history, to_self


def attention_mask(valid: Tensor, cand_valid: Tensor | None = None) -> Tensor:
    """valid: [B, L] bool; cand_valid: [B, C] bool or None -> [B, 1, L + C, L + C] bool (True = attend)."""
    hist = history_mask(valid)  # [B, L, L]
    if cand_valid is None or cand_valid.shape[1] == 0:
        return hist[:, None]
    B, L = valid.shape
    C = cand_valid.shape[1]
    c2h, c2c = candidate_mask(valid, cand_valid)
    h2c = torch.zeros(B, L, C, dtype=torch.bool, device=valid.device)  # history never sees candidates
    top = torch.cat([hist, h2c], dim=2)  # [B, L, L + C]
    bottom = torch.cat([c2h, c2c], dim=2)  # [B, C, L + C]
    return torch.cat([top, bottom], dim=1)[:, None]


def last_valid_index(valid: Tensor) -> Tensor:
    """valid: [B, L] bool -> [B] long: index of the last valid token (0 for an empty row); either padding side."""
    idx = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return idx.masked_fill(~valid, -1).amax(dim=1).clamp(min=0)
