"""Reconciliation: the periodic anti-entropy pass over the calls the stream may have lost.

Genesys never reports a lost event, so `Reconciler` re-reads the calls that had neither an
event nor a read for `subscriptions.reconcile_interval`, riskiest first, within
`subscriptions.reconcile_share` of every budget window, and every interval asks analytics
for live in-scope calls the store does not know. It reads, discovers and delivers through
the `Resyncer`'s public API (`read`, `discover`, `deliver`, `store`, `last_read`), so a
reconciliation read takes exactly the path of a resync read. See `Reconciler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import structlog

from daemon.core.ids import ConversationId
from daemon.core.model import Call
from daemon.errors import ConfguardError
from daemon.genesys.ratelimit import RequestLimiter, budget_share
from daemon.genesys.resync import Resyncer, ResyncReport, run_workers

if TYPE_CHECKING:  # for annotations only: the genesys layer does not import the service
    from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)

RECONCILE_TAG = "reconcile"
"""The limiter tag of every request reconciliation makes (see `ratelimit.budget_share`)."""
_OUTSIDE_PURPOSES = frozenset({"customer", "external"})


def reconcile_class(call: Call) -> int:
    """How likely a call is to break a rule, as a sort key (lower first): 0 a conference
    (3+ connected parties), 1 a call with a live customer or external party, 2 the rest."""
    if call.connected_parties >= 3:
        return 0
    if any(p.is_live and p.purpose in _OUTSIDE_PURPOSES for p in call.participants.values()):
        return 1
    return 2


@dataclass(slots=True)
class ReconcileStats:
    """What reconciliation did since start (counters) and at its last scan (gauges).

    `share_used`: fraction of the allowance reconciliation used over its last full
    interval (the `confguard_reconcile_budget_share` gauge)."""

    reads: int = 0  # GETs answered and applied
    gone: int = 0
    errors: int = 0
    decisions: int = 0
    discoveries: int = 0  # analytics passes
    discovered_unknown: int = 0  # live in-scope calls analytics knew and the store did not
    scans: int = 0
    last_due: int = 0  # calls due at the last scan
    last_fresh: int = 0  # calls skipped at the last scan: an event or read within the interval
    share_used: float = 0.0


class Reconciler:
    """Anti-entropy that scales: Genesys never reports a lost event, so calls are re-read
    over REST, within a share of the request budget, riskiest first.

    - A live tracked call is due once it has had neither an event that changed it nor a
      REST read for `interval` seconds (a call that had an event since its last read is
      fresh, and skipped).
    - Due calls are read in order: conferences (3+ connected parties), then calls with a
      live customer or external party, then the rest (`reconcile_class`); within a class,
      the one longest without an event or read first; with ageing: each class is worth
      `interval` seconds of waiting (key: last event or read + class x interval), so a
      routed call unread an interval longer than a conference goes first and no class
      waits forever behind a stream of due conferences. Calls analytics reports live in
      scope that the store does not know (their events were all lost) go first of all.
    - Every request it makes is tagged `reconcile` with `share` in the shared limiter
      (`ratelimit.budget_share`), so per budget window it spends at most
      max(1, floor(share x allowed)) requests, at `Priority.RESYNC`, never the removals'
      reserve. When the share is spent it waits for the next window; nothing else waits.
    - Every `interval` it runs the analytics discovery (`discover`), and sets
      `confguard_reconcile_budget_share` to the fraction of the allowance it used over the
      interval just ended.

    Replies go through `resyncer`'s read path (`Resyncer.read`/`deliver` : `engine.apply_conversation`, the `Step` to its
    `on_step` at once; 404 marks the call gone; other errors are logged and counted as
    `resync_errors{kind="reconcile"}`). `clock` is epoch seconds (the engine's); `idle`
    bounds how long it sleeps between scans when nothing is due (seconds); `batch` calls are
    taken per scan, `concurrency` read at a time; `window` is the budget window's length in
    `clock` seconds (60), for the share gauge.
    """

    def __init__(self, resyncer: Resyncer, *, interval: float, share: float,
                 limiter: RequestLimiter | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] | None = None, concurrency: int = 4,
                 discover: bool = True, idle: float = 5.0, batch: int = 32,
                 window: float = 60.0) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if not 0.0 < share <= 1.0:
            raise ValueError("share must be within (0, 1]")
        self.resyncer = resyncer
        self.interval = interval
        self.share = share
        self.limiter = limiter
        self._metrics = metrics
        self._clock = clock or resyncer.clock
        self.concurrency = max(1, concurrency)
        self.discover = discover
        self.idle = idle
        self.batch = max(1, batch)
        self.window = window  # seconds of `clock` per budget window, for the share gauge
        self.stats = ReconcileStats()
        self._unknown: dict[ConversationId, int] = {}  # discovered, not tracked: parties
        self.next_due = math.inf  # when the freshest skipped call falls due (engine clock)

    # ------------------------------------------------------------------ scheduling

    def due(self, now: float) -> list[ConversationId]:
        """The calls to re-read now, in order (see the class docstring)."""
        store = self.resyncer.store
        last_read = self.resyncer.last_read
        ranked: list[tuple[int, float, ConversationId]] = []  # (group, key, id)
        fresh = 0
        next_due = math.inf
        live: set[ConversationId] = set()
        for cid in list(store.tracked_ids()):
            call = store.get(cid)
            if call is None or call.is_ended:
                continue
            live.add(cid)
            seen = max(call.last_update, last_read.get(cid, 0.0))
            if seen > now - self.interval:
                fresh += 1
                next_due = min(next_due, seen + self.interval)
                continue
            # Ageing (as `daemon.core.coverage.read_order`): a class is worth `interval`
            # seconds of waiting, so a long-unread routed call is not starved by conferences.
            ranked.append((0, seen + reconcile_class(call) * self.interval, cid))
        for cid in [c for c in self._unknown if c in live]:
            del self._unknown[cid]  # an event brought it in meanwhile
        for cid, parties in self._unknown.items():
            ranked.append((-2 if parties >= 3 else -1, 0.0, cid))  # unknown: first of all
        for cid in [c for c in last_read if c not in live]:
            del last_read[cid]  # ended or evicted: forget it
        ranked.sort()
        self.stats.last_due = len(ranked)
        self.stats.last_fresh = fresh
        self.stats.scans += 1
        self.next_due = next_due
        return [cid for _, _, cid in ranked]

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile until `stop` is set (or the task is cancelled)."""
        budget_share.set((RECONCILE_TAG, self.share))  # this task and the workers it starts
        start = self._clock()
        next_discovery = start + self.interval  # start-up resync has just discovered
        period_start, granted0 = start, self._granted()
        while not stop.is_set():
            now = self._clock()
            if now - period_start >= self.interval:
                self._report_share(now - period_start, self._granted() - granted0)
                period_start, granted0 = now, self._granted()
            if self.discover and now >= next_discovery:
                next_discovery = now + self.interval
                await self.discover_unknown(now)
            todo = self.due(now)[:self.batch]
            if not todo:
                wake = min(self.next_due, period_start + self.interval,
                           next_discovery if self.discover else math.inf)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(),
                                           timeout=max(0.01, min(self.idle, wake - now)))
                continue
            queue: deque[ConversationId] = deque(todo)
            await run_workers(min(self.concurrency, len(todo)), partial(self._worker, queue))

    # ------------------------------------------------------------------ internals

    async def _worker(self, queue: deque[ConversationId]) -> None:
        store = self.resyncer.store
        while queue:
            cid = queue.popleft()
            call = store.get(cid)
            if call is not None and (call.is_ended or max(
                    call.last_update, self.resyncer.last_read.get(cid, 0.0)) > self._clock() - self.interval):
                continue  # an event came (or the call ended) while it waited for the share
            report = ResyncReport(reason=RECONCILE_TAG, started_at=self._clock(),
                                  reasons=[RECONCILE_TAG])
            step = await self.resyncer.read(cid, report)
            self._unknown.pop(cid, None)
            self.stats.reads += report.updated
            self.stats.gone += report.gone
            self.stats.errors += report.errors
            if step is not None:
                self.stats.decisions += len(step.decisions)
                self.resyncer.deliver(step, cid)

    async def discover_unknown(self, now: float) -> None:
        """One analytics discovery (`Resyncer.discover`); the live in-scope calls the store
        does not know are read first of all at the next scans. A failure is logged and
        counted (`resync_errors{kind="reconcile"}`), never raised."""
        rs = self.resyncer
        if not rs.scope.queue_ids and not rs.scope.user_ids:
            return
        try:
            found = await rs.discover(now)
        except ConfguardError as exc:
            if self._metrics is not None:
                self._metrics.resync_errors.labels(kind=RECONCILE_TAG).inc()
            log.warning("reconcile_discovery_failed", error=str(exc))
            return
        self.stats.discoveries += 1
        store = rs.store
        new = 0
        for cid, parties in found.parties.items():
            if store.get(cid) is None and cid not in self._unknown:
                self._unknown[cid] = parties
                new += 1
        self.stats.discovered_unknown += new
        if new:
            log.info("reconcile_discovered", calls=new)

    def _granted(self) -> int:
        return 0 if self.limiter is None else self.limiter.granted["tag:" + RECONCILE_TAG]

    def _report_share(self, seconds: float, requests: int) -> None:
        if self.limiter is None or seconds <= 0:
            return
        allowed = self.limiter.allowed
        if not allowed:
            return
        share = min(1.0, requests / (allowed * seconds / self.window))
        self.stats.share_used = share
        if self._metrics is not None:
            self._metrics.reconcile_budget_share.set(share)
        log.info("reconcile_share", share=round(share, 3), requests=requests,
                 seconds=round(seconds, 1), due=self.stats.last_due, fresh=self.stats.last_fresh)
