"""Validation of a small range under the shuffle-partition settings that decide its fixed cost.

Persisted DataFrames keep every shuffle partition unless adaptive execution may coalesce cached plans
(``spark.sql.optimizer.canChangeCachedPlanOutputPartitioning``, set in ``jobs.spark``); validation runs
dozens of Great Expectations jobs on its persisted rows. One session, the same generated days (2 days,
4,000 events), each setting timed in turn, twice, side by side:

    .venv/bin/python -m benchmarks.cached_partitions
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result
from jobs import generate, validate
from jobs.pipeline import days
from jobs.spark import get_spark
from synergen_core.config import Config

SETTINGS = [(200, "false"), (200, "true"), (2, "true")]  # (shuffle partitions, coalesce cached plans)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="synergen-cached-"))
    cfg = Config()
    cfg.lake.root = work / "lake"
    cfg.spark.master = "local[2]"
    cfg.generate.days, cfg.generate.events, cfg.generate.users, cfg.generate.items = 2, 4_000, 200, 300
    generate.run(cfg, cfg.generate.start_ds)
    first, last = days(cfg)[0], days(cfg)[-1]
    spark = get_spark(cfg)
    validate.run_range(cfg, first, last)  # warm-up: JVM, Great Expectations, file cache
    seconds: dict[str, list[float]] = {}
    for _ in range(2):
        for partitions, coalesce in SETTINGS:
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.spark.shuffle_partitions = partitions
            run_cfg.spark.conf = {"spark.sql.optimizer.canChangeCachedPlanOutputPartitioning": coalesce}
            t0 = time.perf_counter()
            validate.run_range(run_cfg, first, last)
            seconds.setdefault(f"{partitions} partitions, coalesce cached {coalesce}", []).append(
                round(time.perf_counter() - t0, 1))
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)
    base = min(seconds["2 partitions, coalesce cached true"])
    table = "| setting | validation seconds (2 runs) | best vs 2 partitions |\n|---|---|---|\n" + "".join(
        f"| {k} | {', '.join(map(str, v))} | ×{min(v) / base:.1f} |\n" for k, v in seconds.items())
    write_result("cached_partitions", {"events": cfg.generate.events, "days": cfg.generate.days, "seconds": seconds},
                 "Validation of 2 generated days (4,000 events) in one local[2] session, each setting in turn.\n\n"
                 + table)


if __name__ == "__main__":
    main()
