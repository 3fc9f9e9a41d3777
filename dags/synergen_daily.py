"""The daily synergen pipeline: one run per logical date (= ds). Tasks call stage functions; no logic here.

The train task is the GPU task: it runs in pool ``gpu`` on queue ``gpu`` (see README, "Running on a
cluster"); on a single machine both are ordinary, so it runs on the CPU.
"""
import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from jobs.stages import airflow_task


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=20),
        "execution_timeout": timedelta(hours=1),
    },
    params={
        "config": Param(os.environ.get("SYNERGEN_CONFIG", ""), type="string",
                        description="YAML config file; empty: defaults + SYNERGEN__* environment"),
        "epochs": Param(None, type=["null", "integer"], minimum=1, description="override train.epochs"),
        "d_model": Param(None, type=["null", "integer"], minimum=8, description="override model.d_model"),
        "n_layers": Param(None, type=["null", "integer"], minimum=1, description="override model.n_layers"),
    },
    tags=["synergen"],
    doc_md=__doc__,
)
def synergen_daily():
    @task(execution_timeout=timedelta(minutes=30))
    def validate_raw(ds=None, params=None, run_id=None):
        airflow_task("validate_raw", ds, params, run_id)

    @task(execution_timeout=timedelta(hours=1))
    def sessionize(ds=None, params=None, run_id=None):
        airflow_task("sessionize", ds, params, run_id)

    validate_raw() >> sessionize()


synergen_daily()
