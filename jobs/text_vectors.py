"""Stage 3a: frozen text vectors of every item and every query of the day's vocabularies (Spark). The
collaborative item vectors (``jobs.collab``) follow in the same stage (``jobs.stages.item_embeddings``).

Inputs: ``<lake>/<sessionize.output>/{item_vocab,query_vocab}/ds=D`` and the catalog
``<lake>/<sessionize.source>/catalog`` (upserts per day: an item's text is its latest row up to D,
built by ``synergen_core.text_encoder.item_text``). Outputs: ``<lake>/<embeddings.output>/{items,queries}/ds=D``
(contracts in ``schemas.semantic_ids``), full snapshots keyed by index and id/text, with a text hash.

Only new or changed texts are embedded. The state is the latest snapshot before D ("yesterday") when the
same encoder made it (``encoder_fingerprint``, kept in ``_embeddings.json``; the hash covers it too):

* items: only items with a catalog row in (yesterday, D] can have a new text. Those rows (and items
  yesterday's table lacks) go to Python, where the text is built and hashed and embedded only when the hash
  differs from yesterday's. Every other row is carried over by Spark without reaching Python, so a
  daily run reads one day of catalog, not its whole history.
* queries: an index always names the same normalized text, so the hash is computed in Spark and only rows
  whose hash differs (new queries) go to Python.

Without a usable state (first run, or another encoder) every text is embedded, from the full catalog.

The encoder runs inside ``mapInArrow``: loaded once per partition, and only by a partition that has a
text to embed. ``embedded_ds`` says when each vector was computed, which gives the embedded/carried counts;
Spark counts them on the staged partition (joined to yesterday's keys), so no key column reaches the driver.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.spark import Staging, read_days, spark_partition
from schemas import CATALOG, C
from schemas.semantic_ids import ITEM_EMBEDDINGS, QUERY_EMBEDDINGS
from schemas.sequences import ITEM_VOCAB, QUERY_VOCAB
from synergen_core import lake
from synergen_core.config import Config, TextEncoderConfig, parse_ds
from synergen_core.vectors import vectors_array, vectors_matrix

log = logging.getLogger(__name__)

ITEMS, QUERIES = "items", "queries"
META_FILE = "_embeddings.json"
PREV = "_prev_"  # prefix of yesterday's columns after the join
IN_CATALOG = "_in_catalog"  # the item has a catalog row in the days read
TEXT_FIELDS = (C.TITLE, C.CATEGORIES, C.DESCRIPTION, C.BRAND)


# ---------------------------------------------------------------------------------------------
# what identifies a text's vector


def encoder_fingerprint(cfg: TextEncoderConfig) -> str:
    """What identifies the vector space: another fingerprint means every text is embedded again."""
    if cfg.kind == "wordllama":
        return f"wordllama=={version('wordllama')}"
    return f"sentence_transformers:{Path(cfg.path).resolve() if cfg.path else ''}"


def text_hash(fingerprint: str, text: str) -> str:
    """sha256 hex of ``fingerprint + "\\n" + text``; the same as Spark's ``sha2(concat(...), 256)``."""
    return hashlib.sha256(f"{fingerprint}\n{text}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the Python side: runs on the executors


def _item_texts(batch: pa.RecordBatch, max_description_chars: int) -> list[str]:
    from synergen_core.text_encoder import item_text

    cols = [batch.column(f).to_pylist() for f in TEXT_FIELDS]
    return [item_text(t, c, d, b, max_description_chars) for t, c, d, b in zip(*cols)]


def _embedder(encoder: TextEncoderConfig, fingerprint: str, ds: str, key: str, name: str):
    """The ``mapInArrow`` function: (key, name, text or catalog fields, yesterday's hash/vector/day) ->
    (key, name, text_hash, vector, embedded_ds). Rows whose hash equals yesterday's keep their vector."""

    def embed(batches):
        from synergen_core.text_encoder import load_text_encoder

        enc = None
        for b in batches:
            if key == C.ITEM_INDEX:
                texts = _item_texts(b, encoder.max_description_chars)
            else:
                texts = [q or "" for q in b.column(C.QUERY).to_pylist()]
            hashes = [text_hash(fingerprint, t) for t in texts]
            prev_hash = b.column(PREV + C.TEXT_HASH).to_pylist()
            redo = np.array([h != p for h, p in zip(hashes, prev_hash)], bool)
            if redo.any() and enc is None:
                enc = load_text_encoder(encoder)  # once per partition, and only when needed
            keep = ~redo
            kept = vectors_matrix(b.column(PREV + C.VECTOR).filter(pa.array(keep))) if keep.any() else None
            dim = enc.dim if enc is not None else kept.shape[1]
            vecs = np.zeros((b.num_rows, dim), np.float32)
            if kept is not None:
                vecs[keep] = kept
            if redo.any():
                vecs[redo] = enc.encode([texts[i] for i in np.nonzero(redo)[0]])
            prev_ds = b.column(PREV + C.EMBEDDED_DS).to_pylist()
            embedded = [ds if r else p for r, p in zip(redo.tolist(), prev_ds)]
            yield pa.RecordBatch.from_arrays(
                [b.column(key), b.column(name), pa.array(hashes, pa.string()), vectors_array(vecs),
                 pa.array(embedded, pa.string())],
                names=[key, name, C.TEXT_HASH, C.VECTOR, C.EMBEDDED_DS])

    return embed


# ---------------------------------------------------------------------------------------------
# the Spark side


def state_day(cfg: Config, name: str, ds: str, fingerprint: str) -> tuple[str | None, str]:
    """(yesterday's day, why) when the latest snapshot before ``ds`` was made by this encoder, else (None, why)."""
    layout = cfg.layout
    prev = layout.day_before(layout.vectors(name), ds)
    if prev is None:
        return None, "first run"
    meta = lake.read_meta(layout.root, layout.vectors(name), prev, META_FILE) or {}
    if meta.get("fingerprint") != fingerprint:
        return None, f"encoder changed: {meta.get('fingerprint')} -> {fingerprint}"
    return prev, "incremental"


def _previous(spark, cfg: Config, name: str, prev: str | None, key: str, contract: pa.Schema) -> DataFrame:
    cols = (C.TEXT_HASH, C.VECTOR, C.EMBEDDED_DS)
    if prev is None:
        return spark.createDataFrame([], f"{key} {'int' if key.endswith('index') else 'string'}, "
                                         f"{PREV}{C.TEXT_HASH} string, {PREV}{C.VECTOR} array<float>, "
                                         f"{PREV}{C.EMBEDDED_DS} string")
    df = spark_partition(spark, cfg.lake.root, cfg.layout.vectors(name), prev, contract)
    return df.select(key, *[F.col(c).alias(PREV + c) for c in cols])


def _out_schema(key: str, name: str) -> str:
    return (f"{key} int, {name} string, {C.TEXT_HASH} string, {C.VECTOR} array<float>, "
            f"{C.EMBEDDED_DS} string")


def item_frame(spark, cfg: Config, ds: str, prev: str | None, fingerprint: str) -> DataFrame:
    """The day's item vectors (ITEM_EMBEDDINGS columns); texts embedded lazily when written."""
    root = cfg.lake.root
    vocab = spark_partition(spark, root, cfg.layout.sessions("item_vocab"), ds, ITEM_VOCAB)
    catalog = read_days(spark, root, cfg.layout.valid("catalog"), CATALOG, after=prev, upto=ds)
    # the latest row per item: max_by needs no sort, and a validated partition holds an item once
    latest = (catalog.groupBy(C.ITEM_ID).agg(F.max_by(F.struct(*TEXT_FIELDS), C.DS).alias("_row"))
              .select(C.ITEM_ID, *[F.col(f"_row.{f}").alias(f) for f in TEXT_FIELDS], F.lit(True).alias(IN_CATALOG)))
    cand = (vocab.select(C.ITEM_INDEX, C.ITEM_ID).join(latest, C.ITEM_ID, "left")
            .join(_previous(spark, cfg, ITEMS, prev, C.ITEM_ID, ITEM_EMBEDDINGS), C.ITEM_ID, "left"))
    unchanged = F.col(IN_CATALOG).isNull() & F.col(PREV + C.TEXT_HASH).isNotNull()
    carry = cand.where(unchanged).select(
        C.ITEM_INDEX, C.ITEM_ID, *[F.col(PREV + c).alias(c) for c in (C.TEXT_HASH, C.VECTOR, C.EMBEDDED_DS)])
    todo = cand.where(~unchanged).select(C.ITEM_INDEX, C.ITEM_ID, *TEXT_FIELDS, PREV + C.TEXT_HASH,
                                         PREV + C.VECTOR, PREV + C.EMBEDDED_DS)
    fresh = todo.mapInArrow(_embedder(cfg.text_encoder, fingerprint, ds, C.ITEM_INDEX, C.ITEM_ID),
                            _out_schema(C.ITEM_INDEX, C.ITEM_ID))
    return carry.unionByName(fresh)


def query_frame(spark, cfg: Config, ds: str, prev: str | None, fingerprint: str) -> DataFrame:
    """The day's query vectors (QUERY_EMBEDDINGS columns); only rows whose hash changed reach Python."""
    vocab = spark_partition(spark, cfg.lake.root, cfg.layout.sessions("query_vocab"), ds, QUERY_VOCAB)
    h = F.sha2(F.concat(F.lit(fingerprint + "\n"), F.coalesce(F.col(C.QUERY), F.lit(""))), 256)
    prev_df = _previous(spark, cfg, QUERIES, prev, C.QUERY_INDEX, QUERY_EMBEDDINGS)
    cand = vocab.select(C.QUERY_INDEX, C.QUERY, h.alias("_hash")).join(prev_df, C.QUERY_INDEX, "left")
    same = F.coalesce(F.col(PREV + C.TEXT_HASH) == F.col("_hash"), F.lit(False))
    carry = cand.where(same).select(
        C.QUERY_INDEX, C.QUERY, *[F.col(PREV + c).alias(c) for c in (C.TEXT_HASH, C.VECTOR, C.EMBEDDED_DS)])
    todo = cand.where(~same).select(C.QUERY_INDEX, C.QUERY, PREV + C.TEXT_HASH, PREV + C.VECTOR,
                                    PREV + C.EMBEDDED_DS)
    fresh = todo.mapInArrow(_embedder(cfg.text_encoder, fingerprint, ds, C.QUERY_INDEX, C.QUERY),
                            _out_schema(C.QUERY_INDEX, C.QUERY))
    return carry.unionByName(fresh)


def _counts(spark, part: Path, key: str, ds: str, prev: DataFrame | None) -> dict:
    """Rows, embedded (computed today), carried and new of a staged partition, counted by Spark (``prev``:
    yesterday's snapshot, unique by key as this check made it)."""
    if not lake.data_files(part):
        return {"rows": 0, "embedded": 0, "carried": 0, "new": 0, "changed": 0, "dim": None}
    df = spark.read.parquet(str(part))
    old = F.lit(False)
    if prev is not None:
        df = df.join(prev.select(key, F.lit(True).alias("_old")), key, "left")
        old = F.coalesce(F.col("_old"), F.lit(False))
    r = df.agg(F.count("*").alias("rows"), F.count_distinct(key).alias("keys"),
               F.sum((F.col(C.EMBEDDED_DS) == ds).cast("int")).alias("embedded"),
               F.sum(old.cast("int")).alias("old"), F.max(F.size(C.VECTOR)).alias("dim")).first()
    if r["keys"] != r["rows"]:
        raise RuntimeError(f"{part}: {r['rows'] - r['keys']} duplicate {key} values")
    rows, embedded = int(r["rows"]), int(r["embedded"] or 0)
    new = rows - int(r["old"] or 0)
    return {"rows": rows, "embedded": embedded, "carried": rows - embedded, "new": new,
            "changed": embedded - new, "dim": r["dim"]}


def embed_texts(spark: SparkSession, cfg: Config, ds: str) -> dict:
    """Write the ``items`` and ``queries`` snapshots of ``ds`` (published together). Returns their counts."""
    ds = parse_ds(ds).isoformat()
    fingerprint = encoder_fingerprint(cfg.text_encoder)
    staging = Staging(spark, cfg.lake.root)
    out: dict = {"fingerprint": fingerprint}
    try:
        for name, key, frame in ((ITEMS, C.ITEM_INDEX, item_frame), (QUERIES, C.QUERY_INDEX, query_frame)):
            t0 = time.perf_counter()
            prev, why = state_day(cfg, name, ds, fingerprint)
            staging.write_day(frame(spark, cfg, ds, prev, fingerprint), cfg.layout.vectors(name), ds)
            contract = ITEM_EMBEDDINGS if name == ITEMS else QUERY_EMBEDDINGS
            prev_df = spark_partition(spark, cfg.lake.root, cfg.layout.vectors(name), prev, contract) if prev else None
            counts = _counts(spark, staging.staged(cfg.layout.vectors(name), ds), key, ds, prev_df)
            counts.update(previous_ds=prev, mode=why, seconds=round(time.perf_counter() - t0, 3))
            staging.add_side_file(cfg.layout.vectors(name), ds, META_FILE,
                                  json.dumps({"ds": ds, "fingerprint": fingerprint, **counts}, indent=1))
            out[name] = counts
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    log.info("embeddings %s: items %s, queries %s", ds, out[ITEMS], out[QUERIES])
    return out

