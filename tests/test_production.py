"""The daily DAG in production on one machine: the loopback setup of tests/production.py (Airflow 3 with the
CeleryExecutor on PostgreSQL and Redis, a default and a ``gpu`` Celery worker, Spark standalone, an MLflow
server on PostgreSQL), driven only through Airflow's REST API, as the UI drives it (``make test-production``).

Data: the tiny MovieLens slice of tests/conftest.py with its event days moved onto consecutive
calendar days (time of day kept) that end today (UTC), the day of the run the scheduler creates when the
DAG is unpaused (``@daily``, catchup off: Airflow 3 runs a cron schedule at its trigger time, so that run's
logical date is today). The days before T-4 are validated as history beforehand (T = today).

In order (the module's tests share the setup and run in file order):

1. the DAG is unpaused; the scheduler itself creates and completes today's run. (Backfill runs do not start
   while the DAG is paused, and unpausing creates today's run at once, so it comes first: the UI's backfill
   dialog unpauses the DAG the same way.)
2. a day with too many bad rows (T-4, triggered through ``POST .../dagRuns``): validate_raw fails at once
   (a data check is not retried; the task's 2 retries are for other failures), the run fails, no
   downstream task starts, the MLflow pipeline run is FAILED with the reason, nothing is published; the
   input is fixed, validate_raw and its downstream tasks are cleared through the API, and the run completes.
3. a backfill of T-3..T-1 through ``POST /api/v2/backfills`` (one run at a time, ``skip_promotion``: a
   backfill of past days must not replace today's champion): three successful runs, each day's published
   candidate lists, one MLflow pipeline run per DAG run closed FINISHED with its 12 nested stage runs; the
   task instances show ``train`` on the gpu worker, queue and pool, every other task on the default worker.
   Screenshots: the Backfills tab, the grid, the MLflow pipeline run and the train stage's plots.
4. the same backfill again with ``reprocess_behavior: completed``: the same runs again, identical lists.

Screenshots go to benchmarks/results/production_*.png when ``SYNERGEN_WRITE_SCREENSHOTS=1`` (what
``make test-production`` sets), else to the setup's folder only.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import yaml

import production
from synergen_core import lake
from conftest import movielens_slice
from daily_dag import TASKS, tiny_config

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = ROOT.parent / "shared" / "data" / "movielens-small"

pytestmark = [pytest.mark.slow, pytest.mark.production,
              pytest.mark.skipif(not MOVIELENS.is_dir(), reason=f"{MOVIELENS} not found")]
DAG = "synergen_daily"
WRITE_SCREENSHOTS = os.environ.get("SYNERGEN_WRITE_SCREENSHOTS") == "1"
RUN_TIMEOUT_S = float(os.environ.get("SYNERGEN_PRODUCTION_RUN_TIMEOUT_S", 1800))  # per DAG run
SORT_KEYS = [("surface", "ascending"), ("user_id", "ascending"), ("query", "ascending"), ("rank", "ascending")]


def day(d: dt.date, offset: int = 0) -> str:
    return (d + dt.timedelta(days=offset)).isoformat()


def consecutive_days(src: Path, last: dt.date) -> list[str]:
    """Move the events of the slice's CSV files onto consecutive days ending on ``last`` (time of day
    kept, order kept): the new days, in order."""
    co = pacsv.ConvertOptions(column_types={"tag": pa.string(), "title": pa.string(), "genres": pa.string()})
    tables = {f: pacsv.read_csv(src / f, convert_options=co) for f in ("ratings.csv", "tags.csv")}
    old = np.unique(np.concatenate([t["timestamp"].to_numpy() // 86_400 for t in tables.values()]))
    first = (last - dt.date(1970, 1, 1)).days - (len(old) - 1)
    for f, t in tables.items():
        ts = t["timestamp"].to_numpy()
        new = (first + np.searchsorted(old, ts // 86_400)) * 86_400 + ts % 86_400
        t = t.set_column(t.schema.get_field_index("timestamp"), "timestamp", pa.array(new, pa.int64()))
        pacsv.write_csv(t, src / f)
    return [day(last, i - len(old) + 1) for i in range(len(old))]


def python_cli(*args: str, env: dict) -> None:
    """``synergen ARGS`` of this checkout, in a process of its own (local Spark: none of the cluster's cores)."""
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, f"synergen {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


# ---------------------------------------------------------------------------------------------
# the setup and the data


@pytest.fixture(scope="module")
def prod(tmp_path_factory):
    """The running setup, the config (file, Config), today, the days: (Production, cfg, file, T)."""
    base = tmp_path_factory.mktemp("production")
    today = dt.datetime.now(dt.timezone.utc).date()
    config_file = base / "synergen.yaml"
    with production.production_setup(base / "setup", config_file) as p:
        cfg = tiny_config(base)
        cfg.spark.master = p.spark_master
        cfg.spark.local_ip = production.HOST
        cfg.spark.conf = {**cfg.spark.conf, "spark.executor.memory": "1g", "spark.cores.max": "2",
                          # the executors import this checkout's code too (as the Airflow processes do)
                          "spark.executorEnv.PYTHONPATH": str(ROOT)}
        cfg.mlflow.tracking_uri = p.mlflow_url
        cfg.score = cfg.score.model_copy(update={"lookback_days": None})  # lists for every user
        config_file.write_text(yaml.safe_dump(cfg.to_dict()))

        # the slice on consecutive days ending today; the history before T-4 validated (local Spark)
        movielens_slice(base / "src")
        days = consecutive_days(base / "src", today)
        assert days[-1] == day(today) and len(days) > 8
        prep = tiny_config(base)
        prep.mlflow.tracking_uri = p.mlflow_url
        prep_file = base / "prep.yaml"
        prep_file.write_text(yaml.safe_dump(prep.to_dict()))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SPARK_LOCAL_IP": production.HOST}
        python_cli("ingest", "movielens", "--path", str(base / "src"), "--config", str(prep_file), env=env)
        python_cli("validate", "--ds", days[0], "--last-ds", day(today, -5), "--config", str(prep_file), env=env)
        yield p, cfg, config_file, today


def runs(p: production.Production) -> list[dict]:
    return p.api("GET", f"/api/v2/dags/{DAG}/dagRuns?limit=100&order_by=logical_date")["dag_runs"]


def wait_for(p: production.Production, what: str, check, timeout_s: float, poll_s: float = 10):
    """Poll ``check()`` until it returns something true; fail with the setup's logs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        for name, proc in p.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{p.logs()}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s\n{p.logs()}")
        time.sleep(poll_s)


def finished(p, run_id: str) -> dict | None:
    r = p.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}")
    return r if r["state"] in ("success", "failed") else None


def task_instances(p, run_id: str) -> dict[str, dict]:
    tis = p.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
    return {ti["task_id"]: ti for ti in tis}


def lists(cfg, ds: str) -> pa.Table:
    """The published candidate lists of ``ds`` (both surfaces), sorted by request and rank."""
    published = lake.partition(cfg.lake.root, cfg.score.output, ds)
    assert (published / "_SUCCESS").exists(), f"{published} not published"
    return pds.dataset(published, format="parquet", partitioning="hive").to_table().sort_by(SORT_KEYS)


def pipeline_runs(cfg, run_id: str) -> list:
    """The MLflow pipeline (parent) runs of DAG run ``run_id``."""
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`synergen.group` = '{run_id}' and "
                                                                 f"tags.`synergen.stage` = 'pipeline'")


def stage_runs_of(cfg, parent_id: str) -> dict:
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                               max_results=1000)
    out: dict[str, list] = {}
    for r in sorted(found, key=lambda r: r.info.start_time):  # oldest first: a cleared task's retry last
        out.setdefault(r.data.tags["synergen.stage"], []).append(r)
    return out


def check_successful_run(p, cfg, run: dict) -> None:
    """A successful DAG run: every task succeeded where it should run, lists published, one MLflow
    pipeline run closed FINISHED with a finished nested run per task."""
    ds, run_id = run["logical_date"][:10], run["dag_run_id"]
    assert run["state"] == "success", run
    tis = task_instances(p, run_id)
    assert set(tis) == set(TASKS) and all(ti["state"] == "success" for ti in tis.values()), \
        {t: ti["state"] for t, ti in tis.items()}
    for task, ti in tis.items():
        where = (ti["hostname"], ti["queue"], ti["pool"])
        if task == "train":
            assert where == (production.GPU_WORKER, "gpu", "gpu"), (task, where)
        else:
            assert where == (production.DEFAULT_WORKER, "default", "default_pool"), (task, where)
    published = lists(cfg, ds)
    assert pc.sum(pc.equal(published["surface"], "rec")).as_py() > 0
    parents = pipeline_runs(cfg, run_id)
    assert len(parents) == 1, f"{run_id}: {len(parents)} pipeline runs"
    assert parents[0].info.status == "FINISHED" and "synergen.failure" not in parents[0].data.tags, parents[0]
    stages = stage_runs_of(cfg, parents[0].info.run_id)
    assert set(TASKS) <= set(stages), sorted(stages)
    assert all(r.info.status == "FINISHED" for t in TASKS for r in stages[t][-1:])


def screenshots(p, cfg, run: dict) -> None:
    """The Backfills tab, the grid, the MLflow pipeline run of ``run`` and its train stage's plots."""
    sys.path.insert(0, str(ROOT / "infra"))
    import ui_screenshot

    if not ui_screenshot.available():  # a fresh machine: Debian's package, as for PostgreSQL and Redis
        production.apt_install("chromium")
    out = ROOT / "benchmarks" / "results" if WRITE_SCREENSHOTS else p.workdir / "screenshots"
    cookie = {"_token": p.token()}
    ui_screenshot.screenshot(f"{p.airflow_url}/dags/{DAG}/backfills", out / "production_airflow_backfills.png",
                             cookie, wait_text="Completed")
    ui_screenshot.screenshot(f"{p.airflow_url}/dags/{DAG}", out / "production_airflow_grid.png", cookie,
                             wait_text="validate_raw")
    parent = pipeline_runs(cfg, run["dag_run_id"])[0]
    exp = parent.info.experiment_id
    ui_screenshot.screenshot(f"{p.mlflow_url}/#/experiments/{exp}/runs/{parent.info.run_id}",
                             out / "production_mlflow_pipeline_run.png", wait_text="pipeline")
    train = stage_runs_of(cfg, parent.info.run_id)["train"][-1]
    ui_screenshot.screenshot(f"{p.mlflow_url}/#/experiments/{exp}/runs/{train.info.run_id}/artifacts/"
                             f"plots/training_temporal.synergen.png",
                             out / "production_mlflow_train_plots.png", wait_text="training_temporal")


def backfill(p, cfg_file: Path, first: str, last: str, reprocess: str) -> dict:
    """A backfill as the UI's dialog creates it; returns once Airflow marks it completed."""
    b = p.api("POST", "/api/v2/backfills", {
        "dag_id": DAG, "from_date": f"{first}T00:00:00Z", "to_date": f"{last}T00:00:00Z",
        "run_backwards": False, "reprocess_behavior": reprocess, "max_active_runs": 1,
        "dag_run_conf": {"config": str(cfg_file), "skip_promotion": True}})
    return wait_for(p, f"backfill {b['id']} completed",
                    lambda: (lambda x: x if x.get("completed_at") else None)(p.api("GET", f"/api/v2/backfills/{b['id']}")),
                    3 * RUN_TIMEOUT_S, poll_s=15)


BACKFILLED: dict[str, pa.Table] = {}


# ---------------------------------------------------------------------------------------------
# the tests, in order


def test_1_scheduler_runs_todays_run_once_unpaused(prod):
    p, cfg, cfg_file, today = prod
    assert runs(p) == [] and p.api("GET", f"/api/v2/dags/{DAG}")["is_paused"]
    p.api("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False})
    run = wait_for(p, "the scheduler's run", lambda: [r for r in runs(p) if r["run_type"] == "scheduled"], 300)[0]
    assert run["logical_date"][:10] == day(today), run
    run = wait_for(p, "today's scheduled run finished", lambda: finished(p, run["dag_run_id"]), RUN_TIMEOUT_S)
    check_successful_run(p, cfg, run)


def test_2_failed_task_then_fixed_input_and_cleared_through_the_api(prod):
    p, cfg, cfg_file, today = prod
    ds = day(today, -4)
    raw = lake.partition(cfg.lake.root, "raw/browse_events", ds)
    backup = p.workdir / "raw-backup"
    shutil.copytree(raw, backup)
    for f in sorted(raw.glob("*.parquet")):  # every row with an action the contract does not know
        t = pq.read_table(f)
        pq.write_table(t.set_column(t.schema.get_field_index("action"), "action",
                                    pa.array(["teleport"] * t.num_rows, t.schema.field("action").type)), f)

    run = p.api("POST", f"/api/v2/dags/{DAG}/dagRuns",
                {"logical_date": f"{ds}T00:00:00Z", "conf": {"config": str(cfg_file), "skip_promotion": True}})
    run = wait_for(p, f"the run of {ds} finished", lambda: finished(p, run["dag_run_id"]), RUN_TIMEOUT_S)
    run_id = run["dag_run_id"]
    assert run["state"] == "failed", run
    tis = task_instances(p, run_id)
    v = tis["validate_raw"]
    task = p.api("GET", f"/api/v2/dags/{DAG}/tasks/validate_raw")
    assert task["retries"] == 2 and v["max_tries"] == 2  # as configured (default_args)
    assert v["state"] == "failed" and v["try_number"] == 1, v  # a failed data check is not retried
    downstream = {t: ti for t, ti in tis.items() if t != "validate_raw"}
    # never attempted: no try, no worker (Airflow stamps start_date = end_date when it marks them)
    assert all(ti["state"] == "upstream_failed" and ti["try_number"] == 0 and not ti["hostname"]
               for ti in downstream.values()), {t: (ti["state"], ti["try_number"]) for t, ti in downstream.items()}
    parents = pipeline_runs(cfg, run_id)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    reason = parents[0].data.tags.get("synergen.failure", "")
    assert reason.startswith(f"validate_raw {ds}") and ("browse_events" in reason or "bad" in reason), reason
    assert not lake.partition(cfg.lake.root, cfg.score.output, ds).exists()
    stages = stage_runs_of(cfg, parents[0].info.run_id)
    assert set(stages) == {"validate_raw"} and stages["validate_raw"][0].info.status == "FAILED"

    # the input fixed, the failed task and everything after it cleared as the UI's "Clear" does
    shutil.rmtree(raw)
    shutil.copytree(backup, raw)
    cleared = p.api("POST", f"/api/v2/dags/{DAG}/clearTaskInstances", {
        "dry_run": False, "dag_run_id": run_id, "task_ids": ["validate_raw"], "include_downstream": True,
        "only_failed": False, "reset_dag_runs": True})
    assert len(cleared["task_instances"]) == len(TASKS)
    wait_for(p, f"{run_id} running again", lambda: p.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}")["state"]
             != "failed", 120, poll_s=2)
    run = wait_for(p, f"the cleared run of {ds} finished", lambda: finished(p, run_id), RUN_TIMEOUT_S)
    check_successful_run(p, cfg, run)
    assert task_instances(p, run_id)["validate_raw"]["try_number"] == 2


def test_3_backfill_three_days_through_the_rest_api(prod):
    p, cfg, cfg_file, today = prod
    days = [day(today, -3), day(today, -2), day(today, -1)]
    b = backfill(p, cfg_file, days[0], days[-1], "none")
    done = [r for r in runs(p) if r["run_type"] == "backfill"]
    assert sorted(r["logical_date"][:10] for r in done) == days, done
    for run in done:
        check_successful_run(p, cfg, run)
        BACKFILLED[run["logical_date"][:10]] = lists(cfg, run["logical_date"][:10])
    assert b["completed_at"]
    screenshots(p, cfg, done[-1])


def test_4_reprocess_completed_gives_identical_lists(prod):
    p, cfg, cfg_file, today = prod
    days = [day(today, -3), day(today, -2), day(today, -1)]
    if len(BACKFILLED) != 3:
        pytest.skip("the first backfill did not complete")
    before = {r["dag_run_id"]: r for r in runs(p) if r["run_type"] == "backfill"}
    backfill(p, cfg_file, days[0], days[-1], "completed")
    after = [r for r in runs(p) if r["run_type"] == "backfill"]
    assert sorted(r["logical_date"][:10] for r in after) == days, after
    for run in after:
        assert run["dag_run_id"] in before and run["end_date"] > before[run["dag_run_id"]]["end_date"], \
            "the run was not run again"
        check_successful_run(p, cfg, run)
        ds = run["logical_date"][:10]
        again = lists(cfg, ds)
        assert again.num_rows == BACKFILLED[ds].num_rows and again.equals(BACKFILLED[ds]), f"{ds}: lists differ"
