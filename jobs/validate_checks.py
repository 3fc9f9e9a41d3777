"""Validation's row checks as Spark columns, the catalog as of a day, and the suite run on Spark.

``with_checks`` adds to a table's rows (``jobs.raw_files.read_rows``) the check columns its suite reads
(``schemas.suites``: null where a rule does not apply) and ``_reason``: the ``;``-joined codes of every
expectation the row fails, in the suite's order, computed from the suite's own expectations so the
quarantine and GE's report cannot disagree. Duplicates and conflicting event ids are window functions
over (ds, id); whether an event's item is in the catalog as of its day is a join with ``catalog_as_of``.

The catalog as of a day is a compacted table, ``<validated>/catalog_state/ds=D`` (item_id, first_ds: the
first day each item was in the validated catalog, over every partition up to D). A run reads the latest
state before its first day, the published catalog partitions after that state (none on a daily run), and
its own valid catalog rows; it writes the state of the last day it publishes. A run that validates a
catalog day withdraws every state from that day on before anything changes (those states would still
hold the replaced partitions); the next run rebuilds from the latest one left, so a state never holds
partitions that are no longer published.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import great_expectations.expectations as gxe
import pyarrow as pa
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from jobs.spark import spark_schema
from schemas import CATALOG, C
from schemas import suites
from schemas.raw import EVENT_CONTENT
from synergen_core import lake
from synergen_core.config import Config

CATALOG_STATE = "catalog_state"
STATE = pa.schema([pa.field(C.ITEM_ID, pa.string()), pa.field(C.FIRST_DS, pa.string())])
DAY_US = 86_400 * 1_000_000


# ---------------------------------------------------------------- checks

def with_checks(cfg: Config, table: str, rows: DataFrame, catalog: DataFrame | None) -> DataFrame:
    """``rows`` with the suite's check columns and ``_reason`` ('' when the row passes every rule).

    ``catalog``: (item_id, first_ds) as of the run's last day, for event tables."""
    checks: dict[str, Column] = {}
    df = rows
    if table == "catalog":
        # duplicates are judged within a partition, the first row (in file and row order) kept; nulls
        # are reported by their own rule
        by_id = Window.partitionBy(C.DS, C.ITEM_ID).orderBy(C.SOURCE_FILE, C.SOURCE_ROW)
        checks[suites.FIRST_OF_ID] = _unless_null(C.ITEM_ID, F.row_number().over(by_id) == 1)
    else:
        checks[suites.TS_IN_WINDOW] = _unless_null(C.TS, _ts_in_window(cfg.validation.late_days))
        if catalog is not None:
            df = df.join(catalog.select(C.ITEM_ID, F.col(C.FIRST_DS).alias("_first_ds")), C.ITEM_ID, "left")
            known = F.col("_first_ds").isNotNull() & (F.col("_first_ds") <= F.col(C.DS))
        else:
            known = F.lit(False)
        checks[suites.ITEM_IN_CATALOG] = _unless_null(C.ITEM_ID, known)
        checks[suites.EVENT_ID_CONSISTENT] = _unless_null(C.EVENT_ID, _event_id_consistent(EVENT_CONTENT[table]))
        if table == "browse_events":
            checks[suites.VALUE_IN_RANGE] = _unless_null(C.VALUE, _value_in_range(cfg.validation.max_value))
    df = df.select(*rows.columns, *(col.alias(name) for name, col in checks.items()))
    return df.withColumn(C.REASON, reason(table))


def _unless_null(column: str, ok: Column) -> Column:
    """Rules do not apply where the field is null: GE's in-set check skips nulls."""
    return F.when(F.col(column).isNotNull(), ok)


def _ts_in_window(late_days: int) -> Column:
    ts = F.unix_micros(F.col(C.TS))
    day_start = F.unix_micros(F.to_timestamp(F.col(C.DS), "yyyy-MM-dd"))  # the session's zone is UTC
    return (ts >= day_start - F.lit(late_days * DAY_US)) & (ts < day_start + F.lit(DAY_US))


def _event_id_consistent(content: tuple[str, ...]) -> Column:
    """False for every row of an event id that has rows of different content in its partition.

    All rows of such an id fail, not all but one: nothing says which is right. Exact copies pass (they
    are re-deliveries; sessionize keeps one): the smallest and largest content of the id are equal, with
    nulls (and NaNs) equal to themselves. The check is per partition, like duplicate catalog ids, so its
    outcome does not depend on how days are grouped into runs; a conflict across days (with an already
    published day) is not seen here: that row is out already, and quarantining only the newcomer would
    keep an arbitrary one of the two."""
    by_id = Window.partitionBy(C.DS, C.EVENT_ID)
    row = F.struct(*content)
    return F.min(row).over(by_id).eqNullSafe(F.max(row).over(by_id))


def _value_in_range(max_value: float) -> Column:
    v = F.col(C.VALUE)
    # Spark orders NaN above every number, so it must be excluded by name; +inf by value
    return ~F.isnan(v) & (v != F.lit(float("inf"))) & (v >= 0) & (v <= F.lit(max_value))


def _fails(e: gxe.Expectation) -> Column:
    """Where a row fails expectation ``e``, as GE judges it (in-set and regex rules skip nulls)."""
    col = F.col(e.column)
    if isinstance(e, gxe.ExpectColumnValuesToNotBeNull):
        return col.isNull()
    if isinstance(e, gxe.ExpectColumnValuesToBeInSet):
        return col.isNotNull() & ~col.isin(list(e.value_set))
    if isinstance(e, gxe.ExpectColumnValuesToNotMatchRegex):
        return col.isNotNull() & col.rlike(e.regex)
    raise TypeError(f"no row rule for {type(e).__name__} (schemas/suites.py)")


def reason(table: str) -> Column:
    """The ``;``-joined reason codes of every expectation of the table's suite the row fails, in order."""
    return F.concat_ws(";", *(F.when(_fails(e), F.lit(e.meta["reason"])) for e in suites.expectations(table)))


def run_suite(table: str, frame: DataFrame):
    """GE's result of the table's suite on ``frame`` (a Spark DataFrame with the check columns): counts
    and a few examples per expectation; the rows themselves are in the quarantine."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # keep task logs readable
    batch_def = (ctx.data_sources.add_spark("raw", persist=False).add_dataframe_asset(table)  # cached by us
                 .add_batch_definition_whole_dataframe("batch"))
    suite = ctx.suites.add(suites.suite(table))
    return batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20})


# ---------------------------------------------------------------- the catalog as of a day

def state_table(cfg: Config) -> str:
    return cfg.layout.valid(CATALOG_STATE)


def catalog_as_of(spark, cfg: Config, first_ds: str, last_ds: str, staged: DataFrame | None,
                  revalidated: set[str]) -> DataFrame:
    """(item_id, first_ds): every item of the validated catalog up to ``last_ds`` and the first day it was
    in it. ``staged``: this run's valid catalog rows (item_id, ds), which stand for the published
    partitions of the days in ``revalidated`` (a rerun replaces those)."""
    layout, root = cfg.layout, cfg.lake.root
    base = max((d for d in layout.days(state_table(cfg)) if d < first_ds), default=None)
    parts = []
    if base is not None:
        path = layout.part(state_table(cfg), base)
        parts.append(spark.read.schema(spark_schema(STATE, with_ds=False)).parquet(str(path)))
    # after the state: normally none (a daily run after a daily run), else the days it did not cover
    days = [d for d in layout.days(layout.valid("catalog"), after=base, upto=last_ds) if d not in revalidated]
    if days:
        table = root / layout.valid("catalog")
        parts.append(spark.read.schema(spark_schema(CATALOG)).option("basePath", str(table))
                     .parquet(*[str(layout.part(layout.valid("catalog"), d)) for d in days])
                     .select(C.ITEM_ID, F.col(C.DS).alias(C.FIRST_DS)))
    if staged is not None:
        parts.append(staged.where(F.col(C.DS) <= last_ds).select(C.ITEM_ID, F.col(C.DS).alias(C.FIRST_DS)))
    if not parts:
        return spark.createDataFrame([], spark_schema(STATE, with_ds=False))
    both = parts[0]
    for p in parts[1:]:
        both = both.unionByName(p)
    return both.where(F.col(C.ITEM_ID).isNotNull()).groupBy(C.ITEM_ID).agg(F.min(C.FIRST_DS).alias(C.FIRST_DS))


def withdraw_states(cfg: Config, first_ds: str) -> None:
    """Remove the catalog states of ``first_ds`` and later: the run is about to replace catalog partitions
    they hold. Each is renamed aside first, so it disappears in one step (``lake.remove_stale`` clears
    what a kill leaves)."""
    for d in cfg.layout.days(state_table(cfg), after=lake.previous_day(first_ds)):
        _remove_state(cfg, d)


def write_state(staging, cfg: Config, catalog: DataFrame, day: str) -> Path:
    """Publish the catalog as of ``day`` (``catalog`` holds a later day's: its items first seen by then),
    then remove the states before the last ``validation.catalog_states_kept``: each is a copy of the whole
    catalog. A later rerun of a day older than those left reads the catalog partitions instead (slower,
    same result)."""
    table = state_table(cfg)
    staging.write_day(catalog.where(F.col(C.FIRST_DS) <= day), table, day)
    published = lake.publish(staging.staged(table, day), cfg.layout.part(table, day))
    kept = cfg.validation.catalog_states_kept
    for d in cfg.layout.days(table, upto=day)[:-kept]:
        _remove_state(cfg, d)
    return published


def _remove_state(cfg: Config, day: str) -> None:
    final = cfg.layout.part(state_table(cfg), day)
    gone = final.parent / f".{final.name}{lake.GONE}{uuid.uuid4().hex[:8]}"
    final.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)
