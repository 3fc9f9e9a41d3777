"""The MLflow parent run of a pipeline run is closed when the run ends, on success and on failure, and
reopened when a stage runs under it again (a cleared task). Real MLflow on SQLite."""
import mlflow
import pytest

from synergen_core import tracking
from synergen_core.config import Config


@pytest.fixture
def cfg(tmp_path):
    cfg = Config()
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.mlflow.artifact_root = tmp_path / "mlartifacts"
    return cfg


def _parent(cfg: Config, group: str):
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([tracking.experiment_id(cfg)],
                              filter_string=f"tags.`synergen.stage` = 'pipeline' and tags.`synergen.group` = '{group}'")
    assert len(runs) == 1
    return runs[0]


def test_parent_run_closes_finished_then_failed_and_reopens_for_a_cleared_task(cfg):
    with tracking.stage_run(cfg, "validate_raw", "2026-01-01", group="run-1"):
        pass
    assert _parent(cfg, "run-1").info.status == "RUNNING"  # the DAG run goes on

    assert tracking.close_parent(cfg, "run-1") == _parent(cfg, "run-1").info.run_id
    assert _parent(cfg, "run-1").info.status == "FINISHED"

    # a task cleared and run again: the same parent, open again, then closed as failed with the reason
    with pytest.raises(RuntimeError):
        with tracking.stage_run(cfg, "sessionize", "2026-01-01", group="run-1"):
            assert _parent(cfg, "run-1").info.status == "RUNNING"
            raise RuntimeError("boom")
    tracking.close_parent(cfg, "run-1", failure="sessionize 2026-01-01: RuntimeError: boom")
    failed = _parent(cfg, "run-1")
    assert failed.info.status == "FAILED" and failed.info.end_time is not None
    assert failed.data.tags["synergen.failure"] == "sessionize 2026-01-01: RuntimeError: boom"

    # fixed and cleared: it completes, and the stale reason goes
    with tracking.stage_run(cfg, "sessionize", "2026-01-01", group="run-1"):
        pass
    tracking.close_parent(cfg, "run-1")
    done = _parent(cfg, "run-1")
    assert done.info.status == "FINISHED" and "synergen.failure" not in done.data.tags


def test_closing_a_pipeline_run_that_never_started_a_stage_is_a_no_op(cfg):
    assert tracking.close_parent(cfg, "never-ran") is None
