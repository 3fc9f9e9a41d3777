"""Stage 3b: one collaborative vector per item of the day's vocabulary, the recommendation view of the
semantic IDs: ``<lake>/<embeddings.output>/collab/ds=D`` (``schemas.semantic_ids.COLLAB_EMBEDDINGS``).

Where the vectors come from, in order:

1. The champion model's item embeddings, through a hook: ``run(..., champion=loader)`` with
   ``loader(cfg, ds) -> ChampionVectors | ChampionFile | None``, or ``embeddings.champion_vectors`` naming a
   Parquet file or folder of (item_id, vector) rows exported from it (``load_champion_file``). Their space
   is rotated onto yesterday's (orthogonal Procrustes over the items both have a real vector for), so the
   RQ-VAE trained on yesterday's vectors still fits and IDs stay put; for an unchanged champion that
   rotation is yesterday's. The table's ``basis`` names the champion ``version``; ``aligned`` says whether
   the rotation was found (too few shared items: not). The semantic-ID stage retrains on an unaligned new
   basis, and on an aligned one only if yesterday's RQ-VAE no longer fits it (its reconstruction drift).
2. Otherwise yesterday's table: its vectors are carried over unchanged. A refit would put the vectors in
   an unrelated space (ALS factors are only defined up to rotation), and the warm-started RQ-VAE would then
   re-code every item.
3. Otherwise (the first run) Spark MLlib's implicit-feedback ALS over user-item engagement counts from
   the sessionized events up to D; rows are L2-normalized, so the IDs group items by who engages with
   them rather than by how popular they are.

Items without a vector from those (no engagements, not known to the champion, new since yesterday) get
the similarity-weighted mean of the vectors of their ``embeddings.fallback_neighbours`` nearest anchors by
text (cosine). Chosen over a linear text->collab projection: the mean stays among real collaborative
vectors (a least-squares projection shrinks towards the global mean and, with fewer engaged items than
text dimensions, overfits), and a cold item lands next to the items it resembles, so its rec ID shares
their prefix, which is what cold-start recommendation needs. Fallback vectors are recomputed every run
from today's text vectors (an item's text may have changed); ``computed_ds`` moves only when the vector did.

Scale: every per-item step runs in Spark, nothing per item reaches the driver. The vocabulary, yesterday's
table, the champion's vectors and the ALS factors are joined by Spark; ALS numbers its users with a
distributed sort. The fallback's anchors are the items with a vector, at most
``embeddings.fallback_max_anchors`` of them (the most engaged): their text vectors go into one faiss index
(exact up to ``fallback_exact_max_anchors``, IVF with ``fallback_nprobe`` beyond) written as a file under
the lake, which every ``mapInArrow`` task of the cold items reads. Only that index is built in one process,
and its size is bounded by the configuration, not by the catalog.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType

from jobs.spark import Staging, read_days, spark_partition
from jobs.text_vectors import ITEMS
from schemas import C
from schemas.semantic_ids import COLLAB_EMBEDDINGS, ITEM_EMBEDDINGS, SOURCE_ALS, SOURCE_CHAMPION, SOURCE_TEXT
from schemas.sequences import EVENTS, ITEM_VOCAB
from synergen_core import lake
from synergen_core.config import Config, parse_ds
from synergen_core.vectors import unit_rows, vectors_array, vectors_matrix

log = logging.getLogger(__name__)

COLLAB = "collab"
META_FILE = "_collab.json"
WORK = ".collab_work"  # under the embeddings layer: the fallback's anchors and index while a run lasts
FALLBACK_BATCH = 65_536  # cold items per neighbour search: bounds the [batch, k, dim] gather
ROWS_PER_WRITE = 65_536  # rows per Arrow batch where this process streams vectors to or from a file
TEXT, VEC, SRC = "_text", "_vec", "_src"  # working columns: text vector, collaborative vector, its source
P_VEC, P_SRC, P_DS = "_prev_vector", "_prev_source", "_prev_computed_ds"  # yesterday's row of the item
EXACT, IVF = "exact", "ivf"


@dataclass
class ChampionVectors:
    """Item embeddings of the champion model. ``version`` identifies the model: another version means
    another vector space, which is aligned to yesterday's before use."""

    version: str
    item_ids: Sequence[str]
    vectors: np.ndarray  # [n, dim]


@dataclass
class ChampionFile:
    """Item embeddings of the champion model as a Parquet file or folder of (item_id, vector) rows, which
    Spark reads where it runs (``ChampionVectors`` that a loader holds in memory are written to one)."""

    version: str
    path: Path


ChampionLoader = Callable[[Config, str], "ChampionVectors | ChampionFile | None"]


def load_champion_file(path: str | Path) -> ChampionFile:
    """(item_id, vector) rows from a Parquet file or folder; the version is a hash of the content (the ids,
    then the vectors), read in batches so the file is never held whole."""
    data = pads.dataset(str(path), format="parquet")
    digest, sep = hashlib.sha256(), b""
    for batch in data.to_batches(columns=[C.ITEM_ID], batch_size=ROWS_PER_WRITE):
        for item in batch.column(0).to_pylist():
            digest.update(sep + item.encode())
            sep = b"\n"
    for batch in data.to_batches(columns=[C.VECTOR], batch_size=ROWS_PER_WRITE):
        if batch.num_rows:
            digest.update(vectors_matrix(batch.column(0)).tobytes())
    return ChampionFile(f"sha256:{digest.hexdigest()[:16]}", Path(path))


def champion_from_config(cfg: Config, ds: str) -> ChampionFile | None:
    path = cfg.embeddings.champion_vectors
    return load_champion_file(path) if path is not None else None


def champion_from_registry(cfg: Config, ds: str) -> ChampionVectors | None:
    """The collaborative (ID) embeddings of ``models:/<name>@champion``, or None without a champion.

    Only items the champion saw engaged before its training day (item vocabulary count > 0 on the day its
    version was trained) are returned: the ID rows of the others were never trained. The version is the
    registry version, so a promotion is a new vector space for the semantic-ID stage. The whole model file
    is loaded here, so its ID table (and the vocabulary it was trained on) is held in this process: bounded
    by the model, which the train stage holds in one process too."""
    from synergen_core import checkpoint, registry

    name = registry.model_name(cfg)
    try:
        path, _, version = registry.download_model(cfg, f"models:/{name}@{registry.CHAMPION}")
    except registry.RegistryError:
        return None  # no registered model, or no champion yet: the first run
    record = checkpoint.load(path / checkpoint.MODEL if path.is_dir() else path)
    id_table = record["state_dict"].get("embed.id_emb.weight")  # [n_items, d]
    if id_table is None:
        return None  # an ID-free champion has no collaborative vectors
    trained_ds = registry.client(cfg).get_model_version(name, version).tags.get("synergen.ds")
    vocab_part = lake.partition(cfg.lake.root, cfg.layout.sessions("item_vocab"), trained_ds or ds)
    vocab = pq.read_table(vocab_part, columns=[C.ITEM_INDEX, C.ITEM_ID, C.COUNT])
    idx = vocab[C.ITEM_INDEX].to_numpy().astype(np.int64)
    keep = (vocab[C.COUNT].to_numpy() > 0) & (idx < id_table.shape[0])
    weights = id_table.float().numpy()
    return ChampionVectors(f"{name}/{version}", list(np.asarray(vocab[C.ITEM_ID].to_pylist(), object)[keep]),
                           weights[idx[keep]].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Spark frames of the three sources


def _map_vectors(df: DataFrame, column: str, fn: Callable[[np.ndarray], np.ndarray]) -> DataFrame:
    """``df`` with ``fn`` ([n, d] float32 -> [n, d]) applied to the vectors of ``column`` (no nulls), in
    ``mapInArrow``: numpy's arithmetic, so the rows come out as the in-process code made them."""
    names = df.columns

    def apply(batches):
        for b in batches:
            if b.num_rows:
                out = vectors_array(fn(vectors_matrix(b.column(column))))
                yield pa.RecordBatch.from_arrays([out if n == column else b.column(n) for n in names], names=names)

    return df.mapInArrow(apply, df.schema)


def _user_numbers(spark: SparkSession, eng: DataFrame, work: Path) -> DataFrame:
    """(user_id, _user): each user's rank in ascending user_id order, the numbering StringIndexer's
    ``alphabetAsc`` gives (so the ALS factors are the ones it led to), without gathering every user in one
    process as StringIndexer does: a range-partitioned sort, then each partition's offset added.
    (Spark orders strings by UTF-8 bytes, StringIndexer by UTF-16 units: they differ only for characters
    beyond U+FFFF against U+E000-U+FFFF.)"""
    path = str(work / "users")
    (eng.select(C.USER_ID).distinct().orderBy(C.USER_ID)
     .select(C.USER_ID, F.spark_partition_id().alias("_part"), F.monotonically_increasing_id().alias("_row"))
     .write.parquet(path))  # written once: a second evaluation of the sort could split it differently
    users = spark.read.parquet(path)
    # one row per partition of the sort: bounded by the shuffle partitions
    sizes = sorted(users.groupBy("_part").count().collect())
    shifts, start = [], 0
    for part, n in sizes:
        shifts.append((part, start - (part << 33)))  # monotonically_increasing_id: partition << 33 | row
        start += n
    shift = spark.createDataFrame(shifts, "_part int, _shift long")
    return users.join(F.broadcast(shift), "_part").select(
        C.USER_ID, (F.col("_row") + F.col("_shift")).cast("int").alias("_user"))


def als_blocks(spark: SparkSession, cfg: Config) -> int:
    return cfg.embeddings.als_blocks or max(1, spark.sparkContext.defaultParallelism)


def als_factors(spark: SparkSession, cfg: Config, ds: str, work: Path) -> DataFrame:
    """(item_index, unit vector ``_vec``) of implicit-feedback ALS over engagement counts of events up to
    ``ds``, for the items with an engagement: a Spark frame over the fitted model's factors."""
    from pyspark.ml.recommendation import ALS

    e = cfg.embeddings
    events = read_days(spark, cfg.lake.root, cfg.layout.sessions("events"), EVENTS, upto=ds)
    # an event with an item is an engagement (a search that engaged nothing has none); repeats add confidence
    eng = (events.where(F.col(C.ITEM_INDEX).isNotNull())
           .groupBy(C.USER_ID, C.ITEM_INDEX).agg(F.count("*").cast("float").alias("_weight")))
    ratings = eng.join(_user_numbers(spark, eng, work), C.USER_ID).select("_user", C.ITEM_INDEX, "_weight")
    blocks = als_blocks(spark, cfg)
    als = ALS(rank=e.als_rank, maxIter=e.als_max_iter, regParam=e.als_reg, alpha=e.als_alpha, implicitPrefs=True,
              userCol="_user", itemCol=C.ITEM_INDEX, ratingCol="_weight", seed=cfg.semantic_ids.seed,
              numUserBlocks=blocks, numItemBlocks=blocks)
    factors = als.fit(ratings).itemFactors  # kept by the model (ALS persists its final factors)
    return _map_vectors(factors.select(F.col("id").alias(C.ITEM_INDEX), F.col("features").alias(VEC)), VEC, unit_rows)


def _champion_frame(spark: SparkSession, champ, work: Path) -> tuple[DataFrame, int]:
    """(item_id, unit vector ``_vec``) of the champion, one row per item (the last one where an id repeats,
    as a dict built from the rows would keep), and how many rows it gave."""
    if isinstance(champ, ChampionVectors):
        path, vecs = work / "champion.parquet", np.asarray(champ.vectors, np.float32)
        schema = pa.schema([pa.field(C.ITEM_ID, pa.string()), pa.field(C.VECTOR, pa.list_(pa.float32()))])
        with pq.ParquetWriter(path, schema) as w:  # in row order: one file, so the last duplicate stays last
            for i in range(0, len(vecs), ROWS_PER_WRITE):
                w.write_table(pa.table({C.ITEM_ID: pa.array(list(champ.item_ids[i:i + ROWS_PER_WRITE]), pa.string()),
                                        C.VECTOR: vectors_array(vecs[i:i + ROWS_PER_WRITE])}, schema=schema))
        rows = len(vecs)
    else:
        path, rows = champ.path, None
    raw = spark.read.parquet(str(path)).select(C.ITEM_ID, F.col(C.VECTOR).cast("array<float>").alias(VEC))
    rows = raw.count() if rows is None else rows
    order = F.struct(F.input_file_name(), F.monotonically_increasing_id())
    latest = (raw.where(F.col(VEC).isNotNull()).withColumn("_order", order)
              .groupBy(C.ITEM_ID).agg(F.max_by(VEC, "_order").alias(VEC)))
    return _map_vectors(latest, VEC, unit_rows), rows


def _previous(spark: SparkSession, cfg: Config, prev_ds: str | None) -> DataFrame:
    """Yesterday's rows as (item_id, P_VEC, P_SRC, P_DS); none on the first run."""
    if prev_ds is None:
        return spark.createDataFrame([], f"{C.ITEM_ID} string, {P_VEC} array<float>, {P_SRC} string, {P_DS} string")
    df = spark_partition(spark, cfg.lake.root, cfg.layout.vectors(COLLAB), prev_ds, COLLAB_EMBEDDINGS)
    return df.select(C.ITEM_ID, F.col(C.VECTOR).alias(P_VEC), F.col(C.VECTOR_SOURCE).alias(P_SRC),
                     F.col(C.COMPUTED_DS).alias(P_DS))


# ---------------------------------------------------------------------------------------------
# the alignment of a champion's space onto yesterday's


def procrustes(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """The rotation R minimizing ||new @ R - old|| over paired rows (orthogonal Procrustes)."""
    return _rotation(new.T.astype(np.float64) @ old.astype(np.float64))


def _rotation(cross: np.ndarray) -> np.ndarray:
    """The Procrustes rotation from the cross-product ``new.T @ old`` [dim, dim] of the paired rows."""
    u, _, vt = np.linalg.svd(cross)
    return (u @ vt).astype(np.float32)


def _alignment(both: DataFrame, dim: int) -> tuple[np.ndarray | None, dict]:
    """The rotation of the champion's vectors (``_vec``) onto yesterday's (``P_VEC``) over the paired rows
    of ``both``, and its figures; None where too few rows (or another width) pin it down."""

    def partial(batches):  # per partition: the row count and new.T @ old, summed on the driver
        n, cross, same = 0, np.zeros((dim, dim)), True
        for b in batches:
            if b.num_rows:
                new, old = vectors_matrix(b.column(VEC)), vectors_matrix(b.column(P_VEC))
                n += len(new)
                same = same and old.shape[1] == dim
                if same:
                    cross += new.T.astype(np.float64) @ old.astype(np.float64)
        yield pa.RecordBatch.from_arrays([pa.array([n], pa.int64()), pa.array([same]),
                                          pa.array([cross.reshape(-1)], pa.list_(pa.float64()))], names=["n", "same", "m"])

    # one row per partition, dim x dim numbers each: bounded by the partitions and the width
    parts = both.select(VEC, P_VEC).mapInArrow(partial, "n long, same boolean, m array<double>").collect()
    n = sum(p["n"] for p in parts)
    if not all(p["same"] for p in parts) or n < dim:
        # too few shared items (or another width) to pin a rotation: the RQ-VAE retrains on the new space
        return None, {"aligned": False, "aligned_items": int(n)}
    cross = sum(np.asarray(p["m"], np.float64).reshape(dim, dim) for p in parts)
    rot = _rotation(cross)
    return rot, {"aligned": True, "aligned_items": int(n), "alignment_cosine_before": float(np.trace(cross) / n),
                 "alignment_cosine_after": float((rot.astype(np.float64) * cross).sum() / n)}


# ---------------------------------------------------------------------------------------------
# the fallback: nearest anchors by text


def _neighbour_mean(index, anchor_vecs: np.ndarray, mean: np.ndarray, text: np.ndarray, k: int) -> np.ndarray:
    """For each row of ``text``: the mean of ``anchor_vecs`` of its k nearest anchors in ``index`` (a
    ``synergen_core.index.CandidateIndex`` whose ids are anchor rows) by text cosine, weighted by the
    (positive) similarity; ``mean`` where no anchor is similar (e.g. no text)."""
    k = min(k, len(anchor_vecs))
    out = np.empty((len(text), anchor_vecs.shape[1]), np.float32)
    for i in range(0, len(text), FALLBACK_BATCH):
        sims, nn = index.search(unit_rows(text[i:i + FALLBACK_BATCH]), k)  # [b, k]
        w = np.clip(sims, 0.0, None)
        v = (w[..., None] * anchor_vecs[nn]).sum(1)  # [b, dim]
        v[w.sum(1) <= 1e-6] = mean
        out[i:i + FALLBACK_BATCH] = v
    return unit_rows(out)


def text_neighbour_vectors(anchor_text: np.ndarray, anchor_vecs: np.ndarray, text: np.ndarray, k: int) -> np.ndarray:
    """The fallback in this process with an exact search over every anchor: what the distributed fallback
    gives below ``embeddings.fallback_exact_max_anchors``."""
    from synergen_core.index import CandidateIndex, exact_index

    if len(anchor_text) == 0:
        raise ValueError("no item has a collaborative vector (no engagements and no champion vectors): "
                         "the fallback has nothing to average")
    index = CandidateIndex(exact_index(unit_rows(anchor_text)), np.arange(len(anchor_text)), EXACT)
    return _neighbour_mean(index, anchor_vecs, anchor_vecs.mean(0), text, k)


def _anchor_index(spark: SparkSession, cfg: Config, ds: str, known: DataFrame, n_known: int, work: Path) -> dict:
    """Write the fallback's anchors into ``work``: a faiss index of their unit text vectors
    (``anchors.faiss``), their collaborative vectors (``anchors.npy``) and what was built (``anchors.json``)."""
    from synergen_core.index import default_nlist, exact_index, ivf_index

    import faiss

    e = cfg.embeddings
    if n_known > e.fallback_max_anchors:  # the most engaged items, ties by index: the same set on a rerun
        counts = spark_partition(spark, cfg.lake.root, cfg.layout.sessions("item_vocab"), ds, ITEM_VOCAB)
        known = (known.join(counts.select(C.ITEM_INDEX, C.COUNT), C.ITEM_INDEX, "left")
                 .orderBy(F.desc_nulls_last(C.COUNT), C.ITEM_INDEX).limit(e.fallback_max_anchors))
    known.select(C.ITEM_INDEX, TEXT, VEC).orderBy(C.ITEM_INDEX).write.parquet(str(work / "anchors"))
    # at most fallback_max_anchors rows: what bounds this process's memory in the stage
    t = pq.read_table(work / "anchors").sort_by(C.ITEM_INDEX)
    text, vecs = unit_rows(vectors_matrix(t[TEXT])), vectors_matrix(t[VEC])
    info: dict = {"anchors": len(t), "items_with_vector": n_known, "index": EXACT}
    if len(t) <= e.fallback_exact_max_anchors:
        index = exact_index(text)
    else:
        nlist = default_nlist(len(t))
        index = ivf_index(text, nlist, cfg.semantic_ids.seed)
        info.update(index=IVF, nlist=nlist, nprobe=min(e.fallback_nprobe, nlist))
    faiss.write_index(index, str(work / "anchors.faiss"))
    np.save(work / "anchors.npy", vecs)
    (work / "anchors.json").write_text(json.dumps(info))
    return info


_ANCHORS: dict = {}  # work folder -> (index, vectors, mean): read once per Python worker, which Spark reuses


def _anchors(work: str):
    if work not in _ANCHORS:
        import faiss

        from synergen_core.index import CandidateIndex

        _ANCHORS.clear()  # another run's anchors: let them go
        info = json.loads((Path(work) / "anchors.json").read_text())
        index = faiss.read_index(str(Path(work) / "anchors.faiss"))
        if info["index"] == IVF:
            faiss.extract_index_ivf(index).nprobe = info["nprobe"]
        vecs = np.load(Path(work) / "anchors.npy")
        _ANCHORS[work] = (CandidateIndex(index, np.arange(len(vecs)), info["index"]), vecs, vecs.mean(0))
    return _ANCHORS[work]


def _fallback(work: str, k: int, names: list[str]):
    """The ``mapInArrow`` function: cold items' rows (``names`` + ``_text``) -> ``names`` + ``_vec``."""

    def fall_back(batches):
        index, vecs, mean = _anchors(work)
        for b in batches:
            if b.num_rows:
                v = _neighbour_mean(index, vecs, mean, vectors_matrix(b.column(TEXT)), k)
                yield pa.RecordBatch.from_arrays([b.column(n) for n in names] + [vectors_array(v)], names=[*names, VEC])

    return fall_back


# ---------------------------------------------------------------------------------------------
# the job


def run(spark: SparkSession, cfg: Config, ds: str, champion: ChampionLoader | None = None) -> dict:
    """Write ``collab/ds=D`` for the items of ``items/ds=D`` (text vectors of the same day must exist)."""
    ds = parse_ds(ds).isoformat()
    t0 = time.perf_counter()
    root, table = Path(cfg.lake.root), cfg.layout.vectors(COLLAB)
    prev_ds = cfg.layout.day_before(table, ds)  # yesterday's vectors: the state
    loader = champion or (champion_from_config if cfg.embeddings.champion_vectors is not None else None)
    champ = loader(cfg, ds) if loader is not None else None
    lake.remove_stale(root, cfg.layout.vectors(WORK))  # what a killed run left
    work = root / cfg.layout.vectors(WORK) / f"{lake.RUN}{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    staging = Staging(spark, root)
    try:
        frame, stats = _sourced(spark, cfg, ds, prev_ds, champ, work)
        stats.update(_fill_and_write(spark, cfg, ds, frame, work, staging))
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        staging.add_side_file(table, ds, META_FILE, json.dumps(stats, indent=1))
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("collab %s: %s", ds, stats)
    return stats


def _sourced(spark: SparkSession, cfg: Config, ds: str, prev_ds: str | None, champ, work: Path) -> tuple[DataFrame, dict]:
    """The day's items with their text vector (``_text``), yesterday's row (``_prev_*``) and, where one of
    the three sources has it, the collaborative vector (``_vec``) and its source (``_src``)."""
    root = cfg.lake.root
    items = spark_partition(spark, root, cfg.layout.vectors(ITEMS), ds, ITEM_EMBEDDINGS).select(
        C.ITEM_INDEX, C.ITEM_ID, F.col(C.VECTOR).alias(TEXT))
    base = items.join(_previous(spark, cfg, prev_ds), C.ITEM_ID, "left")
    stats: dict = {"ds": ds, "previous_ds": prev_ds}
    if champ is not None:
        vecs, rows = _champion_frame(spark, champ, work)
        stats.update(mode="champion", basis=f"champion:{champ.version}", champion_items=int(rows))
        first = vecs.select(F.size(VEC)).first()
        if prev_ds is not None and first is not None:
            real = F.col(P_SRC).isNotNull() & (F.col(P_SRC) != SOURCE_TEXT)
            rot, figures = _alignment(base.where(real).join(vecs, C.ITEM_ID), first[0])
            stats.update(figures)
            if rot is not None:
                vecs = _map_vectors(vecs, VEC, lambda v: v @ rot)
        found = base.join(vecs, C.ITEM_ID, "left")
        return found.withColumn(SRC, F.when(F.col(VEC).isNotNull(), F.lit(SOURCE_CHAMPION))), stats
    if prev_ds is not None:
        meta = lake.read_meta(root, cfg.layout.vectors(COLLAB), prev_ds, META_FILE)
        stats.update(mode="carried", basis=meta.get("basis") if meta else None)
        real = F.col(P_SRC).isNotNull() & (F.col(P_SRC) != SOURCE_TEXT)
        return base.withColumn(VEC, F.when(real, F.col(P_VEC))).withColumn(SRC, F.when(real, F.col(P_SRC))), stats
    t_als = time.perf_counter()
    factors = als_factors(spark, cfg, ds, work)
    stats.update(mode="als", basis=f"als:{ds}", als_items=factors.count(),
                 als_seconds=round(time.perf_counter() - t_als, 3))
    found = base.join(factors, C.ITEM_INDEX, "left")
    return found.withColumn(SRC, F.when(F.col(VEC).isNotNull(), F.lit(SOURCE_ALS))), stats


def _fill_and_write(spark: SparkSession, cfg: Config, ds: str, frame: DataFrame, work: Path, staging: Staging) -> dict:
    """The fallback for the rows of ``frame`` without a vector, the lineage, and the staged partition."""
    table = cfg.layout.vectors(COLLAB)
    n, n_known = frame.agg(F.count("*"), F.count(VEC)).first()
    keep = [C.ITEM_INDEX, C.ITEM_ID, P_VEC, P_SRC, P_DS]
    out = frame.where(F.col(VEC).isNotNull()).select(*keep, VEC, SRC)
    stats: dict = {}
    if n_known < n:
        if n_known == 0:
            raise ValueError("no item has a collaborative vector (no engagements and no champion vectors): "
                             "the fallback has nothing to average")
        stats["fallback"] = _anchor_index(spark, cfg, ds, frame.where(F.col(VEC).isNotNull()), n_known, work)
        cold = frame.where(F.col(VEC).isNull()).select(*keep, TEXT)
        schema = cold.drop(TEXT).schema.add(VEC, ArrayType(FloatType()))
        (cold.mapInArrow(_fallback(str(work), cfg.embeddings.fallback_neighbours, keep), schema)
         .write.parquet(str(work / "cold")))  # once: the sort below reads its input twice (sample, then rows)
        out = out.unionByName(spark.read.parquet(str(work / "cold")).withColumn(SRC, F.lit(SOURCE_TEXT)))
    # lineage: a vector that came out as yesterday's (carried, recomputed fallback, same champion) keeps the
    # day it was made; "as yesterday's" is numpy's isclose(yesterday, today, atol=1e-6)
    close = F.forall(F.zip_with(P_VEC, VEC, lambda a, b: F.abs(a - b) <= 1e-6 + 1e-5 * F.abs(b)), lambda x: x)
    same = (F.col(P_SRC) == F.col(SRC)) & (F.size(P_VEC) == F.size(VEC)) & close
    computed = F.when(F.coalesce(same, F.lit(False)), F.col(P_DS)).otherwise(F.lit(ds))
    staging.write_day(out.select(C.ITEM_INDEX, C.ITEM_ID, F.col(VEC).alias(C.VECTOR), F.col(SRC).alias(C.VECTOR_SOURCE),
                                 computed.alias(C.COMPUTED_DS)).orderBy(C.ITEM_INDEX), table, ds)
    written = spark.read.parquet(str(staging.staged(table, ds)))
    by_source = written.groupBy(C.VECTOR_SOURCE).agg(  # one row per source: three at most
        F.count("*").alias("rows"), F.sum((F.col(C.COMPUTED_DS) == ds).cast("int")).alias("today"),
        F.max(F.size(C.VECTOR)).alias("dim")).collect()
    counts = {s: 0 for s in (SOURCE_ALS, SOURCE_CHAMPION, SOURCE_TEXT)}
    counts.update({r[C.VECTOR_SOURCE]: int(r["rows"]) for r in by_source})
    dims = {int(r["dim"]) for r in by_source}
    return {**stats, "rows": int(n), "dim": dims.pop() if len(dims) == 1 else sorted(dims),
            "sources": counts, "computed_today": int(sum(r["today"] for r in by_source))}
