"""The main job (`synergen run`, what `make run` calls) and the whole daily DAG under a real Airflow
(``airflow dags test``, SQLite metadata database), in one run: generated logs, the first day validated as
history, then the DAG for the second and the third day, one after the other, as a scheduler would. Each DAG
run must leave candidates, MLflow runs (a parent per DAG run, a nested run per task) and a registered model
version; the second builds on the first's state and its evaluation measures the lists the first published.
A further run on a day whose raw file breaks the contract must stop at validate_raw, before training, with
the reason in the task log and in MLflow.

One test, not two (the main job's and the DAG's): each whole-DAG run is minutes of CI time.
"""
import json
import subprocess
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daily_dag import TASKS, stage_runs
from jobs import cli, pipeline
from synergen_core import lake, registry
from synergen_core.config import load_config

pytestmark = pytest.mark.slow

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]


def test_main_job_runs_the_dag_for_two_days_then_stops_a_broken_day(tmp_path, monkeypatch, capsys):
    for key, value in {"LAKE__ROOT": tmp_path / "lake", "MLFLOW__TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
                       "MLFLOW__ARTIFACT_ROOT": tmp_path / "artifacts", "GENERATE__EVENTS": 6000,
                       "GENERATE__DAYS": 3, "TRAIN__EPOCHS": 2, "SPARK__SHUFFLE_PARTITIONS": 2}.items():
        monkeypatch.setenv(f"SYNERGEN__{key}", str(value))
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    assert cli.main(["run"]) == 0  # make run's default: the DAG for the last two days
    printed = capsys.readouterr().out
    out = json.loads((tmp_path / "synergen-run.json").read_text())  # the whole result, beside the lake
    assert printed.startswith(f"synergen: the daily DAG ran for {DAYS[1]}, {DAYS[2]}") and "candidate lists:" in printed
    assert f"served lists of {DAYS[1]} on the engagements of {DAYS[2]}" in printed
    assert set(out["history_validated"]) == {DAYS[0]} and out["dag_run_days"] == DAYS[1:]

    # every input row ends valid or quarantined, history and DAG days alike
    generated = out["generated"]["tables"]
    for ds in DAYS:
        for table in ("catalog", "search_events", "browse_events"):
            truth = generated[table][ds]
            valid = pq.read_table(lake.partition(tmp_path / "lake", f"validated/{table}", ds))
            quarantined = pq.read_table(lake.partition(tmp_path / "lake", f"quarantine/{table}", ds))
            assert quarantined.num_rows == sum(truth["malformed"].values())
            assert valid.num_rows + quarantined.num_rows == truth["rows"]

    cfg = load_config()
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    for ds in DAYS[1:]:
        runs = stage_runs(cfg, ds)
        assert set(TASKS) <= set(runs) and "pipeline" in runs  # a nested run per task under the DAG run's
        parent = runs["pipeline"].info.run_id
        assert all(runs[t].data.tags["mlflow.parentRunId"] == parent for t in TASKS)
        assert all(runs[t].info.status == "FINISHED" for t in TASKS)
        assert runs["pipeline"].info.status == "FINISHED"  # closed by the last task, not left RUNNING
        for task, plot in (("train", "plots/training_temporal.synergen.png"),
                           ("evaluate", "plots/recall_at_k_temporal.png"),
                           ("semantic_ids", "plots/codebook_utilization.png")):
            assert plot in {a.path for a in client.list_artifacts(runs[task].info.run_id, "plots")}
        published = lake.partition(cfg.lake.root, cfg.score.output, ds)
        assert (published / "_SUCCESS").exists()
        for surface in ("rec", "search"):
            assert pq.read_table(published / f"surface={surface}").num_rows > 0
    assert Path(out["outputs"]["candidates"]) == lake.partition(cfg.lake.root, cfg.score.output, DAYS[2]).resolve()
    first, second = stage_runs(cfg, DAYS[1]), stage_runs(cfg, DAYS[2])
    # the second day is incremental: sessionize processed that one day on top of the first day's state
    assert first["sessionize"].data.metrics["input_days"] > 1  # caught up on the history
    assert second["sessionize"].data.metrics["input_days"] == 1
    # the first day's collaborative vectors come from ALS; once a champion exists, from its ID embeddings
    assert first["item_embeddings"].data.tags["synergen.collab.mode"] == "als"
    assert second["item_embeddings"].data.tags["synergen.collab.mode"] == "champion"
    # the first day trains in full (no champion); the second would start warm from the first's model, but
    # the switch from ALS to the champion's vectors re-coded the semantic IDs, so it trains in full too
    start = "synergen.temporal.synergen.start"
    assert first["train"].data.tags[start] == "full"
    assert first["train"].data.tags[f"{start}_reason"] == "no champion to start from"
    assert second["train"].data.tags[start] == "full"
    assert "champion's items changed" in second["train"].data.tags[f"{start}_reason"]
    # the second day's evaluation measures what the first day published
    assert first["evaluate"].data.metrics["served.available"] == 0
    assert second["evaluate"].data.metrics["served.available"] == 1
    assert {"served.rec.ndcg_at_10", "served.rec.recall_at_10"} <= set(second["evaluate"].data.metrics)
    versions = client.search_model_versions(f"name = '{cfg.mlflow.registered_model}'")
    assert len(versions) == 2 and {v.tags.get("synergen.ds") for v in versions} == set(DAYS[1:])
    assert registry.status(cfg)["champion"]["version"] in {"1", "2"}

    # a broken raw file on the next day stops the run at validate_raw: nothing downstream runs
    day = "2099-01-01"
    bad = lake.partition(cfg.lake.root, "raw/browse_events", day)
    bad.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": ["u1"], "surprise": [1]}), bad / "part-0.parquet")
    with pytest.raises(subprocess.CalledProcessError) as failed:
        pipeline.airflow(["dags", "test", pipeline.DAG_ID, day, "-c", json.dumps({"config": out["dag_run"]["config"]})],
                         Path(out["dag_run"]["airflow_home"]), capture_output=True, text=True)
    log = failed.value.stdout + failed.value.stderr
    assert "part-0.parquet" in log and "event_id" in log  # the file and a missing field are named
    runs = stage_runs(cfg, day)
    assert runs["validate_raw"].info.status == "FAILED"
    assert "part-0.parquet" in runs["validate_raw"].data.tags["synergen.failure"]
    assert "train" not in runs and "build_training_data" not in runs
    # the failed DAG run's MLflow run is closed FAILED with the task and the reason (on_failure_callback)
    assert runs["pipeline"].info.status == "FAILED"
    assert runs["pipeline"].data.tags["synergen.failure"].startswith(f"validate_raw {day}:")
