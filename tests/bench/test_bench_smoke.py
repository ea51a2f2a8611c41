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


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="--pin needs Linux and two CPUs")
def test_burst_solo_runs_each_client_alone_pinned_and_takes_the_ratio_between_them() -> None:
    """`budget_burst.py --solo`: per round, confguard alone and the minimal client alone,
    each pinned to a CPU other than the sandbox's; the ratio is taken between the two."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "budget_burst.py"), "--smoke",
                           "--runs", "1", "--solo", "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(done.stdout.strip().splitlines()[-1])["variants"]["A"]["each"]
    assert run["solo"] is True
    assert run["pinned"]["sandbox"] != run["pinned"]["clients"]
    assert run["confguard"]["patched"] == run["minimal"]["patched"] == 10
    assert run["ratio_p99"] == round(run["confguard"]["p99_ms"] / run["minimal"]["p99_ms"], 2)
