"""The daily synergen pipeline: one run per logical date (= ds). Tasks call stage functions; no logic here.

validate_raw >> sessionize >> item_embeddings >> semantic_ids >> build_training_data >> train >> evaluate
>> register >> promote >> score >> validate_candidates >> publish

The train task is the GPU task: it runs in the pool and queue named by SYNERGEN_GPU_POOL and
SYNERGEN_GPU_QUEUE (a deployment sets them to its GPU workers' pool and Celery queue, see README, "Running
on a cluster"); unset, they are Airflow's defaults, so a single machine runs it on whatever it has.
"""
import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, chain, dag

from jobs.stages import STAGES
from stage_tasks import stage_task, task_failed

GPU_POOL = os.environ.get("SYNERGEN_GPU_POOL", "default_pool")
GPU_QUEUE = os.environ.get("SYNERGEN_GPU_QUEUE", "default")
# Multi-node training: the config's own train.nodes, read here because it shapes the DAG (a train task per node).
TRAIN_NODES = int(os.environ.get("SYNERGEN__TRAIN__NODES", "1"))

# Per task: its time limit, and where it runs (the GPU pool and queue for train; Airflow's defaults else).
TASKS = {
    "validate_raw": {"execution_timeout": timedelta(minutes=30)},
    "sessionize": {"execution_timeout": timedelta(hours=1)},
    "item_embeddings": {"execution_timeout": timedelta(hours=1)},
    "semantic_ids": {"execution_timeout": timedelta(hours=1)},
    "build_training_data": {"execution_timeout": timedelta(hours=1)},
    "train": {"execution_timeout": timedelta(hours=6), "pool": GPU_POOL, "queue": GPU_QUEUE, "nodes": TRAIN_NODES},
    "evaluate": {"execution_timeout": timedelta(hours=1)},
    "register": {"execution_timeout": timedelta(minutes=30)},
    "promote": {"execution_timeout": timedelta(hours=1)},
    "score": {"execution_timeout": timedelta(hours=2)},
    "validate_candidates": {"execution_timeout": timedelta(minutes=30)},
    "publish": {"execution_timeout": timedelta(minutes=10)},
}
assert list(TASKS) == list(STAGES), "one task per stage, in pipeline order"


@dag(
    schedule="@daily",
    # The earliest day a backfill may ask for (logs go back years: MovieLens starts in 1996). Catchup is
    # off, so the scheduler itself only runs the latest day; past days run when a backfill asks for them.
    start_date=pendulum.datetime(1990, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=20),
        "execution_timeout": timedelta(hours=1),
        "on_failure_callback": task_failed,  # closes the run's MLflow parent run as FAILED
    },
    params={
        "config": Param(os.environ.get("SYNERGEN_CONFIG", ""), type="string",
                        description="YAML config file; empty: defaults + SYNERGEN__* environment"),
        "epochs": Param(None, type=["null", "integer"], minimum=1, description="override train.epochs"),
        "d_model": Param(None, type=["null", "integer"], minimum=8, description="override model.d_model"),
        "n_layers": Param(None, type=["null", "integer"], minimum=1, description="override model.n_layers"),
        "skip_promotion": Param(False, type="boolean", description="register the model as challenger only"),
    },
    tags=["synergen"],
    doc_md=__doc__,
)
def synergen_daily():
    chain(*[stage_task(name, **settings)() for name, settings in TASKS.items()])


synergen_daily()
