"""The sessionize stage: validated search + browse events -> sessionized event history, token sequences,
vocabularies (and, through ``jobs.splits``, training and evaluation splits). Spark DataFrame API with
built-in and window functions only: no Python UDFs.

Inputs: ``<lake>/<sessionize.source>/{search_events,browse_events,catalog}/ds=D`` (default source
``validated``; ``raw`` works for inputs known to be clean, e.g. the benchmark's). Outputs: the tables
of ``schemas.sequences`` under ``<lake>/<sessionize.output>/`` (default ``sessionized``).

Incremental state. The state after day D is the ``sequences`` snapshot of D (every user's counters
and latest tokens) plus the ``item_vocab`` / ``query_vocab`` / ``consumed`` snapshots of D plus the
``events`` history up to D (of which a daily run reads only the last ``validate.late_days`` days, for
duplicates; leave-one-out splits, when asked for, read it all). A run for D reads the latest ``sequences`` snapshot before D (normally D-1) and
processes every input day after it up to D in one batch: a normal daily run processes D alone, a
first run or a gap catches up on all missing days, and ``run(..., from_ds=F)`` (the bulk entry)
starts from the latest snapshot before F, so a backfill over thousands of days is one Spark job,
never a per-day loop. Nothing in the batch depends on how days are grouped into runs, so days 1..N
one by one give the same tables as one bulk run over 1..N (for validated input: see Duplicates).

Order and sessions. A user's history is ordered by (arrival day, ts, event_id): the day an event
arrived in (its input partition), then its time, then its id as the deterministic tie-break. An
inactivity gap of more than ``gap_minutes`` starts a new session. Positions, sessions and gaps are
continued from the state's counters, so history already written never changes.

Late-event rule. An event whose ts is before the day it arrived in is LATE (validation lets them in
up to ``validate.late_days`` days back). A late event is never inserted into history written on an
earlier day: it is appended at its arrival, after everything the user had, keeping its real ts.
For gaps and sessions the time used is the running maximum of the user's event times, so a late
event older than the user's latest known event is CLAMPED to that time: gap 0, it joins the user's
current session, and the next event's gap is measured from the latest time as before. A late event
newer than everything the user had is simply in time order. Late and clamped events are flagged in
``events`` and counted in the run's stats.

Duplicates. Exact duplicates (same user, event id, ts and content) are one event: the copy that
arrived first is kept and later copies are dropped, also when the first is already in the history.
A copy has the first's ts, which validation admits at most ``validate.late_days`` days late, so a
run looks for earlier copies in that many days of history before its first input day, not in all of
it (input that skipped validation could hide older copies from a daily run). Validation quarantines
every row of a partition that shares its event id with a row of different content
(``schemas.raw.EVENT_CONTENT``); such rows in different day partitions still reach here, are not
duplicates and are both kept. The count of
dropped rows is in the stats.

Vocabularies. Items of the catalog and of events, and normalized query texts (lower case, inner
whitespace collapsed, trimmed), get indices from 1; a known key keeps its index forever and new keys
are appended in order of (first day seen, key). Counts are tokens so far.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs import splits
from jobs.spark import Staging, count_rows, read_days, session, spark_schema
from jobs.tokens import event_tokens, surface, token_count, update_consumed, update_sequences
from schemas import BROWSE_EVENTS, CATALOG, SEARCH_EVENTS, C
from schemas import sequences as S
from synergen_core import lake
from synergen_core.config import Config, parse_ds
from synergen_core.errors import PipelineError

log = logging.getLogger(__name__)

EVENTS, SEQUENCES, ITEM_VOCAB, QUERY_VOCAB = "events", "sequences", "item_vocab", "query_vocab"
CONSUMED = "consumed"
INPUTS = {"search_events": SEARCH_EVENTS, "browse_events": BROWSE_EVENTS, "catalog": CATALOG}
STATS_FILE = "_stats.json"
DEDUP_KEY = [C.USER_ID, C.EVENT_ID, C.TS, C.KIND, C.QUERY, C.ITEM_ID, C.ACTION, C.VALUE]
# A user's history order: arrival day, time, id; the content breaks ties between rows sharing an id.
ORDER = [C.DS, C.TS, C.EVENT_ID, C.KIND, C.ITEM_ID, C.ACTION, C.QUERY, C.VALUE]


# ---------------------------------------------------------------------------------------------
# DataFrame steps (pure: DataFrames in, DataFrame out)


def unify(search: DataFrame, browse: DataFrame) -> DataFrame:
    """Search and browse events as one stream with ``kind`` (both carry ``ds``, the arrival day)."""
    none = F.lit(None)
    s = search.select(C.EVENT_ID, C.USER_ID, C.TS, F.lit(S.KIND_SEARCH).alias(C.KIND), C.QUERY,
                      C.ITEM_ID, C.ACTION, none.cast("double").alias(C.VALUE), C.IMPRESSIONS, C.DS)
    b = browse.select(C.EVENT_ID, C.USER_ID, C.TS, F.lit(S.KIND_BROWSE).alias(C.KIND),
                      none.cast("string").alias(C.QUERY), C.ITEM_ID, C.ACTION, C.VALUE, C.IMPRESSIONS, C.DS)
    return s.unionByName(b)


def dedup(events: DataFrame, seen: DataFrame | None = None) -> DataFrame:
    """Exact duplicates collapsed to their first arrival (``ds``), minus rows whose copy is in ``seen``.

    An aggregate on the whole row; partitioning by user first lets it and the session window share
    one shuffle. Impressions are not part of the key (the same event logged twice is one event);
    copies that differ in them keep the smallest list, so the choice does not depend on row order.

    The smallest list is not a fixed-width value, so the aggregate sorts (a hash aggregate cannot hold
    it). It sorts once only if no key is floating point: Spark normalizes such a key (-0.0, NaN) in
    the partial step, which then no longer merges with the final one, and every event with its
    impressions is sorted twice. So ``value`` is grouped by its text, normalized the same way first:
    a double's text reads back as the same double.
    """
    value = F.when(F.col(C.VALUE) == 0, F.lit(0.0)).otherwise(F.col(C.VALUE))  # -0.0 as 0.0; NaN is "NaN"
    keys = [value.cast("string").alias(C.VALUE) if c == C.VALUE else F.col(c) for c in DEDUP_KEY]
    first = (events.repartition(C.USER_ID)
             .groupBy(*keys).agg(F.min(F.to_date(C.DS)).alias("_first"), F.min(C.IMPRESSIONS).alias(C.IMPRESSIONS))
             .select(*[F.col(c).cast("double").alias(c) if c == C.VALUE else c for c in DEDUP_KEY], C.IMPRESSIONS,
                     F.date_format("_first", "yyyy-MM-dd").alias(C.DS)))
    if seen is None:
        return first
    same = [F.col(f"a.{c}").eqNullSafe(F.col(f"b.{c}")) for c in DEDUP_KEY]
    return first.alias("a").join(seen.select(*DEDUP_KEY).alias("b"), same, "left_anti")


def sessionize(events: DataFrame, state: DataFrame | None, gap_minutes: float) -> DataFrame:
    """Add ``event_pos``, ``pos``, ``session``, ``gap_s``, ``late`` and ``clamped``, continuing ``state``.

    ``state``: one row per known user with ``n_events``, ``n_tokens``, ``last_session`` and
    ``watermark`` (latest event time); None when there is none (a first run: no join at all).
    See the module docstring for the order and the late rule.
    """
    carried = {C.N_EVENTS: "long", C.N_TOKENS: "long", C.LAST_SESSION: "int", C.WATERMARK: "timestamp"}
    if state is None:
        events_st = events.select("*", *[F.lit(None).cast(t).alias(f"_{c}") for c, t in carried.items()])
    else:
        events_st = events.join(state.select(C.USER_ID, *[F.col(c).alias(f"_{c}") for c in carried]),
                                C.USER_ID, "left")
    order = Window.partitionBy(C.USER_ID).orderBy(*ORDER)
    before = order.rowsBetween(Window.unboundedPreceding, -1)
    upto = order.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    # The effective time is the running max of ts, seeded with the state's watermark.
    prev = F.greatest(F.max(C.TS).over(before), F.col(f"_{C.WATERMARK}"))
    gap = (F.unix_micros(F.greatest(F.col(C.TS), prev)) - F.unix_micros(prev)) / 1e6
    ntok = token_count()
    step1 = events_st.select(
        "*",
        gap.alias(C.GAP_S),
        (F.col(C.TS) < prev).alias(C.CLAMPED),
        (F.col(C.TS) < F.to_timestamp(F.col(C.DS))).alias(C.LATE),
        (F.coalesce(F.col(f"_{C.N_EVENTS}"), F.lit(0)) + F.row_number().over(order) - 1).alias(C.EVENT_POS),
        (F.coalesce(F.col(f"_{C.N_TOKENS}"), F.lit(0)) + F.sum(ntok).over(upto) - ntok).alias(C.POS),
    )
    starts = F.coalesce((F.col(C.GAP_S) > gap_minutes * 60).cast("int"), F.lit(0))
    session = F.coalesce(F.col(f"_{C.LAST_SESSION}"), F.lit(0)) + F.sum(starts).over(upto)
    return step1.select(
        *[c for c in events.columns], C.GAP_S, F.coalesce(F.col(C.CLAMPED), F.lit(False)).alias(C.CLAMPED),
        C.LATE, C.EVENT_POS, C.POS, session.alias(C.SESSION),
    )


def normalize_query(col: Column) -> Column:
    """The vocabulary key of a query: lower case, runs of whitespace as one space, trimmed."""
    return F.trim(F.regexp_replace(F.lower(col), r"\s+", " "))


def extend_vocab(known: DataFrame, seen: DataFrame, key: str, index: str, n_known: int) -> tuple[DataFrame, int]:
    """``known`` (index, key, first_ds; ``n_known`` rows) plus keys of ``seen`` (key, ds) it lacks,
    with new indices; and how many keys are new.

    New keys are numbered after the largest known index in order of (first day seen, key): the same
    whether their days arrive one run at a time or in one batch. Numbering is a window per first
    day plus that day's offset; the offsets come from per-day counts (one small row per day).
    """
    base = n_known + S.FIRST_INDEX - 1  # indices are dense: the largest is the count
    new = (seen.where(F.col(key).isNotNull()).groupBy(key).agg(F.min(C.DS).alias(C.FIRST_DS))
           .join(known.select(key), key, "left_anti"))
    offsets, total = [], base
    # Collected: one row per first day among the input days (a backfill's thousands at most), never per key.
    for first_ds, n in sorted(new.groupBy(C.FIRST_DS).count().collect()):
        offsets.append((first_ds, total))
        total += n
    offset = known.sparkSession.createDataFrame(offsets, f"{C.FIRST_DS} string, _offset long")
    rank = F.row_number().over(Window.partitionBy(C.FIRST_DS).orderBy(key))
    numbered = new.join(F.broadcast(offset), C.FIRST_DS).select(
        (F.col("_offset") + rank).cast("int").alias(index), key, C.FIRST_DS)
    return known.select(index, key, C.FIRST_DS).unionByName(numbered), total - base


def with_counts(vocab: DataFrame, known: DataFrame, tokens: DataFrame, index: str) -> DataFrame:
    """Vocabulary rows with ``count`` = the state's count + this batch's tokens of each index."""
    fresh = tokens.groupBy(index).agg(F.count("*").alias("_new"))
    old = known.select(index, F.col(C.COUNT).alias("_old"))
    total = F.coalesce(F.col("_old"), F.lit(0)) + F.coalesce(F.col("_new"), F.lit(0))
    return (vocab.join(old, index, "left").join(fresh, index, "left")
            .select(index, *[c for c in vocab.columns if c != index], total.cast("long").alias(C.COUNT)))


def lookups(events: DataFrame, items: DataFrame, queries: DataFrame) -> DataFrame:
    """Per event (``user_id``, ``event_pos``) with an item, a query or impressions: its ``item_index``,
    ``query_index`` and ``shown_items``, the shown ids as indices in display order without the ids the
    vocabulary lacks (every item of the catalog or of an event has an index, so only items never
    listed anywhere are left out); null when the event logged none, empty when none is known.

    Plain joins: the engaged item and the shown ids are one exploded column looked up in one join
    with the item vocabulary, the query in a join with the query vocabulary, and the rows grouped
    back per event. Nothing grows with the vocabularies in a task or on the driver; AQE may still
    broadcast a vocabulary under its size threshold (a setting, so bounded).
    """
    key = [C.USER_ID, C.EVENT_POS]
    ids = F.concat(F.array(F.col(C.ITEM_ID)), F.coalesce(F.col(C.IMPRESSIONS), F.array().cast("array<string>")))
    none = F.lit(None).cast("int")
    # position 0: the engaged item; 1..n: the shown ids. Inner joins: null and unknown ids drop out.
    item_rows = (events.select(*key, F.posexplode(ids).alias("_at", C.ITEM_ID))
                 .join(items.select(C.ITEM_ID, C.ITEM_INDEX), C.ITEM_ID)
                 .select(*key, "_at", C.ITEM_INDEX, none.alias(C.QUERY_INDEX)))
    query_rows = (events.where(F.col(C.QUERY).isNotNull())
                  .select(*key, normalize_query(F.col(C.QUERY)).alias(C.QUERY))
                  .join(queries.select(C.QUERY, C.QUERY_INDEX), C.QUERY)
                  .select(*key, F.lit(-1).alias("_at"), none.alias(C.ITEM_INDEX), C.QUERY_INDEX))
    shown = F.array_sort(F.collect_list(F.when(F.col("_at") > 0, F.struct("_at", C.ITEM_INDEX))))
    return (item_rows.unionByName(query_rows).groupBy(*key).agg(
        F.max(F.when(F.col("_at") == 0, F.col(C.ITEM_INDEX))).alias(C.ITEM_INDEX),
        F.max(C.QUERY_INDEX).alias(C.QUERY_INDEX),
        F.transform(shown, lambda x: x[C.ITEM_INDEX]).alias("_shown")))


def attach_indices(events: DataFrame, items: DataFrame, queries: DataFrame) -> DataFrame:
    """Sessionized events in the ``schemas.sequences.EVENTS`` layout (+ ``ds``), with item and query
    indices and the shown items (``lookups``) without the engaged one (empty when it was the only one
    shown, null when none were logged).

    One join of every event, on (user_id, event_pos), brings all three back: a shuffle of the events
    without their impressions (the lookups shuffle the exploded ids, a few ints and one id each).
    """
    key = [C.USER_ID, C.EVENT_POS]
    logged = F.col(C.IMPRESSIONS).isNotNull().alias("_logged")
    e = (events.select(*[c for c in events.columns if c != C.IMPRESSIONS], logged)
         .join(lookups(events, items, queries), key, "left").withColumn(C.SURFACE, surface()))
    engaged = F.coalesce(F.col(C.ITEM_INDEX), F.lit(-1))
    known = F.filter(F.coalesce(F.col("_shown"), F.array().cast("array<int>")), lambda x: x != engaged)
    e = e.withColumn(C.SHOWN_ITEMS, F.when(F.col("_logged"), known))
    casts = {C.QUERY_INDEX: "int", C.ITEM_INDEX: "int", C.EVENT_POS: "int", C.POS: "int", C.SESSION: "int",
             C.SHOWN_ITEMS: "array<int>"}
    return e.select(*[F.col(c).cast(casts[c]).alias(c) if c in casts else F.col(c) for c in S.EVENTS.names],
                    C.DS)


# ---------------------------------------------------------------------------------------------
# the job over the lake


def state_day(cfg: Config, before: str) -> str | None:
    """The day of the latest ``sequences`` snapshot strictly before ``before`` (None: no state)."""
    layout = cfg.layout
    prev = layout.day_before(layout.sessions(SEQUENCES), before)
    for table in (ITEM_VOCAB, QUERY_VOCAB) if prev else ():
        if not layout.part(layout.sessions(table), prev).is_dir():
            raise FileNotFoundError(f"state of {prev}: sequences snapshot without its {table} snapshot")
    return prev


def input_days(cfg: Config, after: str | None, upto: str) -> list[str]:
    """Input days in ``(after, upto]`` that have a published partition of any input table."""
    return _days_with(cfg.layout, cfg.layout.valid, after, upto)


def _days_with(layout: lake.Layout, table_of, after: str | None, upto: str) -> list[str]:
    """Days in ``(after, upto]`` with a partition of any input table; ``table_of``: the layer's naming."""
    return sorted(set().union(*(layout.days(table_of(t), after, upto) for t in INPUTS)))


def check_inputs(cfg: Config, prev: str | None, start: str, ds: str, days: list[str]) -> None:
    """Refuse a run whose input is incomplete, instead of sessionizing what happens to be there.

    From ``validated``, every input day must carry validation's day marker (``lake.completed_days``):
    without it a day may hold some of its tables only (validation failed or was killed halfway). A
    raw day without the marker would be skipped silently, so it is refused too: every raw day after
    the state, or, on a first run (no state), from ``start`` on (older raw days are history the caller
    did not ask for). ``raw`` input (benchmarks) is complete by contract and needs no marker.
    A run with no input event at all (missing or empty upstream) is refused rather than publishing
    empty partitions as if the day were done.
    """
    root, src = Path(cfg.lake.root), cfg.sessionize.source
    if src != lake.RAW:
        done = set(lake.completed_days(root, src))
        raw = _days_with(cfg.layout, cfg.layout.raw, prev if prev else lake.previous_day(start), ds)
        missing = sorted((set(days) | set(raw)) - done)
        if missing:
            more = f" (and {len(missing) - 1} more day(s) up to {missing[-1]})" if len(missing) > 1 else ""
            raise PipelineError(
                f"sessionize {ds}: day {missing[0]}{more} has input but its validation did not complete "
                f"(no {src}/{lake.DAYS}/ds={missing[0]}): run `synergen validate --ds {missing[0]}` first")
    rows = sum(n for t in ("search_events", "browse_events")
               for n in count_rows(root, cfg.layout.valid(t), after=prev, upto=ds).values())
    if rows == 0:
        span = (f"the days up to ds={ds}" if prev is None else f"ds={ds}" if lake.next_day(prev) == ds
                else f"ds={lake.next_day(prev)}..{ds}")
        raise PipelineError(
            f"sessionize {ds}: no input events in {src}/search_events or {src}/browse_events for {span} "
            f"(under {root}): run the upstream stage for that day first, or check lake.root")


def run(spark: SparkSession, cfg: Config, ds: str, from_ds: str | None = None) -> dict:
    """Sessionize every input day after the latest state before ``from_ds`` (default ``ds``) up to
    ``ds``; publish their ``events`` partitions, the state snapshots of ``ds`` and the splits of ``ds``
    (``sessionize.splits``). Returns the run's counts (also in ``sequences/ds=D/_stats.json``).

    A rerun replaces what it writes and gives the same tables. Rerunning a day that later days were
    built on replaces that day only: rerun the later days too if its input changed.
    """
    ds = parse_ds(ds).isoformat()
    start = parse_ds(from_ds).isoformat() if from_ds else ds
    if start > ds:
        raise ValueError(f"from_ds {start} is after ds {ds}")
    t0 = time.perf_counter()
    prev = state_day(cfg, start)
    days = input_days(cfg, prev, ds)
    check_inputs(cfg, prev, start, ds, days)
    for table in written_tables(cfg):
        lake.remove_stale(cfg.lake.root, table)
    # A day published before in this range but without input now is replaced by an empty partition.
    stale = cfg.layout.days(cfg.layout.sessions(EVENTS), after=prev, upto=ds)
    if len(days) > 1 or (days and days[0] != ds):
        log.info("sessionize %s: %d input days after state %s", ds, len(days), prev)
    staging = Staging(spark, cfg.lake.root)
    cached: list[DataFrame] = []
    try:
        stats = _process(spark, cfg, staging, cached, ds, prev, days, sorted(set(days) | set(stale) | {ds}))
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        staging.add_side_file(cfg.layout.sessions(SEQUENCES), ds, STATS_FILE, json.dumps(stats, indent=2))
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    finally:
        for df in cached:
            df.unpersist()
    log.info("sessionize %s: %s", ds, stats)
    return stats


def _process(spark, cfg: Config, staging: Staging, cached: list, ds: str, prev: str | None,
             days: list[str], out_days: list[str]) -> dict:
    root = Path(cfg.lake.root)
    inputs = {t: read_days(spark, root, cfg.layout.valid(t), c, after=prev, upto=ds) for t, c in INPUTS.items()}
    # Not cached: the vocabularies (and a daily run's duplicate check) read two of its columns, which
    # is all Parquet reads, and the sessions read it once. A cached copy would hold every event's
    # impressions (8 ids each by default, ~4x the rest of the row) in one block per input file: at 20M
    # events, blocks of ~0.8 GiB built beside the vocabularies' sort ran a 4 GiB driver out of heap.
    raw = unify(inputs["search_events"], inputs["browse_events"])
    state = _state(spark, cfg, prev)

    item_seen = raw.select(C.ITEM_ID, C.DS).unionByName(inputs["catalog"].select(C.ITEM_ID, C.DS))
    query_seen = raw.select(normalize_query(F.col(C.QUERY)).alias(C.QUERY), C.DS)
    sizes = {t: sum(count_rows(root, cfg.layout.sessions(t), after=lake.previous_day(prev), upto=prev).values()) if prev else 0
             for t in (ITEM_VOCAB, QUERY_VOCAB)}  # from Parquet footers: no Spark job
    items, new_items = extend_vocab(state["items"], item_seen, C.ITEM_ID, C.ITEM_INDEX, sizes[ITEM_VOCAB])
    queries, new_queries = extend_vocab(state["queries"], query_seen, C.QUERY, C.QUERY_INDEX, sizes[QUERY_VOCAB])
    items, queries = _cache(cached, items), _cache(cached, queries)

    unique = dedup(raw, _recent_copies(spark, cfg, raw, prev, days))
    # On local disk: attach_indices reads it twice (the events, and their ids for the lookups), and the
    # window is the costly step; in memory it would hold every event's impressions as id strings.
    sessions = _cache(cached, sessionize(unique, state["sequences"] if prev else None, cfg.sessionize.gap_minutes),
                      StorageLevel.DISK_ONLY)
    # Cached: written as the day partitions, then the source of sequences, counts, stats and splits.
    events = _cache(cached, attach_indices(sessions, items, queries))
    # More days than cores: one task per day still uses them all, and each day gets one file instead of one per task.
    staging.write_days(events, cfg.layout.sessions(EVENTS), out_days,
                       shuffle_by_day=len(out_days) > spark.sparkContext.defaultParallelism)

    toks = event_tokens(events)
    for vocab, known, index, table in ((items, state["items"], C.ITEM_INDEX, ITEM_VOCAB),
                                       (queries, state["queries"], C.QUERY_INDEX, QUERY_VOCAB)):
        used = toks.select(F.col(f"token.{index}").alias(index)).where(F.col(index).isNotNull())
        staging.write_day(with_counts(vocab, known, used, index), cfg.layout.sessions(table), ds)
    staging.write_day(update_consumed(state["consumed"], events), cfg.layout.sessions(CONSUMED), ds)
    # Staged after the vocabularies and consumed items so it is published after them: it marks the day's
    # state complete.
    seqs = update_sequences(state["sequences"], events, cfg.sessionize.max_seq_len)
    staging.write_day(seqs, cfg.layout.sessions(SEQUENCES), ds)

    # Published events up to the state only: a rerun must not read the partitions it is replacing
    # (without a state, upto=None would read them all and count them twice).
    history = lambda: (events if prev is None  # noqa: E731
                       else read_days(spark, root, cfg.layout.sessions(EVENTS), S.EVENTS, upto=prev).unionByName(events))
    split_stats = splits.write(staging, cfg, ds, state["sequences"], events, history)

    rows_in = {kind: sum(count_rows(root, cfg.layout.valid(t), after=prev, upto=ds).values())
               for kind, t in ((S.KIND_SEARCH, "search_events"), (S.KIND_BROWSE, "browse_events"))}
    out = _event_stats(events)
    return {
        "ds": ds, "state_ds": prev, "input_days": len(days),
        "input_first_ds": days[0] if days else None, "input_last_ds": days[-1] if days else None,
        "rows_in": rows_in, "duplicates_dropped": sum(rows_in.values()) - out["events"], **out,
        "new_items": new_items, "new_queries": new_queries, "splits": split_stats,
    }


def _cache(cached: list, df: DataFrame, level: StorageLevel | None = None) -> DataFrame:
    cached.append(df.persist(level) if level else df.cache())
    return df


def _recent_copies(spark, cfg: Config, raw: DataFrame, prev: str | None, days: list[str]) -> DataFrame | None:
    """Published events (their ``DEDUP_KEY``) that the input repeats exactly.

    An exact copy has the same ts, and validation admits an event only up to ``validate.late_days``
    days after its ts, so every copy arrives within that many days of the first: only the history
    partitions from ``late_days`` before the first input day can hold one (never the whole history).
    """
    if prev is None or not days:
        return None
    after = (parse_ds(days[0]) - dt.timedelta(days=cfg.validation.late_days + 1)).isoformat()
    past = read_days(spark, cfg.lake.root, cfg.layout.sessions(EVENTS), S.EVENTS, after=after, upto=prev)
    return past.select(*DEDUP_KEY).join(raw.select(C.USER_ID, C.EVENT_ID).distinct(),
                                        [C.USER_ID, C.EVENT_ID], "left_semi")


def _state(spark, cfg: Config, prev: str | None) -> dict[str, DataFrame]:
    tables = {"sequences": (SEQUENCES, S.SEQUENCES), "items": (ITEM_VOCAB, S.ITEM_VOCAB),
              "queries": (QUERY_VOCAB, S.QUERY_VOCAB), "consumed": (CONSUMED, S.CONSUMED)}
    if prev is None:
        return {k: spark.createDataFrame([], spark_schema(c, with_ds=False)) for k, (_, c) in tables.items()}
    state = {k: read_days(spark, cfg.lake.root, cfg.layout.sessions(t), c, after=lake.previous_day(prev), upto=prev).drop(C.DS)
             for k, (t, c) in tables.items()}
    if not cfg.layout.part(cfg.layout.sessions(CONSUMED), prev).is_dir():
        # A state written before consumed items were part of it: rebuilt once from the history up to it.
        log.warning("sessionize: no %s snapshot of %s; rebuilding it from the events up to %s", CONSUMED, prev, prev)
        history = read_days(spark, cfg.lake.root, cfg.layout.sessions(EVENTS), S.EVENTS, upto=prev)
        state["consumed"] = update_consumed(state["consumed"], history)
    return state


def _event_stats(events: DataFrame) -> dict:
    row = events.agg(
        F.count("*").alias("events"),
        F.coalesce(F.sum(F.col(C.LATE).cast("int")), F.lit(0)).alias("late_events"),
        F.coalesce(F.sum(F.col(C.CLAMPED).cast("int")), F.lit(0)).alias("clamped_events"),
        F.countDistinct(C.USER_ID).alias("users_with_events"),
        F.coalesce(F.sum(token_count()), F.lit(0)).alias("tokens"),
    ).first()
    return row.asDict()


def written_tables(cfg: Config) -> list[str]:
    """Every table a run writes (its stale staging folders are this stage's to remove)."""
    return [cfg.layout.sessions(t) for t in (EVENTS, ITEM_VOCAB, QUERY_VOCAB, CONSUMED, SEQUENCES)] + splits.tables(cfg)


# ---------------------------------------------------------------------------------------------
# entry points for the CLI and Airflow


def stage(cfg: Config, ds: str, from_ds: str | None = None) -> dict:
    """The pipeline stage (CLI ``synergen sessionize``, Airflow): ``run`` in a session from ``cfg.spark``.

    The session is stopped at the end unless it was already active (a caller's).
    """
    with session(cfg) as spark:
        return run(spark, cfg, ds, from_ds)
