# The two commands of the README: `make run` (the main job on the embedded default) and `make test`.
# Each creates the virtual environment on first use. torch is named with its exact version in the
# install command: a bare range would let pip pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test test-fast lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/synergen run

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# Refresh the lock file after changing dependencies in pyproject.toml.
lock: setup
	$(BIN)/pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf var .pytest_cache
