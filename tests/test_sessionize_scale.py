"""Sessionize and splits without driver-side structures (jobs.sessionize, jobs.splits, the consumed state).

* The impressions and vocabulary lookups by joins give the rows the former hash-table lookup and
  broadcast joins gave; the contexts sliced from one array per user give the rows the former
  position-range join gave (both former versions are kept here, as the reference).
* The ``consumed`` snapshot equals the consumed items computed from the whole history, and scoring and
  list validation read it alone: a daily run works with the old ``events`` partitions deleted.
"""
from __future__ import annotations

import datetime as dt
import random
import shutil
from pathlib import Path

import pytest
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs import candidates, generate, score, sessionize, splits
from jobs.spark import read_days, spark_schema
from jobs.tokens import event_tokens, sorted_tokens, surface
from schemas import BROWSE_EVENTS, SEARCH_EVENTS, C
from schemas import sequences as S
from synergen_core import lake
from synergen_core.config import Config

# ---------------------------------------------------------------------------------------------
# the former implementations, as they were


def old_hash_table(vocab: DataFrame, key: str, index: str, n: int) -> tuple[DataFrame, int]:
    buckets = max(1024, 1 << (2 * max(n, 1) - 1).bit_length())
    filled = (vocab.where(F.col(key).isNotNull()).groupBy(old_bucket(F.col(key), buckets).alias("_b"))
              .agg(F.collect_list(F.struct(key, index)).alias("_e")))
    table = (vocab.sparkSession.range(buckets).select(F.col("id").cast("int").alias("_b"))
             .join(filled, "_b", "left")
             .agg(F.sort_array(F.collect_list(F.struct("_b", "_e"))).alias("_t"))
             .select(F.transform("_t", lambda b: F.map_from_entries(b["_e"])).alias("_t")))
    return table, buckets


def old_bucket(key: Column, buckets: int) -> Column:
    return F.pmod(F.xxhash64(key), F.lit(buckets)).cast("int")


def old_shown_indices(events: DataFrame, items: DataFrame, n_items: int) -> DataFrame:
    table, buckets = old_hash_table(items, C.ITEM_ID, C.ITEM_INDEX, n_items)
    shown = F.transform(C.IMPRESSIONS, lambda x: F.try_element_at(F.get(F.col("_items"), old_bucket(x, buckets)), x))
    return (events.withColumn("_items", table.scalar())
            .select(*[c for c in events.columns if c != C.IMPRESSIONS],
                    F.filter(shown, lambda i: i.isNotNull()).cast("array<int>").alias(C.SHOWN_ITEMS)))


def old_attach_indices(events: DataFrame, items: DataFrame, queries: DataFrame) -> DataFrame:
    q = queries.select(F.col(C.QUERY).alias("_qkey"), C.QUERY_INDEX)
    e = (events.withColumn("_qkey", sessionize.normalize_query(F.col(C.QUERY)))
         .join(F.broadcast(items.select(C.ITEM_ID, C.ITEM_INDEX)), C.ITEM_ID, "left")
         .join(F.broadcast(q), "_qkey", "left")
         .withColumn(C.SURFACE, surface()))
    engaged = F.coalesce(F.col(C.ITEM_INDEX), F.lit(-1))
    e = e.withColumn(C.SHOWN_ITEMS, F.filter(C.SHOWN_ITEMS, lambda x: x != engaged))
    casts = {C.QUERY_INDEX: "int", C.ITEM_INDEX: "int", C.EVENT_POS: "int", C.POS: "int", C.SESSION: "int",
             C.SHOWN_ITEMS: "array<int>"}
    return e.select(*[F.col(c).cast(casts[c]).alias(c) if c in casts else F.col(c) for c in S.EVENTS.names], C.DS)


def old_with_context(targets: DataFrame, tokens: DataFrame, max_len: int) -> DataFrame:
    t = tokens.select(F.col(C.USER_ID).alias("_u"), F.col(C.POS).alias("_p"), "token")
    near = ((F.col(C.USER_ID) == F.col("_u")) & (F.col("_p") < F.col(C.TARGET_POS))
            & (F.col("_p") >= F.col(C.TARGET_POS) - max_len))
    keys = [c for c in S.SPLIT_EVAL.names if c != C.CONTEXT]
    return targets.join(t, near, "left").groupBy(*keys).agg(sorted_tokens().alias(C.CONTEXT))


def rows(df: DataFrame) -> list:
    return sorted((tuple(r) for r in df.collect()), key=repr)


# ---------------------------------------------------------------------------------------------
# hand-made events with every kind of impression and query


def raw_events(spark, n_users: int = 40, n_events: int = 1500, seed: int = 3):
    """(search, browse, items, queries): events with impressions that are null, empty, with unknown,
    null and repeated ids, and queries in varying case and spacing (some unknown)."""
    rng = random.Random(seed)
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    ids = [f"i{k}" for k in range(260)]  # i0..i199 known, the rest unknown
    texts = ["red lipstick", "Red  Lipstick", " mascara ", "eye liner", "unknown query", "EYE LINER"]
    search, browse = [], []
    for k in range(n_events):
        user, ts = f"u{rng.randrange(n_users)}", t0 + dt.timedelta(minutes=rng.randrange(3 * 24 * 60))
        shown = rng.choice([None, [], None] + [[rng.choice(ids + [None]) for _ in range(rng.randrange(1, 7))]] * 4)
        item = rng.choice(ids + [None])
        row = {C.EVENT_ID: f"e{k}", C.USER_ID: user, C.TS: ts, C.ITEM_ID: item, C.IMPRESSIONS: shown,
               C.DS: ts.date().isoformat()}
        if rng.random() < 0.4:
            search.append({**row, C.QUERY: rng.choice(texts), C.ACTION: "click" if item else "none"})
        else:
            browse.append({**row, C.ITEM_ID: item or "i1", C.ACTION: "view", C.SURFACE: "home",
                           C.VALUE: float(rng.randrange(3))})
    s = spark.createDataFrame(search, spark_schema(SEARCH_EVENTS))
    b = spark.createDataFrame(browse, spark_schema(BROWSE_EVENTS))
    items = spark.createDataFrame([(k + 1, f"i{k}") for k in range(200)], f"{C.ITEM_INDEX} int, {C.ITEM_ID} string")
    queries = spark.createDataFrame([(1, "red lipstick"), (2, "mascara"), (3, "eye liner")],
                                    f"{C.QUERY_INDEX} int, {C.QUERY} string")
    return s, b, items, queries


def test_lookups_by_joins_give_the_rows_of_the_hash_table_and_broadcasts(spark):
    s, b, items, queries = raw_events(spark)
    unique = sessionize.dedup(sessionize.unify(s, b))
    before = old_attach_indices(sessionize.sessionize(old_shown_indices(unique, items, 200), None, 30.0),
                                items, queries)
    after = sessionize.attach_indices(sessionize.sessionize(unique, None, 30.0), items, queries)
    assert after.columns == before.columns
    want, got = rows(before), rows(after)
    assert len(got) == len(want) > 1000 and got == want
    shown = [r[C.SHOWN_ITEMS] for r in after.collect()]
    # every case occurred: not logged, empty, and known ids
    assert None in shown and [] in shown and any(x for x in shown)
    plan = after._jdf.queryExecution().optimizedPlan().toString()
    assert "ScalarSubquery" not in plan and "scalar-subquery" not in plan


@pytest.mark.parametrize("holes", [False, True])
def test_contexts_sliced_per_user_give_the_rows_of_the_range_join(spark, holes):
    """Leave-one-out targets and every engagement as a target, over whole histories; with ``holes``
    some tokens are missing (the filter fallback), which a real history never has."""
    s, b, items, queries = raw_events(spark, seed=5)
    events = sessionize.attach_indices(sessionize.sessionize(sessionize.dedup(sessionize.unify(s, b)), None, 30.0),
                                       items, queries).cache()
    try:
        tokens = event_tokens(events)
        if holes:
            tokens = tokens.where((F.col(C.POS) % 7) != 3)
        engaged = splits.engagements(events)
        for targets in (splits.loo_targets(engaged), engaged.withColumn(C.SPLIT, F.lit(S.SPLIT_TEST))):
            for max_len in (1, 4, 50):
                want = rows(old_with_context(targets, tokens, max_len).select(*S.SPLIT_EVAL.names))
                got = rows(splits.with_context(targets, tokens, max_len).select(*S.SPLIT_EVAL.names))
                assert len(got) == len(want) > 0 and got == want, max_len
    finally:
        events.unpersist()


# ---------------------------------------------------------------------------------------------
# the consumed state, on generated days


def day_lake(root: Path, output: str, days: int = 4) -> tuple[Config, list[str]]:
    cfg = Config()
    cfg.lake.root = root
    cfg.spark.shuffle_partitions = 2
    cfg.sessionize.source, cfg.sessionize.output = "raw", output  # generated without malformed rows
    for key, value in {"days": days, "events": 2_500, "users": 100, "items": 200, "categories": 6,
                       "impressions": 3, "malformed_share": 0.0}.items():
        setattr(cfg.generate, key, value)
    return cfg, generate.run(cfg, "2026-02-01")["days"]


def consumed_from_history(spark, cfg: Config, ds: str, n_items: int) -> dict[str, list[int]]:
    """The former rule: every catalog item of the user's events up to ds."""
    events = read_days(spark, cfg.lake.root, cfg.layout.sessions("events"), S.EVENTS, upto=ds)
    got = (events.where(F.col(C.ITEM_INDEX).between(1, n_items - 1))
           .groupBy(C.USER_ID).agg(F.array_sort(F.collect_set(C.ITEM_INDEX)).alias("c")).collect())
    return {r[C.USER_ID]: list(r["c"]) for r in got}


@pytest.fixture(scope="module")
def daily(spark, tmp_path_factory):
    """Every day but the last run one by one into ``daily``, and every day in one bulk run into ``bulk``."""
    root = tmp_path_factory.mktemp("consumed") / "lake"
    cfg, days = day_lake(root, "daily")
    for d in days[:-1]:
        sessionize.run(spark, cfg, d)
    sessionize.run(spark, with_output(cfg, "bulk"), days[-1], from_ds=days[0])
    return cfg, days


def with_output(cfg: Config, output: str) -> Config:
    out = cfg.model_copy(deep=True)
    out.sessionize.output = output
    return out


def assert_same_day(spark, root: Path, a: str, b: str, ds: str, tables: tuple[str, ...]) -> None:
    for table in tables:
        left = spark.read.parquet(str(lake.partition(root, f"{a}/{table}", ds)))
        right = spark.read.parquet(str(lake.partition(root, f"{b}/{table}", ds)))
        assert left.count() > 0 or table.endswith("_eval"), table
        assert left.exceptAll(right).count() == 0 and right.exceptAll(left).count() == 0, table


def test_consumed_snapshot_is_the_history_rule_and_score_reads_it_alone(spark, daily):
    cfg, days = daily
    ds = days[-2]
    n_items = 150  # a model older than the vocabulary: the read-time filter drops the newer items
    expected = consumed_from_history(spark, cfg, ds, n_items)
    assert len(expected) > 50
    got = score.consumed_items(spark, cfg, ds, n_items)
    assert {r[C.USER_ID]: list(r[score.CONSUMED_COLUMN]) for r in got.collect()} == expected
    assert all(r[score.N_CONSUMED] == len(r[score.CONSUMED_COLUMN]) for r in got.collect())
    pairs = candidates.consumed_pairs(spark, cfg, ds, n_items)
    assert sorted(pairs.select(C.USER_ID, C.ITEM_INDEX).collect()) == sorted(
        (u, i) for u, items in expected.items() for i in items)
    # neither reads a partition of events: only the consumed snapshot of ds
    snap = lake.partition(cfg.lake.root, cfg.layout.sessions("consumed"), ds)
    for df in (got, pairs):
        files = [Path(f.removeprefix("file:")) for f in df.inputFiles()]
        assert files and all(f.parent == snap for f in files), files
    # unfiltered, the snapshot is every item of the history
    full = consumed_from_history(spark, cfg, ds, 10**9)
    snap_rows = lake.data_files(snap)
    assert snap_rows and full == {r[C.USER_ID]: list(r[C.CONSUMED]) for r in spark.read.parquet(str(snap)).collect()}


def test_a_daily_run_needs_no_events_older_than_its_duplicate_window(spark, daily):
    """The last day run on a lake whose events before the duplicate window are deleted gives the same
    state and temporal split as one bulk run over every day (which reads everything)."""
    cfg, days = daily
    root = Path(cfg.lake.root)
    shutil.copytree(root / "daily", root / "pruned")
    window_start = (dt.date.fromisoformat(days[-1]) - dt.timedelta(days=cfg.validation.late_days)).isoformat()
    old = [d for d in lake.partitions(root, "pruned/events") if d < window_start]
    assert old
    for d in old:
        shutil.rmtree(lake.partition(root, "pruned/events", d))
    stats = sessionize.run(spark, with_output(cfg, "pruned"), days[-1])
    assert stats["state_ds"] == days[-2] and stats["input_days"] == 1
    assert_same_day(spark, root, "bulk", "pruned", days[-1], ("sequences", "item_vocab", "query_vocab", "consumed",
                                                               "split_temporal_train", "split_temporal_eval"))
    assert not lake.partition(root, "pruned/split_loo_train", days[-1]).exists()  # the default: temporal only


def test_a_state_without_consumed_items_gets_them_from_the_history_once(spark, daily):
    """A lake sessionized before the consumed snapshot existed: the next run rebuilds it from the events."""
    cfg, days = daily
    root = Path(cfg.lake.root)
    shutil.copytree(root / "daily", root / "legacy")
    shutil.rmtree(root / "legacy" / "consumed")
    sessionize.run(spark, with_output(cfg, "legacy"), days[-1])
    assert_same_day(spark, root, "bulk", "legacy", days[-1], ("consumed", "sequences"))
