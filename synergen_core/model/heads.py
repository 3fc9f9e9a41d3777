"""Output heads: what the hidden states are turned into.

* ``RetrievalHead``: a prediction position's hidden state and an item's content vector (the same item
  parts the input tokens use, see ``embeddings.py``) each go through their own Linear and are
  L2-normalised; retrieval is their dot product, so the whole catalog can be embedded once and searched
  exhaustively or with a vector index. With ``task_towers`` search positions get a query Linear of
  their own (one item side, one index, for both tasks).
* ``RankingHead``: a score per appended candidate from its hidden state, which has seen the history
  (and the query, for search) and the candidate itself. With ``retrieval_prior`` it is a stage on top of
  the encoder: plus a learned multiple of the candidate's retrieval logit for the same request, so it
  refines the retrieval order rather than relearning it from the few requests ranking is trained on.
* ``SemanticIdHead`` (GenSAR): logits for level l of the next item's semantic ID given the hidden state
  and embeddings of the codes chosen at levels < l, for teacher-forced training and code-by-code decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RetrievalHead(nn.Module):
    def __init__(self, d: int, task_towers: bool = False):
        super().__init__()
        self.query_proj = nn.Linear(d, d)  # recommendation positions (all positions without towers)
        self.search_query_proj = nn.Linear(d, d) if task_towers else None
        self.item_proj = nn.Linear(d, d)

    def query(self, hidden: Tensor, search: Tensor | None = None) -> Tensor:
        """[..., d] hidden states at prediction positions -> [..., d] unit vectors.

        search: [...] bool, True at search positions (their own Linear with task towers; else ignored).
        """
        q = self.query_proj(hidden)
        # Skipped when no position is a search: the search tower then gets no gradient at all (None, so
        # AdamW leaves it be) rather than a zero one that its momentum would still step on.
        if self.search_query_proj is not None and search is not None and bool(search.any()):
            q = torch.where(search[..., None], self.search_query_proj(hidden), q)
        return F.normalize(q, dim=-1)

    def item(self, content: Tensor) -> Tensor:
        """[..., d] item content vectors -> [..., d] unit vectors."""
        return F.normalize(self.item_proj(content), dim=-1)


class RankingHead(nn.Module):
    def __init__(self, d: int, retrieval_prior: bool = False):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, 1)
        self.prior_scale = nn.Parameter(torch.ones(())) if retrieval_prior else None

    def forward(self, cand_hidden: Tensor, retrieval_logits: Tensor | None = None) -> Tensor:
        """[B, C, d] candidate hidden states -> [B, C] logits (probability of engagement after sigmoid).

        retrieval_logits: [B, C] the candidates' retrieval logits (needed with ``retrieval_prior``). With
        the prior both inputs enter without gradient: the ranking loss then trains this head only, and
        the encoder and the retrieval space stay as the retrieval loss shapes them.
        """
        if self.prior_scale is None:
            return self._own(cand_hidden)
        if retrieval_logits is None:
            raise ValueError("RankingHead with retrieval_prior needs the candidates' retrieval logits")
        return self._own(cand_hidden.detach()) + self.prior_scale * retrieval_logits.detach()

    def _own(self, cand_hidden: Tensor) -> Tensor:
        return self.out(F.gelu(self.fc(cand_hidden))).squeeze(-1)


class SemanticIdHead(nn.Module):
    def __init__(self, d: int, levels: int, codebook_size: int):
        super().__init__()
        self.levels, self.codebook_size = levels, codebook_size
        self.level_emb = nn.Embedding(levels, d)  # tells the shared trunk which level it predicts
        self.prefix_emb = nn.ModuleList(nn.Embedding(codebook_size, d) for _ in range(levels - 1))
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.ModuleList(nn.Linear(d, codebook_size) for _ in range(levels))

    def _logits(self, state: Tensor, level: int) -> Tensor:
        """state: [..., d] -> [..., K]."""
        return self.out[level](self.norm(F.gelu(self.fc(state))))

    def level_logits(self, hidden: Tensor, prefix: Tensor) -> Tensor:
        """hidden: [..., d]; prefix: [..., l] codes of levels < l -> [..., K] logits for level l."""
        level = prefix.shape[-1]
        state = hidden + self.level_emb.weight[level]
        for k in range(level):
            state = state + self.prefix_emb[k](prefix[..., k])
        return self._logits(state, level)

    def forward(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Teacher forcing. hidden: [N, d]; codes: [N, levels] true codes -> [N, levels, K] logits."""
        out, state = [], hidden
        for level in range(self.levels):
            out.append(self._logits(state + self.level_emb.weight[level], level))
            if level < self.levels - 1:
                state = state + self.prefix_emb[level](codes[:, level])
        return torch.stack(out, dim=1)
