"""One request budget per process, shared by every Genesys REST call.

Genesys gives each client-credentials token about 300 requests a minute, shared by every
call the daemon makes. `RequestLimiter` is a token bucket refilled at `per_minute / 60`
tokens a second, holding at most `burst` tokens.

Ordering contract:
- Waiters are served strictly by `Priority` (ENFORCE before NORMAL before RESYNC), FIFO
  within one priority. A queued ENFORCE waiter always goes before any queued RESYNC waiter,
  however long the RESYNC one has waited.
- Reserve: the last `reserve` tokens of the bucket may only be spent by ENFORCE. A resync
  storm (one GET per live call) therefore drains the bucket down to the reserve and no
  further, and an enforcement PATCH finds a token at once instead of queueing behind the
  refill. Defaults: `burst = max(1, per_minute // 10)` (6 s of budget: 30 at 300/min) and
  `reserve = max(1, burst // 5)` (6 at 300/min) when `burst >= 2`, else 0.
- `pause(seconds)` (after a 429): nobody, not even ENFORCE, gets a slot until then.
  Pauses only ever extend, never shorten, the current pause.

A slot is consumed when it is granted; leaving the `async with` block returns nothing.
A waiter cancelled before it is granted leaves the queue; one cancelled in the instant after
being granted gives its token back.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from enum import IntEnum


class Priority(IntEnum):
    """Lower value is served first."""

    ENFORCE = 0
    NORMAL = 1
    RESYNC = 2


class RequestLimiter:
    """Token bucket with strict-priority waiters. See the module docstring for the contract.

    `per_minute`: sustained requests a minute. `burst`: bucket size (tokens). `reserve`:
    tokens only ENFORCE may spend. `clock`: monotonic seconds (injectable for tests).
    Must be used from a single event loop.
    """

    def __init__(self, per_minute: int, *, burst: int | None = None,
                 reserve: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self.rate = per_minute / 60.0  # tokens a second
        self.burst = burst if burst is not None else max(1, per_minute // 10)
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        if reserve is None:
            reserve = max(1, self.burst // 5) if self.burst >= 2 else 0
        if not 0 <= reserve < self.burst:
            raise ValueError("reserve must be at least 0 and below burst")
        self.reserve = reserve
        self._clock = clock
        self._tokens = float(self.burst)
        self._updated = clock()
        self._paused_until = 0.0
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._waiting = {p: 0 for p in Priority}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # ------------------------------------------------------------------ public

    def slot(self, priority: Priority) -> AbstractAsyncContextManager[None]:
        """`async with limiter.slot(Priority.ENFORCE): ...` waits until one request may go."""
        return self._slot(priority)

    def pause(self, seconds: float) -> None:
        """Nobody gets a slot for `seconds` from now (extends, never shortens a pause)."""
        if seconds <= 0:
            return
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
        self._dispatch()

    def waiting(self, priority: Priority) -> int:
        """How many callers of this priority are queued for a slot."""
        return self._waiting[priority]

    @property
    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when not paused)."""
        return max(0.0, self._paused_until - self._clock())

    @property
    def available(self) -> float:
        """Tokens in the bucket now (fractional)."""
        self._refill()
        return self._tokens

    # ------------------------------------------------------------------ internals

    @asynccontextmanager
    async def _slot(self, priority: Priority) -> AsyncIterator[None]:
        await self._acquire(Priority(priority))
        yield

    async def _acquire(self, priority: Priority) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._heap, (int(priority), next(self._seq), fut))
        self._waiting[priority] += 1
        self._dispatch()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted in the same instant we were cancelled: give the token back.
                self._tokens = min(float(self.burst), self._tokens + 1.0)
            else:
                # Still queued (awaiting a future cancels it along with the task).
                fut.cancel()
                self._waiting[priority] -= 1
            self._dispatch()
            raise

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now

    def _dispatch(self) -> None:
        """Grant tokens to the queue head while it can take one; otherwise arm a timer."""
        self._refill()
        now = self._clock()
        while self._heap:
            prio, _, fut = self._heap[0]
            if fut.done():  # cancelled while queued; its count was already dropped
                heapq.heappop(self._heap)
                continue
            if now < self._paused_until:
                self._arm(self._paused_until - now)
                return
            need = 1.0 if prio == Priority.ENFORCE else 1.0 + self.reserve
            if self._tokens + 1e-9 < need:
                self._arm((need - self._tokens) / self.rate)
                return
            heapq.heappop(self._heap)
            self._tokens -= 1.0
            self._waiting[Priority(prio)] -= 1
            fut.set_result(None)

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, delay)
        if self._timer is not None:
            if self._timer_at <= at + 1e-6:
                return  # an earlier (or equal) wake-up is already armed
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()
