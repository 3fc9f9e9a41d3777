"""Every bad input validation knows, through ``validate.run``: each row-level case gives rows in = valid +
quarantined with its reason code, each table-level case the one-line error naming the file and field,
with nothing published. Plus a day is published with all its tables or none (issue 25, item 2).

Row cases share one lake (one file per case in the same day's partitions, so one validation run covers
them all); table-level cases fail while reading, before any GE run, so each gets its own tiny lake."""
import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import validate
from jobs.validate import ValidationFailed
from schemas import BROWSE_EVENTS, CATALOG, SEARCH_EVENTS, C
from schemas import reasons as R
from synergen_core import lake
from synergen_core.config import Config
from synergen_core.errors import PipelineError

DS = "2026-01-02"
T0 = dt.datetime(2026, 1, 2, 12, tzinfo=dt.timezone.utc)
SCHEMAS = {"catalog": CATALOG, "search_events": SEARCH_EVENTS, "browse_events": BROWSE_EVENTS}
ID_FIELD = {"catalog": C.ITEM_ID, "search_events": C.EVENT_ID, "browse_events": C.EVENT_ID}


@pytest.fixture(scope="module", autouse=True)
def _spark(spark):
    """Validation runs on the test session's Spark (its stage session reuses an active one): a JVM per
    run would cost seconds each."""
    yield spark


def cfg_for(tmp_path, max_bad_row_share=1.0) -> Config:
    cfg = Config()
    cfg.lake.root = tmp_path / "lake"
    cfg.validation.max_bad_row_share = max_bad_row_share
    return cfg


def write_file(cfg, table, rows, schema=None, name="part-0.parquet", ds=DS):
    part = lake.partition(cfg.lake.root, f"raw/{table}", ds)
    part.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or SCHEMAS[table]), part / name)
    return part / name


def item(iid, **kw):
    return {C.ITEM_ID: iid, C.TITLE: f"title of {iid}", **kw}


def browse(eid, **kw):
    return {C.EVENT_ID: eid, C.USER_ID: "u1", C.TS: T0, C.ITEM_ID: "i1", C.ACTION: "view", C.SURFACE: "home", **kw}


def search(eid, **kw):
    return {C.EVENT_ID: eid, C.USER_ID: "u1", C.TS: T0, C.QUERY: "red lipstick", C.ITEM_ID: "i1",
            C.ACTION: "click", **kw}


def without(schema: pa.Schema, name: str) -> pa.Schema:
    return schema.remove(schema.get_field_index(name))


def retyped(schema: pa.Schema, name: str, typ: pa.DataType) -> pa.Schema:
    return schema.set(schema.get_field_index(name), pa.field(name, typ))


def drop(rows: list[dict], name: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != name} for r in rows]


# ---------------------------------------------------------------- row-level cases
# name -> (table, rows, expected reason per row ("" = valid), schema or None, file name or None). Ids carry
# the case name, so each case's validated rows are found by id and its quarantined rows by source file.
ROW_CASES = {
    "good": ("browse_events", [browse("good-1"), browse("good-2", action="rate", value=4.5)], ["", ""], None, None),
    "late-in-window": ("browse_events", [browse("late-1", ts=T0 - dt.timedelta(days=2))], [""], None, None),
    "castable-type": ("browse_events", [browse("cast-1", user_id=7)], [""],
                      retyped(BROWSE_EVENTS, C.USER_ID, pa.int64()), None),
    "null-user": ("browse_events", [browse("nuser-1", user_id=None)], [R.null(C.USER_ID)], None, None),
    "null-ts": ("browse_events", [browse("nts-1", ts=None)], [R.null(C.TS)], None, None),
    "null-item": ("browse_events", [browse("nitem-1", item_id=None)], [R.null(C.ITEM_ID)], None, None),
    "null-event-id": ("search_events", [search(None)], [R.null(C.EVENT_ID)], None, None),
    "null-query": ("search_events", [search("nq-1", query=None)], [R.null(C.QUERY)], None, None),
    "nan-inf-negative": ("browse_events", [browse("val-1", action="rate", value=float("nan")),
                                           browse("val-2", action="rate", value=float("inf")),
                                           browse("val-3", action="rate", value=-1.0),
                                           browse("val-4", action="rate", value=2e9)],
                         [R.BAD_VALUE] * 4, None, None),
    "ts-outside-day": ("browse_events", [browse("out-1", ts=T0 + dt.timedelta(days=1)),
                                         browse("out-2", ts=T0 - dt.timedelta(days=3))],
                       [R.TS_OUTSIDE_DAY] * 2, None, None),
    "unknown-action": ("search_events", [search("act-1", action="view")], [R.UNKNOWN_ACTION], None, None),
    "unknown-item": ("browse_events", [browse("unk-1", item_id="i999"), browse("unk-2", item_id="i-dup-bad")],
                     [R.UNKNOWN_ITEM] * 2, None, None),
    # white space of any kind, as str.isspace counts it: no-break, ideographic, the ASCII separators too
    "blank-query": ("search_events", [search("blank-1", query=""), search("blank-2", query="  \t"),
                                      search("blank-3", query="\u00a0\u3000"),
                                      search("blank-4", query="\x1c\x1d\x1e\x1f \x85")],
                    [R.EMPTY_QUERY] * 4, None, None),
    "two-faults": ("browse_events", [browse("two-1", action="clik", item_id="i999")],
                   [f"{R.UNKNOWN_ACTION};{R.UNKNOWN_ITEM}"], None, None),
    "duplicate-catalog-id": ("catalog", [item("i-dup"), item("i-dup", title="second row of i-dup")],
                             ["", R.DUPLICATE_ITEM_ID], None, None),
    "catalog-null-title": ("catalog", [item("i-dup-bad", title=None), item(None)],
                           [R.null(C.TITLE), R.null(C.ITEM_ID)], None, None),
    # Same id, different content: all its rows go, nothing says which is right.
    "conflicting-event-id": ("browse_events", [browse("conf-1"), browse("conf-1", action="purchase"),
                                               browse("conf-1")],
                             [R.CONFLICTING_EVENT_ID] * 3, None, None),
    "conflicting-search-id": ("search_events", [search("sconf-1"), search("sconf-1", query="blue mascara")],
                              [R.CONFLICTING_EVENT_ID] * 2, None, None),
    # Same id, same content: a re-delivery, valid (sessionize keeps one); surface is not content.
    "exact-duplicate": ("browse_events", [browse("dup-1"), browse("dup-1"), browse("dup-1", surface="detail")],
                        ["", "", ""], None, None),
    "missing-optional-column": ("browse_events", drop([browse("nosurf-1"), browse("nosurf-2")], C.SURFACE),
                                ["", ""], without(BROWSE_EVENTS, C.SURFACE), None),
    "missing-optional-catalog": ("catalog", [item("i-plain")], [""],
                                 without(without(CATALOG, C.BRAND), C.CATEGORIES), None),
    "parq-suffix": ("search_events", [search("parq-1")], [""], None, "lower.parq"),
    "upper-suffix": ("browse_events", [browse("upper-1")], [""], None, "UPPER.PARQUET"),
}
BASE_CATALOG = [item("i1")]


@pytest.fixture(scope="module")
def row_lake(tmp_path_factory):
    cfg = cfg_for(tmp_path_factory.mktemp("rows"))
    write_file(cfg, "catalog", BASE_CATALOG, name="base.parquet")
    files = {}
    for name, (table, rows, _, schema, file_name) in ROW_CASES.items():
        files[name] = write_file(cfg, table, rows, schema, name=file_name or f"case-{name}.parquet")
    return cfg, files, validate.run(cfg, DS)


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_row_case_is_conserved_with_its_reason(row_lake, case):
    cfg, files, _ = row_lake
    table, rows, want, _, _ = ROW_CASES[case]
    root = cfg.lake.root
    rel = str(files[case].relative_to(root))
    quarantined = [r for r in pq.read_table(lake.partition(root, f"quarantine/{table}", DS)).to_pylist()
                   if r[C.SOURCE_FILE] == rel]
    ids = {r[ID_FIELD[table]] for r in rows} - {None}
    valid = [r for r in pq.read_table(lake.partition(root, f"validated/{table}", DS)).to_pylist()
             if r[ID_FIELD[table]] in ids and (table != "catalog" or r[C.TITLE] in {x[C.TITLE] for x in rows})]
    assert len(valid) + len(quarantined) == len(rows)
    got = [""] * len(rows)
    for r in quarantined:
        got[r[C.SOURCE_ROW]] = r[C.REASON]
    assert got == want


def test_row_cases_add_up_and_the_day_is_marked(row_lake):
    cfg, files, out = row_lake
    for table in validate.TABLES:
        rows_in = sum(len(c[1]) for c in ROW_CASES.values() if c[0] == table) + (table == "catalog")
        t = out[table]
        assert t["rows_in"] == rows_in == t["rows_valid"] + t["rows_quarantined"]
    assert out["browse_events"]["optional_fields_missing"] == [C.SURFACE]
    nosurf = pq.read_table(lake.partition(cfg.lake.root, "validated/browse_events", DS)).to_pylist()
    assert {r[C.SURFACE] for r in nosurf if r[C.EVENT_ID].startswith("nosurf")} == {None}
    assert lake.completed_days(cfg.lake.root, "validated") == [DS]
    marker = json.loads((lake.day_marker(cfg.lake.root, "validated", DS) / "_validation.json").read_text())
    assert marker["tables"]["browse_events"]["rows_in"] == out["browse_events"]["rows_in"]
    assert marker["tables"]["catalog"]["reasons"] == {R.DUPLICATE_ITEM_ID: 1, R.null(C.ITEM_ID): 1,
                                                      R.null(C.TITLE): 1}


# ---------------------------------------------------------------- table-level cases

def good_day(cfg):
    write_file(cfg, "catalog", BASE_CATALOG)
    write_file(cfg, "search_events", [search("s-ok")])
    write_file(cfg, "browse_events", [browse("b-ok")])


def corrupt(cfg):
    part = lake.partition(cfg.lake.root, "raw/browse_events", DS)
    (part / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet at all")
    return part / "corrupt.parquet", None


def truncated(cfg):
    path = write_file(cfg, "search_events", [search(f"t-{k}") for k in range(200)], name="truncated.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, None


def zero_bytes(cfg):
    path = lake.partition(cfg.lake.root, "raw/catalog", DS) / "empty.parquet"
    path.write_bytes(b"")
    return path, None


def epoch(unit_name, scale):
    def build(cfg):
        seconds = int(T0.timestamp())
        rows = [browse(f"ep-{k}", ts=(seconds + k) * scale) for k in range(3)]
        return write_file(cfg, "browse_events", rows, retyped(BROWSE_EVENTS, C.TS, pa.int64()),
                          name="epoch.parquet"), unit_name
    return build


def not_parquet(cfg):
    path = lake.partition(cfg.lake.root, "raw/search_events", DS) / "extra.csv"
    path.write_text("event_id,user_id\ne1,u1\n")
    return path, None


def missing_required(cfg):
    rows = drop([browse("mr-1")], C.USER_ID)
    return write_file(cfg, "browse_events", rows, without(BROWSE_EVENTS, C.USER_ID), name="noid.parquet"), C.USER_ID


def wrong_type(cfg):
    rows = [browse("wt-1", value="lots")]
    return write_file(cfg, "browse_events", rows, retyped(BROWSE_EVENTS, C.VALUE, pa.string()),
                      name="wrongtype.parquet"), C.VALUE


def empty_partition(cfg):
    return write_file(cfg, "browse_events", [], name="part-0.parquet").parent, None


def no_events(cfg):
    for table in ("search_events", "browse_events"):
        for p in lake.partition(cfg.lake.root, f"raw/{table}", DS).iterdir():
            p.unlink()
        lake.partition(cfg.lake.root, f"raw/{table}", DS).rmdir()
    return cfg.lake.root / "raw", None


# name -> (builder returning (what the message names, field or unit it names), extra text expected)
ERROR_CASES = {
    "corrupt-parquet": (corrupt, "not a readable Parquet file"),
    "truncated-parquet": (truncated, "not a readable Parquet file"),
    "zero-byte-parquet": (zero_bytes, "not a readable Parquet file"),
    "epoch-seconds": (epoch("seconds", 1), "'ts' holds numbers"),
    "epoch-milliseconds": (epoch("milliseconds", 1000), "'ts' holds numbers"),
    "not-parquet-file": (not_parquet, "not a Parquet file"),
    "missing-required-field": (missing_required, "missing field"),
    "wrong-type": (wrong_type, "does not convert"),
    "empty-events-partition": (empty_partition, "empty partition"),
    "no-events-partition": (no_events, f"no search_events or browse_events partition for {DS}"),
}


def assert_one_clear_line(msg: str, *names: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 500, msg
    for name in names:
        assert name in msg, (name, msg)


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_table_level_case_fails_in_one_line_and_publishes_nothing(tmp_path, case):
    cfg = cfg_for(tmp_path)
    good_day(cfg)
    build, text = ERROR_CASES[case]
    path, named = build(cfg)
    with pytest.raises(ValidationFailed) as e:
        validate.run(cfg, DS)
    assert isinstance(e.value, PipelineError)
    assert_one_clear_line(str(e.value), str(path), text, *([named] if named else []))
    for area in ("validated", "quarantine"):
        for table in validate.TABLES:
            assert lake.partitions(cfg.lake.root, f"{area}/{table}") == []
    assert lake.completed_days(cfg.lake.root, "validated") == []


def test_a_range_with_nothing_to_validate_fails_clearly(tmp_path):
    cfg = cfg_for(tmp_path)
    with pytest.raises(ValidationFailed) as e:
        validate.run_range(cfg, "2026-01-01", "2026-01-03")
    assert_one_clear_line(str(e.value), str(cfg.lake.root / "raw"), "from 2026-01-01 to 2026-01-03")
    with pytest.raises(ValidationFailed) as e:
        validate.run_range(cfg, "2026-01-03", "2026-01-01")
    assert_one_clear_line(str(e.value), "2026-01-01 is before first day 2026-01-03")


def test_a_day_over_the_bad_row_share_fails_naming_file_row_and_field(tmp_path):
    cfg = cfg_for(tmp_path, max_bad_row_share=0.2)
    good_day(cfg)
    write_file(cfg, "browse_events", [browse("b-ok"), browse("b-bad", user_id=None)])
    with pytest.raises(ValidationFailed) as e:
        validate.run(cfg, DS)
    assert_one_clear_line(str(e.value), f"raw/browse_events/ds={DS}", "part-0.parquet row 1", "null:user_id 1",
                          "max_bad_row_share=20.0%")
    q = pq.read_table(lake.partition(cfg.lake.root, "quarantine/browse_events", DS))
    assert q.column(C.REASON).to_pylist() == ["null:user_id"]


# ---------------------------------------------------------------- a day is published whole or not at all

def test_a_failing_table_holds_back_the_whole_day_until_fixed(tmp_path):
    cfg = cfg_for(tmp_path, max_bad_row_share=0.2)
    root = cfg.lake.root
    write_file(cfg, "catalog", BASE_CATALOG)
    write_file(cfg, "search_events", [search("s1"), search("s2")])
    write_file(cfg, "browse_events", [browse("b1"), browse("b2", action="clik")])  # 50% bad
    with pytest.raises(ValidationFailed, match="browse_events"):
        validate.run(cfg, DS)
    for table in validate.TABLES:
        assert lake.partitions(root, f"validated/{table}") == [], table
        # nothing lost: every table's quarantine and report are there
        report = json.loads((lake.partition(root, f"quarantine/{table}", DS) / "_validation.json").read_text())
        assert report["published"] is False and "browse_events" in report["not_published_because"]
    assert lake.completed_days(root, "validated") == []

    write_file(cfg, "browse_events", [browse("b1"), browse("b2")])  # the fixed delivery
    killed = lake.staging_dir(lake.day_marker(root, "validated", DS))  # a marker a killed run left half written
    validate.run(cfg, DS)
    assert not killed.exists()
    for table in validate.TABLES:
        assert lake.partitions(root, f"validated/{table}") == [DS], table
    assert pq.read_table(lake.partition(root, "validated/browse_events", DS)).num_rows == 2
    assert lake.completed_days(root, "validated") == [DS]
    assert not [p for p in lake.partition(root, "validated/catalog", DS).parent.iterdir() if p.name.startswith(".")]

    # a failing rerun withdraws the marker first; the day's earlier partitions stay, unmarked
    write_file(cfg, "browse_events", [browse("b1"), browse("b2", action="clik")])
    with pytest.raises(ValidationFailed):
        validate.run(cfg, DS)
    assert lake.completed_days(root, "validated") == []


def test_a_range_publishes_its_days_in_order_up_to_the_first_failure(tmp_path):
    cfg = cfg_for(tmp_path, max_bad_row_share=0.2)
    root = cfg.lake.root
    days = ["2026-01-01", "2026-01-02", "2026-01-03"]
    write_file(cfg, "catalog", BASE_CATALOG, ds=days[0])
    for k, day in enumerate(days):
        ts = T0 + dt.timedelta(days=k - 1)
        bad = {C.ACTION: "clik"} if day == days[1] else {}
        write_file(cfg, "search_events", [search(f"s{k}", ts=ts)], ds=day)
        write_file(cfg, "browse_events", [browse(f"b{k}", ts=ts, **bad)], ds=day)
    with pytest.raises(ValidationFailed) as e:
        validate.run_range(cfg, days[0], days[-1])
    assert f"nothing from {days[1]} to {days[2]} was published" in str(e.value)
    assert lake.completed_days(root, "validated") == [days[0]]
    for table in validate.TABLES:
        assert lake.partitions(root, f"validated/{table}") == [days[0]], table
    assert lake.partitions(root, "quarantine/browse_events") == days  # quarantine and reports of every day


def test_a_range_marks_only_the_days_it_had_input_for(tmp_path):
    # A backfill over a sparse history (MovieLens: 25 days with events over 12 years) must not write a
    # marker per calendar day: sessionize asks for markers on days with input only.
    cfg = cfg_for(tmp_path)
    d1, d3 = "2026-01-01", "2026-01-03"
    write_file(cfg, "catalog", BASE_CATALOG, ds=d1)
    write_file(cfg, "browse_events", [browse("b1", ts=T0 - dt.timedelta(days=1))], ds=d1)
    write_file(cfg, "browse_events", [browse("b3", ts=T0 + dt.timedelta(days=1))], ds=d3)
    out = validate.run_range(cfg, d1, d3)
    assert out["days_without_events"] == 1
    assert lake.completed_days(cfg.lake.root, "validated") == [d1, d3]
