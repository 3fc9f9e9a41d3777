"""The whole daily DAG under a real Airflow (``airflow dags test``, SQLite metadata database) on tiny real data.

conftest's MovieLens slice is ingested into a lake of its own; its days before the last two are validated as
history; then the DAG runs for the second-to-last and the last day, one after the other, as a scheduler
would. Each run must leave candidates, MLflow runs (a parent per DAG run, a nested run per task) and a
registered model version; the second builds on the first's state. A third run on a day whose raw file
breaks the contract must stop at validate_raw, before training, with the reason in the task log and in
MLflow.
"""
import json
import subprocess
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import MOVIELENS, ingested_slice, requires_shared_data
from daily_dag import TASKS, stage_runs, tiny_config
from jobs import pipeline
from synergen_core import lake

pytestmark = [pytest.mark.slow, requires_shared_data(MOVIELENS)]


@pytest.fixture(scope="module")
def dag_lake(tmp_path_factory, movielens_slice_dir):
    """The slice ingested, history validated, the config file: (root, cfg, config file, [day1, day2])."""
    from jobs import stages

    root = tmp_path_factory.mktemp("dagrun")
    cfg = tiny_config(root)
    days = ingested_slice(cfg, movielens_slice_dir)
    stages.validate_raw(cfg, days[0], last_ds=days[-3])
    config_file = root / "synergen.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    return root, cfg, config_file, days[-2:]


def task_states(home: Path, ds_run: str) -> dict[str, str]:
    out = pipeline.airflow(["tasks", "states-for-dag-run", pipeline.DAG_ID, ds_run, "-o", "json"], home,
                           capture_output=True, text=True)
    return {r["task_id"]: r["state"] for r in json.loads(out.stdout)}


def test_two_consecutive_days_then_a_broken_day(dag_lake):
    root, cfg, config_file, (day1, day2) = dag_lake
    home = root / "airflow"
    for ds in (day1, day2):
        pipeline.dags_test(config_file, ds, home)
        runs = stage_runs(cfg, ds)
        assert set(TASKS) <= set(runs) and "pipeline" in runs  # a nested run per task under the DAG run's
        parent = runs["pipeline"].info.run_id
        assert all(runs[t].data.tags["mlflow.parentRunId"] == parent for t in TASKS)
        assert all(runs[t].info.status == "FINISHED" for t in TASKS)
        assert runs["pipeline"].info.status == "FINISHED"  # closed by the last task, not left RUNNING
        client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
        for task, plot in (("train", "plots/training_temporal.synergen.png"),
                           ("evaluate", "plots/recall_at_k_temporal.png"),
                           ("semantic_ids", "plots/codebook_utilization.png")):
            assert plot in {a.path for a in client.list_artifacts(runs[task].info.run_id, "plots")}
        published = lake.partition(cfg.lake.root, cfg.score.output, ds)
        assert (published / "_SUCCESS").exists()
        assert pq.read_table(published / "surface=rec").num_rows > 0
    # the second day is incremental: sessionize processed that one day on top of the first day's state
    assert stage_runs(cfg, day1)["sessionize"].data.metrics["input_days"] > 1  # caught up on the history
    assert stage_runs(cfg, day2)["sessionize"].data.metrics["input_days"] == 1
    # the first day's collaborative vectors come from ALS; once a champion exists, from its ID embeddings
    assert stage_runs(cfg, day1)["item_embeddings"].data.tags["synergen.collab.mode"] == "als"
    assert stage_runs(cfg, day2)["item_embeddings"].data.tags["synergen.collab.mode"] == "champion"
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    versions = client.search_model_versions(f"name = '{cfg.mlflow.registered_model}'")
    assert len(versions) == 2 and {v.tags.get("synergen.ds") for v in versions} == {day1, day2}

    # a broken raw file on the next day stops the run at validate_raw: nothing downstream runs
    day3 = "2099-01-01"
    bad = lake.partition(cfg.lake.root, "raw/browse_events", day3)
    bad.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": ["u1"], "surprise": [1]}), bad / "part-0.parquet")
    with pytest.raises(subprocess.CalledProcessError) as failed:
        pipeline.airflow(["dags", "test", pipeline.DAG_ID, day3, "-c", json.dumps({"config": str(config_file)})],
                         home, capture_output=True, text=True)
    log = failed.value.stdout + failed.value.stderr
    assert "part-0.parquet" in log and "event_id" in log  # the file and a missing field are named
    runs = stage_runs(cfg, day3)
    assert runs["validate_raw"].info.status == "FAILED"
    assert "part-0.parquet" in runs["validate_raw"].data.tags["synergen.failure"]
    assert "train" not in runs and "build_training_data" not in runs
    # the failed DAG run's MLflow run is closed FAILED with the task and the reason (on_failure_callback)
    assert runs["pipeline"].info.status == "FAILED"
    assert runs["pipeline"].data.tags["synergen.failure"].startswith(f"validate_raw {day3}:")
