"""Benchmarks 2 and 3: time to removal over the sandbox, confguard vs. a 1-second REST poller.

    .venv/bin/python bench/removal.py [--calls 1000] [--background 500] [--breakers 200]
                                      [--rate 4] [--json]

One run, one sandbox, one scenario:

- The sandbox (daemon.sandbox.Sandbox) runs in a SEPARATE process (multiprocessing), with a
  bench scenario that runs inside that process: `--calls` live conference calls in the
  queue "Customer Service" (customer, agent, external party, recording active; the ACD leg
  has transferred), `--background` events/s on them (participant-data updates, hold
  toggles, touches: nothing that breaks a rule), and rule breakers injected one at a time
  (`--rate` per second): participant data `complianceFlag: "true"` on a call's external
  party, which the shipped `flagged-party` rule must remove. Each breaker is a different
  call.
- Time to removal = the sandbox's perf_counter_ns when it published the event that makes
  the rule true -> its perf_counter_ns when the PATCH for that party arrived (both from the
  sandbox journal, same process, same clock).
- Phase 1, confguard: the real `Daemon` in THIS process (50 rules: the shipped six + 44
  variants), started before the calls exist; the sandbox's per-token budget is 300
  requests/min, as Genesys'.
- The daemon is stopped; phase 2, bench/poller.py (its own OAuth client, added with the
  sandbox's add_client): GET every call once a second, PATCH when the rule holds; request
  budget off (unconstrained).
- Phase 3, the same poller with the sandbox's 300/min budget.

Per phase: p50/p95/p99/max time to removal, breakers removed / missed (not removed within
the phase's settle time), and the API requests each client spent during the phase (from
the sandbox journal, by client id: GETs, PATCHes, 429s). Target (confguard): p99 < 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from poller import Poller  # noqa: E402

# ----------------------------------------------------------------------------- sandbox side


def sandbox_process(conn: Connection, seed: int) -> None:
    """Entry point of the sandbox process: serve, and run the bench scenario on command."""
    _common.run_quietly(_sandbox_main, conn, seed)


@dataclass
class _Bench:
    """The sandbox side of the benchmark: the org, its calls and the commands it obeys."""

    sb: Any
    rng: random.Random
    queue: str
    users: list[str]
    poller: Any
    calls: list[tuple[str, str]] = field(default_factory=list)  # (conversation id, external party id)
    fresh: list[int] = field(default_factory=list)
    bg_count: int = 0

    @property
    def w(self) -> Any:
        return self.sb.world

    def setup(self, n_calls: int) -> list[str]:
        """`n_calls` live conference calls (customer, agent, external party, recording)."""
        w = self.w
        for i in range(n_calls):
            conv = w.start_call(self.queue, ani=f"tel:+1415555{i:04d}", customer_name=f"Customer {i}")
            w.connect_agent(conv.id, self.users[i % len(self.users)])
            w.set_recording(conv.id, "active")
            ext = w.add_external(conv.id, f"tel:+1212555{i:04d}", name="Partner")
            self.calls.append((conv.id, ext.id))
        self.fresh[:] = list(range(len(self.calls)))
        self.rng.shuffle(self.fresh)
        return [c for c, _ in self.calls]

    async def background(self, rate: float) -> None:
        """Background events at `rate` per second on random calls, until cancelled."""
        tick = 0.02
        per_tick = rate * tick
        acc = 0.0
        next_t = time.monotonic()
        while True:
            next_t += tick
            acc += per_tick
            while acc >= 1.0:
                acc -= 1.0
                cid, ext = self.calls[self.rng.randrange(len(self.calls))]
                conv = self.w.get_call(cid)
                p = self.rng.choice(conv.participants)
                roll = self.rng.random()
                try:
                    if roll < 0.6:
                        self.w.set_attributes(cid, p.id, {"crm.step": str(self.bg_count),
                                                     "ivr.intent": self.rng.choice(("billing", "sales"))})
                    elif roll < 0.8 and p.live:
                        self.w.set_party_state(cid, p.id, held=not p.held)
                    else:
                        self.w.touch(cid)
                except Exception:  # a call that ended under us: skip the event
                    continue
                self.bg_count += 1
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    async def phase(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Inject `cmd["breakers"]` breaking events at `cmd["rate"]`/s; the time to each PATCH."""
        seq0 = self.sb.journal._req_seq
        bg0 = self.bg_count
        t0 = time.monotonic()
        breakers: list[tuple[str, str, int]] = []
        for _ in range(cmd["breakers"]):
            cid, ext = self.calls[self.fresh.pop()]
            self.w.set_attributes(cid, ext, {"complianceFlag": "true"})
            ev = self.sb.journal.events[-1]
            assert ev.conversation_id == cid
            breakers.append((cid, ext, ev.perf_ns))
            await asyncio.sleep(1.0 / cmd["rate"])
        inject_s = time.monotonic() - t0
        deadline = time.monotonic() + cmd["settle"]
        while time.monotonic() < deadline:
            if all(not self.w.get_call(c).party(p).live for c, p, _ in breakers):
                break
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
        reqs = [r for r in self.sb.journal.requests if r.seq > seq0]
        first_patch: dict[str, tuple[int, str | None, int]] = {}
        per_client: dict[str, Counter[str]] = {}
        for r in reqs:
            c = per_client.setdefault(r.client_id or "-", Counter())
            c["total"] += 1
            c[r.method] += 1
            if r.status == 429:
                c["429"] += 1
            elif r.status >= 400:
                c["4xx/5xx"] += 1
            if r.method == "PATCH" and "/participants/" in r.path and r.path not in first_patch:
                first_patch[r.path] = (r.perf_ns, r.client_id, r.status)
        lat: list[float] = []
        missed = 0
        dup = Counter(r.path for r in reqs if r.method == "PATCH" and r.status < 300)
        for cid, pid, ev_ns in breakers:
            path = f"/api/v2/conversations/calls/{cid}/participants/{pid}"
            fp = first_patch.get(path)
            if fp is None or self.w.get_call(cid).party(pid).live:
                missed += 1
                continue
            lat.append((fp[0] - ev_ns) / 1e6)
        names = {self.sb.client_id: "confguard", self.poller.id: "poller"}
        return {
            "breakers": len(breakers), "removed": len(lat), "missed": missed,
            "p50_ms": _common.pct(lat, 0.50), "p95_ms": _common.pct(lat, 0.95),
            "p99_ms": _common.pct(lat, 0.99), "max_ms": max(lat) if lat else None,
            "mean_ms": sum(lat) / len(lat) if lat else None,
            "requests": {names.get(k, k): dict(v) for k, v in per_client.items()},
            "duplicate_2xx_patches": sum(1 for n in dup.values() if n > 1),
            "phase_seconds": round(elapsed, 1), "inject_seconds": round(inject_s, 1),
            "background_events": self.bg_count - bg0,
            "background_rate": round((self.bg_count - bg0) / elapsed, 1),
            "budget_per_minute": cmd["budget"], "load": _common.load(), "latencies_ms": lat,
        }


async def _sandbox_main(conn: Connection, seed: int) -> None:
    from daemon.sandbox import Sandbox

    sb = Sandbox(heartbeat_interval=30.0, request_budget=300, seed=seed)
    await sb.start()
    w = sb.world
    queue = w.create_queue("Customer Service").id
    w.create_queue("Payments", _common.PAYMENTS_QUEUE)
    users = [w.create_user(f"Agent {i}").id for i in range(100)]
    poller = w.add_client()
    conn.send(_common.sandbox_hello(sb, poller_id=poller.id, poller_secret=poller.secret))
    loop = asyncio.get_running_loop()
    bench = _Bench(sb, random.Random(seed), queue, users, poller)
    bg: asyncio.Task[None] | None = None
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        op = cmd["op"]
        if op == "setup":
            conn.send(bench.setup(cmd["calls"]))
        elif op == "budget":
            sb.faults.budget_per_minute = cmd["budget"]
            sb.faults._windows.clear()
            conn.send(True)
        elif op == "background":
            bg = asyncio.create_task(bench.background(cmd["rate"]))
            conn.send(True)
        elif op == "phase":
            conn.send(await bench.phase(cmd))
        else:
            if bg is not None:
                bg.cancel()
            await sb.stop()
            conn.send(True)
            return


# ----------------------------------------------------------------------------- bench side


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from daemon.config import load_config
    from daemon.service.lifecycle import Daemon

    results: dict[str, Any] = {"bench": "removal", "calls": args.calls, "background_per_s": args.background,
                               "breakers_per_phase": args.breakers, "breaker_rate_per_s": args.rate}
    async with _common.SandboxProcess(sandbox_process, args.seed, join_timeout=10.0) as remote:
        info = remote.info
        with _common.daemon_folder() as tmp:
            path = _common.config_for_sandbox(
                tmp, info, n_rules=50, queues=["Customer Service"],
                overrides={"safety.max_disconnects_per_minute": 1_000_000, "logging.level": "warning"})
            cfg = load_config(path)
            results["rules"] = len(cfg.rules)
            daemon = Daemon(cfg, config_path=path)
            await daemon.start()
            try:
                ids: list[str] = await remote.ask({"op": "setup", "calls": args.calls})
                results["tracked_by_daemon"] = await _common.wait_tracked(daemon, args.calls, 60)
                await remote.ask({"op": "background", "rate": args.background})
                await asyncio.sleep(2.0)
                results["confguard"] = await remote.ask({"op": "phase", "breakers": args.breakers,
                                                         "rate": args.rate, "settle": 10.0, "budget": 300})
            finally:
                await daemon.stop()
            # The daemon's own share: frame received -> PATCH about to be sent (audit records).
            inside = _common.in_daemon_ms(tmp / "audit.jsonl", (0.5, 0.95, 0.99))
            if "confguard" in results and inside:
                results["confguard"]["in_daemon_ms"] = inside
            phases = () if args.skip_poller else (("poller_unlimited", None, 15.0), ("poller_budget_300", 300, 30.0))
            for name, budget, settle in phases:
                await remote.ask({"op": "budget", "budget": budget})
                stop = asyncio.Event()
                poller = Poller(info["base"], info["poller_id"], info["poller_secret"], lambda: ids,
                                interval=1.0, concurrency=args.concurrency)
                task = asyncio.create_task(poller.run(stop))
                await asyncio.sleep(3.0)  # first rounds under way before breakers come
                r = await remote.ask({"op": "phase", "breakers": args.breakers, "rate": args.rate,
                                      "settle": settle, "budget": budget})
                stop.set()
                stats = await asyncio.wait_for(task, 60.0)
                r["poller"] = stats.as_dict()
                r["poller"]["achieved_gets_per_s"] = round(stats.gets / max(1e-9, r["phase_seconds"] + 3.0), 1)
                results[name] = r
    c, u = results.get("confguard"), results.get("poller_unlimited")
    if c and u and c.get("p50_ms") and u.get("p50_ms"):
        results["ratio_p50"] = round(u["p50_ms"] / c["p50_ms"], 1)
        results["ratio_p99"] = round(u["p99_ms"] / c["p99_ms"], 1)
    results["target"] = "confguard p99 < 10 ms"
    return results


def summary(r: dict[str, Any]) -> str:
    lines = [f"time to removal, {r['calls']} live calls, {r['background_per_s']} background events/s, "
             f"{r['breakers_per_phase']} breakers per phase at {r['breaker_rate_per_s']}/s:"]
    for name in ("confguard", "poller_unlimited", "poller_budget_300"):
        x = r.get(name)
        if not x:
            continue
        lines.append(f"  {name:<18} removed {x['removed']}/{x['breakers']} missed {x['missed']}  "
                     f"p50 {_common.fmt(x['p50_ms'], 2)} p95 {_common.fmt(x['p95_ms'], 2)} p99 {_common.fmt(x['p99_ms'], 2)} "
                     f"max {_common.fmt(x['max_ms'], 2)} ms  "
                     f"requests {x['requests']}  load {x['load']}"
                     + (f"\n{'':<20}poller: {x['poller']}" if "poller" in x else "")
                     + (f"\n{'':<20}in daemon (frame received -> PATCH sent): {x['in_daemon_ms']}"
                        if "in_daemon_ms" in x else ""))
    if "ratio_p50" in r:
        lines.append(f"  poller/confguard: p50 x{r['ratio_p50']}, p99 x{r['ratio_p99']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--background", type=float, default=500.0)
    ap.add_argument("--breakers", type=int, default=200)
    ap.add_argument("--rate", type=float, default=4.0, help="breakers per second")
    ap.add_argument("--concurrency", type=int, default=64, help="poller's connections")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--skip-poller", action="store_true", help="phase 1 (confguard) only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.breakers * 3 > args.calls:
        ap.error("--breakers x 3 phases must not exceed --calls (each breaker is a different call)")
    r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(r))
    else:
        print(summary(r))


if __name__ == "__main__":
    main()
