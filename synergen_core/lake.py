"""The lake: where each table lives (``Layout``), and atomic publication of partitions.

Every partition is written aside (a hidden sibling folder) and renamed into place, so a reader or a
crash never sees half a day; rerunning a day replaces the whole partition.

Replacing a partition takes two renames (``ds=D`` aside to ``.ds=D.old-swap``, the new folder in), and
a process killed between them leaves no ``ds=D``. The old folder is only deleted once the new one is
in place, so it is never lost: ``recover`` renames it back, and both the next ``publish`` and every
reader (``partitions``) call it, so nobody sees the day missing after such a kill. Staging folders of
a killed run (``.ds=D.tmp-*``, Spark's ``.run-*``) are removed by ``remove_stale`` when the same stage
runs again.
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUCCESS = "_SUCCESS"
RAW, QUARANTINE = "raw", "quarantine"  # layers whose names are not configured
STAGING = "_staging"  # the candidate lists' staged days, beside the published ones


@dataclass(frozen=True)
class Layout:
    """Where every table of the lake lives: the one place table paths are spelled.

    A table is named by its path under ``root`` (``validated/search_events``); its days are
    ``ds=YYYY-MM-DD`` folders under it. The layer names are the config's (``Layout.of``), so a team can
    keep two pipelines' layers side by side in one lake.
    """

    root: Path
    validated: str = "validated"  # sessionize.source
    sessionized: str = "sessionized"  # sessionize.output
    embeddings: str = "embeddings"  # embeddings.output
    models: str = "models"  # train.output
    candidates: str = "candidates"  # score.output
    semantic_ids: str = "semantic_ids"  # the items' semantic IDs (not configured)
    semantic_ids_model: str = "semantic_ids_model"  # the RQ-VAE that made them

    @classmethod
    def of(cls, cfg) -> "Layout":
        """The layout of a ``synergen_core.config.Config``."""
        return cls(Path(cfg.lake.root), cfg.sessionize.source, cfg.sessionize.output, cfg.embeddings.output,
                   cfg.train.output, cfg.score.output)

    # table names, by layer
    def raw(self, table: str) -> str:
        return f"{RAW}/{table}"

    def valid(self, table: str) -> str:
        return f"{self.validated}/{table}"

    def quarantine(self, table: str) -> str:
        return f"{QUARANTINE}/{table}"

    def sessions(self, table: str) -> str:
        return f"{self.sessionized}/{table}"

    def split(self, protocol: str, part: str) -> str:
        """A training split's table: ``protocol`` loo|temporal, ``part`` train|eval."""
        return self.sessions(f"split_{protocol}_{part}")

    def vectors(self, table: str) -> str:
        return f"{self.embeddings}/{table}"

    # folders
    def part(self, table: str, ds: str | dt.date) -> Path:
        """``<root>/<table>/ds=D``."""
        return partition(self.root, table, ds)

    def model_dir(self, ds: str | dt.date, protocol: str = "", variant: str = "") -> Path:
        """``<root>/<models>/ds=D[/<protocol>[/<variant>]]``: the day's trained models, the files of one
        protocol (its side inputs) or one model."""
        return partition(self.root, self.models, ds) / protocol / variant

    def candidates_part(self, ds: str | dt.date) -> Path:
        """The published candidate lists of a day."""
        return partition(self.root, self.candidates, ds)

    @property
    def candidates_staging_table(self) -> str:
        """The candidate lists' days between scoring and publishing, beside the published days."""
        return f"{self.candidates}/{STAGING}"

    def candidates_staging(self, ds: str | dt.date) -> Path:
        return self.part(self.candidates_staging_table, ds)

    @property
    def scoring_payload_table(self) -> str:
        """Where a scoring run leaves the files its workers map (content tables, index) while it runs."""
        return f"{self.candidates}/_payload"

    @property
    def registry_cache(self) -> Path:
        """Where registered model versions are downloaded to, by default (``registry.cache_dir``)."""
        return Path(self.root) / "_registry_cache"

    # days
    def days(self, table: str, after: str | None = None, upto: str | None = None) -> list[str]:
        """Published days of ``table`` in ``(after, upto]`` (either bound open when None), sorted."""
        return days(self.root, table, after, upto)

    def day_before(self, table: str, ds: str, ready=None) -> str | None:
        """The latest published day of ``table`` strictly before ``ds``: a stage's state, what yesterday
        left. ``ready(day) -> bool`` excludes days whose state is incomplete. None if there is none."""
        days = [d for d in self.days(table) if d < ds and (ready is None or ready(d))]
        return days[-1] if days else None


def previous_day(ds: str | dt.date) -> str:
    """The calendar day before ``ds`` (ISO)."""
    return (dt.date.fromisoformat(str(ds)) - dt.timedelta(days=1)).isoformat()


def next_day(ds: str | dt.date) -> str:
    """The calendar day after ``ds`` (ISO)."""
    return (dt.date.fromisoformat(str(ds)) + dt.timedelta(days=1)).isoformat()


def day_range(first_ds: str, last_ds: str) -> list[str]:
    """Every calendar day from ``first_ds`` to ``last_ds``, both included (ISO)."""
    first, last = dt.date.fromisoformat(first_ds), dt.date.fromisoformat(last_ds)
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def partition(root: Path, table: str, ds: str | dt.date) -> Path:
    """``<root>/<table>/ds=YYYY-MM-DD``; ``table`` may be nested, e.g. ``raw/search_events``."""
    return Path(root) / table / f"ds={ds}"


# Layers written by others (upstream log shippers, ``ingest``, the generator): their folders are input,
# complete by contract, and need no ``_SUCCESS`` marker. Every other layer is written by this pipeline.
EXTERNAL_LAYERS = (RAW,)
PARQUET_SUFFIXES = (".parquet", ".parq")
# Name parts of the hidden siblings of ``ds=D``: a partition being written, a replaced one (kept until
# the new one is in place), a withdrawn day marker. Spark's staging folders are ``.run-*`` (jobs.spark).
TMP, OLD, GONE, RUN = ".tmp-", ".old-", ".gone-", ".run-"


def partitions(root: Path, table: str) -> list[str]:
    """Days published for a table, sorted: folders ``ds=D`` holding ``_SUCCESS`` (a half-written or
    abandoned folder is not a partition). Under an external layer (``raw/``) every ``ds=D`` folder counts."""
    base = Path(root) / table
    if not base.is_dir():
        return []
    external = Path(table).parts[0] in EXTERNAL_LAYERS
    for aside in base.glob(f".ds=*{OLD}*"):
        recover(base / aside.name[1:aside.name.index(OLD)], aside)
    return sorted(p.name[3:] for p in base.iterdir()
                  if p.is_dir() and p.name.startswith("ds=") and (external or (p / SUCCESS).is_file()))


def days(root: Path, table: str, after: str | None = None, upto: str | None = None) -> list[str]:
    """``partitions`` in ``(after, upto]`` (either bound open when None)."""
    return [d for d in partitions(root, table) if (after is None or d > after) and (upto is None or d <= upto)]


def staging_dir(final: Path) -> Path:
    """A fresh hidden sibling of ``final`` (same filesystem, so the rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, final: Path) -> Path:
    """Move a fully written ``tmp`` folder to ``final``, replacing what was there.

    The old folder is renamed aside (``set_aside(final)``, one fixed name per partition), not deleted,
    until the new one is in place (see the module docstring): a kill between the two renames loses
    nothing and ``recover`` undoes it. The fixed name keeps ``recover`` one lookup, not a listing of
    the table's folder per publish (thousands of days published in one run would make that quadratic).
    """
    (tmp / SUCCESS).touch()
    old = set_aside(final)
    recover(final)
    if final.exists() and old.exists():  # a kill after the last swap's new folder was in place
        shutil.rmtree(old)
    for _ in range(3):
        if final.exists():
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError as e:
            # A reader's ``recover`` put the old folder back between our two renames: set it aside again.
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.exists():
                raise
            continue
        shutil.rmtree(old, ignore_errors=True)
        return final
    raise OSError(errno.EBUSY, f"could not replace {final}: something keeps putting a folder there")


def set_aside(final: Path) -> Path:
    """Where ``publish`` keeps the partition it replaces until the new one is in place."""
    return final.parent / f".{final.name}{OLD}swap"


def recover(final: Path, aside: Path | None = None) -> bool:
    """Put back a partition that a publish killed between its two renames left aside (``aside``, by
    default ``set_aside(final)``) with no ``ds=D``; True if it did."""
    aside = aside or set_aside(final)
    if final.exists() or not (aside / SUCCESS).is_file():
        return False
    try:
        aside.rename(final)
        return True
    except OSError:  # another process recovered it first, or it went away
        return False


def remove_stale(root: Path, table: str) -> list[Path]:
    """Remove what killed runs left under ``<root>/<table>``: staging folders (``.ds=D.tmp-*``, Spark's
    ``.run-*``), replaced partitions whose successor is in place, withdrawn markers; returns them.

    Only the stage that writes ``table`` may call it, before it stages anything: a staging folder of
    a run still in progress would be removed too. That is safe because runs of the DAG are serialized
    (``max_active_runs=1``) and a stage's tasks never overlap, so no other writer of the table is active.
    """
    base = Path(root) / table
    if not base.is_dir():
        return []
    partitions(root, table)  # recovers replaced partitions first: those are data, not leftovers
    stale = [p for p in base.iterdir() if p.name.startswith(RUN)
             or (p.name.startswith(".ds=") and any(m in p.name for m in (TMP, OLD, GONE)))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def write_partition(
    table: pa.Table, final: Path, metadata: dict[bytes, bytes] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write one Parquet file (plus small side files) into ``final`` atomically."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    return write_files(final, extra_files, lambda tmp: pq.write_table(table, tmp / "part-00000.parquet",
                                                                      compression="zstd"))


def write_files(final: Path, files: dict[str, str] | None = None, write=None) -> Path:
    """Small text files (and whatever ``write(folder)`` adds) written aside, then published as ``final``."""
    tmp = staging_dir(final)
    try:
        if write is not None:
            write(tmp)
        for name, text in (files or {}).items():
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
    return write_files(day_marker(root, layer, ds), side_files)


def unmark_day(root: Path, layer: str, ds: str | dt.date) -> None:
    """Withdraw the day marker before republishing any table of day D. Renamed aside first: the marker
    disappears in one step, never leaving a folder that still holds ``_SUCCESS`` but lost its side files."""
    final = day_marker(root, layer, ds)
    if not final.exists():
        return
    gone = final.parent / f".{final.name}{GONE}{uuid.uuid4().hex[:8]}"
    final.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def completed_days(root: Path, layer: str) -> list[str]:
    """Days of ``layer`` whose tables were all published (``mark_day_complete``), sorted."""
    return partitions(root, f"{layer}/{DAYS}")


def data_files(part_dir: Path) -> list[Path]:
    """The Parquet files of a partition (``.parquet`` or ``.parq``, any case), in a stable order; side
    files start with ``_`` or ``.``; none when the folder does not exist."""
    if not Path(part_dir).is_dir():
        return []
    return sorted(p for p in Path(part_dir).iterdir()
                  if p.is_file() and not p.name.startswith(("_", ".")) and p.suffix.lower() in PARQUET_SUFFIXES)


def other_files(part_dir: Path) -> list[Path]:
    """Files of a partition that are neither data (``data_files``) nor side files: input to refuse by name."""
    if not Path(part_dir).is_dir():
        return []
    data = set(data_files(part_dir))
    return sorted(p for p in Path(part_dir).iterdir()
                  if p.is_file() and not p.name.startswith(("_", ".")) and p not in data)


def read_partition(root: Path, table: str, ds: str, columns: list[str] | None = None) -> pa.Table:
    """One published partition read in this process (pyarrow): for tables bounded by configuration or
    by one day's vocabulary, never a whole history."""
    part = partition(root, table, ds)
    if not part.is_dir():
        raise FileNotFoundError(f"{part}: no published partition")
    tables = [pq.read_table(f, columns=columns) for f in data_files(part)]
    if not tables:
        return pa.table({}) if columns is None else pa.table({c: pa.array([]) for c in columns})
    return pa.concat_tables(tables, promote_options="permissive").combine_chunks()


def read_meta(root: Path, table: str, ds: str, name: str) -> dict | None:
    """A partition's JSON side file ``name`` (e.g. ``_collab.json``), None when absent."""
    path = partition(root, table, ds) / name
    return json.loads(path.read_text()) if path.is_file() else None
