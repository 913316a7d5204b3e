# Developer and CI entry points. Everything runs from the project's own .venv, so a fresh clone
# needs only python3 and make: `make test` installs what it needs first.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install.stamp
# Not PGDATA: that is libpq's variable, and may point at a real cluster.
PG_DATADIR ?= .pgdata
PYTEST_ARGS ?=

.PHONY: install lint format test soak demo bench bench-full pg-start pg-stop pg-dsn clean

install: $(STAMP)

# The stamp makes `install` a no-op until pyproject.toml changes; re-running pip on every
# `make test` costs seconds and needs the package indexes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict bulkdedupe

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

# The randomized interleaving test (tests/test_interleave.py) for MINUTES minutes with fresh
# seeds; it prints each seed as it goes and the seed and steps of any failure. Replay one with
# BULKDEDUPE_SOAK_SEED=<seed> $(BIN)/pytest tests/test_interleave.py.
MINUTES ?= 10
soak: install
	BULKDEDUPE_SOAK_SECONDS=$$(( $(MINUTES) * 60 )) BULKDEDUPE_SOAK_FRESH_SEEDS=1 \
		$(BIN)/pytest tests/test_interleave.py -q -s --timeout=$$(( $(MINUTES) * 60 + 300 )) \
		$(PYTEST_ARGS)

demo: install
	PG_DATADIR=$(PG_DATADIR) bash benchmarks/demo.sh

bench: install
	$(BIN)/python -m benchmarks.run --quick

bench-full: install
	$(BIN)/python -m benchmarks.run --full

# A long-lived embedded server for the demo, benchmarks and manual poking; tests start their own.
pg-start: install
	$(BIN)/python -m benchmarks.pgserver start --datadir $(PG_DATADIR)

pg-stop: install
	$(BIN)/python -m benchmarks.pgserver stop --datadir $(PG_DATADIR)

pg-dsn: install
	@$(BIN)/python -m benchmarks.pgserver dsn --datadir $(PG_DATADIR)

# Stops the demo server before deleting its data directory, so no postgres is left orphaned.
clean:
	-test -x $(BIN)/python && test -d $(PG_DATADIR) && \
		$(BIN)/python -m benchmarks.pgserver stop --datadir $(PG_DATADIR)
	rm -rf $(VENV) $(PG_DATADIR) .mypy_cache .ruff_cache .pytest_cache build *.egg-info demo-plan.jsonl
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
