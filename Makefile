# Tessera: two commands on a fresh machine — `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tessera-installed
UV_VERSION := 0.13.9
# Data Docs' CSS/JS/fonts, pinned in package.json + package-lock.json (components/core/webassets.py)
WEB_STAMP := node_modules/.tessera-installed
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
PG_BIN := /usr/lib/postgresql/15/bin
SYSTEM_PACKAGES := chromium chromium-driver postgresql docker-compose
KFP_VENV := .venv-kfp
KFP_STAMP := $(KFP_VENV)/.tessera-installed
export TESSERA_HOME ?= $(CURDIR)/var
export AIRFLOW_HOME ?= $(TESSERA_HOME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint mlflow-ui airflow-ui clean distclean lock browser system kfp

setup: $(STAMP) $(WEB_STAMP)

# Re-runs only when the project's dependencies change. torch comes from pip first (the CPU build
# on this disk; a bare `torch` would pull a multi-GB CUDA build), then uv installs the locked rest.
$(STAMP): pyproject.toml constraints.txt excludes.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0" setuptools wheel "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt --excludes excludes.txt \
		--no-build-isolation-package deepspeed -e '.[dev]'
	touch $@

# The exact library versions Great Expectations' Data Docs load from CDNs, so the pages work offline.
$(WEB_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "need npm (Node.js) to install the Data Docs assets (package.json)"; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian packages the tests start for real: headless Chromium + chromedriver (pages in a browser),
# PostgreSQL (MLflow's SQL backend, an ephemeral cluster per test run) and docker-compose (checks
# infra/compose.yaml offline). Installed once with apt-get when one of them is missing.
SYSTEM_BINS := $(CHROMIUM) $(CHROMEDRIVER) $(PG_BIN)/initdb $(PG_BIN)/postgres /usr/bin/docker-compose
system:
	@missing=; for f in $(SYSTEM_BINS); do [ -x $$f ] || missing="$$missing $$f"; done; \
	[ -z "$$missing" ] && exit 0; \
	command -v apt-get >/dev/null || { echo "need apt-get to install $(SYSTEM_PACKAGES)" \
		"(missing:$$missing); install them some other way"; exit 1; }; \
	sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	echo "installing $(SYSTEM_PACKAGES) with apt-get (missing:$$missing)"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES) && \
	for f in $(SYSTEM_BINS); do [ -x $$f ] || { echo "still missing after apt-get: $$f"; exit 1; }; done

browser: system

# kfp pins kubernetes<31, the Airflow Kubernetes provider needs >=36: the Kubeflow twin of the DAG
# compiles in its own small environment (dags/kubeflow/requirements.txt, exact pins).
$(KFP_STAMP): dags/kubeflow/requirements.txt
	test -x $(KFP_VENV)/bin/python || $(PYTHON) -m venv $(KFP_VENV)
	$(KFP_VENV)/bin/pip install -q --disable-pip-version-check -r dags/kubeflow/requirements.txt
	touch $@

kfp: $(KFP_STAMP)

demo: $(STAMP) $(WEB_STAMP)
	$(BIN)/tessera demo

test: $(STAMP) $(WEB_STAMP) $(KFP_STAMP) system lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/tessera bench

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

mlflow-ui: $(STAMP)
	$(BIN)/tessera mlflow-server --foreground

airflow-ui: $(STAMP) $(WEB_STAMP)
	$(BIN)/tessera airflow-ui

clean:
	-$(BIN)/tessera mlflow-server --stop 2>/dev/null
	rm -rf var .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) $(KFP_VENV) *.egg-info node_modules

# Re-resolve the exact versions after editing pyproject.toml's dependencies (needs the network).
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --excludes excludes.txt \
		--no-build-isolation-package deepspeed --no-header --no-annotate -o constraints.txt
	sed -i 's/^torch==2.13.0+cpu$$/torch==2.13.0/' constraints.txt
