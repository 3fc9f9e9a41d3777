"""infra/compose.yaml, checked without a container engine: parsed with yaml and interpolated the way
``docker compose`` does (``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``; tests/compose_file.py)."""
import re
import subprocess
from urllib.parse import urlsplit

import pytest

from compose_file import (
    COMPOSE, INFRA, VAR, Missing, command, compose, environment, fake_secrets, raw, references, required_vars,
    strings,
)
from synergen_core.config import load_config

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|(^|_)KEY($|_)|ACCESS_KEY")


def urls(text: str) -> list:
    return [urlsplit(u) for u in re.findall(r"[a-z][a-z0-9+.]*://[^\s\"',}]+", text)]


def is_airflow(service: dict) -> bool:
    return "AIRFLOW__CORE__EXECUTOR" in environment(service)


@pytest.fixture(scope="module")
def spec() -> dict:
    return compose()


# ---- the file as a whole ------------------------------------------------------------------------


def test_compose_refuses_to_start_without_its_secrets():
    with pytest.raises(Missing):
        compose({})
    assert {"AIRFLOW_DB_PASSWORD", "REDIS_PASSWORD", "MLFLOW_DB_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY",
            "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_ADMIN_PASSWORD"} <= required_vars()


def test_every_host_the_configuration_names_is_a_service(spec):
    services = spec["services"]
    names = set(services)
    named = {}  # what names a host -> the host
    for sname, svc in services.items():
        for key, value in environment(svc).items():
            for u in urls(value):
                if u.scheme not in ("s3", "file"):
                    named[f"{sname}: {key}"] = u.hostname
        for arg in command(svc):
            for u in urls(arg):
                if u.scheme not in ("s3", "file"):
                    named[f"{sname}: {arg.split('=')[0]}"] = u.hostname
        for dep in svc.get("depends_on") or {}:
            named[f"{sname}: depends_on"] = dep
    unknown = {where: host for where, host in named.items() if host not in names}
    assert not unknown, f"hosts that are no service of infra/compose.yaml: {unknown}"

    # The ones the issue names, one by one (so that a rename cannot make the loop above vacuous).
    worker = environment(services["airflow-worker"])
    host = lambda value: urlsplit(value).hostname  # noqa: E731
    assert host(worker["SYNERGEN__SPARK__MASTER"]) == "spark-master"
    assert host(worker["SYNERGEN__MLFLOW__TRACKING_URI"]) == "mlflow"
    assert host(worker["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]) == "postgres"
    assert host(worker["AIRFLOW__CELERY__RESULT_BACKEND"]) == "postgres"
    assert host(worker["AIRFLOW__CELERY__BROKER_URL"]) == "redis"
    assert host(worker["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]) == "airflow-apiserver"
    mlflow_args = dict(a.split("=", 1) for a in command(services["mlflow"]) if a.startswith("--") and "=" in a)
    assert host(mlflow_args["--backend-store-uri"]) == "mlflow-db"
    assert mlflow_args["--artifacts-destination"].startswith("s3://")
    assert host(environment(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"]) == "minio"
    assert any("spark://spark-master:7077" in a for a in command(services["spark-worker"]))


def test_published_ports_are_bound_to_loopback_unless_configured(spec):
    published = []
    for name, svc in spec["services"].items():
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                published.append((name, port.get("host_ip"), port))
            else:
                parts = str(port).split(":")
                published.append((name, parts[0] if len(parts) == 3 else None, port))
    assert len(published) >= 5  # Airflow UI, MLflow, Spark master + UI, MinIO console, ...
    assert all(ip == "127.0.0.1" for _, ip, _ in published), published
    # ... and BIND_ADDRESS moves every one of them
    moved = compose({**fake_secrets(), "BIND_ADDRESS": "10.0.0.5"})
    assert all(str(p).startswith("10.0.0.5:") for svc in moved["services"].values() for p in svc.get("ports") or [])
    assert {"airflow-apiserver", "mlflow", "spark-master"} <= {name for name, _, _ in published}


def test_airflow_3_components_with_celery_and_postgres(spec):
    services = spec["services"]
    commands = {name: " ".join(command(s)) for name, s in services.items()}
    for component in ("api-server", "scheduler", "dag-processor", "triggerer", "celery worker"):
        assert any(f"airflow {component}" in c for c in commands.values()), component
    assert "airflow db migrate" in commands["airflow-init"]
    airflow = [s for s in services.values() if is_airflow(s)]
    assert len(airflow) >= 6
    for svc in airflow:
        env = environment(svc)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert services["postgres"]["image"].startswith("postgres:") and services["redis"]["image"].startswith("redis:")
    assert services["mlflow-db"]["image"].startswith("postgres:")
    assert "spark.deploy.master.Master" in commands["spark-master"]
    assert "spark.deploy.worker.Worker" in commands["spark-worker"]


def test_a_gpu_worker_takes_the_train_task(spec):
    services = spec["services"]
    gpu = [s for s in services.values() if "celery worker" in " ".join(command(s))
           and "gpu" in command(s)[command(s).index("--queues") + 1].split(",")]
    assert len(gpu) == 1
    devices = gpu[0]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert environment(gpu[0])["SYNERGEN__TRAIN__DEVICE"] == "cuda"
    # The CPU workers do not take the GPU queue; every Airflow component sends train to queue and pool gpu.
    cpu = command(services["airflow-worker"])
    assert "gpu" not in cpu[cpu.index("--queues") + 1].split(",")
    for svc in (s for s in services.values() if is_airflow(s)):
        env = environment(svc)
        assert env["SYNERGEN_GPU_QUEUE"] == "gpu" and env["SYNERGEN_GPU_POOL"] == "gpu"
    assert re.search(r"airflow pools set gpu ", " ".join(command(services["airflow-init"])))


def test_no_secret_is_written_in_the_file():
    # every reference to a secret variable is a required one: no default value to fall back on
    for m in references():
        if m.group(1) and SECRET_NAME.search(m.group(1)):
            assert m.group(2) in (":?", "?"), f"${{{m.group(1)}}} must be ${{{m.group(1)}:?...}}, not defaulted"
    for name, svc in raw()["services"].items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", value), f"{name}: {key} is not from the environment"
    # a password inside a URL (user:password@host) is one of the required variables
    secrets = set(fake_secrets().values())
    for name, svc in compose()["services"].items():
        for text in list(environment(svc).values()) + command(svc):
            for u in urls(text):
                assert u.password is None or u.password in secrets, f"{name}: a literal password in {text}"
    example = (INFRA / ".env.example").read_text()
    lines = dict(line.split("=", 1) for line in example.splitlines() if "=" in line and not line.startswith("#"))
    assert required_vars() <= lines.keys(), "infra/.env.example lists every required variable"
    assert all(v == "" for v in lines.values()), "infra/.env.example holds no values"


def test_env_file_is_ignored_by_git():
    out = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=INFRA.parent)
    if out.returncode == 128:
        pytest.skip("not a git checkout")
    assert out.returncode == 0


def test_every_synergen_variable_is_a_config_field(spec):
    """Loaded through the real config: an unknown key or a bad value would raise ConfigError."""
    seen = set()
    for name, svc in spec["services"].items():
        env = {k: v for k, v in environment(svc).items() if k.startswith("SYNERGEN__")}
        if not env:
            continue
        seen |= env.keys()
        cfg = load_config(environ=env)
        assert cfg.spark.master == "spark://spark-master:7077" and not cfg.spark.local_ip
        assert cfg.mlflow.tracking_uri == "http://mlflow:5000"
        assert cfg.spark.conf == {"spark.executor.memory": "2g"}
        # where tasks run, lake.root and the artifact root are volumes mounted in the container
        if "celery worker" in " ".join(command(svc)):
            mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes") or []}
            assert mounts.get(str(cfg.lake.root)) == "lake", name
            assert mounts.get(str(cfg.mlflow.artifact_root)) == "mlartifacts", name
    assert {"SYNERGEN__LAKE__ROOT", "SYNERGEN__SPARK__MASTER", "SYNERGEN__SPARK__LOCAL_IP",
            "SYNERGEN__MLFLOW__TRACKING_URI", "SYNERGEN__TRAIN__DEVICE"} <= seen
    # the Spark executors see the same lake at the same path; the MLflow server the same artifact folder
    assert "lake:/data/lake" in spec["services"]["spark-worker"]["volumes"]
    assert "mlartifacts:/data/mlartifacts" in spec["services"]["mlflow"]["volumes"]


def test_pointing_at_existing_spark_and_mlflow_is_configuration(spec):
    env = {**fake_secrets(), "SPARK_MASTER_URL": "spark://10.1.2.3:7077", "MLFLOW_TRACKING_URI": "http://ml:5000"}
    worker = environment(compose(env)["services"]["airflow-worker"])
    cfg = load_config(environ={k: v for k, v in worker.items() if k.startswith("SYNERGEN__")})
    assert cfg.spark.master == "spark://10.1.2.3:7077" and cfg.mlflow.tracking_uri == "http://ml:5000"


def test_one_image_built_from_the_project_with_the_locked_install(spec):
    images = {s.get("image") for s in spec["services"].values() if "build" in s}
    assert images == {"synergen:latest"}
    for name in ("airflow-scheduler", "airflow-worker", "airflow-gpu-worker", "mlflow", "spark-master", "spark-worker"):
        assert spec["services"][name]["image"] == "synergen:latest", name
    build = next(s["build"] for s in spec["services"].values() if "build" in s)
    dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == INFRA / "Dockerfile"
    text = dockerfile.read_text()
    assert "constraints" in text and 'TORCH_SPEC="torch==2.13.0"' in text and "openjdk-17" in text


def test_every_variable_reference_is_defaulted_or_required():
    """Compose substitutes every ``$NAME`` / ``${NAME}`` from the host's environment when it loads the file,
    and an unset one silently becomes "" (a warning at most). So each reference in the file has a default
    (``:-``/``-``) or stops compose when unset (``:?``/``?``); a variable meant for the container's shell
    (``$$HOSTNAME`` in a healthcheck) is escaped with ``$$``. Anything else left with a ``$`` is a reference
    compose rejects (``${NAME:default}``) or one this file's checks would not see resolved."""
    bare, malformed = [], []
    for text in strings(raw()):
        bare += [m.group(0) for m in VAR.finditer(text) if m.group(0) != "$$" and m.group(2) is None]
        if "$" in VAR.sub("", text):
            malformed.append(text)
    assert not bare, f"references without a default that are not required (unescaped container variables?): {bare}"
    assert not malformed, f"strings with a $ that is no compose reference: {malformed}"
    # what the tests above read is the file as compose runs it: every $ left is an escaped $$
    escaped = sum(text.count("$$") for text in strings(raw()))
    assert escaped > 0 and sum(text.count("$") for text in strings(compose())) == escaped
