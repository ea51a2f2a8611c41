"""bench/budget_burst.py's figures from many runs and bench/_hops.py's breakdown, on made-up
stamps: the median and spread the issue's target is judged by, and hops in the order they
happened (a change that moves work after the PATCH changes the order)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import _hops  # noqa: E402
import budget_burst  # noqa: E402


def _run(ratio: float, p99: float, inside: float) -> dict[str, Any]:
    return {"ratio_p99": ratio, "load": "1.00/1.00/1.00",
            "confguard": {"p50_ms": 1.0, "p99_ms": p99, "patched": 200, "status_429": 0,
                          "in_daemon_ms": {"p50": inside, "p99": inside * 2}},
            "minimal": {"p50_ms": 0.5, "p99_ms": p99 / ratio}}


def test_median_and_spread_of_the_runs() -> None:
    agg = budget_burst._aggregate([_run(r, 3.0, x) for r, x in
                                   ((1.2, 0.3), (2.0, 0.1), (1.4, 0.2), (9.0, 0.5), (1.3, 0.4))])
    assert agg["runs"] == 5
    assert agg["ratio_p99"] == {"median": 1.4, "min": 1.2, "max": 9.0,
                                "all": [1.2, 2.0, 1.4, 9.0, 1.3]}
    assert agg["in_daemon_p50_ms"] == 0.3
    assert agg["patched"] == [200] * 5 and agg["status_429"] == [0] * 5
    # An even count takes the mean of the middle two; missing values are skipped.
    assert budget_burst._med([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert budget_burst._med([]) is None


def test_hops_in_the_order_they_happened() -> None:
    rows: dict[str, dict[str, int]] = {}
    published: dict[str, int] = {}
    received: dict[str, int] = {}
    for i in range(5):
        cid = f"c{i}"
        t0 = 1_000_000 * i
        published[cid] = t0
        # every hop 10 us after the previous, except the log line written after the PATCH
        stamps = {h: t0 + 10_000 * (k + 1) for k, h in enumerate(
            h for h in _hops.HOPS if h != "logged")}
        stamps["logged"] = stamps["written"] + 5_000
        rows[cid] = stamps
        received[cid] = stamps["written"] + 100_000
    out = _hops.breakdown(rows, published, received)
    assert out["n"] == 5
    assert out["order"][-3:] == ["written", "logged", "sandbox"]
    assert out["hops_ms"]["written"]["p50"] == 0.01
    assert out["hops_ms"]["logged"]["p50"] == 0.005
    assert out["hops_ms"]["sandbox"]["p50"] == 0.095
    assert out["on_message_to_written_ms"]["p50"] == 0.09  # 9 hops of 10 us from on_message
    # A conversation missing a stamp (its PATCH never written) is left out, not guessed.
    del rows["c0"]["written"]
    assert _hops.breakdown(rows, published, received)["n"] == 4
    assert _hops.breakdown({}, published, received) == {"n": 0}
