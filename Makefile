# Tessera: two commands on a fresh machine — `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tessera-installed
UV_VERSION := 0.13.9
export TESSERA_HOME ?= $(CURDIR)/var
export AIRFLOW_HOME ?= $(TESSERA_HOME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint mlflow-ui airflow-ui clean distclean lock

setup: $(STAMP)

# Re-runs only when the project's dependencies change. torch comes from pip first (the CPU build
# on this disk; a bare `torch` would pull a multi-GB CUDA build), then uv installs the locked rest.
$(STAMP): pyproject.toml constraints.txt excludes.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0" setuptools wheel "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt --excludes excludes.txt \
		--no-build-isolation-package deepspeed -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/tessera demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/tessera bench

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

mlflow-ui: $(STAMP)
	$(BIN)/tessera mlflow-server --foreground

airflow-ui: $(STAMP)
	$(BIN)/airflow standalone

clean:
	-$(BIN)/tessera mlflow-server --stop 2>/dev/null
	rm -rf var .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) *.egg-info

# Re-resolve the exact versions after editing pyproject.toml's dependencies (needs the network).
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --excludes excludes.txt \
		--no-build-isolation-package deepspeed --no-header --no-annotate -o constraints.txt
	sed -i 's/^torch==2.13.0+cpu$$/torch==2.13.0/' constraints.txt
