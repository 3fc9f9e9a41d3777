"""MLflow tracking for pipeline stages: one parent run per pipeline run (an Airflow DAG run, or one
``synergen run``), one nested run per stage, with the config as params, counts and durations as metrics,
reports as artifacts and lineage tags (ds, inputs, code version).

Stages run in separate processes under Airflow, so nesting uses the ``mlflow.parentRunId`` tag on a
parent found by its group tag rather than an in-process run stack.
"""
from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from synergen_core.config import Config

GROUP_TAG = "synergen.group"  # the pipeline run a stage belongs to (e.g. the Airflow run_id)
PARENT_TAG = "mlflow.parentRunId"


def _mlflow(cfg: Config):
    import mlflow

    if cfg.mlflow.tracking_uri.startswith("sqlite:///"):
        Path(cfg.mlflow.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    return mlflow


def experiment_id(cfg: Config) -> str:
    mlflow = _mlflow(cfg)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    if cfg.mlflow.tracking_uri.startswith(("http://", "https://")):
        # a tracking server stores artifacts where it is configured to (an S3 bucket in infra/)
        return client.create_experiment(cfg.mlflow.experiment)
    artifacts = Path(cfg.mlflow.artifact_root).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(cfg.mlflow.experiment, artifact_location=artifacts.as_uri())


def code_version() -> str:
    """The git commit of the code that ran (or the package version outside a checkout)."""
    here = Path(__file__).resolve().parent
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    if out.returncode == 0:
        return out.stdout.strip()
    from importlib.metadata import version

    return f"synergen=={version('synergen')}"


def flat_params(cfg: Config) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(node)[:500]  # MLflow's limit on a param value

    walk("", cfg.to_dict())
    return out


def _find_parent(client, exp: str, group: str):
    found = client.search_runs(
        [exp], filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`synergen.stage` = 'pipeline'", max_results=1
    )
    return found[0] if found else None


def parent_run(cfg: Config, group: str, ds: str) -> str:
    """The parent run of pipeline run ``group``: found by tag, created on first use.

    A closed parent is reopened (RUNNING): a stage that runs again under it is a cleared task or a rerun
    of the same DAG run, and ``close_parent`` closes it once more when that run ends."""
    mlflow = _mlflow(cfg)
    client = mlflow.MlflowClient()
    exp = experiment_id(cfg)
    found = _find_parent(client, exp, group)
    if found:
        if found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    run = client.create_run(
        exp, run_name=f"pipeline {ds}",
        tags={GROUP_TAG: group, "synergen.stage": "pipeline", "synergen.ds": ds, "synergen.code_version": code_version()},
    )
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in flat_params(cfg).items()])
    return run.info.run_id


def close_parent(cfg: Config, group: str, failure: str | None = None) -> str | None:
    """End pipeline run ``group``'s parent run: FINISHED, or FAILED with ``failure`` as its reason (tag
    ``synergen.failure`` and ``failure.txt``). Returns its run id, None when no stage ever opened it."""
    mlflow = _mlflow(cfg)
    client = mlflow.MlflowClient()
    found = _find_parent(client, experiment_id(cfg), group)
    if found is None:
        return None
    run_id = found.info.run_id
    if failure is not None:
        client.set_tag(run_id, "synergen.failure", failure[:5000])
        client.log_text(run_id, failure + "\n", "failure.txt")
    elif "synergen.failure" in found.data.tags:  # an earlier attempt failed; the cleared run then completed
        client.delete_tag(run_id, "synergen.failure")
    client.set_terminated(run_id, "FAILED" if failure is not None else "FINISHED")
    return run_id


class StageRun:
    """What a stage logs while it runs; wraps the active MLflow run."""

    def __init__(self, mlflow, run_id: str):
        self.mlflow, self.run_id = mlflow, run_id

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def tags(self, values: dict[str, str]) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in values.items()})

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if Path(path).is_dir():
            self.mlflow.log_artifacts(str(path), folder)
        elif Path(path).exists():
            self.mlflow.log_artifact(str(path), folder)

    def text(self, text: str, name: str) -> None:
        self.mlflow.log_text(text, name)

    def figure(self, fig, name: str) -> None:
        """A matplotlib figure (``synergen_core.plots``) as a PNG artifact; the figure is closed."""
        import matplotlib.pyplot as plt

        try:
            self.mlflow.log_figure(fig, name)
        finally:
            plt.close(fig)


@contextmanager
def stage_run(cfg: Config, stage: str, ds: str, group: str | None = None) -> Iterator[StageRun]:
    """A tracked stage: nested under the pipeline run ``group`` when given; duration and status logged."""
    mlflow = _mlflow(cfg)
    tags = {"synergen.stage": stage, "synergen.ds": ds, "synergen.code_version": code_version()}
    if group:
        tags[GROUP_TAG] = group
        tags[PARENT_TAG] = parent_run(cfg, group, ds)
    t0 = time.perf_counter()
    with mlflow.start_run(experiment_id=experiment_id(cfg), run_name=f"{stage} {ds}", tags=tags) as run:
        mlflow.log_params(flat_params(cfg))
        tracked = StageRun(mlflow, run.info.run_id)
        try:
            yield tracked
        except BaseException as e:
            mlflow.set_tag("synergen.failure", f"{type(e).__name__}: {e}"[:5000])
            mlflow.log_text(f"{type(e).__name__}: {e}\n", "failure.txt")
            raise
        finally:
            mlflow.log_metric("duration_s", time.perf_counter() - t0)
