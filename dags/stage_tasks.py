"""The Airflow side of a pipeline stage: the one place that imports Airflow besides the DAG files.

``stage_task(name)`` is the DAG task of stage ``name`` of ``jobs.stages.STAGES``. A failed data check
fails the task at once (``AirflowFailException``: no retries, the same input fails the same way; the
reason is in the log and in MLflow); anything else (a lost executor, a full disk) goes through the DAG's
retries. Nothing is returned: stages hand data to each other through the lake and the registry, not XCom.
"""
from __future__ import annotations

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowFailException

from jobs import stages


def stage_task(name: str, nodes: int = 1, **task_args):
    """The TaskFlow task that runs stage ``name`` for the DAG run's ``ds``, nested under its MLflow run.
    With ``nodes`` above 1 (multi-node training), one mapped task instance per node: each starts this
    node's torchrun and they meet at the run's rendezvous, so all must run at once (a pool with a slot
    per node)."""

    def run_stage(ds=None, params=None, run_id=None, node=None):
        try:
            stages.run_for_pipeline(name, ds, params, run_id)
        except stages.data_errors() as e:
            raise AirflowFailException(f"{name} {ds}: {e}") from e

    run_stage.__doc__ = stages.STAGES[name].__doc__
    one = task(task_id=name, **task_args)(run_stage)
    if nodes == 1:
        return one
    return lambda: one.expand(node=list(range(nodes)))


def task_failed(context) -> None:
    """Every task's ``on_failure_callback``: Airflow calls it once a task has failed for good (a failed
    data check, or its retries spent; not on a retry), which fails the DAG run, so the run's MLflow parent
    run is closed FAILED with the task and the reason. Clearing the task later reopens it."""
    error = context.get("exception")
    reason = f"{context['ti'].task_id} {context['ds']}: " + (f"{type(error).__name__}: {error}" if error else "failed")
    stages.pipeline_failed(context.get("params"), context["run_id"], reason)
