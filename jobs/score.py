"""The scoring stage: per-user candidate lists for recommendation and personalized search, to Parquet.

Three steps, three DAG tasks, so readers never see lists that were not validated:

* ``run`` / ``stage`` (``score``): score every request, write the lists to
  ``<lake>/<score.output>/_staging/ds=D/surface=rec|search/`` with ``_score.json`` (a rerun replaces it);
* ``validate_candidates`` (``validate_candidates``): the Great Expectations suite of
  ``schemas.candidates`` on the staged lists; ``_validation.json`` / ``_validation.ge.json`` beside them;
  raises ``CandidatesInvalid`` naming the partition, the failed checks and example rows;
* ``publish`` (``publish``): a validated day is renamed into ``<lake>/<score.output>/ds=D`` (``_SUCCESS``
  inside, the previous version of the day replaced).

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
items, else IVF whose recall is measured on real request vectors) with the model's request vector;
``generative`` decodes semantic IDs with trie-constrained beam search (``SynerGen.generate``). The
``score.retrieve_n`` best items not consumed (where excluded) are re-scored by the ranking head and the
``score.top_k`` best kept. Consumed = every item of the user's ``events`` history up to ds.

Inference runs in Spark (``mapInArrow``): the model record and the serialized index are broadcast, built
once per Python worker (``_scorer``), and every Arrow batch is scored in vectorized chunks of
``score.batch_size`` requests (torch and numpy; no per-request Python loop). Requests are hash-partitioned
by user into a fixed number of partitions and sorted within them, so the chunks, and so the floats, are
the same on any master: a rerun and a cluster run give the same lists.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs.text_vectors import spark_partition
from jobs.spark import read_days, session, spark_schema
from schemas import C
from schemas import candidates as K
from schemas import sequences as S
from synergen_core import checkpoint, lake
from synergen_core.config import Config, ConfigError, parse_ds
from synergen_core.errors import PipelineError

log = logging.getLogger(__name__)

STAGING = "_staging"
SCORE_FILE, VALIDATION_FILE, GE_FILE = "_score.json", "_validation.json", "_validation.ge.json"
EXAMPLES = 5  # example rows per failed check in reports and errors
# private columns of the requests DataFrame
QIDX, CONSUMED, N_CONSUMED = "_query_index", "_consumed", "_n_consumed"
SCORED_SCHEMA = (f"{C.SURFACE} string, {C.USER_ID} string, {C.QUERY} string, {C.RANK} int, "
                 f"{C.ITEM_INDEX} int, {C.RETRIEVAL_SCORE} float, {C.RANKING_SCORE} float")


class CandidatesInvalid(RuntimeError):
    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


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
    """The model record with ``vectors`` [m, d_text] appended to its query text table: new queries get
    indices n_queries .. n_queries + m - 1 (a text model reads a query through its text vector only)."""
    if len(vectors) == 0:
        return record
    sd = dict(record["state_dict"])
    old = sd["embed.query_text"]
    if vectors.shape[1] != old.shape[1]:
        raise ValueError(f"query vectors of width {vectors.shape[1]} for a model whose text is {old.shape[1]}-d: "
                         "text_encoder must be the encoder the model was trained with")
    import torch

    sd["embed.query_text"] = torch.cat([old, torch.from_numpy(vectors.astype(np.float32))])
    return {**record, "state_dict": sd, "dims": {**record["dims"], "n_queries": int(sd["embed.query_text"].shape[0])}}


def reads_text(record: dict) -> bool:
    return bool(record["model_config"]["use_text_emb"]) and record["state_dict"].get("embed.query_text") is not None


# ---------------------------------------------------------------------------------------------
# scoring a batch of requests (executors; the driver for the recall sample)


@dataclass(frozen=True)
class Settings:
    top_k: int
    retrieve_n: int
    retriever: str  # "dense" or "generative"
    batch_size: int
    request_ts: float  # epoch seconds: the end of ds (the lists serve the next day)
    n_queries: int  # query indices the model reads (its own plus those appended for today's requests)
    threads: int
    progress: bool
    precision: str = "float32"  # score.precision


def end_of_day(ds: str) -> float:
    d = parse_ds(ds) + dt.timedelta(days=1)
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp()


class Scorer:
    """A model (eval mode, CPU) and its candidate index scoring Arrow batches of requests.

    Input batch columns: ``surface``, ``user_id``, ``query``, ``_query_index``, ``tokens``
    (``schemas.sequences.TOKENS_TYPE``, null = no history), ``_consumed`` (list<int> items to exclude).
    Output (``score``): ``SCORED_SCHEMA``, one row per kept candidate.
    """

    def __init__(self, model, index, settings: Settings):
        self.model, self.index, self.s = model.eval(), index, settings
        self.L = model.cfg.max_seq_len
        self.rank_head = model.cfg.w_ranking > 0  # a variant trained without it ranks by retrieval

    def requests(self, batch: pa.RecordBatch):
        """-> (``synergen_core.data.Requests`` of the rows that have a history, their row numbers)."""
        from synergen_core.data import HISTORY_KEYS, SURFACES, Requests, pad_left, tokens_from_arrow
        from synergen_core.embeddings import TokenType
        from synergen_core.model import RECOMMEND, SEARCH

        tok = _known_tokens(tokens_from_arrow(batch.column(C.TOKENS)), self.model.n_items, self.s.n_queries)
        L = self.L
        search = np.asarray(pc.equal(batch.column(C.SURFACE), K.SURFACE_SEARCH).to_numpy(zero_copy_only=False))
        qidx = pc.fill_null(batch.column(QIDX), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = tok.offsets[:-1]
        end = np.where(search, tok.offsets[1:], _after_last_item(tok))  # [R] exclusive token offset
        n = np.minimum(end - starts, L - search)  # a search row keeps a column for its query
        hist = {k: pad_left(getattr(tok, k), end - n, n, L) for k in HISTORY_KEYS}
        rows = np.nonzero(search)[0]
        if len(rows):  # the query token goes last: shift the (padded) history left by one column
            last_pos = np.where(n[rows] > 0, hist["position"][rows, -1] + 1, 0)
            for k in HISTORY_KEYS:
                hist[k][rows] = np.roll(hist[k][rows], -1, axis=1)
            query_token = {"token_type": int(TokenType.QUERY), "item_idx": 0, "query_idx": qidx[rows], "action": 0,
                           "surface": SURFACES.index(S.SURFACE_SEARCH) + 1, "position": last_pos,
                           "ts": self.s.request_ts}
            for k, v in query_token.items():
                hist[k][rows, -1] = v
        lengths = n + search
        keep = np.nonzero(lengths > 0)[0]
        req = Requests({k: v[keep] for k, v in hist.items()}, np.zeros(len(keep), np.int64),
                       np.where(search, SEARCH, RECOMMEND)[keep], np.where(search, qidx, 0)[keep],
                       np.full(len(keep), self.s.request_ts), lengths[keep])
        return req, keep

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        import torch

        req, kept = self.requests(batch)
        parts = []
        with torch.no_grad(), self.autocast():
            for lo in range(0, len(kept), self.s.batch_size):
                chunk = np.arange(lo, min(lo + self.s.batch_size, len(kept)))
                parts.append(self._score_chunk(req, chunk, batch.column(CONSUMED).take(pa.array(kept[chunk]))))
        return _output(batch, kept, parts)

    def states(self, req, chunk: np.ndarray):
        """-> (hidden states [r, d] at each request's last token, the history cache for ``_rank``)."""
        import torch

        from synergen_core.data import to_batch

        b = to_batch(req.history, chunk, req.lengths, torch.device("cpu"))
        b["request_ts"] = torch.from_numpy(req.ts[chunk])
        hidden, cache = self.model.encode(b)
        return self.model.last_hidden(b, hidden), cache

    def request_vectors(self, req, chunk: np.ndarray) -> np.ndarray:
        """[r, d] unit vectors the dense retriever searches with."""
        import torch

        with torch.no_grad(), self.autocast():
            return self.model.retrieval.query(self.states(req, chunk)[0], self._search(req, chunk)).float().numpy()

    def _search(self, req, chunk: np.ndarray):
        """[r] bool tensor: which requests of the chunk are searches (their own query tower, if any)."""
        import torch

        from synergen_core.model import SEARCH

        return torch.from_numpy(req.task[chunk] == SEARCH)

    def autocast(self):
        """The model's passes in ``score.precision``: bfloat16 autocast, or a no-op for float32."""
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.s.precision == "bfloat16")

    def _score_chunk(self, req, chunk: np.ndarray, consumed: pa.ListArray) -> tuple:
        """-> (chunk rows, items [r, K], retrieval [r, K], ranking [r, K], valid [r, K])."""
        h, cache = self.states(req, chunk)
        extra = int(pc.max(pc.list_value_length(consumed)).as_py() or 0)  # over-fetch what exclusion removes
        if self.s.retriever == "generative":
            items, retr = self._generate(h, req.task[chunk], self.s.retrieve_n + extra)
        else:
            search = self._search(req, chunk)
            q = self.model.retrieval.query(h, search).float().numpy()
            scores, items = self.index.search(q, self.s.retrieve_n + extra)
            temperature = self.model.temperature(search).detach().float().numpy()  # [] or [r, 1]
            retr = scores / temperature  # the model's retrieval logit
        cand, retr, valid = _first_valid(items, retr, _consumed_mask(items, consumed, self.model.n_items),
                                         self.s.retrieve_n)
        ranking = self._rank(cache, cand) if self.rank_head else retr.copy()
        ranking[~valid] = -np.inf
        order = np.argsort(-ranking, axis=1, kind="stable")[:, : self.s.top_k]  # ties keep the retrieval order
        take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
        return chunk, take(cand), take(retr), take(ranking), take(valid)

    def _generate(self, h, task: np.ndarray, beam: int) -> tuple[np.ndarray, np.ndarray]:
        """Beam search per semantic-ID view -> (items [r, w], log-probabilities [r, w]; 0 / -inf when missing)."""
        from synergen_core.model import SEARCH

        if self.model.semantic is None:
            raise ConfigError("score.retriever=generative needs a model with a semantic-ID head (model.semantic_head)")
        width = min(beam, max(len(t) for t in self.model.tries.values()))
        items = np.zeros((len(task), width), np.int64)
        scores = np.full((len(task), width), -np.inf, np.float32)
        view_of_row = np.where(task == SEARCH, self.model.view_of("search"), "rec")  # [r]
        for view in np.unique(view_of_row):
            rows = np.nonzero(view_of_row == view)[0]
            res = self.model.generate(h[rows], min(width, len(self.model.tries[view])), str(view))
            w = res.items.shape[1]
            items[rows, :w], scores[rows, :w] = res.items.numpy(), res.scores.float().numpy()
        return items, scores

    def _rank(self, cache: dict, cand: np.ndarray) -> np.ndarray:
        """[r, N] ranking-head logits of the candidates after each request's (cached) history."""
        import torch

        return self.model.rank_cached(cache, torch.from_numpy(cand)).float().numpy()


def _known_tokens(tok, n_items: int, n_queries: int):
    """``tok`` without the tokens of items and queries the model has no row for (added after its training)."""
    from synergen_core.embeddings import TokenType

    ok = (((tok.token_type != TokenType.ITEM) | (tok.item_idx < n_items))
          & ((tok.token_type != TokenType.QUERY) | (tok.query_idx < n_queries)))
    return tok if ok.all() else tok.keep(ok)


def _after_last_item(tok) -> np.ndarray:
    """[R] offset just after each row's last item token (the row's start when it has none)."""
    from synergen_core.embeddings import TokenType

    items = np.nonzero(tok.token_type == TokenType.ITEM)[0]  # ascending
    k = np.searchsorted(items, tok.offsets[1:]) - 1  # the last item token before each row's end
    found = (k >= 0) & (items[np.maximum(k, 0)] >= tok.offsets[:-1]) if len(items) else np.zeros(len(k), bool)
    return np.where(found, items[np.maximum(k, 0)] + 1 if len(items) else 0, tok.offsets[:-1])


def _consumed_mask(items: np.ndarray, consumed: pa.ListArray, n_items: int) -> np.ndarray:
    """items [r, w] -> [r, w] bool: the item is in its row's consumed list."""
    values = pc.list_flatten(consumed).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(values) == 0:
        return np.zeros(items.shape, bool)
    parents = pc.list_parent_indices(consumed).to_numpy(zero_copy_only=False).astype(np.int64)
    keys = np.arange(len(items))[:, None] * n_items + items  # (row, item) as one int64
    return np.isin(keys, parents * n_items + values)


def _first_valid(items: np.ndarray, scores: np.ndarray, excluded: np.ndarray, n: int):
    """The first ``n`` retrieved items of each row that exist and are not excluded, in retrieval order
    -> (items [r, n'], scores [r, n'], valid [r, n']); n' = min(n, w), invalid slots hold item 0."""
    invalid = excluded | (items <= 0) | ~np.isfinite(scores)
    order = np.argsort(invalid, axis=1, kind="stable")[:, :n]
    valid = ~np.take_along_axis(invalid, order, 1)
    cand = np.where(valid, np.take_along_axis(items, order, 1), 0)
    return cand, np.where(valid, np.take_along_axis(scores, order, 1), 0.0).astype(np.float32), valid


def _output(batch: pa.RecordBatch, kept: np.ndarray, parts: list[tuple]) -> pa.RecordBatch:
    """Scored chunks -> one row per valid candidate (``SCORED_SCHEMA``)."""
    cols: list[list[np.ndarray]] = [[] for _ in range(5)]  # source row, rank, item, retrieval, ranking
    for chunk, items, retr, ranking, valid in parts:  # chunks differ in width when the catalog is small
        r, c = np.nonzero(valid)  # row-major: request by request, rank by rank (valid slots come first)
        for out, v in zip(cols, (kept[chunk[r]], c + 1, items[r, c], retr[r, c], ranking[r, c])):
            out.append(v)
    src, rank, item, retr, ranking = (np.concatenate(v) if v else np.zeros(0) for v in cols)
    src = pa.array(src.astype(np.int64))
    return pa.RecordBatch.from_arrays(
        [batch.column(C.SURFACE).take(src), batch.column(C.USER_ID).take(src), batch.column(C.QUERY).take(src),
         pa.array(rank, pa.int32()), pa.array(item, pa.int32()), pa.array(retr, pa.float32()),
         pa.array(ranking, pa.float32())],
        schema=scored_arrow_schema())


def scored_arrow_schema() -> pa.Schema:
    return pa.schema([(C.SURFACE, pa.string()), (C.USER_ID, pa.string()), (C.QUERY, pa.string()),
                      (C.RANK, pa.int32()), (C.ITEM_INDEX, pa.int32()), (C.RETRIEVAL_SCORE, pa.float32()),
                      (C.RANKING_SCORE, pa.float32())])


def build_scorer(payload: dict):
    """The ``Scorer`` of a broadcast payload: model record bytes, serialized index, settings."""
    import faiss
    import torch

    from synergen_core.index import CandidateIndex

    s: Settings = payload["settings"]
    torch.set_num_threads(s.threads)  # Spark tasks already run in parallel: more threads only contend
    faiss.omp_set_num_threads(s.threads)
    # weights only: the bytes are a model file's record, and a pickled object in it would run code here
    model = checkpoint.build_from_record(checkpoint.from_bytes(payload["record"], payload.get("source", "the model record")))
    index = CandidateIndex.loads(payload["index"]) if payload["index"] is not None else None
    return Scorer(model, index, s)


_WORKER: dict = {}  # run key -> Scorer: built once per Python worker (Spark reuses workers between tasks)


def _scorer(payload) -> Scorer:
    value = payload.value  # unpickled once per worker by PySpark
    if value["key"] not in _WORKER:
        _WORKER.clear()  # a new run's broadcast: let the last model go
        _WORKER[value["key"]] = build_scorer(value)
    return _WORKER[value["key"]]


def _score_partition(payload):
    """The ``mapInArrow`` function: request batches -> scored rows, with a progress bar per task."""

    def score(batches):
        from pyspark import TaskContext
        from tqdm import tqdm

        scorer = _scorer(payload)
        ctx = TaskContext.get()
        with tqdm(desc=f"score partition {ctx.partitionId() if ctx else 0}", unit=" requests", mininterval=5,
                  disable=not scorer.s.progress) as bar:
            for b in batches:
                yield scorer.score(b)
                bar.update(b.num_rows)

    return score


# ---------------------------------------------------------------------------------------------
# requests (Spark)


def _sessionized(cfg: Config, table: str) -> str:
    return f"{cfg.sessionize.output}/{table}"


def require_inputs(cfg: Config, ds: str) -> None:
    """The sessionized partitions of ``ds`` scoring reads are published, else a ``PipelineError`` naming the
    missing one and the command that writes it (Spark's own error would be a bare path)."""
    tables = ["sequences"] + (["query_vocab"] if K.SURFACE_SEARCH in cfg.score.surfaces else [])
    for table in tables:
        part = lake.partition(cfg.lake.root, _sessionized(cfg, table), ds)
        if not (part / lake.SUCCESS).is_file():
            raise PipelineError(f"{part}: no published partition of {table} for ds={ds} "
                                f"(`synergen sessionize --ds {ds}` writes it)")


def _day_before(ds: str) -> str:
    return (parse_ds(ds) - dt.timedelta(days=1)).isoformat()


def rec_requests(cfg: Config, ds: str, seqs: DataFrame) -> DataFrame:
    """Users active in the look-back window (all with ``lookback_days`` null), query null."""
    if cfg.score.lookback_days is not None:
        since = parse_ds(ds) + dt.timedelta(days=1 - cfg.score.lookback_days)
        seqs = seqs.where(F.col(C.WATERMARK) >= F.to_timestamp(F.lit(since.isoformat())))
    return seqs.select(F.lit(K.SURFACE_REC).alias(C.SURFACE), C.USER_ID, F.lit(None).cast("string").alias(C.QUERY),
                       F.lit(None).cast("int").alias(QIDX), C.TOKENS)


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
    events = read_days(spark, cfg.lake.root, _sessionized(cfg, "events"), S.EVENTS, after=_day_before(ds), upto=ds)
    pairs = (events.where((F.col(C.KIND) == S.KIND_SEARCH) & F.col(C.QUERY_INDEX).isNotNull())
             .select(C.USER_ID, C.QUERY_INDEX).distinct())
    return pairs.join(queries.select(C.QUERY_INDEX, C.QUERY), C.QUERY_INDEX)


def consumed_items(spark: SparkSession, cfg: Config, ds: str, n_items: int) -> DataFrame:
    """(user_id, _consumed array<int>, _n_consumed): the catalog items of each user's history up to ds."""
    events = read_days(spark, cfg.lake.root, _sessionized(cfg, "events"), S.EVENTS, upto=ds)
    return (events.where(F.col(C.ITEM_INDEX).between(1, n_items - 1))
            .groupBy(C.USER_ID).agg(F.array_sort(F.collect_set(C.ITEM_INDEX)).alias(CONSUMED))
            .select(C.USER_ID, CONSUMED, F.size(CONSUMED).alias(N_CONSUMED)))


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
    seqs = spark_partition(spark, root, _sessionized(cfg, "sequences"), ds, S.SEQUENCES)
    parts, dropped = [], {}
    if K.SURFACE_REC in sc.surfaces:
        parts.append(rec_requests(cfg, ds, seqs))
    if K.SURFACE_SEARCH in sc.surfaces:
        queries = spark_partition(spark, root, _sessionized(cfg, "query_vocab"), ds, S.QUERY_VOCAB)
        pairs = search_pairs(spark, cfg, ds, queries)
        record, n_queries, pairs, dropped = _query_indices(cfg, ds, record, pairs)
        parts.append(pairs.join(seqs.select(C.USER_ID, C.TOKENS), C.USER_ID, "left").select(
            F.lit(K.SURFACE_SEARCH).alias(C.SURFACE), C.USER_ID, C.QUERY, F.col(C.QUERY_INDEX).cast("int").alias(QIDX),
            C.TOKENS))
    if not parts:
        raise ConfigError("score.surfaces is empty: nothing to score")
    reqs = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
    excluded = [s for s, on in ((K.SURFACE_REC, sc.exclude_consumed), (K.SURFACE_SEARCH, sc.exclude_consumed_search))
                if on and s in sc.surfaces]
    if excluded:
        cons = consumed_items(spark, cfg, ds, n_items)
        reqs = reqs.join(cons, C.USER_ID, "left")
        on = F.col(C.SURFACE).isin(excluded) & F.col(CONSUMED).isNotNull()
        reqs = reqs.select(*[c for c in reqs.columns if c not in (CONSUMED, N_CONSUMED)],
                           F.when(on, F.col(CONSUMED)).otherwise(F.array().cast("array<int>")).alias(CONSUMED),
                           F.when(on, F.col(N_CONSUMED)).otherwise(0).alias(N_CONSUMED))
    else:
        reqs = reqs.select("*", F.array().cast("array<int>").alias(CONSUMED), F.lit(0).alias(N_CONSUMED))
    # A fixed partitioning by user and a fixed order within: the same chunks (and floats) on any master.
    n_parts = sc.partitions or spark.sparkContext.defaultParallelism
    reqs = reqs.repartition(n_parts, C.USER_ID).sortWithinPartitions(N_CONSUMED, C.SURFACE, C.USER_ID, C.QUERY)
    return Prepared(reqs, record, n_queries, dropped)


def _query_indices(cfg: Config, ds: str, record: dict, pairs: DataFrame):
    """Search pairs with the query index the model reads: a text model gets text vectors for the queries it
    has not seen (vocabulary queries after its training, then new request queries, in sorted order); an
    ID-only model cannot read them and their requests are dropped. -> (record, n_queries, pairs, dropped)."""
    from synergen_core.data import read_table, vocab_size

    n_model = record["dims"]["n_queries"]
    if not reads_text(record):
        known = F.col(C.QUERY_INDEX).isNotNull() & (F.col(C.QUERY_INDEX) < n_model)
        n_unknown = pairs.where(~known).count()
        return record, n_model, pairs.where(known), {"search_unknown_query": n_unknown} if n_unknown else {}
    vocab = read_table(cfg, "query_vocab", ds)
    n_vocab = max(vocab_size(vocab, C.QUERY_INDEX), n_model)
    fresh = sorted(r[C.QUERY] for r in pairs.where(F.col(C.QUERY_INDEX).isNull()).select(C.QUERY).distinct().collect())
    texts = [""] * (n_vocab - n_model) + fresh  # indices n_model .. n_vocab - 1, then the fresh ones
    for i, q in zip(vocab[C.QUERY_INDEX].to_pylist(), vocab[C.QUERY].to_pylist()):
        if i >= n_model:
            texts[i - n_model] = q or ""
    if texts:
        from synergen_core.text_encoder import load_text_encoder

        record = with_queries(record, load_text_encoder(cfg.text_encoder).encode(texts))
    if fresh:
        spark = pairs.sparkSession
        new = spark.createDataFrame([(q, n_vocab + j) for j, q in enumerate(fresh)], f"{C.QUERY} string, _new int")
        pairs = pairs.join(F.broadcast(new), C.QUERY, "left").select(
            C.USER_ID, C.QUERY, F.coalesce(C.QUERY_INDEX, "_new").alias(C.QUERY_INDEX))
    return record, n_model + len(texts), pairs, {}


# ---------------------------------------------------------------------------------------------
# the job


def _settings(cfg: Config, ds: str, n_queries: int) -> Settings:
    sc = cfg.score
    if sc.retrieve_n < sc.top_k:
        raise ConfigError(f"score.retrieve_n ({sc.retrieve_n}) must be >= score.top_k ({sc.top_k})")
    return Settings(sc.top_k, sc.retrieve_n, sc.retriever, sc.batch_size, end_of_day(ds), n_queries, sc.threads,
                    sc.progress, sc.precision)


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
    return index.build(vecs, ids, q, sc.retrieve_n, sc.exact_max_items, sc.min_ann_recall, sc.ann_nlist, sc.seed)


def run(spark: SparkSession, cfg: Config, ds: str, model_dir: str | Path | None = None) -> dict:
    """Score every request of ``ds`` into the staging partition (see the module doc). Returns the run's
    figures (also ``_score.json``): requests, lists and rows per surface, the index choice, timings."""
    ds = parse_ds(ds).isoformat()
    t0 = time.perf_counter()
    ref = resolve_model(cfg, model_dir)
    record = checkpoint.load(ref.path)
    require_inputs(cfg, ds)
    prep = prepare(spark, cfg, ds, record)
    settings = _settings(cfg, ds, prep.n_queries)
    reqs = prep.requests.cache()  # read by the recall sample, the scoring and the counts
    try:
        t1 = time.perf_counter()
        cand_index = _candidate_index(cfg, reqs, prep.record, settings)
        index_s = time.perf_counter() - t1
        figures = {
            "ds": ds, "model": {"name": ref.name, "version": ref.version, "path": str(ref.path)},
            "retriever": cfg.score.retriever, "top_k": cfg.score.top_k, "retrieve_n": cfg.score.retrieve_n,
            "exclude_consumed": {K.SURFACE_REC: cfg.score.exclude_consumed,
                                 K.SURFACE_SEARCH: cfg.score.exclude_consumed_search},
            "catalog_items": int(record["dims"]["n_items"] - 1), "n_items": int(record["dims"]["n_items"]),
            "queries_added": prep.n_queries - record["dims"]["n_queries"], "request_ts": settings.request_ts,
            "index": cand_index.report if cand_index is not None else {"kind": "generative"},
            "dropped": prep.dropped,
        }
        payload = _broadcast(spark, prep.record, cand_index, settings, str(ref.path))
        try:
            t2 = time.perf_counter()

            def finish(counts: dict) -> dict:  # the figures, once the lists are written (before the rename)
                requests = {r[C.SURFACE]: r["count"] for r in reqs.groupBy(C.SURFACE).count().collect()}
                figures["surfaces"] = {s: {"requests": requests.get(s, 0), **counts.get(s, {"lists": 0, "rows": 0})}
                                       for s in cfg.score.surfaces}
                figures["users"] = counts["users"]
                total = time.perf_counter() - t0
                figures["seconds"] = {"index": round(index_s, 3), "score_and_write": round(time.perf_counter() - t2, 3),
                                      "total": round(total, 3)}
                figures["users_per_s"] = round(counts["users"] / total, 1)
                return figures

            _write_staged(cfg, ds, _lists(spark, cfg, ds, reqs, payload, ref), finish)
        finally:
            payload.destroy()
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
    sample = (reqs.orderBy(F.xxhash64(C.SURFACE, C.USER_ID, C.QUERY)).limit(cfg.score.ann_sample).toArrow()
              if big else pa.table({}))
    cand_index = build_index(scorer, cfg, sample)
    log.info("candidate index: %s", cand_index.report.get("why"))
    return cand_index


def _broadcast(spark: SparkSession, record: dict, cand_index, settings: Settings, source: str):
    """What every Python worker builds its ``Scorer`` from (``_scorer``): model record bytes (``source``: the
    model file they came from, named if they are refused), index, settings."""
    return spark.sparkContext.broadcast({"key": uuid.uuid4().hex, "record": checkpoint.to_bytes(record), "source": source, "settings": settings,
                                         "index": cand_index.dumps() if cand_index is not None else None})


def _lists(spark: SparkSession, cfg: Config, ds: str, reqs: DataFrame, payload, ref: ModelRef) -> DataFrame:
    """The scored rows with item ids and the model's name and version (contract columns + surface)."""
    scored = reqs.mapInArrow(_score_partition(payload), SCORED_SCHEMA)
    vocab = spark_partition(spark, cfg.lake.root, _sessionized(cfg, "item_vocab"), ds, S.ITEM_VOCAB)
    out = scored.join(vocab.select(C.ITEM_INDEX, C.ITEM_ID), C.ITEM_INDEX).select(
        *[F.lit(ref.name).alias(c) if c == C.MODEL_NAME else F.lit(ref.version).alias(c) if c == C.MODEL_VERSION
          else F.col(c) for c in K.CANDIDATES.names], C.SURFACE)
    return out.sortWithinPartitions(C.SURFACE, C.USER_ID, C.QUERY, C.RANK)


# ---------------------------------------------------------------------------------------------
# staging, publication


def staged_dir(cfg: Config, ds: str) -> Path:
    """Where a scored day waits for validation (a hidden-to-readers sibling of the day partitions)."""
    return lake.partition(Path(cfg.lake.root) / cfg.score.output / STAGING, "", ds)


def published_dir(cfg: Config, ds: str) -> Path:
    return lake.partition(cfg.lake.root, cfg.score.output, ds)


def _write_staged(cfg: Config, ds: str, lists: DataFrame, finish) -> dict:
    """Write the day aside with ``finish(counts)`` as ``_score.json``, then rename it to its staging place
    (replacing an earlier run's). -> the figures."""
    final = staged_dir(cfg, ds)
    tmp = lake.staging_dir(final)
    try:
        lists.write.mode("overwrite").partitionBy(C.SURFACE).parquet(str(tmp))
        for s in cfg.score.surfaces:  # a surface without requests is an empty folder, not a missing one
            (tmp / f"{C.SURFACE}={s}").mkdir(exist_ok=True)
        figures = finish(_counts(lists.sparkSession, tmp))
        (tmp / SCORE_FILE).write_text(json.dumps(figures, indent=1, default=str))
        lake.publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return figures


def read_lists(spark: SparkSession, part: Path) -> DataFrame:
    """A day's lists (staged or published) with ``surface``, in the contract's types."""
    schema = spark_schema(K.CANDIDATES, with_ds=False).add(C.SURFACE, "string")
    if not any(part.glob(f"{C.SURFACE}=*/*.parquet")):
        return spark.createDataFrame([], schema)
    # the surface folders named, not ``part``: Spark skips a hidden root (the writer's ``.tmp-`` folder)
    surfaces = [str(p) for p in sorted(part.glob(f"{C.SURFACE}=*")) if lake.data_files(p)]
    return spark.read.schema(schema).option("basePath", str(part)).parquet(*surfaces)


def _counts(spark: SparkSession, part: Path) -> dict:
    """Lists and rows per surface, and distinct users, of a written day."""
    df = read_lists(spark, part)
    out = {r[C.SURFACE]: {"lists": r["lists"], "rows": r["rows"]} for r in df.groupBy(C.SURFACE).agg(
        F.sum((F.col(C.RANK) == 1).cast("long")).alias("lists"), F.count("*").alias("rows")).collect()}
    out["users"] = df.select(C.USER_ID).distinct().count()
    return out


def publish(cfg: Config, ds: str) -> dict:
    """Rename the validated staged day into ``<lake>/<score.output>/ds=D`` (replacing the previous version)."""
    ds = parse_ds(ds).isoformat()
    staged, final = staged_dir(cfg, ds), published_dir(cfg, ds)
    if not staged.is_dir():
        raise FileNotFoundError(f"{staged}: nothing staged for {ds} (run the score stage first)")
    report_file = staged / VALIDATION_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    if not report or not report.get("success"):
        raise CandidatesInvalid(f"{staged}: {'validation failed' if report else 'not validated'}: run "
                                "validate_candidates and fix what it reports before publishing", report or {})
    lake.publish(staged, final)
    log.info("score %s: published %s", ds, final)
    return {"ds": ds, "path": str(final), "rows": report["rows"], "lists": report["lists"]}


# ---------------------------------------------------------------------------------------------
# validation


def check_frame(lists: DataFrame, catalog: DataFrame, consumed: DataFrame | None, run: dict) -> DataFrame:
    """The lists with the suite's check columns (``schemas.candidates``), computed per request.

    ``catalog``: (item_id, item_index) of the day's vocabulary; ``consumed``: (user_id, item_index) pairs of
    the users' histories (None when no surface excludes them); ``run``: the run's ``_score.json``.
    """
    n_items, top_k = run["n_items"], run["top_k"]
    excluded = [s for s, on in run["exclude_consumed"].items() if on]
    req = Window.partitionBy(*K.REQUEST_KEY)
    by_rank = req.orderBy(C.RANK, C.ITEM_ID)
    df = lists.join(catalog.select(C.ITEM_ID, F.col(C.ITEM_INDEX).alias("_index")), C.ITEM_ID, "left")
    n_consumed = F.lit(0)
    if consumed is not None and excluded:
        pairs = consumed.select(C.USER_ID, F.col(C.ITEM_INDEX).alias("_index"), F.lit(True).alias("_consumed"))
        per_user = consumed.groupBy(C.USER_ID).agg(F.count("*").alias("_n_consumed"))
        df = df.join(pairs, [C.USER_ID, "_index"], "left").join(per_user, C.USER_ID, "left")
        n_consumed = F.when(F.col(C.SURFACE).isin(excluded), F.coalesce("_n_consumed", F.lit(0))).otherwise(0)
        not_consumed = F.when(F.col(C.SURFACE).isin(excluded), F.col("_consumed").isNull())
    else:
        not_consumed = F.lit(None).cast("boolean")
    expected = F.least(F.lit(top_k), F.lit(n_items - 1) - n_consumed)
    surface = F.col(C.SURFACE)
    return df.select(
        *lists.columns,
        (F.count("*").over(req) == expected).alias(K.LIST_LENGTH),
        (F.count("*").over(Window.partitionBy(*K.REQUEST_KEY, C.ITEM_ID)) == 1).alias(K.UNIQUE_ITEM),
        (F.col(C.RANK) == F.row_number().over(by_rank)).alias(K.RANKS),
        (F.col(C.RANKING_SCORE) <= F.lag(C.RANKING_SCORE).over(by_rank)).alias(K.SCORE_ORDER),
        (F.col("_index").isNotNull() & (F.col("_index") >= 1) & (F.col("_index") < n_items)).alias(K.IN_CATALOG),
        not_consumed.alias(K.NOT_CONSUMED),
        F.when(surface == K.SURFACE_REC, F.col(C.QUERY).isNull())
        .when(surface == K.SURFACE_SEARCH, F.col(C.QUERY).isNotNull()).alias(K.QUERY_SURFACE),
    )


def run_suite(frame: DataFrame):
    """GE's result of the candidates suite on ``frame`` (a Spark DataFrame with the check columns)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (ctx.data_sources.add_spark("candidates", persist=False).add_dataframe_asset("lists")  # cached by us
                 .add_batch_definition_whole_dataframe("day"))
    suite = ctx.suites.add(K.suite())
    return batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES})


def _examples(frame: DataFrame, column: str) -> list[dict]:
    """A few rows failing the check on ``column`` (a null required field, or a False check)."""
    bad = F.col(column).isNull() if column in K.REQUIRED else (F.col(column) == F.lit(False))
    if column == C.SURFACE:
        bad = ~F.col(C.SURFACE).isin(list(K.SURFACES)) | F.col(C.SURFACE).isNull()
    cols = [*K.REQUEST_KEY, C.RANK, C.ITEM_ID, C.RETRIEVAL_SCORE, C.RANKING_SCORE]
    rows = frame.where(bad).orderBy(*K.REQUEST_KEY, C.RANK, C.ITEM_ID).select(*cols).limit(EXAMPLES).collect()
    return [r.asDict() for r in rows]


def _check_files(part: Path) -> None:
    """Every data file has the contract's columns and types (before Spark reads them with that schema)."""
    import pyarrow.parquet as pq

    from schemas.sequences import conforms

    for folder in sorted(part.glob(f"{C.SURFACE}=*")):
        for f in lake.data_files(folder):
            schema = pq.read_schema(f)
            if not conforms(schema, K.CANDIDATES):
                raise CandidatesInvalid(f"{f}: columns {schema} do not match the candidates contract "
                                        f"(schemas/candidates.py) {K.CANDIDATES}", {"partition": str(part),
                                                                                    "file": str(f)})


def validate_lists(spark: SparkSession, cfg: Config, ds: str, part: Path) -> dict:
    """Run the suite on the lists in ``part``; write the reports beside them; the summary (see
    ``validate_candidates``)."""
    _check_files(part)
    run = json.loads((part / SCORE_FILE).read_text())
    root = cfg.lake.root
    catalog = spark_partition(spark, root, _sessionized(cfg, "item_vocab"), ds, S.ITEM_VOCAB)
    consumed = None
    if any(run["exclude_consumed"].values()):
        events = read_days(spark, root, _sessionized(cfg, "events"), S.EVENTS, upto=ds)
        consumed = (events.where(F.col(C.ITEM_INDEX).between(1, run["n_items"] - 1))
                    .select(C.USER_ID, C.ITEM_INDEX).distinct())
    frame = check_frame(read_lists(spark, part), catalog, consumed, run).cache()
    try:
        result = run_suite(frame)
        failed = []
        for r in result.results:
            if not r.success:
                col = r.expectation_config.kwargs.get("column")
                failed.append({"check": r.expectation_config.meta.get("check"), "column": col,
                               "notes": r.expectation_config.meta.get("notes"),
                               "unexpected_count": r.result.get("unexpected_count"),
                               "examples": _examples(frame, col)})
        totals = frame.agg(F.count("*").alias("rows"), F.sum((F.col(C.RANK) == 1).cast("long")).alias("lists")).first()
    finally:
        frame.unpersist()
    report = {"ds": ds, "partition": str(part), "suite": "candidates", "success": bool(result.success),
              "rows": int(totals["rows"]), "lists": int(totals["lists"] or 0), "expectations": len(result.results),
              "model": run["model"], "failed": failed}
    (part / VALIDATION_FILE).write_text(json.dumps(report, indent=1, default=str))
    (part / GE_FILE).write_text(json.dumps(result.to_json_dict(), indent=1, default=str))
    return report


def validate_candidates(cfg: Config, ds: str) -> dict:
    """Validate the staged lists of ``ds`` (the published ones when none are staged): the report, also written
    beside them as ``_validation.json``; raises ``CandidatesInvalid`` naming the partition, every failed
    check and example rows."""
    ds = parse_ds(ds).isoformat()
    part = staged_dir(cfg, ds) if staged_dir(cfg, ds).is_dir() else published_dir(cfg, ds)
    if not (part / SCORE_FILE).is_file():
        raise FileNotFoundError(f"{part}: no scored lists for {ds} (run the score stage first)")
    report = _with_spark(cfg, lambda spark: validate_lists(spark, cfg, ds, part))
    if not report["success"]:
        lines = [f"  {f['check']} ({f['column']}: {f['unexpected_count']} rows; {f['notes'] or 'required'}); "
                 f"e.g. {f['examples'][:2]}" for f in report["failed"]]
        raise CandidatesInvalid(f"{part}: candidate lists failed validation:\n" + "\n".join(lines), report)
    return report


# ---------------------------------------------------------------------------------------------
# entry points for the CLI and Airflow


def _with_spark(cfg: Config, fn):
    """``fn(spark)`` in a session from ``cfg.spark``, stopped at the end unless it was already active."""
    with session(cfg) as spark:
        return fn(spark)


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a result as MLflow metric names."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def stage(cfg: Config, ds: str, group: str | None = None, model_dir: str | Path | None = None) -> dict:
    """The ``score`` task: ``run`` as a tracked MLflow stage (counts, durations, index recall as metrics)."""
    from synergen_core.tracking import stage_run

    with stage_run(cfg, "score", ds, group) as tracked:
        tracked.tags({"synergen.inputs": f"{cfg.sessionize.output}/sequences/ds={ds},{cfg.sessionize.output}/events",
                      "synergen.score.model_ref": str(model_dir or cfg.score.model),
                      "synergen.score.retriever": cfg.score.retriever})
        out = _with_spark(cfg, lambda spark: run(spark, cfg, ds, model_dir))
        tracked.tags({"synergen.model.name": out["model"]["name"], "synergen.model.version": out["model"]["version"],
                      "synergen.score.index": out["index"].get("kind"),
                      "synergen.score.index_why": out["index"].get("why", "")})
        tracked.metrics(_numbers({k: out[k] for k in ("surfaces", "seconds", "users", "users_per_s", "dropped",
                                                       "catalog_items", "queries_added")}))
        if "ann_recall" in out["index"]:
            tracked.metrics({"index.ann_recall": out["index"]["ann_recall"]})
        tracked.text(json.dumps(out, indent=1, default=str), "score.json")
        return out


def validate_stage(cfg: Config, ds: str, group: str | None = None) -> dict:
    """The ``validate_candidates`` task, tracked: rows, lists, failed checks; the report as an artifact."""
    from synergen_core.tracking import stage_run

    with stage_run(cfg, "validate_candidates", ds, group) as tracked:
        try:
            report = validate_candidates(cfg, ds)
        except CandidatesInvalid as e:
            tracked.text(json.dumps(e.report, indent=1, default=str), "validate_candidates.json")
            raise
        tracked.metrics({"rows": report["rows"], "lists": report["lists"], "failed_checks": len(report["failed"])})
        tracked.text(json.dumps(report, indent=1, default=str), "validate_candidates.json")
        return report


def publish_stage(cfg: Config, ds: str, group: str | None = None) -> dict:
    """The ``publish`` task, tracked."""
    from synergen_core.tracking import stage_run

    with stage_run(cfg, "publish", ds, group) as tracked:
        out = publish(cfg, ds)
        tracked.metrics({"rows": out["rows"], "lists": out["lists"]})
        tracked.tags({"synergen.outputs": out["path"]})
        return out
