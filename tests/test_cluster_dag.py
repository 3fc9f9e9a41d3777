"""The whole daily DAG on a loopback cluster: Spark standalone (a master and two workers), an MLflow tracking
server backed by PostgreSQL, under a real Airflow (``airflow dags test``), against the same DAG on local Spark
with MLflow on SQLite.

Everything runs on 127.0.0.1 from what is installed here: PostgreSQL from Debian's package (installed by the
fixture with apt-get only when its binaries are missing; the test is skipped when that cannot be done), a
private database cluster in a temporary folder on a free port; ``mlflow server`` on that database with
artifacts served by the server itself (``--serve-artifacts``, a local folder: there is no object store
here); the Spark daemons from the pyspark installation (tests/cluster.py). Every process the test starts is
stopped by its PID at teardown.

The tiny MovieLens slice of tests/conftest.py is ingested and its history validated once, then copied
into two lakes; the DAG runs for the same day on each. Both runs must succeed and publish the same candidate
lists; the MLflow server must hold the DAG run's parent and nested runs (in PostgreSQL) and a registered
model version with the champion alias. Both runs use one torch thread (``OMP_NUM_THREADS=1``): the RQ-VAE
training is not bit-reproducible on more.

Time per stage (the ``duration_s`` metric of each stage's MLflow run) on local versus the cluster is written
to benchmarks/results/cluster_dag.json and BENCHMARKS.md when ``SYNERGEN_WRITE_CLUSTER_BENCH=1`` (what
``.venv/bin/python -m benchmarks.cluster_dag`` sets), so ordinary test runs leave the committed figures alone.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import yaml

from cluster import HOST, free_port, standalone_cluster
from production import pg_bindir
from jobs import pipeline
from schemas.candidates import SURFACES
from synergen_core import lake
from synergen_core.config import Config
from conftest import MOVIELENS, movielens_slice, requires_shared_data
from daily_dag import TASKS, stage_runs, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.cluster, requires_shared_data(MOVIELENS)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WRITE_BENCH = os.environ.get("SYNERGEN_WRITE_CLUSTER_BENCH") == "1"
SORT_KEYS = [("surface", "ascending"), ("user_id", "ascending"), ("query", "ascending"), ("rank", "ascending")]
SCORES = ("retrieval_score", "ranking_score")


def _stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop the process group ``proc`` leads (a server and the workers it forked): SIGTERM, a grace period
    for the leader, then SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


# ---------------------------------------------------------------------------------------------
# PostgreSQL: Debian's package, a private cluster on a free port


def _install_postgres() -> str | None:
    """apt-get install postgresql (as root); the reason it cannot be done, or None when done."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "PostgreSQL's initdb not found and apt-get cannot be run as root to install Debian's postgresql"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return f"apt-get install postgresql failed: {done.stderr[-500:]}"
    # the package's own cluster (started by its postinst where services may start) is not ours to keep
    for ctl in glob.glob("/usr/bin/pg_ctlcluster"):
        for conf in glob.glob("/etc/postgresql/*/main"):
            subprocess.run([ctl, Path(conf).parent.name, "main", "stop"], capture_output=True)
    return None


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL on 127.0.0.1 with a database ``mlflow``: its libpq URI (``postgresql://...``).

    The data folder is owned by the ``postgres`` user when running as root (the server refuses root), in a
    folder of its own under the system temporary directory (pytest's are private to root)."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install psycopg2-binary (dev extra)")
    bindir = pg_bindir()
    if bindir is None:
        reason = _install_postgres()
        bindir = pg_bindir()
        if bindir is None:
            pytest.skip(reason or "PostgreSQL installed but initdb not found")
    as_user: dict = {}
    base = Path(tempfile.mkdtemp(prefix="synergen-pg-"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    data, log, port = base / "data", base / "postgres.log", free_port()

    def pg(*args: str) -> None:
        with open(os.devnull, "wb") as null:  # pg_ctl's server keeps no pipe of ours open
            done = subprocess.run([str(bindir / args[0]), *args[1:]], cwd=base, stdout=null,
                                  stderr=subprocess.PIPE, env={**os.environ, "HOME": str(base)}, **as_user)
        assert done.returncode == 0, f"{args[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}\n" + (
            log.read_text(errors="replace")[-2000:] if log.exists() else "")

    pg("initdb", "-D", str(data), "-U", "mlflow", "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync")
    options = f"-h {HOST} -p {port} -k {base} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    pg("pg_ctl", "start", "-D", str(data), "-w", "-t", "60", "-l", str(log), "-o", options)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        conn = psycopg2.connect(host=HOST, port=port, user="mlflow", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql://mlflow@{HOST}:{port}/mlflow"
    finally:
        with open(os.devnull, "wb") as null:
            subprocess.run([str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30"],
                           cwd=base, stdout=null, stderr=null, **as_user)
        if (data / "postmaster.pid").exists():  # not shut down: the postmaster by its PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the MLflow tracking server and the Spark cluster


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 over the PostgreSQL database, serving artifacts from a local folder:
    (its URL, the artifact folder)."""
    work = tmp_path_factory.mktemp("mlflow_server")
    artifacts, port = work / "artifacts", free_port()
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3: name the driver that is installed
    store = postgres.replace("postgresql://", "postgresql+psycopg2://", 1)
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--serve-artifacts",
           "--artifacts-destination", artifacts.as_uri(), "--host", HOST, "--port", str(port), "--workers", "1"]
    log = open(work / "mlflow.log", "wb")
    # its own process group: the server forks its web workers, all stopped with it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}\n"
                                   f"{(work / 'mlflow.log').read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not healthy after 120 s\n"
                                   f"{(work / 'mlflow.log').read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        yield url, artifacts
    finally:
        _stop_group(proc)
        log.close()


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    """A Spark standalone master and two one-core workers on 127.0.0.1."""
    with standalone_cluster(tmp_path_factory.mktemp("spark"), cores=1, memory="2g", workers=2) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# the lakes and the two DAG runs


SEARCH_REQUESTS = 60  # (user, query) pairs of the history scored on the search surface


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    """The slice ingested and its history validated once (MLflow of its own), copied into two lakes; search
    requests drawn from the history: (base folder, the day the DAG runs for, the requests file)."""
    from jobs import ingest, stages

    base = tmp_path_factory.mktemp("cluster_dag")
    prep = tiny_config(base / "prep")
    movielens_slice(base / "prep" / "src")
    ingest.run(prep, "movielens", base / "prep" / "src")
    days = sorted(set(lake.partitions(prep.lake.root, "raw/browse_events"))
                  | set(lake.partitions(prep.lake.root, "raw/search_events")))
    stages.validate_raw(prep, days[0], last_ds=days[-3])
    for side in ("local", "cluster"):
        shutil.copytree(prep.lake.root, base / side / "lake")
    searched = pds.dataset(Path(prep.lake.root) / "validated" / "search_events", format="parquet",
                           partitioning="hive").to_table(columns=["user_id", "query"])
    pairs = searched.group_by(["user_id", "query"]).aggregate([]).sort_by([("user_id", "ascending"),
                                                                            ("query", "ascending")])
    requests = base / "requests" / "part-0.parquet"
    requests.parent.mkdir()
    pq.write_table(pairs.slice(0, SEARCH_REQUESTS), requests)
    return base, days[-2], requests


def dag_config(root: Path, requests: Path) -> Config:
    """tiny_config, with lists for every user (the day itself has one active user and no search) and for
    the search requests: enough lists to compare."""
    cfg = tiny_config(root)
    cfg.score = cfg.score.model_copy(update={"lookback_days": None, "requests_path": requests})
    return cfg


def run_dag(cfg: Config, root: Path, ds: str) -> float:
    """The DAG for ``ds`` under ``airflow dags test`` with ``cfg`` (its own Airflow home): wall seconds."""
    config_file = root / "synergen.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    t0 = time.perf_counter()
    pipeline.dags_test(config_file, ds, root / "airflow")
    return time.perf_counter() - t0


def candidates(cfg: Config, ds: str) -> pa.Table:
    """The published lists of ``ds`` (both surfaces, with ``surface``), sorted by request and rank."""
    published = lake.partition(cfg.lake.root, cfg.score.output, ds)
    assert (published / "_SUCCESS").exists(), f"{published} not published"
    return pds.dataset(published, format="parquet", partitioning="hive").to_table().sort_by(SORT_KEYS)


def assert_same_lists(a: pa.Table, b: pa.Table) -> bool:
    """The same rows on both sides (scores within 1e-5); whether they are bit-for-bit equal."""
    assert a.schema == b.schema and a.num_rows == b.num_rows
    exact = True
    for name in a.column_names:
        if name in SCORES:
            x, y = a[name].to_numpy(), b[name].to_numpy()
            assert np.allclose(x, y, rtol=1e-5, atol=1e-5), (name, float(np.abs(x - y).max()))
            exact &= bool(np.array_equal(x, y))
        else:
            assert a[name].equals(b[name]), name
    return exact


def per_surface(t: pa.Table) -> dict[str, int]:
    return {s: int(pc.sum(pc.equal(t["surface"], s)).as_py() or 0) for s in SURFACES}


def durations(cfg: Config, ds: str) -> dict[str, float]:
    runs = stage_runs(cfg, ds)
    return {t: round(runs[t].data.metrics["duration_s"], 2) for t in TASKS}


def test_whole_dag_on_spark_cluster_and_mlflow_server_same_as_local(
        lakes, postgres, mlflow_server, spark_cluster, monkeypatch):
    base, ds, requests = lakes
    url, artifacts = mlflow_server
    # The RQ-VAE training of semantic_ids is not bit-reproducible with more than one torch thread (two
    # trainings on the same inputs in one process differ by ~1e-6 in weights, enough to move a few items'
    # semantic IDs and so everything downstream): one thread in both DAG runs, so a difference is the cluster's.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    local = dag_config(base / "local", requests)
    local_wall = run_dag(local, base / "local", ds)

    remote = dag_config(base / "cluster", requests)
    remote.spark.master = spark_cluster.master_url
    remote.spark.local_ip = HOST
    remote.spark.conf = {**remote.spark.conf, "spark.executor.memory": "1g", "spark.cores.max": "2"}
    remote.mlflow.tracking_uri = url
    remote_wall = run_dag(remote, base / "cluster", ds)

    # the Spark stages ran as applications of the cluster, on both workers
    status = spark_cluster.status()
    apps = status.get("completedapps", []) + status.get("activeapps", [])
    assert apps, "no application ran on the cluster"
    assert len(status["workers"]) == 2 and all(w["state"] == "ALIVE" for w in status["workers"])
    assert all(any((spark_cluster.workdir / f"work-{i}").glob("app-*/*")) for i in (1, 2)), \
        "an executor did not run on each worker"

    # the same published candidate lists
    local_lists, remote_lists = candidates(local, ds), candidates(remote, ds)
    assert all(n > 0 for n in per_surface(local_lists).values())
    exact = assert_same_lists(local_lists, remote_lists)

    # the MLflow server holds the DAG run: a parent, a finished nested run per task, artifacts it served
    runs = stage_runs(remote, ds)
    assert set(TASKS) <= set(runs) and "pipeline" in runs
    parent = runs["pipeline"].info.run_id
    assert all(runs[t].data.tags["mlflow.parentRunId"] == parent for t in TASKS)
    assert all(runs[t].info.status == "FINISHED" for t in TASKS)
    client = mlflow.MlflowClient(url)
    assert "plots/training_temporal.synergen.png" in {
        a.path for a in client.list_artifacts(runs["train"].info.run_id, "plots")}
    assert any(artifacts.rglob("training_temporal.synergen.png")), "artifacts not stored by the server"
    # ... in PostgreSQL
    import psycopg2

    conn = psycopg2.connect(postgres)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs")
            assert cur.fetchone()[0] >= len(TASKS) + 1
    finally:
        conn.close()
    # ... and a registered model version with the champion alias
    champion = client.get_model_version_by_alias(remote.mlflow.registered_model, "champion")
    assert champion.tags.get("synergen.ds") == ds

    # time per stage, local vs the loopback cluster
    times_local, times_remote = durations(local, ds), durations(remote, ds)
    if WRITE_BENCH:
        from benchmarks.common import write_result

        monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "cluster_dag.py")])
        write_result("cluster_dag", figures(ds, times_local, times_remote, local_wall, remote_wall,
                                            local_lists, exact),
                     summary(ds, times_local, times_remote, local_wall, remote_wall, local_lists, exact))


# ---------------------------------------------------------------------------------------------
# the benchmark's figures


def figures(ds, t_local, t_remote, wall_local, wall_remote, lists, exact) -> dict:
    return {
        "ds": ds,
        "data": "MovieLens slice of tests/conftest.py (tiny_config), one day, history validated; "
                f"score.lookback_days null (every user), {SEARCH_REQUESTS} search requests from the history",
        "local": "spark local[2], MLflow on SQLite",
        "cluster": "spark standalone on 127.0.0.1 (master + 2 workers x 1 core, 1g executors), "
                   "mlflow server on PostgreSQL (artifacts served from a local folder)",
        "stages_s": {t: {"local": t_local[t], "cluster": t_remote[t]} for t in TASKS},
        "stages_total_s": {"local": round(sum(t_local.values()), 2), "cluster": round(sum(t_remote.values()), 2)},
        "dag_wall_s": {"local": round(wall_local, 2), "cluster": round(wall_remote, 2)},
        "candidates_rows": per_surface(lists),
        "candidates_bit_identical": exact,
    }


def summary(ds, t_local, t_remote, wall_local, wall_remote, lists, exact) -> str:
    rows = "\n".join(f"| {t} | {t_local[t]:.1f} | {t_remote[t]:.1f} |" for t in TASKS)
    same = "bit for bit" if exact else "same rows, scores within 1e-5"
    n = per_surface(lists)
    return (
        f"The whole daily DAG (`airflow dags test`, 12 tasks) for one day ({ds}) of the tiny MovieLens slice of "
        f"`tests/test_dag_run.py` (lists for every user and {SEARCH_REQUESTS} search requests from the history), "
        f"run by `tests/test_cluster_dag.py`: **local** = Spark `local[2]` + MLflow on "
        f"SQLite; **cluster** = Spark standalone master + 2 one-core workers on 127.0.0.1 + an `mlflow server` "
        f"on PostgreSQL 127.0.0.1 (artifacts served by it). Seconds per stage are each stage's MLflow "
        f"`duration_s`; on this 2-core machine the cluster's daemons, the MLflow server and PostgreSQL share "
        f"the same cores, so the cluster column measures overhead (executor start, remote shuffle, HTTP "
        f"tracking), not scale-out. Both runs with `OMP_NUM_THREADS=1` (the RQ-VAE training is not "
        f"bit-reproducible on more torch threads).\n\n"
        f"| stage | local s | cluster s |\n|---|---|---|\n{rows}\n"
        f"| **sum of stages** | **{sum(t_local.values()):.1f}** | **{sum(t_remote.values()):.1f}** |\n"
        f"| whole `airflow dags test` (wall) | {wall_local:.1f} | {wall_remote:.1f} |\n\n"
        f"Published candidate lists: {n['rec']:,} rec rows, {n['search']:,} search rows; the same on "
        f"both ({same})."
    )
