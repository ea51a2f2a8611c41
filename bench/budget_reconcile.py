"""Request budget, reconciliation: the share it really uses, and how long a lost breaking
event on a conference stays unnoticed, at 1,000 and 5,000 live calls.

    .venv/bin/python bench/budget_reconcile.py [--calls 1000] [--conference-share 0.2]
                                               [--scale 100] [--minutes 40] [--lost 10]
                                               [--smoke] [--json]

Reconciliation works on minutes (a 300 s interval, a 60 s budget window), so this bench
runs the real code in COMPRESSED TIME: every duration is divided by `--scale` (100: a
60 s window lasts 0.6 s, the 300 s interval 3 s), and every figure is reported back in
scaled ("Genesys") seconds. What is compressed: the `Daemon`'s clock (the engine's event
times), the `Reconciler`'s clock, interval and idle wake-up, and the limiter's window
(`RequestLimiter(300, window=60/scale)`, 25% reconcile share, 20% reserve). What is not:
the sandbox (its own process, REST and WebSocket over 127.0.0.1, its budget off so the
limiter's own 300-a-window books are what counts), the daemon's stream, engine, rules and
enforcer. REST round trips (a few ms) are not scaled, which makes reads relatively 100x
slower than in real time: a conservative distortion.

Rules: the shipped `flagged-party` rule only (the other shipped rules act on time, which
is compressed too). Scenario: `--calls` live calls in one queue, `--conference-share` of them conferences
(customer, agent, external), the rest routed (customer, agent), all learnt by the daemon
from their events (no start-up resync); no other activity, so every call falls due each
interval (the worst case for reconciliation: nothing is fresh). After one interval of
warm-up, `--lost` times at random moments a conference's external party gets
`complianceFlag: "true"` and that one event is lost (sandbox fault `lose next 1`): only
reconciliation can find it. Unnoticed = flag set -> PATCH received by the sandbox.
Share = reconcile requests / (allowance x elapsed windows), and the gauge
`confguard_reconcile_budget_share` at each interval. `--smoke`: 100 calls, a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

QUEUE = "Customer Service"


def sandbox_process(conn: Connection) -> None:
    _common.run_quietly(_sandbox_main, conn)


async def _sandbox_main(conn: Connection) -> None:
    sb, queue, users = await _common.start_one_queue_sandbox(conn, seed=13, queue=QUEUE)
    w = sb.world
    loop = asyncio.get_running_loop()
    confs: list[tuple[str, str]] = []  # (conversation id, external id)
    lost: list[tuple[str, float]] = []  # (PATCH path, epoch when flagged)
    rng = random.Random(13)

    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        op = cmd["op"]
        if op == "setup":
            for i in range(cmd["calls"]):
                conv = w.start_call(queue, ani=f"tel:+1415555{i:04d}")
                w.connect_agent(conv.id, users[i % len(users)])
                if i < cmd["conferences"]:
                    confs.append((conv.id, w.add_external(conv.id, f"tel:+1212555{i:04d}").id))
            rng.shuffle(confs)
            conn.send(len(w.active_calls()))
        elif op == "lose_one":
            cid, ext = confs.pop()
            sb.faults.configure({"lose": {"next": 1}})
            w.set_attributes(cid, ext, {"complianceFlag": "true"})
            lost.append((f"/api/v2/conversations/calls/{cid}/participants/{ext}", time.time()))
            conn.send(True)
        elif op == "report":
            first: dict[str, float] = {}
            for r in sb.journal.requests:
                if r.method == "PATCH":
                    first.setdefault(r.path, r.time)
            gets = sum(1 for r in sb.journal.requests if r.method == "GET")
            conn.send({"unnoticed_real_s": [first[p] - t if p in first else None for p, t in lost],
                       "gets": gets})
        else:
            await sb.stop()
            conn.send(True)
            return


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from daemon.config import load_config
    from daemon.service.lifecycle import Daemon

    scale = float(args.scale)
    scaled = _common.scaled_clock(scale)
    interval, share, allowed = 300.0, 0.25, 300
    n_conf = round(args.calls * args.conference_share)
    results: dict[str, Any] = {"bench": "budget_reconcile", "calls": args.calls,
                               "conferences": n_conf, "scale": scale, "minutes": args.minutes,
                               "interval_s": interval, "reconcile_share": share,
                               "allowance_per_minute": allowed}
    rng = random.Random(args.seed)
    async with _common.SandboxProcess(sandbox_process) as remote:
        info = remote.info
        with _common.daemon_folder() as tmp:
            path = _common.config_for_sandbox(
                tmp, info, n_rules=1, queues=[QUEUE],
                overrides={"logging.level": "warning", "subscriptions.resync_on_start": False,
                           "subscriptions.reconcile_interval": 0,
                           "safety.max_disconnects_per_minute": 1_000_000})
            daemon = Daemon(load_config(path), config_path=path, clock=scaled)
            await daemon.start()
            stop = asyncio.Event()
            task: asyncio.Task[None] | None = None
            try:
                await remote.ask({"op": "setup", "calls": args.calls, "conferences": n_conf})
                results["tracked_by_daemon"] = await _common.wait_tracked(daemon, args.calls, 120)
                rec, limiter, task = _common.start_compressed_reconciler(
                    daemon, scaled, stop, scale=scale, interval=interval, share=share, allowed=allowed)
                shares: list[float] = []
                last_seen = rec.stats.share_used
                start_real = time.monotonic()
                run_real = args.minutes * 60.0 / scale
                warm_real = interval / scale
                lose_at = sorted(rng.uniform(warm_real, run_real * 0.8) for _ in range(args.lost))
                granted0, measure0 = 0, 0.0
                while time.monotonic() - start_real < run_real:
                    el = time.monotonic() - start_real
                    if lose_at and el >= lose_at[0]:
                        lose_at.pop(0)
                        await remote.ask({"op": "lose_one"})
                    if not measure0 and el >= warm_real:
                        measure0, granted0 = time.monotonic(), limiter.granted["tag:reconcile"]
                    if rec.stats.share_used != last_seen or (shares == [] and rec.stats.scans > 0
                                                             and rec.stats.share_used):
                        last_seen = rec.stats.share_used
                        shares.append(round(last_seen, 3))
                    await asyncio.sleep(0.01)
                windows = (time.monotonic() - measure0) * scale / 60.0
                results["reconcile_reads"] = limiter.granted["tag:reconcile"] - granted0
                results["share_used"] = round(results["reconcile_reads"] / (allowed * windows), 3)
                results["share_gauge_per_interval"] = shares
                results["reads_per_minute"] = round(results["reconcile_reads"] / windows, 1)
                results["stats"] = {"reads": rec.stats.reads, "errors": rec.stats.errors,
                                    "decisions": rec.stats.decisions}
                results["rate_limited_seen"] = dict(limiter.rate_limited_count)
            finally:
                await _common.end_task(stop, task)
                await daemon.stop()
        rep = await remote.ask({"op": "report"})
    un = [None if x is None else round(x * scale, 1) for x in rep["unnoticed_real_s"]]
    found = [x for x in un if x is not None]
    results["lost_events"] = len(un)
    results["lost_found"] = len(found)
    results["unnoticed_s"] = un
    results["unnoticed_p50_s"] = _common.pct(found, 0.5) if found else None
    results["unnoticed_max_s"] = max(found) if found else None
    results["conference_cycle_s"] = round(n_conf / (share * allowed) * 60.0, 1)
    results["load"] = _common.load()
    return results


def summary(r: dict[str, Any]) -> str:
    return "\n".join([
        f"reconcile: {r['calls']} live calls ({r['conferences']} conferences), interval "
        f"{r['interval_s']:.0f} s, share {r['reconcile_share']}, {r['allowance_per_minute']}/min, "
        f"time x{r['scale']} for {r['minutes']} scaled min, load {r['load']}",
        f"  share of the allowance used: {r['share_used']} ({r['reads_per_minute']} reads/min); "
        f"gauge per interval {r['share_gauge_per_interval']}",
        f"  lost breaking events found {r['lost_found']}/{r['lost_events']}: unnoticed p50 "
        f"{r['unnoticed_p50_s']} s, max {r['unnoticed_max_s']} s ({r['unnoticed_s']})",
        f"  conferences / (share x allowance) = {r['conference_cycle_s']} s per conference round"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--conference-share", type=float, default=0.2)
    ap.add_argument("--scale", type=float, default=100.0, help="time compression factor")
    ap.add_argument("--minutes", type=float, default=40.0, help="scaled minutes to run")
    ap.add_argument("--lost", type=int, default=10, help="lost breaking events to inject")
    ap.add_argument("--seed", type=int, default=7)
    _common.run_cli(ap, run, summary, smoke_help="100 calls, 8 scaled minutes",
                    smoke={"calls": 100, "minutes": 8.0, "lost": 1})


if __name__ == "__main__":
    main()
