"""What every benchmark writes: ``benchmarks/results/<name>.json`` (figures + machine, date, command)
and its own section of ``BENCHMARKS.md``, replaced on each run so the file always shows the latest."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SUMMARY = ROOT / "BENCHMARKS.md"
SHARED_DATA = ROOT.parent / "shared" / "data"


def machine() -> dict:
    mem_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def peak_rss_kb(pid: int | str = "self") -> int:
    """A process's peak resident memory as the kernel keeps it (``VmHWM``), in kB; 0 once it is gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def command() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    path = Path(sys.argv[0]).resolve()
    return ".".join(path.relative_to(ROOT).with_suffix("").parts) if path.is_relative_to(ROOT) else str(path)


def git_revision() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def write_result(name: str, figures: dict, summary_md: str) -> Path:
    """Save figures as JSON and replace this benchmark's section in BENCHMARKS.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command(), "git_revision": git_revision(), "machine": machine()}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**meta, "figures": figures}, indent=2, default=str) + "\n")
    write_summary(meta, summary_md)
    return path


def write_summary(meta: dict, summary_md: str) -> None:
    """Replace the section of benchmark ``meta["name"]`` in BENCHMARKS.md (meta as in its results JSON)."""
    name, m = meta["name"], meta["machine"]
    section = (
        f"<!-- {name}:start -->\n## {name}\n\n"
        f"`{meta['command']}` — {meta['date']}, {m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"revision {meta['git_revision']}; figures in `benchmarks/results/{name}.json`.\n\n"
        f"{summary_md.strip()}\n<!-- {name}:end -->\n"
    )
    text = SUMMARY.read_text() if SUMMARY.exists() else "# Benchmarks\n\nEvery figure here is written by the command shown with it.\n\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    SUMMARY.write_text(text)
