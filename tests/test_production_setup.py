"""The loopback production setup (tests/production.py, ``make test-production``) runs what infra/compose.yaml
deploys: the same Airflow commands and the same settings, so what its test proves holds for a Compose
deployment. Differences are only hosts, ports, secrets and those listed here with their reason. No daemon
is started: this compares the two definitions (fast, in ``make test``).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import production
from compose_file import command, compose, environment

# Compose's values that the loopback setup replaces by this machine's: hosts, ports, secrets, paths.
MACHINE = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
}
# ... and the settings it changes, with the reason.
CHANGED = {
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1: two cores (Compose: AIRFLOW_WORKER_CONCURRENCY, default 4)",
}
# Settings only the loopback setup has: one host for everything, free ports (Compose: the image's
# AIRFLOW__CORE__DAGS_FOLDER, a container per component with its own host name and the default ports).
LOOPBACK_ONLY = {
    "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__API__HOST", "AIRFLOW__API__PORT", "AIRFLOW__API__BASE_URL",
    "AIRFLOW__API__WORKERS", "AIRFLOW__CORE__PARALLELISM", "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT",
    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT", "AIRFLOW__CORE__HOSTNAME_CALLABLE",
}
SERVICES = {"api-server": "airflow-apiserver", "scheduler": "airflow-scheduler",
            "dag-processor": "airflow-dag-processor", "triggerer": "airflow-triggerer",
            production.DEFAULT_WORKER: "airflow-worker", production.GPU_WORKER: "airflow-gpu-worker"}


def loopback_env() -> dict[str, str]:
    pg = production.Postgres(Path("/nonexistent"), Path("/nonexistent"), 5432, {})
    return production.airflow_env(Path("/tmp/x"), pg=pg, redis_port=6379, redis_password="pw", api_port=8080)


def test_same_airflow_settings_as_compose():
    spec = compose()
    ours = loopback_env()
    for service in SERVICES.values():
        theirs = {k: v for k, v in environment(spec["services"][service]).items()
                  if k.startswith("AIRFLOW__") or k.startswith("SYNERGEN_GPU_")}
        if service == "airflow-gpu-worker":
            assert environment(spec["services"][service])["SYNERGEN__TRAIN__DEVICE"] == "cuda"
        missing = set(theirs) - set(ours)
        assert not missing, f"{service}: settings of compose.yaml the loopback setup lacks: {missing}"
        differ = {k for k in theirs if theirs[k] != ours[k]} - MACHINE - set(CHANGED)
        assert not differ, {k: (theirs[k], ours[k]) for k in differ}
        extra = {k for k in ours if k.startswith("AIRFLOW__") and k not in theirs} - LOOPBACK_ONLY
        assert not extra, f"loopback settings neither in compose.yaml nor listed here: {extra}"
    # the machine-specific ones differ in host, port, secret and path only
    compose_env = environment(spec["services"]["airflow-worker"])
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND",
                "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"):
        a, b = urlsplit(compose_env[key]), urlsplit(ours[key])
        assert (a.scheme, a.path) == (b.scheme, b.path), (key, compose_env[key], ours[key])


def test_same_airflow_commands_as_compose():
    spec = compose()
    ours = production.airflow_commands(8080)
    for name, service in SERVICES.items():
        assert command(spec["services"][service]) == ours[name], service
    init = " ".join(command(spec["services"]["airflow-init"]))
    assert "airflow db migrate" in init and 'airflow pools set gpu "${GPU_POOL_SLOTS}"' in init
    assert [c[:4] for c in production.INIT_COMMANDS] == [["airflow", "db", "migrate"],
                                                         ["airflow", "pools", "set", "gpu"]]
