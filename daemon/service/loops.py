"""The daemon's background loops: rule timers, the gap watch (resync after a gap). The
reconciliation loop is `daemon.genesys.resync.Reconciler.run`.

- `TimerWake`: the timer loop's alarm clock. `poke()` after every input (the router's
  `StepAccounts` calls it): when a rule deadline moved closer than the one the loop sleeps
  towards, the loop wakes now.
- `Timers.run(stop)`: hold_for and time-based rules fire at their deadline with no event
  needed (`Engine.tick`, decisions to `submit`); ended calls are evicted; gauges refreshed.
  Wakes at least once a second.
- `GapWatch`: `open(reason)` (a source reported a gap: the daemon is not ready and
  DEGRADED) and `run(stop)`: resync after each gap, retrying with `GAP_RESYNC_RETRY`'s
  back-off until one succeeds; then the gap is closed (`Status.close_gap`) and every source
  is told (`resynced(started_at)`), unless a newer gap arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from daemon.core.engine import Engine
from daemon.core.model import Decision
from daemon.errors import ConfguardError
from daemon.genesys.retry import RetryPolicy
from daemon.service.metrics import Metrics
from daemon.service.status import Status

log = structlog.get_logger(__name__)

GAP_RESYNC_RETRY = RetryPolicy(initial=1.0, factor=2.0, cap=60.0, jitter=0.0)
"""Between failed resyncs after a gap: 1 s doubling to 60 s, unbounded (the gap stays open)."""


class TimerWake:
    """Wakes the timer loop early when the engine's next deadline moved closer."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._event = asyncio.Event()
        self.scheduled: float | None = None  # epoch s the loop sleeps until (its own record)

    def poke(self) -> None:
        deadline = self._engine.next_deadline()
        if deadline is not None and (self.scheduled is None or deadline < self.scheduled):
            self._event.set()

    async def sleep(self, until: float, seconds: float) -> None:
        """Sleep `seconds` (the loop's wake-up time is `until`, epoch s) or until poked."""
        self.scheduled = until
        self._event.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=seconds)


class Timers:
    """The rule timer loop. `submit(decisions)`: the router's. `token_age()`: seconds since
    the OAuth token was fetched (None: none yet), for `confguard_token_age_seconds`."""

    def __init__(self, engine: Engine, wake: TimerWake, *, submit: Callable[[list[Decision]], None],
                 metrics: Metrics, token_age: Callable[[], float | None],
                 clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._wake = wake
        self._submit = submit
        self._metrics = metrics
        self._token_age = token_age
        self._clock = clock

    async def run(self, stop: asyncio.Event) -> None:
        engine, metrics = self._engine, self._metrics
        while not stop.is_set():
            now = self._clock()
            deadline = engine.next_deadline()
            wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now))
            await self._wake.sleep(now + wait, wait)
            decisions = engine.tick(self._clock())
            if decisions:
                self._submit(decisions)
            metrics.tracked_calls.set(len(engine.store))
            age = self._token_age()
            if age is not None:
                metrics.token_age_seconds.set(age)


class Resyncs(Protocol):
    """What the gap watch needs from `daemon.genesys.resync.Resyncer`."""

    async def resync(self, reason: str) -> object: ...


class Resynced(Protocol):
    """What the gap watch tells each source (`daemon.service.sources.Source`)."""

    def resynced(self, started_at: float | None) -> None: ...


class GapWatch:
    """Resync after each gap (see the module docstring)."""

    def __init__(self, status: Status, engine: Engine, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._status = status
        self._engine = engine
        self._metrics = metrics
        self._clock = clock
        self._flag = asyncio.Event()

    def open(self, reason: str) -> None:
        """Events may have been missed: resync (coalesced) and report not-ready."""
        self._status.open_gap(reason)
        self._flag.set()

    async def run(self, stop: asyncio.Event, resyncer: Resyncs, sources: Sequence[Resynced]) -> None:
        flag = self._flag
        status = self._status
        if status.gap_reason:
            flag.set()
        delays = GAP_RESYNC_RETRY.backoff()
        while not stop.is_set():
            await flag.wait()
            flag.clear()
            reason = status.gap_reason or "gap"
            started = self._clock()
            try:
                await resyncer.resync(reason)
            except ConfguardError as exc:
                delay = next(delays)
                log.error("resync_failed", reason=reason, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                flag.set()
                continue
            delays = GAP_RESYNC_RETRY.backoff()
            self._metrics.tracked_calls.set(len(self._engine.store))
            if not flag.is_set():  # no newer gap arrived while resyncing
                for source in sources:
                    source.resynced(started)
                status.close_gap()
