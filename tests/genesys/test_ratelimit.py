"""RequestLimiter: strict priority order, FIFO within a priority, pause, ENFORCE reserve."""

from __future__ import annotations

import asyncio
import time

import pytest

from daemon.genesys.ratelimit import Priority, RequestLimiter


async def _wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def test_priority_order_then_fifo() -> None:
    # 1200/min = 20 tokens/s; burst 1, no reserve, so waiters are served one by one.
    lim = RequestLimiter(1200, burst=1, reserve=0)
    async with lim.slot(Priority.NORMAL):
        pass  # bucket now empty
    lim.pause(0.3)  # nobody is served until every waiter below has queued
    order: list[str] = []

    async def take(p: Priority, label: str) -> None:
        async with lim.slot(p):
            order.append(label)

    labels = [(Priority.RESYNC, "r1"), (Priority.NORMAL, "n1"), (Priority.RESYNC, "r2"),
              (Priority.ENFORCE, "e1"), (Priority.NORMAL, "n2"), (Priority.ENFORCE, "e2")]
    tasks = [asyncio.create_task(take(p, lab)) for p, lab in labels]
    await _wait_for(lambda: sum(lim.waiting(p) for p in Priority) == 6)
    assert lim.waiting(Priority.ENFORCE) == 2
    assert lim.waiting(Priority.RESYNC) == 2
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order == ["e1", "e2", "n1", "n2", "r1", "r2"]
    assert all(lim.waiting(p) == 0 for p in Priority)


async def test_enforce_jumps_a_long_resync_queue() -> None:
    lim = RequestLimiter(600, burst=1, reserve=0)  # 10/s
    async with lim.slot(Priority.RESYNC):
        pass
    served: list[str] = []

    async def take(p: Priority, label: str) -> None:
        async with lim.slot(p):
            served.append(label)

    resync = [asyncio.create_task(take(Priority.RESYNC, f"r{i}")) for i in range(20)]
    await _wait_for(lambda: lim.waiting(Priority.RESYNC) == 20)
    enforce = asyncio.create_task(take(Priority.ENFORCE, "E"))
    await asyncio.wait_for(enforce, 5)
    # The ENFORCE waiter arrived last but is served next (at most one resync already in flight).
    assert served.index("E") <= 1
    for t in resync:
        t.cancel()
    await asyncio.gather(*resync, return_exceptions=True)
    assert lim.waiting(Priority.RESYNC) == 0


async def test_pause_holds_everyone_including_enforce() -> None:
    lim = RequestLimiter(60000, burst=10)
    lim.pause(0.4)
    t0 = time.monotonic()
    async with lim.slot(Priority.ENFORCE):
        waited = time.monotonic() - t0
    assert waited >= 0.35
    assert waited < 10


async def test_pause_only_extends() -> None:
    lim = RequestLimiter(60, burst=2)
    lim.pause(5)
    lim.pause(0.1)
    assert lim.paused_for > 4


async def test_reserve_is_for_enforce_only() -> None:
    now = [0.0]
    lim = RequestLimiter(60, burst=3, reserve=1, clock=lambda: now[0])  # frozen: no refill
    async with lim.slot(Priority.NORMAL):
        pass
    async with lim.slot(Priority.RESYNC):
        pass
    blocked = asyncio.create_task(lim.slot(Priority.NORMAL).__aenter__())
    await _wait_for(lambda: lim.waiting(Priority.NORMAL) == 1)
    # The last token is the reserve: ENFORCE gets it at once while NORMAL keeps waiting.
    await asyncio.wait_for(lim.slot(Priority.ENFORCE).__aenter__(), 2)
    assert not blocked.done()
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert lim.waiting(Priority.NORMAL) == 0


async def test_refill_rate_is_respected() -> None:
    lim = RequestLimiter(600, burst=1, reserve=0)  # 10/s
    t0 = time.monotonic()
    for _ in range(6):
        async with lim.slot(Priority.NORMAL):
            pass
    # The first is immediate, five more need >= 0.5 s of refill.
    assert time.monotonic() - t0 >= 0.45


def test_defaults_keep_a_reserve() -> None:
    lim = RequestLimiter(300)
    assert lim.burst == 30
    assert lim.reserve == 6
    with pytest.raises(ValueError):
        RequestLimiter(0)
    with pytest.raises(ValueError):
        RequestLimiter(60, burst=2, reserve=2)
