# The two commands a user needs: `make run` and `make test`. Both set up first (idempotent).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test lint typecheck unit integration clean

setup: $(STAMP)
	@bash scripts/setup-system.sh

# The Python client is its own distribution (txclient/pyproject.toml): installed beside the
# project, editable, the way the project's workloads, scripts and tests use it.
$(STAMP): pyproject.toml txclient/pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e './txclient[otel]' -e '.[test,profile]'
	@touch $(STAMP)

run: setup
	$(VENV)/bin/txr local up --wan realistic

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest -q

# The pure tests alone (seconds, no servers: the contract tests against the fakes too), and the
# tests that start real PostgreSQL, Redis, etcd and local clusters (the contract tests against
# the real implementations, and the chaos scenarios: `-m "integration and not chaos"` to leave
# them out).
unit: setup
	$(VENV)/bin/pytest -q tests/unit
	$(VENV)/bin/pytest -q -m "not integration" tests/contracts

integration: setup
	$(VENV)/bin/pytest -q -m integration tests/integration tests/contracts

clean:
	-$(VENV)/bin/txr local down
	rm -rf .txr
