# normserve: `make serve` serves the shipped models on :8000; `make test` runs the whole suite.
# Both create .venv on first use. torch (export extra) is pinned to 2.13.0; the runtime needs none.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: serve test lint format export verify clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[export,dev]"
	touch $@ $(VENV)/.runtime

serve: $(VENV)/.runtime
	$(BIN)/normserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-export the shipped weights into a new repository version.
export: $(VENV)/.dev
	$(BIN)/normserve export

# Check that the committed ONNX graphs are exactly the shipped weights, exported.
verify: $(VENV)/.dev
	$(BIN)/normserve export --verify

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
