"""Resync: re-read live calls from the REST API after the stream may have missed events.

Notification delivery has no durability, so after any gap the state store must be rebuilt
from REST. `Resyncer.resync(reason)`:

1. discovers calls still active in scope with the analytics details query
   (`client.active_conversations(queue_ids, user_ids, since=now - lookback,
   until=now + lookahead)`; analytics lags real time by seconds, hence the look-ahead);
2. adds every call the store tracks that has not ended (a call may have ended, or left the
   scope, while we were deaf; analytics may also lag);
3. orders conferences first (3+ live parties in the analytics reply, see
   `analytics_parties`, or 3+ connected parties in the store; more parties first), then the
   rest: conferences are what rules act on;
4. reads each call (skipping one that an event or another read updated after the resync
   began: it is already up to date) with `GET /api/v2/conversations/calls/{id}` at `Priority.RESYNC` through
   the client's shared limiter, `concurrency` at a time, in that order; each reply goes to
   `engine.apply_conversation(conv, now, source="resync")` and the resulting `Step` goes to
   `on_step` at once (enforcement never waits for the whole resync; the step takes the same
   path as a frame's: its change settles in-flight parties, its decisions are acted on); a
   404 marks the call gone (`engine.mark_gone`, a `Step` too). Without `on_step`, only the
   decisions go to `on_decisions`.

Errors on single calls are logged and counted (`ResyncReport.errors`), never fatal. If the
discovery query itself fails, the attempt is retried with the `RetryPolicy` back-off
(`retry`, default 3 attempts, 1 s doubling, capped at 30 s, jittered; every ConfguardError
counts, since the stream stays in its gap until a resync succeeds);
after that `resync` raises the `ConfguardError` and the caller retries later (the stream
stays in its gap until a resync completes).

Reconciliation (`Reconciler`, the periodic anti-entropy pass) re-reads only the calls that
had neither an event nor a read for `reconcile_interval`, riskiest first, within
`subscriptions.reconcile_share` of every budget window; see its docstring.

Coalescing: a resync requested while one runs schedules exactly one more after it, shared by
every request that arrived meanwhile; all of them await that next run's report.

Metrics (if given): `resyncs` (counter), `resync_duration_seconds` (histogram),
`resync_last_calls`, `resync_last_seconds` (gauges), `resync_errors{kind}` (REST reads that
failed during a pass: a call's GET other than 404, or a failed discovery attempt; `kind` is
`reconcile` for the periodic pass, `resync` for every other reason). Times are seconds; `clock` is epoch
seconds (the same clock the engine is fed).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TYPE_CHECKING

import structlog

from daemon.errors import ApiError, ConfguardError, NotFoundError
from daemon.core.ids import ConversationId, QueueId, UserId
from daemon.core.engine import Step
from daemon.core.model import Call, Decision
from daemon.genesys.ratelimit import Priority, RequestLimiter, budget_share
from daemon.genesys.retry import RetryPolicy

if TYPE_CHECKING:  # for annotations only: the genesys layer does not import the service
    from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)


class ResyncClient(Protocol):
    """The part of `daemon.genesys.api.GenesysClient` resync uses."""

    async def get_call(self, conversation_id: ConversationId, *,
                       priority: Priority = Priority.RESYNC) -> dict[str, Any]: ...

    async def active_conversations(self, *, queue_ids: Sequence[QueueId] = (),
                                   user_ids: Sequence[UserId] = (),
                                   since: float, until: float) -> list[dict[str, Any]]: ...


class EngineLike(Protocol):
    """The part of `daemon.core.engine.Engine` resync uses."""

    @property
    def store(self) -> Any: ...

    def apply_conversation(self, conv: Mapping[str, Any], now: float, *,
                           source: Any = "resync") -> Step: ...

    def mark_gone(self, conversation_id: str, now: float, /) -> Step: ...


@dataclass(slots=True)
class ResyncReport:
    """What one resync did. `seconds` is wall time from start to the last call read."""

    reason: str
    started_at: float
    finished_at: float = 0.0
    seconds: float = 0.0
    discovered: int = 0  # from analytics
    tracked: int = 0  # live calls the store already had
    calls: int = 0  # the union that was read
    conferences: int = 0
    updated: int = 0  # GET answered and applied
    gone: int = 0  # GET said 404
    errors: int = 0  # GET failed otherwise (logged, counted)
    decisions: int = 0
    rejected: int = 0  # malformed analytics entries
    fresh: int = 0  # not read: an event (or a read) updated it after this resync began
    reasons: list[str] = field(default_factory=list)


class Resyncer:
    """See the module docstring. `scope_queue_ids`/`scope_user_ids` are read at each resync
    (the daemon may update them in place on reload)."""

    def __init__(self, client: ResyncClient, engine: EngineLike,
                 scope_queue_ids: Sequence[QueueId | str], scope_user_ids: Sequence[UserId | str], *,
                 on_decisions: Callable[[list[Decision]], None] | None = None,
                 on_step: Callable[[Step], None] | None = None,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 lookback: float = 86400.0,
                 lookahead: float = 60.0,
                 concurrency: int = 8,
                 attempts: int = 3,
                 retry_initial: float = 1.0,
                 retry_max: float = 30.0,
                 retry: RetryPolicy | None = None,
                 rng: random.Random | None = None,
                 on_resynced: Callable[[ResyncReport], None] | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._client = client
        self._engine = engine
        self.scope_queue_ids = scope_queue_ids
        self.scope_user_ids = scope_user_ids
        self._on_decisions = on_decisions
        self._on_step = on_step
        self._metrics = metrics
        self._clock = clock
        self.lookback = lookback
        self.lookahead = lookahead
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy(initial=retry_initial, factor=2.0, cap=retry_max,
                                          jitter=0.5, max_attempts=max(1, attempts))
        self._on_resynced = on_resynced
        self._rng = rng or random.Random()
        # Epoch seconds of each call's last successful REST read (resync or reconciliation),
        # so reconciliation can skip what is fresh. Pruned by `Reconciler`.
        self.last_read: dict[ConversationId, float] = {}
        self._driver: asyncio.Task[None] | None = None
        self._pending: asyncio.Future[ResyncReport] | None = None
        self._pending_reasons: list[str] = []
        self.running = False
        self.last: ResyncReport | None = None
        self.completed = 0
        self.failed = 0

    # ------------------------------------------------------------------ public

    def set_scope(self, queue_ids: Sequence[QueueId | str], user_ids: Sequence[UserId | str]) -> None:
        self.scope_queue_ids = queue_ids
        self.scope_user_ids = user_ids

    async def resync(self, reason: str) -> ResyncReport:
        """Run a resync (or join the one scheduled next) and return its report.

        Raises ConfguardError when discovery failed on every attempt."""
        return await asyncio.shield(self._schedule(reason))

    def request(self, reason: str) -> asyncio.Future[ResyncReport]:
        """Fire-and-forget form of `resync` (e.g. as the stream's `on_gap`)."""
        return self._schedule(reason)

    async def aclose(self) -> None:
        if self._driver is not None and not self._driver.done():
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)

    # ------------------------------------------------------------------ coalescing

    def _schedule(self, reason: str) -> asyncio.Future[ResyncReport]:
        self._pending_reasons.append(reason)
        if self._pending is None:
            fut: asyncio.Future[ResyncReport] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieve)
            self._pending = fut
        if self.running:
            log.info("resync_coalesced", reason=reason)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive(), name="resync")
        return self._pending

    async def _drive(self) -> None:
        while self._pending is not None:
            fut, reasons = self._pending, self._pending_reasons
            self._pending, self._pending_reasons = None, []
            self.running = True
            try:
                report = await self._run_with_retries(reasons)
            except asyncio.CancelledError:
                fut.cancel()
                if self._pending is not None:
                    self._pending.cancel()
                    self._pending = None
                raise
            except BaseException as exc:  # delivered to every waiter
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(report)
            finally:
                self.running = False

    async def _run_with_retries(self, reasons: list[str]) -> ResyncReport:
        delays = self.retry.backoff(self._rng)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._run_once(reasons)
            except ConfguardError as exc:
                self.failed += 1
                if self._metrics is not None:
                    self._metrics.resync_errors.labels(kind=_error_kind(reasons)).inc()
                wait = next(delays, None)
                if wait is None:
                    log.error("resync_failed", reasons=reasons, attempts=attempt, error=str(exc))
                    raise
                log.warning("resync_attempt_failed", reasons=reasons, attempt=attempt,
                            error=str(exc), retry_in=round(wait, 2))
                await asyncio.sleep(wait)

    # ------------------------------------------------------------------ one resync

    async def _run_once(self, reasons: list[str]) -> ResyncReport:
        started = self._clock()
        mono = time.monotonic()
        report = ResyncReport(reason=reasons[0], started_at=started, reasons=list(reasons))
        log.info("resync_start", reasons=reasons)
        queue_ids = [QueueId(str(q)) for q in self.scope_queue_ids]
        user_ids = [UserId(str(u)) for u in self.scope_user_ids]
        found: list[dict[str, Any]] = []
        if queue_ids or user_ids:
            found = await self._client.active_conversations(
                queue_ids=queue_ids, user_ids=user_ids,
                since=started - self.lookback, until=started + self.lookahead)

        parties: dict[ConversationId, int] = {}
        order: dict[ConversationId, int] = {}
        for conv in found:
            cid = conv.get("conversationId") if isinstance(conv, dict) else None
            if not isinstance(cid, str) or not cid:
                report.rejected += 1
                log.warning("resync_analytics_entry_rejected", reason="missing conversationId")
                continue
            n = analytics_parties(conv)
            key = ConversationId(cid)
            parties[key] = max(parties.get(key, 0), n)
            order.setdefault(key, len(order))
        report.discovered = len(order)

        store = self._engine.store
        for cid in list(store.tracked_ids()):
            call = store.get(cid)
            if call is None or call.is_ended:
                continue
            report.tracked += 1
            parties[cid] = max(parties.get(cid, 0), call.connected_parties)
            order.setdefault(cid, len(order))

        ids = sorted(order, key=lambda c: (0 if parties.get(c, 0) >= 3 else 1,
                                          -parties.get(c, 0), order[c]))
        report.calls = len(ids)
        report.conferences = sum(1 for c in ids if parties.get(c, 0) >= 3)
        log.info("resync_reading", calls=report.calls, discovered=report.discovered,
                 tracked=report.tracked, conferences=report.conferences)

        todo: deque[ConversationId] = deque(ids)
        await _run_workers(min(self.concurrency, len(ids)), partial(self._worker, todo, report))

        report.finished_at = self._clock()
        report.seconds = time.monotonic() - mono
        self.last = report
        self.completed += 1
        if self._metrics is not None:
            self._metrics.resyncs.labels(reason=report.reason).inc()
            self._metrics.resync_duration_seconds.observe(report.seconds)
            self._metrics.resync_last_calls.set(report.calls)
            self._metrics.resync_last_seconds.set(report.seconds)
        log.info("resync_done", reasons=reasons, calls=report.calls, updated=report.updated,
                 gone=report.gone, errors=report.errors, decisions=report.decisions,
                 conferences=report.conferences, fresh=report.fresh,
                 seconds=round(report.seconds, 3))
        if self._on_resynced is not None:
            try:
                self._on_resynced(report)
            except Exception:
                log.exception("resync_on_resynced_failed")
        return report

    async def _worker(self, todo: deque[ConversationId], report: ResyncReport) -> None:
        store = self._engine.store
        while todo:
            cid = todo.popleft()
            call = store.get(cid)
            if call is not None and call.last_update > report.started_at:
                # An event (a whole-conversation snapshot) or another read brought it up to
                # date after this resync began: a GET would tell nothing new. Saves budget.
                report.fresh += 1
                continue
            step = await self._read_one(cid, report)
            if step is None:
                continue
            report.decisions += len(step.decisions)
            self._deliver(step, cid)

    def _deliver(self, step: Step, cid: ConversationId) -> None:
        """Hand one read's `Step` on (the same path as a frame's); never raises."""
        try:
            if self._on_step is not None:
                self._on_step(step)
            elif step.decisions and self._on_decisions is not None:
                self._on_decisions(step.decisions)
        except Exception:
            log.exception("resync_on_decisions_failed", conversation_id=cid)

    async def _read_one(self, cid: ConversationId, report: ResyncReport) -> Step | None:
        try:
            conv = await self._client.get_call(cid, priority=Priority.RESYNC)
        except NotFoundError:
            report.gone += 1
            self.last_read.pop(cid, None)
            log.info("resync_call_gone", conversation_id=cid)
            return self._mark_gone(cid)
        except ApiError as exc:
            report.errors += 1
            if self._metrics is not None:
                self._metrics.resync_errors.labels(kind=_error_kind(report.reasons)).inc()
            log.warning("resync_call_failed", conversation_id=cid, status=exc.status, error=str(exc))
            return None
        if not isinstance(conv, dict):
            report.errors += 1
            log.warning("resync_call_rejected", conversation_id=cid, reason="reply is not an object")
            return None
        try:
            step = self._engine.apply_conversation(conv, self._clock(), source="resync")
        except Exception:  # the core must not crash; if it does, one call must not stop resync
            report.errors += 1
            log.exception("resync_apply_failed", conversation_id=cid)
            return None
        report.updated += 1
        self.last_read[cid] = self._clock()
        return step

    def _mark_gone(self, cid: ConversationId) -> Step | None:
        try:
            return self._engine.mark_gone(cid, self._clock())
        except Exception:
            log.exception("resync_mark_gone_failed", conversation_id=cid)
        return None


_SYSTEM_PURPOSES = frozenset({"acd", "ivr", "workflow", "voicemail"})


def analytics_parties(conv: Mapping[str, Any]) -> int:
    """How many parties of an analytics conversation are still on the call.

    A participant counts when one of its sessions' last segment has no `segmentEnd`, and its
    purpose is not a system one (acd, ivr, workflow, voicemail: a queue is not a party to a
    conversation). A routed call (customer, ended acd, agent) gives 2; a conference 3+.
    Without any segment data (a sparse reply) every non-system participant counts.
    """
    ps = conv.get("participants")
    if not isinstance(ps, list):
        return 0
    live = 0
    any_segments = False
    listed = 0
    for p in ps:
        if not isinstance(p, dict) or p.get("purpose") in _SYSTEM_PURPOSES:
            continue
        listed += 1
        sessions = p.get("sessions")
        if not isinstance(sessions, list):
            continue
        for sess in sessions:
            segs = sess.get("segments") if isinstance(sess, dict) else None
            if isinstance(segs, list) and segs:
                any_segments = True
                last = segs[-1]
                if isinstance(last, dict) and not last.get("segmentEnd"):
                    live += 1
                    break
    return live if any_segments else listed


async def _run_workers(count: int, worker: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `count` tasks of `worker()` (they share one queue) until all return. The first
    error (or a cancellation of the caller) cancels the others, waits for them to end, and
    is raised as it is: no task outlives the call."""
    workers = [asyncio.create_task(worker()) for _ in range(count)]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise


def _retrieve(fut: asyncio.Future[ResyncReport]) -> None:
    """Mark a failed future's exception as seen (fire-and-forget requests)."""
    if not fut.cancelled():
        fut.exception()


def _error_kind(reasons: Sequence[str]) -> str:
    """The `kind` label of `resync_errors`: `reconcile` when the pass was only the periodic
    anti-entropy one, else `resync` (start-up, gaps, or those coalesced with a reconcile)."""
    return "reconcile" if reasons and all(r == "reconcile" for r in reasons) else "resync"


# ---------------------------------------------------------------------- reconciliation

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
      the one longest without an event or read first. Calls analytics reports live in
      scope that the store does not know (their events were all lost) go first of all.
    - Every request it makes is tagged `reconcile` with `share` in the shared limiter
      (`ratelimit.budget_share`), so per budget window it spends at most
      max(1, floor(share x allowed)) requests, at `Priority.RESYNC`, never the removals'
      reserve. When the share is spent it waits for the next window; nothing else waits.
    - Every `interval` it runs the analytics discovery (`discover`), and sets
      `confguard_reconcile_budget_share` to the fraction of the allowance it used over the
      interval just ended.

    Replies go through `resyncer`'s read path (`engine.apply_conversation`, the `Step` to its
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
        self._clock = clock or resyncer._clock
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
        store = self.resyncer._engine.store
        last_read = self.resyncer.last_read
        ranked: list[tuple[int, float, ConversationId]] = []
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
            ranked.append((reconcile_class(call), seen, cid))
        for cid in [c for c in self._unknown if c in live]:
            del self._unknown[cid]  # an event brought it in meanwhile
        for cid, parties in self._unknown.items():
            ranked.append((-2 if parties >= 3 else -1, 0.0, cid))
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
                await self._discover(now)
            todo = self.due(now)[:self.batch]
            if not todo:
                wake = min(self.next_due, period_start + self.interval,
                           next_discovery if self.discover else math.inf)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(),
                                           timeout=max(0.01, min(self.idle, wake - now)))
                continue
            queue: deque[ConversationId] = deque(todo)
            await _run_workers(min(self.concurrency, len(todo)), partial(self._worker, queue))

    # ------------------------------------------------------------------ internals

    async def _worker(self, queue: deque[ConversationId]) -> None:
        store = self.resyncer._engine.store
        while queue:
            cid = queue.popleft()
            call = store.get(cid)
            if call is not None and (call.is_ended or max(
                    call.last_update, self.resyncer.last_read.get(cid, 0.0)) > self._clock() - self.interval):
                continue  # an event came (or the call ended) while it waited for the share
            report = ResyncReport(reason=RECONCILE_TAG, started_at=self._clock(),
                                  reasons=[RECONCILE_TAG])
            step = await self.resyncer._read_one(cid, report)
            self._unknown.pop(cid, None)
            self.stats.reads += report.updated
            self.stats.gone += report.gone
            self.stats.errors += report.errors
            if step is not None:
                self.stats.decisions += len(step.decisions)
                self.resyncer._deliver(step, cid)

    async def _discover(self, now: float) -> None:
        rs = self.resyncer
        queue_ids = [QueueId(str(q)) for q in rs.scope_queue_ids]
        user_ids = [UserId(str(u)) for u in rs.scope_user_ids]
        if not queue_ids and not user_ids:
            return
        try:
            found = await rs._client.active_conversations(
                queue_ids=queue_ids, user_ids=user_ids,
                since=now - rs.lookback, until=now + rs.lookahead)
        except ConfguardError as exc:
            if self._metrics is not None:
                self._metrics.resync_errors.labels(kind=RECONCILE_TAG).inc()
            log.warning("reconcile_discovery_failed", error=str(exc))
            return
        self.stats.discoveries += 1
        store = rs._engine.store
        new = 0
        for conv in found:
            cid = conv.get("conversationId") if isinstance(conv, dict) else None
            if not isinstance(cid, str) or not cid:
                log.warning("resync_analytics_entry_rejected", reason="missing conversationId")
                continue
            key = ConversationId(cid)
            if store.get(key) is None and key not in self._unknown:
                self._unknown[key] = analytics_parties(conv)
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
