# Two commands matter: `make run` (the default pipeline) and `make test` (the suite CI runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The pipeline's default tracking store (the steps use the same default); MLFLOW_TRACKING_URI overrides.
TRACKING_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///mlflow.db)
PYTEST_ARGS ?=

.PHONY: setup java run serve test test-fast test-faults lint mlproject conda-env lock clean server server-stop server-status

setup: $(STAMP) java

# batch_score's Spark needs Java 17+: found, installed (root + apt-get), or named exactly (scripts/java.sh).
java:
	scripts/java.sh

# Idempotent: reruns only when a requirements file changed. torch==2.13.0 resolves to the local CPU wheel.
$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

run: setup
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI=$(TRACKING_URI) $(BIN)/mlflow run . -e main --env-manager local

# Serve a registered or logged model on 127.0.0.1 (README "Serve it"). SERVE_CONFIG: the model config
# as JSON (batching, batch_max_rows, batch_max_wait_ms, max_new_tokens_cap, max_prompt_tokens).
SERVE_MODEL ?= models:/e2e-extractor@champion
SERVE_PORT ?= 5001
SERVE_CONFIG ?=
serve: setup
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI=$(TRACKING_URI) \
	  $(if $(SERVE_CONFIG),MLFLOW_PYFUNC_INFERENCE_CONFIG='$(SERVE_CONFIG)') \
	  $(BIN)/mlflow models serve -m "$(SERVE_MODEL)" --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

# The suite: unit tests, every step on tiny models, and the slow end-to-end runs (`mlflow run`, Git,
# team server). The fault suite is separate (`make test-faults`); CI runs both.
test: setup
	$(BIN)/python -m pytest -m "not faults" $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not faults" $(PYTEST_ARGS)

# Faults, load and security (tests/faults/): kill -9, Hub 5xx, tracking server down, disk full,
# corrupted artifacts, a bounded load test, secret scans.
test-faults: setup
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check steps lora_pipeline build_tools tests bench data

# MLproject is rendered from the steps' Args dataclasses (each parameter declared once).
mlproject: setup
	$(BIN)/python -m build_tools.mlproject > MLproject

# conda.yaml is rendered from requirements.txt (one source of truth).
conda-env: setup
	$(BIN)/python -m build_tools.envfile > conda.yaml

# conda-lock needs conda channels; it cannot run on a machine without them (see README).
lock: setup
	$(BIN)/conda-lock lock -f conda.yaml -p linux-64 -p osx-arm64 --lockfile conda-lock.yml

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db .pytest_cache

# Team mode (see README): MLflow on 127.0.0.1 backed by PostgreSQL, proxied artifacts; state in .server/.
server: setup
	E2E_SERVER_VENV=$(abspath $(VENV)) scripts/server.sh start

server-stop:
	scripts/server.sh stop

server-status:
	scripts/server.sh status
