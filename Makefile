# Both entry points create .venv when missing and install into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Runtime dependencies only: what `confguard demo` needs.
DEMO_STAMP := $(VENV)/.installed-demo
# The bench extras too, for the benchmarks' smoke run in `make test` (tests/bench).
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test typecheck lint soak bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The demo needs only the runtime dependencies (no mypy, SDK, hypothesis or pytest).
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	touch $(DEMO_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/confguard demo

# Lint, types, then the suite (which includes the soak, 60 s, and every benchmark at
# smoke sizes, tests/bench) on 2 pytest-xdist workers: most of the suite waits on sockets,
# subprocesses and timers, so two workers about halve its wall time on 2 cores (about 6 min
# of pytest, was 11). `loadgroup` hands out one test at a time (the `slow` ones first:
# tests/conftest.py); no test uses xdist_group (with pytest 9.2 and xdist 3.8 the mark has
# no effect: xdist sets Item._nodeid, which pytest 9 no longer reads).
test: $(BENCH_STAMP)
	$(BIN)/python -m ruff check daemon tests bench
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

typecheck: $(STAMP)
	$(BIN)/python -m mypy

lint: $(STAMP)
	$(BIN)/python -m ruff check daemon tests bench

soak: $(STAMP)
	CONFGUARD_SOAK_SECONDS=600 $(BIN)/python -m pytest -q -s tests/e2e/test_soak.py

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
