"""Capacity of the Genesys Cloud sandbox: 10,000 concurrent calls, 2,000 events/s.

    .venv/bin/python bench/sandbox_capacity.py [--calls 10000] [--rate 2000] [--seconds 5]

The sandbox runs in this process; a consumer in a child process holds one notification
WebSocket subscribed to every queue topic and reports how many events arrived and their
delivery lag (publish perf_counter_ns in the journal vs receive time; CLOCK_MONOTONIC is
shared across processes on Linux). Every loop is bounded by count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from daemon.sandbox import Sandbox  # noqa: E402


def consumer(base: str, cid: str, secret: str, topics: list[str], expect: int,
             deadline_s: float, out: Any) -> None:
    async def run() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            auth = {"Authorization": aiohttp.encode_basic_auth(cid, secret)}
            async with s.post(base + "/oauth/token", headers=auth,
                              data={"grant_type": "client_credentials"}) as r:
                tok = (await r.json())["access_token"]
            h = {"Authorization": f"Bearer {tok}"}
            async with s.post(base + "/api/v2/notifications/channels", headers=h) as r:
                ch = await r.json()
            async with s.put(base + f"/api/v2/notifications/channels/{ch['id']}/subscriptions",
                             headers=h, json=[{"id": t} for t in topics]) as r:
                assert r.status == 200, await r.text()
            ws = await s.ws_connect(ch["connectUri"], max_msg_size=0)
            out.send(("ready", ch["id"]))
            n = 0
            recv: dict[str, int] = {}
            end = time.monotonic() + deadline_s
            while n < expect and time.monotonic() < end:
                try:
                    msg = await ws.receive(timeout=max(0.01, end - time.monotonic()))
                except TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                now = time.perf_counter_ns()
                m = orjson.loads(msg.data)
                if m["topicName"].endswith(".calls"):
                    n += 1
                    recv[m["metadata"]["CorrelationId"]] = now
            await ws.close()
            return {"events": n, "recv": recv}

    out.send(("done", asyncio.run(run())))


async def main(args: argparse.Namespace) -> None:
    sb = Sandbox(heartbeat_interval=30.0, extra_field=True)
    await sb.start()
    w = sb.world
    queues = [w.create_queue(f"Q{i}") for i in range(20)]
    users = [w.create_user(f"U{i}") for i in range(200)]
    t0 = time.perf_counter()
    calls = []
    for i in range(args.calls):
        c = w.start_call(queues[i % 20].id)
        w.connect_agent(c.id, users[i % 200].id)
        w.add_external(c.id)
        calls.append(c)
    setup = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"calls: {len(w.active_calls())} live, 3 parties each, built in {setup:.2f} s, "
          f"peak RSS {rss_mb:.0f} MB")

    expect = int(args.rate * args.seconds)
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(
        target=consumer, args=(sb.base_url, sb.client_id, sb.client_secret,
                               [f"v2.routing.queues.{q.id}.conversations.calls" for q in queues],
                               expect, args.seconds + 20, child), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    ready = await loop.run_in_executor(None, parent.poll, 30)
    assert ready and parent.recv()[0] == "ready"
    first_ev = sb.journal.events[-1].seq if sb.journal.events else 0

    # paced publishing: every 10 ms, publish rate/100 events (attribute updates)
    tick = 0.01
    per_tick = max(1, int(args.rate * tick))
    sent = 0
    start = time.perf_counter()
    i = 0
    for k in range(int(args.seconds / tick) + 1):
        if sent >= expect:
            break
        for _ in range(min(per_tick, expect - sent)):
            c = calls[i % len(calls)]
            w.set_attributes(c.id, c.participants[0].id, {"n": str(i)})
            i += 1
            sent += 1
        target = start + (k + 1) * tick
        await asyncio.sleep(max(0.0, target - time.perf_counter()))
    pub_s = time.perf_counter() - start
    # let the writers drain (bounded)
    for _ in range(2000):
        if not any(c.outbox for c in sb.conns.values()):
            break
        await asyncio.sleep(0.01)
    drained = time.perf_counter() - start
    got = await loop.run_in_executor(None, parent.poll, args.seconds + 30)
    result = parent.recv()[1] if got else {"events": 0, "recv": {}}
    proc.join(10)
    published = [e for e in sb.journal.events if e.seq > first_ev]
    lags = sorted((result["recv"][e.correlation_id] - e.perf_ns) / 1e6
                  for e in published if e.correlation_id in result["recv"])

    def pct(p: float) -> float:
        return lags[min(len(lags) - 1, int(p * len(lags)))] if lags else float("nan")

    print(f"published {len(published)} events in {pub_s:.2f} s "
          f"({len(published) / pub_s:.0f}/s; target {args.rate}/s), all queued by "
          f"{drained:.2f} s")
    print(f"consumer received {result['events']} / {len(published)}; delivery lag ms "
          f"p50 {pct(0.5):.1f} p99 {pct(0.99):.1f} max {pct(1.0):.1f}")
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(f"sandbox process CPU user+sys {cpu.ru_utime + cpu.ru_stime:.1f} s total, "
          f"pid {os.getpid()}")
    await sb.stop()
    ok = result["events"] == len(published) == expect
    print("OK" if ok else "SHORTFALL")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--rate", type=int, default=2_000)
    p.add_argument("--seconds", type=float, default=5.0)
    asyncio.run(main(p.parse_args()))
