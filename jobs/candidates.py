"""Candidate lists between scoring and their readers: staging, validation, publication.

Readers never see lists that were not validated: ``jobs.score`` writes a day's lists to
``<lake>/<score.output>/_staging/ds=D/surface=rec|search/`` (``write_staged``, with ``_score.json``);

* ``validate_candidates`` (task ``validate_candidates``): the Great Expectations suite of
  ``schemas.candidates`` on the staged lists; ``_validation.json`` / ``_validation.ge.json`` beside them;
  raises ``CandidatesInvalid`` naming the partition, the failed checks and example rows;
* ``publish`` (task ``publish``): a validated day is renamed into ``<lake>/<score.output>/ds=D``
  (``_SUCCESS`` inside, the previous version of the day replaced).

Both tasks are tracked as MLflow stage runs by ``jobs.stages``.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs.spark import session, spark_partition, spark_schema
from schemas import C
from schemas import candidates as candidates_schema
from schemas import sequences as sequences_schema
from synergen_core import lake
from synergen_core.config import Config, parse_ds

log = logging.getLogger(__name__)

SCORE_FILE, VALIDATION_FILE, GE_FILE = "_score.json", "_validation.json", "_validation.ge.json"
EXAMPLES = 5  # example rows per failed check in reports and errors


class CandidatesInvalid(RuntimeError):
    """Lists that failed validation (or were never validated): ``report`` says which checks and rows."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------------------------
# staging, publication


def staged_dir(cfg: Config, ds: str) -> Path:
    """Where a scored day waits for validation (a hidden-to-readers sibling of the day partitions)."""
    return cfg.layout.candidates_staging(ds)


def published_dir(cfg: Config, ds: str) -> Path:
    return cfg.layout.candidates_part(ds)


def write_staged(cfg: Config, ds: str, lists: DataFrame, finish) -> dict:
    """Write the day aside with ``finish(counts)`` as ``_score.json``, then rename it to its staging place
    (replacing an earlier run's). -> the figures."""
    final = staged_dir(cfg, ds)
    lake.remove_stale(cfg.lake.root, cfg.layout.candidates_staging_table)  # what a killed run left aside
    tmp = lake.staging_dir(final)
    try:
        lists.write.mode("overwrite").partitionBy(C.SURFACE).parquet(str(tmp))
        for s in cfg.score.surfaces:  # a surface without requests is an empty folder, not a missing one
            (tmp / f"{C.SURFACE}={s}").mkdir(exist_ok=True)
        figures = finish(_counts(lists.sparkSession, tmp))
        (tmp / SCORE_FILE).write_text(json.dumps(figures, indent=1, default=str))
        lake.publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return figures


def read_lists(spark: SparkSession, part: Path) -> DataFrame:
    """A day's lists (staged or published) with ``surface``, in the contract's types."""
    schema = spark_schema(candidates_schema.CANDIDATES, with_ds=False).add(C.SURFACE, "string")
    if not any(part.glob(f"{C.SURFACE}=*/*.parquet")):
        return spark.createDataFrame([], schema)
    # the surface folders named, not ``part``: Spark skips a hidden root (the writer's ``.tmp-`` folder)
    surfaces = [str(p) for p in sorted(part.glob(f"{C.SURFACE}=*")) if lake.data_files(p)]
    return spark.read.schema(schema).option("basePath", str(part)).parquet(*surfaces)


def _counts(spark: SparkSession, part: Path) -> dict:
    """Lists and rows per surface, and distinct users, of a written day."""
    df = read_lists(spark, part)
    # collected: one row per surface (rec, search), whatever the number of users
    out = {r[C.SURFACE]: {"lists": r["lists"], "rows": r["rows"]} for r in df.groupBy(C.SURFACE).agg(
        F.sum((F.col(C.RANK) == 1).cast("long")).alias("lists"), F.count("*").alias("rows")).collect()}
    out["users"] = df.select(C.USER_ID).distinct().count()
    return out


def publish(cfg: Config, ds: str) -> dict:
    """Rename the validated staged day into ``<lake>/<score.output>/ds=D`` (replacing the previous version)."""
    ds = parse_ds(ds).isoformat()
    staged, final = staged_dir(cfg, ds), published_dir(cfg, ds)
    if not staged.is_dir():
        raise FileNotFoundError(f"{staged}: nothing staged for {ds} (run the score stage first)")
    report_file = staged / VALIDATION_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    if not report or not report.get("success"):
        raise CandidatesInvalid(f"{staged}: {'validation failed' if report else 'not validated'}: run "
                                "validate_candidates and fix what it reports before publishing", report or {})
    lake.remove_stale(cfg.lake.root, cfg.layout.candidates)
    lake.publish(staged, final)
    log.info("score %s: published %s", ds, final)
    return {"ds": ds, "path": str(final), "rows": report["rows"], "lists": report["lists"]}


# ---------------------------------------------------------------------------------------------
# validation


def check_frame(lists: DataFrame, catalog: DataFrame, consumed: DataFrame | None, run: dict) -> DataFrame:
    """The lists with the suite's check columns (``schemas.candidates``), computed per request.

    ``catalog``: (item_id, item_index) of the day's vocabulary; ``consumed``: (user_id, item_index) pairs of
    the users' histories (None when no surface excludes them); ``run``: the run's ``_score.json``.
    """
    n_items, top_k = run["n_items"], run["top_k"]
    excluded = [s for s, on in run["exclude_consumed"].items() if on]
    req = Window.partitionBy(*candidates_schema.REQUEST_KEY)
    by_rank = req.orderBy(C.RANK, C.ITEM_ID)
    df = lists.join(catalog.select(C.ITEM_ID, F.col(C.ITEM_INDEX).alias("_index")), C.ITEM_ID, "left")
    n_consumed = F.lit(0)
    if consumed is not None and excluded:
        pairs = consumed.select(C.USER_ID, F.col(C.ITEM_INDEX).alias("_index"), F.lit(True).alias("_consumed"))
        per_user = consumed.groupBy(C.USER_ID).agg(F.count("*").alias("_n_consumed"))
        df = df.join(pairs, [C.USER_ID, "_index"], "left").join(per_user, C.USER_ID, "left")
        n_consumed = F.when(F.col(C.SURFACE).isin(excluded), F.coalesce("_n_consumed", F.lit(0))).otherwise(0)
        not_consumed = F.when(F.col(C.SURFACE).isin(excluded), F.col("_consumed").isNull())
    else:
        not_consumed = F.lit(None).cast("boolean")
    expected = F.least(F.lit(top_k), F.lit(n_items - 1) - n_consumed)
    surface = F.col(C.SURFACE)
    in_catalog = F.col("_index").isNotNull() & (F.col("_index") >= 1) & (F.col("_index") < n_items)
    per_item = Window.partitionBy(*candidates_schema.REQUEST_KEY, C.ITEM_ID)
    return df.select(
        *lists.columns,
        (F.count("*").over(req) == expected).alias(candidates_schema.LIST_LENGTH),
        (F.count("*").over(per_item) == 1).alias(candidates_schema.UNIQUE_ITEM),
        (F.col(C.RANK) == F.row_number().over(by_rank)).alias(candidates_schema.RANKS),
        (F.col(C.RANKING_SCORE) <= F.lag(C.RANKING_SCORE).over(by_rank)).alias(candidates_schema.SCORE_ORDER),
        in_catalog.alias(candidates_schema.IN_CATALOG),
        not_consumed.alias(candidates_schema.NOT_CONSUMED),
        F.when(surface == candidates_schema.SURFACE_REC, F.col(C.QUERY).isNull())
        .when(surface == candidates_schema.SURFACE_SEARCH, F.col(C.QUERY).isNotNull())
        .alias(candidates_schema.QUERY_SURFACE),
    )


def run_suite(frame: DataFrame):
    """GE's result of the candidates suite on ``frame`` (a Spark DataFrame with the check columns)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (ctx.data_sources.add_spark("candidates", persist=False).add_dataframe_asset("lists")  # cached by us
                 .add_batch_definition_whole_dataframe("day"))
    suite = ctx.suites.add(candidates_schema.suite())
    return batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES})


def _examples(frame: DataFrame, column: str) -> list[dict]:
    """A few rows failing the check on ``column`` (a null required field, or a False check)."""
    bad = F.col(column).isNull() if column in candidates_schema.REQUIRED else (F.col(column) == F.lit(False))
    if column == C.SURFACE:
        bad = ~F.col(C.SURFACE).isin(list(candidates_schema.SURFACES)) | F.col(C.SURFACE).isNull()
    request_key = candidates_schema.REQUEST_KEY
    cols = [*request_key, C.RANK, C.ITEM_ID, C.RETRIEVAL_SCORE, C.RANKING_SCORE]
    # collected: at most EXAMPLES rows, the failing lists the report shows
    rows = frame.where(bad).orderBy(*request_key, C.RANK, C.ITEM_ID).select(*cols).limit(EXAMPLES).collect()
    return [r.asDict() for r in rows]


def _check_files(part: Path) -> None:
    """Every data file has the contract's columns and types (before Spark reads them with that schema)."""
    import pyarrow.parquet as pq

    from schemas.sequences import conforms

    for folder in sorted(part.glob(f"{C.SURFACE}=*")):
        for f in lake.data_files(folder):
            schema = pq.read_schema(f)
            if not conforms(schema, candidates_schema.CANDIDATES):
                raise CandidatesInvalid(f"{f}: columns {schema} do not match the candidates contract "
                                        f"(schemas/candidates.py) {candidates_schema.CANDIDATES}",
                                        {"partition": str(part), "file": str(f)})


def consumed_pairs(spark: SparkSession, cfg: Config, ds: str, n_items: int) -> DataFrame:
    """(user_id, item_index): each catalog item of each user's history up to ``ds``, once, from the
    ``consumed`` snapshot of ``ds`` that sessionize keeps (the history itself is not read)."""
    snap = spark_partition(spark, cfg.lake.root, cfg.layout.sessions("consumed"), ds, sequences_schema.CONSUMED)
    return (snap.select(C.USER_ID, F.explode(C.CONSUMED).alias(C.ITEM_INDEX))
            .where(F.col(C.ITEM_INDEX).between(1, n_items - 1)))


def validate_lists(spark: SparkSession, cfg: Config, ds: str, part: Path) -> dict:
    """Run the suite on the lists in ``part``; write the reports beside them; the summary (see
    ``validate_candidates``)."""
    _check_files(part)
    run = json.loads((part / SCORE_FILE).read_text())
    root = cfg.lake.root
    catalog = spark_partition(spark, root, cfg.layout.sessions("item_vocab"), ds, sequences_schema.ITEM_VOCAB)
    consumed = None
    if any(run["exclude_consumed"].values()):
        consumed = consumed_pairs(spark, cfg, ds, run["n_items"])
    frame = check_frame(read_lists(spark, part), catalog, consumed, run).cache()
    try:
        result = run_suite(frame)
        failed = []
        for r in result.results:
            if not r.success:
                col = r.expectation_config.kwargs.get("column")
                failed.append({"check": r.expectation_config.meta.get("check"), "column": col,
                               "notes": r.expectation_config.meta.get("notes"),
                               "unexpected_count": r.result.get("unexpected_count"),
                               "examples": _examples(frame, col)})
        totals = frame.agg(F.count("*").alias("rows"), F.sum((F.col(C.RANK) == 1).cast("long")).alias("lists")).first()
    finally:
        frame.unpersist()
    report = {"ds": ds, "partition": str(part), "suite": "candidates", "success": bool(result.success),
              "rows": int(totals["rows"]), "lists": int(totals["lists"] or 0), "expectations": len(result.results),
              "model": run["model"], "failed": failed}
    (part / VALIDATION_FILE).write_text(json.dumps(report, indent=1, default=str))
    (part / GE_FILE).write_text(json.dumps(result.to_json_dict(), indent=1, default=str))
    return report


def validate_candidates(cfg: Config, ds: str) -> dict:
    """Validate the staged lists of ``ds`` (the published ones when none are staged): the report, also written
    beside them as ``_validation.json``; raises ``CandidatesInvalid`` naming the partition, every failed
    check and example rows."""
    ds = parse_ds(ds).isoformat()
    part = staged_dir(cfg, ds) if staged_dir(cfg, ds).is_dir() else published_dir(cfg, ds)
    if not (part / SCORE_FILE).is_file():
        raise FileNotFoundError(f"{part}: no scored lists for {ds} (run the score stage first)")
    with session(cfg) as spark:
        report = validate_lists(spark, cfg, ds, part)
    if not report["success"]:
        lines = [f"  {f['check']} ({f['column']}: {f['unexpected_count']} rows; {f['notes'] or 'required'}); "
                 f"e.g. {f['examples'][:2]}" for f in report["failed"]]
        raise CandidatesInvalid(f"{part}: candidate lists failed validation:\n" + "\n".join(lines), report)
    return report
