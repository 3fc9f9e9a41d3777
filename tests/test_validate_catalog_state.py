"""The catalog as of a day is a compacted table (``<validated>/catalog_state/ds=D``: item_id, first_ds)
built from the previous state and the day's catalog rows: what it holds, that a daily run does not read
the catalog's history, and that a rerun of an old catalog day is seen by later days as before."""
import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import validate
from jobs.validate_checks import CATALOG_STATE
from schemas import BROWSE_EVENTS, CATALOG, C
from synergen_core import lake
from synergen_core.config import Config

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
STATE = f"validated/{CATALOG_STATE}"


@pytest.fixture(scope="module", autouse=True)
def _spark(spark):
    """Validation runs on the test session's Spark (its stage session reuses an active one)."""
    yield spark


def write(cfg, table, rows, schema, ds):
    part = lake.partition(cfg.lake.root, f"raw/{table}", ds)
    part.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), part / "part-0.parquet")


def browse(eid, item_id, ds):
    ts = dt.datetime.fromisoformat(ds).replace(hour=12, tzinfo=dt.timezone.utc)
    return {C.EVENT_ID: eid, C.USER_ID: "u1", C.TS: ts, C.ITEM_ID: item_id, C.ACTION: "view"}


def items(*ids):
    return [{C.ITEM_ID: i, C.TITLE: f"title of {i}"} for i in ids]


def state(cfg, ds) -> dict[str, str]:
    t = pq.read_table(lake.partition(cfg.lake.root, STATE, ds))
    return dict(zip(t.column(C.ITEM_ID).to_pylist(), t.column(C.FIRST_DS).to_pylist()))


def from_history(cfg, ds) -> dict[str, str]:
    """What the state must hold: every published catalog partition up to ``ds`` read in full (what validation
    read every day before the state existed)."""
    first: dict[str, str] = {}
    for d in lake.days(cfg.lake.root, "validated/catalog", upto=ds):
        for i in pq.read_table(lake.partition(cfg.lake.root, "validated/catalog", d)).column(C.ITEM_ID).to_pylist():
            first[i] = min(first.get(i, d), d)
    return first


def quarantined_ids(cfg, ds):
    return pq.read_table(lake.partition(cfg.lake.root, "quarantine/browse_events", ds)).column(C.EVENT_ID).to_pylist()


@pytest.fixture()
def three_days(tmp_path):
    cfg = Config()
    cfg.lake.root = tmp_path / "lake"
    cfg.validation.max_bad_row_share = 1.0
    write(cfg, "catalog", items("a", "b"), CATALOG, DAYS[0])
    write(cfg, "catalog", items("b", "c"), CATALOG, DAYS[1])  # b again: its first day stays the first
    write(cfg, "catalog", items("d"), CATALOG, DAYS[2])
    for k, ds in enumerate(DAYS):
        write(cfg, "browse_events", [browse(f"e{k}-{i}", i, ds) for i in "abcdx"], BROWSE_EVENTS, ds)
    return cfg


def test_each_daily_run_publishes_the_catalog_as_of_its_day(three_days):
    cfg = three_days
    for ds in DAYS:
        validate.run(cfg, ds)
        assert state(cfg, ds) == from_history(cfg, ds)
    assert state(cfg, DAYS[2]) == {"a": DAYS[0], "b": DAYS[0], "c": DAYS[1], "d": DAYS[2]}
    assert lake.partitions(cfg.lake.root, STATE) == DAYS
    # events are checked against the catalog as of their own day
    assert quarantined_ids(cfg, DAYS[0]) == ["e0-c", "e0-d", "e0-x"]
    assert quarantined_ids(cfg, DAYS[2]) == ["e2-x"]


def test_a_daily_run_reads_the_state_not_the_catalog_history(three_days):
    cfg = three_days
    validate.run(cfg, DAYS[0])
    validate.run(cfg, DAYS[1])
    # Day 1's published catalog made unreadable: day 3 must not need it (its items come from day 2's state).
    for f in lake.data_files(lake.partition(cfg.lake.root, "validated/catalog", DAYS[0])):
        f.write_bytes(b"not parquet any more")
    out = validate.run(cfg, DAYS[2])
    assert out["browse_events"]["rows_quarantined"] == 1 and quarantined_ids(cfg, DAYS[2]) == ["e2-x"]
    assert state(cfg, DAYS[2]) == {"a": DAYS[0], "b": DAYS[0], "c": DAYS[1], "d": DAYS[2]}


def test_a_range_writes_the_state_of_its_last_day(three_days):
    cfg = three_days
    validate.run_range(cfg, DAYS[0], DAYS[2])
    assert lake.partitions(cfg.lake.root, STATE) == [DAYS[2]]
    assert state(cfg, DAYS[2]) == from_history(cfg, DAYS[2])
    assert quarantined_ids(cfg, DAYS[0]) == ["e0-c", "e0-d", "e0-x"]


def test_rerunning_an_old_catalog_day_is_seen_by_later_days(three_days):
    cfg = three_days
    for ds in DAYS:
        validate.run(cfg, ds)
    write(cfg, "catalog", items("b"), CATALOG, DAYS[0])  # re-delivered day 1 without a
    validate.run(cfg, DAYS[0])
    # the states after day 1 held the replaced partition: withdrawn, not trusted
    assert lake.partitions(cfg.lake.root, STATE) == [DAYS[0]]
    assert quarantined_ids(cfg, DAYS[0]) == ["e0-a", "e0-c", "e0-d", "e0-x"]
    validate.run(cfg, DAYS[2])  # built from day 1's state and day 2's published partition
    assert quarantined_ids(cfg, DAYS[2]) == ["e2-a", "e2-x"]
    assert state(cfg, DAYS[2]) == from_history(cfg, DAYS[2]) == {"b": DAYS[0], "c": DAYS[1], "d": DAYS[2]}
    assert not [p for p in (cfg.lake.root / STATE).iterdir() if p.name.startswith(".")]


def test_an_events_only_run_uses_the_state_and_leaves_it(three_days):
    cfg = three_days
    validate.run(cfg, DAYS[0])
    validate.run(cfg, DAYS[1], tables=["catalog"])
    validate.run(cfg, DAYS[1], tables=["browse_events"])
    assert lake.partitions(cfg.lake.root, STATE) == DAYS[:2]
    assert quarantined_ids(cfg, DAYS[1]) == ["e1-d", "e1-x"]


def test_old_states_are_removed_and_a_rerun_before_those_left_reads_the_partitions(three_days):
    cfg = three_days
    cfg.validation.catalog_states_kept = 2
    for ds in DAYS:
        validate.run(cfg, ds)
    assert lake.partitions(cfg.lake.root, STATE) == DAYS[1:]  # each state is a whole catalog: two kept
    write(cfg, "catalog", items("c", "e"), CATALOG, DAYS[1])  # day 2 re-delivered; the state before it is gone
    validate.run(cfg, DAYS[1])
    assert lake.partitions(cfg.lake.root, STATE) == [DAYS[1]]
    assert state(cfg, DAYS[1]) == from_history(cfg, DAYS[1]) == {"a": DAYS[0], "b": DAYS[0], "c": DAYS[1],
                                                                  "e": DAYS[1]}
    assert quarantined_ids(cfg, DAYS[1]) == ["e1-d", "e1-x"]
    assert not [p for p in (cfg.lake.root / STATE).iterdir() if p.name.startswith(".")]
