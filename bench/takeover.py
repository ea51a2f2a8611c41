"""HA take-over time and the cost of a lease renewal (issue 12, "Done when").

    .venv/bin/python bench/takeover.py [--runs 10] [--takeover-after 5] [--renewals 1000] [--json]

- A real PostgreSQL server is started from the installed binaries in a temporary folder on
  127.0.0.1 (tests/_postgres.py; as the `postgres` user when run as root) and the sandbox
  runs in THIS process; two daemons (`python -m daemon run`, `ha.backend: postgres`, one
  OAuth client each) are child processes contending for one lease.
- One run: the leader is SIGKILLed (`--freeze`: SIGSTOPped) at a random moment and, at the
  same instant, a party is flagged (the only daemon that can act on it is the standby). Take-over time = SIGKILL -> the sandbox
  journal's arrival time of the new leader's PATCH for that party (both clocks in this
  process). The killed daemon is started again (it comes back as standby) and the next run
  kills the other one. Median and worst over `--runs`.
- Renewal cost: one `HaNode` holding a lease renews `--renewals` times back to back against
  the same server (the single UPDATE a leader sends every takeover_after / 3); p50 / p99 /
  max round trip in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import _common  # noqa: E402
from _daemon_harness import DaemonProcess  # noqa: E402
from _ha_harness import flag, flagged_call, ha_daemon, new_lease, ok_patches, wait_ops, wait_role, wait_until  # noqa: E402
from _postgres import PostgresServer, find_bin_dir  # noqa: E402

from daemon.core.lease import LeasePolicy  # noqa: E402
from daemon.sandbox import Sandbox  # noqa: E402
from daemon.service.ha import HaNode  # noqa: E402


async def _start(d: DaemonProcess, role: str) -> None:
    await d.start()
    await wait_ops(d, 60)
    await d.wait_http("/readyz", 200, 60)
    await wait_role(d, role, 60)


async def takeovers(pg: PostgresServer, runs: int, takeover_after: float, folder: Path, *,
                    freeze: bool = False) -> list[float]:
    sb = Sandbox(heartbeat_interval=1.0, closing_grace=0.5, seed=7)
    await sb.start()
    lease = new_lease()
    agent = sb.world.create_user("Agent").id
    nodes = {"host-a": folder / "a", "host-b": folder / "b"}
    procs: dict[str, DaemonProcess] = {}
    out: list[float] = []
    rng = random.Random(12)
    try:
        procs["host-a"] = ha_daemon(sb, pg, nodes["host-a"], "host-a", lease, takeover=takeover_after)
        await _start(procs["host-a"], "leader")
        procs["host-b"] = ha_daemon(sb, pg, nodes["host-b"], "host-b", lease, takeover=takeover_after)
        await _start(procs["host-b"], "standby")
        leader, standby = "host-a", "host-b"
        for i in range(runs):
            conv, cust = flagged_call(sb, agent)
            # Both daemons hold the call; a random moment, so the kill does not fall at the
            # same phase of the standby's poll (every min(1 s, takeover_after / 4)) each run.
            await asyncio.sleep(0.3 + rng.random())
            killed_at = time.time()
            procs[leader].send(signal.SIGSTOP if freeze else signal.SIGKILL)
            flag(sb, conv, cust)
            await wait_until(lambda conv=conv, cust=cust: ok_patches(sb, conv, cust), takeover_after + 30, "the new leader's removal")
            took = ok_patches(sb, conv, cust)[0].time - killed_at
            out.append(took)
            print(f"run {i + 1}: {'SIGSTOP' if freeze else 'SIGKILL'} {leader} -> removal by {standby}: "
                  f"{took:.3f} s", file=sys.stderr, flush=True)
            if freeze:
                procs[leader].send(signal.SIGKILL)  # a frozen process takes SIGKILL too
            await procs[leader].wait_exit(10)
            await procs[leader].close()
            procs[leader] = ha_daemon(sb, pg, nodes[leader], leader, lease, takeover=takeover_after)
            await _start(procs[leader], "standby")
            leader, standby = standby, leader
    finally:
        for d in procs.values():
            await d.close()
        await sb.stop()
    return out


async def renewals(pg: PostgresServer, count: int, takeover_after: float) -> list[float]:
    node = HaNode(pg.dsn, lease=new_lease(), node="bench", policy=LeasePolicy(takeover_after))
    await node.attempt()
    assert node.may_send(), "the bench node did not get the lease"
    out = []
    for _ in range(count):
        t = time.perf_counter()
        await node.attempt()
        out.append((time.perf_counter() - t) * 1000)
    assert node.renewals["ok"] == count, node.renewals
    await node.release()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--takeover-after", type=float, default=5.0)
    ap.add_argument("--renewals", type=int, default=1000)
    ap.add_argument("--freeze", action="store_true",
                    help="SIGSTOP the leader instead of SIGKILL (its session stays open: the standby "
                         "waits for the lease to expire)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bin_dir = find_bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) are not installed (apt-get install postgresql-15)"
        if args.json and not os.environ.get("CI"):  # as the HA tests do: skip, and say so
            print(json.dumps({"bench": "takeover", "skipped": reason}))
            return
        raise SystemExit(reason)
    pg = PostgresServer(bin_dir)
    load_before = _common.load()
    try:
        pg.init()
        pg.start()
        renew = await renewals(pg, args.renewals, args.takeover_after)
        with tempfile.TemporaryDirectory(prefix="confguard-takeover-") as tmp:
            took = await takeovers(pg, args.runs, args.takeover_after, Path(tmp), freeze=args.freeze)
    finally:
        pg.cleanup()
    result: dict[str, Any] = {
        "bench": "takeover", "machine": _common.machine(), "date": _common.now_utc(), "load_before": load_before,
        "load_after": _common.load(), "takeover_after": args.takeover_after, "runs": len(took),
        "signal": "SIGSTOP" if args.freeze else "SIGKILL",
        "takeover_s": took, "takeover_median_s": statistics.median(took), "takeover_worst_s": max(took),
        "renewals": len(renew), "renew_p50_ms": _common.pct(renew, 0.5),
        "renew_p99_ms": _common.pct(renew, 0.99), "renew_max_ms": max(renew),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"take-over ({result['signal']} -> first removal by the new leader), takeover_after {args.takeover_after:g} s, "
          f"{len(took)} runs: median {result['takeover_median_s']:.3f} s, worst {result['takeover_worst_s']:.3f} s")
    print(f"renewal round trip over {len(renew)}: p50 {result['renew_p50_ms']:.3f} ms, "
          f"p99 {result['renew_p99_ms']:.3f} ms, max {result['renew_max_ms']:.3f} ms")
    print(f"load {load_before} -> {result['load_after']}")


if __name__ == "__main__":
    asyncio.run(main())
