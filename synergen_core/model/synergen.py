"""SynerGen: one decoder-only Transformer for personalized search and recommendation, retrieval and
ranking, with GenSAR-style semantic-ID generation.

Seams: ``embeddings`` (input preprocessor) -> ``backbone`` (encoder, masks from ``masks``, rotary
angles from ``rope``) -> ``heads`` (output postprocessors) -> ``losses``; ``decoding`` generates items
through the semantic-ID head; ``item_vectors()`` is the candidate index's catalog side.

Batch contract: a dict of tensors, history padded to [B, L] (left or right padding; see masks.py).

==================  ============  ===========================================================
key                 shape/dtype   meaning
==================  ============  ===========================================================
token_type          [B, L] long   0 pad, 1 item (an engagement), 2 query (``TokenType``)
item_idx            [B, L] long   item index 1..n_items-1 at item tokens, else 0
query_idx           [B, L] long   query index 1..n_queries-1 at query tokens, else 0
action              [B, L] long   action index, 0 = none/pad (vocabulary owned by the data loader)
surface             [B, L] long   surface index, 0 = none/pad
ts                  [B, L] f64    event time, epoch seconds (float32 resolves epoch seconds to
                                  only ~2 min; seconds from any per-sequence origin also work)
position            [B, L] long   order of the token in the user's sequence (any origin)
query_text          [B, L, Dt]    optional: query text embeddings overriding the model's buffer
                                  (queries unseen at training time)
target              [B, L] long   optional: item to retrieve from each position, 0 = none.
                                  Default ``next_item_targets``: at an item token the next
                                  token's item; at a query token the next token's item only if
                                  it is the same event (same ts), as jobs.tokens lays out a
                                  search event: query token, then the engaged item's token.
candidates          [B, C] long   optional: items to rank after the history, 0 = padding
labels              [B, C] float  with candidates for ranking loss: engagement label in [0, 1]
request_ts          [B] f64       optional: time of the ranking request (default: latest
                                  history ts); candidates sit at position max(position) + 1
==================  ============  ===========================================================

A search request ends its history with the query token; a recommendation request ends with the last
engaged item. The hidden state at the last valid history token is the request's retrieval state
(``last_hidden``); candidates see the whole valid history, so they see the query of a search request.

Semantic IDs (GenSAR) come in views: ``item_codes`` (recommendation view, required for the semantic-ID
path) and optionally ``search_codes`` (search view). Search positions (query tokens) predict and
generate search-view IDs when given, recommendation positions the recommendation-view IDs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from synergen_core.config import ModelConfig
from synergen_core.model.backbone import Backbone
from synergen_core.model.decoding import BeamResult, SemanticIdTrie, constrained_beam_search
from synergen_core.model.embeddings import TokenEmbedding, TokenType
from synergen_core.model.heads import RankingHead, RetrievalHead, SemanticIdHead
from synergen_core.model.losses import Whole, hybrid_ranking_loss, info_nce, semantic_id_loss
from synergen_core.model.masks import attention_mask, last_valid_index
from synergen_core.model.rope import RotaryEmbedding

SEARCH, RECOMMEND = 1, 2  # prediction task of a position (``prediction_task``), 0 = none


def next_item_targets(batch: dict[str, Tensor]) -> Tensor:
    """-> [B, L] long: ``batch["target"]`` if given, else the next valid token's item where it is an
    item token and, at a query token, of the same event (same ts): a query that engaged nothing has no
    search target even if a browse item follows.

    The next valid token is found in tensor order, so this works with left or right padding.
    """
    if "target" in batch:
        return batch["target"]
    tt, items = batch["token_type"], batch["item_idx"]
    B, L = tt.shape
    idx = torch.arange(L, device=tt.device).expand(B, L)
    # For each position, the index of the first valid token strictly after it (L if none).
    later = torch.where(tt != TokenType.PAD, idx, torch.full_like(idx, L))
    nxt = later.flip(1).cummin(1).values.flip(1)  # first valid index >= i
    nxt = torch.cat([nxt[:, 1:], torch.full_like(nxt[:, :1], L)], dim=1)  # strictly after i
    has = nxt < L
    nxt_c = nxt.clamp(max=L - 1)
    is_item = tt.gather(1, nxt_c) == TokenType.ITEM
    same_event = batch["ts"].gather(1, nxt_c) == batch["ts"]
    ok = has & is_item & ((tt == TokenType.ITEM) | ((tt == TokenType.QUERY) & same_event))
    target = items.gather(1, nxt_c)
    return torch.where(ok, target, torch.zeros_like(target))


def prediction_task(batch: dict[str, Tensor]) -> Tensor:
    """-> [B, L] long: SEARCH at query tokens, RECOMMEND at item tokens, 0 at padding."""
    tt = batch["token_type"]
    return torch.where(tt == TokenType.QUERY, SEARCH, torch.where(tt == TokenType.ITEM, RECOMMEND, 0))


class SynerGen(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        n_items: int,
        n_queries: int,
        n_actions: int,
        n_surfaces: int,
        item_text: Tensor | None = None,  # [n_items, d_text] frozen text-encoder embeddings, row 0 padding
        query_text: Tensor | None = None,  # [n_queries, d_text]
        item_codes: Tensor | None = None,  # [n_items, levels] rec-view semantic IDs from the RQ-VAE
        search_codes: Tensor | None = None,  # [n_items, levels'] search-view semantic IDs (optional)
        codebook_size: int | None = None,
        item_table: Tensor | None = None,  # [n_items, d] precomputed item content (serving; embeddings.py)
        query_table: Tensor | None = None,  # [n_queries, d]
        text_dim: int | None = None,
    ):
        super().__init__()
        if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
            raise ValueError(f"model: d_model / n_heads must be an even integer, got {cfg.d_model} / {cfg.n_heads}")
        if cfg.semantic_head and item_codes is None:
            raise ValueError("model.semantic_head is on but no item_codes were given")
        self.cfg, self.n_items = cfg, n_items
        d = cfg.d_model
        self.embed = TokenEmbedding(
            cfg, n_items=n_items, n_queries=n_queries, n_actions=n_actions, n_surfaces=n_surfaces,
            item_text=item_text, query_text=query_text, item_codes=item_codes, search_codes=search_codes,
            codebook_size=codebook_size, item_table=item_table, query_table=query_table, text_dim=text_dim,
        )
        self.rope = RotaryEmbedding(
            d // cfg.n_heads, cfg.rope, cfg.rope_base, cfg.rope_min_period_s, cfg.rope_max_period_s
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.backbone = Backbone(cfg)
        self.retrieval = RetrievalHead(d, cfg.task_towers)
        self.ranking = RankingHead(d, retrieval_prior=cfg.ranking == "on_retrieval")
        views = self.embed.views
        self.semantic = (
            nn.ModuleDict({v: SemanticIdHead(d, self.embed.codes(v).shape[1], codebook_size) for v in views})
            if cfg.semantic_head else None
        )
        self.log_temp = nn.Parameter(torch.tensor(math.log(cfg.temperature)), requires_grad=cfg.learn_temperature)
        self.log_temp_search = (  # task towers: search's own temperature
            nn.Parameter(torch.tensor(math.log(cfg.temperature)), requires_grad=cfg.learn_temperature)
            if cfg.task_towers else None
        )
        self.apply(_init_weights)
        self.backbone.init_residual_()
        self.tries = nn.ModuleDict({v: SemanticIdTrie(self.embed.codes(v), codebook_size) for v in views})

    # ---- encoder -------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """-> hidden states [B, L + C, d]: history positions first, then candidates (C = 0 without)."""
        tt = batch["token_type"]
        valid = tt != TokenType.PAD  # [B, L]
        x = self._embed_history(batch)
        pos, ts, cand_valid = batch["position"], batch["ts"], None
        if "candidates" in batch:
            cand = batch["candidates"]  # [B, C]
            cand_valid = cand > 0
            cpos, cts = self._request_position_ts(batch, valid)  # [B], [B]
            x = torch.cat([x, self.embed.candidates(cand)], dim=1)
            pos = torch.cat([pos, cpos[:, None].expand_as(cand)], dim=1)
            ts = torch.cat([ts.to(cts.dtype), cts[:, None].expand_as(cand)], dim=1)
            valid = torch.cat([valid, cand_valid], dim=1)
        mask = attention_mask(valid[:, : tt.shape[1]], cand_valid)  # [B, 1, T, T]
        cos, sin = self.rope(pos, ts, valid, dtype=x.dtype)
        return self.backbone(self.drop(x), cos, sin, mask)

    @torch.no_grad()
    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Inference: the history pass once, for retrieval and ranking.

        -> (history hidden states [B, L, d], a cache for ``rank_cached``). The states equal ``forward``'s
        history rows; the rotary reference time includes the candidates' slot (the request time), as
        ``forward`` with candidates does, so the cached ranking matches the masked pass.
        """
        tt = batch["token_type"]
        valid = tt != TokenType.PAD  # [B, L]
        x = self._embed_history(batch)
        cpos, cts = self._request_position_ts(batch, valid)  # [B], [B]
        pos = torch.cat([batch["position"], cpos[:, None]], dim=1)  # [B, L + 1]: history, then the candidates' slot
        ts = torch.cat([batch["ts"].to(cts.dtype), cts[:, None]], dim=1)
        cos, sin = self.rope(pos, ts, torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1), dtype=x.dtype)
        L, kv = tt.shape[1], []
        hidden = self.backbone(x, cos[:, :, :L], sin[:, :, :L], attention_mask(valid), kv)
        cache = {"kv": kv, "valid": valid, "cos": cos[:, :, L:], "sin": sin[:, :, L:]}
        if self.ranking.prior_scale is not None:
            cache["query"] = self.request_query(batch, hidden)
        return hidden, cache

    @torch.no_grad()
    def rank_cached(self, cache: dict, cand: Tensor) -> Tensor:
        """Inference. cache: from ``encode``; cand: [B, C] items (0 = padding) -> [B, C] ranking logits,
        equal to ``ranking_scores`` of the masked pass with these candidates."""
        h = self.backbone.candidates(self.embed.candidates(cand), cache["cos"], cache["sin"], cache["kv"], cache["valid"])
        return self.ranking(h, self._candidate_logits(cache.get("query"), cand))

    def _embed_history(self, batch: dict[str, Tensor]) -> Tensor:
        """-> [B, L, d] input vectors of the history tokens."""
        return self.embed(batch["item_idx"], batch["query_idx"], batch["token_type"], batch["action"], batch["surface"],
                          batch.get("query_text"))

    @staticmethod
    def _request_position_ts(batch: dict[str, Tensor], valid: Tensor) -> tuple[Tensor, Tensor]:
        """Candidates sit one step after the latest history token, at the request time."""
        pos = batch["position"].masked_fill(~valid, torch.iinfo(batch["position"].dtype).min).amax(1) + 1
        if "request_ts" in batch:
            return pos, batch["request_ts"].to(torch.float64)
        ts = batch["ts"].to(torch.float64).masked_fill(~valid, -math.inf).amax(1)
        return pos, torch.where(torch.isfinite(ts), ts, torch.zeros_like(ts))

    def last_hidden(self, batch: dict[str, Tensor], hidden: Tensor) -> Tensor:
        """-> [B, d]: hidden state at each row's last valid history token (the request's prediction)."""
        return _at_last_token(batch, hidden)

    @staticmethod
    def request_is_search(batch: dict[str, Tensor]) -> Tensor:
        """-> [B] bool: the row's last valid history token is a query (a search request)."""
        return _at_last_token(batch, batch["token_type"]) == TokenType.QUERY

    # ---- retrieval -----------------------------------------------------------------------------

    def temperature(self, search: Tensor | None = None) -> Tensor:
        """-> scalar; with task towers and ``search`` [N] bool given, [N, 1]: each position's task's."""
        if self.log_temp_search is None or search is None:
            return self.log_temp.exp().clamp(min=1e-3)
        return torch.where(search, self.log_temp_search, self.log_temp).exp().clamp(min=1e-3)[:, None]

    def scaled_query(self, hidden: Tensor, search: Tensor | None = None) -> Tensor:
        """hidden: [N, d] at prediction positions; search: [N] bool -> [N, d] query unit vectors over
        their task's temperature: ``scaled_query @ item_vectors().T`` are the retrieval logits."""
        return self.retrieval.query(hidden, search) / self.temperature(search)

    def item_vectors(self, item_idx: Tensor | None = None) -> Tensor:
        """-> [n, d] unit vectors of items (the whole catalog [n_items, d] by default, row 0 padding)."""
        if item_idx is None:
            item_idx = torch.arange(self.n_items, device=self.log_temp.device)
        return self.retrieval.item(self.embed.item_content(item_idx))

    def retrieval_logits(self, hidden: Tensor, items: Tensor | None = None, search: Tensor | None = None) -> Tensor:
        """hidden: [N, d] at prediction positions -> [N, n_items] cosine / temperature, -inf at padding.

        ``items`` [n_items, d]: precomputed ``item_vectors()`` to reuse over many calls; ``search`` [N]
        bool: which rows are search positions (needed with task towers, see ``request_is_search``).
        """
        items = self.item_vectors() if items is None else items
        logits = self.scaled_query(hidden, search) @ items.T
        logits[:, 0] = float("-inf")
        return logits

    def request_logits(self, batch: dict[str, Tensor], hidden: Tensor, items: Tensor | None = None) -> Tensor:
        """-> [B, n_items] retrieval logits of each row's request (its last valid history token)."""
        return self.retrieval_logits(self.last_hidden(batch, hidden), items, self.request_is_search(batch))

    def request_query(self, batch: dict[str, Tensor], hidden: Tensor) -> Tensor:
        """-> [B, d] each row's request as a scaled query vector (``scaled_query``)."""
        return self.scaled_query(self.last_hidden(batch, hidden), self.request_is_search(batch))

    def retrieval_loss(
        self, batch: dict[str, Tensor], hidden: Tensor, neg_idx: Tensor | None = None, log_q: Tensor | None = None,
        whole: Whole | None = None,
    ) -> Tensor:
        """InfoNCE at every position with a target, against in-batch positives and ``neg_idx`` [M].

        log_q: [n_items] log sampling probability of each item as a candidate (e.g. log popularity),
        used for both in-batch and sampled columns. ``whole``: when ``batch`` is a part of a batch
        (data-parallel), that batch's targets: its positives are the in-batch candidates, and the loss
        is this part's sum over its count (``info_nce``).
        """
        L = batch["token_type"].shape[1]
        target = next_item_targets(batch)
        sel = target > 0
        if not sel.any():
            return hidden.sum() * 0.0
        if whole is None:
            whole = Whole(int(sel.sum()), target[sel])
        pos_ids = whole.positives  # [K]
        search = prediction_task(batch)[sel] == SEARCH  # [N]
        q = self.retrieval.query(hidden[:, :L][sel], search)  # [N, d]
        neg = None if neg_idx is None else self.item_vectors(neg_idx)
        pos_lq = None if log_q is None else log_q[pos_ids]
        neg_lq = None if log_q is None or neg_idx is None else log_q[neg_idx]
        return info_nce(
            q, self.item_vectors(pos_ids), pos_ids, neg, neg_idx,
            temperature=self.temperature(search), pos_log_q=pos_lq, neg_log_q=neg_lq,
            first=whole.first, count=whole.count,
        )

    # ---- ranking -------------------------------------------------------------------------------

    def ranking_scores(self, batch: dict[str, Tensor], hidden: Tensor) -> Tensor:
        """-> [B, C] logits of the candidates (meaningless where candidates == 0)."""
        L = batch["token_type"].shape[1]
        query = self.request_query(batch, hidden[:, :L]) if self.ranking.prior_scale is not None else None
        return self.ranking(hidden[:, L:], self._candidate_logits(query, batch["candidates"]))

    def _candidate_logits(self, query: Tensor | None, cand: Tensor) -> Tensor | None:
        """query: [B, d] from ``request_query`` (None: no prior); cand: [B, C] -> [B, C] retrieval logits."""
        if query is None:
            return None
        return torch.einsum("bd,bcd->bc", query, self.item_vectors(cand))

    def ranking_loss(self, batch: dict[str, Tensor], hidden: Tensor, counts: tuple[int, int] | None = None) -> Tensor:
        """``counts``: the whole batch's ``ranking_counts`` when ``batch`` is a part of it (data-parallel)."""
        valid = batch["candidates"] > 0
        return hybrid_ranking_loss(
            self.ranking_scores(batch, hidden), batch["labels"], valid, self.cfg.w_point, self.cfg.w_pair, counts
        )

    # ---- semantic IDs (GenSAR) -----------------------------------------------------------------

    def view_of(self, task: str) -> str:
        """"search" or "rec" task -> the semantic-ID view its positions predict."""
        return "search" if task == "search" and "search" in self.embed.views else "rec"

    def semantic_logits(self, hidden: Tensor, codes: Tensor, view: str = "rec") -> Tensor:
        """Teacher-forced. hidden: [N, d]; codes: [N, levels] of ``view`` -> [N, levels, K]."""
        return self.semantic[view](hidden, codes)

    def semantic_loss(self, batch: dict[str, Tensor], hidden: Tensor, count: int | None = None) -> Tensor:
        """Cross-entropy of the target item's codes (mean over levels), averaged over all target
        positions; search positions use the search view when the model has one. ``count``: the whole
        batch's target positions when ``batch`` is a part of it (data-parallel): then the sum over this
        part's positions divided by it."""
        L = batch["token_type"].shape[1]
        target = next_item_targets(batch)
        task = prediction_task(batch)
        total, n_part = hidden.sum() * 0.0, 0
        for name, code in (("search", SEARCH), ("rec", RECOMMEND)):
            sel = (target > 0) & (task == code)
            n = int(sel.sum())
            if n == 0:
                continue
            view = self.view_of(name)
            codes = self.embed.codes(view)[target[sel]]  # [N, levels]
            ce = semantic_id_loss(self.semantic_logits(hidden[:, :L][sel], codes, view), codes)  # [levels]
            total, n_part = total + ce.mean() * n, n_part + n
        return total / max(n_part if count is None else count, 1)

    @torch.no_grad()
    def generate(
        self, hidden: Tensor, beam: int, view: str = "rec", trie: SemanticIdTrie | None = None
    ) -> BeamResult:
        """hidden: [B, d] request states (``last_hidden``) -> top-``beam`` valid semantic IDs of ``view``
        (``view_of("search")`` for search requests) and their items.

        ``trie`` restricts generation (e.g. to items on sale); default: the whole catalog.
        """
        trie = self.tries[view] if trie is None else trie
        head = self.semantic[view]

        def step(prefix: Tensor) -> Tensor:  # [B, W, l] -> [B, W, K]
            return head.level_logits(hidden[:, None].expand(-1, prefix.shape[1], -1), prefix)

        return constrained_beam_search(step, trie, hidden.shape[0], beam)

    # ---- all together --------------------------------------------------------------------------

    def losses(
        self, batch: dict[str, Tensor], neg_idx: Tensor | None = None, log_q: Tensor | None = None
    ) -> dict[str, Tensor]:
        """One forward pass -> {"retrieval", ["ranking"], ["semantic"], "total"} with config weights.

        Ranking needs ``candidates`` and ``labels`` in the batch; semantic needs ``semantic_head``.
        """
        hidden = self(batch)
        out = {"retrieval": self.retrieval_loss(batch, hidden, neg_idx, log_q)}
        total = self.cfg.w_retrieval * out["retrieval"]
        if "candidates" in batch and "labels" in batch and bool((batch["candidates"] > 0).any()):
            out["ranking"] = self.ranking_loss(batch, hidden)
            total = total + self.cfg.w_ranking * out["ranking"]
        if self.semantic is not None:
            out["semantic"] = self.semantic_loss(batch, hidden)
            total = total + self.cfg.w_semantic * out["semantic"]
        out["total"] = total
        return out


def _at_last_token(batch: dict[str, Tensor], x: Tensor) -> Tensor:
    """x: [B, L, ...] -> [B, ...] at each row's last valid history token."""
    idx = last_valid_index(batch["token_type"] != TokenType.PAD)  # [B]
    return x[torch.arange(x.shape[0], device=x.device), idx]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
