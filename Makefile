# Set-up is part of every target: a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3.12
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A native llama.cpp build picks CPU kernels (AMX) that crash on some hosts; portable kernels are safe.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install serve test lint typecheck bench bench-formats bench-faults bench-overhead

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/llama-gateway serve $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check gateway backends tests bench
	$(BIN)/ruff format --check gateway backends tests bench
	$(BIN)/mypy
	$(BIN)/pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway backends tests bench
	$(BIN)/ruff format --check gateway backends tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.streaming

bench-formats: $(STAMP)
	$(BIN)/python -m bench.compute_formats

bench-faults: $(STAMP)
	$(BIN)/python -m bench.faults $(ARGS)

bench-overhead: $(STAMP)
	@command -v wrk >/dev/null || apt-get install -y wrk || { echo "bench-overhead needs wrk (Debian: apt-get install wrk)"; exit 1; }
	$(BIN)/python -m bench.overhead $(ARGS)
