"""Token embeddings: the input preprocessor that turns a behaviour sequence into vectors.

An item's *content* vector sums, each part switchable off by config:

* a collaborative ID embedding (``use_id_emb``),
* its frozen text-encoder embedding (a fixed [n_items, d_text] buffer) through a trained Linear
  (``use_text_emb``),
* one embedding per semantic-ID level, looked up by the item's RQ-VAE code at that level
  (``use_semantic_ids``), for each view given: GenSAR gives an item a recommendation-view ID
  (``item_codes``) and a search-view ID (``search_codes``, optional) that share their first levels.

The same content vector is used for item tokens in the history, for ranking candidates and, through the
retrieval head, for the catalog side of retrieval, so what the model reads and what it retrieves are the
same representation. A history token adds a token-type embedding and, if ``use_action_surface``, the
embeddings of its action and surface. A query token is its frozen text embedding through the same
Linear as item text (one text space for queries and items; new queries can come per batch as
``query_text``); with text off (the ID-only ablation) a learned query-ID embedding stands in.

Index 0 is padding in every table (items, queries, actions, surfaces): vocabulary sizes count it, so
real items are 1 .. n_items - 1 and buffers have n_items rows whose row 0 is ignored.

Serving needs the content vectors only, not how they were made: ``content_tables`` computes them once
for the whole catalog ([n_items, d] and [n_queries, d]), and a ``TokenEmbedding`` built from them
(``item_table`` / ``query_table``) reads rows of those tables instead of summing ID, text and code
embeddings. At d = 64 and 384-d text that is a sixth of the text buffer alone, and the tables can be
memory-mapped (see ``synergen_core.serving``). Such an embedding cannot be trained.
"""
from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor, nn

from synergen_core.config import ModelConfig


class TokenType(IntEnum):
    PAD = 0
    ITEM = 1
    QUERY = 2
    CANDIDATE = 3  # set by the model for appended ranking candidates, never in a batch's token_type


class TokenEmbedding(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        n_items: int,
        n_queries: int,
        n_actions: int,
        n_surfaces: int,
        item_text: Tensor | None = None,  # [n_items, d_text]
        query_text: Tensor | None = None,  # [n_queries, d_text]
        item_codes: Tensor | None = None,  # [n_items, levels] long in [0, codebook_size): rec-view IDs
        search_codes: Tensor | None = None,  # [n_items, levels'] search-view IDs (optional)
        codebook_size: int | None = None,
        item_table: Tensor | None = None,  # [n_items, d] precomputed item_content (serving: see content_tables)
        query_table: Tensor | None = None,  # [n_queries, d] precomputed query_content
        text_dim: int | None = None,  # d_text of a text model built from tables (new query texts are projected)
    ):
        super().__init__()
        d = cfg.d_model
        self.cfg, self.n_items = cfg, n_items
        if not (cfg.use_id_emb or cfg.use_text_emb or cfg.use_semantic_ids):
            raise ValueError("model: at least one of use_id_emb, use_text_emb, use_semantic_ids must be on")
        self.from_tables = item_table is not None
        tables = {"item_table": (item_table, n_items), "query_table": (query_table, n_queries)}
        for name, (t, rows) in tables.items():
            if t is not None and (t.ndim != 2 or t.shape != (rows, d)):
                raise ValueError(f"{name} must be [{rows}, {d}], got {tuple(t.shape)}")
            # registered as given (no copy): a memory-mapped table stays mapped
            self.register_buffer(name, t if t is None or t.dtype == torch.float32 else t.float())
        self.id_emb = nn.Embedding(n_items, d, padding_idx=0) if cfg.use_id_emb and not self.from_tables else None
        self.text_proj = None
        if self.from_tables:
            self.register_buffer("item_text", None)
            self.register_buffer("query_text", None)
            if cfg.use_text_emb:
                if text_dim is None:
                    raise ValueError("a text model built from content tables needs text_dim")
                self.text_proj = nn.Linear(text_dim, d)
        elif cfg.use_text_emb:
            if item_text is None:
                raise ValueError("model.use_text_emb is on but no item text embeddings were given")
            _check_rows("item_text", item_text, n_items)
            if query_text is not None:
                _check_rows("query_text", query_text, n_queries)
                if query_text.shape[1] != item_text.shape[1]:
                    raise ValueError("item_text and query_text must come from the same encoder (same width)")
            self.register_buffer("item_text", item_text.float())
            self.register_buffer("query_text", None if query_text is None else query_text.float())
            self.text_proj = nn.Linear(item_text.shape[1], d)
        self.query_id_emb = None if cfg.use_text_emb or self.from_tables else nn.Embedding(n_queries, d, padding_idx=0)
        # Codes are kept even with the input part off: the semantic-ID heads and decoding read them here.
        if search_codes is not None and item_codes is None:
            raise ValueError("search_codes need item_codes (the recommendation view) too")
        views = {"rec": item_codes, "search": search_codes}
        self.views = [v for v, c in views.items() if c is not None]
        for view, codes in views.items():
            if codes is not None:
                if codebook_size is None:
                    raise ValueError("semantic IDs given without codebook_size")
                _check_codes(f"{view} codes", codes, n_items, codebook_size)
            self.register_buffer(f"codes_{view}", None if codes is None else codes.long())
        self.codebook_size = codebook_size
        self.code_emb = None
        if cfg.use_semantic_ids and not self.from_tables:
            if not self.views:
                raise ValueError("model.use_semantic_ids is on but no item_codes / codebook_size were given")
            self.code_emb = nn.ModuleDict({v: self._code_tables(self.codes(v).shape[1], d) for v in self.views})
        self.type_emb = nn.Embedding(len(TokenType), d)
        self.action_emb = nn.Embedding(n_actions, d, padding_idx=0) if cfg.use_action_surface else None
        self.surface_emb = nn.Embedding(n_surfaces, d, padding_idx=0) if cfg.use_action_surface else None

    def item_content(self, item_idx: Tensor) -> Tensor:
        """item_idx: [...] long -> [..., d]: the item parts only (no type, action or surface)."""
        if self.from_tables:
            return self.item_table[item_idx]
        parts = []
        if self.id_emb is not None:
            parts.append(self.id_emb(item_idx))
        if self.text_proj is not None:
            parts.append(self.text_proj(self.item_text[item_idx]))
        if self.code_emb is not None:
            for view, tables in self.code_emb.items():
                codes = self.codes(view)[item_idx]  # [..., levels]
                parts.extend(emb(codes[..., lvl]) for lvl, emb in enumerate(tables))
        return torch.stack(parts).sum(0)

    def _code_tables(self, levels: int, d: int) -> nn.ModuleList:
        return nn.ModuleList(nn.Embedding(self.codebook_size, d) for _ in range(levels))

    def codes(self, view: str = "rec") -> Tensor:
        """-> [n_items, levels] semantic IDs of a view ("rec" or "search")."""
        codes = getattr(self, f"codes_{view}", None)
        if codes is None:
            raise ValueError(f"the model was built without {view}-view semantic IDs")
        return codes

    def query_content(self, query_idx: Tensor, query_text: Tensor | None = None) -> Tensor:
        """query_idx: [...] long; query_text: [..., d_text] overriding the buffer -> [..., d]."""
        if self.query_table is not None and query_text is None:
            return self.query_table[query_idx]
        if self.text_proj is None:
            return self.query_id_emb(query_idx)
        if query_text is None:
            if self.query_text is None:
                raise ValueError("no query text embeddings: give query_text to the model or in the batch")
            query_text = self.query_text[query_idx]
        return self.text_proj(query_text.float())

    @torch.no_grad()
    def content_tables(self, chunk: int = 65536) -> tuple[Tensor, Tensor | None]:
        """-> (item_content of every item [n_items, d], query_content of every query the model holds
        [n_queries, d], or None for a text model without a query buffer). Chunked: the text buffer is
        the only catalog-sized input, nothing [n_items, d_text]-sized is made."""
        items = torch.cat([self.item_content(torch.arange(i, min(i + chunk, self.n_items), device=self.type_emb.weight.device))
                           for i in range(0, self.n_items, chunk)])
        if self.query_id_emb is not None:
            return items, self.query_id_emb.weight.detach().clone()
        if self.query_text is None:
            return items, self.query_table
        n = self.query_text.shape[0]
        queries = torch.cat([self.query_content(torch.arange(i, min(i + chunk, n), device=items.device))
                             for i in range(0, n, chunk)])
        return items, queries

    def forward(
        self,
        item_idx: Tensor,
        query_idx: Tensor,
        token_type: Tensor,
        action: Tensor,
        surface: Tensor,
        query_text: Tensor | None = None,
    ) -> Tensor:
        """History tokens, all [B, L] (query_text [B, L, d_text] optional) -> [B, L, d]; zeros at padding."""
        is_item = (token_type == TokenType.ITEM)[..., None]
        is_query = (token_type == TokenType.QUERY)[..., None]
        x = self.item_content(item_idx) * is_item + self.query_content(query_idx, query_text) * is_query
        x = x + self.type_emb(token_type)
        if self.action_emb is not None:
            x = x + self.action_emb(action) + self.surface_emb(surface)
        return x * (token_type != TokenType.PAD)[..., None]

    def candidates(self, cand: Tensor) -> Tensor:
        """cand: [B, C] item indices (0 = padding) -> [B, C, d]; zeros at padding."""
        x = self.item_content(cand) + self.type_emb.weight[TokenType.CANDIDATE]
        return x * (cand > 0)[..., None]


def _check_rows(name: str, t: Tensor, n: int) -> None:
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(f"{name} must be [{n}, d_text] (row 0 = padding), got {tuple(t.shape)}")


def _check_codes(name: str, codes: Tensor, n_items: int, codebook_size: int) -> None:
    if codes.ndim != 2 or codes.shape[0] != n_items:
        raise ValueError(f"{name} must be [{n_items}, levels] (row 0 = padding), got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"{name} must lie in [0, {codebook_size})")
