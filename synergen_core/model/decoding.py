"""Generating items code by code (GenSAR): a prefix trie of valid semantic IDs and beam search
constrained by it, so every generated ID names a real item.

The trie is kept as tensors rather than nodes: a prefix (c_0 .. c_{l-1}) is the integer key
sum_k c_k * K^(l-1-k), and level l stores the sorted keys of every valid prefix of length l + 1.
The allowed next codes of a batch of prefixes are then one ``searchsorted`` over [N, K] candidate keys,
with memory linear in the number of items (not n_prefixes x K).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SemanticIdTrie(nn.Module):
    """Valid semantic IDs of a catalog. codes: [n_items, levels] long, row 0 (padding) excluded.

    ``item_mask`` [n_items] bool restricts the trie to some items (e.g. those still on sale). Items that
    share an ID (RQ-VAE collisions) map back to the lowest item index; ``n_collisions`` counts them.
    """

    def __init__(self, codes: Tensor, codebook_size: int, item_mask: Tensor | None = None):
        super().__init__()
        n_items, levels = codes.shape
        if codebook_size ** levels >= 2**63:
            raise ValueError(f"{levels} levels of {codebook_size} codes overflow int64 prefix keys")
        self.levels, self.codebook_size = levels, codebook_size
        keep = torch.ones(n_items, dtype=torch.bool, device=codes.device) if item_mask is None else item_mask.clone()
        keep[0] = False
        items = keep.nonzero().squeeze(1)  # [n] ascending
        codes = codes[items].long()
        for level in range(levels):
            self.register_buffer(f"keys_{level}", self._keys(codes[:, : level + 1]).unique(), persistent=False)
        full = self._keys(codes)
        # Stable sort keeps ascending item order within equal keys, so the first of each run is the lowest.
        full_sorted, order = full.sort(stable=True)
        first = torch.ones_like(full_sorted, dtype=torch.bool)
        first[1:] = full_sorted[1:] != full_sorted[:-1]
        self.register_buffer("full_keys", full_sorted[first], persistent=False)
        self.register_buffer("full_items", items[order][first], persistent=False)
        self.n_collisions = int((~first).sum())

    def __len__(self) -> int:
        return self.full_keys.numel()

    def _keys(self, prefix: Tensor) -> Tensor:
        """prefix: [..., l] -> [...] int64 key."""
        key = torch.zeros(prefix.shape[:-1], dtype=torch.long, device=prefix.device)
        for k in range(prefix.shape[-1]):
            key = key * self.codebook_size + prefix[..., k].long()
        return key

    @staticmethod
    def _find(sorted_keys: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """-> (found [...] bool, position in sorted_keys [...])."""
        if sorted_keys.numel() == 0:
            return torch.zeros_like(keys, dtype=torch.bool), torch.zeros_like(keys)
        pos = torch.searchsorted(sorted_keys, keys.contiguous()).clamp(max=sorted_keys.numel() - 1)
        return sorted_keys[pos] == keys, pos

    def allowed(self, prefix: Tensor) -> Tensor:
        """prefix: [..., l] with l < levels -> [..., K] bool: which codes may follow it."""
        level = prefix.shape[-1]
        codes = torch.arange(self.codebook_size, device=prefix.device)
        nxt = self._keys(prefix)[..., None] * self.codebook_size + codes  # [..., K] keys of prefix + code
        return self._find(getattr(self, f"keys_{level}"), nxt)[0]

    def contains(self, ids: Tensor) -> Tensor:
        """ids: [..., levels] -> [...] bool."""
        return self._find(self.full_keys, self._keys(ids))[0]

    def items(self, ids: Tensor) -> Tensor:
        """ids: [..., levels] -> [...] item index, 0 where the ID is not valid."""
        found, pos = self._find(self.full_keys, self._keys(ids))
        return torch.where(found, self.full_items[pos], torch.zeros_like(pos))


@dataclass
class BeamResult:
    codes: Tensor  # [B, beam, levels] long; -1 where fewer than `beam` valid IDs exist
    scores: Tensor  # [B, beam] sum of per-level log-probabilities, best first; -inf for missing ones
    items: Tensor  # [B, beam] item index; 0 for missing ones


def constrained_beam_search(
    step_logits: Callable[[Tensor], Tensor], trie: SemanticIdTrie, batch_size: int, beam: int
) -> BeamResult:
    """Top-``beam`` semantic IDs per request under ``step_logits``, only ever through valid prefixes.

    step_logits(prefix [B, W, l]) -> [B, W, K] logits for level l given each beam's prefix.
    An ID's score is sum_l log_softmax(logits_l)[c_l], normalised over all K codes (not renormalised
    over the allowed ones), so scores are the model's probabilities of the IDs.
    Exact when ``beam`` is at least the number of valid prefixes at every level; otherwise the usual
    beam approximation, still returning only valid IDs.
    """
    device = trie.full_keys.device
    K = trie.codebook_size
    prefix = torch.zeros(batch_size, 1, 0, dtype=torch.long, device=device)  # [B, W=1, 0]
    score = torch.zeros(batch_size, 1, device=device)  # [B, W]
    for level in range(trie.levels):
        logp = F.log_softmax(step_logits(prefix).float(), dim=-1)  # [B, W, K]
        logp = logp.masked_fill(~trie.allowed(prefix), float("-inf"))
        total = (score[..., None] + logp).flatten(1)  # [B, W*K]
        score, flat = total.topk(min(beam, total.shape[1]), dim=1)  # [B, W']
        src, code = flat // K, flat % K
        prefix = torch.cat([prefix.gather(1, src[..., None].expand(-1, -1, level)), code[..., None]], dim=-1)
    ok = torch.isfinite(score)  # -inf: ran out of valid IDs, the slot holds an arbitrary code path
    codes = prefix.masked_fill(~ok[..., None], -1)
    items = torch.where(ok, trie.items(prefix), torch.zeros_like(flat))
    if score.shape[1] < beam:  # fewer than `beam` IDs in the whole codebook space
        pad = beam - score.shape[1]
        codes = torch.cat([codes, codes.new_full((batch_size, pad, trie.levels), -1)], dim=1)
        score = torch.cat([score, score.new_full((batch_size, pad), float("-inf"))], dim=1)
        items = torch.cat([items, items.new_zeros(batch_size, pad)], dim=1)
    return BeamResult(codes=codes, scores=score, items=items)
