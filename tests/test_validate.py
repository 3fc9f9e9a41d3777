"""Validation: each rule on a hand-broken input, rows conserved, table-level failures, reports."""
import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import validate
from jobs.validate import ValidationFailed
from schemas import BROWSE_EVENTS, CATALOG, SEARCH_EVENTS, TS_DERIVED_KEY, C
from synergen_core import lake
from synergen_core.config import Config

DS = "2026-01-02"
T0 = dt.datetime(2026, 1, 2, 12, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module", autouse=True)
def _spark(spark):
    """Validation runs on the test session's Spark (its stage session reuses an active one): a JVM per
    run would cost seconds each."""
    yield spark


def cfg_for(tmp_path, **validate_overrides) -> Config:
    cfg = Config()
    cfg.lake.root = tmp_path / "lake"
    for k, v in validate_overrides.items():
        setattr(cfg.validation, k, v)
    return cfg


def write_raw(cfg, table, rows, schema, ds=DS, name="part-0.parquet"):
    part = lake.partition(cfg.lake.root, f"raw/{table}", ds)
    part.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), part / name)
    return part / name


def catalog_rows():
    return [
        {C.ITEM_ID: "i1", C.TITLE: "red lipstick", C.CATEGORIES: ["beauty", "lips"]},
        {C.ITEM_ID: "i2", C.TITLE: "blue mascara", C.CATEGORIES: ["beauty", "eyes"]},
        {C.ITEM_ID: "i2", C.TITLE: "duplicate of i2"},  # duplicate_item_id: first row kept
        {C.ITEM_ID: "i3", C.TITLE: None},  # null:title
        {C.ITEM_ID: None, C.TITLE: "no id"},  # null:item_id
    ]


def browse(eid, **kw):
    row = {C.EVENT_ID: eid, C.USER_ID: "u1", C.TS: T0, C.ITEM_ID: "i1", C.ACTION: "view", C.SURFACE: "home"}
    row.update(kw)
    return row


def search(eid, **kw):
    row = {C.EVENT_ID: eid, C.USER_ID: "u1", C.TS: T0, C.QUERY: "red lipstick", C.ITEM_ID: "i1", C.ACTION: "click"}
    row.update(kw)
    return row


BROWSE_CASES = {
    "b-ok": ({}, ""),
    "b-late": ({C.TS: T0 - dt.timedelta(days=1)}, ""),  # within late_days=2
    "b-rating": ({C.ACTION: "rate", C.VALUE: 4.5}, ""),
    "b-null-user": ({C.USER_ID: None}, "null:user_id"),
    "b-null-ts": ({C.TS: None}, "null:ts"),
    "b-null-item": ({C.ITEM_ID: None}, "null:item_id"),
    "b-future": ({C.TS: T0 + dt.timedelta(days=1)}, "ts_outside_day"),
    "b-too-late": ({C.TS: T0 - dt.timedelta(days=3)}, "ts_outside_day"),
    "b-action": ({C.ACTION: "clik"}, "unknown_action"),
    "b-unknown-item": ({C.ITEM_ID: "i999"}, "unknown_item"),
    "b-dropped-item": ({C.ITEM_ID: "i3"}, "unknown_item"),  # its catalog row was quarantined
    "b-nan": ({C.VALUE: float("nan")}, "bad_value"),
    "b-negative": ({C.VALUE: -1.0}, "bad_value"),
    "b-inf": ({C.VALUE: float("inf")}, "bad_value"),
    "b-two": ({C.ACTION: "clik", C.ITEM_ID: "i999"}, "unknown_action;unknown_item"),
}
SEARCH_CASES = {
    "s-ok": ({}, ""),
    "s-no-click": ({C.ITEM_ID: None, C.ACTION: "none"}, ""),
    "s-empty": ({C.QUERY: ""}, "empty_query"),
    "s-blank": ({C.QUERY: "   "}, "empty_query"),
    "s-null-query": ({C.QUERY: None}, "null:query"),
    "s-null-event": ({C.EVENT_ID: None}, "null:event_id"),
    "s-action": ({C.ACTION: "view"}, "unknown_action"),  # a browse action is not a search action
}


@pytest.fixture()
def broken_lake(tmp_path):
    cfg = cfg_for(tmp_path, max_bad_row_share=1.0)
    write_raw(cfg, "catalog", catalog_rows(), CATALOG)
    write_raw(cfg, "browse_events", [browse(k, **kw) for k, (kw, _) in BROWSE_CASES.items()], BROWSE_EVENTS)
    write_raw(cfg, "search_events", [search(k, **kw) for k, (kw, _) in SEARCH_CASES.items()], SEARCH_EVENTS)
    return cfg


def quarantined(cfg, table, ds=DS):
    return pq.read_table(lake.partition(cfg.lake.root, f"quarantine/{table}", ds)).to_pylist()


def validated(cfg, table, ds=DS):
    return pq.read_table(lake.partition(cfg.lake.root, f"validated/{table}", ds))


def test_every_rule_quarantines_with_its_reason(broken_lake):
    cfg = broken_lake
    out = validate.run(cfg, DS)
    for table, cases in (("browse_events", BROWSE_CASES), ("search_events", SEARCH_CASES)):
        got = {r[C.EVENT_ID]: r[C.REASON] for r in quarantined(cfg, table)}
        # the row whose event id is null comes back keyed by None
        want = {(None if k == "s-null-event" else k): reason for k, (_, reason) in cases.items() if reason}
        assert got == want, table
        ok = set(validated(cfg, table).column(C.EVENT_ID).to_pylist())
        assert ok == {k for k, (_, reason) in cases.items() if not reason}
    cat_q = {(r[C.ITEM_ID], r[C.TITLE]): r[C.REASON] for r in quarantined(cfg, "catalog")}
    assert cat_q == {("i2", "duplicate of i2"): "duplicate_item_id", ("i3", None): "null:title",
                     (None, "no id"): "null:item_id"}
    assert validated(cfg, "catalog").column(C.TITLE).to_pylist() == ["red lipstick", "blue mascara"]
    assert out["browse_events"]["reasons"]["bad_value"] == 3
    assert out["browse_events"]["reasons"]["unknown_item"] == 3


def test_rows_are_conserved_and_traceable(broken_lake):
    cfg = broken_lake
    out = validate.run(cfg, DS)
    for table, n in (("catalog", 5), ("browse_events", len(BROWSE_CASES)), ("search_events", len(SEARCH_CASES))):
        q = quarantined(cfg, table)
        assert validated(cfg, table).num_rows + len(q) == n == out[table]["rows_in"]
        for r in q:  # every quarantined row names its file and row
            assert r[C.SOURCE_FILE] == f"raw/{table}/ds={DS}/part-0.parquet"
            assert 0 <= r[C.SOURCE_ROW] < n
    q = {r[C.EVENT_ID]: r[C.SOURCE_ROW] for r in quarantined(cfg, "browse_events")}
    assert q["b-future"] == list(BROWSE_CASES).index("b-future")


def test_reports_are_saved_beside_the_data(broken_lake):
    cfg = broken_lake
    validate.run(cfg, DS)
    part = lake.partition(cfg.lake.root, "validated/browse_events", DS)
    summary = json.loads((part / "_validation.json").read_text())
    assert summary["rows_in"] == len(BROWSE_CASES) and summary["reasons"]["ts_outside_day"] == 2
    ge = json.loads((part / "_validation.ge.json").read_text())
    assert ge["success"] is False and len(ge["results"]) == 10
    assert "check_value_in_range" in (part / "_validation.html").read_text()
    assert (part / lake.SUCCESS).exists()


def test_rerun_is_idempotent(broken_lake):
    cfg = broken_lake
    validate.run(cfg, DS)
    first = validated(cfg, "browse_events")
    validate.run(cfg, DS)
    assert validated(cfg, "browse_events").equals(first)
    part = lake.partition(cfg.lake.root, "validated/browse_events", DS)
    assert [p.name for p in part.parent.iterdir()] == [part.name]  # no staging folders left behind


def test_bad_share_over_threshold_fails_naming_file_field_and_counts(broken_lake):
    cfg = broken_lake
    validate.run(cfg, DS, tables=["catalog"])
    cfg.validation.max_bad_row_share = 0.2
    with pytest.raises(ValidationFailed) as e:
        validate.run(cfg, DS, tables=["browse_events"])
    msg = str(e.value)
    assert f"raw/browse_events/ds={DS}" in msg and "max_bad_row_share=20.0%" in msg
    assert "bad_value 3" in msg and "null:user_id 1" in msg
    assert "part-0.parquet row 3" in msg  # the first bad row: b-null-user
    # quarantine is written for inspection, validated data is not published
    assert len(quarantined(cfg, "browse_events")) == 12
    assert not lake.partition(cfg.lake.root, "validated/browse_events", DS).exists()
    report = lake.partition(cfg.lake.root, "quarantine/browse_events", DS) / "_validation.json"
    assert json.loads(report.read_text())["rows_quarantined"] == 12


def test_wrong_schema_fails_naming_file_and_field(tmp_path):
    cfg = cfg_for(tmp_path)
    write_raw(cfg, "catalog", catalog_rows()[:2], CATALOG)
    schema = BROWSE_EVENTS.remove(BROWSE_EVENTS.get_field_index(C.USER_ID))
    path = write_raw(cfg, "browse_events", [browse("b1")], schema)
    with pytest.raises(ValidationFailed, match=f"{path}: missing field 'user_id'"):
        validate.run(cfg, DS, tables=["browse_events"])
    bad_type = BROWSE_EVENTS.set(BROWSE_EVENTS.get_field_index(C.VALUE), pa.field(C.VALUE, pa.string()))
    path = write_raw(cfg, "browse_events", [browse("b1", value="lots")], bad_type)
    with pytest.raises(ValidationFailed, match="field 'value' has type string"):
        validate.run(cfg, DS, tables=["browse_events"])


def test_castable_types_and_extra_fields_are_accepted(tmp_path):
    cfg = cfg_for(tmp_path)
    write_raw(cfg, "catalog", catalog_rows()[:2], CATALOG)
    schema = pa.schema([pa.field(C.USER_ID, pa.int64()) if f.name == C.USER_ID else f for f in BROWSE_EVENTS])
    schema = schema.append(pa.field("session_hint", pa.string()))
    write_raw(cfg, "browse_events", [browse("b1", user_id=7, session_hint="x")], schema)
    out = validate.run(cfg, DS, tables=["catalog", "browse_events"])
    assert out["browse_events"]["extra_fields_ignored"] == ["session_hint"]
    assert validated(cfg, "browse_events").column(C.USER_ID).to_pylist() == ["7"]


def test_the_files_flags_are_kept_in_the_days_report(tmp_path):
    """A raw file's synergen.* footer flags (ingest marks times derived from order) reach the day's report."""
    cfg = cfg_for(tmp_path)
    write_raw(cfg, "catalog", catalog_rows()[:2], CATALOG)
    write_raw(cfg, "browse_events", [browse("b1")], BROWSE_EVENTS.with_metadata({TS_DERIVED_KEY: b"true"}))
    validate.run(cfg, DS)
    part = lake.partition(cfg.lake.root, "validated/browse_events", DS)
    summary = json.loads((part / "_validation.json").read_text())
    assert summary["source_metadata"] == {TS_DERIVED_KEY.decode(): "true"}
    catalog = json.loads((lake.partition(cfg.lake.root, "validated/catalog", DS) / "_validation.json").read_text())
    assert "source_metadata" not in catalog


def test_missing_or_empty_events_partition_fails(tmp_path):
    cfg = cfg_for(tmp_path)
    write_raw(cfg, "catalog", catalog_rows()[:2], CATALOG)
    with pytest.raises(ValidationFailed, match="no search_events or browse_events partition for 2026-01-02"):
        validate.run(cfg, DS)
    write_raw(cfg, "search_events", [], SEARCH_EVENTS)
    with pytest.raises(ValidationFailed, match=r"search_events/ds=2026-01-02: empty partition \(0 rows"):
        validate.run(cfg, DS)


def test_a_source_without_search_logs_validates(tmp_path):
    cfg = cfg_for(tmp_path)
    write_raw(cfg, "catalog", catalog_rows()[:2], CATALOG)
    write_raw(cfg, "browse_events", [browse("b1")], BROWSE_EVENTS)
    out = validate.run(cfg, DS)
    assert out["search_events"]["rows_in"] == 0 and out["browse_events"]["rows_valid"] == 1


def test_range_validates_each_day_against_the_catalog_as_of_that_day(tmp_path):
    cfg = cfg_for(tmp_path, max_bad_row_share=1.0)
    d1, d2 = "2026-01-01", "2026-01-02"
    write_raw(cfg, "catalog", catalog_rows()[:1], CATALOG, ds=d1)
    write_raw(cfg, "catalog", [{C.ITEM_ID: "i9", C.TITLE: "new on day 2"}], CATALOG, ds=d2)
    t1 = T0 - dt.timedelta(days=1)
    write_raw(cfg, "browse_events", [browse("a", ts=t1), browse("b", ts=t1, item_id="i9")], BROWSE_EVENTS, ds=d1)
    write_raw(cfg, "browse_events", [browse("c", item_id="i9")], BROWSE_EVENTS, ds=d2)
    write_raw(cfg, "browse_events", [browse("d", ts=T0 + dt.timedelta(days=2))], BROWSE_EVENTS, ds="2026-01-04")
    out = validate.run_range(cfg, d1, "2026-01-04", tables=["catalog", "browse_events"])
    assert out["browse_events"]["days"] == 3 and out["days_without_events"] == 1  # 01-03 had none
    assert [r[C.EVENT_ID] for r in quarantined(cfg, "browse_events", d1)] == ["b"]  # i9 not yet in the catalog
    assert validated(cfg, "browse_events", d2).column(C.EVENT_ID).to_pylist() == ["c"]
    summary = json.loads((lake.partition(cfg.lake.root, "validated/browse_events", d1) / "_validation.json").read_text())
    assert summary["rows_in"] == 2 and summary["ge_report"].startswith("validated/browse_events/_reports/")


def test_tracked_stage_logs_counts_reports_and_failures_to_mlflow(broken_lake, tmp_path):
    import mlflow

    from jobs import stages

    cfg = broken_lake
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.mlflow.artifact_root = tmp_path / "artifacts"
    stages.validate_raw(cfg, DS, group="run-1")
    cfg.validation.max_bad_row_share = 0.2
    with pytest.raises(ValidationFailed):
        stages.validate_raw(cfg, DS, group="run-2")
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    runs = {(r.data.tags["synergen.group"], r.data.tags["synergen.stage"]): r
            for r in client.search_runs([client.get_experiment_by_name("synergen").experiment_id])}
    ok, failed = runs[("run-1", "validate_raw")], runs[("run-2", "validate_raw")]
    assert ok.data.tags["mlflow.parentRunId"] == runs[("run-1", "pipeline")].info.run_id
    assert ok.data.metrics["browse_events.rows_in"] == len(BROWSE_CASES)
    assert ok.data.metrics["browse_events.quarantined.bad_value"] == 3
    assert ok.data.params["validate.max_bad_row_share"] == "1.0" and ok.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(ok.info.run_id, f"validation/browse_events/ds={DS}")} == {
        f"validation/browse_events/ds={DS}/_validation.json", f"validation/browse_events/ds={DS}/_validation.html"}
    assert failed.info.status == "FAILED" and "max_bad_row_share" in failed.data.tags["synergen.failure"]
    # every table was validated (all problems of the day in one run) and none published: each report
    # comes from its quarantine
    for table in validate.TABLES:
        assert [a.path for a in client.list_artifacts(failed.info.run_id, f"validation/{table}/ds={DS}")] == [
            f"validation/{table}/ds={DS}/_validation.html", f"validation/{table}/ds={DS}/_validation.json"]
    assert failed.data.tags["synergen.failure"].count("\n") <= 1


def test_validated_rows_go_to_the_layer_the_config_names(tmp_path):
    """``sessionize.source`` names the validated layer: validation writes there and marks its days there."""
    cfg = cfg_for(tmp_path)
    cfg.sessionize.source = "checked"
    write_raw(cfg, "catalog", catalog_rows()[:2], CATALOG)
    write_raw(cfg, "browse_events", [browse("b1")], BROWSE_EVENTS)
    validate.run(cfg, DS)
    assert lake.partitions(cfg.lake.root, "checked/browse_events") == [DS]
    assert lake.completed_days(cfg.lake.root, "checked") == [DS]
    assert not (cfg.lake.root / "validated").exists()


def test_validation_refuses_to_write_over_raw_input(tmp_path):
    """With ``sessionize.source: raw`` the validated layer would be the raw input itself: refused, input intact."""
    cfg = cfg_for(tmp_path)
    cfg.sessionize.source = "raw"
    written = write_raw(cfg, "browse_events", [browse("b1"), browse("b2", **{C.USER_ID: None})], BROWSE_EVENTS)
    before = sorted(p.name for p in written.parent.iterdir())
    with pytest.raises(validate.ConfigError, match="sessionize.source is 'raw'"):
        validate.run(cfg, DS)
    assert sorted(p.name for p in written.parent.iterdir()) == before
    assert pq.read_table(written).num_rows == 2
