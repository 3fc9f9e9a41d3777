"""The production setup of infra/compose.yaml on one machine, on 127.0.0.1, started and stopped by the project.

    with production_setup(workdir) as p:           # every daemon up and healthy
        p.api("POST", "/api/v2/backfills", {...})  # Airflow's REST API with a token, as the UI calls it

What runs (each a process of its own, started with Popen, its log under ``workdir/logs``):

* PostgreSQL (Debian's ``postgresql``; installed with apt-get when missing): one private cluster on a free
  port with two databases, ``airflow`` (Airflow's metadata database and the Celery result backend) and
  ``mlflow`` (MLflow's backend store). Compose runs two servers; one is enough on one machine.
* Redis (Debian's ``redis-server``), password-protected, no persistence: the Celery broker.
* ``mlflow server`` on the ``mlflow`` database, serving artifacts from a local folder (Compose: from S3).
* A Spark standalone master and two one-core workers (tests/cluster.py).
* Airflow 3 with the CeleryExecutor: ``airflow db migrate``, the pool ``gpu`` (one slot) and the
  SimpleAuthManager password file as Compose's ``airflow-init`` does, then ``airflow api-server``,
  ``scheduler``, ``dag-processor``, ``triggerer`` and two ``airflow celery worker``: one on queue
  ``default``, one on queue ``gpu`` with one slot (the DAG sends ``train`` there: ``SYNERGEN_GPU_POOL=gpu``,
  ``SYNERGEN_GPU_QUEUE=gpu``).

Every Airflow process gets the environment of Compose's ``x-airflow-env`` (``airflow_env``), with the
hosts, ports and secrets of this machine. What differs, and why: every port is a free one (other test
runs may hold the defaults), so the scheduler's health check, the workers' and the triggerer's log servers
get one each; the two workers share a host here, so each gets its own ``--celery-hostname``, pid file,
and the name task instances record as their ``hostname`` (``worker_hostname`` below: Compose's
containers have host names of their own); the worker concurrency is 1 (2 cores).

Stopped by PID in reverse order: SIGINT to the Airflow processes (what Ctrl-C does; SIGTERM can leave
task processes behind), SIGTERM to the others, SIGKILL to whatever of a process's group is left after a
grace period; PostgreSQL with ``pg_ctl stop``.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
DEFAULT_WORKER, GPU_WORKER = "default-worker", "gpu-worker"


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the loopback setup: the name of the worker a task ran on
    (``SYNERGEN_WORKER_NAME``), else the machine's. Both workers share one host here."""
    return os.environ.get("SYNERGEN_WORKER_NAME") or socket.getfqdn()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _http_ok(url: str, headers: dict | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# PostgreSQL and Redis (and Chromium for the screenshots) from Debian's packages


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"{' '.join(packages)} missing and apt-get cannot be run as root to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(packages)} failed: {done.stderr[-1000:]}")
    # a package's own service (started by its postinst where services may start) is not ours to keep
    for conf in glob.glob("/etc/postgresql/*/main"):
        subprocess.run(["pg_ctlcluster", Path(conf).parent.name, "main", "stop"], capture_output=True)
    if "redis-server" in packages and shutil.which("service"):
        subprocess.run(["service", "redis-server", "stop"], capture_output=True)


def pg_bindir() -> Path | None:
    """The folder of initdb/pg_ctl: on the PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()])
    return Path(versions[-1]).parent if versions else None


@dataclass
class Postgres:
    bindir: Path
    base: Path
    port: int
    as_user: dict
    pid: int = 0

    @property
    def data(self) -> Path:
        return self.base / "data"

    def uri(self, db: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://synergen@{HOST}:{self.port}/{db}"

    def stop(self) -> None:
        with open(os.devnull, "wb") as null:
            subprocess.run([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w",
                            "-t", "30"], cwd=self.base, stdout=null, stderr=null, **self.as_user)
        if (self.data / "postmaster.pid").exists() and self.pid:  # not shut down: by its PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def start_postgres(databases: tuple[str, ...]) -> Postgres:
    """A private cluster on a free port, trust authentication on 127.0.0.1 only, owner ``synergen``.

    Its folder is a fresh one under the system temporary directory, owned by the ``postgres`` user when
    running as root (the server refuses root; pytest's folders are private to root); its log is there too."""
    if pg_bindir() is None:
        apt_install("postgresql")
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL installed but initdb not found")
    as_user: dict = {}
    base = Path(tempfile.mkdtemp(prefix="synergen-prod-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    pg = Postgres(bindir, base, free_port(), as_user)

    def run(*args: str) -> None:
        with open(os.devnull, "wb") as null:
            done = subprocess.run([str(bindir / args[0]), *args[1:]], cwd=base, stdout=null,
                                  stderr=subprocess.PIPE, env={**os.environ, "HOME": str(base)}, **as_user)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")

    run("initdb", "-D", str(pg.data), "-U", "synergen", "--auth=trust", "--encoding=UTF8", "--no-locale",
        "--no-sync")
    options = (f"-h {HOST} -p {pg.port} -k {base} -c fsync=off -c synchronous_commit=off "
               f"-c full_page_writes=off -c max_connections=200")
    run("pg_ctl", "start", "-D", str(pg.data), "-w", "-t", "60", "-l", str(base / "postgres.log"), "-o", options)
    pg.pid = int((pg.data / "postmaster.pid").read_text().split()[0])
    import psycopg2

    conn = psycopg2.connect(host=HOST, port=pg.port, user="synergen", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for db in databases:
            cur.execute(f"CREATE DATABASE {db}")
    conn.close()
    return pg


# ---------------------------------------------------------------------------------------------
# the setup


# What Compose's airflow-init runs (GPU_POOL_SLOTS = 1), then each component's command as Compose runs it.
INIT_COMMANDS = (["airflow", "db", "migrate"],
                 ["airflow", "pools", "set", "gpu", "1", "synergen train task: one slot per GPU worker"])


def airflow_commands(api_port: int = 8080) -> dict[str, list[str]]:
    """The command of every Airflow component, as in infra/compose.yaml (tests/test_production_setup.py
    compares them); the two workers get a host name and pid file of their own here (``start``)."""
    return {
        "api-server": ["airflow", "api-server", "--port", str(api_port)],
        "scheduler": ["airflow", "scheduler"],
        "dag-processor": ["airflow", "dag-processor"],
        "triggerer": ["airflow", "triggerer"],
        DEFAULT_WORKER: ["airflow", "celery", "worker", "--queues", "default"],
        GPU_WORKER: ["airflow", "celery", "worker", "--queues", "gpu", "--concurrency", "1"],
    }


@dataclass
class Production:
    workdir: Path
    airflow_url: str
    mlflow_url: str
    spark_master: str
    env: dict  # the Airflow processes' environment (Compose's x-airflow-env, this machine's values)
    password: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    postgres: Postgres | None = None
    spark: object | None = None
    _token: str | None = None

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.logs_dir.glob("*.log")))

    def token(self, refresh: bool = False) -> str:
        """A JWT from ``POST /auth/token``, as the UI's login page gets one."""
        if self._token is None or refresh:
            req = urllib.request.Request(f"{self.airflow_url}/auth/token", method="POST",
                                         data=json.dumps({"username": "admin", "password": self.password}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                self._token = json.load(r)["access_token"]
        return self._token

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        """Airflow's REST API (``/api/v2/...``): the decoded JSON answer; an HTTP error raises with its body."""
        for attempt in range(2):
            req = urllib.request.Request(f"{self.airflow_url}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.token(refresh=attempt > 0)}"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    text = r.read()
                    return json.loads(text) if text else {}
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 0:
                    continue
                raise RuntimeError(f"{method} {path} -> {e.code}: {e.read().decode(errors='replace')[:2000]}") from e
        raise AssertionError("unreachable")

    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """An ``airflow`` CLI command in the setup's environment."""
        done = subprocess.run([str(BIN / "airflow"), *args], env=self.env, cwd=self.workdir,
                              capture_output=True, text=True, timeout=600)
        if check and done.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                               f"{done.stderr[-4000:]}")
        return done


def airflow_env(workdir: Path, *, pg: Postgres, redis_port: int, redis_password: str, api_port: int,
                synergen_config: Path | None = None) -> dict:
    """Compose's ``x-airflow-env`` with this machine's hosts, ports and secrets (see the module's doc)."""
    home = workdir / "airflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "SYNERGEN"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # this checkout's code first (also in a worktree whose venv's editable install points elsewhere);
        # tests/ for worker_hostname
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        # --- as in infra/compose.yaml (x-airflow-env)
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.uri("airflow"),
        "AIRFLOW__CELERY__RESULT_BACKEND": pg.uri("airflow", "db+postgresql+psycopg2"),
        "AIRFLOW__CELERY__BROKER_URL": f"redis://:{redis_password}@{HOST}:{redis_port}/0",
        "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(24),
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(24),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{HOST}:{api_port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(workdir / "auth" / "passwords.json"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",  # Compose: AIRFLOW_WORKER_CONCURRENCY, default 4
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
        "SYNERGEN_GPU_POOL": "gpu",
        "SYNERGEN_GPU_QUEUE": "gpu",
        # --- this machine: loopback, free ports, small
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": f"http://{HOST}:{api_port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "production.worker_hostname",
        # The RQ-VAE training is not bit-reproducible on more than one torch thread (tests/test_cluster_dag.py)
        "OMP_NUM_THREADS": "1",
        "SPARK_LOCAL_IP": HOST,
    })
    if synergen_config is not None:  # the DAG's default `config` param (Compose: SYNERGEN__* variables)
        env["SYNERGEN_CONFIG"] = str(synergen_config)
    return env


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _popen(p: Production, name: str, cmd: list[str], env: dict | None = None, cwd: Path | None = None,
           **kw) -> subprocess.Popen:
    """``cmd`` in a process group of its own (stopped with it), its output in ``logs/<name>.log``."""
    p.logs_dir.mkdir(parents=True, exist_ok=True)
    log = open(p.logs_dir / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env if env is not None else p.env,
                            cwd=cwd or p.workdir, start_new_session=True, **kw)
    log.close()
    p.procs[name] = proc
    return proc


def _wait(p: Production, what: str, ready, timeout_s: float, names: tuple[str, ...] = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        for name in names or tuple(p.procs):
            proc = p.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n{p.logs()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s\n{p.logs()}")
        time.sleep(1)


def start(workdir: Path, synergen_config: Path | None = None, spark_workers: int = 2) -> Production:
    """Start everything; return once the API server reports every component healthy, both Celery workers
    answer and the DAG is serialized. On a failure, what was started is stopped."""
    from cluster import start as start_spark

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not shutil.which("redis-server"):
        apt_install("redis-server")
    api_port, mlflow_port, redis_port = free_port(), free_port(), free_port()
    redis_password = secrets.token_hex(16)
    p = Production(workdir, f"http://{HOST}:{api_port}", f"http://{HOST}:{mlflow_port}", "", {},
                   secrets.token_hex(12))
    try:
        p.logs_dir.mkdir(parents=True, exist_ok=True)
        p.postgres = start_postgres(("airflow", "mlflow"))
        p.env = airflow_env(workdir, pg=p.postgres, redis_port=redis_port, redis_password=redis_password,
                            api_port=api_port, synergen_config=synergen_config)

        # Redis: the Celery broker (Compose: redis-server --requirepass), no persistence on this machine
        _popen(p, "redis", ["redis-server", "--port", str(redis_port), "--bind", HOST, "--save", "",
                            "--appendonly", "no", "--daemonize", "no", "--requirepass", redis_password,
                            "--dir", str(workdir)], env=dict(os.environ))

        # MLflow: the tracking server and registry on PostgreSQL, artifacts served by it
        artifacts = workdir / "mlartifacts"
        _popen(p, "mlflow", [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(mlflow_port),
                             "--backend-store-uri", p.postgres.uri("mlflow"), "--serve-artifacts",
                             "--artifacts-destination", artifacts.as_uri(), "--workers", "1"],
               env=dict(os.environ))

        # Spark standalone
        p.spark = start_spark(workdir / "spark", cores=1, memory="2g", workers=spark_workers)
        p.spark_master = p.spark.master_url

        # Airflow: what Compose's airflow-init does, then the components
        for cmd in INIT_COMMANDS:
            p.airflow(*cmd[1:])
        auth = workdir / "auth" / "passwords.json"
        auth.parent.mkdir(parents=True, exist_ok=True)
        auth.write_text(json.dumps({"admin": p.password}) + "\n")
        auth.chmod(0o600)

        for name, cmd in airflow_commands(api_port).items():
            cmd = [str(BIN / "airflow"), *cmd[1:]]
            if name in (DEFAULT_WORKER, GPU_WORKER):  # two workers on one host (see the module's doc)
                cmd += ["--celery-hostname", f"{name}@%h", "--pid", str(workdir / f"{name}.pid")]
                env = {**p.env, "SYNERGEN_WORKER_NAME": name,
                       "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
            else:
                env = p.env
            _popen(p, name, cmd, env=env)

        _wait(p, "MLflow server", lambda: _http_ok(f"{p.mlflow_url}/health"), 180)
        _wait(p, "Airflow API server", lambda: _http_ok(f"{p.airflow_url}/api/v2/monitor/health"), 300)
        _wait(p, "Airflow components healthy", lambda: _healthy(p), 300)
        _wait(p, "both Celery workers", lambda: all("ready." in (p.logs_dir / f"{n}.log").read_text(errors="replace")
                                                    for n in (DEFAULT_WORKER, GPU_WORKER)), 300)
        _wait(p, "DAG synergen_daily serialized",
              lambda: _http_ok(f"{p.airflow_url}/api/v2/dags/synergen_daily",
                               {"Authorization": f"Bearer {p.token()}"}), 300)
    except BaseException:
        stop(p)
        raise
    return p


def _healthy(p: Production) -> bool:
    try:
        with urllib.request.urlopen(f"{p.airflow_url}/api/v2/monitor/health", timeout=5) as r:
            health = json.load(r)
    except (OSError, ValueError):
        return False
    return all((health.get(c) or {}).get("status") == "healthy"
               for c in ("metadatabase", "scheduler", "dag_processor", "triggerer"))


def _stop_proc(proc: subprocess.Popen, first: int, grace_s: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, first)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):  # what is left of its group (task processes, web workers)
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def stop(p: Production, grace_s: float = 45) -> None:
    """Stop everything by PID, in reverse order of dependence."""
    for name in (GPU_WORKER, DEFAULT_WORKER, "triggerer", "dag-processor", "scheduler", "api-server"):
        if name in p.procs:
            _stop_proc(p.procs[name], signal.SIGINT, grace_s)
    if p.spark is not None:
        from cluster import stop as stop_spark

        stop_spark(p.spark)
    for name in ("mlflow", "redis"):
        if name in p.procs:
            _stop_proc(p.procs[name], signal.SIGTERM, grace_s)
    if p.postgres is not None:
        p.postgres.stop()
        shutil.rmtree(p.postgres.base, ignore_errors=True)


@contextlib.contextmanager
def production_setup(workdir: Path, synergen_config: Path | None = None):
    p = start(workdir, synergen_config)
    try:
        yield p
    finally:
        stop(p)
