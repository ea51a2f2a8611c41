"""Request budget, resync: confguard starts into a busy queue with breakers already live.

    .venv/bin/python bench/budget_resync.py [--calls 600] [--conferences 120] [--flagged 5]
                                            [--budget 300] [--smoke] [--json]

The sandbox (its own process, `--budget` requests per token per 60 s window, counted as
Genesys does) holds `--calls` live calls in one queue, `--conferences` of them conferences
(customer, agent, external), the rest routed calls (customer, agent); on `--flagged`
conferences the customer already carries `complianceFlag: "true"`. Then the real `Daemon`
(shipped rules, default settings) starts: scope, channel, subscription, and the start-up
resync (analytics discovery, then one GET per live call, conferences first, at RESYNC
priority within what the window leaves above the removals' reserve).

Reported: seconds from `Daemon.start()` to each flagged customer's PATCH (sandbox receipt)
and to READY (`start()` returned), each PATCH relative to READY (negative: before it),
PATCHes to anybody else, requests and 429s. Target: all flagged removed within 30 s of
ready, nobody else touched, 0 x 429. `--smoke`: 30 calls, checks the script runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

QUEUE = "Customer Service"


def sandbox_process(conn: Connection, budget: int) -> None:
    _common.run_quietly(_sandbox_main, conn, budget)


async def _sandbox_main(conn: Connection, budget: int) -> None:
    sb, queue, users = await _common.start_one_queue_sandbox(conn, seed=12, agents=50,
                                                             request_budget=budget, queue=QUEUE)
    w = sb.world
    loop = asyncio.get_running_loop()
    flagged: list[str] = []  # PATCH paths that must come

    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        op = cmd["op"]
        if op == "setup":
            n, confs, nflag = cmd["calls"], cmd["conferences"], cmd["flagged"]
            step = max(1, confs // max(1, nflag))
            for i in range(n):
                conv = w.start_call(queue, ani=f"tel:+1415555{i:04d}", customer_name=f"Customer {i}")
                w.connect_agent(conv.id, users[i % len(users)])
                w.set_recording(conv.id, "active")  # the shipped rules want it (nobody else breaks one)
                if i < confs:
                    w.add_external(conv.id, f"tel:+1212555{i:04d}", name="Partner")
                    if i % step == 0 and len(flagged) < nflag:
                        cust = conv.participants[0].id
                        w.set_attributes(conv.id, cust, {"complianceFlag": "true"})
                        flagged.append(f"/api/v2/conversations/calls/{conv.id}/participants/{cust}")
            sb.journal.clear()
            conn.send(len(w.active_calls()))
        elif op == "wait":
            deadline = time.monotonic() + cmd["timeout"]
            while time.monotonic() < deadline:
                done = {r.path for r in sb.journal.requests if r.method == "PATCH" and r.status < 300}
                if all(p in done for p in flagged):
                    break
                await asyncio.sleep(0.1)
            conn.send(True)
        elif op == "report":
            patches = [r for r in sb.journal.requests if r.method == "PATCH"]
            first: dict[str, float] = {}
            for r in patches:
                first.setdefault(r.path, r.time)
            per = Counter(f"{r.method} {r.status}" for r in sb.journal.requests
                          if r.path.startswith("/api/v2/"))
            gets = [r.time for r in sb.journal.requests
                    if r.method == "GET" and r.path.startswith("/api/v2/conversations/calls/")]
            conn.send({"flagged_patch_at": [first.get(p) for p in flagged],
                       "other_patches": sorted({r.path for r in patches} - set(flagged)),
                       "requests": dict(per), "calls_read": len(gets),
                       "last_get_at": max(gets) if gets else None})
        else:
            await sb.stop()
            conn.send(True)
            return


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from daemon.config import load_config
    from daemon.service.lifecycle import Daemon

    results: dict[str, Any] = {"bench": "budget_resync", "calls": args.calls,
                               "conferences": args.conferences, "flagged": args.flagged,
                               "budget_per_minute": args.budget}
    async with _common.SandboxProcess(sandbox_process, args.budget, ask_timeout=900.0) as remote:
        info = remote.info
        results["live_calls"] = await remote.ask({"op": "setup", "calls": args.calls,
                                                  "conferences": args.conferences,
                                                  "flagged": args.flagged})
        with _common.daemon_folder() as tmp:
            path = _common.config_for_sandbox(tmp, info, n_rules=6, queues=[QUEUE],
                                              overrides={"logging.level": "warning"})
            daemon = Daemon(load_config(path), config_path=path)
            started = time.time()
            await daemon.start()
            ready = time.time()
            try:
                await remote.ask({"op": "wait", "timeout": 60.0})
                rep = await remote.ask({"op": "report"})
                assert daemon.client is not None
                snap = daemon.client.limiter.snapshot()
                results["rate_limited_seen"] = dict(snap.rate_limited)
                results["learnt_allowed"] = snap.allowed
                assert daemon.resyncer is not None and daemon.resyncer.last is not None
                results["startup_resync"] = {"calls": daemon.resyncer.last.calls,
                                             "conferences": daemon.resyncer.last.conferences,
                                             "seconds": round(daemon.resyncer.last.seconds, 1)}
            finally:
                await daemon.stop()
    at = rep["flagged_patch_at"]
    results["ready_after_start_s"] = round(ready - started, 1)
    results["removed"] = sum(1 for a in at if a is not None)
    results["patch_after_start_s"] = [None if a is None else round(a - started, 2) for a in at]
    results["patch_after_ready_s"] = [None if a is None else round(a - ready, 2) for a in at]
    results["others_touched"] = len(rep["other_patches"])
    results["requests"] = rep["requests"]
    results["status_429"] = sum(v for k, v in rep["requests"].items() if k.endswith(" 429"))
    results["calls_read"] = rep["calls_read"]
    results["load"] = _common.load()
    ok = (results["removed"] == args.flagged and results["others_touched"] == 0
          and results["status_429"] == 0
          and all(a is not None and a <= 30 for a in results["patch_after_ready_s"]))
    results["target"] = "all flagged removed within 30 s of ready, nobody else, 0 x 429"
    results["met"] = ok
    return results


def summary(r: dict[str, Any]) -> str:
    return "\n".join([
        f"resync: {r['calls']} live calls ({r['conferences']} conferences), {r['flagged']} flagged "
        f"at start, sandbox budget {r['budget_per_minute']}/min, load {r['load']}",
        f"  ready {r['ready_after_start_s']} s after start (startup resync {r['startup_resync']})",
        f"  flagged removed {r['removed']}/{r['flagged']}: PATCH after start {r['patch_after_start_s']} s, "
        f"after ready {r['patch_after_ready_s']} s",
        f"  others touched {r['others_touched']}, 429s {r['status_429']}, requests {r['requests']}",
        f"  target met: {r['met']}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=600)
    ap.add_argument("--conferences", type=int, default=120)
    ap.add_argument("--flagged", type=int, default=5)
    ap.add_argument("--budget", type=int, default=300)
    _common.run_cli(ap, run, summary, smoke_help="30 calls: check the script runs",
                    smoke={"calls": 30, "conferences": 6, "flagged": 2},
                    check=lambda a: None if 0 < a.flagged <= a.conferences <= a.calls
                    else "need 0 < --flagged <= --conferences <= --calls")


if __name__ == "__main__":
    main()
