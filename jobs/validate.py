"""Stage 1: validate raw partitions with Great Expectations; quarantine bad rows with a reason.

For each table and day: ``raw/<table>/ds=D`` -> ``validated/<table>/ds=D`` (rows that pass, same
contract) + ``quarantine/<table>/ds=D`` (rows that fail, with ``_reason``, ``_source_file`` and
``_source_row``). Valid + quarantined = input rows, always. Both are published atomically, so a rerun
replaces the day. Beside the validated data: ``_validation.json`` (the day's counts) and, for a
single-day run, the GE result (``_validation.ge.json``) and its data docs page (``_validation.html``).
A run that publishes days also publishes the catalog as of the last of them,
``validated/catalog_state/ds=D`` (item_id, first_ds; ``jobs/validate_checks.py``), which the next run
starts from.

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
Checking the raw files' footers against the contract (and its one-line errors) and reading their rows
with Spark is ``jobs/raw_files.py``; the row checks, the catalog as of a day and the suite run are
``jobs/validate_checks.py``.

The stage is a Spark job (``jobs.spark.session``: ``local[*]`` or a cluster): rows are read, checked
(window functions and a join with the catalog), counted, quarantined and written by Spark, and Great
Expectations runs on the Spark DataFrame. The driver holds the list of files with their footers, the
counts per day and reason, and GE's summary: never a day's rows nor the catalog's history.

The catalog is validated first: events are checked against the catalog as of their day (the compacted
state of the day before the run, the published partitions after it, and this run's valid catalog rows,
which replace the published partitions of their days). A range of days is validated as one batch (one
GE run per table), which keeps long histories such as MovieLens (thousands of days) fast; every day
still gets its own partitions and counts.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs import validate_checks as checks
from jobs.raw_files import EVENT_TABLES, RawFiles, ValidationFailed, conformed, inspect_files, read_rows
from jobs.spark import Staging, session
from schemas import RAW_TABLES, C, quarantine_schema
from synergen_core import lake
from synergen_core.config import Config, ConfigError, parse_ds

log = logging.getLogger(__name__)

TABLES = ("catalog", "search_events", "browse_events")
ORDER = (C.DS, C.SOURCE_FILE, C.SOURCE_ROW)  # rows are written in the order they were delivered


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
    for table in [*(area(t) for t in chosen for area in (layout.valid, layout.quarantine)), layout.valid(lake.DAYS),
                  checks.state_table(cfg)]:
        lake.remove_stale(root, table)
    # The days' contents are about to change: their markers go first, so downstream never sees a marked
    # day half replaced (a crash leaves them unmarked, and the rerun marks them again).
    for day in [d for d in lake.completed_days(root, layer) if first_ds <= d <= last_ds]:
        lake.unmark_day(root, layer, day)
    days_without_events = _check_days_have_events(layout, first_ds, last_ds)
    present = {t: layout.days(layout.raw(t), lake.previous_day(first_ds), last_ds) for t in chosen}
    # Every file's footer is checked before Spark starts: unreadable or off-contract input fails in
    # seconds, and before anything is staged.
    raws = {t: inspect_files(layout, t, present[t]) for t in chosen if present[t]}
    if "catalog" in raws:  # catalog partitions are about to change: the states holding them go first
        checks.withdraw_states(cfg, first_ds)
    with session(cfg) as spark:
        staging = Staging(spark, root)
        try:
            result, failures, report_dirs = _validate(spark, cfg, staging, chosen, days, raws)
        finally:
            staging.discard()  # whatever was not published
    if failures:
        raise ValidationFailed(_failure_message(failures, days), report_dirs)
    return {"days_without_events": len(days_without_events), **result}


def _validate(spark, cfg: Config, staging: Staging, chosen: list[str], days: list[str], raws: dict[str, RawFiles]
              ) -> tuple[dict, list[StagedDay], list[Path]]:
    """Read, check and stage every chosen table, publish the days that passed and the catalog state.
    -> the tables' counts, the failed table-days and where each table-day's report is."""
    cached: list[DataFrame] = []
    try:
        # Every row is read (and cast) before any GE run: a value that does not convert fails here.
        rows = {}
        for table, raw in raws.items():
            rows[table] = read_rows(spark, raw).persist()
            cached.append(rows[table])
            conformed(rows[table].count)
        result: dict = {}
        staged: list[StagedDay] = []
        catalog = None  # the catalog as of the last day, once the catalog table is checked
        for table in chosen:
            t0 = time.perf_counter()
            if table not in raws:  # e.g. the catalog on a day nothing changed, or a source with no search logs
                result[table] = {"days": 0, "rows_in": 0, "rows_valid": 0, "rows_quarantined": 0, "reasons": {}}
                continue
            if table in EVENT_TABLES and catalog is None:
                catalog = _catalog(spark, cfg, days, None, raws, cached)
            checked = checks.with_checks(cfg, table, rows[table], catalog).persist()
            cached.append(checked)
            counts, table_days = validate_table(cfg, staging, raws[table], checked)
            if table == "catalog":
                valid = checked.where(F.col(C.REASON) == "").select(C.ITEM_ID, C.DS)
                catalog = _catalog(spark, cfg, days, valid, raws, cached)
            staged += table_days
            result[table] = {**counts, "seconds": round(time.perf_counter() - t0, 3)}
        failures, report_dirs = _publish(cfg.layout, chosen, days, staged)
        published = [d for d in days if any(s.day == d and s.summary["published"] for s in staged)]
        if "catalog" in chosen and published:
            if catalog is None:
                catalog = _catalog(spark, cfg, days, None, raws, cached)
            checks.write_state(staging, cfg, catalog, published[-1])
    finally:
        for df in cached:
            df.unpersist()
    for table in chosen:
        result[table]["report_dirs"] = [d for d in report_dirs if d.parent.name == table]
    return result, failures, report_dirs


def _catalog(spark, cfg: Config, days: list[str], valid: DataFrame | None, raws: dict, cached: list) -> DataFrame:
    revalidated = set(raws["catalog"].days) if valid is not None else set()
    catalog = checks.catalog_as_of(spark, cfg, days[0], days[-1], valid, revalidated).persist()
    cached.append(catalog)
    return catalog


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


# ---------------------------------------------------------------- one table

def validate_table(cfg: Config, staging: Staging, raw: RawFiles, checked: DataFrame) -> tuple[dict, list[StagedDay]]:
    """Run the table's suite on ``checked`` (its rows with check columns and ``_reason``) and stage each
    day's validated rows and quarantine. -> the table's counts and staged days (``failure`` set on days
    over the bad-row share)."""
    layout, table = cfg.layout, raw.table
    days = raw.days
    # collected: one row per day and combination of reasons, whatever the number of rows
    by_day: dict[str, dict[str, int]] = {d: {} for d in days}
    for r in checked.groupBy(C.DS, C.REASON).count().collect():
        by_day[r[C.DS]][r[C.REASON]] = r["count"]
    result = checks.run_suite(table, checked)
    _slim(result)
    report = Report(layout, table, days, result)
    summaries = {d: _day_summary(raw, d, by_day[d], cfg) for d in days}
    failed = {d: _too_many_bad(layout, raw, checked, s, cfg) for d, s in summaries.items()
              if s["bad_share"] > cfg.validation.max_bad_row_share}
    bad = F.col(C.REASON) != ""
    quarantine, valid = layout.quarantine(table), layout.valid(table)
    _write(staging, checked.where(bad), quarantine, days, quarantine_schema(table))
    ok_days = [d for d in days if d not in failed]
    if ok_days:
        _write(staging, checked.where(~bad & F.col(C.DS).isin(ok_days)), valid, ok_days, RAW_TABLES[table])
    report.write_range()
    staged = [StagedDay(table, d, summaries[d], report, staging.staged(quarantine, d),
                        None if d in failed else staging.staged(valid, d), failed.get(d)) for d in days]
    n_in = sum(n for counts in by_day.values() for n in counts.values())
    n_bad = sum(n for counts in by_day.values() for code, n in counts.items() if code)
    counts = {
        "days": len(days),
        "rows_in": n_in,
        "rows_valid": n_in - n_bad,
        "rows_quarantined": n_bad,
        "reasons": _count_reasons(_merge(by_day.values())),
        "extra_fields_ignored": raw.extra_fields,
        "optional_fields_missing": raw.missing_optional,
    }
    return counts, staged


def _merge(per_day) -> dict[str, int]:
    out: dict[str, int] = {}
    for counts in per_day:
        for code, n in counts.items():
            out[code] = out.get(code, 0) + n
    return out


def _write(staging: Staging, df: DataFrame, table: str, days: list[str], schema) -> None:
    """Stage ``df``'s rows as one partition per day of ``days`` in the order they were delivered (range
    partitions, sorted within: files of a day follow each other in that order); a day without rows gets
    an empty file with the schema, as a reader of the partition expects."""
    ordered = df.repartitionByRange(*ORDER).sortWithinPartitions(*ORDER)
    staging.write_days(ordered.select(*schema.names, C.DS), table, days, shuffle_by_day=False)
    for d in days:
        part = staging.staged(table, d)
        if not lake.data_files(part):
            pq.write_table(schema.empty_table(), part / "part-00000.parquet")


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


def _day_summary(raw: RawFiles, day: str, by_reason: dict[str, int], cfg: Config) -> dict:
    n = sum(by_reason.values())
    n_bad = n - by_reason.get("", 0)
    return {
        "table": raw.table,
        "ds": day,
        "suite": f"raw_{raw.table}",
        "rows_in": n,
        "rows_valid": n - n_bad,
        "rows_quarantined": n_bad,
        "bad_share": n_bad / n if n else 0.0,
        "max_bad_row_share": cfg.validation.max_bad_row_share,
        "reasons": _count_reasons(by_reason),
        "source_files": raw.source_files(day),
        "extra_fields_ignored": raw.extra_fields,
        "optional_fields_missing": raw.missing_optional,
        # Spark writes its own footers: the files' synergen.* flags (e.g. times derived from order) are
        # kept here, beside the day's data
        **({"source_metadata": {k.decode(): v.decode(errors="replace") for k, v in sorted(raw.metadata.items())}}
           if raw.metadata else {}),
    }


def _too_many_bad(layout: lake.Layout, raw: RawFiles, checked: DataFrame, summary: dict, cfg: Config) -> str:
    day = summary["ds"]
    # collected: the day's first bad row, which the message names
    first = (checked.where((F.col(C.DS) == day) & (F.col(C.REASON) != "")).orderBy(*ORDER)
             .select(C.SOURCE_FILE, C.SOURCE_ROW, C.REASON).first())
    counts = ", ".join(f"{code} {n:,}" for code, n in summary["reasons"].items())
    return (
        f"{layout.part(layout.raw(raw.table), day)}: {summary['rows_quarantined']:,} of {summary['rows_in']:,} rows "
        f"({summary['bad_share']:.1%}) failed validation, over validate.max_bad_row_share="
        f"{cfg.validation.max_bad_row_share:.1%}; by reason (field): {counts}; first: {first[C.SOURCE_FILE]} "
        f"row {first[C.SOURCE_ROW]}: {first[C.REASON]}. Quarantined rows are in "
        f"{layout.part(layout.quarantine(raw.table), day)}"
    )


def _count_reasons(by_joined: dict[str, int]) -> dict[str, int]:
    """Rows per reason code, from rows per ``;``-joined combination ('' = valid, not counted)."""
    counts: dict[str, int] = {}
    for joined, n in by_joined.items():
        for code in joined.split(";") if joined else []:
            counts[code] = counts.get(code, 0) + int(n)
    return dict(sorted(counts.items()))


def _slim(result) -> None:
    """Drop GE's per-row lists if any: the quarantine table holds the rows, reports keep counts."""
    for r in result.results:
        for key in ("unexpected_index_list", "unexpected_list", "unexpected_index_query"):
            r.result.pop(key, None)


def _data_docs(result) -> str:
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))
