"""The per-item work of stage 3c (``jobs.semantic_ids``) on Spark: the day's vectors, the training sample,
reconstruction figures, assignment, collision resolution and the day's ID table, all as DataFrames.

Nothing here brings a per-item structure to the driver except the training sample, whose size
``semantic_ids.train_sample`` bounds (and the prefix-similarity figures, computed on that sample).

* Training sample: a catalog up to ``train_sample`` items trains on every item in ``item_index`` order (as
  before the sample existed); a larger one on the ``train_sample`` items of smallest
  ``xxhash64(item_id, seed)``: an item keeps its membership from day to day unless enough new items hash
  below it, so a 1% larger catalog swaps about 1% of the sample.
* Assignment: the model's state dict is broadcast and every partition runs ``assign_with_candidates`` in
  ``mapInArrow`` (one torch thread per task); yesterday's raw codes ride along for the hysteresis, or,
  under ``carry`` (yesterday's model kept), replace the model's for the items that have them.
* Collisions: ``collision=reassign`` only ever moves the last code within a prefix (the first L-1 codes of
  a view ID), and ``extra_code`` only numbers the items of one full ID, so each such group is resolved on
  its own with the in-process rules (``rqvae.reassign_collisions`` / ``rqvae.extra_code_collisions``) in
  ``groupBy(view, key).applyInArrow``. A group's rows are given in ``item_index`` order, the order the
  whole-catalog resolution saw them in, so the IDs are the ones it gives. With ``reassign`` a group holds at
  most the last level's size of items (larger ones are refused first, with the in-process error).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.collab import COLLAB
from jobs.spark import spark_partition
from jobs.text_vectors import ITEMS
from schemas import C
from schemas import semantic_ids as sid_schema
from synergen_core.config import Config, SemanticIdConfig
from synergen_core.vectors import list_array, list_matrix, vectors_matrix

TEXT, COLLAB_V = "_text", "_collab"
PREV_RAW, PREV_SEARCH, PREV_REC, PREV_DS = "_prev_raw", "_prev_search", "_prev_rec", "_prev_ds"
PREVIOUS = ((PREV_RAW, C.RAW_CODES), (PREV_SEARCH, C.SEARCH_CODES), (PREV_REC, C.REC_CODES), (PREV_DS, C.ID_DS))
ASSIGNED = ("raw", "cand_text", "cand_collab", "dist_text", "dist_collab")


def codes_matrix(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A code-list column (every list of one length) -> [n, width] int64."""
    return list_matrix(values, np.int64)


def view_columns(cfg: SemanticIdConfig) -> tuple[list[int], list[int]]:
    """Positions in the raw codes of the search and the rec view ID (``rqvae.view_codes``)."""
    S, T = cfg.shared_levels, cfg.specific_levels
    return list(range(S + T)), list(range(S)) + list(range(S + T, S + 2 * T))


# ---------------------------------------------------------------------------------------------
# the day's vectors


def item_vectors(spark: SparkSession, cfg: Config, ds: str) -> DataFrame:
    """(item_index, item_id, _text, _collab) of the day, a full outer join: ``catalog_figures`` counts the
    items one table lacks, which the stage refuses."""
    root = Path(cfg.lake.root)
    items = (spark_partition(spark, root, cfg.layout.vectors(ITEMS), ds, sid_schema.ITEM_EMBEDDINGS)
             .select(C.ITEM_INDEX, C.ITEM_ID, F.col(C.VECTOR).alias(TEXT)))
    collab = (spark_partition(spark, root, cfg.layout.vectors(COLLAB), ds, sid_schema.COLLAB_EMBEDDINGS)
              .select(C.ITEM_INDEX, F.col(C.VECTOR).alias(COLLAB_V)))
    return items.join(collab, C.ITEM_INDEX, "full")


def catalog_figures(vectors: DataFrame) -> dict:
    """Items, the largest index, vector widths (min and max) and items missing from either table: one pass."""
    row = vectors.agg(
        F.count("*").alias("n"), F.max(C.ITEM_INDEX).alias("max_index"),
        F.sum(F.col(TEXT).isNull().cast("long")).alias("no_text"),
        F.sum(F.col(COLLAB_V).isNull().cast("long")).alias("no_collab"),
        F.min(F.size(TEXT)).alias("text_min"), F.max(F.size(TEXT)).alias("text_max"),
        F.min(F.size(COLLAB_V)).alias("collab_min"), F.max(F.size(COLLAB_V)).alias("collab_max"),
    ).first()
    return {k: (int(v) if v is not None else 0) for k, v in row.asDict().items()}


def with_previous(spark: SparkSession, cfg: Config, vectors: DataFrame, prev_ds: str | None) -> DataFrame:
    """``vectors`` with yesterday's raw codes, IDs and ID day (``_prev_*``, null for items it lacks)."""
    if prev_ds is None:
        return vectors.select("*", *[F.lit(None).cast("string" if src == C.ID_DS else "array<int>").alias(name)
                                     for name, src in PREVIOUS])
    prev = spark_partition(spark, Path(cfg.lake.root), cfg.layout.semantic_ids, prev_ds, sid_schema.SEMANTIC_IDS)
    return vectors.join(prev.select(C.ITEM_INDEX, *[F.col(src).alias(name) for name, src in PREVIOUS]),
                        C.ITEM_INDEX, "left")


# ---------------------------------------------------------------------------------------------
# the training sample (the one per-item structure the driver holds, bounded by train_sample)


def sample_index(vectors: DataFrame, n_items: int, cfg: SemanticIdConfig) -> DataFrame:
    """The ``item_index`` of the items the RQ-VAE trains on (module doc)."""
    if n_items <= cfg.train_sample:
        return vectors.select(C.ITEM_INDEX)
    h = F.xxhash64(F.col(C.ITEM_ID), F.lit(cfg.seed))
    # top-k of (hash, index) pairs: each task keeps at most train_sample small rows, so does the merge
    return vectors.select(C.ITEM_INDEX, h.alias("_h")).orderBy("_h", C.ITEM_INDEX).limit(cfg.train_sample) \
        .select(C.ITEM_INDEX)


@dataclass
class Sample:
    chosen: DataFrame  # item_index of the sample (on Spark)
    index: np.ndarray  # [m] item_index, ascending
    text: np.ndarray  # [m, text_dim]
    collab: np.ndarray  # [m, collab_dim]


def collect_sample(vectors: DataFrame, n_items: int, cfg: SemanticIdConfig, text_dim: int, collab_dim: int) -> Sample:
    """The training sample's vectors, ascending index. Collected: at most ``train_sample`` rows."""
    chosen = sample_index(vectors, n_items, cfg)
    t = vectors.join(chosen, C.ITEM_INDEX, "left_semi").select(C.ITEM_INDEX, TEXT, COLLAB_V).toArrow()
    t = t.sort_by(C.ITEM_INDEX)
    return Sample(chosen, t[C.ITEM_INDEX].to_numpy().astype(np.int64), vectors_matrix(t[TEXT], text_dim),
                  vectors_matrix(t[COLLAB_V], collab_dim))


# ---------------------------------------------------------------------------------------------
# the model on the executors


def _payload(spark: SparkSession, model):
    import torch

    buf = io.BytesIO()
    torch.save({"state": model.state_dict(), "text_dim": model.text_dim, "collab_dim": model.collab_dim,
                "cfg": model.cfg.model_dump(mode="json")}, buf)
    return spark.sparkContext.broadcast(buf.getvalue())


def _load(payload):
    import torch

    from synergen_core.rqvae import build_rqvae

    torch.set_num_threads(1)  # tasks already run in parallel; more threads per task only contend
    p = torch.load(io.BytesIO(payload.value), weights_only=True)
    return p, build_rqvae(p["text_dim"], p["collab_dim"], SemanticIdConfig(**p["cfg"]), p["state"]).eval()


def _recon_part(payload):
    def recon_part(batches):
        import torch

        p, model = _load(payload)
        bs = model.cfg.assign_batch_size
        for b in batches:
            text = vectors_matrix(b.column(TEXT), p["text_dim"])
            collab = vectors_matrix(b.column(COLLAB_V), p["collab_dim"])
            sums = np.zeros(2)
            with torch.no_grad():
                for i in range(0, len(text), bs):
                    out = model(torch.as_tensor(text[i:i + bs]), torch.as_tensor(collab[i:i + bs]))
                    m = min(bs, len(text) - i)
                    sums += [float(out["recon_t"]) * m, float(out["recon_c"]) * m]
            yield pa.RecordBatch.from_arrays([pa.array([b.num_rows], pa.int64()), pa.array(sums[:1]),
                                              pa.array(sums[1:])], names=["n", "t", "c"])

    return recon_part


def recon_figures(vectors: DataFrame, model) -> dict:
    """Mean reconstruction loss per view of ``model`` on every item: per-batch sums on the executors."""
    spark = vectors.sparkSession
    payload = _payload(spark, model)
    try:
        row = (vectors.select(TEXT, COLLAB_V).mapInArrow(_recon_part(payload), "n long, t double, c double")
               .agg(F.sum("n").alias("n"), F.sum("t").alias("t"), F.sum("c").alias("c")).first())
    finally:
        payload.destroy()
    n = max(int(row["n"] or 0), 1)
    rt, rc = float(row["t"] or 0.0) / n, float(row["c"] or 0.0) / n
    return {"text": rt, "collab": rc, "total": rt + rc}


def _assigner(payload, width: int, hysteresis: bool, carry: bool):
    """The ``mapInArrow`` function: raw codes and last-level candidates per item, other columns passed on."""

    def assign_part(batches):
        from synergen_core.rqvae import assign_with_candidates

        p, model = _load(payload)
        for b in batches:
            text = vectors_matrix(b.column(TEXT), p["text_dim"])
            collab = vectors_matrix(b.column(COLLAB_V), p["collab_dim"])
            prev_col = b.column(PREV_RAW)
            prev = np.full((b.num_rows, width), -1, np.int64)
            has = ~np.asarray(prev_col.is_null().to_numpy(zero_copy_only=False), bool) & hysteresis
            if has.any():
                prev[has] = codes_matrix(prev_col.filter(pa.array(has)))
            raw, cands, dists = assign_with_candidates(model, text, collab, prev if has.any() else None)
            if carry and has.any():
                # yesterday's codes, so the sticky resolution keeps yesterday's IDs (unique among old items);
                # the candidates stay the model's: new items move among them
                raw[has] = prev[has]
            arrays = [list_array(c, pa.int32()) for c in (raw, cands[:, 0], cands[:, 1])]
            arrays += [list_array(dists[:, v], pa.float32()) for v in (0, 1)]
            keep = [C.ITEM_INDEX, C.ITEM_ID, *[name for name, _ in PREVIOUS]]
            yield pa.RecordBatch.from_arrays([b.column(k) for k in keep] + arrays, names=keep + list(ASSIGNED))

    return assign_part


def assign(vectors: DataFrame, model, hysteresis: bool, carry: bool = False) -> tuple[DataFrame, object]:
    """Raw codes, candidates and distances of every row of ``with_previous(...)``, on the executors, with
    the row's item_id and ``_prev_*`` columns; ``hysteresis``: yesterday's raw codes feed it; ``carry`` (with
    ``hysteresis``): an item with yesterday's raw codes keeps them (they must have the model's width).
    Returns the DataFrame and the model's broadcast (destroy it once the DataFrame is no longer computed)."""
    from synergen_core.rqvae_capacity import level_sizes

    width = len(level_sizes(model.cfg))
    payload = _payload(vectors.sparkSession, model)
    schema = (f"{C.ITEM_INDEX} int, {C.ITEM_ID} string, {PREV_RAW} array<int>, {PREV_SEARCH} array<int>, "
              f"{PREV_REC} array<int>, {PREV_DS} string, raw array<int>, cand_text array<int>, "
              "cand_collab array<int>, dist_text array<float>, dist_collab array<float>")
    cols = [C.ITEM_INDEX, C.ITEM_ID, TEXT, COLLAB_V, *[name for name, _ in PREVIOUS]]
    return vectors.select(*cols).mapInArrow(_assigner(payload, width, hysteresis, carry), schema), payload


# ---------------------------------------------------------------------------------------------
# collision resolution, per prefix (reassign) or per ID (extra_code)


def _view_rows(assigned: DataFrame, cfg: SemanticIdConfig, sticky: bool) -> DataFrame:
    """One row per (item, view): its view codes, candidates, distances, yesterday's view ID and whether its
    raw view codes are yesterday's (both null without a sticky previous)."""
    parts = []
    for v, (cols, cand, dist, prev_id) in enumerate(zip(view_columns(cfg), ("cand_text", "cand_collab"),
                                                        ("dist_text", "dist_collab"), (PREV_SEARCH, PREV_REC))):
        codes = F.array(*[F.col("raw")[j] for j in cols])
        prev_codes = F.array(*[F.col(PREV_RAW)[j] for j in cols])
        parts.append(assigned.select(
            C.ITEM_INDEX, F.lit(v).alias("_view"), codes.alias("_codes"), F.col(cand).alias("_cands"),
            F.col(dist).alias("_dists"),
            (F.col(prev_id) if sticky else F.lit(None).cast("array<int>")).alias("_prev"),
            (F.when(F.col(PREV_RAW).isNotNull(), prev_codes == codes) if sticky
             else F.lit(None).cast("boolean")).alias("_same_raw")))
    return parts[0].unionByName(parts[1])


def _resolver(collision: str, last: int, floor: int, sticky: bool):
    """The ``applyInArrow`` function: one group's rows -> (item_index, view, ID). ``last``: the last level's
    codes; ``floor``: the largest level's (the key base of ``rqvae.resolve_collisions``, at least)."""

    def resolve_group(t: pa.Table) -> pa.Table:
        from synergen_core.rqvae import extra_code_collisions, reassign_collisions

        t = t.sort_by(C.ITEM_INDEX)  # the order the whole-catalog resolution sees
        n = t.num_rows
        codes = codes_matrix(t["_codes"])
        cands, dists = codes_matrix(t["_cands"]), list_matrix(t["_dists"], np.float32)
        width = codes.shape[1] + (collision == "extra_code")
        prev = same_raw = None
        if sticky:
            prev = np.full((n, width), -1, np.int64)
            has = ~np.asarray(t["_prev"].is_null().to_numpy(zero_copy_only=False), bool)
            if has.any():
                prev[has] = codes_matrix(t["_prev"].filter(pa.array(has)))
            same_raw = np.asarray(t["_same_raw"].fill_null(False).to_numpy(zero_copy_only=False), bool)
        # only the order of keys within the group matters, so any base above its codes gives the same IDs
        base = max(floor, int(codes.max(initial=0)) + 1, int(cands.max(initial=0)) + 1)
        if collision == "reassign":
            ids = reassign_collisions(codes, cands, dists, last, prev, same_raw, base)
        else:
            ids = extra_code_collisions(codes, dists[:, 0], base, prev)
        return pa.table({C.ITEM_INDEX: t[C.ITEM_INDEX], "_view": t["_view"], "_id": list_array(ids, pa.int32())})

    return resolve_group


def resolve(assigned: DataFrame, cfg: SemanticIdConfig, sticky: bool) -> DataFrame:
    """(item_index, search_codes, rec_codes): unique view IDs, as ``rqvae.resolve_collisions`` gives them.

    ``cfg``: the assigning model's; ``sticky``: yesterday's IDs (``_prev_*``) are kept where the rules allow.
    Raises ``ValueError`` (the in-process message) when a prefix holds more items than the last level has
    codes, before any group is resolved."""
    from synergen_core.rqvae_capacity import last_size, level_sizes

    rows = _view_rows(assigned, cfg, sticky)
    L = len(view_columns(cfg)[0])
    if cfg.collision == "reassign":
        rows = rows.withColumn("_key", F.slice("_codes", 1, L - 1))
        K = last_size(cfg)
        # collected: one row at most, the first prefix found too full
        over = rows.groupBy("_view", "_key").count().where(F.col("count") > K).limit(1).collect()
        if over:
            raise ValueError(
                f"prefix {list(over[0]['_key'])} holds more than the last level's {K} codes: use "
                "semantic_ids.collision=extra_code, a lower capacity_load or a larger last_codebook_size")
    else:
        rows = rows.withColumn("_key", F.col("_codes"))
    schema = f"{C.ITEM_INDEX} int, _view int, _id array<int>"
    resolver = _resolver(cfg.collision, last_size(cfg), max(level_sizes(cfg)), sticky)
    out = rows.groupBy("_view", "_key").applyInArrow(resolver, schema)
    search = out.where(F.col("_view") == 0).select(C.ITEM_INDEX, F.col("_id").alias(C.SEARCH_CODES))
    rec = out.where(F.col("_view") == 1).select(C.ITEM_INDEX, F.col("_id").alias(C.REC_CODES))
    return search.join(rec, C.ITEM_INDEX)


def ids_frame(assigned: DataFrame, resolved: DataFrame, ds: str, same_shape: bool) -> DataFrame:
    """The day's table (``schemas.semantic_ids.SEMANTIC_IDS``): an item whose two IDs are yesterday's keeps
    yesterday's ``id_ds`` (when yesterday's IDs have today's widths), every other item gets ``ds``."""
    df = assigned.select(C.ITEM_INDEX, C.ITEM_ID, F.col("raw").alias(C.RAW_CODES), PREV_SEARCH, PREV_REC,
                         PREV_DS).join(resolved, C.ITEM_INDEX)
    kept = (F.col(PREV_DS).isNotNull() & (F.col(PREV_SEARCH) == F.col(C.SEARCH_CODES))
            & (F.col(PREV_REC) == F.col(C.REC_CODES)))
    id_ds = F.when(kept, F.col(PREV_DS)).otherwise(F.lit(ds)) if same_shape else F.lit(ds)
    return df.select(C.ITEM_INDEX, C.ITEM_ID, C.SEARCH_CODES, C.REC_CODES, C.RAW_CODES, id_ds.alias(C.ID_DS))
