"""The daily DAG parses in a real Airflow 3 and has the expected tasks, order and run settings."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json
from airflow.dag_processing.dagbag import BundleDagBag
# as the DAG processor and the task runner load it: the bundle's folder on sys.path (dags/stage_tasks.py)
bag = BundleDagBag("{dags}", bundle_path="{dags}", bundle_name="dags-folder")
dag = bag.dags["synergen_daily"]
print(json.dumps({{
    "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
    "edges": sorted([t.task_id, d] for t in dag.tasks for d in t.downstream_task_ids),
    "tasks": sorted(t.task_id for t in dag.tasks),
    "max_active_runs": dag.max_active_runs,
    "params": sorted(dag.params.dump()),
    "retries": sorted({{t.retries for t in dag.tasks}}),
    "timeouts": sorted({{t.execution_timeout.total_seconds() for t in dag.tasks}}),
    "gpu": {{t.task_id: [t.pool, t.queue] for t in dag.tasks if t.pool != "default_pool"}},
    "mapped": {{t.task_id: repr(t.op_kwargs_expand_input.value) for t in dag.tasks if t.is_mapped}},
}}))
"""


def test_dag_imports_with_expected_tasks_and_order(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "SYNERGEN_GPU_POOL": "gpu", "SYNERGEN_GPU_QUEUE": "gpu", "SYNERGEN__TRAIN__NODES": "2"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(dags=ROOT / "dags")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    dag = json.loads(out.stdout.strip().splitlines()[-1])
    assert dag["errors"] == {}
    order = ["validate_raw", "sessionize", "item_embeddings", "semantic_ids", "build_training_data", "train",
             "evaluate", "register", "promote", "score", "validate_candidates", "publish"]
    assert dag["edges"] == sorted([a, b] for a, b in zip(order, order[1:]))
    assert dag["max_active_runs"] == 1 and dag["retries"] == [2]
    assert {"config", "epochs", "d_model", "n_layers", "skip_promotion"} <= set(dag["params"])
    assert dag["gpu"] == {"train": ["gpu", "gpu"]}  # only the train task goes to the GPU pool and queue
    assert dag["mapped"] == {"train": repr({"node": [0, 1]})}  # train.nodes = 2: a train task per node
    assert all(t > 0 for t in dag["timeouts"])
