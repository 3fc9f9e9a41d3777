"""Pipeline stages as tracked functions of ``(cfg, ds)``: what the CLI and the Airflow tasks call.

Each wraps a stage module in an MLflow stage run (synergen_core.tracking) and logs its counts,
durations and reports. ``group`` ties the stages of one pipeline run (an Airflow DAG run) together.
"""
from __future__ import annotations

import json
from pathlib import Path

from synergen_core.config import Config
from synergen_core.tracking import stage_run


def validate_raw(cfg: Config, ds: str, group: str | None = None, last_ds: str | None = None) -> dict:
    from jobs import validate

    last_ds = last_ds or ds
    with stage_run(cfg, "validate_raw", ds, group) as run:
        run.tags({"synergen.inputs": ",".join(f"raw/{t}/ds={ds}" for t in validate.TABLES),
                  "synergen.last_ds": last_ds})
        try:
            out = validate.run_range(cfg, ds, last_ds)
        except validate.ValidationFailed as e:
            _log_reports(run, e.report_dirs)
            raise
        run.metrics({"days_without_events": out["days_without_events"]})
        for table, counts in ((t, out[t]) for t in validate.TABLES if t in out):
            _log_reports(run, counts["report_dirs"])
            run.metrics({f"{table}.rows_in": counts["rows_in"], f"{table}.rows_out": counts["rows_valid"],
                         f"{table}.rows_quarantined": counts["rows_quarantined"]})
            for reason, n in counts["reasons"].items():
                run.metrics({f"{table}.quarantined.{reason.replace(':', '_')}": n})
        return out


def _log_reports(run, report_dirs: list[Path]) -> None:
    """One day's reports as they are; a range's per-day summaries as one JSON per table (a backfill over
    years would otherwise upload thousands of files)."""
    if len(report_dirs) <= MAX_REPORT_DAYS:
        for part in report_dirs:  # <area>/<table>/ds=D
            for name in ("_validation.json", "_validation.html"):
                run.artifact(part / name, f"validation/{part.parent.name}/{part.name}")
        return
    by_table: dict[str, list] = {}
    for part in report_dirs:
        by_table.setdefault(part.parent.name, []).append(json.loads((part / "_validation.json").read_text()))
    for table, summaries in by_table.items():
        run.text(json.dumps(summaries, indent=1), f"validation/{table}/days.json")


MAX_REPORT_DAYS = 31
