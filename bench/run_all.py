"""Run the benchmarks and rewrite bench/RESULTS.md (`make bench` calls this).

    .venv/bin/python bench/run_all.py [--quick] [--only ingest,memory,receive,removal]
    .venv/bin/python bench/run_all.py --smoke [--only NAME,...]

Each benchmark runs as its own process (`bench/<name>.py ... --json`), one after the other,
so they never compete with each other for the machine's cores; the load average (which
other users of the machine cause) is recorded next to every figure. A section of the
existing RESULTS.md that starts with "## Chaos soak" (figures written by hand after
`make soak`) is kept as it is. `--quick` runs smaller sizes (a check of the scripts, not
figures). `--smoke` runs every registered benchmark at tiny sizes (seconds each), checks
that each exits 0 (and prints its JSON line, for those with `--json`), and writes nothing:
`make test` runs it through tests/bench/test_bench_smoke.py so that bench/ cannot rot.

To add a benchmark: write `bench/<name>.py` (argparse sizes, every loop bounded, exit 0 on
success; `--json` printing one JSON object as the last line if it reports figures), then
add one `Bench` to `BENCHMARKS` below with its smoke sizes. Give it `full` sizes, and a
section in `render()`, only if its figures belong in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402

RESULTS = HERE / "RESULTS.md"
PY = ".venv/bin/python"

@dataclass(frozen=True)
class Bench:
    """One benchmark script, `bench/<name>.py`, and the arguments of each mode.

    `full`/`quick`: the sizes for RESULTS.md figures (None: not part of RESULTS.md);
    `smoke`: tiny sizes for `--smoke` (`make test`), a few seconds at most; `json`: the
    script takes `--json` and prints one JSON object as its last line."""

    name: str
    smoke: tuple[str, ...]
    full: tuple[str, ...] | None = None
    quick: tuple[str, ...] | None = None
    json: bool = True


BENCHMARKS: tuple[Bench, ...] = (
    Bench("ingest", smoke=("--calls", "20", "--frames", "500", "--rounds", "1"),
          full=("--calls", "1000", "--frames", "40000", "--rounds", "5"),
          quick=("--calls", "200", "--frames", "5000", "--rounds", "1")),
    Bench("memory", smoke=("--calls", "100"),
          full=("--calls", "10000"), quick=("--calls", "1000")),
    Bench("receive", smoke=("--messages", "200", "--rounds", "1"),
          full=("--messages", "20000", "--rounds", "3"), quick=("--messages", "2000", "--rounds", "1")),
    Bench("removal", smoke=("--calls", "10", "--background", "5", "--breakers", "3", "--rate", "5"),
          full=("--calls", "1000", "--background", "500", "--breakers", "200", "--rate", "4"),
          quick=("--calls", "150", "--background", "50", "--breakers", "10", "--rate", "5")),
    Bench("control", smoke=("--removals", "3", "--calls", "10", "--seconds", "1", "--concurrency", "2")),
    # Request budget (issue 11); figures by hand in RESULTS.md "## Request budget".
    Bench("budget_burst", smoke=("--smoke",)),
    Bench("budget_resync", smoke=("--smoke",)),
    Bench("budget_reconcile", smoke=("--smoke",)),
    Bench("rest_roundtrip", smoke=("--smoke",)),  # why the burst's PATCH costs more (issue 11)
    # Start-up and gaps at scale (issue 18); figures by hand in RESULTS.md "## Request budget".
    Bench("startup_scale", smoke=("--smoke",)),
    # HA (issue 12); figures by hand in RESULTS.md "## High availability".
    Bench("takeover", smoke=("--runs", "1", "--renewals", "10", "--takeover-after", "1")),
    # EventBridge (issue 19); figures by hand in RESULTS.md "## Durable input with Amazon EventBridge".
    Bench("eventbridge_lost", smoke=("--smoke",)),
    # Older micro-benchmarks (human summary only, no --json; not in RESULTS.md).
    Bench("ingest_state", smoke=("--frames", "200", "--calls", "10", "--mem-calls", "20", "--repeat", "1"),
          json=False),
    Bench("rules_eval", smoke=("--rules", "5", "--changes", "200"), json=False),
    Bench("sandbox_capacity", smoke=("--calls", "10", "--rate", "50", "--seconds", "1"), json=False),
)
BY_NAME: dict[str, Bench] = {b.name: b for b in BENCHMARKS}
FIGURES = ",".join(b.name for b in BENCHMARKS if b.full is not None)
#: Seconds one benchmark may take in `--smoke` before it counts as failed (hung).
SMOKE_TIMEOUT = 180.0


def smoke_command(b: Bench) -> list[str]:
    """The argv of `b` at smoke sizes, run from the repository root."""
    return [sys.executable, str(HERE / f"{b.name}.py"), *b.smoke, *(("--json",) if b.json else ())]


def run_smoke(b: Bench) -> tuple[dict[str, Any] | None, float]:
    """Run `b` at smoke sizes; its JSON line (None without `--json`) and seconds taken.
    Raises SystemExit naming the benchmark when it fails, hangs or prints no JSON."""
    t = time.monotonic()
    try:
        out = subprocess.run(smoke_command(b), capture_output=True, text=True,
                             timeout=SMOKE_TIMEOUT, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench {b.name}: no result within {SMOKE_TIMEOUT:g} s at smoke sizes") from None
    took = time.monotonic() - t
    if out.returncode != 0:
        raise SystemExit(f"bench {b.name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    if not b.json:
        return None, took
    lines = out.stdout.strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise SystemExit(f"bench {b.name}: the last line of its output is not a JSON object:\n"
                         f"{out.stdout[-1000:]}")
    return data, took


def run_one(name: str, args: Sequence[str]) -> tuple[dict[str, Any], str, float]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args, "--json"]
    shown = " ".join([PY, f"bench/{name}.py", *args, "--json"])
    print(f"running: {shown}", flush=True)
    t = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=HERE.parent)
    took = time.monotonic() - t
    if out.returncode != 0:
        raise SystemExit(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), shown, took


def _ms(v: Any) -> str:
    return "-" if v is None or v != v else f"{v:,.1f}"


def render(results: dict[str, tuple[dict[str, Any], str, float]], keep: str) -> str:
    m = _common.machine()
    lines = [
        "# Benchmark results",
        "",
        f"Written by `bench/run_all.py` on {_common.now_utc()}.",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, Linux {m['kernel']}.",
        "The machine is shared with other engineers running test suites: the load average",
        "(1/5/15 min) is given next to each figure. Commands are run from the repository root.",
        "",
        "| # | figure | target | result | load |",
        "|---|---|---|---|---|",
    ]
    rows: list[str] = []
    details: list[str] = []
    if "ingest" in results:
        r, cmd, _ = results["ingest"]
        ok = "met" if r["events_per_s"] >= 20_000 else "MISSED"
        rows.append(f"| 1 | ingest: events/s through parse + state + {r['rules']} rules, one core | >= 20,000 | "
                    f"**{r['events_per_s']:,}** ({r['us_per_event']} us/event), {ok} | {', '.join(r['load'])} |")
        details += ["## 1. Ingest", "", f"    {cmd}", "",
                    f"{r['calls']} live 4-party conference calls, {r['frames']:,} whole-conversation frames "
                    f"(avg {r['avg_frame_bytes']:,} B, sandbox World serialisation), {r['rules']} rules "
                    f"(6 shipped + 44 variants), `Engine.feed` + `Engine.tick` every 1,000 frames, best of "
                    f"{r['rounds']}. Changes {r['changes']:,}, duplicates {r['duplicates']:,}, decisions "
                    f"{r['decisions']}, rejected {r['rejected']}.", ""]
    if "removal" in results:
        r, cmd, _ = results["removal"]
        c = r.get("confguard", {})
        ok = "met" if c.get("p99_ms") is not None and c["p99_ms"] < 10 else "MISSED"
        rows.append(f"| 2 | time to removal, confguard, p50 / p95 / p99 | p99 < 10 ms | "
                    f"**{_ms(c.get('p50_ms'))} / {_ms(c.get('p95_ms'))} / {_ms(c.get('p99_ms'))} ms**, {ok} | "
                    f"{c.get('load', '')} |")
        for name, label in (("poller_unlimited", "1 s poller, no budget"),
                            ("poller_budget_300", "1 s poller, 300 req/min")):
            x = r.get(name, {})
            rows.append(f"| 3 | time to removal, {label}, p50 / p95 / p99 | - | "
                        f"{_ms(x.get('p50_ms'))} / {_ms(x.get('p95_ms'))} / {_ms(x.get('p99_ms'))} ms; "
                        f"removed {x.get('removed')}/{x.get('breakers')} | {x.get('load', '')} |")
        details += ["## 2-3. Time to removal: confguard vs. the 1-second REST poller", "", f"    {cmd}", "",
                    f"Sandbox in a separate process; {r['calls']} live calls, {r['background_per_s']:.0f} "
                    f"background events/s, {r['breakers_per_phase']} breakers per phase injected one at a "
                    f"time ({r['breaker_rate_per_s']}/s), each on a different call. Time to removal = sandbox "
                    "publish of the breaking event -> sandbox receipt of the PATCH (both "
                    "`perf_counter_ns` in the sandbox process). Phases run one after the other on the "
                    "same sandbox and calls: confguard (its own OAuth client, budget 300/min), then the "
                    "poller (its own OAuth client) without a budget, then with 300/min.", "",
                    "| phase | removed | missed | p50 ms | p95 ms | p99 ms | max ms | API requests in the phase | load |",
                    "|---|---|---|---|---|---|---|---|---|"]
        for name in ("confguard", "poller_unlimited", "poller_budget_300"):
            x = r.get(name)
            if not x:
                continue
            reqs = "; ".join(f"{k}: " + ", ".join(f"{kk} {vv}" for kk, vv in v.items()) for k, v in x["requests"].items())
            details.append(f"| {name} | {x['removed']}/{x['breakers']} | {x['missed']} | {_ms(x['p50_ms'])} | "
                           f"{_ms(x['p95_ms'])} | {_ms(x['p99_ms'])} | {_ms(x['max_ms'])} | {reqs} | {x['load']} |")
        details.append("")
        if "in_daemon_ms" in c:
            d = c["in_daemon_ms"]
            details.append(f"confguard's own share (frame received -> PATCH about to be sent, from its audit "
                           f"records): p50 {d['p50']:.2f} ms, p95 {d['p95']:.2f} ms, p99 {d['p99']:.2f} ms, "
                           f"max {d['max']:.2f} ms; the rest is the sandbox's publish queue, the two sockets "
                           "and the HTTP client.")
        if "ratio_p50" in r:
            details.append(f"Ratio poller (no budget) / confguard: p50 x{r['ratio_p50']}, p99 x{r['ratio_p99']}.")
        for name in ("poller_unlimited", "poller_budget_300"):
            x = r.get(name)
            if x and "poller" in x:
                p = x["poller"]
                details.append(f"{name}: {p['gets']:,} GETs in the phase ({p['achieved_gets_per_s']} GET/s achieved "
                               f"of the {r['calls']:,}/s a 1 s poll of {r['calls']:,} calls needs; {p['late_rounds']} of "
                               f"{p['rounds']} rounds overran the second), statuses {p['statuses']}, paused "
                               f"{p['paused_s']} s on Retry-After.")
        details.append("")
    if "receive" in results:
        r, cmd, _ = results["receive"]
        rows.append(f"| 4 | receive + parse msg/s: genesys-notifications vs confguard StreamManager | - | "
                    f"{r['genesys_notifications_msgs_per_s']:,} vs **{r['confguard_msgs_per_s']:,}** "
                    f"(x{r['ratio']}); ceiling {r['ceiling_bare_websockets_recv_msgs_per_s']:,} | "
                    f"{', '.join(r['load'])} |")
        details += ["## 4. Receive throughput", "", f"    {cmd}", "",
                    f"{r['messages']:,} frames (avg {r['avg_frame_bytes']:,} B) queued at once by the sandbox "
                    "(separate process) to one socket per receiver; best of "
                    f"{r['rounds']} (all rounds: genesys-notifications {r['all_genesys_notifications']}, "
                    f"confguard {r['all_confguard']}). The ceiling is a bare `websockets` recv loop with no "
                    "parsing: a receiver at the ceiling is limited by the sender, not by itself.", "",
                    "How genesys-notifications 1.3 was run: `Channel(connectUri, topics)` accepts the sandbox's "
                    "`ws://127.0.0.1:PORT/channels/ID` URI unchanged (channel created and subscribed over REST "
                    "first). Its `Channel.__anext__` cannot run on Python 3.11 (it passes a bare `recv()` "
                    "coroutine to `asyncio.wait`, a TypeError since 3.11), so the bench uses a subclass whose "
                    "`__anext__` is the library's code verbatim except that call, wrapped in "
                    "`asyncio.ensure_future` (`bench/receive.py: py311_channel`). Its parsing is its own "
                    "(`ujson.loads` + `Channel.process` match).", ""]
    if "memory" in results:
        r, cmd, _ = results["memory"]
        ok = "met" if r["bytes_per_call"] < 10 * 1024 else "MISSED"
        rows.append(f"| 5 | memory: bytes per tracked call at {r['calls']:,} live calls | < 10 KB | "
                    f"**{r['bytes_per_call']:,} B**, {ok} | {r['load']} |")
        details += ["## 5. Memory", "", f"    {cmd}", "",
                    f"VmRSS of a fresh process before/after feeding {r['frames']:,} frames "
                    f"({r['calls']:,} live conference calls, {r['live_parties']:,} live parties) through "
                    f"`Engine.feed` with the 50-rule RuleEngine: {r['rss_before'] / 2**20:.1f} -> "
                    f"{r['rss_after'] / 2**20:.1f} MiB.", ""]
    return "\n".join(lines + rows + [""] + details) + ("\n" + keep if keep else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: check the scripts run")
    ap.add_argument("--smoke", action="store_true",
                    help="every registered benchmark at tiny sizes; checks they run, writes nothing")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated names (default: {FIGURES}; with --smoke, all of "
                         f"{','.join(BY_NAME)})")
    ap.add_argument("--out", default=str(RESULTS), help="where to write (default bench/RESULTS.md)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else None
    unknown = [n for n in names or () if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    if args.smoke:
        for b in (BY_NAME[n] for n in names) if names else BENCHMARKS:
            data, took = run_smoke(b)
            print(f"smoke {b.name}: ok in {took:.1f} s" + (f" {json.dumps(data)[:200]}" if data else ""),
                  flush=True)
        return
    results = {}
    for name in names or FIGURES.split(","):
        b = BY_NAME[name]
        sizes = b.quick if args.quick else b.full
        if sizes is None:
            raise SystemExit(f"{name} has no figures for RESULTS.md; run it alone or with --smoke")
        results[name] = run_one(name, sizes)
        print(json.dumps({k: v for k, v in results[name][0].items()
                          if k not in ("confguard", "poller_unlimited", "poller_budget_300")}), flush=True)
    out = Path(args.out)
    keep = ""
    if out.exists():
        text = out.read_text()
        i = text.find("## Chaos soak")
        if i >= 0:
            keep = text[i:]
    out.write_text(render(results, keep))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
