"""The one place a Spark session is built, from ``cfg.spark``.

Choices that every Spark job of the project relies on:

* ``spark.sql.session.timeZone=UTC``: days (``ds``) and day boundaries are UTC everywhere.
* ``spark.sql.parquet.outputTimestampType=TIMESTAMP_MICROS``: Spark's default (INT96) is read by
  Arrow as nanoseconds without a zone; microseconds adjusted to UTC read back as the contracts'
  ``timestamp[us, tz=UTC]``.
* ``cfg.spark.local_ip`` is exported as ``SPARK_LOCAL_IP`` before the JVM starts (it is read only
  then): on a laptop or CI box it keeps the driver on loopback; set it to null on a real cluster.
* ``spark.pyspark.python`` is this interpreter unless set (in ``cfg.spark.conf``, else by Spark's own
  ``PYSPARK_PYTHON``): Arrow-based Python stages (``mapInPandas``) import torch and the project on the
  executors, which a bare ``python3`` on the PATH may lack. On a cluster whose workers keep the venv
  elsewhere, set it in ``cfg.spark.conf``. A driver started from plain Python (not ``spark-submit``)
  takes the workers' interpreter from ``PYSPARK_PYTHON`` alone and ignores the setting, so
  ``get_spark`` exports it too before the context starts.
* ``cfg.spark.conf`` is passed through last, so a deployment can override any of the above.

``get_spark`` returns the active session if one exists (``getOrCreate``): inside a test session or an
Airflow worker that already holds one, jobs share it instead of starting a second JVM.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from schemas import C
from synergen_core import lake
from synergen_core.config import Config

log = logging.getLogger(__name__)


def spark_conf(cfg: Config) -> dict[str, str]:
    """Every Spark setting the session gets, in the order applied (later wins)."""
    s = cfg.spark
    conf = {
        "spark.app.name": s.app_name,
        "spark.master": s.master,
        "spark.driver.memory": s.driver_memory,
        "spark.sql.shuffle.partitions": str(s.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.ui.showConsoleProgress": "false",
        # Spark's default, pinned: jobs join vocabularies and states without explicit broadcasts and rely
        # on it to broadcast the small sides (under its size threshold) and to coalesce shuffle partitions.
        "spark.sql.adaptive.enabled": "true",
        # Without it a persisted DataFrame keeps every shuffle partition (200 by default) however small it
        # is, and each later job on it (validation's Great Expectations metrics are dozens) runs that many
        # tasks: a small day's validation took 5x longer at 200 partitions than at 2. With it, adaptive
        # execution coalesces cached plans as it does the others.
        "spark.sql.optimizer.canChangeCachedPlanOutputPartitioning": "true",
        # Listing thousands of day partitions (a long backfill) would otherwise start one task per
        # path (default parallelism 10,000): tens of seconds of scheduling for a cheap listing.
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": "32",
        "spark.pyspark.python": os.environ.get("PYSPARK_PYTHON", sys.executable),
    }
    if s.local_ip:
        conf["spark.driver.host"] = s.local_ip
        conf["spark.driver.bindAddress"] = s.local_ip
    conf.update({k: str(v) for k, v in s.conf.items()})
    return conf


def get_spark(cfg: Config):
    """A SparkSession configured from ``cfg.spark`` (the active one when it already runs)."""
    from pyspark.sql import SparkSession

    if cfg.spark.local_ip:
        os.environ["SPARK_LOCAL_IP"] = cfg.spark.local_ip
    conf = spark_conf(cfg)
    os.environ["PYSPARK_PYTHON"] = conf["spark.pyspark.python"]
    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info("spark session: master=%s app=%s", spark.sparkContext.master, spark.sparkContext.appName)
    return spark


@contextmanager
def session(cfg: Config):
    """A stage's session: the active one when a caller holds it, else one from ``cfg.spark`` that is
    stopped when the stage ends (a CLI or Airflow task process does not keep a JVM it no longer uses),
    unless ``spark.keep_session`` leaves it to the process's next stage."""
    owned = active_session() is None
    spark = get_spark(cfg)
    try:
        yield spark
    finally:
        if owned and not cfg.spark.keep_session:
            spark.stop()


def active_session():
    """The process's running Spark session, or None."""
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()


def stop_active_session() -> None:
    """Stop the process's session, if any (one kept by ``spark.keep_session``)."""
    active = active_session()
    if active is not None:
        active.stop()


# ---------------------------------------------------------------------------------------------
# lake IO for Spark jobs: read published partitions, write aside, publish by rename


def spark_schema(contract, with_ds: bool = True):
    """The Spark schema of an Arrow contract, plus the ``ds`` partition column as a string."""
    from pyspark.sql.pandas.types import from_arrow_schema
    from pyspark.sql.types import StringType

    schema = from_arrow_schema(contract)
    return schema.add(C.DS, StringType()) if with_ds else schema


def read_days(spark, root: Path, table: str, contract, after: str | None = None, upto: str | None = None):
    """Published partitions ``after < ds <= upto`` of ``<root>/<table>`` as one DataFrame with ``ds``.

    The explicit schema keeps ``ds`` a string (Spark would infer a date), makes partitions written by
    pyarrow and by Spark read alike, and lets an empty selection still have the contract's columns.
    """
    days = lake.days(root, table, after, upto)
    schema = spark_schema(contract)
    if not days:
        return spark.createDataFrame([], schema)
    base = Path(root) / table
    return (spark.read.schema(schema).option("basePath", str(base))
            .parquet(*[str(lake.partition(root, table, d)) for d in days]))


def spark_partition(spark, root: Path, table: str, ds: str, contract):
    """One published partition as a Spark DataFrame (without ``ds``), with the contract's types."""
    part = lake.partition(root, table, ds)
    if not part.is_dir():
        raise FileNotFoundError(f"{part}: no published partition")
    schema = spark_schema(contract, with_ds=False)
    if not lake.data_files(part):
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(str(part))


def count_rows(root: Path, table: str, after: str | None = None, upto: str | None = None) -> dict[str, int]:
    """Rows per published partition ``after < ds <= upto``, from Parquet footers (no Spark job)."""
    import pyarrow.parquet as pq

    days = lake.days(root, table, after, upto)
    return {d: sum(pq.ParquetFile(f).metadata.num_rows for f in lake.data_files(lake.partition(root, table, d)))
            for d in days}


class Staging:
    """Outputs written into hidden staging folders, renamed into place together by ``publish``.

    Spark writes a folder of part files, so each partition is written aside and moved with
    ``lake.publish`` (one rename per partition): a reader or a crash never sees half a day.
    """

    def __init__(self, spark, root: Path):
        self.spark, self.root = spark, Path(root)
        self.pending: list[tuple[Path, Path]] = []
        self.scratch: list[Path] = []
        self.cleaned: set[str] = set()

    def write_days(self, df, table: str, days: list[str], shuffle_by_day: bool) -> None:
        """``df`` (with ``ds``) as one partition per day of ``days``; a day without rows is written empty.

        ``shuffle_by_day`` puts each day in one file at the cost of a shuffle; without it every task
        writes a file per day it holds, which is cheaper when there are few days.
        """
        tmp = self._run_dir(table)
        (df.repartition(C.DS) if shuffle_by_day else df).write.partitionBy(C.DS).parquet(str(tmp))
        for d in days:
            Path(self._stage(tmp, table, d)).mkdir(parents=True, exist_ok=True)

    def write_day(self, df, table: str, ds: str, n_files: int | None = None) -> None:
        """``df`` (without ``ds``) as the partition ``ds`` of ``table``, in ``n_files`` files if given."""
        part = self._stage(self._run_dir(table), table, ds)
        (df.coalesce(n_files) if n_files else df).write.parquet(part)

    def staged(self, table: str, ds: str) -> Path:
        """Where the partition ``ds`` of ``table`` is staged (until ``publish``)."""
        final = lake.partition(self.root, table, ds)
        return next(part for part, dest in self.pending if dest == final)

    def _run_dir(self, table: str) -> Path:
        if table not in self.cleaned:  # what a killed run of this stage left: see lake.remove_stale
            lake.remove_stale(self.root, table)
            self.cleaned.add(table)
        # Hidden, so readers of the table skip it; the partitions inside are not (Spark would skip them).
        tmp = self.root / table / f".run-{uuid.uuid4().hex[:8]}"
        self.scratch.append(tmp)
        return tmp

    def _stage(self, tmp: Path, table: str, ds: str) -> str:
        self.pending.append((tmp / f"ds={ds}", lake.partition(self.root, table, ds)))
        return str(tmp / f"ds={ds}")

    def add_side_file(self, table: str, ds: str, name: str, text: str) -> None:
        """A small file (``_`` first: readers skip it) beside a staged partition's data."""
        part = self.staged(table, ds)
        part.mkdir(parents=True, exist_ok=True)
        (part / name).write_text(text)

    def publish(self) -> list[Path]:
        """Rename every staged partition into place, in the order written."""
        done = [lake.publish(tmp, final) for tmp, final in self.pending]
        self.pending = []
        self.discard()
        return done

    def discard(self) -> None:
        """Remove whatever is still staged (after a failure, or the emptied run folders)."""
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)
        self.scratch, self.pending = [], []
