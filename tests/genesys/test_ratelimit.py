"""RequestLimiter: Genesys' window accounting (assumed, then learnt from the headers),
strict priority order, FIFO within a priority, the ENFORCE reserve, shares, pauses by
priority, no pacing of its own. Over-the-sandbox proofs are in test_budget_sandbox.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from _wait import wait_until
from daemon.genesys.ratelimit import Priority, RequestLimiter, budget_share


async def _take(lim: RequestLimiter, p: Priority = Priority.NORMAL, n: int = 1) -> None:
    for _ in range(n):
        async with lim.slot(p):
            pass


def _hdr(count: int, allowed: int, reset: int) -> dict[str, str]:
    return {"inin-ratelimit-count": str(count), "inin-ratelimit-allowed": str(allowed),
            "inin-ratelimit-reset": str(reset)}


async def test_priority_order_then_fifo() -> None:
    lim = RequestLimiter(1200, enforce_reserve=0.0)
    lim.pause(0.3)  # nobody is served until every waiter below has queued
    order: list[str] = []

    async def take(p: Priority, label: str) -> None:
        async with lim.slot(p):
            order.append(label)

    labels = [(Priority.RESYNC, "r1"), (Priority.NORMAL, "n1"), (Priority.RESYNC, "r2"),
              (Priority.ENFORCE, "e1"), (Priority.NORMAL, "n2"), (Priority.ENFORCE, "e2")]
    tasks = [asyncio.create_task(take(p, lab)) for p, lab in labels]
    await wait_until(lambda: sum(lim.waiting(p) for p in Priority) == 6)
    assert lim.waiting(Priority.ENFORCE) == 2
    assert lim.waiting(Priority.RESYNC) == 2
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order == ["e1", "e2", "n1", "n2", "r1", "r2"]
    assert all(lim.waiting(p) == 0 for p in Priority)


async def test_enforce_jumps_a_long_resync_queue() -> None:
    lim = RequestLimiter(1, enforce_reserve=0.0, window=1.0)  # one request a 1 s window
    await _take(lim, Priority.RESYNC)
    served: list[str] = []

    async def take(p: Priority, label: str) -> None:
        async with lim.slot(p):
            served.append(label)

    resync = [asyncio.create_task(take(Priority.RESYNC, f"r{i}")) for i in range(20)]
    await wait_until(lambda: lim.waiting(Priority.RESYNC) == 20)
    enforce = asyncio.create_task(take(Priority.ENFORCE, "E"))
    await asyncio.wait_for(enforce, 5)
    # The ENFORCE waiter arrived last but is served first when the next window opens.
    assert served.index("E") == 0
    for t in resync:
        t.cancel()
    await asyncio.gather(*resync, return_exceptions=True)
    assert lim.waiting(Priority.RESYNC) == 0


async def test_pause_holds_everyone_including_enforce() -> None:
    lim = RequestLimiter(60000)
    lim.pause(0.4)
    t0 = time.monotonic()
    async with lim.slot(Priority.ENFORCE):
        waited = time.monotonic() - t0
    assert waited >= 0.35
    assert waited < 10


async def test_pause_only_extends() -> None:
    lim = RequestLimiter(60)
    lim.pause(5)
    lim.pause(0.1)
    assert lim.paused_for > 4


async def test_a_resync_429_pauses_resync_not_removals() -> None:
    lim = RequestLimiter(300)
    lim.rate_limited(Priority.RESYNC, 30.0)
    await asyncio.wait_for(_take(lim, Priority.ENFORCE, 5), 2)  # removals go at once
    await asyncio.wait_for(_take(lim, Priority.NORMAL), 2)  # higher than resync too
    held = asyncio.create_task(_take(lim, Priority.RESYNC))
    await asyncio.sleep(0.05)
    assert not held.done() and lim.waiting(Priority.RESYNC) == 1
    assert lim.rate_limited_count == {"resync": 1}
    assert lim.snapshot().paused_seconds.keys() == {"resync"}
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    # A 429 on a removal pauses everybody.
    lim.rate_limited(Priority.ENFORCE, 30.0)
    assert set(lim.snapshot().paused_seconds) == {"enforce", "normal", "resync"}


async def test_reserve_is_for_enforce_only() -> None:
    now = [0.0]
    lim = RequestLimiter(10, enforce_reserve=0.2, clock=lambda: now[0])  # frozen: one window
    assert lim.reserve == 2
    await asyncio.wait_for(_take(lim, Priority.NORMAL, 4), 2)
    await asyncio.wait_for(_take(lim, Priority.RESYNC, 4), 2)
    blocked = asyncio.create_task(_take(lim, Priority.NORMAL))
    await wait_until(lambda: lim.waiting(Priority.NORMAL) == 1)
    # The last two requests of the window are the reserve: ENFORCE gets them at once.
    await asyncio.wait_for(_take(lim, Priority.ENFORCE, 2), 2)
    assert not blocked.done() and lim.available == 0
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert lim.waiting(Priority.NORMAL) == 0


async def test_no_pacing_a_burst_goes_at_once_then_waits_for_the_reset() -> None:
    now = [0.0]
    lim = RequestLimiter(200, enforce_reserve=0.0, clock=lambda: now[0])
    # The clock never moves: any pace of the limiter's own would stall this burst.
    await asyncio.wait_for(_take(lim, Priority.ENFORCE, 200), 5)
    assert lim.available == 0
    # The 201st waits for the window to reset.
    late = asyncio.create_task(_take(lim, Priority.ENFORCE))
    await wait_until(lambda: lim.waiting(Priority.ENFORCE) == 1)
    await asyncio.sleep(0.05)
    assert not late.done()
    late.cancel()
    await asyncio.gather(late, return_exceptions=True)
    now[0] += 61.0
    await asyncio.wait_for(_take(lim, Priority.ENFORCE), 5)  # a new window: room again


async def test_learns_allowed_count_and_reset_from_headers() -> None:
    now = [100.0]
    lim = RequestLimiter(300, clock=lambda: now[0])
    snap = lim.snapshot()
    assert (snap.allowed, snap.used, snap.learnt, snap.reset_seconds) == (300, 0, False, 0.0)
    async with lim.slot(Priority.NORMAL):
        lim.observe(_hdr(1, 180, 61))
    snap = lim.snapshot()
    assert (snap.allowed, snap.used, snap.remaining, snap.learnt) == (180, 1, 179, True)
    assert snap.reset_seconds == 61 and snap.reserve == 36
    # Another user of the same token: Genesys counts more than we sent.
    async with lim.slot(Priority.NORMAL):
        lim.observe(_hdr(50, 180, 60))
    assert lim.snapshot().used == 50
    # A raised limit is followed at once.
    async with lim.slot(Priority.NORMAL):
        lim.observe(_hdr(51, 3000, 60))
    assert lim.snapshot().allowed == 3000 and lim.reserve == 600
    # Answers without the headers change nothing; unusable ones are counted, not raised.
    async with lim.slot(Priority.NORMAL):
        lim.observe({})
        lim.observe({"inin-ratelimit-allowed": "lots", "inin-ratelimit-count": "-3"})
    assert lim.headers_rejected == 2 and lim.snapshot().allowed == 3000
    # The window resets when Genesys said it would; the next request begins a new one.
    now[0] += 61
    snap = lim.snapshot()
    assert (snap.used, snap.reset_seconds) == (0, 0.0)


async def test_in_flight_requests_count_until_answered() -> None:
    now = [0.0]
    lim = RequestLimiter(10, enforce_reserve=0.0, clock=lambda: now[0])
    holders = [lim.slot(Priority.ENFORCE) for _ in range(4)]
    for h in holders:
        await h.__aenter__()
    # An answer that reports count 1 while three more are in flight: assume they count too.
    lim.observe(_hdr(1, 10, 60))
    assert lim.snapshot().used == 4 and lim.snapshot().in_flight == 4
    for h in holders:
        await h.__aexit__(None, None, None)
    assert lim.snapshot().in_flight == 0


async def test_a_new_token_starts_a_new_window() -> None:
    now = [0.0]
    lim = RequestLimiter(3, enforce_reserve=0.0, clock=lambda: now[0])
    lim.note_token("a")
    await _take(lim, Priority.NORMAL, 3)
    assert lim.available == 0
    lim.note_token("a")
    assert lim.available == 0
    lim.note_token("b")
    assert lim.available == 3
    await asyncio.wait_for(_take(lim, Priority.NORMAL), 2)


async def test_a_tag_share_caps_only_that_tag() -> None:
    now = [0.0]
    lim = RequestLimiter(100, enforce_reserve=0.2, clock=lambda: now[0])

    async def reconcile_reads(n: int) -> None:
        budget_share.set(("reconcile", 0.25))
        await _take(lim, Priority.RESYNC, n)

    await asyncio.wait_for(asyncio.create_task(reconcile_reads(25)), 2)
    assert lim.tag_used("reconcile") == 25
    held = asyncio.create_task(reconcile_reads(1))
    await wait_until(lambda: lim.waiting(Priority.RESYNC) == 1)
    # Untagged resync (a gap resync) and removals are not held back by reconcile's share.
    await asyncio.wait_for(_take(lim, Priority.RESYNC, 10), 2)
    await asyncio.wait_for(_take(lim, Priority.ENFORCE, 5), 2)
    assert not held.done()
    assert lim.granted["tag:reconcile"] == 25
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)


def test_defaults_keep_a_reserve() -> None:
    lim = RequestLimiter(300)
    assert lim.allowed == 300
    assert lim.reserve == 60
    assert RequestLimiter(300, enforce_reserve=0.0).reserve == 0
    with pytest.raises(ValueError):
        RequestLimiter(0)
    with pytest.raises(ValueError):
        RequestLimiter(60, enforce_reserve=1.0)
    with pytest.raises(ValueError):
        lim.slot(Priority.RESYNC, tag="x", share=0.0)
