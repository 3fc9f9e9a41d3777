"""Raw partitions -> contract-shaped Arrow batches, or a one-line error naming the file and field.

``read_batch`` reads ``raw/<table>/ds=D`` for some days: every Parquet file cast to the raw contract
(``schemas/raw.py``), with each row's day, source file and row number, so validate can check rows and
quarantine them with their origin. What cannot be read that way stops the stage with ``ValidationFailed``:
a file that is not Parquet or cannot be read, a required field missing, a type that does not convert,
numbers where a timestamp belongs (the message names the likely epoch unit), an empty events partition.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import RAW_TABLES
from schemas.raw import OPTIONAL
from synergen_core import lake
from synergen_core.errors import PipelineError

EVENT_TABLES = ("search_events", "browse_events")


class ValidationFailed(PipelineError):
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
    missing_optional: list[str] = field(default_factory=list)  # optional fields some file left out

    def rows_of(self, day: str) -> np.ndarray:
        """Row numbers of one day (read_batch concatenates days in order, so they are contiguous)."""
        lo, hi = np.searchsorted(self.ds, [day, day + "~"])  # "~" sorts after any digit
        return np.arange(lo, hi)



def _one_line(e: Exception, path: Path | None = None, limit: int = 160) -> str:
    """An Arrow error's first line without the path it repeats, cut short: the message names the file
    already, Arrow's detail is a hint."""
    text = str(e).replace(f" '{path}'", "") if path is not None else str(e)
    text = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- reading

def read_batch(layout: lake.Layout, table: str, days: list[str]) -> Batch:
    contract = RAW_TABLES[table]
    parts, ds_col, files, rows, meta, extra, missing = [], [], [], [], {}, set(), set()
    for day in days:
        part_dir = layout.part(layout.raw(table), day)
        others = lake.other_files(part_dir)
        if others:  # a .csv or .json dropped beside the data would otherwise be skipped silently
            more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
            raise ValidationFailed(
                f"{others[0]}: not a Parquet file{more}; a raw partition holds only .parquet/.parq files "
                f"(names starting with _ or . are ignored): convert it or move it out of the partition")
        day_files = lake.data_files(part_dir)
        if table in EVENT_TABLES and not day_files:
            raise ValidationFailed(f"{part_dir}: empty partition (no Parquet files); re-deliver the day's events "
                                   f"(a day without events of this table needs no folder)")
        day_rows = 0
        for path in day_files:
            t = read_parquet(path)
            extra |= set(t.column_names) - set(contract.names)
            missing |= set(OPTIONAL[table]) - set(t.column_names)
            meta.update({k: v for k, v in (t.schema.metadata or {}).items() if k.startswith(b"synergen.")})
            parts.append(conform(t, contract, path, OPTIONAL[table]))
            rel = str(path.relative_to(layout.root))
            ds_col.append(np.full(t.num_rows, day, dtype=object))
            files.append(np.full(t.num_rows, rel, dtype=object))
            rows.append(np.arange(t.num_rows, dtype=np.int64))
            day_rows += t.num_rows
        if table in EVENT_TABLES and day_rows == 0:
            raise ValidationFailed(f"{part_dir}: empty partition (0 rows in {len(day_files)} file(s)); re-deliver the "
                                   f"day's events (a day without events of this table needs no folder)")
    # one chunk, not one per file: per-day takes over thousands of chunks are quadratic
    data = pa.concat_tables(parts).combine_chunks() if parts else contract.empty_table()
    cat = lambda xs, dtype: np.concatenate(xs) if xs else np.array([], dtype=dtype)  # noqa: E731
    return Batch(table, data, cat(ds_col, "U10"), cat(files, object), cat(rows, np.int64), meta, sorted(extra),
                 sorted(missing))


def read_parquet(path: Path) -> pa.Table:
    """The file's table, or a one-line failure naming it (a truncated or corrupt file, or not Parquet)."""
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValidationFailed(
            f"{path}: not a readable Parquet file ({_one_line(e, path)}); re-deliver it or move it out of the partition"
        ) from None


def conform(t: pa.Table, contract: pa.Schema, path: Path, optional: tuple[str, ...] = ()) -> pa.Table:
    """Select and cast the contract's fields, or fail naming the file and field. An ``optional`` field
    the file leaves out is filled with nulls."""
    columns = []
    for f in contract:
        if f.name not in t.column_names:
            if f.name in optional:
                columns.append(pa.nulls(t.num_rows, f.type))
                continue
            raise ValidationFailed(
                f"{path}: missing field {f.name!r} ({f.type}) required by the raw contract (schemas/raw.py); "
                f"the file has {t.column_names}"
            )
        col = t.column(f.name)
        if pa.types.is_timestamp(f.type) and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            # Arrow would cast integers as microseconds: epoch seconds would become January 1970 and every
            # row quarantined as out of its day. The unit is not in the data, so ask for real timestamps.
            raise ValidationFailed(_numeric_timestamp_message(path, f, col))
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValidationFailed(
                    f"{path}: field {f.name!r} has type {col.type}, which does not convert to the contract's "
                    f"{f.type}: {_one_line(e)}"
                ) from None
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=contract)


# magnitude of "now" since the epoch in each unit, about 1.7e9 s: the nearest one names the unit
EPOCH_UNITS = (("seconds", "s", 1e9), ("milliseconds", "ms", 1e12), ("microseconds", "us", 1e15),
               ("nanoseconds", "ns", 1e18))


def _numeric_timestamp_message(path: Path, f: pa.Field, col: pa.ChunkedArray) -> str:
    values = col.drop_null().to_numpy()
    values = values[np.isfinite(values)] if len(values) else values
    head = f"{path}: field {f.name!r} holds numbers ({col.type}), not timestamps"
    if not len(values):
        return f"{head}; write it as {f.type}"
    typical = float(np.median(np.abs(values)))
    name, unit, _ = min(EPOCH_UNITS, key=lambda u: abs(np.log10(max(typical, 1.0)) - np.log10(u[2])))
    return (f"{head}; e.g. {values[0].item()!r}, which looks like {name} since the epoch: convert it to {f.type} "
            f"(e.g. pandas.to_datetime({f.name}, unit={unit!r}, utc=True)) and write the file again")
