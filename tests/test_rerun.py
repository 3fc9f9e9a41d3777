"""Reruns give the same lake: generated days validated in one range run (a backfill) and sessionized one
by one, then every day rerun (validation of the day alone, and sessionize) out of order, and once more
after a run killed mid-publish. Every sessionize table (events, sequences, vocabularies, split tables of
both protocols) must hold the same rows as after the first run, every day, and no staging folder may be
left behind.

The lake is small (3 days, ~3,000 events): the module runs in about three minutes on 2 cores.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import polars as pl
import pytest

from jobs import generate, sessionize, validate
from jobs.spark import Staging
from schemas import C
from schemas import sequences as S
from synergen_core import lake
from synergen_core.config import Config

START = "2026-02-01"
# A unique key per row of each table: sorting by it makes equal row sets compare equal.
KEYS = {"events": [C.USER_ID, C.EVENT_POS], "sequences": [C.USER_ID], "consumed": [C.USER_ID],
        "item_vocab": [C.ITEM_INDEX],
        "query_vocab": [C.QUERY_INDEX], "split_loo_train": [C.USER_ID], "split_temporal_train": [C.USER_ID],
        "split_loo_eval": [C.USER_ID, C.TASK, C.SPLIT, C.TARGET_POS],
        "split_temporal_eval": [C.USER_ID, C.TASK, C.SPLIT, C.TARGET_POS]}


def small_lake(root) -> tuple[Config, list[str]]:
    cfg = Config()
    cfg.lake.root = root
    cfg.spark.shuffle_partitions = 2
    cfg.sessionize.splits = ["loo", "temporal"]
    for key, value in {"days": 3, "events": 3_000, "users": 120, "items": 300, "categories": 8,
                       "impressions": 4, "malformed_share": 0.01}.items():
        setattr(cfg.generate, key, value)
    days = generate.run(cfg, START)["days"]
    return cfg, days


def tables(cfg: Config) -> dict[tuple[str, str], pl.DataFrame]:
    """Every published partition of every sessionize table, sorted by its key."""
    out = {}
    for table in S.TABLES:
        name = f"{cfg.sessionize.output}/{table}"
        for d in lake.partitions(cfg.lake.root, name):
            files = lake.data_files(lake.partition(cfg.lake.root, name, d))
            t = pa.concat_tables([pq.read_table(f) for f in files]) if files else S.TABLES[table].empty_table()
            out[(table, d)] = pl.from_arrow(t).sort(KEYS[table])
    return out


def assert_same(first: dict, now: dict, when: str) -> None:
    assert sorted(now) == sorted(first), f"{when}: other partitions than the first run's"
    for key, df in first.items():
        assert now[key].height == df.height, f"{when}: {key} has {now[key].height} rows, first run {df.height}"
        assert now[key].equals(df), f"{when}: {key} differs from the first run"


def leftovers(cfg: Config) -> list[str]:
    """Hidden folders beside the partitions: staging or replaced partitions (not Spark's .crc files inside)."""
    base = cfg.lake.root / cfg.sessionize.output
    return sorted(f"{t.name}/{p.name}" for t in base.iterdir() for p in t.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def first(spark, tmp_path_factory):
    cfg, days = small_lake(tmp_path_factory.mktemp("rerun") / "lake")
    validate.run_range(cfg, days[0], days[-1])  # as a backfill would: the reruns below validate day by day
    stats = {d: sessionize.run(spark, cfg, d) for d in days}
    return {"cfg": cfg, "days": days, "stats": stats, "tables": tables(cfg)}


def test_first_run_is_what_later_runs_are_compared_with(first):
    t, days = first["tables"], first["days"]
    assert sorted({d for _, d in t}) == days and len(t) == len(S.TABLES) * len(days)
    for d in days:
        assert t[("split_loo_eval", d)].height > 0 and t[("split_temporal_eval", d)].height > 0
        assert t[("events", d)].height == first["stats"][d]["events"] > 0
    # each day's leave-one-out evaluation has one test and one valid row per user and task at most
    loo = t[("split_loo_eval", days[-1])]
    assert loo.group_by(C.USER_ID, C.TASK, C.SPLIT).len()["len"].max() == 1


def test_rerun_every_day_out_of_order_gives_the_same_tables(spark, first):
    """Days 3, 1, 2 validated and sessionized again. Day 1 has no earlier state: before the fix its
    leave-one-out history read the published events of every day on top of the new ones (targets and
    training tokens counted twice)."""
    cfg, days = first["cfg"], first["days"]
    for d in (days[2], days[0], days[1]):
        validate.run(cfg, d)
        sessionize.run(spark, cfg, d)
        assert_same(first["tables"], tables(cfg), f"after rerunning {d}")
    assert leftovers(cfg) == []


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, and nothing is cleaned up after it."""


def test_rerun_after_a_run_killed_mid_publish(spark, first, monkeypatch):
    """A run of day 2 killed in its publish: two partitions are replaced, the third is moved aside and
    never replaced (the kill between ``lake.publish``'s two renames), the rest still staged, and no
    cleanup runs. Readers still see every day as the first run made it; the next run of the stage
    removes the killed run's staging folders and gives the same tables."""
    cfg, days = first["cfg"], first["days"]
    publish, calls = lake.publish, []

    def publish_then_die(tmp, final):
        calls.append(final)
        if len(calls) == 3:
            final.rename(final.parent / f".{final.name}.old-0badc0de")
            raise Killed()
        return publish(tmp, final)

    with monkeypatch.context() as m:
        m.setattr(lake, "publish", publish_then_die)
        m.setattr(Staging, "discard", lambda self: None)  # a killed process cleans nothing up
        with pytest.raises(Killed):
            sessionize.run(spark, cfg, days[1])
    assert any("/.run-" in name for name in leftovers(cfg)), "the kill should leave staging behind"
    # a half-written partition of an earlier kill, too
    (cfg.lake.root / cfg.sessionize.output / "events" / f".ds={days[1]}.tmp-0badc0de").mkdir()

    assert_same(first["tables"], tables(cfg), "after the kill, before any rerun")  # readers recover the day
    sessionize.run(spark, cfg, days[1])
    assert_same(first["tables"], tables(cfg), f"after rerunning {days[1]}")
    assert leftovers(cfg) == []
