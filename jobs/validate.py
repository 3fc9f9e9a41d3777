"""Stage 1: validate raw partitions with Great Expectations; quarantine bad rows with a reason.

For each table and day: ``raw/<table>/ds=D`` -> ``validated/<table>/ds=D`` (rows that pass, same
contract) + ``quarantine/<table>/ds=D`` (rows that fail, with ``_reason``, ``_source_file`` and
``_source_row``). Valid + quarantined = input rows, always. Both are published atomically, so a rerun
replaces the day. Beside the validated data: ``_validation.json`` (the day's counts) and, for a
single-day run, the GE result (``_validation.ge.json``) and its data docs page (``_validation.html``).

A day is published whole or not at all. Every table's validated output is staged first; only when no
table of day D failed are D's tables published, and then D is marked complete
(``validated/_days/ds=D`` with a ``_validation.json`` of the day's counts per table), which is what
sessionize reads (days without any raw partition have nothing to publish and get no marker). A run
first withdraws the markers of the days it validates, so a day being replaced is never marked while its
tables change. The quarantine is always published, and a day that is not
published keeps its report with the quarantine, so nothing is lost. In a range, days are published in
order up to the first day that failed; that day and every later one are not (the marker is the
contract downstream, but later days' events are checked against the failed day's catalog, and history is
built in day order, so publishing past a hole would invite a gap filled out of order). A run limited to
some tables (``--table``) publishes those tables the same way but marks no day: only a run of every
table knows the day is whole.

Table-level failures raise ``ValidationFailed`` (a ``PipelineError``: a one- or two-line message naming
the file, field and counts) before anything is published: a file that is not Parquet or cannot be read,
a file that does not match the contract (a required field missing, a type that does not convert,
numbers where a timestamp belongs), an events partition that is empty, a day with no events partition in
either events table (for a one-day run; for a range, a range with none at all). A day over
``validate.max_bad_row_share`` fails after its quarantine and report are written.
Reading the raw files into contract-shaped batches (and its one-line errors) is ``jobs/raw_files.py``.

The catalog is validated first: events are checked against the catalog as of their day (the published
one, with this run's days replaced by their staged rows). A range of days is validated as one batch (one
GE run per table), which keeps long histories such as MovieLens (thousands of days) fast; every day
still gets its own partitions and counts.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import C, quarantine_schema
from jobs.raw_files import EVENT_TABLES, Batch, ValidationFailed, read_batch
from schemas import suites
from schemas.raw import EVENT_CONTENT
from synergen_core import lake
from synergen_core.config import Config, ConfigError, parse_ds

log = logging.getLogger(__name__)

TABLES = ("catalog", "search_events", "browse_events")
DAY_US = 86_400 * 1_000_000


@dataclass
class StagedDay:
    """One table's day, written aside: its validated rows (unless the day failed on its own) and its
    quarantine, published or dropped once every table of the day is known."""

    table: str
    day: str
    summary: dict
    report: "Report"
    quarantine: Path
    valid: Path | None  # None when the day failed its own checks
    failure: str | None = None


def run(cfg: Config, ds: str, tables: list[str] | None = None) -> dict:
    """Validate one day."""
    return run_range(cfg, ds, ds, tables)


def run_range(cfg: Config, first_ds: str, last_ds: str, tables: list[str] | None = None) -> dict:
    """Validate every raw partition in ``[first_ds, last_ds]``: catalog first, then events; publish the
    days whose tables all passed (in order, up to the first that failed) and mark them complete."""
    layout = cfg.layout
    root, layer = layout.root, layout.validated
    if layer == lake.RAW:  # the validated layer is sessionize.source: raw would publish over the input
        raise ConfigError("validate: sessionize.source is 'raw' (sessionize reads unvalidated logs), so validation would "
                          "write over its input; set sessionize.source to another layer (default 'validated')")
    chosen = [t for t in TABLES if not tables or t in tables]
    first_ds, last_ds = parse_ds(first_ds).isoformat(), parse_ds(last_ds).isoformat()  # a bad day: one line
    if last_ds < first_ds:
        raise ValidationFailed(f"validate: last day {last_ds} is before first day {first_ds}; give the first day first")
    days = lake.day_range(first_ds, last_ds)
    # what a killed run left aside; runs are serialized, so nothing live is removed
    for table in [*(area(t) for t in chosen for area in (layout.valid, layout.quarantine)), layout.valid(lake.DAYS)]:
        lake.remove_stale(root, table)
    # The days' contents are about to change: their markers go first, so downstream never sees a marked
    # day half replaced (a crash leaves them unmarked, and the rerun marks them again).
    for day in [d for d in lake.completed_days(root, layer) if first_ds <= d <= last_ds]:
        lake.unmark_day(root, layer, day)
    days_without_events = _check_days_have_events(layout, first_ds, last_ds)
    present = {t: layout.days(layout.raw(t), lake.previous_day(first_ds), last_ds) for t in chosen}
    # Every file is read before any GE run: unreadable or off-contract input fails in seconds, and
    # before anything is staged.
    batches = {t: read_batch(layout, t, present[t]) for t in chosen if present[t]}

    result: dict = {"days_without_events": len(days_without_events)}
    staged: list[StagedDay] = []
    try:
        staged_catalog = None
        for table in chosen:
            t0 = time.perf_counter()
            if table not in batches:  # e.g. the catalog on a day nothing changed, or a source with no search logs
                result[table] = {"days": 0, "rows_in": 0, "rows_valid": 0, "rows_quarantined": 0, "reasons": {}}
                continue
            batch = batches.pop(table)  # staged on disk once validated: free it
            counts, table_days, valid_ids = validate_batch(cfg, batch, present[table], staged_catalog)
            if table == "catalog":
                staged_catalog = valid_ids
            staged += table_days
            result[table] = {**counts, "seconds": round(time.perf_counter() - t0, 3)}
        failures, report_dirs = _publish(layout, chosen, days, staged)
    finally:
        for s in staged:  # whatever was not published
            for tmp in (s.quarantine, s.valid):
                if tmp is not None and tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    for table in chosen:
        result[table]["report_dirs"] = [d for d in report_dirs if d.parent.name == table]
    if failures:
        raise ValidationFailed(_failure_message(failures, days), report_dirs)
    return result


def _publish(layout: lake.Layout, chosen: list[str], days: list[str], staged: list[StagedDay]
             ) -> tuple[list[StagedDay], list[Path]]:
    """Publish day by day up to the first day any table failed; mark those days complete when every
    table was validated. Returns the failed table-days and where each table-day's report is."""
    failures = sorted((s for s in staged if s.failure), key=lambda s: (s.day, TABLES.index(s.table)))
    first_failed = min((s.day for s in failures), default=None)
    by_day: dict[str, list[StagedDay]] = {}
    for s in staged:
        by_day.setdefault(s.day, []).append(s)
    report_dirs = []
    for day in days:
        publish = first_failed is None or day < first_failed
        for s in by_day.get(day, []):
            if publish:
                s.summary["published"] = True
                lake.publish(s.quarantine, layout.part(layout.quarantine(s.table), day))
                report_dirs.append(_publish_with(s.valid, layout.part(layout.valid(s.table), day),
                                                 s.report.side_files(s.summary)))
            else:
                # Not published: the report goes with the quarantine, and the previous validated
                # partition (if any) stays as it was, unmarked.
                s.summary["published"] = False
                s.summary["not_published_because"] = (
                    s.failure or _blocker(failures, day, first_failed))
                report_dirs.append(_publish_with(s.quarantine, layout.part(layout.quarantine(s.table), day),
                                                 s.report.side_files(s.summary)))
        # Days without any raw partition have nothing to publish and get no marker (a backfill over a
        # sparse history would otherwise write thousands): downstream asks for markers on days with input.
        if publish and len(chosen) == len(TABLES) and day in by_day:
            counts = {t: _day_counts(by_day.get(day, []), t) for t in TABLES}
            lake.mark_day_complete(layout.root, layout.validated, day, {"_validation.json": json.dumps(
                {"ds": day, "tables": counts}, indent=1)})
    return failures, report_dirs


def _publish_with(tmp: Path, final: Path, side_files: dict[str, str]) -> Path:
    for name, text in side_files.items():
        (tmp / name).write_text(text)
    return lake.publish(tmp, final)


def _day_counts(day_tables: list[StagedDay], table: str) -> dict | None:
    """A table's counts for the day marker; None when the day had no raw partition of that table."""
    for s in day_tables:
        if s.table == table:
            return {k: s.summary[k] for k in ("rows_in", "rows_valid", "rows_quarantined", "reasons")}
    return None


def _blocker(failures: list[StagedDay], day: str, first_failed: str) -> str:
    same_day = [f"{f.table} {f.day}" for f in failures if f.day == day]
    if same_day:
        return f"{', '.join(same_day)} failed validation: a day is published with all its tables or none"
    return f"an earlier day of the range ({first_failed}) failed: days are published in order"


def _failure_message(failures: list[StagedDay], days: list[str]) -> str:
    """The first failure in full; the others, if any, named on a second line."""
    first, last = failures[0], days[-1]
    unpublished = (f"nothing of {first.day} was published" if first.day == last
                   else f"nothing from {first.day} to {last} was published")
    others = [f"{f.table} {f.day}" for f in failures[1:]]
    if not others:
        return f"{first.failure} ({unpublished})"
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return f"{first.failure}\nAlso failed: {shown} (reports with their quarantine); {unpublished}."


def _check_days_have_events(layout: lake.Layout, first_ds: str, last_ds: str) -> list[str]:
    """Days in the range with no events partition in either events table.

    A daily run (one day) with none fails: upstream did not deliver, and training on a gap is worse than
    stopping. A range (a backfill over history, e.g. MovieLens) reports such days and goes on: real
    histories have days without events; a range without a single one fails (nothing to validate is a
    wrong lake root or wrong dates, not a quiet success). One events table may be absent on a day
    (sources without search logs, days without tags)."""
    present = set().union(*(layout.days(layout.raw(t)) for t in EVENT_TABLES))
    days = lake.day_range(first_ds, last_ds)
    missing = [d for d in days if d not in present]
    hint = "write raw/<table>/ds=YYYY-MM-DD/*.parquet there first, or check lake.root and the dates"
    if missing and first_ds == last_ds:
        raise ValidationFailed(f"{layout.root / lake.RAW}: no search_events or browse_events partition for {first_ds}; {hint}")
    if len(missing) == len(days):
        raise ValidationFailed(f"{layout.root / lake.RAW}: no search_events or browse_events partition from {first_ds} to "
                               f"{last_ds}; {hint}")
    return missing


# ---------------------------------------------------------------- checks

def check_frame(cfg: Config, batch: Batch, catalog_first_ds: pd.Series | None) -> pd.DataFrame:
    """The columns the table's suite reads, plus computed check columns, as pandas for GE."""
    t = batch.data
    frame = {suites.ROW_ID: np.arange(t.num_rows)}
    for col in suites.check_columns(batch.table):
        if col in t.column_names:
            frame[col] = t.column(col).to_pandas()
    if batch.table == "catalog":
        ids = t.column(C.ITEM_ID).to_pandas()
        # duplicates are judged within a partition, nulls are reported by their own rule
        first = ~pd.DataFrame({"id": ids, "ds": batch.ds}).duplicated(keep="first")
        frame[suites.FIRST_OF_ID] = first.where(ids.notna(), None).astype(object)
    else:
        frame[suites.TS_IN_WINDOW] = _ts_in_window(t, batch.ds, cfg.validation.late_days)
        frame[suites.ITEM_IN_CATALOG] = _item_in_catalog(t, batch.ds, catalog_first_ds)
        frame[suites.EVENT_ID_CONSISTENT] = _event_id_consistent(t, batch.ds, EVENT_CONTENT[batch.table])
        if batch.table == "browse_events":
            frame[suites.VALUE_IN_RANGE] = _value_in_range(t, cfg.validation.max_value)
    return pd.DataFrame(frame)


def _event_id_consistent(t: pa.Table, ds: np.ndarray, content: tuple[str, ...]) -> np.ndarray:
    """False for every row of an event id that has rows of different content in its partition.

    All rows of such an id fail, not all but one: nothing says which is right. Exact copies pass (they
    are re-deliveries; sessionize keeps one). The check is per partition, like duplicate catalog ids,
    so its outcome does not depend on how days are grouped into runs; a conflict across days (with an
    already published day) is not seen here: that row is out already, and quarantining only the newcomer
    would keep an arbitrary one of the two."""
    ids = t.column(C.EVENT_ID).to_pandas()
    ok = np.ones(len(ids), dtype=bool)
    shared = pd.DataFrame({"ds": ds, "id": ids}).duplicated(keep=False).to_numpy() & ids.notna().to_numpy()
    if shared.any():  # usually a handful of re-deliveries: compare content on those rows only
        rows = np.flatnonzero(shared)
        idx = pa.array(rows)
        sub = pd.DataFrame({"ds": ds[rows], "id": ids.to_numpy()[rows],
                            **{c: t.column(c).take(idx).to_pandas() for c in content}})
        distinct = sub.drop_duplicates()  # pandas compares nulls (None, NaN, NaT) as equal here
        conflicting = distinct.loc[distinct.duplicated(["ds", "id"], keep=False), ["ds", "id"]].drop_duplicates()
        hit = sub[["ds", "id"]].merge(conflicting.assign(_hit=True), how="left", on=["ds", "id"])["_hit"]
        ok[rows[hit.notna().to_numpy()]] = False
    return _with_nulls(ok, t.column(C.EVENT_ID).is_null())


def _ts_in_window(t: pa.Table, ds: np.ndarray, late_days: int) -> np.ndarray:
    ts = pc.cast(t.column(C.TS), pa.int64()).to_numpy(zero_copy_only=False)  # null -> nan
    day_start = pd.to_datetime(pd.Series(ds), utc=True).astype("int64").to_numpy() // 1000
    ok = (ts >= day_start - late_days * DAY_US) & (ts < day_start + DAY_US)
    return _with_nulls(ok, t.column(C.TS).is_null())


def _item_in_catalog(t: pa.Table, ds: np.ndarray, catalog_first_ds: pd.Series | None) -> np.ndarray:
    items = t.column(C.ITEM_ID).to_pandas()
    first_seen = items.map(catalog_first_ds) if catalog_first_ds is not None else pd.Series(np.nan, index=items.index)
    ok = first_seen.notna().to_numpy() & (first_seen.fillna("9999").to_numpy() <= ds)
    return _with_nulls(ok, t.column(C.ITEM_ID).is_null())


def _value_in_range(t: pa.Table, max_value: float) -> np.ndarray:
    v = t.column(C.VALUE).to_numpy(zero_copy_only=False).astype(float)  # null -> nan
    ok = np.isfinite(v) & (v >= 0) & (v <= max_value)
    return _with_nulls(ok, t.column(C.VALUE).is_null())


def _with_nulls(ok: np.ndarray, is_null: pa.ChunkedArray) -> np.ndarray:
    """Rules do not apply where the field is null: GE's in-set check skips None."""
    out = ok.astype(object)
    out[is_null.to_numpy(zero_copy_only=False)] = None
    return out


def catalog_first_ds(layout: lake.Layout, last_ds: str, staged: pd.DataFrame | None = None) -> pd.Series | None:
    """item_id -> first day it is in the validated catalog, over partitions up to ``last_ds``.

    ``staged``: this run's valid catalog rows (columns ``id``, ``ds``), not published yet; they stand
    for the published partitions of their days (a rerun replaces those)."""
    replaced = set(staged["ds"]) if staged is not None else set()
    days = [d for d in layout.days(layout.valid("catalog"), upto=last_ds) if d not in replaced]
    ids = [
        pd.DataFrame({"id": pq.read_table(f, columns=[C.ITEM_ID]).column(0).to_pandas(), "ds": d})
        for d in days
        for f in lake.data_files(layout.part(layout.valid("catalog"), d))
    ]
    if staged is not None:
        ids.append(staged[staged["ds"] <= last_ds])
    if not ids:
        return None
    both = pd.concat(ids, ignore_index=True)
    return both.groupby("id")["ds"].min()


# ---------------------------------------------------------------- GE run and outputs

def run_suite(table: str, frame: pd.DataFrame):
    """Run the table's suite on ``frame``; returns the GE validation result."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # keep task logs readable
    asset = ctx.data_sources.add_pandas("raw").add_dataframe_asset(table)
    batch_def = asset.add_batch_definition_whole_dataframe("batch")
    suite = ctx.suites.add(suites.suite(table))
    return batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite,
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": [suites.ROW_ID],
            "partial_unexpected_count": 20,
        },
    )


def row_reasons(result, n_rows: int) -> np.ndarray:
    """Per row, the ``;``-joined reasons of every expectation it failed ('' when it passed all)."""
    reasons = np.full(n_rows, "", dtype=object)
    for r in result.results:
        if r.success or not r.result.get("unexpected_index_list"):
            continue
        rows = np.fromiter((u[suites.ROW_ID] for u in r.result["unexpected_index_list"]), dtype=np.int64)
        code = r.expectation_config.meta["reason"]
        reasons[rows] = np.where(reasons[rows] == "", code, reasons[rows] + ";" + code)
    return reasons


def validate_batch(cfg: Config, batch: Batch, days: list[str], staged_catalog: pd.DataFrame | None = None
                   ) -> tuple[dict, list[StagedDay], pd.DataFrame]:
    """Run the table's suite over the batch and stage each day's validated rows and quarantine.

    Returns the table's counts, its staged days (``failure`` set on days over the bad-row share) and
    the batch's valid ``item_id`` per day (what events of this run are checked against, for the catalog)."""
    layout = cfg.layout
    first_ds = catalog_first_ds(layout, days[-1], staged_catalog) if batch.table in EVENT_TABLES else None
    frame = check_frame(cfg, batch, first_ds)
    result = run_suite(batch.table, frame)
    reasons = row_reasons(result, batch.data.num_rows)
    bad = reasons != ""
    _slim(result)
    report = Report(layout, batch.table, days, result)

    staged = []
    try:
        for day in days:
            rows = batch.rows_of(day)
            summary = _day_summary(batch, day, rows, bad, reasons, cfg)
            failed = summary["bad_share"] > cfg.validation.max_bad_row_share
            failure = _too_many_bad(layout, batch, day, rows, bad, reasons, summary, cfg) if failed else None
            staged.append(_stage_day(layout, batch, day, rows, bad, reasons, summary, report, failure))
        report.write_range()
    except BaseException:
        for s in staged:
            for tmp in (s.quarantine, s.valid):
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        raise
    valid_ids = None
    if batch.table == "catalog":
        ok = ~bad
        valid_ids = pd.DataFrame({"id": batch.data.column(C.ITEM_ID).to_pandas()[ok].to_numpy(),
                                  "ds": batch.ds[ok]})
    counts = {
        "days": len(days),
        "rows_in": int(batch.data.num_rows),
        "rows_valid": int((~bad).sum()),
        "rows_quarantined": int(bad.sum()),
        "reasons": _count_reasons(reasons[bad]),
        "extra_fields_ignored": batch.extra_fields,
        "optional_fields_missing": batch.missing_optional,
    }
    return counts, staged, valid_ids


class Report:
    """GE's result and data docs page: beside the day's data for a one-day run, else once per range."""

    def __init__(self, layout: lake.Layout, table: str, days: list[str], result):
        self.single_day = len(days) == 1
        self.ge_json = json.dumps(result.to_json_dict(), indent=1, default=str)
        self.html = _data_docs(result)
        self.range_dir = layout.root / layout.valid(table) / "_reports" / f"{days[0]}_{days[-1]}"
        self.root = layout.root

    def side_files(self, summary: dict) -> dict[str, str]:
        if self.single_day:
            return {"_validation.json": json.dumps(summary, indent=1),
                    "_validation.ge.json": self.ge_json, "_validation.html": self.html}
        summary = {**summary, "ge_report": str(self.range_dir.relative_to(self.root))}
        return {"_validation.json": json.dumps(summary, indent=1)}

    def write_range(self) -> None:
        if not self.single_day:
            self.range_dir.mkdir(parents=True, exist_ok=True)
            (self.range_dir / "validation.ge.json").write_text(self.ge_json)
            (self.range_dir / "validation.html").write_text(self.html)


def _day_summary(batch: Batch, day: str, rows: np.ndarray, bad, reasons, cfg: Config) -> dict:
    bad_rows = rows[bad[rows]]
    n, n_bad = len(rows), len(bad_rows)
    return {
        "table": batch.table,
        "ds": day,
        "suite": f"raw_{batch.table}",
        "rows_in": n,
        "rows_valid": n - n_bad,
        "rows_quarantined": n_bad,
        "bad_share": n_bad / n if n else 0.0,
        "max_bad_row_share": cfg.validation.max_bad_row_share,
        "reasons": _count_reasons(reasons[bad_rows]),
        "source_files": sorted(set(batch.source_file[rows])),
        "extra_fields_ignored": batch.extra_fields,
        "optional_fields_missing": batch.missing_optional,
    }


def _too_many_bad(layout, batch, day, rows, bad, reasons, summary, cfg) -> str:
    first = rows[bad[rows]][0]
    counts = ", ".join(f"{code} {n:,}" for code, n in summary["reasons"].items())
    return (
        f"{layout.part(layout.raw(batch.table), day)}: {summary['rows_quarantined']:,} of {summary['rows_in']:,} rows "
        f"({summary['bad_share']:.1%}) failed validation, over validate.max_bad_row_share="
        f"{cfg.validation.max_bad_row_share:.1%}; by reason (field): {counts}; first: {batch.source_file[first]} "
        f"row {batch.source_row[first]}: {reasons[first]}. Quarantined rows are in "
        f"{layout.part(layout.quarantine(batch.table), day)}"
    )


def _stage_day(layout, batch, day, rows, bad, reasons, summary, report, failure: str | None) -> StagedDay:
    """Write the day's quarantine and (unless it failed) validated rows aside; ``run_range`` publishes them
    once every table of the day is known."""
    idx_bad = rows[bad[rows]]
    quarantined = batch.data.take(idx_bad)
    quarantined = quarantined.append_column(C.REASON, pa.array(reasons[idx_bad], pa.string()))
    quarantined = quarantined.append_column(C.SOURCE_FILE, pa.array(batch.source_file[idx_bad], pa.string()))
    quarantined = quarantined.append_column(C.SOURCE_ROW, pa.array(batch.source_row[idx_bad], pa.int64()))
    q_tmp = _stage(quarantined.cast(quarantine_schema(batch.table)),
                   layout.part(layout.quarantine(batch.table), day), batch.metadata)
    valid_tmp = None
    if failure is None:
        valid_tmp = _stage(batch.data.take(rows[~bad[rows]]), layout.part(layout.valid(batch.table), day),
                           batch.metadata)
    return StagedDay(batch.table, day, summary, report, q_tmp, valid_tmp, failure)


def _stage(table: pa.Table, final: Path, metadata: dict[bytes, bytes]) -> Path:
    tmp = lake.staging_dir(final)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    pq.write_table(table, tmp / "part-00000.parquet", compression="zstd")
    return tmp


def _count_reasons(reasons: np.ndarray) -> dict[str, int]:
    counts: dict[str, int] = {}
    for joined, n in zip(*np.unique(reasons.astype(str), return_counts=True)) if len(reasons) else []:
        for code in joined.split(";"):
            counts[code] = counts.get(code, 0) + int(n)
    return dict(sorted(counts.items()))


def _slim(result) -> None:
    """Drop GE's per-row lists once used: the quarantine table holds the rows, reports keep counts."""
    for r in result.results:
        for key in ("unexpected_index_list", "unexpected_list", "unexpected_index_query"):
            r.result.pop(key, None)


def _data_docs(result) -> str:
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))
