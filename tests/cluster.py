"""A real Spark standalone cluster (one master, one or more workers) on 127.0.0.1, from the pyspark wheel alone.

    with standalone_cluster(tmp_path) as c:               # workers=2: two worker daemons
        subprocess.run([...], env={**os.environ, "SYNERGEN__SPARK__MASTER": c.master_url})

Ports are picked free (other test runs may hold Spark's defaults). The daemons are started with
``spark-class`` (which execs the JVM, so the PID we hold is the JVM's), waited on until the master's
JSON status lists every worker ALIVE with its cores, and stopped by their PIDs (workers first):
terminate, then kill after a grace period. Their logs stay under ``workdir`` for a failing test to show.
The first worker is ``procs["worker"]``, the next ones ``procs["worker-2"]``, ``procs["worker-3"]``, ...
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

SPARK_HOME = Path(pyspark.__file__).parent
HOST = "127.0.0.1"


@dataclass
class Cluster:
    master_url: str
    ui_url: str
    workdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.ui_url}/json/", timeout=2) as r:
            return json.load(r)

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.workdir.glob("*.log")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _daemon(name: str, args: list[str], workdir: Path, env: dict) -> subprocess.Popen:
    log = open(workdir / f"{name}.log", "wb")
    return subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=workdir)


def start(workdir: Path, cores: int = 1, memory: str = "2g", timeout_s: float = 90, workers: int = 1) -> Cluster:
    """Start a master and ``workers`` workers of ``cores`` cores and ``memory`` each; return once every
    worker is registered with its cores."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port, ui = free_port(), free_port()
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": HOST,
           "SPARK_LOG_DIR": str(workdir), "SPARK_WORKER_DIR": str(workdir / "work")}
    c = Cluster(f"spark://{HOST}:{port}", f"http://{HOST}:{ui}", workdir)
    c.procs["master"] = _daemon("master", ["org.apache.spark.deploy.master.Master", "--host", HOST,
                                           "--port", str(port), "--webui-port", str(ui)], workdir, env)
    for i in range(1, workers + 1):
        name = worker_name(i)
        c.procs[name] = _daemon(name, ["org.apache.spark.deploy.worker.Worker", "--host", HOST,
                                       "--cores", str(cores), "--memory", memory,
                                       "--webui-port", str(free_port()), "--work-dir", str(workdir / f"work-{i}"),
                                       c.master_url], workdir, env)
    try:
        _wait_ready(c, cores, timeout_s, workers)
    except BaseException:
        stop(c)
        raise
    return c


def worker_name(i: int) -> str:
    """The key in ``Cluster.procs`` (and the log file name) of the ``i``-th worker, from 1."""
    return "worker" if i == 1 else f"worker-{i}"


def _wait_ready(c: Cluster, cores: int, timeout_s: float, workers: int = 1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, p in c.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"spark {name} exited with {p.returncode}\n{c.logs()}")
        with contextlib.suppress(OSError, ValueError):
            alive = [w for w in c.status().get("workers", []) if w.get("state") == "ALIVE"]
            if len(alive) >= workers and all(w.get("cores", 0) >= cores for w in alive):
                return
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {workers} ALIVE worker(s) at {c.master_url} after {timeout_s}s\n{c.logs()}")


def stop(c: Cluster, grace_s: float = 20) -> None:
    """Stop the workers, then the master, by PID."""
    for name in [n for n in c.procs if n != "master"] + ["master"]:
        p = c.procs.get(name)
        if p is None or p.poll() is not None:
            continue
        p.terminate()
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def standalone_cluster(workdir: Path, cores: int = 1, memory: str = "2g", workers: int = 1):
    c = start(workdir, cores=cores, memory=memory, workers=workers)
    try:
        yield c
    finally:
        stop(c)
