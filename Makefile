# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck contracts unit integration e2e cluster-test services promtool browser testhosts clean chaos security audit

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

## Debian's pgbouncer (the PgBouncer test in transaction mode), socat and
## iproute2 (test hosts in network namespaces for the cluster's partition
## test); a server the install starts is stopped again.
testhosts:
	command -v pgbouncer >/dev/null && command -v socat >/dev/null && command -v ip >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    pgbouncer socat iproute2 && (service pgbouncer stop >/dev/null 2>&1 || true))

## The browser test (tests/e2e/test_browser.py) drives Debian's Chromium with
## Playwright; nothing downloads a browser of its own.
browser:
	(command -v chromium >/dev/null && fc-list | grep -q "Noto Sans CJK") || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium fonts-dejavu-core fonts-noto-cjk fontconfig)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# No function of the product above complexity C (radon's grades: D is 21 and up).
	@complex="$$($(BIN)/radon cc -s -n D shared workers producers)"; \
	  if [ -n "$$complex" ]; then echo "$$complex"; echo "functions above complexity C"; exit 1; fi

typecheck: install
	$(BIN)/mypy

## Import contracts (import-linter, [tool.importlinter] in pyproject.toml):
## the shared layer imports neither side, the workers and the producers do not
## import each other, the domain and the message types import no I/O library,
## and the layers inside shared point down.
contracts: install
	$(BIN)/lint-imports --no-cache

## Static security checks: bandit over the project's code (findings are fixed
## or carry a `# nosec <rule> - <reason>`). `make audit` audits the dependencies.
security: install
	$(BIN)/bandit -q -c pyproject.toml -r shared workers producers

## pip-audit asks PyPI's vulnerability API about every installed package. A
## known vulnerability fails the build. Where the API cannot be reached (this
## project's CI reaches PyPI's package index but not its vulnerability data),
## the packages it could not look up are listed and a loud warning says that
## they were NOT audited: that is never reported as "no known vulnerabilities".
## AUDIT=strict fails on unaudited packages too; AUDIT=skip skips the audit.
AUDIT ?= report
audit: install
ifeq ($(AUDIT),skip)
	@echo "!!! pip-audit SKIPPED (AUDIT=skip): dependencies were NOT audited for known vulnerabilities !!!"
else
	@$(BIN)/pip-audit --progress-spinner off $(if $(filter strict,$(AUDIT)),--strict) > .audit.log 2>&1; \
	  status=$$?; cat .audit.log; \
	  unaudited=$$(grep -c "could not be audited" .audit.log); rm -f .audit.log; \
	  if [ $$status -ne 0 ]; then echo "!!! pip-audit FAILED: a known vulnerability, or (AUDIT=strict) unaudited packages"; exit 1; fi; \
	  if [ "$$unaudited" -gt 0 ]; then \
	    echo ""; \
	    echo "!!! WARNING: $$unaudited packages were NOT audited: PyPI's vulnerability API could not be reached."; \
	    echo "!!! No vulnerability was found, but none could be looked for in those packages."; \
	  fi
endif

## The seeded chaos run on private services (tests/chaos). CHAOS_SCALE=short|full,
## CHAOS_SEED=<n> replays a run; the report lands in benchmarks/out/chaos-<scale>.json.
CHAOS_SCALE ?= short
chaos: install
	mkdir -p benchmarks/out
	$(BIN)/python -m tests.chaos.run --scale $(CHAOS_SCALE) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED)) \
	  --json benchmarks/out/chaos-$(CHAOS_SCALE).json

## Everything CI runs: services up, lint, types, import contracts, security,
## then the test levels (the short chaos run is tests/chaos/test_chaos_short.py).
test: install services promtool browser testhosts lint typecheck contracts security audit
	$(BIN)/pytest tests

## A private 3-node RabbitMQ cluster with quorum queues, a leader killed
## twice mid-run, and a partitioned worker host (part of `make test` too).
cluster-test: install services testhosts
	$(BIN)/pytest tests/cluster

unit: install
	$(BIN)/pytest tests/unit

## The integration and end-to-end levels, on the real services.
integration: install services
	$(BIN)/pytest tests/integration

e2e: install services testhosts
	$(BIN)/pytest tests/e2e

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
