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

clean:
	-$(VENV)/bin/txr local down
	rm -rf .txr
