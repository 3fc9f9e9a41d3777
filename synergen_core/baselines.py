"""Baselines and ablations, all scored by the same evaluation code on the same splits.

Trained variants (``VARIANTS``) are the SynerGen code with switches, not separate models, so a gap
between two rows of a results table can only come from what the switch turns off:

* ``sasrec``: the ID-only SASRec-style model with full cross-entropy: ID embeddings only (no text, no
  semantic IDs, no action/surface), ordinary position RoPE, causal self-attention, next-item softmax
  over the whole catalog, no ranking or semantic-ID loss. It keeps SynerGen's pre-norm blocks and
  cosine/temperature logits instead of SASRec's post-norm and raw dot products; that is the one
  departure from SASRec, and the price of sharing every other line of code with the model it is
  compared with.
* ``rec_only`` / ``search_only``: the full model trained on one task's positions only.
* ``no_time_rope``, ``no_text``, ``no_semantic_ids``: ablations of one input each.

Untrained baselines score requests directly: ``Popularity`` (training counts; both tasks) and ``BM25``
(Okapi BM25 over the catalog text with the ``bm25s`` package; search only, it has no user model).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from synergen_core.config import Config
from synergen_core.data import Requests
from synergen_core.model import RECOMMEND, SEARCH

VARIANTS: dict[str, dict[str, dict]] = {
    "synergen": {},
    "sasrec": {
        "model": {"use_text_emb": False, "use_semantic_ids": False, "semantic_head": False,
                  "use_action_surface": False, "rope": "position", "w_ranking": 0.0},
        "train": {"negatives": "full", "rank_impression_negatives": 0, "rank_pop_negatives": 0,
                  "rank_hard_negatives": 0},
    },
    # A single-task model has no task balance to tune: its task keeps weight 1 whatever the joint
    # model's weights are (e.g. a small w_search where search events are rare).
    "rec_only": {"train": {"w_search": 0.0, "w_rec": 1.0}},
    "search_only": {"train": {"w_search": 1.0, "w_rec": 0.0}},
    "no_time_rope": {"model": {"rope": "position"}},
    "no_text": {"model": {"use_text_emb": False}},
    "no_semantic_ids": {"model": {"use_semantic_ids": False, "semantic_head": False}},
}


def variant_config(cfg: Config, name: str) -> Config:
    """A copy of ``cfg`` with the switches of variant ``name``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: expected one of {sorted(VARIANTS)}")
    out = cfg.model_copy(deep=True)
    for section, values in VARIANTS[name].items():
        setattr(out, section, getattr(out, section).model_copy(update=values))
    return out


class Popularity:
    """Score = the item's count in the training split (the same for every request)."""

    name, tasks = "popularity", (SEARCH, RECOMMEND)

    def __init__(self, counts: np.ndarray):
        s = torch.from_numpy(counts.astype(np.float32))
        s[0] = float("-inf")
        self.scores = s  # [n_items]

    def catalog(self, req: Requests) -> Tensor:
        return self.scores.expand(len(req), -1)  # [N, n_items]

    def candidates(self, req: Requests, cand: np.ndarray) -> np.ndarray:
        return self.scores.numpy()[cand]  # [N, C]


class BM25:
    """Okapi BM25 of the request's query against every item's catalog text (search requests only)."""

    name, tasks = "bm25", (SEARCH,)

    def __init__(self, item_texts: list[str], query_texts: list[str]):
        """item_texts: [n_items] (row 0 padding), query_texts: [n_queries] at vocabulary indices."""
        import bm25s

        self.n_items = len(item_texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(list(item_texts[1:]), stopwords="en", show_progress=False),
                             show_progress=False)
        tok = bm25s.tokenize(list(query_texts), stopwords="en", show_progress=False, return_ids=False)
        self.query_tokens = tok  # list of token lists, by query index

    def _scores(self, query_idx: np.ndarray) -> np.ndarray:
        out = np.full((len(query_idx), self.n_items), -np.inf, np.float32)
        for r, q in enumerate(query_idx):  # one sparse lookup per request; bm25s has no batched scorer
            out[r, 1:] = self.retriever.get_scores(self.query_tokens[q])
        return out

    def catalog(self, req: Requests) -> Tensor:
        return torch.from_numpy(self._scores(req.query_idx))

    def candidates(self, req: Requests, cand: np.ndarray) -> np.ndarray:
        return np.take_along_axis(self._scores(req.query_idx), cand, 1)
