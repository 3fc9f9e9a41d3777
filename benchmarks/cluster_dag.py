"""The whole daily DAG on local Spark + MLflow on SQLite versus a loopback cluster (Spark standalone master
and two workers, an MLflow server on PostgreSQL): time per stage. The figures come from the integration
test ``tests/test_cluster_dag.py``, run here with ``SYNERGEN_WRITE_CLUSTER_BENCH=1`` so that it writes
``benchmarks/results/cluster_dag.json`` and its section of BENCHMARKS.md (plain test runs do not).

    .venv/bin/python -m benchmarks.cluster_dag
"""
from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.common import ROOT


def main() -> int:
    env = {**os.environ, "SYNERGEN_WRITE_CLUSTER_BENCH": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cluster", "tests/test_cluster_dag.py", *sys.argv[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
