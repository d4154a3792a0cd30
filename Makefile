# normserve: `make serve` serves the shipped models on 127.0.0.1:8000; `make test` runs the whole suite.
# Both create .venv on first use. torch (export extra) is pinned to 2.13.0; the runtime needs none.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Empty by default: the server then binds what NORMSERVE_HOST / NORMSERVE_PORT (or .env) say, else
# 127.0.0.1:8000, as the README's settings table says. `make serve HOST=0.0.0.0 PORT=8080` overrides.
HOST ?=
PORT ?=
PYTEST_ARGS ?=

.PHONY: serve test browser wrk bench lint format export verify clean docker-test protos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[export,train,eval,dev,bench,tracing]"
	touch $@ $(VENV)/.runtime

serve: $(VENV)/.runtime
	$(BIN)/normserve serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

test: $(VENV)/.dev browser wrk
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's Chromium for the web UI test (Playwright drives it; no browser download of its own).
browser:
	bash scripts/install-browser.sh

# wrk, the load generator of `normserve bench` and of tests/bench (Debian package, once).
wrk:
	bash scripts/install-wrk.sh

# normserve against raw ORT and a naive FastAPI app, ~10 min; BENCH_ARGS=--quick for a smoke run.
# Writes runs/bench/<timestamp>/{bench.json,bench.png}. See docs/benchmarks.md.
BENCH_ARGS ?=
bench: $(VENV)/.dev wrk
	$(BIN)/normserve bench $(BENCH_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The gRPC messages: Triton's .proto files compiled into the descriptor set the server loads
# (tests/service/test_grpc_proto.py checks that it matches).
protos: $(VENV)/.dev
	$(BIN)/python -m grpc_tools.protoc -Iservice/protos --include_imports \
		--descriptor_set_out=service/protos/inference.binpb grpc_service.proto

# Re-export the shipped weights into a new repository version.
export: $(VENV)/.dev
	$(BIN)/normserve export

# Check that the committed ONNX graphs are exactly the shipped weights, exported.
verify: $(VENV)/.dev
	$(BIN)/normserve export --verify

# Build the image, run it with compose, call it with real images, tear down (needs Docker, or
# ../shared/tools/docker-engine.sh to start one). See scripts/docker-test.sh.
docker-test:
	bash scripts/docker-test.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
