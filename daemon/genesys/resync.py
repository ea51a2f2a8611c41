"""Resync: re-read live calls from the REST API after the stream may have missed events.

Notification delivery has no durability, so after any gap the state store must be rebuilt
from REST. `Resyncer.resync(reason)`:

1. discovers calls still active in scope with the analytics details query
   (`client.active_conversations(queue_ids, user_ids, since=now - lookback,
   until=now + lookahead)`; analytics lags real time by seconds, hence the look-ahead);
2. adds every call the store tracks that has not ended (a call may have ended, or left the
   scope, while we were deaf; analytics may also lag);
3. orders the calls with `daemon.core.coverage.read_order`: conferences first (3+ live
   parties in the analytics reply, see `analytics_parties`, or 3+ connected parties in the
   store; more parties first), then calls with a live customer or external party, then the
   rest, with ageing (`age_step`): a call that has waited unread (listed by an earlier
   resync and not read since) a class' worth of seconds longer than another goes before
   it, so nothing waits forever; calls that became stale together (a gap: all of them)
   are read in strict class order. The list is handed to `coverage` (`Coverage.stale`) and `on_listed(report)`
   is called: the daemon sends READY=1 there, the reads go on after it;
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

Public API (used by the daemon and by `daemon.genesys.reconcile.Reconciler`, the periodic
anti-entropy pass, which reads through it): `resync(reason)`, `request(reason)`,
`set_scope(scope)` (a `daemon.genesys.scope.Scope` value; reload replaces it, the next
discovery reads it), `discover(now) -> Discovered` (the one analytics discovery step),
`read(cid, report) -> Step | None` (one GET applied to the engine), `deliver(step, cid)`
(hand a read's `Step` on), `store`, `clock`, `last_read`, `aclose()`.

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
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TYPE_CHECKING

import structlog

from daemon.errors import ApiError, ConfguardError, NotFoundError
from daemon.core.coverage import DEFAULT_AGE_STEP, CallClass, Candidate, Coverage, call_class, read_order
from daemon.core.ids import ConversationId, QueueId, UserId
from daemon.core.engine import Step
from daemon.core.model import Decision
from daemon.genesys.ratelimit import Priority
from daemon.genesys.retry import RetryPolicy
from daemon.genesys.scope import Scope

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


@dataclass(frozen=True, slots=True)
class Discovered:
    """What one analytics discovery found: live parties per conversation (`analytics_parties`,
    the highest when a call is listed twice), in the order analytics listed them; and how
    many entries were malformed (no conversationId: logged, skipped)."""

    parties: dict[ConversationId, int] = field(default_factory=dict)
    rejected: int = 0
    outside: set[ConversationId] = field(default_factory=set)  # a live customer/external party


class Resyncer:
    """See the module docstring. `scope` (a `Scope` value) is read at each discovery;
    `set_scope` replaces it (reload)."""

    def __init__(self, client: ResyncClient, engine: EngineLike, scope: Scope, *,
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
                 on_resynced: Callable[[ResyncReport], None] | None = None,
                 coverage: Coverage | None = None,
                 on_listed: Callable[[ResyncReport], None] | None = None,
                 age_step: float = DEFAULT_AGE_STEP) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._client = client
        self._engine = engine
        self.scope = scope
        self._on_decisions = on_decisions
        self._on_step = on_step
        self._metrics = metrics
        #: Epoch seconds (the engine's clock); what reads stamp `last_read` with.
        self.clock = clock
        self.lookback = lookback
        self.lookahead = lookahead
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy(initial=retry_initial, factor=2.0, cap=retry_max,
                                          jitter=0.5, max_attempts=max(1, attempts))
        self._on_resynced = on_resynced
        #: The coverage books (`daemon.core.coverage`): what each resync lists is unread
        #: until read or seen in an event; reads and 404s are noted here too.
        self.coverage = coverage if coverage is not None else Coverage()
        #: Called once per resync, after discovery, when the reading list is known.
        self.on_listed = on_listed
        self.age_step = age_step
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

    def set_scope(self, scope: Scope) -> None:
        """Read `scope` from the next discovery on (reload); a resync under way keeps the
        calls it already found."""
        self.scope = scope

    @property
    def store(self) -> Any:
        """The engine's call store (`daemon.core.state.CallStore`)."""
        return self._engine.store

    async def discover(self, now: float) -> Discovered:
        """The calls analytics reports active in scope around `now` (epoch s): one
        `active_conversations` query from `now - lookback` to `now + lookahead`. Empty
        (and no request) when the scope names no queue and no user. Raises what the
        client raises (ConfguardError)."""
        found: list[Any] = []
        scope = self.scope
        if scope.queue_ids or scope.user_ids:
            found = await self._client.active_conversations(
                queue_ids=list(scope.queue_ids), user_ids=list(scope.user_ids),
                since=now - self.lookback, until=now + self.lookahead)
        parties: dict[ConversationId, int] = {}
        outside: set[ConversationId] = set()
        rejected = 0
        for conv in found:
            cid = conv.get("conversationId") if isinstance(conv, dict) else None
            if not isinstance(cid, str) or not cid:
                rejected += 1
                log.warning("resync_analytics_entry_rejected", reason="missing conversationId")
                continue
            key = ConversationId(cid)
            parties[key] = max(parties.get(key, 0), analytics_parties(conv))
            if analytics_outside(conv):
                outside.add(key)
        return Discovered(parties, rejected, outside)

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
                    self._metrics.resync_errors.labels(kind=error_kind(reasons)).inc()
                wait = next(delays, None)
                if wait is None:
                    log.error("resync_failed", reasons=reasons, attempts=attempt, error=str(exc))
                    raise
                log.warning("resync_attempt_failed", reasons=reasons, attempt=attempt,
                            error=str(exc), retry_in=round(wait, 2))
                await asyncio.sleep(wait)

    # ------------------------------------------------------------------ one resync

    async def _run_once(self, reasons: list[str]) -> ResyncReport:
        started = self.clock()
        mono = time.monotonic()
        report = ResyncReport(reason=reasons[0], started_at=started, reasons=list(reasons))
        log.info("resync_start", reasons=reasons)
        discovered = await self.discover(started)
        report.rejected = discovered.rejected
        report.discovered = len(discovered.parties)
        cands, report.tracked = self._candidates(discovered, started)
        ids = read_order(cands, age_step=self.age_step)
        conferences = {c.id for c in cands if c.klass is CallClass.CONFERENCE}
        report.calls = len(ids)
        report.conferences = len(conferences)
        self.coverage.stale(((c, c in conferences) for c in ids), since=started)
        log.info("resync_reading", calls=report.calls, discovered=report.discovered,
                 tracked=report.tracked, conferences=report.conferences)
        if self.on_listed is not None:
            try:
                self.on_listed(report)
            except Exception:
                log.exception("resync_on_listed_failed")

        todo: deque[ConversationId] = deque(ids)
        await run_workers(min(self.concurrency, len(ids)), partial(self._worker, todo, report))

        report.finished_at = self.clock()
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

    def _candidates(self, discovered: Discovered,
                    started: float) -> tuple[list[Candidate], int]:
        """Every call to read (what analytics listed, then every live call the store tracks),
        classed for `read_order`, and how many the store tracked. A call's `since` is when
        it became unread: `started` (this resync made it stale), or earlier when an earlier
        resync listed it and it has not been read since (ageing counts waiting unread, so
        a gap, which makes every call stale at once, reads in strict class order)."""
        store = self._engine.store
        cov = self.coverage

        def since(cid: ConversationId) -> float:
            at = cov.unread_since(cid)
            return started if at is None else min(at, started)

        cands: dict[ConversationId, Candidate] = {}
        for cid, n in discovered.parties.items():
            klass = (CallClass.CONFERENCE if n >= 3 else
                     CallClass.OUTSIDE if cid in discovered.outside else CallClass.OTHER)
            cands[cid] = Candidate(cid, klass, since(cid), n)
        tracked = 0
        for cid in list(store.tracked_ids()):
            call = store.get(cid)
            if call is None or call.is_ended:
                continue
            tracked += 1
            found = cands.get(cid)
            klass = call_class(call)
            parties = call.connected_parties
            if found is not None:
                klass = min(klass, found.klass)
                parties = max(parties, found.parties)
            cands[cid] = Candidate(cid, klass, since(cid), parties)
        return list(cands.values()), tracked

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
            step = await self.read(cid, report)
            if step is None:
                continue
            report.decisions += len(step.decisions)
            self.deliver(step, cid)

    def deliver(self, step: Step, cid: ConversationId) -> None:
        """Hand one read's `Step` on (the same path as a frame's); never raises."""
        try:
            if self._on_step is not None:
                self._on_step(step)
            elif step.decisions and self._on_decisions is not None:
                self._on_decisions(step.decisions)
        except Exception:
            log.exception("resync_on_decisions_failed", conversation_id=cid)

    async def read(self, cid: ConversationId, report: ResyncReport) -> Step | None:
        """GET the call at `Priority.RESYNC` and apply it (`engine.apply_conversation`,
        source "resync"); the resulting `Step`, or None. A 404 marks the call gone (its
        `Step`); other failures are logged and counted in `report` and
        `resync_errors{kind}`, never raised. Stamps `last_read[cid]` on success."""
        try:
            conv = await self._client.get_call(cid, priority=Priority.RESYNC)
        except NotFoundError:
            report.gone += 1
            self.last_read.pop(cid, None)
            self.coverage.gone(cid)
            log.info("resync_call_gone", conversation_id=cid)
            return self._mark_gone(cid)
        except ApiError as exc:
            report.errors += 1
            if self._metrics is not None:
                self._metrics.resync_errors.labels(kind=error_kind(report.reasons)).inc()
            log.warning("resync_call_failed", conversation_id=cid, status=exc.status, error=str(exc))
            return None
        if not isinstance(conv, dict):
            report.errors += 1
            log.warning("resync_call_rejected", conversation_id=cid, reason="reply is not an object")
            return None
        try:
            step = self._engine.apply_conversation(conv, self.clock(), source="resync")
        except Exception:  # the core must not crash; if it does, one call must not stop resync
            report.errors += 1
            log.exception("resync_apply_failed", conversation_id=cid)
            return None
        report.updated += 1
        now = self.clock()
        self.last_read[cid] = now
        call = step.change.call if step.change is not None else None
        self.coverage.seen(cid, now, conference=None if call is None else call.connected_parties >= 3,
                           ended=call is not None and call.is_ended)
        return step

    def _mark_gone(self, cid: ConversationId) -> Step | None:
        try:
            return self._engine.mark_gone(cid, self.clock())
        except Exception:
            log.exception("resync_mark_gone_failed", conversation_id=cid)
        return None


_SYSTEM_PURPOSES = frozenset({"acd", "ivr", "workflow", "voicemail"})


def analytics_outside(conv: Mapping[str, Any]) -> bool:
    """Whether an analytics conversation has a customer or external participant whose last
    segment has not ended (or, in a sparse reply without segments, any such participant)."""
    ps = conv.get("participants")
    if not isinstance(ps, list):
        return False
    for p in ps:
        if not isinstance(p, dict) or p.get("purpose") not in ("customer", "external"):
            continue
        sessions = p.get("sessions")
        if not isinstance(sessions, list):
            return True
        for sess in sessions:
            segs = sess.get("segments") if isinstance(sess, dict) else None
            if not isinstance(segs, list) or not segs:
                return True
            last = segs[-1]
            if isinstance(last, dict) and not last.get("segmentEnd"):
                return True
    return False


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


async def run_workers(count: int, worker: Callable[[], Coroutine[Any, Any, None]]) -> None:
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


def error_kind(reasons: Sequence[str]) -> str:
    """The `kind` label of `resync_errors`: `reconcile` when the pass was only the periodic
    anti-entropy one, else `resync` (start-up, gaps, or those coalesced with a reconcile)."""
    return "reconcile" if reasons and all(r == "reconcile" for r in reasons) else "resync"
