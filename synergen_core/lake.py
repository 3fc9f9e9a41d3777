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


def partitions(root: Path, table: str) -> list[str]:
    """Days present (published) for a table, sorted."""
    base = Path(root) / table
    if not base.is_dir():
        return []
    return sorted(p.name[3:] for p in base.iterdir() if p.is_dir() and p.name.startswith("ds="))


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


def data_files(part_dir: Path) -> list[Path]:
    """The Parquet files of a partition, in a stable order (side files start with ``_`` or ``.``)."""
    return sorted(p for p in Path(part_dir).glob("*.parquet") if not p.name.startswith(("_", ".")))
