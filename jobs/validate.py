"""Stage 1: validate raw partitions with Great Expectations; quarantine bad rows with a reason.

For each table and day: ``raw/<table>/ds=D`` -> ``validated/<table>/ds=D`` (rows that pass, same
contract) + ``quarantine/<table>/ds=D`` (rows that fail, with ``_reason``, ``_source_file`` and
``_source_row``). Valid + quarantined = input rows, always. Both are published atomically, so a rerun
replaces the day. Beside the validated data: ``_validation.json`` (the day's counts) and, for a
single-day run, the GE result (``_validation.ge.json``) and its data docs page (``_validation.html``).

Table-level failures raise ``ValidationFailed`` naming the file, field and counts: a file that does
not match the contract, an events partition that is empty, a day with no events partition in either
events table (for a one-day run), or a bad-row share above
``validate.max_bad_row_share`` (the quarantine and report are still written, the validated data not).

The catalog is validated first: events are checked against the validated catalog as of their day.
A range of days is validated as one batch (one GE run per table), which keeps long histories such as
MovieLens (thousands of days) fast; every day still gets its own partitions and counts.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import C, RAW_TABLES, quarantine_schema
from schemas import suites
from synergen_core import lake
from synergen_core.config import Config, parse_ds

log = logging.getLogger(__name__)

TABLES = ("catalog", "search_events", "browse_events")
EVENT_TABLES = ("search_events", "browse_events")
DAY_US = 86_400 * 1_000_000


class ValidationFailed(RuntimeError):
    """A table-level failure: the stage stops, with the file, field and counts in the message.
    ``report_dirs`` lists the partitions whose reports this run wrote before it stopped."""

    def __init__(self, message: str, report_dirs: list[Path] | None = None):
        super().__init__(message)
        self.report_dirs = report_dirs or []


@dataclass
class Batch:
    """Rows of one table over one or more days, cast to the contract, with their origin."""

    table: str
    data: pa.Table  # contract columns only
    ds: np.ndarray  # partition day per row, "YYYY-MM-DD"
    source_file: np.ndarray  # path relative to the lake root, per row
    source_row: np.ndarray  # row number within that file
    metadata: dict[bytes, bytes] = field(default_factory=dict)
    extra_fields: list[str] = field(default_factory=list)

    def rows_of(self, day: str) -> np.ndarray:
        """Row numbers of one day (read_batch concatenates days in order, so they are contiguous)."""
        lo, hi = np.searchsorted(self.ds, [day, day + "~"])  # "~" sorts after any digit
        return np.arange(lo, hi)


def run(cfg: Config, ds: str, tables: list[str] | None = None) -> dict:
    """Validate one day."""
    return run_range(cfg, ds, ds, tables)


def run_range(cfg: Config, first_ds: str, last_ds: str, tables: list[str] | None = None) -> dict:
    """Validate every raw partition in ``[first_ds, last_ds]``: catalog first, then events."""
    root = Path(cfg.lake.root)
    days_without_events = _check_days_have_events(root, first_ds, last_ds)
    result, report_dirs = {"days_without_events": len(days_without_events)}, []
    for table in [t for t in TABLES if not tables or t in tables]:
        t0 = time.perf_counter()
        present = [d for d in lake.partitions(root, f"raw/{table}") if first_ds <= d <= last_ds]
        if not present:  # e.g. the catalog on a day nothing changed, or a source with no search logs
            result[table] = {"days": 0, "rows_in": 0, "rows_valid": 0, "rows_quarantined": 0, "reasons": {},
                             "report_dirs": []}
            continue
        try:
            batch = read_batch(root, table, present)
            result[table] = validate_batch(cfg, batch, present)
        except ValidationFailed as e:
            raise ValidationFailed(str(e), report_dirs + e.report_dirs) from None
        report_dirs += result[table]["report_dirs"]
        result[table]["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _check_days_have_events(root: Path, first_ds: str, last_ds: str) -> list[str]:
    """Days in the range with no events partition in either events table.

    A daily run (one day) with none fails: upstream did not deliver, and training on a gap is worse than
    stopping. A range (a backfill over history, e.g. MovieLens) reports such days and goes on: real
    histories have days without events. One events table may be absent on a day (sources without
    search logs, days without tags)."""
    present = set().union(*(lake.partitions(root, f"raw/{t}") for t in EVENT_TABLES))
    missing = [d for d in _days(first_ds, last_ds) if d not in present]
    if missing and first_ds == last_ds:
        raise ValidationFailed(f"{root / 'raw'}: no search_events or browse_events partition for {first_ds}")
    return missing


def _days(first_ds: str, last_ds: str) -> list[str]:
    first, last = parse_ds(first_ds), parse_ds(last_ds)
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def _span(days: list[str]) -> str:
    return days[0] if len(days) == 1 else f"{len(days)} days ({days[0]} .. {days[-1]})"


# ---------------------------------------------------------------- reading

def read_batch(root: Path, table: str, days: list[str]) -> Batch:
    contract = RAW_TABLES[table]
    parts, ds_col, files, rows, meta, extra = [], [], [], [], {}, set()
    for day in days:
        part_dir = lake.partition(root, f"raw/{table}", day)
        day_files = lake.data_files(part_dir)
        if table in EVENT_TABLES and not day_files:
            raise ValidationFailed(f"{part_dir}: empty partition (no Parquet files)")
        day_rows = 0
        for path in day_files:
            t = pq.read_table(path)
            extra |= set(t.column_names) - set(contract.names)
            meta.update({k: v for k, v in (t.schema.metadata or {}).items() if k.startswith(b"synergen.")})
            parts.append(conform(t, contract, path))
            rel = str(path.relative_to(root))
            ds_col.append(np.full(t.num_rows, day, dtype=object))
            files.append(np.full(t.num_rows, rel, dtype=object))
            rows.append(np.arange(t.num_rows, dtype=np.int64))
            day_rows += t.num_rows
        if table in EVENT_TABLES and day_rows == 0:
            raise ValidationFailed(f"{part_dir}: empty partition (0 rows in {len(day_files)} file(s))")
    # one chunk, not one per file: per-day takes over thousands of chunks are quadratic
    data = pa.concat_tables(parts).combine_chunks() if parts else contract.empty_table()
    cat = lambda xs, dtype: np.concatenate(xs) if xs else np.array([], dtype=dtype)  # noqa: E731
    return Batch(table, data, cat(ds_col, "U10"), cat(files, object), cat(rows, np.int64), meta, sorted(extra))


def conform(t: pa.Table, contract: pa.Schema, path: Path) -> pa.Table:
    """Select and cast the contract's fields, or fail naming the file and field."""
    columns = []
    for f in contract:
        if f.name not in t.column_names:
            raise ValidationFailed(
                f"{path}: missing field {f.name!r} ({f.type}) required by the raw contract (schemas/raw.py); "
                f"the file has {t.column_names}"
            )
        col = t.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValidationFailed(
                    f"{path}: field {f.name!r} has type {col.type}, which does not convert to the contract's "
                    f"{f.type}: {e}"
                ) from None
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=contract)


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
        frame[suites.TS_IN_WINDOW] = _ts_in_window(t, batch.ds, cfg.validate_.late_days)
        frame[suites.ITEM_IN_CATALOG] = _item_in_catalog(t, batch.ds, catalog_first_ds)
        if batch.table == "browse_events":
            frame[suites.VALUE_IN_RANGE] = _value_in_range(t, cfg.validate_.max_value)
    return pd.DataFrame(frame)


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


def catalog_first_ds(root: Path, last_ds: str) -> pd.Series | None:
    """item_id -> first day it is in the validated catalog, over partitions up to ``last_ds``."""
    days = [d for d in lake.partitions(root, "validated/catalog") if d <= last_ds]
    if not days:
        return None
    ids = [
        pd.DataFrame({"id": pq.read_table(f, columns=[C.ITEM_ID]).column(0).to_pandas(), "ds": d})
        for d in days
        for f in lake.data_files(lake.partition(root, "validated/catalog", d))
    ]
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


def validate_batch(cfg: Config, batch: Batch, days: list[str]) -> dict:
    root = Path(cfg.lake.root)
    first_ds = catalog_first_ds(root, days[-1]) if batch.table in EVENT_TABLES else None
    frame = check_frame(cfg, batch, first_ds)
    result = run_suite(batch.table, frame)
    reasons = row_reasons(result, batch.data.num_rows)
    bad = reasons != ""
    _slim(result)
    report = Report(root, batch.table, days, result)

    failures, report_dirs = [], []
    for day in days:
        rows = batch.rows_of(day)
        summary = _day_summary(batch, day, rows, bad, reasons, cfg)
        failed = summary["bad_share"] > cfg.validate_.max_bad_row_share
        if failed:
            failures.append(_too_many_bad(root, batch, day, rows, bad, reasons, summary, cfg))
        report_dirs.append(_write_day(root, batch, day, rows, bad, reasons, summary, report, not failed))
    report.write_range()
    if failures:
        raise ValidationFailed("\n".join(failures), report_dirs)
    return {
        "days": len(days),
        "rows_in": int(batch.data.num_rows),
        "rows_valid": int((~bad).sum()),
        "rows_quarantined": int(bad.sum()),
        "reasons": _count_reasons(reasons[bad]),
        "extra_fields_ignored": batch.extra_fields,
        "report_dirs": report_dirs,
    }


class Report:
    """GE's result and data docs page: beside the day's data for a one-day run, else once per range."""

    def __init__(self, root: Path, table: str, days: list[str], result):
        self.single_day = len(days) == 1
        self.ge_json = json.dumps(result.to_json_dict(), indent=1, default=str)
        self.html = _data_docs(result)
        self.range_dir = root / "validated" / table / "_reports" / f"{days[0]}_{days[-1]}"
        self.root = root

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
        "max_bad_row_share": cfg.validate_.max_bad_row_share,
        "reasons": _count_reasons(reasons[bad_rows]),
        "source_files": sorted(set(batch.source_file[rows])),
        "extra_fields_ignored": batch.extra_fields,
    }


def _too_many_bad(root, batch, day, rows, bad, reasons, summary, cfg) -> str:
    first = rows[bad[rows]][0]
    counts = ", ".join(f"{code} {n:,}" for code, n in summary["reasons"].items())
    return (
        f"{root / 'raw' / batch.table / f'ds={day}'}: {summary['rows_quarantined']:,} of {summary['rows_in']:,} rows "
        f"({summary['bad_share']:.1%}) failed validation, over validate.max_bad_row_share="
        f"{cfg.validate_.max_bad_row_share:.1%}; by reason (field): {counts}; first: {batch.source_file[first]} "
        f"row {batch.source_row[first]}: {reasons[first]}. Quarantined rows are in "
        f"{root / 'quarantine' / batch.table / f'ds={day}'}"
    )


def _write_day(root, batch, day, rows, bad, reasons, summary, report, publish_valid: bool) -> Path:
    """Publish the day's quarantine and (unless it failed) validated rows; returns where its report is."""
    idx_bad = rows[bad[rows]]
    quarantined = batch.data.take(idx_bad)
    quarantined = quarantined.append_column(C.REASON, pa.array(reasons[idx_bad], pa.string()))
    quarantined = quarantined.append_column(C.SOURCE_FILE, pa.array(batch.source_file[idx_bad], pa.string()))
    quarantined = quarantined.append_column(C.SOURCE_ROW, pa.array(batch.source_row[idx_bad], pa.int64()))
    # When the day fails, its report goes with the quarantine: the validated day is not published and
    # the previous one (if any) stays as it was.
    quarantine_dir = lake.write_partition(
        quarantined.cast(quarantine_schema(batch.table)), lake.partition(root, f"quarantine/{batch.table}", day),
        metadata=batch.metadata, extra_files=None if publish_valid else report.side_files(summary),
    )
    if not publish_valid:
        return quarantine_dir
    return lake.write_partition(
        batch.data.take(rows[~bad[rows]]), lake.partition(root, f"validated/{batch.table}", day),
        metadata=batch.metadata, extra_files=report.side_files(summary),
    )


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
