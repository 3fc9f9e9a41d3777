"""A real Spark standalone cluster (one master, one worker) on 127.0.0.1, from the pyspark wheel alone.

    with standalone_cluster(tmp_path) as c:
        subprocess.run([...], env={**os.environ, "SYNERGEN__SPARK__MASTER": c.master_url})

Ports are picked free (other test runs may hold Spark's defaults). Both daemons are started with
``spark-class`` (which execs the JVM, so the PID we hold is the JVM's), waited on until the master's
JSON status lists an ALIVE worker with its cores, and stopped by their PIDs: terminate, then kill
after a grace period. Their logs stay under ``workdir`` for a failing test to show.
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


def start(workdir: Path, cores: int = 1, memory: str = "2g", timeout_s: float = 90) -> Cluster:
    """Start a master and one worker; return once the worker is registered with its cores."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port, ui = free_port(), free_port()
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": HOST,
           "SPARK_LOG_DIR": str(workdir), "SPARK_WORKER_DIR": str(workdir / "work")}
    c = Cluster(f"spark://{HOST}:{port}", f"http://{HOST}:{ui}", workdir)
    c.procs["master"] = _daemon("master", ["org.apache.spark.deploy.master.Master", "--host", HOST,
                                           "--port", str(port), "--webui-port", str(ui)], workdir, env)
    c.procs["worker"] = _daemon("worker", ["org.apache.spark.deploy.worker.Worker", "--host", HOST,
                                           "--cores", str(cores), "--memory", memory,
                                           "--webui-port", str(free_port()), "--work-dir", str(workdir / "work"),
                                           c.master_url], workdir, env)
    try:
        _wait_ready(c, cores, timeout_s)
    except BaseException:
        stop(c)
        raise
    return c


def _wait_ready(c: Cluster, cores: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, p in c.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"spark {name} exited with {p.returncode}\n{c.logs()}")
        with contextlib.suppress(OSError, ValueError):
            alive = [w for w in c.status().get("workers", []) if w.get("state") == "ALIVE"]
            if alive and alive[0].get("cores", 0) >= cores:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no ALIVE worker at {c.master_url} after {timeout_s}s\n{c.logs()}")


def stop(c: Cluster, grace_s: float = 20) -> None:
    """Stop the worker, then the master, by PID."""
    for name in ("worker", "master"):
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
def standalone_cluster(workdir: Path, cores: int = 1, memory: str = "2g"):
    c = start(workdir, cores=cores, memory=memory)
    try:
        yield c
    finally:
        stop(c)
