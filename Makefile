# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit integration e2e services promtool browser clean

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

## promtool checks the alert rules (tests/unit/test_alert_rules.py). Debian's
## package ships it; its server is stopped again if the install started it.
promtool:
	command -v promtool >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus && \
	  (service prometheus stop >/dev/null 2>&1 || true))

## The browser test (tests/e2e/test_browser.py) drives Debian's Chromium with
## Playwright; nothing downloads a browser of its own.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

## Everything CI runs: services up, lint, types, then the three test levels.
test: install services promtool browser lint typecheck
	$(BIN)/pytest tests

unit: install
	$(BIN)/pytest tests/unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
