# genserve: one command each to set up, serve, test and benchmark. Each installs first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genserve-installed
CONFIG ?= configs/dev.yaml
PYTEST_ARGS ?=

.PHONY: setup serve test test-long bench bench-jobs bench-fairness bench-overload fuzz chaos constraints clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt -e ".[test]"
	touch $(STAMP)

# Ray 2.60 turns on token auth by default; a local dev cluster runs without it unless you set
# RAY_AUTH_MODE yourself (see README).
serve: setup
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/genserve serve $(CONFIG)

# Lint (ruff) and the layers' import contract (pyproject.toml [tool.importlinter]) first, then the
# suite; the 25 slowest tests are listed at the end of every run.
test: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

# The long runs kept outside the suite (pytest marker `long`): on a 2-core machine about 7 minutes.
test-long: setup
	$(BIN)/python -m pytest -m long --durations=10 $(PYTEST_ARGS)

bench: setup
	$(BIN)/genserve bench --config $(CONFIG)

bench-jobs: setup
	$(BIN)/genserve bench-jobs --config $(CONFIG)

# Fair queueing between two keys on the simulated H200 (docs/benchmarks.md#fair-between-keys): a quiet machine.
bench-fairness: setup
	$(BIN)/genserve bench-fairness --config $${FAIRNESS_CONFIG:-configs/sim-h200.yaml}

# Overload: C clients for D seconds against a running app (make serve first); see docs/operations.md.
bench-overload: setup
	$(BIN)/genserve bench-overload --url $(URL) --clients $${CLIENTS:-8,64} --duration $${DURATION:-30}

# Property-based fuzzing of every operation against a running app (make serve first), longer than
# the suite's in-process run (tests/unit/test_fuzz.py). Model-dependent limits are not in the
# static schema, so a schema-valid body may rightly get 422: positive_data_acceptance is skipped.
URL ?= http://127.0.0.1:8000
FUZZ_EXAMPLES ?= 200
fuzz: setup
	$(BIN)/schemathesis run $(URL)/openapi.json --checks all --exclude-checks positive_data_acceptance \
	  --max-examples $(FUZZ_EXAMPLES) --request-timeout 300 --workers 4

# Fault injection for durable jobs, longer than the suite's run (tests/unit/test_job_chaos.py): a
# stream of CHAOS_JOBS jobs while the store fails at random, redis-server is paused (Redis only),
# and the job runner is killed and redeployed; the last line is
# "chaos: submitted N succeeded N failed N lost N run-twice N stuck N" (see docs/operations.md).
CHAOS_JOBS ?= 500
STORE ?= redis
chaos: setup
	PYTHONPATH=$(CURDIR) $(BIN)/python -m tests.chaos --jobs $(CHAOS_JOBS) --store $(STORE)

constraints: setup
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -v '^genserve' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
