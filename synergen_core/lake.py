"""Lake paths and atomic publication of partitions.

Every partition is written aside (a hidden sibling folder) and renamed into place, so a reader or a
crash never sees half a day; rerunning a day replaces the whole partition.
"""
from __future__ import annotations

import datetime as dt
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUCCESS = "_SUCCESS"


def partition(root: Path, table: str, ds: str | dt.date) -> Path:
    """``<root>/<table>/ds=YYYY-MM-DD``; ``table`` may be nested, e.g. ``raw/search_events``."""
    return Path(root) / table / f"ds={ds}"


# Layers written by others (upstream log shippers, ``ingest``, the generator): their folders are input,
# complete by contract, and need no ``_SUCCESS`` marker. Every other layer is written by this pipeline.
EXTERNAL_LAYERS = ("raw",)
PARQUET_SUFFIXES = (".parquet", ".parq")


def partitions(root: Path, table: str) -> list[str]:
    """Days published for a table, sorted: folders ``ds=D`` holding ``_SUCCESS`` (a half-written or
    abandoned folder is not a partition). Under an external layer (``raw/``) every ``ds=D`` folder counts."""
    base = Path(root) / table
    if not base.is_dir():
        return []
    external = Path(table).parts[0] in EXTERNAL_LAYERS
    return sorted(p.name[3:] for p in base.iterdir()
                  if p.is_dir() and p.name.startswith("ds=") and (external or (p / SUCCESS).is_file()))


def staging_dir(final: Path) -> Path:
    """A fresh hidden sibling of ``final`` (same filesystem, so the rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, final: Path) -> Path:
    """Move a fully written ``tmp`` folder to ``final``, replacing what was there."""
    (tmp / SUCCESS).touch()
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_partition(
    table: pa.Table, final: Path, metadata: dict[bytes, bytes] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write one Parquet file (plus small side files) into ``final`` atomically."""
    tmp = staging_dir(final)
    try:
        if metadata:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        pq.write_table(table, tmp / "part-00000.parquet", compression="zstd")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        return publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


DAYS = "_days"


def day_marker(root: Path, layer: str, ds: str | dt.date) -> Path:
    """``<root>/<layer>/_days/ds=D``: the folder that says every table of ``layer`` for day D is published."""
    return partition(root, f"{layer}/{DAYS}", ds)


def mark_day_complete(root: Path, layer: str, ds: str | dt.date, side_files: dict[str, str] | None = None) -> Path:
    """Publish the day marker of ``layer`` (with ``_SUCCESS`` and small side files, e.g. a report) once
    every table of day D is published: a downstream stage runs over D only if the marker is there."""
    final = day_marker(root, layer, ds)
    tmp = staging_dir(final)
    try:
        for name, text in (side_files or {}).items():
            (tmp / name).write_text(text)
        return publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unmark_day(root: Path, layer: str, ds: str | dt.date) -> None:
    """Withdraw the day marker before republishing any table of day D. Renamed aside first: the marker
    disappears in one step, never leaving a folder that still holds ``_SUCCESS`` but lost its side files."""
    final = day_marker(root, layer, ds)
    if not final.exists():
        return
    gone = final.parent / f".{final.name}.gone-{uuid.uuid4().hex[:8]}"
    final.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def completed_days(root: Path, layer: str) -> list[str]:
    """Days of ``layer`` whose tables were all published (``mark_day_complete``), sorted."""
    return partitions(root, f"{layer}/{DAYS}")


def data_files(part_dir: Path) -> list[Path]:
    """The Parquet files of a partition (``.parquet`` or ``.parq``, any case), in a stable order; side
    files start with ``_`` or ``.``."""
    return sorted(p for p in Path(part_dir).iterdir()
                  if p.is_file() and not p.name.startswith(("_", ".")) and p.suffix.lower() in PARQUET_SUFFIXES)


def other_files(part_dir: Path) -> list[Path]:
    """Files of a partition that are neither data (``data_files``) nor side files: input to refuse by name."""
    data = set(data_files(part_dir))
    return sorted(p for p in Path(part_dir).iterdir()
                  if p.is_file() and not p.name.startswith(("_", ".")) and p not in data)
