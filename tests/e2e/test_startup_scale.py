"""Issue 18 "Done when": `confguard run` as a child process with `$NOTIFY_SOCKET` (an
AF_UNIX datagram socket this test reads, standing in for systemd) against the sandbox with
1,500 live calls (20% conferences, 5 flagged customers in conferences already present),
a budget of 300 requests a minute counted in a sliding window and no `inin-ratelimit-*`
headers (the sandbox's default, as Genesys today).

Asserted: READY=1 within 60 s of the start; no 90 s stretch before READY without an
EXTEND_TIMEOUT_USEC covering it; STATUS= lines show the reads' progress after READY;
every flagged conference customer removed within 90 s of the start (300 conferences at
300/min with 20% kept for removals: about 65 s is the floor); /healthz coverage moves;
0 x 429. One test (it is long: about 70 s of reads at this budget)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from _daemon_harness import FLAGGED_RULE, DaemonProcess, credentials_env, sandbox_queue, wait_until, write_config

from daemon.sandbox import Sandbox
from daemon.sandbox.world import Conversation, Party

CALLS = 1500
CONFERENCES = 300
FLAGGED = 5


class Notify:
    """The notify socket: every datagram with the monotonic time it was read."""

    def __init__(self) -> None:
        self.path = Path("/tmp") / f"cg-notify-{uuid.uuid4().hex[:12]}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def poll(self) -> list[tuple[float, dict[str, str]]]:
        for _ in range(10_000):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n"))
            self.messages.append((time.monotonic(), fields))
        return self.messages

    def first(self, key: str) -> float | None:
        return next((t for t, m in self.poll() if key in m), None)

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def _world(sb: Sandbox) -> list[tuple[Conversation, Party]]:
    """1,500 live calls with an agent, every fifth a conference; the customers of the last
    five conferences analytics lists (read last) flagged."""
    q = sandbox_queue(sb)
    w = sb.world
    agent = w.create_user("Agent").id
    flagged = []
    for i in range(CALLS):
        conv = w.start_call(q, ani=f"tel:+1415{i:07d}")
        w.connect_agent(conv.id, agent)
        if i % 5 == 4:  # 20% conferences, spread over the discovery order
            w.add_external(conv.id, f"tel:+1212{i:07d}")
            if i >= CALLS - 5 * FLAGGED:  # the last conferences analytics lists: read last
                cust = next(p for p in conv.participants if p.purpose == "customer")
                w.set_attributes(conv.id, cust.id, {"complianceFlag": "true"})
                flagged.append((conv, cust))
    return flagged


def _assert_start_covered(notify: Notify, t0: float, ready_at: float) -> None:
    """Every stretch before READY is covered by TimeoutStartSec=90 from the start and each
    EXTEND_TIMEOUT_USEC from its send on."""
    covered_until = t0 + 90
    for t, m in notify.poll():
        if t > ready_at:
            break
        if "EXTEND_TIMEOUT_USEC" in m:
            assert t <= covered_until, "a stretch before READY was not covered"
            covered_until = max(covered_until, t + int(m["EXTEND_TIMEOUT_USEC"]) / 1e6)
    assert ready_at <= covered_until


def _last_progress_line(notify: Notify) -> str:
    """The newest `STATUS=` text that carries the resync progress ("" before any)."""
    lines = [m.get("STATUS", "") for _, m in notify.poll() if "calls read" in m.get("STATUS", "")]
    return lines[-1] if lines else ""


def _progress(notify: Notify) -> list[tuple[int, int]]:
    """(calls read, conferences read) of every `resync N/M calls read, K/L conferences`."""
    out = []
    for _, msg in notify.poll():
        # READY's own STATUS carries the progress after its state ("running: ...; resync ...").
        m = re.search(r"resync (\d+)/(\d+) calls read, (\d+)/(\d+) conferences", msg.get("STATUS", ""))
        if m:
            out.append((int(m.group(1)), int(m.group(3))))
    return out


@pytest.mark.slow
async def test_1500_calls_ready_fast_conferences_first_no_429(sandbox_factory: Any, tmp_path: Path) -> None:
    sb: Sandbox = await sandbox_factory(request_budget=300)
    flagged = _world(sb)
    assert len(flagged) == FLAGGED
    cfg = write_config(tmp_path, sb.base_url, rules=FLAGGED_RULE)
    notify = Notify()
    d = DaemonProcess(cfg, credentials_env(sb, NOTIFY_SOCKET=str(notify.path)), tmp_path)
    t0 = time.monotonic()
    try:
        await d.start()
        await wait_until(lambda: notify.first("READY"), 60, "READY=1")
        ready_at = notify.first("READY")
        assert ready_at is not None and ready_at - t0 < 60
        _assert_start_covered(notify, t0, ready_at)
        await d.wait_ready(20)
        removed: dict[str, float] = {}

        def all_removed() -> bool:
            for conv, cust in flagged:
                if cust.id not in removed and conv.party(cust.id).state == "disconnected":
                    removed[cust.id] = time.monotonic()
            return len(removed) == FLAGGED

        coverage: list[dict[str, Any]] = []

        async def watch() -> None:
            while not all_removed():
                status, body = await d.get("/healthz")
                if status == 200:
                    coverage.append(orjson.loads(body)["coverage"])
                await asyncio.sleep(1.0)

        await asyncio.wait_for(watch(), max(1.0, t0 + 95 - time.monotonic()))
        worst = max(removed.values()) - t0
        assert worst <= 90, f"last flagged conference customer removed {worst:.1f} s after the start"

        async def conferences_read() -> None:
            while True:
                status, body = await d.get("/healthz")
                if status == 200:
                    coverage.append(orjson.loads(body)["coverage"])
                    if coverage[-1]["conferences_unread"] == 0:
                        return
                await asyncio.sleep(1.0)

        # Every conference read (300 at 240 a minute for resync: the second window's reads).
        await asyncio.wait_for(conferences_read(), 100)
        conferences_at = time.monotonic() - t0
        # STATUS= progress after READY: "resync N/1500 calls read, M/300 conferences", rising.
        # The STATUS line is sent at most every 2 s: wait (bounded) for the one that shows every
        # conference read instead of racing it.
        # (Conferences whose flagged customer was removed are no longer conferences, so the
        # line reads K/K with K <= 300.)
        await wait_until(lambda: re.search(r"(\d+)/\1 conferences$", _last_progress_line(notify)),
                         10, "a STATUS line with every conference read")
        progress = _progress(notify)
        assert len(progress) >= 2 and progress[-1][0] > progress[0][0], [m for _, m in notify.poll()]
        assert progress == sorted(progress)
        # /healthz coverage moved: more calls read, conferences all read by the removals.
        assert coverage and coverage[0]["calls_known"] == CALLS
        assert coverage[-1]["calls_read"] > coverage[0]["calls_read"]
        status, body = await d.get("/healthz")
        last = orjson.loads(body)["coverage"]
        assert last["conferences_unread"] == 0 and last["calls_read"] < CALLS
        assert last["oldest_unread_seconds"] > 0
        print(f"\nstart-up at {CALLS} calls: READY after {ready_at - t0:.1f} s, last flagged "
              f"removal {worst:.1f} s, every conference read {conferences_at:.1f} s, coverage {last}")
    finally:
        await d.close()
        notify.close()
    assert not [r for r in sb.journal.requests if r.status == 429]
    assert not [r for r in sb.journal.requests if any(h.lower().startswith("inin-ratelimit")
                                                     for h in getattr(r, "headers", {}) or {})]
