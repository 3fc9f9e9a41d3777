"""Scale of the data stages: wall time and peak memory per stage as the logs grow, driver memory fixed.

Each stage runs through its CLI (``synergen validate|sessionize|embed|semantic-ids``) in a process of its
own, against a Spark standalone cluster on 127.0.0.1 (one master, one worker: the executors are JVMs of
their own, so the driver's memory and the executors' are told apart), with ``spark.driver.memory`` fixed
(``--driver-memory``, default 2g). Per stage run it records:

* ``seconds``: wall time of the process (JVM start included);
* ``driver_python_mb``: peak RSS of the stage's Python process (``VmHWM``, the kernel's high-water mark);
* ``driver_jvm_mb``: peak RSS of the driver JVM (``SparkSubmit``, a child of that process);
* ``executors_mb``: the sum of the peak RSS of the executor JVMs and their Python workers (an upper
  bound: they need not peak at the same moment);
* ``input_mb``: bytes the application read from files, from Spark's event log (every task's input
  metrics), which shows how much history a daily run reads;
* ``driver_heap_mb`` / ``executor_heap_mb``: the JVMs' peak used heap as Spark itself reports it
  (``spark.eventLog.logStageExecutorMetrics``).

Two series:

* ``events``: generated logs of ``--sizes`` events over ``--days`` days, catalog held at ``--items``.
  Day 1 runs as a daily run (measured), days 2..N-1 as one bulk catch-up (validate ``--last-ds``,
  sessionize ``--from-ds``; not measured), day N as a daily run (measured): the steady state of the
  daily job, and the input it reads on day 1 against day N.
* ``catalog``: ``--catalog-events`` events fixed, the catalog at each of ``--catalog-items``; the item
  embeddings and semantic IDs of the last day, measured (the days before run in bulk).

Run: ``.venv/bin/python -m benchmarks.scale`` (defaults, production-like sizes: 2M, 8M, 32M events; 250k, 1M, 4M items;
hours on 2 cores). A quick check: ``--sizes 20000 80000 --items 2000 --days 2 --catalog-items``
(no catalog series). Results go to
``benchmarks/results/scale.json``, plots to ``benchmarks/results/scale_*.png``, a summary to
BENCHMARKS.md. Generated lakes stay under ``--work`` (default ``benchmarks/work/scale``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

from benchmarks.common import RESULTS, ROOT, peak_rss_kb, write_result

sys.path.insert(0, str(ROOT / "tests"))  # the loopback standalone cluster the cluster tests start
import cluster  # noqa: E402

START_DS = "2026-01-01"
STAGES = ("validate", "sessionize", "embed", "semantic-ids")
ITEM_STAGES = ("embed", "semantic-ids")
DEFAULT_SIZES = [2_000_000, 8_000_000, 32_000_000]  # events over a week, catalog held at --items
DEFAULT_CATALOG_ITEMS = [250_000, 1_000_000, 4_000_000]


# ---------------------------------------------------------------------------------------------
# measuring one process tree


class PeakMemory:
    """Polls the process tree of a stage and of the standalone worker; keeps every process's ``VmHWM``
    (its peak RSS as the kernel counts it, so a short spike between polls is not missed)."""

    def __init__(self, root_pid: int, worker_pids: list[int], poll_s: float = 0.2):
        self.root_pid, self.worker_pids, self.poll_s = root_pid, worker_pids, poll_s
        self.peak_kb: dict[int, tuple[str, int]] = {}  # pid -> (role, VmHWM kB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.poll_s)

    def sample(self) -> None:
        for pid, role in self._roles().items():
            hwm = peak_rss_kb(pid)
            if hwm:
                self.peak_kb[pid] = (role, max(hwm, self.peak_kb.get(pid, (role, 0))[1]))

    def _roles(self) -> dict[int, str]:
        roles = {self.root_pid: "driver_python"}
        for p in _descendants(self.root_pid):
            roles[p.pid] = "driver_jvm" if "SparkSubmit" in " ".join(_cmdline(p)) else "driver_python"
        for w in self.worker_pids:  # executors (and their Python workers) are the worker daemon's children
            roles.update({p.pid: "executors" for p in _descendants(w)})
        return roles

    def by_role_mb(self) -> dict[str, float]:
        out = {"driver_python": 0.0, "driver_jvm": 0.0, "executors": 0.0}
        for role, kb in self.peak_kb.values():
            if role == "driver_python" and out[role]:
                continue  # the stage process only: a local pyspark daemon would count as an executor
            out[role] += kb / 1024
        return {k: round(v, 1) for k, v in out.items()}


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def event_log_figures(logs: list[Path]) -> dict:
    """Input bytes and peak JVM heap (driver, executors) of the applications whose event ``logs`` these are."""
    read, heap = 0, {"driver": 0, "executors": 0}
    files = [f for p in logs for f in (sorted(p.glob("events_*")) if p.is_dir() else [p])]  # rolling: a folder
    for f in files:
        for line in open(f, errors="replace"):
            ev = json.loads(line)
            kind = ev.get("Event")
            if kind == "SparkListenerTaskEnd":
                read += ((ev.get("Task Metrics") or {}).get("Input Metrics") or {}).get("Bytes Read", 0)
            elif kind == "SparkListenerStageExecutorMetrics":
                who = "driver" if ev["Executor ID"] == "driver" else "executors"
                heap[who] = max(heap[who], ev["Executor Metrics"].get("JVMHeapMemory", 0))
    return {"input_mb": round(read / 2**20, 1), "driver_heap_mb": round(heap["driver"] / 2**20, 1),
            "executor_heap_mb": round(heap["executors"] / 2**20, 1)}


# ---------------------------------------------------------------------------------------------
# running stages


def config(root: Path, master: str, driver_memory: str, executor_memory: str, events: int, items: int,
           days: int) -> dict:
    users = max(2_000, events // 100)
    return {
        "lake": {"root": str(root / "lake")},
        "spark": {"master": master, "driver_memory": driver_memory, "shuffle_partitions": 16,
                  "conf": {"spark.executor.memory": executor_memory, "spark.ui.enabled": "false",
                           "spark.eventLog.enabled": "true", "spark.eventLog.dir": str(root / "eventlog"),
                           "spark.eventLog.logStageExecutorMetrics": "true", "spark.eventLog.compress": "false",
                           "spark.executorEnv.PYTHONPATH": str(ROOT)}},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "generate": {"events": events, "days": days, "items": items, "users": users, "start_ds": START_DS},
    }


def run_cli(root: Path, cfg_file: Path, args: list[str], label: str, workers: list[int]) -> dict:
    """``synergen ARGS`` in a process of its own, measured; fails loudly with the stage's output."""
    log_dir = root / "eventlog"  # spark.eventLog.dir of the size's config: one file per application
    log_dir.mkdir(parents=True, exist_ok=True)
    before = set(log_dir.iterdir())
    cmd = [sys.executable, "-m", "jobs.cli", *args, "--config", str(cfg_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    with open(root / f"{label}.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with PeakMemory(proc.pid, workers) as mem:
            rc = proc.wait()
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{label}: synergen {' '.join(args)} exited {rc}; see {root / f'{label}.log'}")
    roles = mem.by_role_mb()
    return {"seconds": round(seconds, 1), "driver_python_mb": roles["driver_python"],
            "driver_jvm_mb": roles["driver_jvm"], "executors_mb": roles["executors"],
            **event_log_figures(sorted(set(log_dir.iterdir()) - before))}


def days_of(n: int) -> list[str]:
    first = dt.date.fromisoformat(START_DS)
    return [(first + dt.timedelta(days=i)).isoformat() for i in range(n)]


def plan(days: list[str]) -> list[tuple[str, list[str]]]:
    """(label, CLI args): day 1 as a daily run, the middle days as one bulk catch-up, the last day daily."""
    first, middle, last = days[0], days[1:-1], days[-1]
    steps = [("day1", [s, "--ds", first]) for s in STAGES]
    if middle:
        steps += [("bulk", ["validate", "--ds", middle[0], "--last-ds", middle[-1]]),
                  ("bulk", ["sessionize", "--from-ds", middle[0], "--ds", middle[-1]])]
    return steps + [("last", [s, "--ds", last]) for s in STAGES]


def one_size(work: Path, name: str, events: int, items: int, n_days: int, args, c) -> dict:
    """Generate the logs of one size and run its plan; the measured runs of day 1 and the last day."""
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    cfg_file = root / "synergen.yaml"
    master = c.master_url if c else "local[2]"
    cfg_file.write_text(yaml.safe_dump(config(root, master, args.driver_memory, args.executor_memory,
                                              events, items, n_days)))
    workers = [p.pid for n, p in c.procs.items() if n.startswith("worker")] if c else []
    days = days_of(n_days)
    if not (root / "lake" / "raw").is_dir():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jobs.cli", "generate", "--config", str(cfg_file)], cwd=ROOT,
                       check=True, capture_output=True)
        print(f"{name}: generated in {time.perf_counter() - t0:.0f} s", flush=True)
    measured: dict[str, dict] = {"day1": {}, "last": {}}
    for label, stage_args in plan(days):
        fig = run_cli(root, cfg_file, stage_args, f"{label}-{stage_args[0]}", workers)
        if label in measured:
            measured[label][stage_args[0]] = fig
        print(f"{name} {label} {stage_args[0]}: {fig}", flush=True)
    return {"events": events, "items": items, "days": n_days, **measured}


# ---------------------------------------------------------------------------------------------
# the report


GROWTH_LIMIT = {"memory": 1.5, "seconds": 20.0}  # largest over smallest size, per stage


def growth(series: list[dict], stages: tuple[str, ...]) -> dict:
    """Per stage: largest size's figure over the smallest's, for the driver side and wall time."""
    lo, hi = series[0]["last"], series[-1]["last"]
    out = {}
    for s in stages:
        ratio = lambda k: round(hi[s][k] / lo[s][k], 2) if lo[s][k] else None  # noqa: E731
        out[s] = {"driver_python": ratio("driver_python_mb"), "driver_jvm": ratio("driver_jvm_mb"),
                  "seconds": ratio("seconds")}
    return out


def plot(series: list[dict], stages: tuple[str, ...], x_key: str, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r[x_key] for r in series]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, [("driver_python_mb", "driver Python peak RSS (MB)"),
                                       ("driver_jvm_mb", "driver JVM peak RSS (MB)"), ("seconds", "wall time (s)")]):
        for s in stages:
            ax.plot(xs, [r["last"][s][key] for r in series], marker="o", label=s)
        ax.set_xscale("log")
        ax.set_xlabel(x_key)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle(f"scale, {name} series (last day's daily run)")
    fig.tight_layout()
    path = RESULTS / f"scale_{name}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path.name]


def table(series: list[dict], stages: tuple[str, ...], x_key: str) -> str:
    rows = [f"| {x_key} | stage | seconds | driver Python MB | driver JVM MB | executors MB | input MB (day 1 / last) |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for r in series:
        for s in stages:
            f, d1 = r["last"][s], r["day1"].get(s, {})
            rows.append(f"| {r[x_key]:,} | {s} | {f['seconds']} | {f['driver_python_mb']} | {f['driver_jvm_mb']} | "
                        f"{f['executors_mb']} | {d1.get('input_mb', '')} / {f['input_mb']} |")
    return "\n".join(rows)


def summary(figures: dict, args) -> str:
    parts = [f"Data stages through their CLI on a loopback Spark standalone cluster (1 worker, 2 cores), "
             f"driver memory {args.driver_memory}, executor memory {args.executor_memory}. Figures of the last "
             f"day's daily run; input MB from Spark's event log. Limits: driver-side peak ×"
             f"{GROWTH_LIMIT['memory']}, time ×{GROWTH_LIMIT['seconds']} from smallest to largest size."]
    if args.sizes != DEFAULT_SIZES or args.catalog_items != DEFAULT_CATALOG_ITEMS:
        parts.append(f"\nSizes run: events {args.sizes}, catalog {args.catalog_items}; the production-like series "
                     f"(events {DEFAULT_SIZES}, catalog {DEFAULT_CATALOG_ITEMS}) are the defaults, and only "
                     "they say how the stages scale (at small sizes fixed costs dominate).")
    for name, x_key, stages in (("events", "events", STAGES), ("catalog", "items", ITEM_STAGES)):
        if figures.get(name):
            parts += [f"\n**{name} series**\n", table(figures[name], stages, x_key),
                      f"\nGrowth, largest over smallest: `{json.dumps(figures[name + '_growth'])}`",
                      f"\n![{name}](benchmarks/results/scale_{name}.png)"]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=DEFAULT_SIZES)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--catalog-items", type=int, nargs="*", default=DEFAULT_CATALOG_ITEMS)
    ap.add_argument("--catalog-events", type=int, default=2_000_000)
    ap.add_argument("--catalog-days", type=int, default=2)
    ap.add_argument("--driver-memory", default="2g")
    ap.add_argument("--executor-memory", default="3g")
    ap.add_argument("--local", action="store_true", help="local[2] instead of a standalone cluster "
                    "(executors then live in the driver JVM)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "scale")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    c = None if args.local else cluster.start(args.work / "cluster", cores=2, memory="6g")
    figures: dict = {}
    try:
        figures["events"] = [one_size(args.work, f"events-{n}", n, args.items, args.days, args, c) for n in args.sizes]
        figures["catalog"] = [one_size(args.work, f"items-{n}", args.catalog_events, n, args.catalog_days, args, c)
                              for n in args.catalog_items]
    finally:
        if c:
            cluster.stop(c)
    plots = []
    for name, x_key, stages in (("events", "events", STAGES), ("catalog", "items", ITEM_STAGES)):
        if figures[name]:
            figures[name + "_growth"] = growth(figures[name], stages)
            plots += plot(figures[name], stages, x_key, name)
    figures["plots"] = plots
    figures["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_result("scale", figures, summary(figures, args))


if __name__ == "__main__":
    main()
