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


def sessionize(cfg: Config, ds: str, group: str | None = None, from_ds: str | None = None) -> dict:
    from jobs import sessionize as job

    with stage_run(cfg, "sessionize", ds, group) as run:
        run.tags({"synergen.inputs": ",".join(f"validated/{t}/ds={ds}" for t in ("search_events", "browse_events")),
                  "synergen.from_ds": from_ds or ""})
        out = job.stage(cfg, ds, from_ds)
        run.metrics({k: v for k, v in _numbers(out).items()})
        run.text(json.dumps(out, indent=1, default=str), "sessionize.json")
        return out


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a stage's result, as MLflow metric names."""
    out: dict[str, float] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, name + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name.replace(":", "_")] = v
    return out


# ---------------------------------------------------------------- Airflow

STAGES = {
    "validate_raw": validate_raw,
    "sessionize": sessionize,
}


def config_for_run(params: dict | None) -> Config:
    """The config of one DAG run: the file named by the ``config`` param (else defaults + environment),
    then the hand-trigger overrides (``epochs``, ``d_model``...) where set."""
    from synergen_core.config import load_config

    params = dict(params or {})
    cfg = load_config(params.pop("config", None) or None)
    for key, section, field in OVERRIDES:
        if params.get(key) is not None:
            setattr(getattr(cfg, section), field, params[key])
    return cfg


OVERRIDES = (  # DAG param -> config section, field
    ("epochs", "train", "epochs"),
    ("d_model", "model", "d_model"),
    ("n_layers", "model", "n_layers"),
)


def airflow_task(stage: str, ds: str, params: dict | None, run_id: str) -> dict:
    """What every task of the DAG calls: one stage for the run's ``ds``, nested under the run's MLflow run."""
    return STAGES[stage](config_for_run(params), ds, group=run_id)
