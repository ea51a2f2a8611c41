"""The event router: every input of the daemon (a frame of any source, a REST reply) ->
the engine -> the enforcer, in one synchronous turn of the event loop.

- `EventRouter.frame(raw, received_at, source=...)` (the `Sink` of
  `daemon.service.sources`): optionally appends the frame to the `--record` file, then
  `Engine.feed` parses it once, folds it in and judges it; the message is counted
  (`confguard_events_received_total{topic}`), the `Step` accounted (`StepAccounts`) and
  handed to `Enforcer.handle`, and the parsed message is returned to the source.
- `EventRouter.step(step, source=...)`: a `Step` the engine made from a REST reply (resync,
  reconciliation, take-over and recovery reads) takes the same path.
- `await EventRouter.reread(cid, source=...)`: "re-read this call now" (`Priority.NORMAL`,
  coalesced per call); `await read_call(cid)`: the same read at `Priority.ENFORCE`,
  returning the call (None for a 404), for the HA take-over and the start-up recovery.
- `EventRouter.submit(decisions)`: decisions with no state change behind them (timers, a
  reload's re-evaluation, removals possible again).
- `reject(...)` and `gap(...)`: the rest of the `Sink` protocol.

`StepAccounts` is what every `Step` passes through before the enforcer, wherever it comes
from (the router, or the enforcer's own confirming reads, which it is given to): malformed
input counted once per reason in `confguard_events_rejected_total{source, reason}` with one
`event_rejected` line, the `tracked_calls` gauge, event-to-decision latency, and a nudge
to the timer loop when a rule deadline moved closer (`wake`). Nothing here awaits but the
reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import IO, Any, Protocol

import orjson
import structlog

from daemon.core.coverage import Coverage
from daemon.core.engine import Engine, Step
from daemon.core.events import Message, Rejected, excerpt
from daemon.core.ids import ConversationId
from daemon.core.model import Decision
from daemon.errors import ApiError, ConfigError, NotFoundError
from daemon.genesys.ratelimit import Priority
from daemon.service.enforcer import Enforcer
from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)
event_log = structlog.get_logger(__name__)

#: The `source` label of steps made from REST replies (resync, reconcile, confirm, re-reads).
REST = "rest"


def _debug_enabled() -> bool:
    """Whether debug lines are emitted, so the hot path builds its per-event line only then."""
    bound = structlog.get_logger(__name__).bind()
    check = getattr(bound, "is_enabled_for", None)
    return bool(check(logging.DEBUG)) if callable(check) else True


class CallReader(Protocol):
    """What the router needs from `daemon.genesys.api.GenesysClient`."""

    async def get_call(self, conversation_id: ConversationId | str, *,
                       priority: Priority = ...) -> dict[str, Any]: ...


class Recorder:
    """The `--record` file: every frame as one JSON line `{"ts": epoch s, "raw": text}`,
    flushed at once (a recording matters most when the process dies)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise ConfigError(f"cannot open the --record file {path}: {exc.strerror or exc}") from None

    def write(self, raw: bytes | str, received_at: float) -> None:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        self._file.write(orjson.dumps({"ts": received_at, "raw": text}) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class StepAccounts:
    """Counts and logs what every `Step` says before it reaches the enforcer (see the module
    docstring). `wake()`: called after each step and batch of decisions (the timer loop
    checks whether the next rule deadline moved closer)."""

    def __init__(self, engine: Engine, metrics: Metrics, *, clock: Callable[[], float] = time.time,
                 wake: Callable[[], None] = lambda: None,
                 coverage: Coverage | None = None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._clock = clock
        self._wake = wake
        #: The coverage books: every step with a change carries a whole conversation (an
        #: event or a read), so that call counts as read from now on.
        self.coverage = coverage

    def note(self, step: Step, *, source: str, raw: bytes | str | None = None,
             decided: float | None = None) -> None:
        """Count and record one step (after its decisions went to the enforcer);
        `decided`: when they were made (epoch seconds; default now)."""
        if step.rejected:
            self.rejected(step, source, raw)
        if step.change is not None:
            self._metrics.tracked_calls.set(len(self._engine.store))
            if self.coverage is not None:
                call = step.change.call
                self.coverage.seen(ConversationId(call.id), self._clock(),
                                   conference=call.connected_parties >= 3, ended=call.is_ended)
        self.latency(step.decisions, decided)

    def note_rest(self, step: Step) -> None:
        """`note` for a step made from a REST reply (the enforcer's confirming reads)."""
        self.note(step, source=REST)
        self._wake()

    def rejected(self, step: Step, source: str, raw: bytes | str | None) -> None:
        """Malformed input, counted by reason and logged once: a frame refused whole, or a
        snapshot (frame or REST reply) applied in part (`applied` true: a participant
        skipped, a wrong-typed field ignored)."""
        for reason in step.rejected:
            self._metrics.events_rejected.labels(source=source, reason=reason).inc()
        message = step.message
        text = getattr(message, "excerpt", None)
        if text is None:
            text = excerpt(raw) if raw is not None else ""
        log.warning("event_rejected", reason=step.rejected[0], reasons=list(step.rejected),
                    applied=not isinstance(message, Rejected), source=source,
                    conversation_id=step.change.call.id if step.change is not None else None,
                    excerpt=text)

    def latency(self, decisions: list[Decision], decided: float | None = None) -> None:
        """Event-to-decision seconds of each decision; `decided`: epoch seconds (now)."""
        if not decisions:
            return
        now = self._clock() if decided is None else decided
        for d in decisions:
            if d.received_at is not None:
                self._metrics.event_to_decision_seconds.observe(max(0.0, now - d.received_at))

    def wake(self) -> None:
        self._wake()


class EventRouter:
    """Frame or REST reply -> engine -> enforcer. See the module docstring.

    `on_gap(reason)`: a source reported that events may have been missed (the daemon
    resyncs). `recorder`: the `--record` file or None. `clock`: epoch seconds."""

    def __init__(self, engine: Engine, enforcer: Enforcer, accounts: StepAccounts,
                 client: CallReader, metrics: Metrics, *, on_gap: Callable[[str], None],
                 recorder: Recorder | None = None, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.enforcer = enforcer
        self.accounts = accounts
        self._client = client
        self._metrics = metrics
        self._on_gap = on_gap
        self._recorder = recorder
        self._clock = clock
        self._trace_events = _debug_enabled()
        self._rereads: dict[str, asyncio.Future[bool]] = {}

    # ------------------------------------------------------------------ the Sink protocol

    def frame(self, raw: bytes | str, received_at: float, *, source: str) -> Message:
        """One frame (WebSocket shape), synchronously: parse, apply, decide, act."""
        if self._recorder is not None:
            self._recorder.write(raw, received_at)
        fed = self.engine.feed(raw, received_at)
        message = fed.message
        assert message is not None  # feed always parses
        self.step(fed, source=source, raw=raw)
        topic = getattr(message, "topic", None)  # counted after a removal's PATCH is under way
        if topic is not None and not isinstance(message, Rejected):
            self._metrics.child(self._metrics.events_received, topic).inc()
        if self._trace_events:  # the canonical line per processed event (at debug level)
            change = fed.change
            event_log.debug("event", kind=type(message).__name__, topic=topic,
                            conversation_id=change.call.id if change else None,
                            changed=[p.id for p in change.changed] if change else [],
                            decisions=[d.rule for d in fed.decisions],
                            processing_us=round((self._clock() - received_at) * 1e6, 1))
        return message

    def reject(self, *, source: str, reason: str, excerpt: str) -> None:
        """A message of `source` that never became a frame: counted and logged once."""
        self._metrics.events_rejected.labels(source=source, reason=reason).inc()
        log.warning("event_rejected", reason=reason, reasons=[reason], applied=False,
                    source=source, conversation_id=None, excerpt=excerpt)

    def gap(self, reason: str, *, source: str) -> None:
        self._on_gap(reason)

    async def reread(self, conversation_id: ConversationId | str, *, source: str) -> bool:
        """Re-read one call now (`Priority.NORMAL`), coalesced per call; folded in like a
        frame. False when the read failed (logged `reread_failed`)."""
        cid = str(conversation_id)
        running = self._rereads.get(cid)
        if running is not None:
            return await asyncio.shield(running)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._rereads[cid] = fut
        try:
            await self.read_call(cid, priority=Priority.NORMAL)
            ok = True
        except (ApiError, ValueError) as exc:
            log.warning("reread_failed", conversation_id=cid, source=source, error=str(exc))
            ok = False
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: whoever shares it gets it raised
            raise
        finally:
            del self._rereads[cid]
        fut.set_result(ok)
        return ok

    # ------------------------------------------------------------------ REST input

    def step(self, step: Step, *, source: str = REST, raw: bytes | str | None = None) -> None:
        """Every engine result (frame, REST read, 404) takes this one path to enforcement.
        The enforcer first; the books (metrics, coverage, a rejection's line, the timer
        loop's wake-up) after it, and after the first step of any PATCH task it started,
        so that none of them comes between an event and its removal's PATCH."""
        decided = self._clock() if step.decisions else None
        removals = self.enforcer.handle(step)
        if any(not r.done() for r in removals):
            # A PATCH task was started: the books run after its first step (callbacks run
            # in the order scheduled), which writes the PATCH unless it has to wait.
            asyncio.get_running_loop().call_soon(self._books, step, source, raw, decided)
        else:
            self._books(step, source, raw, decided)

    def _books(self, step: Step, source: str, raw: bytes | str | None,
               decided: float | None) -> None:
        self.accounts.note(step, source=source, raw=raw, decided=decided)
        self.accounts.wake()

    def submit(self, decisions: Iterable[Decision]) -> None:
        """Decisions with no state change behind them (timers, a reload's re-evaluation)."""
        batch = list(decisions)
        self.accounts.latency(batch)
        self.enforcer.submit_all(batch)
        self.accounts.wake()

    def act_now(self, reason: str) -> None:
        """Removals became possible again (HA: this node took over): act at once on every
        live party that matches a disconnect rule (`Enforcer.act_now`)."""
        self.enforcer.act_now(reason)
        self.accounts.wake()

    async def read_call(self, conversation_id: str, *,
                        priority: Priority = Priority.ENFORCE) -> dict[str, Any] | None:
        """GET one call (default ENFORCE priority) and fold it in (None: 404, the call is
        marked gone). Raises ApiError, or ValueError for a reply that is not an object."""
        try:
            conv = await self._client.get_call(conversation_id, priority=priority)
        except NotFoundError:
            self.step(self.engine.mark_gone(conversation_id, self._clock()))
            return None
        if not isinstance(conv, dict):
            raise ValueError("the call reply is not a JSON object")
        self.step(self.engine.apply_conversation(conv, self._clock(), source="resync"))
        return conv

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
