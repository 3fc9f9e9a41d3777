"""The scoring stage: per-user candidate lists for recommendation and personalized search, to Parquet.

``run`` (DAG task ``score``, tracked by ``jobs.stages``) builds the day's requests on Spark, scores them in
Spark's Python workers with ``synergen_core.serving.Scorer`` and writes the lists to
``<lake>/<score.output>/_staging/ds=D/surface=rec|search/`` with ``_score.json`` (a rerun replaces them).
``jobs.candidates`` validates the staged lists (task ``validate_candidates``) and publishes them (task
``publish``), so readers never see lists that were not validated.

The model is ``score.model``: a registry reference (``models:/synergen@champion``, resolved by
``synergen_core.registry.download_model``) or a ``model.pt`` file or its folder; ``model_dir=`` overrides it.
Items added after the model's training cannot be scored and are not in its catalog; tokens of such items
are dropped from histories. Queries it has not seen are embedded with ``text_encoder`` (the model's text
space) and appended to its query table; an ID-only model cannot read them, so their requests are dropped
and counted.

Requests (the sessionized tables of ds):

* ``rec``: every user of the ``sequences`` snapshot with an event in the ``score.lookback_days`` days up to
  ds (all users when null). The history is the user's latest tokens up to the last engaged item (a
  recommendation state; trailing queries that engaged nothing are left out); users without an engaged
  item get no list.
* ``search``: the distinct (user, query) pairs of the search events of ds, or the Parquet of
  ``score.requests_path`` (``user_id``, ``query``); the user's latest tokens, then the query token. A user
  without history is scored on the query alone.

Both are scored at the end of ds (the lists serve the next day). Retrieval, by ``score.retriever``:
``dense`` searches the candidate index (``synergen_core.index``: exact up to ``score.exact_max_items``
items, else IVF, IVF-PQ from ``score.pq_min_items``, whose recall is measured on real request vectors)
with the model's request vector;
``generative`` decodes semantic IDs with trie-constrained beam search (``SynerGen.generate``). The
``score.retrieve_n`` best items not consumed (where excluded) are re-scored by the ranking head, for the
tasks whose lists it orders (``score.order``; default: the choice recorded with the model on validation,
``synergen_core.list_order``; the others keep the retrieval order), and the ``score.top_k`` best kept.
Consumed = every item of the user's ``events`` history up to ds, read from the ``consumed`` snapshot of ds.

Inference runs in Spark (``mapInArrow``) from a serving payload (``_broadcast``): the driver turns the model
into a ``checkpoint.serving_record`` (item and query content vectors precomputed into two tables; no ID
tables, text buffers or, for dense retrieval, semantic IDs), writes the tables and the candidate index as
files under ``<lake>/<score.output>/_payload/`` that the workers memory-map, and broadcasts only the rest
of the weights (encoder and heads: catalog-independent). ``_score.json``'s ``payload`` counts the bytes.
With ``score.task_cpus`` a scoring task takes that many CPUs (Spark stage-level scheduling, on cluster
masters), so an executor runs fewer Python workers, each with ``score.threads`` threads; ``_score.json``'s
``task_cpus`` counts the tasks by the CPUs they had.
A worker builds its scorer once (``_scorer``), and every Arrow batch is scored in vectorized chunks of
``score.batch_size`` requests (torch and numpy; no per-request Python loop). Requests are hash-partitioned
by user into a fixed number of partitions and sorted within them, so the chunks, and so the floats, are
the same on any master: a rerun and a cluster run give the same lists.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.accumulators import AccumulatorParam
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import candidates
from jobs.spark import read_days, spark_partition
from schemas import C
from schemas.candidates import CANDIDATES, SURFACE_REC, SURFACE_SEARCH
from schemas.sequences import CONSUMED, EVENTS, ITEM_VOCAB, KIND_SEARCH, QUERY_VOCAB, SEQUENCES
from synergen_core import checkpoint, lake
from synergen_core.config import Config, ConfigError, parse_ds
from synergen_core.errors import PipelineError
from synergen_core.serving import CONSUMED_COLUMN, QUERY_INDEX_COLUMN, Scorer, Settings, build_scorer, end_of_day

log = logging.getLogger(__name__)

# private column of the requests DataFrame: the length of its consumed list. Requests are sorted on it, so
# that a chunk's over-fetch (its longest consumed list) is close to what each of its rows needs.
N_CONSUMED = "_n_consumed"
SCORED_SCHEMA = (f"{C.SURFACE} string, {C.USER_ID} string, {C.QUERY} string, {C.RANK} int, "
                 f"{C.ITEM_INDEX} int, {C.RETRIEVAL_SCORE} float, {C.RANKING_SCORE} float")


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class ModelRef:
    path: Path  # the model.pt file
    name: str
    version: str


def resolve_model(cfg: Config, model_dir: str | Path | None = None) -> ModelRef:
    """``model_dir``, else ``score.model``: a registry reference or a model file / folder."""
    ref = str(model_dir) if model_dir is not None else cfg.score.model
    if model_dir is None and ref.startswith("models:/"):
        from synergen_core.registry import download_model

        path, name, version = download_model(cfg, ref)
        return ModelRef(_model_file(Path(path), ref), name, str(version))
    path = _model_file(Path(ref), ref)
    return ModelRef(path, "synergen", f"path:{path.resolve()}")


def _model_file(p: Path, ref: str) -> Path:
    f = p / checkpoint.MODEL if p.is_dir() else p
    if not f.is_file():
        raise PipelineError(f"{f}: no model file (model reference {ref!r}); `synergen train --ds D` writes "
                            f"<lake>/<train.output>/ds=D/<protocol>/<variant>/{checkpoint.MODEL}")
    return f


def with_queries(record: dict, vectors: np.ndarray) -> dict:
    """The model record with ``vectors`` [m, d_text] appended to its query text table (or, for a serving
    record, their content vectors to its query table): new queries get indices n_queries .. n_queries +
    m - 1 (a text model reads a query through its text vector only)."""
    if len(vectors) == 0:
        return record
    import torch

    sd = dict(record["state_dict"])
    width = sd["embed.text_proj.weight"].shape[1]
    if vectors.shape[1] != width:
        raise ValueError(f"query vectors of width {vectors.shape[1]} for a model whose text is {width}-d: "
                         "text_encoder must be the encoder the model was trained with")
    new = torch.from_numpy(vectors.astype(np.float32))
    key = "embed.query_table" if "embed.query_table" in sd else "embed.query_text"
    if key == "embed.query_table":  # a serving record: the queries' content, as the model computes it
        new = torch.nn.functional.linear(new, sd["embed.text_proj.weight"], sd["embed.text_proj.bias"])
    sd[key] = torch.cat([sd[key], new])
    return {**record, "state_dict": sd, "dims": {**record["dims"], "n_queries": int(sd[key].shape[0])}}


def reads_text(record: dict) -> bool:
    sd = record["state_dict"]
    return bool(record["model_config"]["use_text_emb"]) and any(sd.get(k) is not None for k in
                                                                 ("embed.query_text", "embed.query_table"))


# ---------------------------------------------------------------------------------------------
# scoring on Spark's Python workers (``synergen_core.serving.Scorer``)


_WORKER: dict = {}  # run key -> Scorer: built once per Python worker (Spark reuses workers between tasks)


def _scorer(payload) -> Scorer:
    value = payload.value  # unpickled once per worker by PySpark
    if value["key"] not in _WORKER:
        _WORKER.clear()  # a new run's broadcast: let the last model go
        _WORKER[value["key"]] = build_scorer(value)
    return _WORKER[value["key"]]


def _score_partition(payload, task_cpus=None):
    """The ``mapInArrow`` function: request batches -> scored rows, with a progress bar per task.
    ``task_cpus``: an accumulator of the CPUs each task was given ({cpus: tasks})."""

    def score(batches):
        from pyspark import TaskContext
        from tqdm import tqdm

        scorer = _scorer(payload)
        ctx = TaskContext.get()
        if task_cpus is not None and ctx is not None:
            task_cpus.add({ctx.cpus(): 1})
        with tqdm(desc=f"score partition {ctx.partitionId() if ctx else 0}", unit=" requests", mininterval=5,
                  disable=not scorer.settings.progress) as bar:
            for b in batches:
                yield scorer.score(b)
                bar.update(b.num_rows)

    return score


# ---------------------------------------------------------------------------------------------
# requests (Spark)


def require_inputs(cfg: Config, ds: str) -> None:
    """The sessionized partitions of ``ds`` scoring reads are published, else a ``PipelineError`` naming the
    missing one and the command that writes it (Spark's own error would be a bare path)."""
    tables = (["sequences"] + (["query_vocab"] if SURFACE_SEARCH in cfg.score.surfaces else [])
              + (["consumed"] if _excluded(cfg) else []))
    for table in tables:
        part = cfg.layout.part(cfg.layout.sessions(table), ds)
        if not (part / lake.SUCCESS).is_file():
            raise PipelineError(f"{part}: no published partition of {table} for ds={ds} "
                                f"(`synergen sessionize --ds {ds}` writes it)")


def rec_requests(cfg: Config, ds: str, seqs: DataFrame) -> DataFrame:
    """Users active in the look-back window (all with ``lookback_days`` null), query null."""
    if cfg.score.lookback_days is not None:
        since = parse_ds(ds) + dt.timedelta(days=1 - cfg.score.lookback_days)
        seqs = seqs.where(F.col(C.WATERMARK) >= F.to_timestamp(F.lit(since.isoformat())))
    return seqs.select(F.lit(SURFACE_REC).alias(C.SURFACE), C.USER_ID, F.lit(None).cast("string").alias(C.QUERY),
                       F.lit(None).cast("int").alias(QUERY_INDEX_COLUMN), C.TOKENS)


def search_pairs(spark: SparkSession, cfg: Config, ds: str, queries: DataFrame) -> DataFrame:
    """Distinct (user_id, query, query_index) to score: the search events of ds, or ``score.requests_path``
    (queries normalized as in the vocabulary; query_index null for a query the vocabulary lacks)."""
    from jobs.sessionize import normalize_query

    if cfg.score.requests_path is not None:
        given = spark.read.parquet(str(cfg.score.requests_path))
        missing = {C.USER_ID, C.QUERY} - set(given.columns)
        if missing:
            raise ValueError(f"{cfg.score.requests_path}: score.requests_path needs columns {sorted(missing)}")
        pairs = given.select(F.col(C.USER_ID).cast("string").alias(C.USER_ID),
                             normalize_query(F.col(C.QUERY).cast("string")).alias(C.QUERY))
        pairs = pairs.where(F.col(C.USER_ID).isNotNull() & (F.length(C.QUERY) > 0)).distinct()
        return pairs.join(queries.select(C.QUERY, C.QUERY_INDEX), C.QUERY, "left")
    events = read_days(spark, cfg.lake.root, cfg.layout.sessions("events"), EVENTS, after=lake.previous_day(ds), upto=ds)
    pairs = (events.where((F.col(C.KIND) == KIND_SEARCH) & F.col(C.QUERY_INDEX).isNotNull())
             .select(C.USER_ID, C.QUERY_INDEX).distinct())
    return pairs.join(queries.select(C.QUERY_INDEX, C.QUERY), C.QUERY_INDEX)


def consumed_items(spark: SparkSession, cfg: Config, ds: str, n_items: int) -> DataFrame:
    """(user_id, _consumed array<int>, _n_consumed): the catalog items of each user's history up to ds,
    from the ``consumed`` snapshot of ds (kept by sessionize: no history is read); users with none left out."""
    snap = spark_partition(spark, cfg.lake.root, cfg.layout.sessions("consumed"), ds, CONSUMED)
    # The snapshot is sorted and distinct; the model's catalog may be older than it.
    kept = F.filter(C.CONSUMED, lambda i: i.between(1, n_items - 1))
    return (snap.select(C.USER_ID, kept.alias(CONSUMED_COLUMN)).where(F.size(CONSUMED_COLUMN) > 0)
            .select(C.USER_ID, CONSUMED_COLUMN, F.size(CONSUMED_COLUMN).alias(N_CONSUMED)))


def _excluded(cfg: Config) -> list[str]:
    """The scored surfaces whose lists leave consumed items out."""
    sc = cfg.score
    return [s for s, on in ((SURFACE_REC, sc.exclude_consumed), (SURFACE_SEARCH, sc.exclude_consumed_search))
            if on and s in sc.surfaces]


@dataclass
class Prepared:
    requests: DataFrame  # one row per request, the mapInArrow input
    record: dict  # the model record, with today's new queries appended when it reads text
    n_queries: int  # query indices the model reads
    dropped: dict  # requests left out, by reason


def prepare(spark: SparkSession, cfg: Config, ds: str, record: dict) -> Prepared:
    """The requests of every surface in ``score.surfaces``, with histories and consumed items."""
    root, sc = cfg.lake.root, cfg.score
    n_items, n_queries = record["dims"]["n_items"], record["dims"]["n_queries"]
    seqs = spark_partition(spark, root, cfg.layout.sessions("sequences"), ds, SEQUENCES)
    parts, dropped = [], {}
    if SURFACE_REC in sc.surfaces:
        parts.append(rec_requests(cfg, ds, seqs))
    if SURFACE_SEARCH in sc.surfaces:
        queries = spark_partition(spark, root, cfg.layout.sessions("query_vocab"), ds, QUERY_VOCAB)
        pairs = search_pairs(spark, cfg, ds, queries)
        record, n_queries, pairs, dropped = _query_indices(cfg, ds, record, pairs)
        parts.append(pairs.join(seqs.select(C.USER_ID, C.TOKENS), C.USER_ID, "left").select(
            F.lit(SURFACE_SEARCH).alias(C.SURFACE), C.USER_ID, C.QUERY,
            F.col(C.QUERY_INDEX).cast("int").alias(QUERY_INDEX_COLUMN), C.TOKENS))
    if not parts:
        raise ConfigError("score.surfaces is empty: nothing to score")
    reqs = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
    excluded = _excluded(cfg)
    if excluded:
        cons = consumed_items(spark, cfg, ds, n_items)
        reqs = reqs.join(cons, C.USER_ID, "left")
        on = F.col(C.SURFACE).isin(excluded) & F.col(CONSUMED_COLUMN).isNotNull()
        reqs = reqs.select(*[c for c in reqs.columns if c not in (CONSUMED_COLUMN, N_CONSUMED)],
                           F.when(on, F.col(CONSUMED_COLUMN)).otherwise(F.array().cast("array<int>"))
                           .alias(CONSUMED_COLUMN),
                           F.when(on, F.col(N_CONSUMED)).otherwise(0).alias(N_CONSUMED))
    else:
        reqs = reqs.select("*", F.array().cast("array<int>").alias(CONSUMED_COLUMN), F.lit(0).alias(N_CONSUMED))
    # A fixed partitioning by user and a fixed order within: the same chunks (and floats) on any master.
    n_parts = sc.partitions or spark.sparkContext.defaultParallelism
    reqs = reqs.repartition(n_parts, C.USER_ID).sortWithinPartitions(N_CONSUMED, C.SURFACE, C.USER_ID, C.QUERY)
    return Prepared(reqs, record, n_queries, dropped)


def _query_indices(cfg: Config, ds: str, record: dict, pairs: DataFrame):
    """Search pairs with the query index the model reads: a text model gets text vectors for the queries it
    has not seen (vocabulary queries after its training, then new request queries, in sorted order); an
    ID-only model cannot read them and their requests are dropped. -> (record, n_queries, pairs, dropped)."""
    n_model = record["dims"]["n_queries"]
    if not reads_text(record):
        known = F.col(C.QUERY_INDEX).isNotNull() & (F.col(C.QUERY_INDEX) < n_model)
        n_unknown = pairs.where(~known).count()
        return record, n_model, pairs.where(known), {"search_unknown_query": n_unknown} if n_unknown else {}
    spark = pairs.sparkSession
    vocab = spark_partition(spark, cfg.lake.root, cfg.layout.sessions("query_vocab"), ds, QUERY_VOCAB)
    # Collected: the queries the vocabulary gained since the model's training (the model has the older
    # ones' vectors) and the day's requests' queries it lacks, bounded by days since training, not by history.
    later = vocab.where(F.col(C.QUERY_INDEX) >= n_model).select(C.QUERY_INDEX, C.QUERY).collect()
    n_vocab = max([n_model] + [r[C.QUERY_INDEX] + 1 for r in later])
    fresh = sorted(r[C.QUERY] for r in pairs.where(F.col(C.QUERY_INDEX).isNull()).select(C.QUERY).distinct().collect())
    texts = [""] * (n_vocab - n_model) + fresh  # indices n_model .. n_vocab - 1, then the fresh ones
    for r in later:
        texts[r[C.QUERY_INDEX] - n_model] = r[C.QUERY] or ""
    if texts:
        from synergen_core.text_encoder import load_text_encoder

        record = with_queries(record, load_text_encoder(cfg.text_encoder).encode(texts))
    if fresh:
        new = spark.createDataFrame([(q, n_vocab + j) for j, q in enumerate(fresh)], f"{C.QUERY} string, _new int")
        pairs = pairs.join(F.broadcast(new), C.QUERY, "left").select(
            C.USER_ID, C.QUERY, F.coalesce(C.QUERY_INDEX, "_new").alias(C.QUERY_INDEX))
    return record, n_model + len(texts), pairs, {}


# ---------------------------------------------------------------------------------------------
# the job


def _settings(cfg: Config, ds: str, n_queries: int, record: dict) -> Settings:
    from synergen_core.list_order import served_orders

    sc = cfg.score
    if sc.retrieve_n < sc.top_k:
        raise ConfigError(f"score.retrieve_n ({sc.retrieve_n}) must be >= score.top_k ({sc.top_k})")
    return Settings(sc.top_k, sc.retrieve_n, sc.retriever, sc.batch_size, end_of_day(ds), n_queries, sc.threads,
                    sc.progress, sc.precision, served_orders(record, sc.order))


def build_index(scorer: Scorer, cfg: Config, sample: pa.Table):
    """The candidate index over the model's catalog (items 1 .. n_items - 1), measured on ``sample`` requests."""
    import torch

    from synergen_core import index

    model, sc = scorer.model, cfg.score
    ids = np.arange(1, model.n_items)
    with torch.no_grad():
        vecs = np.concatenate([model.item_vectors(torch.from_numpy(ids[i:i + 65536])).float().numpy()
                               for i in range(0, len(ids), 65536)]) if len(ids) else np.zeros((0, model.cfg.d_model))
        q = None
        if len(ids) > sc.exact_max_items and sample.num_rows:
            req, _ = scorer.requests(sample.combine_chunks().to_batches()[0])
            q = np.concatenate([scorer.request_vectors(req, np.arange(i, min(i + sc.batch_size, len(req))))
                                for i in range(0, len(req), sc.batch_size)]) if len(req) else None
    return index.build(vecs, ids, q, sc.retrieve_n, sc.exact_max_items, sc.min_ann_recall, sc.ann_nlist, sc.seed,
                       sc.pq_min_items, sc.pq_refine)


def run(spark: SparkSession, cfg: Config, ds: str, model_dir: str | Path | None = None) -> dict:
    """Score every request of ``ds`` into the staging partition (see the module doc). Returns the run's
    figures (also ``_score.json``): requests, lists and rows per surface, the index choice, timings."""
    ds = parse_ds(ds).isoformat()
    t0 = time.perf_counter()
    ref = resolve_model(cfg, model_dir)
    record = checkpoint.load(ref.path)
    n_model_queries = record["dims"]["n_queries"]
    require_inputs(cfg, ds)
    prep = prepare(spark, cfg, ds, record)
    settings = _settings(cfg, ds, prep.n_queries, record)
    # what the workers need: content tables instead of ID tables, text buffers and code embeddings
    serving = checkpoint.serving_record(prep.record, semantic_ids=cfg.score.retriever == "generative")
    del record, prep.record  # catalog-sized: the serving record replaces them
    reqs = prep.requests.cache()  # read by the recall sample, the scoring and the counts
    try:
        t1 = time.perf_counter()
        cand_index = _candidate_index(cfg, reqs, serving, settings)
        index_s = time.perf_counter() - t1
        figures = {
            "ds": ds, "model": {"name": ref.name, "version": ref.version, "path": str(ref.path)},
            "retriever": cfg.score.retriever, "top_k": cfg.score.top_k, "retrieve_n": cfg.score.retrieve_n,
            "exclude_consumed": {SURFACE_REC: cfg.score.exclude_consumed,
                                 SURFACE_SEARCH: cfg.score.exclude_consumed_search},
            "catalog_items": int(serving["dims"]["n_items"] - 1), "n_items": int(serving["dims"]["n_items"]),
            "queries_added": prep.n_queries - n_model_queries, "request_ts": settings.request_ts,
            "index": cand_index.report if cand_index is not None else {"kind": "generative"},
            "dropped": prep.dropped, "list_order": {"setting": cfg.score.order, **settings.list_order},
        }
        payload, payload_dir = _broadcast(spark, cfg, ds, serving, cand_index, settings, str(ref.path))
        figures["payload"] = _payload_bytes(payload, payload_dir)
        try:
            t2 = time.perf_counter()

            task_cpus = spark.sparkContext.accumulator({}, _CountsParam())  # {CPUs a scoring task had: tasks}

            def finish(counts: dict) -> dict:  # the figures, once the lists are written (before the rename)
                figures["task_cpus"] = {str(k): n for k, n in sorted(task_cpus.value.items())}
                requests = {r[C.SURFACE]: r["count"] for r in reqs.groupBy(C.SURFACE).count().collect()}
                figures["surfaces"] = {s: {"requests": requests.get(s, 0), **counts.get(s, {"lists": 0, "rows": 0})}
                                       for s in cfg.score.surfaces}
                figures["users"] = counts["users"]
                total = time.perf_counter() - t0
                figures["seconds"] = {"index": round(index_s, 3), "score_and_write": round(time.perf_counter() - t2, 3),
                                      "total": round(total, 3)}
                figures["users_per_s"] = round(counts["users"] / total, 1)
                return figures

            candidates.write_staged(cfg, ds, _lists(spark, cfg, ds, reqs, payload, ref, task_cpus), finish)
        finally:
            payload.destroy()
            shutil.rmtree(payload_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the table's folder too, unless another day's run is using it
                payload_dir.parent.rmdir()
    finally:
        reqs.unpersist()
    log.info("score %s: %s", ds, figures["surfaces"])
    return figures


def _candidate_index(cfg: Config, reqs: DataFrame, record: dict, settings: Settings):
    """The dense retriever's index (None for the generative one), measured on real requests when approximate."""
    if cfg.score.retriever != "dense":
        return None
    scorer = Scorer(checkpoint.build_from_record(record), None, settings)
    big = scorer.model.n_items - 1 > cfg.score.exact_max_items
    # ann_sample requests (configured) for the recall measurement
    sample = (reqs.orderBy(F.xxhash64(C.SURFACE, C.USER_ID, C.QUERY)).limit(cfg.score.ann_sample).toArrow()
              if big else pa.table({}))
    cand_index = build_index(scorer, cfg, sample)
    log.info("candidate index: %s", cand_index.report.get("why"))
    return cand_index


def _broadcast(spark: SparkSession, cfg: Config, ds: str, record: dict, cand_index, settings: Settings, source: str):
    """What every Python worker builds its ``Scorer`` from (``_scorer``): the serving record's content
    tables and the index as files in the lake, memory-mapped by the workers (one copy in each machine's
    page cache, not one per worker), and a broadcast of the rest: the encoder's and heads' weights
    (catalog-independent), settings and the files' paths (``serving.write_payload``). The record is plain
    tensors (``checkpoint.to_bytes``) and the workers read it weights-only. -> (broadcast, payload folder:
    remove it when the lists are written; a killed run's is removed by the next run of the stage)."""
    from synergen_core.serving import write_payload

    table = cfg.layout.scoring_payload_table
    lake.remove_stale(cfg.lake.root, table)
    folder = lake.staging_dir(cfg.layout.part(table, ds))
    value = write_payload(record, cand_index, settings, folder, source)
    return spark.sparkContext.broadcast({"key": uuid.uuid4().hex, **value}), folder


def _payload_bytes(payload, folder: Path) -> dict:
    """What the executors receive: the broadcast's bytes and the files they map (all of them counted, as if
    every page were read)."""
    files = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    broadcast = len(payload.value["record"])
    return {"broadcast_bytes": broadcast, "file_bytes": files, "total_bytes": broadcast + files}


class _CountsParam(AccumulatorParam):
    """Accumulates {key: count} dicts."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, a: dict, b: dict) -> dict:
        for k, n in b.items():
            a[k] = a.get(k, 0) + n
        return a


def task_profile(spark: SparkSession, cfg: Config):
    """The scoring stage's ``ResourceProfile``: ``score.task_cpus`` CPUs a task, or None (Spark's default:
    ``spark.task.cpus``) when unset or on a local master, where Spark has no stage-level scheduling."""
    n = cfg.score.task_cpus
    if n is None:
        return None
    if spark.sparkContext.master.startswith("local"):
        log.info("score.task_cpus %d ignored on a local master (tasks take spark.task.cpus)", n)
        return None
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    return ResourceProfileBuilder().require(TaskResourceRequests().cpus(n)).build


def _lists(spark: SparkSession, cfg: Config, ds: str, reqs: DataFrame, payload, ref: ModelRef,
           task_cpus=None) -> DataFrame:
    """The scored rows with item ids and the model's name and version (contract columns + surface);
    ``task_cpus``: ``_score_partition``'s accumulator."""
    scored = reqs.mapInArrow(_score_partition(payload, task_cpus), SCORED_SCHEMA, profile=task_profile(spark, cfg))
    vocab = spark_partition(spark, cfg.lake.root, cfg.layout.sessions("item_vocab"), ds, ITEM_VOCAB)
    out = scored.join(vocab.select(C.ITEM_INDEX, C.ITEM_ID), C.ITEM_INDEX).select(
        *[F.lit(ref.name).alias(c) if c == C.MODEL_NAME else F.lit(ref.version).alias(c) if c == C.MODEL_VERSION
          else F.col(c) for c in CANDIDATES.names], C.SURFACE)
    return out.sortWithinPartitions(C.SURFACE, C.USER_ID, C.QUERY, C.RANK)
