"""Training and evaluation splits of day ``ds``: written by the sessionize run of ``ds`` (``write``)
or on their own from published tables (``run``).

Two protocols, each for both tasks. The task of an engagement (an event with an item) is its
surface: a browse engagement is a ``recommendation`` target, a search engagement a ``search``
target (its query token, just before the item token, is the request).

``loo`` (leave-one-out, the Amazon Beauty benchmark protocol of SASRec, S3-Rec, P5 and TIGER):
per user and task with at least 3 engagements, the last is ``test`` and the one before ``valid``;
users with fewer keep everything for training. The training input of a user is the latest
``max_seq_len`` tokens strictly before the user's FIRST evaluation token of either task (for a
search target, its query token counts), so no evaluation event, nor anything after one, is a
training input.

``temporal`` (daily retraining): the training input is every user's latest ``max_seq_len`` tokens
of the events that arrived before ``ds`` (exactly the ``sequences`` snapshot of ``ds``-1), and the
targets (``test``) are the engagements that arrived on ``ds``. Because histories are ordered by
arrival day first, every training token precedes every target. It needs only the previous
snapshot and the new events; leave-one-out reads the whole ``events`` history, which is why the
default ``sessionize.splits`` is ``[temporal]`` (the daily model's) and benchmarks ask for ``loo``.

Each evaluation row carries its context: the ``max_seq_len`` tokens just before the target item
token (for a search target the last context token is its query). Tables (``schemas.sequences``):
``split_<protocol>_train`` (user_id, tokens) and ``split_<protocol>_eval``, partition ``ds``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType

from jobs.spark import Staging, read_days, spark_schema
from jobs.tokens import event_tokens, is_search, snapshot_tokens, sorted_tokens, update_sequences
from schemas import C
from schemas import sequences as S
from synergen_core import lake
from synergen_core.config import Config, parse_ds

log = logging.getLogger(__name__)

MIN_LOO_ENGAGEMENTS = 3  # one left for training after valid and test, as in SASRec's data_partition


def engagements(events: DataFrame) -> DataFrame:
    """Candidate targets: every event with an item, keyed by its item token's position."""
    return events.where(F.col(C.ITEM_ID).isNotNull()).select(
        C.USER_ID, C.DS, C.EVENT_POS,
        F.col(C.SURFACE).alias(C.TASK),
        (F.col(C.POS) + F.when(is_search(), 1).otherwise(0)).cast("int").alias(C.TARGET_POS),
        F.col(C.POS).alias("_first_pos"),  # the event's first token: the query of a search target
        F.col(C.TS).alias(C.TARGET_TS), C.ITEM_INDEX, C.QUERY_INDEX, C.ACTION,
    )


def loo_targets(engaged: DataFrame, search_tests: int = 1) -> DataFrame:
    """Per user and task with at least 3 engagements: the last ones ``test`` (one, or for search up to
    ``search_tests`` but never more than all but two) and the one before them ``valid``."""
    by_task = Window.partitionBy(C.USER_ID, C.TASK)
    ranked = engaged.select(
        "*",
        F.row_number().over(by_task.orderBy(F.desc(C.EVENT_POS))).alias("_rank"),
        F.count("*").over(by_task).alias("_n"),
    )
    tests = F.least(F.when(F.col(C.TASK) == S.TASK_SEARCH, search_tests).otherwise(1), F.col("_n") - 2)
    return (ranked.where((F.col("_n") >= MIN_LOO_ENGAGEMENTS) & (F.col("_rank") <= tests + 1))
            .withColumn(C.SPLIT, F.when(F.col("_rank") <= tests, S.SPLIT_TEST).otherwise(S.SPLIT_VALID)))


def with_context(targets: DataFrame, tokens: DataFrame, max_len: int) -> DataFrame:
    """Evaluation rows (``schemas.sequences.SPLIT_EVAL``): each target with the tokens just before it.

    Linear in a user's tokens: each user's tokens that some target's context can reach (from
    ``max_len`` before the first target to the last one) are sorted once into one array, and each
    target slices its context out of it. Positions are consecutive in that array (a user's history
    has no holes), so a slice is index arithmetic; an array with holes falls back to a filter.
    """
    keys = [c for c in S.SPLIT_EVAL.names if c != C.CONTEXT]
    span = targets.groupBy(C.USER_ID).agg((F.min(C.TARGET_POS) - max_len).alias("_lo"), F.max(C.TARGET_POS).alias("_hi"))
    p = F.col(C.POS)
    reach = (tokens.join(span, C.USER_ID).where((p >= F.col("_lo")) & (p < F.col("_hi")))
             .groupBy(C.USER_ID).agg(sorted_tokens().alias("_near")))
    near, t = F.col("_near"), F.col(C.TARGET_POS)
    first, n = F.try_element_at(near, F.lit(1))[C.POS], F.size(near)
    start = F.greatest(t - max_len, first)
    dense = F.try_element_at(near, F.lit(-1))[C.POS] - first + 1 == n
    sliced = F.slice(near, start - first + 1, F.greatest(t - start, F.lit(0)))
    picked = F.filter(near, lambda x: (x[C.POS] >= t - max_len) & (x[C.POS] < t))
    empty = F.array().cast(ArrayType(tokens.schema["token"].dataType))
    context = F.when(near.isNull() | (n == 0), empty).when(dense, sliced).otherwise(picked)
    return targets.join(reach, C.USER_ID, "left").select(*keys, context.alias(C.CONTEXT))


def train_before(tokens: DataFrame, cut: DataFrame, max_len: int) -> DataFrame:
    """Per user of ``cut`` (user_id, _cut): the latest ``max_len`` tokens at positions below ``_cut``."""
    p = F.col(C.POS)
    return (tokens.join(cut, C.USER_ID).where((p < F.col("_cut")) & (p >= F.col("_cut") - max_len))
            .groupBy(C.USER_ID).agg(sorted_tokens().alias(C.TOKENS)))


def loo(events: DataFrame, max_len: int, search_tests: int = 1) -> tuple[DataFrame, DataFrame]:
    """(train, eval) of the leave-one-out protocol over the whole ``events`` history."""
    tokens = event_tokens(events)
    targets = loo_targets(engagements(events), search_tests)
    sizes = tokens.groupBy(C.USER_ID).agg((F.max(C.POS) + 1).alias("_n"))
    first_eval = targets.groupBy(C.USER_ID).agg(F.min("_first_pos").alias("_first"))
    cut = sizes.join(first_eval, C.USER_ID, "left").select(
        C.USER_ID, F.coalesce(F.col("_first"), F.col("_n")).alias("_cut"))
    return train_before(tokens, cut, max_len), with_context(targets, tokens, max_len)


def temporal(state: DataFrame, events: DataFrame, ds: str, max_len: int) -> tuple[DataFrame, DataFrame]:
    """(train, eval) of the temporal protocol: train on arrivals before ``ds``, evaluate on ``ds``'s.

    ``state`` is a ``sequences`` snapshot and ``events`` every sessionized event that arrived after
    it, up to ``ds``: the snapshot's latest tokens are all the history a target's context can reach
    (a target is newer than the snapshot), so no older history is read.
    """
    before = events.where(F.col(C.DS) < ds)
    train = update_sequences(state, before, max_len).where(F.size(C.TOKENS) > 0).select(C.USER_ID, C.TOKENS)
    targets = engagements(events.where(F.col(C.DS) == ds)).withColumn(C.SPLIT, F.lit(S.SPLIT_TEST))
    tokens = snapshot_tokens(state).unionByName(event_tokens(events))
    return train, with_context(targets, tokens, max_len)


def write(staging: Staging, cfg: Config, ds: str, state: DataFrame, events: DataFrame,
          history: Callable[[], DataFrame]) -> dict:
    """Stage the split tables of ``ds`` for every protocol in ``sessionize.splits``; returns counts.

    ``state`` + ``events``: as for ``temporal``; ``history``: every event up to ``ds`` (only
    leave-one-out needs it, so it is only read then).
    """
    layout, max_len, stats = cfg.layout, cfg.sessionize.max_seq_len, {}
    for name in cfg.sessionize.splits:
        train, evals = (temporal(state, events, ds, max_len) if name == "temporal"
                        else loo(history(), max_len, cfg.sessionize.loo_search_tests))
        staging.write_day(train, layout.split(name, "train"), ds)
        staging.write_day(evals.select(*S.SPLIT_EVAL.names), layout.split(name, "eval"), ds)
        stats[name] = _counts(staging.staged(layout.split(name, "train"), ds),
                              staging.staged(layout.split(name, "eval"), ds))
    return stats


def tables(cfg: Config) -> list[str]:
    """The split tables ``write`` stages for ``cfg.sessionize.splits``."""
    return [cfg.layout.split(name, part) for name in cfg.sessionize.splits for part in ("train", "eval")]


def _counts(train: Path, evals: Path) -> dict:
    """Training users and evaluation rows per task/split, read from the written files (no Spark job)."""
    users = sum(pq.ParquetFile(f).metadata.num_rows for f in lake.data_files(train))
    keys = [pq.read_table(f, columns=[C.TASK, C.SPLIT]) for f in lake.data_files(evals)]
    pairs = pa.concat_tables(keys).group_by([C.TASK, C.SPLIT]).aggregate([([], "count_all")]) if keys else None
    rows = [] if pairs is None else pairs.to_pylist()
    return {"train_users": users,
            "eval": {f"{r[C.TASK]}/{r[C.SPLIT]}": r["count_all"] for r in sorted(rows, key=lambda r: (r[C.TASK], r[C.SPLIT]))}}


def run(spark: SparkSession, cfg: Config, ds: str) -> dict:
    """The splits of ``ds`` alone, from published tables: the latest ``sequences`` snapshot before
    ``ds`` and the ``events`` after it (temporal), the whole ``events`` history (leave-one-out)."""
    ds = parse_ds(ds).isoformat()
    root, layout = Path(cfg.lake.root), cfg.layout
    prev = layout.day_before(layout.sessions("sequences"), ds)
    if prev is None:
        state = spark.createDataFrame([], spark_schema(S.SEQUENCES, with_ds=False))
    else:
        state = read_days(spark, root, layout.sessions("sequences"), S.SEQUENCES, after=lake.previous_day(prev),
                          upto=prev).drop(C.DS)
    events = read_days(spark, root, layout.sessions("events"), S.EVENTS, after=prev, upto=ds)
    for table in tables(cfg):
        lake.remove_stale(root, table)
    staging = Staging(spark, root)
    try:
        stats = write(staging, cfg, ds, state, events,
                      lambda: read_days(spark, root, layout.sessions("events"), S.EVENTS, upto=ds))
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    log.info("splits %s: %s", ds, stats)
    return stats

