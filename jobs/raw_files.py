"""Raw partitions -> the files' footers checked against the contract, then the rows read by Spark.

``inspect_files`` looks at ``raw/<table>/ds=D`` for some days through Parquet footers only (schema, row
count, key-value metadata: bounded per file, whatever the day's size) and stops the stage with
``ValidationFailed`` on what cannot be read as the raw contract (``schemas/raw.py``): a file that is not
Parquet or whose footer cannot be read, a required field missing, a type that cannot convert at all,
numbers where a timestamp belongs (the message names the likely epoch unit), an empty events partition.

``read_rows`` reads the rows with Spark: each file is read by one task, batch by batch, and cast to the
contract with Arrow's casts (``conform``, the same rules as the footer check), with each row's day, source
file and row number in that file, so validation can check rows and quarantine them with their origin. A
value that does not convert (text in a number field) is found there and raised as the same one-line
``ValidationFailed`` by ``conformed``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import RAW_TABLES, C
from schemas.raw import OPTIONAL
from synergen_core import lake
from synergen_core.errors import PipelineError

EVENT_TABLES = ("search_events", "browse_events")
BATCH_ROWS = 65_536  # rows per Arrow batch a reading task holds: bounds its memory, whatever the file's size


class ValidationFailed(PipelineError):
    """A table-level failure: the stage stops, with the file, field and counts in the message.
    ``report_dirs`` lists the partitions whose reports this run wrote before it stopped."""

    def __init__(self, message: str, report_dirs: list[Path] | None = None):
        super().__init__(message)
        self.report_dirs = report_dirs or []


@dataclass(frozen=True)
class RawFile:
    path: str  # absolute: the reading task opens it (lake.root is on a filesystem every worker mounts)
    rel: str  # relative to the lake root: what _source_file says
    ds: str
    rows: int  # from the footer


@dataclass
class RawFiles:
    """The files of one table over one or more days, checked against the contract by their footers."""

    table: str
    days: list[str]  # every day asked for has a partition, with or without files
    files: list[RawFile]
    metadata: dict[bytes, bytes] = field(default_factory=dict)
    extra_fields: list[str] = field(default_factory=list)
    missing_optional: list[str] = field(default_factory=list)  # optional fields some file left out

    def source_files(self, day: str) -> list[str]:
        """The day's files that hold rows (what the day's report lists)."""
        return sorted({f.rel for f in self.files if f.ds == day and f.rows})


def _one_line(e: Exception, path: Path | str | None = None, limit: int = 160) -> str:
    """An Arrow error's first line without the path it repeats, cut short: the message names the file
    already, Arrow's detail is a hint."""
    text = str(e).replace(f" '{path}'", "") if path is not None else str(e)
    text = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- footers (driver)

def inspect_files(layout: lake.Layout, table: str, days: list[str]) -> RawFiles:
    contract = RAW_TABLES[table]
    files, meta, extra, missing = [], {}, set(), set()
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
            pf = open_parquet(path)
            schema = pf.schema_arrow
            extra |= set(schema.names) - set(contract.names)
            missing |= set(OPTIONAL[table]) - set(schema.names)
            meta.update({k: v for k, v in (schema.metadata or {}).items() if k.startswith(b"synergen.")})
            check_schema(pf, contract, path, OPTIONAL[table])
            files.append(RawFile(str(path), str(path.relative_to(layout.root)), day, pf.metadata.num_rows))
            day_rows += pf.metadata.num_rows
        if table in EVENT_TABLES and day_rows == 0:
            raise ValidationFailed(f"{part_dir}: empty partition (0 rows in {len(day_files)} file(s)); re-deliver the "
                                   f"day's events (a day without events of this table needs no folder)")
    return RawFiles(table, days, files, meta, sorted(extra), sorted(missing))


def open_parquet(path: Path) -> pq.ParquetFile:
    """The file's footer, or a one-line failure naming it (a truncated or corrupt file, or not Parquet)."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from None


def _unreadable(path, e: Exception) -> ValidationFailed:
    return ValidationFailed(
        f"{path}: not a readable Parquet file ({_one_line(e, path)}); re-deliver it or move it out of the partition")


def check_schema(pf: pq.ParquetFile, contract: pa.Schema, path: Path, optional: tuple[str, ...] = ()) -> None:
    """Fail naming the file and field where the file's schema cannot become the contract's: a required
    field missing, numbers for a timestamp, a type Arrow has no cast for. Values that do not convert (text
    in a number field) are found while reading (``conform``)."""
    schema = pf.schema_arrow
    for f in contract:
        if f.name not in schema.names:
            if f.name in optional:
                continue
            raise ValidationFailed(
                f"{path}: missing field {f.name!r} ({f.type}) required by the raw contract (schemas/raw.py); "
                f"the file has {schema.names}"
            )
        typ = schema.field(f.name).type
        if pa.types.is_timestamp(f.type) and (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
            # Arrow would cast integers as microseconds: epoch seconds would become January 1970 and every
            # row quarantined as out of its day. The unit is not in the data, so ask for real timestamps.
            # The example values come from the first row group: bounded, and enough to name the unit.
            col = (pf.read_row_group(0, columns=[f.name]).column(0) if pf.num_row_groups
                   else pa.chunked_array([], typ))
            raise ValidationFailed(_numeric_timestamp_message(path, f, col))
        if typ != f.type:
            _cast(pa.array([], typ), f, path)  # an empty column: only whether a cast exists


def _cast(col: pa.ChunkedArray, f: pa.Field, path) -> pa.ChunkedArray:
    try:
        return col.cast(f.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValidationFailed(
            f"{path}: field {f.name!r} has type {col.type}, which does not convert to the contract's "
            f"{f.type}: {_one_line(e)}"
        ) from None


def conform(t: pa.Table, contract: pa.Schema, path: Path | str, optional: tuple[str, ...] = ()) -> pa.Table:
    """Select and cast the contract's fields (``check_schema`` passed), or fail naming the file and field.
    An ``optional`` field the file leaves out is filled with nulls."""
    columns = []
    for f in contract:
        if f.name not in t.column_names:
            columns.append(pa.nulls(t.num_rows, f.type))
            continue
        col = t.column(f.name)
        columns.append(col if col.type == f.type else _cast(col, f, path))
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


# ---------------------------------------------------------------- rows (Spark)

def row_schema(table: str) -> pa.Schema:
    """The contract plus the row's day and origin: what ``read_rows`` gives."""
    return (RAW_TABLES[table].append(pa.field(C.DS, pa.string())).append(pa.field(C.SOURCE_FILE, pa.string()))
            .append(pa.field(C.SOURCE_ROW, pa.int64())))


def read_rows(spark, raw: RawFiles):
    """Every row of ``raw``'s files as a Spark DataFrame (``row_schema``), read by the executors: the
    driver holds the list of files only."""
    from pyspark.sql.pandas.types import from_arrow_schema

    listing = [(f.path, f.rel, f.ds) for f in raw.files if f.rows]
    spark_rows = from_arrow_schema(row_schema(raw.table))
    if not listing:
        return spark.createDataFrame([], spark_rows)
    files = spark.createDataFrame(listing, "path string, rel string, ds string")
    # one file per task where the cluster has room: a file's rows stay in one task, in batches
    n = min(len(listing), 4 * spark.sparkContext.defaultParallelism)
    return files.repartition(n).mapInArrow(partial(_read_files, raw.table), spark_rows)


def _read_files(table: str, batches):
    """Executor side: each listed file, batch by batch, conformed, with its day and row numbers."""
    contract, schema = RAW_TABLES[table], row_schema(table)
    for listing in batches:
        for path, rel, ds in zip(*(listing.column(k).to_pylist() for k in ("path", "rel", "ds"))):
            offset = 0
            try:
                pf = pq.ParquetFile(path)
                parts = pf.iter_batches(batch_size=BATCH_ROWS, columns=[n for n in contract.names
                                                                        if n in pf.schema_arrow.names])
                for part in parts:
                    t = conform(pa.Table.from_batches([part]), contract, path, OPTIONAL[table])
                    n = t.num_rows
                    t = (t.append_column(C.DS, pa.array([ds] * n, pa.string()))
                         .append_column(C.SOURCE_FILE, pa.array([rel] * n, pa.string()))
                         .append_column(C.SOURCE_ROW, pa.array(np.arange(offset, offset + n), pa.int64())))
                    offset += n
                    yield from t.cast(schema).combine_chunks().to_batches()
            except ValidationFailed as e:
                raise RuntimeError(f"{FAILED_MARK}{e}{FAILED_MARK}") from None
            except (pa.ArrowException, OSError) as e:  # pages the footer did not show were corrupt
                raise RuntimeError(f"{FAILED_MARK}{_unreadable(path, e)}{FAILED_MARK}") from None


FAILED_MARK = "<<validation failed>>"  # brackets an executor's one-line message inside Spark's error text


def conformed(action):
    """Run ``action`` (a Spark action over ``read_rows``); an executor's ``ValidationFailed`` comes back as
    itself, one line, not as Spark's stack of Java and Python tracebacks."""
    try:
        return action()
    except Exception as e:  # Spark wraps it (PythonException, Py4JJavaError) with the worker's traceback
        found = re.search(re.escape(FAILED_MARK) + "(.*?)" + re.escape(FAILED_MARK), str(e))
        if found is None:
            raise
        raise ValidationFailed(found.group(1)) from None
