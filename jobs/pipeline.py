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

from jobs import generate, served_lists, stages
from jobs.spark import active_session, stop_active_session
from synergen_core import lake
from synergen_core.config import Config, ConfigError, parse_ds
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


def airflow(args: list[str], home: Path, extra_env: dict[str, str] | None = None, **kwargs
            ) -> subprocess.CompletedProcess:
    """``airflow <args>`` with the venv's Airflow and ``airflow_env(home)`` (plus ``extra_env``); raises on failure."""
    cmd = [str(Path(sys.executable).parent / "airflow"), *args]
    return subprocess.run(cmd, env={**airflow_env(home), **(extra_env or {})}, cwd=REPO, check=True, **kwargs)


def dags_test(config_file: Path, ds: str, home: Path, conf: dict | None = None) -> None:
    """One DAG run for ``ds`` in-process (``airflow dags test``); raises when a task fails."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "airflow.db").exists():
        airflow(["db", "migrate"], home, stdout=subprocess.DEVNULL)
    # every task runs in this one process: one Spark session serves them all
    airflow(["dags", "test", DAG_ID, ds, "-c", json.dumps({"config": str(config_file), **(conf or {})})], home,
            extra_env={"SYNERGEN__SPARK__KEEP_SESSION": "true"})


def _counts(validated: dict) -> dict:
    """Rows in / valid / quarantined per table of a validation result."""
    return {t: {k: v[k] for k in ("rows_in", "rows_valid", "rows_quarantined")}
            for t, v in validated.items() if isinstance(v, dict) and "rows_in" in v}


def run_default(cfg: Config, airflow_home: Path | None = None, dag_days: int = 2) -> dict:
    """Generated logs; every day but the last ``dag_days`` validated as history; then the DAG for each of
    those days in order, as a scheduler would run them. With two or more, the last day's evaluation
    measures the lists the day before published (``jobs.served_lists``): the figure users get."""
    cfg = absolute(cfg)
    root = Path(cfg.lake.root)
    var = root.parent
    home = Path(airflow_home or os.environ.get("AIRFLOW_HOME") or var / "airflow").resolve()
    all_days = days(cfg)
    if not 1 <= dag_days <= len(all_days):
        raise ConfigError(f"run: --dag-days {dag_days} must be between 1 and generate.days ({len(all_days)})")
    history_days, dag_run_days = all_days[:-dag_days], all_days[-dag_days:]
    t0 = time.perf_counter()
    generated = generate.run(cfg, cfg.generate.start_ds)
    group = f"synergen-history-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    kept = cfg.model_copy(update={"spark": cfg.spark.model_copy(update={"keep_session": True})})
    caller_session = active_session()
    try:  # one Spark session for every day of history, stopped before Airflow's process starts its own
        history = {ds: _counts(stages.validate_raw(kept, ds, group=group)) for ds in history_days}
    finally:
        if caller_session is None:  # a caller's own session (a test's) is left to it
            stop_active_session()
    close_parent(cfg, group)
    config_file = var / "synergen-run.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for ds in dag_run_days:
        dags_test(config_file, ds, home)
    layout = cfg.layout
    result = {
        "lake": str(root),
        "generated": generated,
        "history_validated": history,
        "dag_run": {"dag_id": DAG_ID, "ds": all_days[-1], "config": str(config_file), "airflow_home": str(home)},
        "dag_run_days": dag_run_days,
        "outputs": {
            "candidates": str(layout.candidates_part(all_days[-1])),
            "quarantine": str(layout.root / lake.QUARANTINE),
            "models": str(layout.model_dir(all_days[-1])),
            "mlflow": cfg.mlflow.tracking_uri,
        },
        "next": {
            "mlflow_ui": "make mlflow   (MLflow UI on http://127.0.0.1:5000)",
            "airflow_ui": "make airflow  (Airflow UI on http://127.0.0.1:8080, DAG synergen_daily unpaused)",
            "registry": ".venv/bin/synergen registry",
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    summary_file = var / "synergen-run.json"
    summary_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["summary_file"] = str(summary_file)
    return result


def summary(cfg: Config, result: dict) -> str:
    """What ``synergen run`` prints: the day's input, the model against the baselines on the day's
    evaluation, the registry's decision, where the lists are and how to look; the JSON is in a file."""
    from jobs.evaluate import result_path  # imports torch: only once the run is done

    cfg = absolute(cfg)
    root, ds = Path(cfg.lake.root), result["dag_run"]["ds"]
    ran = ", ".join(result.get("dag_run_days") or [ds])
    lines = [f"synergen: the daily DAG ran for {ran} in {result['seconds']:.0f} s (lake {root})", "",
             f"input of {ds} (rows in -> valid + quarantined):"]
    for table in ("search_events", "browse_events", "catalog"):
        counts = _validation_counts(cfg.layout, table, ds)
        if counts:
            lines.append(f"  {table:<14} {counts['rows_in']:>8,} -> {counts['rows_valid']:,} + "
                         f"{counts['rows_quarantined']:,}" + (f"  ({_top_reasons(counts)})" if counts["reasons"] else ""))
    lines += ["", *_evaluation_lines(result_path(cfg, ds))]
    lines += ["", _registry_line(cfg), f"candidate lists: {result['outputs']['candidates']}",
              f"quarantine:      {result['outputs']['quarantine']}", "",
              "look at it:", *(f"  {v}" for v in result["next"].values()),
              "", f"full summary (JSON): {result['summary_file']}"]
    return "\n".join(lines)


def _validation_counts(layout: lake.Layout, table: str, ds: str) -> dict | None:
    for area in (layout.valid, layout.quarantine):  # a failed day keeps its report with the quarantine
        report = layout.part(area(table), ds) / "_validation.json"
        if report.is_file():
            return json.loads(report.read_text())
    return None


def _top_reasons(counts: dict, n: int = 3) -> str:
    top = sorted(counts["reasons"].items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{reason} {k:,}" for reason, k in top)


def _evaluation_lines(path: Path, k: int = 10) -> list[str]:
    if not path.is_file():
        return [f"no evaluation at {path}"]
    evaluation = json.loads(path.read_text())
    lines = []
    for protocol, res in evaluation.items():
        if not isinstance(res, dict) or not res.get("scorers"):
            continue
        tasks = [t for t in ("search", "rec") if res["test_targets"].get(t)]
        lines.append(f"evaluation ({protocol} split, test targets "
                     + ", ".join(f"{t} {res['test_targets'][t]:,}" for t in tasks) + f"): NDCG@{k} / Recall@{k}")
        lines.append(f"  {'':<12}" + "".join(f"{t:>20}" for t in tasks))
        for name, m in res["scorers"].items():
            cells = []
            for t in tasks:
                c = m["catalog"].get(t, {})
                cells.append(f"{c[f'ndcg@{k}']:.4f} / {c[f'recall@{k}']:.4f}" if f"ndcg@{k}" in c else "-")
            lines.append(f"  {name:<12}" + "".join(f"{cell:>20}" for cell in cells))
        lines += _order_lines(res, tasks, k)
    return (lines or [f"no scored protocol in {path}"]) + served_lists.summary_lines(evaluation.get("served"), k)


def _order_lines(res: dict, tasks: list[str], k: int) -> list[str]:
    """Per model with a ranking head: its test lists' rank AUC / NDCG@k ordered by the head and by retrieval,
    and the order the scoring stage serves per task (issue 27: the head has to earn its place)."""
    lines = []
    for name, m in res["scorers"].items():
        if "ranking_retrieval" not in m:
            continue
        lines.append(f"  ranking stage of {name}: its candidate lists, rank AUC / NDCG@{k}")
        for label, lists in (("by head", m["ranking"]), ("by retrieval", m["ranking_retrieval"])):
            cells = [f"{lists[t]['auc']:.4f} / {lists[t][f'ndcg@{k}']:.4f}" if f"ndcg@{k}" in lists.get(t, {})
                     else "-" for t in tasks]
            lines.append(f"    {label:<14}" + "".join(f"{cell:>20}" for cell in cells))
        served = m.get("served_order") or {}
        lines.append(f"    {'served':<14}" + "".join(f"{served.get(t, '-'):>20}" for t in tasks))
    return lines


def _registry_line(cfg: Config) -> str:
    from synergen_core import registry

    st = registry.status(cfg)
    line = f"registry {st['name']}: {st['versions']} version(s)"
    for alias in ("champion", "challenger"):
        v = st[alias]
        if v:
            line += f"; {alias} version {v['version']} (ds {v['ds']})"
            line += f": {v['gate_reason']}" if alias == "challenger" and v.get("gate_reason") else ""
    return line if st["champion"] else line + "; no champion"
