"""The control API: time from `POST /v1/ejections` to the PATCH at the sandbox, and
`GET /v1/calls/{id}` requests per second with 1,000 live calls.

    .venv/bin/python bench/control.py [--removals 200] [--calls 1000] [--seconds 10]
                                      [--concurrency 16] [--json]

- The sandbox runs in THIS process; the daemon is `python -m daemon run` as a child
  process (its own event loop and interpreter, logging at warning), subscribed to the
  sandbox's queue, no rules (every PATCH is an API removal), safety valve and per-caller
  limit out of the way.
- Phase 1: `--removals` live calls (customer, agent, external party), all held by the
  daemon; then, ONE AT A TIME, `POST /v1/ejections {conversationId, participantId}`.
  POST -> PATCH = perf_counter_ns just before the POST is written (this process) -> the
  sandbox journal's perf_counter_ns when the PATCH arrived (this process too: same clock).
  Also the 202's own round trip.
- Phase 2: live calls topped up to `--calls` (3-4 parties each), all held by the daemon;
  then `--concurrency` keep-alive connections send `GET /v1/calls/{id}` (random live ids)
  for `--seconds`; requests/s = 200 answers / elapsed. The load generator is this Python
  process (aiohttp client): on a small machine it competes with the daemon for the CPU,
  so the figure is a floor for the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from daemon.sandbox import Sandbox  # noqa: E402

TOKEN = "bench-control-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sb = Sandbox(heartbeat_interval=30.0, seed=11)
    await sb.start()
    w = sb.world
    queue = w.create_queue("Customer Service").id
    agents = [w.create_user(f"Agent {i}").id for i in range(50)]
    port = _free_port()
    result: dict[str, Any] = {"bench": "control", "removals": args.removals, "calls": args.calls,
                              "concurrency": args.concurrency, "machine": _common.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "bench.token").write_text(TOKEN + "\n")
        os.chmod(folder / "bench.token", 0o600)
        path = _common.write_config(
            folder, n_rules=0, sandbox_base=sb.base_url, queues=[queue],
            overrides={"safety.max_disconnects_per_minute": 1_000_000, "logging.level": "warning",
                       "logging.format": "json", "genesys.requests_per_minute": 100_000,
                       "control.listen": f"127.0.0.1:{port}",
                       "control.max_requests_per_minute": 1_000_000,
                       "control.callers": {"bench": {"token_file": "bench.token"}}})
        env = {k: v for k, v in os.environ.items() if "GENESYS" not in k}
        env.update(GENESYSCLOUD_OAUTHCLIENT_ID=sb.client_id,
                   GENESYSCLOUD_OAUTHCLIENT_SECRET=sb.client_secret)
        with open(folder / "daemon.log", "wb") as logf:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon", "run", "--config", str(path), stdout=logf,
                stderr=logf, env=env, cwd=str(_common.ROOT))
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        conn = aiohttp.TCPConnector(limit=max(args.concurrency, 4))
        try:
            async with aiohttp.ClientSession(connector=conn, headers=headers) as http:
                async def up() -> bool:
                    if proc.returncode is not None:
                        raise RuntimeError((folder / "daemon.log").read_text()[-3000:])
                    try:
                        async with http.get(f"{base}/v1/openapi.json") as r:
                            return r.status == 200
                    except aiohttp.ClientError:
                        return False
                await _wait(up, 60, "the daemon's control API")

                held = partial(_held, http, base)
                result["phase1"] = await _phase1(args, sb, http, base, queue, agents, held)
                result["load_phase1_before"] = result["phase1"].pop("load_before")
                result["phase2"] = await _phase2(args, sb, http, base, queue, agents, held)
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            await sb.stop()
    return result


async def _held(http: aiohttp.ClientSession, base: str, cid: str, pid: str) -> bool:
    """Whether the daemon's control API shows party `pid` on call `cid`."""
    async with http.get(f"{base}/v1/calls/{cid}") as r:
        if r.status != 200:
            return False
        return any(p["id"] == pid for p in (await r.json())["parties"])


async def _phase1(args: argparse.Namespace, sb: Sandbox, http: aiohttp.ClientSession, base: str,
                  queue: str, agents: list[str], held: Any) -> dict[str, Any]:
    """POST /v1/ejections -> the PATCH at the sandbox, one removal at a time."""
    w = sb.world
    targets = []
    for i in range(args.removals):
        conv = w.start_call(queue, ani=f"tel:+1415555{i:04d}")
        w.connect_agent(conv.id, agents[i % len(agents)])
        ext = w.add_external(conv.id, f"tel:+1212555{i:04d}")
        targets.append((conv.id, ext.id))
    for cid, pid in targets:
        await _wait(lambda c=cid, p=pid: held(c, p), 30, f"call {cid} in the daemon's memory")
    post_to_patch: list[float] = []
    round_trip: list[float] = []
    load_before = _common.load()
    for cid, pid in targets:
        t0 = time.perf_counter_ns()
        async with http.post(f"{base}/v1/ejections",
                             json={"conversationId": cid, "participantId": pid}) as r:
            assert r.status == 202, await r.text()
            await r.read()
        round_trip.append((time.perf_counter_ns() - t0) / 1e6)
        post_to_patch.append(await _first_patch_ms(sb, cid, pid, t0))
    patched = [(r.path.split("/calls/")[1].split("/")[0], r.path.rsplit("/", 1)[1])
               for r in sb.journal.patches()]
    return {"post_to_patch_ms": _stats(post_to_patch), "post_202_ms": _stats(round_trip),
            "patches": len(patched), "distinct_parties": len(set(patched)),
            "load": _common.load(), "load_before": load_before}


async def _first_patch_ms(sb: Sandbox, cid: str, pid: str, t0: int) -> float:
    """Milliseconds from `t0` (perf_counter_ns) to the sandbox's receipt of the call's first PATCH."""
    for _ in range(20_000):  # bounded: 20,000 x 0.5 ms = 10 s
        hits = sb.journal.patches(cid)
        if hits:
            return (hits[0].perf_ns - t0) / 1e6
        await asyncio.sleep(0.0005)
    raise TimeoutError(f"no PATCH for {cid}/{pid} within 10 s")


async def _phase2(args: argparse.Namespace, sb: Sandbox, http: aiohttp.ClientSession, base: str,
                  queue: str, agents: list[str], held: Any) -> dict[str, Any]:
    """GET /v1/calls/{id} with `args.calls` live calls, `args.concurrency` connections."""
    w = sb.world
    live = [c.id for c in w.calls.values() if c.end is None]
    i = 0
    while len(live) < args.calls:
        conv = w.start_call(queue, ani=f"tel:+1650555{i:04d}")
        w.connect_agent(conv.id, agents[i % len(agents)])
        if i % 2 == 0:
            w.add_external(conv.id, f"tel:+1303555{i:04d}")
        live.append(conv.id)
        i += 1
    last = live[-1]
    last_pid = w.get_call(last).participants[-1].id
    await _wait(lambda: held(last, last_pid), 60, "the last call in memory")
    for cid in live:
        pid = w.get_call(cid).participants[-1].id
        await _wait(lambda c=cid, p=pid: held(c, p), 30, f"call {cid} in memory")
    rng = random.Random(3)
    before = len(sb.journal.requests)
    stop_at = time.perf_counter() + args.seconds
    counts = {"ok": 0, "other": 0}

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            async with http.get(f"{base}/v1/calls/{rng.choice(live)}") as r:
                await r.read()
                counts["ok" if r.status == 200 else "other"] += 1
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    return {"live_calls": len(live), "seconds": round(elapsed, 2),
            "requests_ok": counts["ok"], "requests_other": counts["other"],
            "requests_per_s": round(counts["ok"] / elapsed, 1),
            "genesys_requests_during": len(sb.journal.requests) - before,
            "load": _common.load()}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": round(_common.pct(xs, 0.5), 2), "p95": round(_common.pct(xs, 0.95), 2),
            "p99": round(_common.pct(xs, 0.99), 2), "max": round(max(xs), 2)}


def summary(r: dict[str, Any]) -> str:
    p1, p2 = r["phase1"], r["phase2"]
    a, b = p1["post_to_patch_ms"], p1["post_202_ms"]
    return (f"POST /v1/ejections -> PATCH at the sandbox, {a['n']} removals one at a time: "
            f"p50 {a['p50']} ms, p95 {a['p95']} ms, p99 {a['p99']} ms, max {a['max']} ms "
            f"(202 round trip p50 {b['p50']} ms, p99 {b['p99']} ms); {p1['patches']} PATCHes for "
            f"{p1['distinct_parties']} parties; load {p1['load']}\n"
            f"GET /v1/calls/{{id}} with {p2['live_calls']} live calls, {r['concurrency']} connections, "
            f"{p2['seconds']} s: {p2['requests_per_s']} requests/s ({p2['requests_ok']} x 200, "
            f"{p2['requests_other']} other; {p2['genesys_requests_during']} Genesys requests meanwhile); "
            f"load {p2['load']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--removals", type=int, default=200)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from daemon.service.logs import configure_logging
    with open(os.devnull, "w") as devnull:  # the sandbox's own log lines cost nothing
        configure_logging("warning", "json", stream=devnull)
        r = asyncio.run(run(args))
    print(json.dumps(r) if args.json else summary(r))


if __name__ == "__main__":
    main()
