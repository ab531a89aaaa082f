# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit integration e2e services clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

## Run the main job end to end (embedded PostgreSQL/Redis and in-process
## broker unless ISSUANCE_*_URL point at real services).
demo: install
	$(BIN)/issuance demo

services:
	deploy/local/ensure-services.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

## Everything CI runs: services up, lint, types, then the three test levels.
test: install services lint typecheck
	$(BIN)/pytest tests

unit: install
	$(BIN)/pytest tests/unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
