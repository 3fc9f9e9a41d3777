# The two commands of the README: `make run` (the main job on the embedded default) and `make test`.
# Each creates the virtual environment on first use. torch is named with its exact version in the
# install command: a bare range would let pip pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test test-fast test-heavy test-cluster test-production lock clean airflow mlflow recbole-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/synergen run

# Two pytest workers (pytest-xdist), a test module each at a time: on CI's 2 cores the suite waits on JVM,
# Airflow and subprocess starts often enough that a second worker cuts its time by about a fifth.
TEST_WORKERS ?= 2
# Modules in collection order, which tests/conftest.py sets to the longest first (xdist's default reorder,
# by test count, would start the one-test whole-DAG module last and leave a worker idle for minutes).
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup
	$(BIN)/python -m pytest $(XDIST) -m "not cluster and not production and not heavy"

# Real-data runs of minutes that CI's 20-minute budget leaves out (all of MovieLens' 4,000+ days in one
# sessionize run).
test-heavy: setup
	$(BIN)/python -m pytest -m heavy

# The whole DAG on a loopback Spark cluster (master + 2 workers) with an MLflow server on PostgreSQL
# (installed from Debian's package when missing), compared with the local run, and the sessionize and
# score jobs alone on such a cluster against their local runs: about 7 minutes more than CI's budget
# allows, so they run on their own (benchmarks/cluster_dag.py records the DAG's timings).
test-cluster: setup
	$(BIN)/python -m pytest -m cluster

# The loopback production setup (tests/production.py): PostgreSQL and Redis (Debian's packages, installed
# with apt-get when missing), Airflow's api-server, scheduler, dag-processor and triggerer, a default and
# a gpu Celery worker, Spark standalone and an MLflow server, all on 127.0.0.1, driven through Airflow's
# REST API: today's scheduled run, a three-day backfill, the same again with "reprocess completed", a
# failed task cleared after its input is fixed (README, "Production setup on one machine"). 1.5-2 hours
# on 2 cores (eight DAG runs of 12-14 minutes): not in CI. Writes benchmarks/results/production_*.png.
test-production: setup
	SYNERGEN_WRITE_SCREENSHOTS=1 $(BIN)/python -m pytest -m production -p no:cacheprovider -v

test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not heavy"

# The Airflow UI (api-server, scheduler, dag-processor, triggerer in one process) on 127.0.0.1:8080 with
# this repo's DAG unpaused and the main job's Airflow home and config: trigger and backfill from the UI.
# Login: admin, password in var/airflow/simple_auth_manager_passwords.json.generated. Stop with Ctrl-C.
# The generated default has logs only for its own days, so the scheduler does not start today's run on
# its own: `make airflow AIRFLOW_SCHEDULE=True` lets it (what a deployment on real daily logs does).
AIRFLOW_SCHEDULE ?= False
AIRFLOW_ENV := AIRFLOW_HOME=$(CURDIR)/var/airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=$(AIRFLOW_SCHEDULE) \
	AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False \
	AIRFLOW__CORE__PARALLELISM=4 AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=8080 \
	SYNERGEN_CONFIG=$(CURDIR)/var/synergen-run.yaml PATH=$(CURDIR)/$(BIN):$$PATH

airflow: setup
	$(AIRFLOW_ENV) $(BIN)/airflow db migrate > /dev/null
	-$(AIRFLOW_ENV) $(BIN)/airflow dags reserialize > /dev/null 2>&1
	-$(AIRFLOW_ENV) $(BIN)/airflow dags unpause synergen_daily > /dev/null 2>&1
	$(AIRFLOW_ENV) $(BIN)/airflow standalone

# The MLflow UI (runs, registry, aliases) on 127.0.0.1:5000 over the main job's store.
mlflow: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/var/mlflow.db --host 127.0.0.1 --port 5000

# RecBole 1.2.1 in its own environment, for benchmarks/epoch_speed.py only (its pins need numpy 1).
recbole-venv: .venv-recbole/.installed-stamp

.venv-recbole/.installed-stamp: benchmarks/recbole-requirements.txt
	$(PYTHON) -m venv .venv-recbole
	.venv-recbole/bin/pip install --quiet --disable-pip-version-check -r benchmarks/recbole-requirements.txt
	touch $@

# Refresh the lock file after changing dependencies in pyproject.toml.
lock: setup
	$(BIN)/pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf var .pytest_cache
