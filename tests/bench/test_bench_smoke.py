"""Every benchmark registered in bench/run_all.py runs at smoke sizes (seconds), so bench/
cannot rot unnoticed (bench/ingest_state.py once called an un-imported function and nobody
saw). Each runs as its own process, as `make bench` runs it; no figure is asserted: tiny
sizes say nothing about speed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import run_all  # noqa: E402

#: Benchmarks that need the `bench` extras (pip install -e '.[test,bench]'; `make test`
#: installs them), by the module they import.
NEEDS = {"receive": "genesys_notifications"}


def test_every_script_is_registered() -> None:
    """A new bench/<name>.py must be added to `run_all.BENCHMARKS` (with smoke sizes)."""
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.name.startswith("_")} - {"run_all"}
    helpers = {"poller"}  # run by removal.py (its phases 2 and 3), not on its own
    assert scripts - helpers == set(run_all.BY_NAME), "register it in bench/run_all.py BENCHMARKS"


@pytest.mark.parametrize("name", [b.name for b in run_all.BENCHMARKS])
def test_benchmark_runs_at_smoke_sizes(name: str) -> None:
    bench = run_all.BY_NAME[name]
    module = NEEDS.get(name)
    if module and importlib.util.find_spec(module) is None:
        hint = f"{name} needs {module}: .venv/bin/pip install -e '.[test,bench]' (make test does)"
        if os.environ.get("CI"):
            pytest.fail(hint + " -- required in CI", pytrace=False)
        pytest.skip(hint)
    try:
        data, took = run_all.run_smoke(bench)
    except SystemExit as exc:  # run_smoke's failure message names the benchmark and its stderr
        pytest.fail(str(exc))
    assert took < run_all.SMOKE_TIMEOUT
    if bench.json:
        assert data is not None and data.get("bench", name) == name, data
