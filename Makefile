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
export TESSERA_HOME ?= $(CURDIR)/var
export AIRFLOW_HOME ?= $(TESSERA_HOME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint mlflow-ui airflow-ui clean distclean lock browser

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

# Headless Chromium + chromedriver (Debian packages) for the tests that look at pages in a browser.
browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then exit 0; fi; \
	command -v apt-get >/dev/null || { echo "need apt-get to install chromium + chromium-driver" \
		"($(CHROMIUM), $(CHROMEDRIVER)); install them some other way"; exit 1; }; \
	sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	echo "installing chromium + chromium-driver with apt-get"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver && \
	test -x $(CHROMEDRIVER)

demo: $(STAMP) $(WEB_STAMP)
	$(BIN)/tessera demo

test: $(STAMP) $(WEB_STAMP) browser lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/tessera bench

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

mlflow-ui: $(STAMP)
	$(BIN)/tessera mlflow-server --foreground

airflow-ui: $(STAMP) $(WEB_STAMP)
	$(BIN)/airflow standalone

clean:
	-$(BIN)/tessera mlflow-server --stop 2>/dev/null
	rm -rf var .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) *.egg-info node_modules

# Re-resolve the exact versions after editing pyproject.toml's dependencies (needs the network).
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --excludes excludes.txt \
		--no-build-isolation-package deepspeed --no-header --no-annotate -o constraints.txt
	sed -i 's/^torch==2.13.0+cpu$$/torch==2.13.0/' constraints.txt
