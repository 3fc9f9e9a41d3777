"""Side inputs of the model: frozen text vectors of items and queries, and GenSAR semantic IDs.

Text vectors come from stage 3 (``<lake>/<embeddings.output>/{items,queries}/ds=D``) when it ran for the
day; otherwise they are embedded in-process from the catalog as of the day and the query vocabulary with
``synergen_core.text_encoder`` (the same encoder, so the same vectors), which keeps ``synergen train``
usable on a lake that only went through sessionize.

Semantic IDs must carry no evaluation signal: their collaborative view is built from engagements.

* ``temporal``: the targets are the engagements of D, so the IDs are stage 3's table of the latest day
  before D (``<lake>/semantic_ids/ds=D-k``): built without them. Items first seen on D have no ID there and
  get code 0 at every level (counted in the notes).
* ``loo`` (and any protocol without such a table): an RQ-VAE (``synergen_core.rqvae``) trained in-process
  on the text view and a collaborative view from the protocol's training split only: a truncated SVD of
  the training user-item matrix (rows weighted 1/sqrt(history length)). Stage 3's table of D was built
  from every engagement up to D, the held-out last ones included.

``load_features`` caches the result per day and protocol (``features.pt`` beside the models), so every
variant and every resumed run sees exactly the same inputs. Its notes name the sources (the semantic-ID
table's day is what the registry records as the IDs a model was trained with).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from schemas import C
from synergen_core import checkpoint, lake
from synergen_core.config import SemanticIdConfig, TextEncoderConfig
from synergen_core.data import Tokens, row_ids
from synergen_core.model.embeddings import TokenType


@dataclass
class Features:
    item_text: Tensor | None  # [n_items, d_text], row 0 padding
    query_text: Tensor | None  # [n_queries, d_text]
    rec_codes: Tensor | None  # [n_items, levels] rec-view semantic IDs, row 0 zeros
    search_codes: Tensor | None  # [n_items, levels] search-view semantic IDs
    codebook_size: int | None
    notes: dict


def catalog_texts(layout: lake.Layout, ds: str, item_ids: list[str], max_description_chars: int) -> list[str]:
    """Text of each item id as of ``ds`` ("" for an item without a catalog row)."""
    from synergen_core.text_encoder import item_text

    table = layout.valid("catalog")
    frames = []
    for day in layout.days(table, upto=ds):
        for f in lake.data_files(layout.part(table, day)):
            frames.append(pl.from_arrow(pq.read_table(
                f, columns=[C.ITEM_ID, C.TITLE, C.DESCRIPTION, C.CATEGORIES, C.BRAND])))
    if not frames:
        return [""] * len(item_ids)
    latest = pl.concat(frames, how="vertical_relaxed").unique(C.ITEM_ID, keep="last", maintain_order=True)
    rows = {r[C.ITEM_ID]: r for r in latest.iter_rows(named=True)}
    mx = max_description_chars
    return [
        item_text(r[C.TITLE], r[C.CATEGORIES], r[C.DESCRIPTION], r[C.BRAND], mx) if (r := rows.get(i)) else ""
        for i in item_ids
    ]


def _lake_vectors(part: Path, index: str, n: int) -> np.ndarray | None:
    """Stage 3's vectors in partition ``part`` as [n, d] rows at their indices, or None if not there."""
    if not (part / lake.SUCCESS).is_file():  # stage 3 did not publish the day: embed in-process instead
        return None
    files = lake.data_files(part)
    if not files:
        return None
    t = pa.concat_tables([pq.read_table(f, columns=[index, C.VECTOR]) for f in files]).combine_chunks()
    idx = t[index].to_numpy()
    if len(idx) == 0 or idx.max() >= n:
        return None  # not the vocabulary this split was built with
    flat = t[C.VECTOR].combine_chunks()
    vec = flat.values.to_numpy(zero_copy_only=False).reshape(len(idx), -1)
    out = np.zeros((n, vec.shape[1]), np.float32)
    out[idx] = vec
    return out


def text_vectors(layout: lake.Layout, encoder: TextEncoderConfig, ds: str, item_vocab, query_vocab, n_items: int,
                 n_queries: int) -> tuple[np.ndarray, np.ndarray, str]:
    """-> (item vectors [n_items, d], query vectors [n_queries, d], where they came from), rows at vocabulary
    indices, row 0 zeros: the item-embedding stage's tables of ``ds`` where published, else ``encode_texts``."""
    items = _lake_vectors(layout.part(layout.vectors("items"), ds), C.ITEM_INDEX, n_items)
    queries = (_lake_vectors(layout.part(layout.vectors("queries"), ds), C.QUERY_INDEX, n_queries)
               if items is not None else None)
    if items is not None and (queries is not None or query_vocab.num_rows == 0):
        queries = queries if queries is not None else np.zeros((n_queries, items.shape[1]), np.float32)
        return items, queries, f"{layout.vectors('items')},queries ds={ds}"
    return (*encode_texts(layout, encoder, ds, item_vocab, query_vocab, n_items, n_queries), "in-process from the catalog")


def encode_texts(layout: lake.Layout, encoder: TextEncoderConfig, ds: str, item_vocab, query_vocab, n_items: int,
                 n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """``text_vectors`` computed in-process with the configured frozen encoder."""
    from synergen_core.text_encoder import load_text_encoder

    enc = load_text_encoder(encoder)
    item_idx = item_vocab[C.ITEM_INDEX].to_numpy()
    texts = catalog_texts(layout, ds, item_vocab[C.ITEM_ID].to_pylist(), encoder.max_description_chars)
    items = np.zeros((n_items, enc.dim), np.float32)
    items[item_idx] = enc.encode(texts)
    queries = np.zeros((n_queries, enc.dim), np.float32)
    if query_vocab.num_rows:
        queries[query_vocab[C.QUERY_INDEX].to_numpy()] = enc.encode(query_vocab[C.QUERY].to_pylist())
    return items, queries


def collab_vectors(train: Tokens, n_items: int, rank: int, seed: int) -> np.ndarray:
    """[n_items, r] unit rows: item factors V * sqrt(S) of a rank-r SVD of the training user-item matrix."""
    is_item = (train.token_type == TokenType.ITEM) & (train.item_idx > 0)
    users = row_ids(train.offsets)[is_item]
    items = train.item_idx[is_item]
    n_users = len(train.lengths)
    per_user = np.bincount(users, minlength=n_users).astype(np.float32)
    vals = 1.0 / np.sqrt(np.maximum(per_user[users], 1.0))
    r = max(1, min(rank, n_users, n_items) - 1)
    a = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([users, items])), torch.from_numpy(vals), (n_users, n_items),
        check_invariants=True,
    ).coalesce()
    torch.manual_seed(seed)
    _, s, v = torch.svd_lowrank(a, q=r, niter=4)  # v [n_items, r]
    x = (v * s.sqrt()).numpy()
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def semantic_codes(cfg: SemanticIdConfig, text: np.ndarray, collab: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """RQ-VAE over items 1..n-1 -> (rec codes, search codes) [n_items, levels] (row 0 zeros), figures."""
    from synergen_core.rqvae import semantic_ids, train_rqvae

    model, history = train_rqvae(text[1:], collab[1:], cfg)
    try:
        ids = semantic_ids(model, text[1:], collab[1:])
    except ValueError:
        # "reassign" fails when one prefix holds more items than a codebook has codes (a collapsed
        # RQ-VAE on a small or skewed catalog); TIGER's extra code has no such limit below K per ID.
        model.cfg = model.cfg.model_copy(update={"collision": "extra_code"})  # keeps a grown last level
        ids = semantic_ids(model, text[1:], collab[1:])
    pad = lambda c: np.concatenate([np.zeros((1, c.shape[1]), np.int64), c.astype(np.int64)])  # noqa: E731
    return pad(ids.rec), pad(ids.search), {"rqvae_final_loss": history[-1]["loss"] if history else None,
                                           "collision": model.cfg.collision, "levels": int(ids.rec.shape[1])}


def lake_semantic_codes(layout: lake.Layout, ds: str, n_items: int) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """Stage 3's IDs of the latest day before ``ds`` -> (rec, search) [n_items, levels] (row 0 and items
    it lacks: zeros) and notes; None when there is no such table."""
    day = layout.day_before(layout.semantic_ids, ds)
    if day is None:
        return None
    files = lake.data_files(layout.part(layout.semantic_ids, day))
    if not files:
        return None
    t = pa.concat_tables([pq.read_table(f, columns=[C.ITEM_INDEX, C.REC_CODES, C.SEARCH_CODES]) for f in files])
    idx = t[C.ITEM_INDEX].to_numpy()
    keep = idx < n_items
    codes = {}
    for name in (C.REC_CODES, C.SEARCH_CODES):
        col = t[name].combine_chunks()
        vals = col.values.to_numpy(zero_copy_only=False).reshape(len(idx), -1)
        out = np.zeros((n_items, vals.shape[1]), np.int64)
        out[idx[keep]] = vals[keep]
        codes[name] = out
    return codes[C.REC_CODES], codes[C.SEARCH_CODES], {
        "source": f"{layout.semantic_ids}/ds={day}", "table_ds": day,
        "items_without_id": int(n_items - 1 - keep.sum())}


def load_features(
    layout: lake.Layout, encoder: TextEncoderConfig, sid: SemanticIdConfig, ds: str, train: Tokens, item_vocab, query_vocab, n_items: int, n_queries: int,
    cache: Path | None = None, need_text: bool = True, need_codes: bool = True, protocol: str = "loo",
) -> Features:
    """Text vectors and semantic IDs for one training split, from ``cache`` when it holds them."""
    if cache is not None and cache.is_file():
        saved = checkpoint.load(cache)  # weights only: a crafted cache file must not run code
        if (saved["n_items"], saved["n_queries"]) == (n_items, n_queries) and \
                (saved["item_text"] is not None or not need_text) and (saved["rec_codes"] is not None or not need_codes):
            return Features(**{k: saved[k] for k in ("item_text", "query_text", "rec_codes", "search_codes",
                                                      "codebook_size", "notes")})
    notes: dict = {}
    item_text = query_text = rec = search = None
    if need_text or need_codes:
        it, qt, source = text_vectors(layout, encoder, ds, item_vocab, query_vocab, n_items, n_queries)
        item_text, query_text = torch.from_numpy(it), torch.from_numpy(qt)
        notes["text"] = f"{encoder.kind}, {it.shape[1]}-d, {source}"  # the stage's tables are read once
    if need_codes:
        found = lake_semantic_codes(layout, ds, n_items) if protocol == "temporal" else None
        if found is not None:
            rec_np, search_np, figures = found
        else:
            collab = collab_vectors(train, n_items, 64, sid.seed)
            rec_np, search_np, figures = semantic_codes(sid, item_text.numpy(), collab)
            figures = {"source": "in-process", "table_ds": None,
                       "collab_view": f"rank-{collab.shape[1]} SVD of the training split", **figures}
        rec, search = torch.from_numpy(rec_np), torch.from_numpy(search_np)
        notes["semantic_ids"] = figures
    K = None
    if need_codes:
        # TIGER's extra code numbers the items sharing an ID and may exceed the codebook on a collapsed
        # RQ-VAE: the model's per-level vocabulary must hold it.
        K = max(sid.codebook_size, int(rec.max()) + 1, int(search.max()) + 1)
    feats = Features(item_text, query_text, rec, search, K, notes)
    if cache is not None:
        checkpoint.save({"n_items": n_items, "n_queries": n_queries, **feats.__dict__}, cache)
    return feats
