"""The main job on the embedded default: generated logs, then the daily DAG run once with ``airflow dags test``.

Steps: generate ``generate.days`` days of synthetic logs; validate every day but the last (the history a
daily job would already have); write the effective config to a file; ``airflow db migrate`` an Airflow home
(SQLite) and ``airflow dags test synergen_daily <last day>`` with that config as the run's ``config``
param: every task of the DAG runs in this machine's Airflow, exactly as the scheduler would run it, with
local Spark and MLflow on SQLite. Then say where the outputs are and how to look at them.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from jobs import generate, stages
from synergen_core.config import Config, parse_ds
from synergen_core.tracking import close_parent

DAG_ID = "synergen_daily"
REPO = Path(__file__).resolve().parents[1]


def days(cfg: Config) -> list[str]:
    first = parse_ds(cfg.generate.start_ds)
    return [(first + dt.timedelta(days=i)).isoformat() for i in range(cfg.generate.days)]


def absolute(cfg: Config) -> Config:
    """``cfg`` with its local paths made absolute: Airflow tasks may run in another working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.lake.root = Path(cfg.lake.root).resolve()
    cfg.mlflow.artifact_root = Path(cfg.mlflow.artifact_root).resolve()
    uri = cfg.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg.mlflow.tracking_uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return cfg


def airflow_env(home: Path) -> dict[str, str]:
    """The environment of a single-machine Airflow: SQLite in ``home``, this repo's DAGs, no examples."""
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def airflow(args: list[str], home: Path, **kwargs) -> subprocess.CompletedProcess:
    """``airflow <args>`` with the venv's Airflow and ``airflow_env(home)``; raises on failure."""
    cmd = [str(Path(sys.executable).parent / "airflow"), *args]
    return subprocess.run(cmd, env=airflow_env(home), cwd=REPO, check=True, **kwargs)


def dags_test(config_file: Path, ds: str, home: Path, conf: dict | None = None) -> None:
    """One DAG run for ``ds`` in-process (``airflow dags test``); raises when a task fails."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "airflow.db").exists():
        airflow(["db", "migrate"], home, stdout=subprocess.DEVNULL)
    airflow(["dags", "test", DAG_ID, ds, "-c", json.dumps({"config": str(config_file), **(conf or {})})], home)


def _counts(validated: dict) -> dict:
    """Rows in / valid / quarantined per table of a validation result."""
    return {t: {k: v[k] for k in ("rows_in", "rows_valid", "rows_quarantined")}
            for t, v in validated.items() if isinstance(v, dict) and "rows_in" in v}


def run_default(cfg: Config, airflow_home: Path | None = None) -> dict:
    cfg = absolute(cfg)
    root = Path(cfg.lake.root)
    var = root.parent
    home = Path(airflow_home or os.environ.get("AIRFLOW_HOME") or var / "airflow").resolve()
    t0 = time.perf_counter()
    generated = generate.run(cfg, cfg.generate.start_ds)
    all_days = days(cfg)
    group = f"synergen-history-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    history = {ds: _counts(stages.validate_raw(cfg, ds, group=group)) for ds in all_days[:-1]}
    close_parent(cfg, group)
    config_file = var / "synergen-run.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dags_test(config_file, all_days[-1], home)
    candidates = root / cfg.score.output
    return {
        "lake": str(root),
        "generated": generated,
        "history_validated": history,
        "dag_run": {"dag_id": DAG_ID, "ds": all_days[-1], "config": str(config_file), "airflow_home": str(home)},
        "outputs": {
            "candidates": str(candidates / f"ds={all_days[-1]}"),
            "quarantine": str(root / "quarantine"),
            "models": str(root / cfg.train.output / f"ds={all_days[-1]}"),
            "mlflow": cfg.mlflow.tracking_uri,
        },
        "next": {
            "mlflow_ui": "make mlflow   (MLflow UI on http://127.0.0.1:5000)",
            "airflow_ui": "make airflow  (Airflow UI on http://127.0.0.1:8080, DAG synergen_daily unpaused)",
            "registry": ".venv/bin/synergen registry",
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
