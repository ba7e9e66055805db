# make demo / make test create .venv when missing and install the project (editable, with
# the dev extra) into it. Re-installs only when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKSPACE ?= churn-workspace

.PHONY: demo demo-server test test-fast bench lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/churn --workspace $(WORKSPACE) demo

# The same loop against `mlflow server` + the webhook receiver (docs/server-demo.md). The
# tracking store: a new database on the PostgreSQL server of CHURN_MLFLOW_BACKEND_URI (the
# machine's own by default); CHURN_MLFLOW_BACKEND_URI= (empty) uses a SQLite file in the
# workspace. DEMO_ARGS=--keep-running keeps the servers up until Ctrl-C.
CHURN_MLFLOW_BACKEND_URI ?= postgresql://postgres@127.0.0.1:5432/test

demo-server: $(STAMP)
	CHURN_MLFLOW_BACKEND_URI='$(CHURN_MLFLOW_BACKEND_URI)' $(BIN)/churn --workspace $(WORKSPACE) demo --server $(DEMO_ARGS)

# xdist workers: one more than the cores, since much of the suite waits on real servers and
# subprocesses (on 2 cores: 13 min 38 s with 3 workers vs 15 min 50 s with 2, bench/RESULTS.md)
TEST_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# everything but the tests marked slow (pytest markers: docs/development.md); its target is
# under 3 minutes on an idle 2-core machine (not yet measured idle). `make test` runs every test.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# Feast is a benchmark peer only: its own venv, never a dependency of the project.
FEAST_VENV := bench/.feast-venv
$(FEAST_VENV)/bin/python:
	$(PY) -m venv $(FEAST_VENV)
	$(FEAST_VENV)/bin/pip install --quiet 'feast==0.67.*' || \
		(rm -rf $(FEAST_VENV); echo "Feast 0.67 could not be installed: bench_features reports it")

bench: $(STAMP) $(FEAST_VENV)/bin/python
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(WORKSPACE) .pytest_cache
