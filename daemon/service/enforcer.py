"""Enforcement's I/O shell: turn `Decision`s into exactly one PATCH per party, confirmed, audited.

The state (who was acted on, what is in flight, what was suppressed or held, what the
safety valve allows, what each outcome means) is `daemon.core.enforcement.Enforcement`,
shared with the rules through the core `Engine`; this module only does the I/O.

Contract:

- `Enforcer.handle(step)` is the one way state changes reach enforcement: every `Step` the
  `Engine` returns (a frame, a resync or reconciliation read, a 404) goes here. Parties in
  flight that the step shows final (`step.settled`) have their confirmations resolved; the
  step's decisions are submitted. The enforcer's own confirming reads (`GET` of the call)
  are folded into the engine the same way (`engine.apply_conversation` / `mark_gone`).
- `submit(decision) -> Removal` (and `submit_all`) is SYNCHRONOUS and called from the
  WebSocket receive callback, the resync, the timers, or the control API (a manual decision:
  `daemon.core.enforcement.manual_decision`, carrying an `Origin` that the audit records).
  For each decision: count it (`metrics.decisions`), write the audit `decision` record (in
  the page cache BEFORE any PATCH for it exists, and on disk before the PATCH is written:
  the action's task first awaits `audit.wait_durable()`, one fdatasync shared by every
  decision written meanwhile, unless `sync_before_patch` is off), log one line `decision`
  carrying every decision field (INFO for rules of severity info, else WARNING; when a
  PATCH task is started, the line is written at the loop's next iteration, after the PATCH
  task's first step, so that building it does not delay the PATCH), then act as
  `Enforcement.admit` says:
    * rule action `observe`, or `observe` mode: an `observed` outcome; nothing is sent;
    * draining (`stop_accepting`): `suppressed`, "daemon stopping";
    * the party has an action in flight: the decision JOINS it (nothing sent twice; its
      outcome record, written when the action ends, has the same outcome, `attempts` 0 and
      an error naming the rule it joined);
    * the rule already acted on the party (and did not fail): `suppressed`;
    * the party already final in the state: `already_gone`, nothing sent;
    * the send gate closed (`gate.may_send()` False: an HA standby): `standby`, nothing
      sent; the decision is held and acted on when the gate opens (`act_now`);
    * the safety valve refuses: `suppressed`, one CRITICAL `safety_valve_tripped` line when
      it trips, the gauge `confguard_safety_valve_tripped` set to 1; the decision is held
      and acted on when the valve is resumed (`resume_valve`);
    * else the PATCH task is created with `loop.create_task` in this same turn of the event
      loop (no polling, no queue between the decision and the request).
  `submit` never raises: a failure with one decision is logged and the next one is handled.
- `Removal` (the handle `submit` returns): `state` moves from `pending` to a final outcome
  (disconnected, already_gone, failed, suppressed, observed, unconfirmed, standby), with
  `http_status`, `attempts`, `requested_at` / `sent_at` / `confirmed_at` (epoch s, the
  enforcer's clock) and `error`; `await removal.wait()` returns the final state.
- Per action (`attempts` counts PATCHes this module sent; the client's own retries of
  429/5xx/transport errors inside one call are not counted). Immediately before each PATCH
  the send gate is asked (`gate.may_send()`); closed -> `standby`, nothing (more) sent.
    * the party seen final (a settled step) before a PATCH is sent -> `already_gone`;
    * 2xx -> CONFIRM: the party must show final within `confirm_timeout` seconds (a settled
      step) or, when none comes in time, one `GET` of the call, folded into the engine
      (404, or the participant final or absent -> confirmed). Confirmed -> `disconnected`.
      Not confirmed -> an `unconfirmed` record and the PATCH is retried ONCE; still not
      confirmed -> final `unconfirmed` and the rule is re-armed;
    * 404 -> `already_gone`; but when an earlier PATCH of the same action was accepted,
      `disconnected`;
    * 409 -> retried after the `conflict_retry` delays (`daemon.genesys.retry.RetryPolicy`,
      default 0.25 s doubling to 2 s, jittered) until its `max_attempts` PATCHes, then
      `failed`;
    * 403 -> `failed`, the error names the missing permission, CRITICAL `enforce_forbidden`;
    * any other API error (the client already retried 429/5xx/transport) -> `failed`,
      unless the party is by then seen final (a settled step, or for a 400 one GET of the
      call folded into the engine) -> `already_gone`.
  `failed` and a final `unconfirmed` re-arm the rule (`Enforcement.MEANING`): a later change
  may act on the party again. Every outcome record carries `http_status` (of the last PATCH;
  None when nothing was sent), `attempts`, `event_to_request_ms` and `error`.
  `event_to_request_ms` runs from `decision.received_at` (or `decided_at` for timer and
  manual decisions) to the moment the client is about to write the first PATCH (its
  `on_send` hook, after the shared request limiter granted a slot), measured with `clock`,
  and is observed as `metrics.event_to_request_seconds`.
- Removals possible again: `resume_valve()` (SIGUSR1) resets a tripped valve (gauge set to
  0 once, one `safety_valve_reset` line) and calls `act_now`; the HA engineer's gate calls
  `act_now` when it opens. `act_now(reason)` releases every held decision and judges every
  live party from the state in memory (`Engine.enforce_now`): each party that matches a
  disconnect rule and has not been removed is acted on at once, with no event needed.
- Draining: `stop_accepting()`, then `await drain(timeout)` waits for in-flight actions at
  most `timeout` seconds and cancels the rest; each abandoned action gets an outcome record
  (`unconfirmed` when a PATCH had been sent, else `failed`). It returns how many.

Failure of the audit trail: when the decision record cannot be written the PATCH is NOT
sent (no disconnect without its audit record), a CRITICAL `audit_write_failed` line is
logged and the rule is re-armed, so the party is acted on at a later change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog

from daemon.core.engine import Engine, Step
from daemon.core.enforcement import Enforcement, InFlight, Mode, Next, Outcome, PartyKey, ReplyKind
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Decision, is_final_state
from daemon.errors import ApiError, ConflictError, ForbiddenError, NotFoundError, NotSentError
from daemon.genesys.ratelimit import Priority
from daemon.genesys.retry import RetryPolicy
from daemon.service.audit import decision_record, outcome_record
from daemon.service.metrics import Metrics

DISCONNECT_PERMISSION = "conversation:communication:disconnect"

RemovalState = Literal["pending"] | Outcome


# ---------------------------------------------------------------- collaborators (structural)



class SendGateClosed(NotSentError):
    """Raised from the client's `on_send` hook when the send gate closed while a PATCH
    waited to be written: the request is not sent (fail closed). Its parent,
    `NotSentError`, is also what the client raises when a PATCH was not written within the
    gate's `send_budget` (HA: the lease deadline); both are audited `standby`."""

class DisconnectClient(Protocol):
    """What the enforcer needs from `daemon.genesys.api.GenesysClient`."""

    async def disconnect_participant(self, conversation_id: ConversationId | str,
                                     participant_id: ParticipantId | str, *,
                                     retry_conflict: int = ...,
                                     priority: Priority = ...,
                                     on_send: Callable[[], None] | None = ...) -> object: ...

    async def get_call(self, conversation_id: ConversationId | str, *,
                       priority: Priority = ...) -> dict[str, Any]: ...


class AuditSink(Protocol):
    """What the enforcer needs from `daemon.service.audit.AuditLog`."""

    def write(self, record: dict[str, Any]) -> dict[str, Any]: ...

    async def wait_durable(self) -> None: ...

    def sync_soon(self) -> None: ...


class SendGate(Protocol):
    """Asked immediately before each PATCH: may this process send removals now? (HA: only
    while it holds a valid lease.) False: the decision is audited `standby`, nothing sent."""

    def may_send(self) -> bool: ...


class DecisionHook(Protocol):
    """Told what the audit trail records, typed (HA: the shared decisions table,
    `daemon.service.ha.HaGate`). `decided` runs once a decision record is written, `ended`
    once each outcome record is written (interim `unconfirmed` ones included). A hook that
    raises is logged (`decision_hook_failed`), never propagated."""

    def decided(self, decision: Decision, mode: str) -> None: ...

    def ended(self, decision: Decision, outcome: str) -> None: ...


class OpenGate:
    """The gate of a single host: always open."""

    def may_send(self) -> bool:
        return True


def conflict_policy(*, initial: float = 0.25, max_attempts: int = 3) -> RetryPolicy:
    """The default 409 policy (the one `RetryPolicy`): `initial` seconds, doubling, capped
    at 2 s, half jitter; `max_attempts` PATCHes per action, the first included."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    return RetryPolicy(initial=initial, factor=2.0, cap=2.0, jitter=0.5, max_attempts=max_attempts)


class Logger(Protocol):
    """A structlog-style logger: `log.<level>(event, **fields)`."""

    def debug(self, event: str, **kw: Any) -> Any: ...
    def info(self, event: str, **kw: Any) -> Any: ...
    def warning(self, event: str, **kw: Any) -> Any: ...
    def error(self, event: str, **kw: Any) -> Any: ...
    def critical(self, event: str, **kw: Any) -> Any: ...
    def exception(self, event: str, **kw: Any) -> Any: ...
    def bind(self, **kw: Any) -> Logger: ...


class _LazyBound:
    """`parent.bind(**fields)`, made at the first line logged through it: binding a
    structlog logger costs 5-15 us, and most removals' PATCH is written before any line of
    theirs (the `decision` line is written after it)."""

    __slots__ = ("_parent", "_fields", "_log")

    def __init__(self, parent: Logger, fields: dict[str, Any] | None = None) -> None:
        self._parent = parent
        self._fields = fields or {}
        self._log: Logger | None = None

    def _get(self) -> Logger:
        if self._log is None:
            self._log = self._parent.bind(**self._fields)
        return self._log

    def debug(self, event: str, **kw: Any) -> Any:
        return self._get().debug(event, **kw)

    def info(self, event: str, **kw: Any) -> Any:
        return self._get().info(event, **kw)

    def warning(self, event: str, **kw: Any) -> Any:
        return self._get().warning(event, **kw)

    def error(self, event: str, **kw: Any) -> Any:
        return self._get().error(event, **kw)

    def critical(self, event: str, **kw: Any) -> Any:
        return self._get().critical(event, **kw)

    def exception(self, event: str, **kw: Any) -> Any:
        return self._get().exception(event, **kw)

    def bind(self, **kw: Any) -> Logger:
        """Lazy too: the fields are added to the ones bound when a line is logged."""
        if self._log is not None:
            return self._log.bind(**kw)
        return _LazyBound(self._parent, {**self._fields, **kw})


# ---------------------------------------------------------------- the handle


class Removal:
    """The handle of one submitted decision. `state` is `pending` until the decision has
    its final outcome; then `http_status` (of the last PATCH, None when nothing was sent),
    `attempts` (PATCHes sent for it; 0 when it joined another action), `error`, and the
    times (epoch s, the enforcer's clock): `requested_at` (submitted), `sent_at` (the first
    PATCH about to be written), `confirmed_at` (the party seen gone), `finished_at`.
    `joined` names the rule whose in-flight action this decision joined."""

    __slots__ = ("decision", "state", "http_status", "attempts", "error", "requested_at",
                 "sent_at", "confirmed_at", "finished_at", "joined", "_done")

    def __init__(self, decision: Decision, requested_at: float) -> None:
        self.decision = decision
        self.state: RemovalState = "pending"
        self.http_status: int | None = None
        self.attempts = 0
        self.error: str | None = None
        self.requested_at = requested_at
        self.sent_at: float | None = None
        self.confirmed_at: float | None = None
        self.finished_at: float | None = None
        self.joined: RuleName | None = None
        self._done = asyncio.Event()

    def done(self) -> bool:
        return self.state != "pending"

    async def wait(self, timeout: float | None = None) -> str:
        """Wait until the outcome is final (at most `timeout` seconds; then it may still be
        `pending`). Returns `state`."""
        if not self._done.is_set():
            try:
                await asyncio.wait_for(self._done.wait(), timeout)
            except TimeoutError:
                pass
        return self.state

    def _progress(self, http_status: int | None, attempts: int) -> None:
        """A PATCH was answered while the outcome is still open (confirmation pending, a
        409 retry due): show its status and the attempts so far."""
        if self.state == "pending":
            self.http_status = http_status
            self.attempts = attempts

    def _settle(self, outcome: Outcome, http_status: int | None, attempts: int,
                error: str | None, now: float) -> None:
        self.state = outcome
        self.http_status = http_status
        self.attempts = attempts
        self.error = error
        self.finished_at = now
        if outcome in ("disconnected", "already_gone") and self.confirmed_at is None:
            self.confirmed_at = now
        self._done.set()


# ---------------------------------------------------------------- bookkeeping


@dataclass(eq=False)
class _Action:
    """One party's disconnect in flight: the I/O side of an `InFlight`."""

    flight: InFlight
    removal: Removal
    log: Logger  # bound once to the action's rule, conversation and participant
    task: asyncio.Task[None] | None = None
    event_to_request_ms: float | None = None
    sending: bool = False  # a PATCH is with the client, its answer not yet read
    written: int = 0  # the attempt number whose PATCH the client last began to write
    confirm: asyncio.Future[bool] | None = None
    finished: bool = False

    @property
    def decision(self) -> Decision:
        return self.flight.decision

    @property
    def key(self) -> PartyKey:
        return self.flight.key

    @property
    def gone(self) -> bool:
        return self.flight.gone

    @property
    def attempts(self) -> int:
        return self.flight.attempts

    @property
    def last_status(self) -> int | None:
        return self.flight.last_status


@dataclass(frozen=True, slots=True)
class _Result:
    outcome: Outcome
    http_status: int | None
    error: str | None


class Enforcer:
    """Acts on decisions: audit first, then at most one PATCH per party, then confirmation.

    `client`: the GenesysClient. `audit`: the AuditLog (opened). `engine`: the core
    `Engine` (its `enforcement` is the state; its `store` the calls; GET replies are
    folded into it). `mode`: `enforce` or `observe` (a plain attribute; a reload may change
    it). `metrics`: the `Metrics` or None. `clock`: epoch seconds, the clock of
    `Decision.received_at`. `confirm_timeout`: seconds to wait for a change showing the
    party gone before asking the API. `conflict_retry`: the 409 policy (`max_attempts`
    PATCHes per action). `gate`: the `SendGate` (HA; default always open; a plain
    attribute, may be replaced at any time). `note_step(step)`: called with each engine
    result of the enforcer's own confirming reads before it handles it (the daemon's
    accounting: malformed input counted, gauges, timers). `hook`: a `DecisionHook` told of
    every decision and outcome record written (HA).

    Must be used from one event loop. See the module docstring for the full contract.
    """

    def __init__(self, client: DisconnectClient, audit: AuditSink, engine: Engine, *,
                 mode: Mode, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time, confirm_timeout: float = 5.0,
                 conflict_retry: RetryPolicy | None = None, log: Logger | None = None,
                 gate: SendGate | None = None,
                 note_step: Callable[[Step], None] | None = None,
                 hook: DecisionHook | None = None, sync_before_patch: bool = True) -> None:
        if mode not in ("enforce", "observe"):
            raise ValueError(f"mode must be 'enforce' or 'observe', got {mode!r}")
        if confirm_timeout < 0:
            raise ValueError("confirm_timeout must not be negative")
        self.client = client
        self.audit = audit
        self.engine = engine
        self.mode: Mode = mode
        self.metrics = metrics
        self.confirm_timeout = confirm_timeout
        self.conflict_retry: RetryPolicy = conflict_retry if conflict_retry is not None \
            else conflict_policy()
        self.gate: SendGate = gate if gate is not None else OpenGate()
        #: Wait for the decision record to be on disk (`audit.wait_durable`, a group-committed
        #: fdatasync) before a removal's first PATCH. Off only to measure its cost
        #: (`audit.sync_before_patch: false`): a power loss could then lose the record of a
        #: removal that happened.
        self.sync_before_patch = sync_before_patch
        self._clock = clock
        self._log: Logger = log if log is not None else structlog.get_logger(__name__)
        self._accepting = True
        self._actions: dict[PartyKey, _Action] = {}
        # The handles of decisions that joined an action in flight, by id() of the Decision
        # (core's InFlight.followers holds the decision itself, so the id stays valid until
        # `Enforcement.finish` returns it): settled when the action ends.
        self._joined: dict[int, Removal] = {}
        self._note_step = note_step
        #: The permissions the last refused (403) removal named, until a removal is accepted
        #: again or `clear_forbidden()` (a reload): `/readyz` reports them.
        self.forbidden: tuple[str, ...] = ()
        self._hook = hook

    # ------------------------------------------------------------------ public

    @property
    def enforcement(self) -> Enforcement:
        """The one owner of enforcement state (the engine's)."""
        return self.engine.enforcement

    def clear_forbidden(self) -> None:
        """Forget a refused removal (after a reload: the operator says it is fixed; the
        next refusal sets it again)."""
        self.forbidden = ()
    def set_mode(self, mode: Mode) -> None:
        """A reload changed the mode (`enforce` or `observe`); later decisions use it."""
        if mode not in ("enforce", "observe"):
            raise ValueError(f"mode must be 'enforce' or 'observe', got {mode!r}")
        self.mode = mode

    @property
    def in_flight(self) -> int:
        """Party actions started and not yet finished."""
        return len(self._actions)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def max_attempts(self) -> int:
        """PATCHes per action through 409 conflicts (the first included)."""
        n = self.conflict_retry.max_attempts
        return n if n is not None else 1_000_000

    def handle(self, step: Step) -> list[Removal]:
        """The one entry for state changes: settle in-flight parties the step shows final,
        then submit its decisions. Synchronous; never raises."""
        for key in step.settled:
            action = self._actions.get(key)
            if action is not None and action.confirm is not None and not action.confirm.done():
                action.confirm.set_result(True)
        return self.submit_all(step.decisions) if step.decisions else []

    def submit(self, decision: Decision) -> Removal:
        """Audit and act on one decision at once (a rule's or a manual one). Synchronous;
        never raises. The returned handle says what became of it."""
        removal = Removal(decision, self._clock())
        try:
            self._submit_one(decision, removal)
        except Exception as exc:  # one bad decision must not cost the others
            self._log.error("enforce_submit_failed", rule=decision.rule,
                            conversation_id=decision.conversation_id,
                            participant_id=decision.participant_id,
                            error=f"{exc.__class__.__name__}: {exc}")
            if not removal.done():
                removal._settle("failed", None, 0, f"internal error: {exc.__class__.__name__}",
                                self._clock())
        return removal

    def submit_all(self, decisions: Iterable[Decision]) -> list[Removal]:
        """`submit` each decision, in order."""
        return [self.submit(d) for d in decisions]

    def act_now(self, reason: str) -> list[Removal]:
        """Removals became possible again (`reason`: e.g. `valve_resumed`, `leader`): judge
        every live party from the state in memory and act at once on each that matches a
        disconnect rule and has not been removed (held decisions included)."""
        decisions = self.engine.enforce_now(self._clock())
        self._log.info("enforce_act_now", reason=reason, decisions=len(decisions))
        return self.submit_all(decisions)

    def resume_valve(self) -> bool:
        """SIGUSR1: reset a tripped safety valve and act at once on the parties it held
        back. False (and nothing done) when the valve was not tripped."""
        valve = self.enforcement.valve
        if not valve.tripped:
            return False
        valve.resume()
        if self.metrics is not None:
            self.metrics.safety_valve_tripped.set(0)
        self._log.warning("safety_valve_reset", detail="enforcement resumed")
        self.act_now("valve_resumed")
        return True

    def stop_accepting(self) -> None:
        """From now on decisions are audited (`suppressed`, 'daemon stopping') but nothing new
        is sent. In-flight actions continue; see `drain`."""
        if self._accepting:
            self._accepting = False
            self._log.info("enforcer_stop_accepting", in_flight=self.in_flight)

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for in-flight actions; cancel the rest (each gets an
        outcome record). Returns how many were abandoned."""
        tasks = [a.task for a in self._actions.values() if a.task is not None]
        if not tasks:
            return 0
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
        if not pending:
            return 0
        for task in pending:
            task.cancel()
        # Cancelled actions only write their record and return; bounded anyway.
        await asyncio.wait(pending, timeout=5.0)
        self._log.warning("enforcer_drain_abandoned", abandoned=len(pending), timeout=timeout)
        return len(pending)

    # ------------------------------------------------------------------ submit

    def _submit_one(self, d: Decision, removal: Removal) -> None:
        mode = self.mode
        dlog = self._bound(d)
        self._count_decision(d, mode)
        try:
            self.audit.write(decision_record(d, mode=mode))
        except Exception as exc:
            self._log_decision(d, mode, dlog)
            dlog.critical("audit_write_failed", record="decision", detail="decision not acted on",
                          error=f"{exc.__class__.__name__}: {exc}")
            self._count_outcome(d, "failed")
            if d.action == "disconnect" and mode == "enforce":
                self.enforcement.not_sent(d)
            removal._settle("failed", None, 0, "audit record could not be written; nothing sent",
                            self._clock())
            return
        if self._hook is not None:
            self._tell_hook(self._hook.decided, d, mode)
        now = self._clock()
        adm = self.enforcement.admit(
            d, now, mode=mode, accepting=self._accepting, may_send=self._may_send(),
            party_final=self.engine.party_final(d.conversation_id, d.participant_id))
        if adm.verdict == "send":
            assert adm.flight is not None
            if self.sync_before_patch:
                # A slow disk starts now, in a worker thread; a fast one is synced on the
                # loop by the action's task, once for every record of this turn.
                self.audit.sync_soon()
            action = _Action(adm.flight, removal, log=dlog)
            self._actions[action.key] = action
            # Created in this turn of the loop; runs at the loop's next iteration.
            loop = asyncio.get_running_loop()
            action.task = loop.create_task(
                self._run(action), name=f"disconnect {d.conversation_id}/{d.participant_id}")
            # The `decision` line on the loop's next iteration, after the task's first step
            # (callbacks run in the order scheduled), which writes the PATCH unless it has
            # to wait (the audit's sync, limiter, token, a new connection). Building and
            # writing the line is the costliest part of a submit, and the audit record, not
            # the log line, is what must exist before the PATCH.
            loop.call_soon(self._log_decision, d, mode, dlog)
            return
        self._log_decision(d, mode, dlog)
        if adm.verdict == "joined":
            assert adm.flight is not None
            # Core records the follower (adm.flight.followers); only its handle waits here.
            self._joined[id(d)] = removal
            removal.joined = adm.flight.decision.rule
            dlog.info("enforce_joined", joined_rule=adm.flight.decision.rule)
            return
        outcome = adm.outcome
        assert outcome is not None
        if adm.verdict == "suppressed" and adm.tripped:
            self._tripped(now)
        self._outcome(d, outcome, None, 0, None, adm.reason)
        removal._settle(outcome, None, 0, adm.reason, self._clock())

    def _may_send(self) -> bool:
        try:
            return bool(self.gate.may_send())
        except Exception as exc:  # fail closed: no answer from the gate, no PATCH
            self._log.error("send_gate_failed", error=f"{exc.__class__.__name__}: {exc}")
            return False

    def _tripped(self, now: float) -> None:
        valve = self.enforcement.valve
        limit = valve.max_per_minute
        recent = valve.count(now)
        self._log.critical(
            "safety_valve_tripped", max_per_minute=limit, recent=recent,
            detail=f"{recent} disconnects in the last minute, the next one would exceed the "
                   f"max of {limit}: enforcement paused, decisions are audited as suppressed",
            resume="systemctl kill -s USR1 confguard (or kill -USR1 <pid>), or restart")
        if self.metrics is not None:
            self.metrics.safety_valve_tripped.set(1)

    # ------------------------------------------------------------------ one action

    async def _run(self, action: _Action) -> None:
        result: _Result
        try:
            problem = await self._durable() if self.sync_before_patch else None
            result = await self._perform(action) if problem is None else _Result("failed", None, problem)
        except asyncio.CancelledError:
            self._finish(action, _result(action.flight.abandoned(sending=action.sending)))
            raise
        except Exception as exc:  # a bug must not leave the party marked in flight forever
            action.log.exception("enforce_action_crashed")
            result = _Result("failed", action.last_status,
                             f"internal error: {exc.__class__.__name__}: {exc}")
        self._finish(action, result)

    async def _durable(self) -> str | None:
        """The decision records written so far are on disk (None), or why not: then nothing
        is sent (no removal without its record; the rule is re-armed by the `failed`)."""
        try:
            await self.audit.wait_durable()
        except Exception as exc:  # noqa: BLE001 - fail closed
            self._log.critical("audit_sync_failed", record="decision", detail="decision not acted on",
                               error=f"{exc.__class__.__name__}: {exc}")
            return f"the audit record could not be synced to disk ({exc.__class__.__name__}); nothing sent"
        return None

    async def _perform(self, action: _Action) -> _Result:
        """Send the PATCH, and again as `InFlight` decides (409s, one resend when an accepted
        PATCH is not confirmed), until it gives the outcome. The deciding is core's
        (`InFlight.before_send/after_reply/after_gone_check/after_confirm`); here only the
        I/O and the log lines."""
        flight = action.flight
        loop = asyncio.get_running_loop()
        while True:
            nxt = flight.before_send(may_send=self._may_send())
            if nxt is not None:
                return _result(nxt)
            # Registered before sending: the change showing the party gone may arrive before
            # the PATCH reply does.
            action.confirm = loop.create_future()
            exc = await self._send(action)
            kind = _reply_kind(exc)
            if kind == "gate_closed" and (action.written != flight.attempts
                                          or not isinstance(exc, SendGateClosed)):
                # the gate closed, or the lease deadline passed: this attempt was never written
                flight.unsent()
                action.written = min(action.written, flight.attempts)
            missing = (exc.missing_permissions or [DISCONNECT_PERMISSION]) \
                if isinstance(exc, ForbiddenError) else []
            text = exc.message if isinstance(exc, NotSentError) else str(exc)
            nxt = flight.after_reply(kind, text, max_attempts=self.max_attempts, missing=missing)
            self._log_reply(action, kind, exc, missing)
            if nxt.step == "retry":
                wait = self.conflict_retry.delay(flight.attempts)
                action.log.info("enforce_conflict_retry", attempt=flight.attempts, retry_in=round(wait, 3))
                await asyncio.sleep(wait)
                continue
            if nxt.step == "check_gone":
                assert exc is not None
                # Genesys may refuse a PATCH for a party that has just left (e.g. 400
                # "participant not connected"): that is not a failure.
                nxt = flight.after_gone_check(await self._gone_after_error(action, exc),
                                              status=exc.status, text=str(exc))
                self._log_refused(action, exc, nxt)
            elif nxt.step == "confirm":
                nxt = flight.after_confirm(await self._confirm(action), confirm_timeout=self.confirm_timeout)
                if nxt.step == "resend":
                    action.log.warning("enforce_unconfirmed_retry", confirm_timeout=self.confirm_timeout)
                    assert nxt.outcome is not None
                    self._outcome(action.decision, nxt.outcome, nxt.status, flight.attempts,
                                  action.event_to_request_ms, nxt.error)
                    continue
            return _result(nxt)

    def _log_reply(self, action: _Action, kind: ReplyKind, exc: ApiError | None,
                   missing: list[str]) -> None:
        """The log line of a PATCH's answer (the ones that decide at once)."""
        alog = action.log
        if kind == "not_found" and exc is not None:
            alog.info("enforce_already_gone", detail=exc.message)
        elif kind == "forbidden" and exc is not None:
            self.forbidden = tuple(missing)
            alog.critical("enforce_forbidden", missing_permissions=missing,
                          detail="grant the permission to the OAuth client's role", error=str(exc))

    def _log_refused(self, action: _Action, exc: ApiError, nxt: Next) -> None:
        if nxt.outcome == "already_gone":
            action.log.info("enforce_already_gone", status=exc.status, detail=exc.message)
        elif nxt.outcome == "failed":
            action.log.error("enforce_failed", status=exc.status, error=str(exc))

    async def _send(self, action: _Action) -> ApiError | None:
        """One PATCH. Returns the API error, or None when it was accepted (2xx). A
        cancellation propagates with `action.sending` still set: the PATCH may have landed."""
        cid, pid = action.key
        action.sending = True
        try:
            # The client would retry 409 itself; conflicts are retried by `_perform` instead,
            # so that `attempts` counts every PATCH.
            budget = getattr(self.gate, "send_budget", None)  # HA: the lease deadline
            extra = {"send_budget": budget} if callable(budget) else {}
            reply = await self.client.disconnect_participant(
                cid, pid, retry_conflict=0, on_send=lambda: self._sending(action), **extra)
        except ApiError as exc:
            action.sending = False
            action.flight.replied(_reply_kind(exc), exc.status or None)
            action.removal._progress(action.last_status, action.attempts)
            return exc
        action.sending = False
        action.flight.replied("accepted", reply if isinstance(reply, int) else None)
        self.forbidden = ()
        action.removal._progress(action.last_status, action.attempts)
        return None

    def _sending(self, action: _Action) -> None:
        """The client is about to write a PATCH (limiter wait and token included; called
        again before each of the client's own retries). The send gate is asked once more
        here: a lease lost while the PATCH waited (limiter, a 429's Retry-After, a 5xx
        back-off) stops it unwritten (`SendGateClosed`). Event-to-request is measured at the
        first one, once per action."""
        if not self._may_send():
            raise SendGateClosed("the send gate closed while the PATCH waited to be written "
                                 "(HA: no longer the leader); nothing sent")
        action.written = action.attempts
        if action.event_to_request_ms is not None:
            return
        d = action.decision
        now = self._clock()
        action.removal.sent_at = now
        origin = d.received_at if d.received_at is not None else d.decided_at
        delay = max(0.0, now - origin)
        action.event_to_request_ms = round(delay * 1000.0, 3)
        if self.metrics is not None:
            self.metrics.event_to_request_seconds.observe(delay)

    async def _fold_call(self, cid: ConversationId) -> Mapping[str, Any] | None:
        """One GET of call `cid` at ENFORCE priority, folded into the engine like any other
        read (so decisions it causes are acted on and in-flight parties it shows final are
        settled). Returns the call, or None when the reply is not an object (not folded).
        A 404 marks the call gone in the engine and raises NotFoundError; any other
        ApiError is raised as it is."""
        try:
            conv = await self.client.get_call(cid, priority=Priority.ENFORCE)
        except NotFoundError:
            self._route(self.engine.mark_gone(cid, self._clock()))
            raise
        if not isinstance(conv, Mapping):
            return None
        self._route(self.engine.apply_conversation(conv, self._clock(), source="resync"))
        return conv

    def _route(self, step: Step) -> None:
        """An engine result of the enforcer's own read: accounted like every other step
        (`note_step`, the router's `StepAccounts`), then handled here."""
        if self._note_step is not None:
            self._note_step(step)
        self.handle(step)

    async def _read_call(self, action: _Action) -> bool | None:
        """One GET of the action's call (`_fold_call`). True: the party is final or absent
        (404: the call is gone); False: still there; None: the read failed."""
        cid, pid = action.key
        try:
            conv = await self._fold_call(cid)
        except NotFoundError:
            return True
        except ApiError as exc:
            action.log.warning("enforce_confirm_get_failed", error=str(exc))
            return None
        if conv is None:
            return None
        if action.gone:
            return True
        listed = _listed_state(conv, pid)
        return listed is _ABSENT or is_final_state(listed)

    async def _confirm(self, action: _Action) -> bool:
        """True when the party is seen final: a settled step within `confirm_timeout`, else
        one GET of the call (404, or the participant final or absent)."""
        fut = action.confirm
        if action.gone:
            return True
        if fut is not None and self.confirm_timeout > 0:
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout=self.confirm_timeout)
                return True
            except TimeoutError:
                pass
        if action.gone:
            return True
        got = await self._read_call(action)
        # A change may have shown the party gone while the GET was under way.
        return action.gone or got is True

    async def _gone_after_error(self, action: _Action, exc: ApiError) -> bool:
        """After a refused PATCH: is the party final? Settled steps first; for a 400 (the API
        answering, but refusing this party) one GET of the call as well. Not after
        429/5xx/transport errors, which the client already retried: the API is struggling."""
        if action.gone:
            return True
        if exc.status != 400:
            return False
        try:
            await self._fold_call(action.key[0])
        except NotFoundError:
            return True
        except ApiError:
            return False
        # Listed and final only: a party absent from the reply may never have been there.
        return action.gone

    def _finish(self, action: _Action, result: _Result) -> None:
        if action.finished:
            return
        action.finished = True
        if self._actions.get(action.key) is action:
            del self._actions[action.key]
        ended = self.enforcement.finish(action.flight, result.outcome, status=result.http_status,
                                        error=result.error)
        if action.confirm is not None and not action.confirm.done():
            action.confirm.cancel()
        now = self._clock()
        level = "info" if result.outcome in ("disconnected", "already_gone") else "error"
        alog = action.log
        (alog.info if level == "info" else alog.error)(
            "enforce_outcome", outcome=result.outcome, http_status=result.http_status, attempts=action.attempts,
            event_to_request_ms=action.event_to_request_ms, error=result.error)
        for e in ended:  # the leading decision first, then those that joined it
            self._outcome(e.decision, e.outcome, e.status, e.attempts,
                          action.event_to_request_ms if e.leader else None, e.error)
            handle = action.removal if e.leader else self._joined.pop(id(e.decision), None)
            if handle is not None:
                if not e.leader:
                    handle.sent_at = action.removal.sent_at
                handle._settle(e.outcome, e.status, e.attempts, e.error, now)

    # ------------------------------------------------------------------ helpers

    def _outcome(self, d: Decision, outcome: Outcome, http_status: int | None, attempts: int,
                 event_to_request_ms: float | None, error: str | None) -> None:
        """Write one outcome record (an audit failure is logged, never raised) and count it."""
        self._count_outcome(d, outcome)
        try:
            self.audit.write(outcome_record(d, outcome=outcome, http_status=http_status,
                                            attempts=attempts,
                                            event_to_request_ms=event_to_request_ms,
                                            error=error))
        except Exception as exc:
            self._bound(d).critical("audit_write_failed", record="outcome", outcome=outcome,
                                    detail="outcome record lost",
                                    error=f"{exc.__class__.__name__}: {exc}")
            return
        if self._hook is not None:
            self._tell_hook(self._hook.ended, d, outcome)

    def _tell_hook(self, call: Callable[[Decision, str], None], d: Decision, value: str) -> None:
        try:
            call(d, value)
        except Exception:  # the record is written; the hook's bug must not undo that
            self._bound(d).exception("decision_hook_failed")

    def _count_decision(self, d: Decision, mode: str) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.decisions, d.rule, d.action, mode).inc()

    def _count_outcome(self, d: Decision, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.outcomes, d.rule, outcome).inc()

    def _bound(self, d: Decision) -> Logger:
        """The logger bound to one decision's ids (`rule`, `conversation_id`,
        `participant_id`), which then appear on each of its lines."""
        return _LazyBound(self._log).bind(rule=d.rule, conversation_id=d.conversation_id,
                                          participant_id=d.participant_id)

    def _log_decision(self, d: Decision, mode: str, dlog: Logger) -> None:
        # The rule's severity is a field of the line; the level is capped at WARNING so that
        # the daemon's own CRITICAL lines (safety valve, missing permission) stand out.
        emit = dlog.info if d.severity == "info" else dlog.warning
        origin = d.origin
        extra: dict[str, object] = {} if origin is None else {
            "origin": {"caller": origin.caller, "reason": origin.reason}}
        emit("decision", purpose=d.purpose, matched=d.matched, mode=mode,
             action=d.action, severity=d.severity, tags=list(d.tags), message=d.message,
             decided_at=d.decided_at, received_at=d.received_at, **extra)


def _reply_kind(exc: ApiError | None) -> ReplyKind:
    """What one PATCH's answer was, for `InFlight.after_reply`."""
    if exc is None:
        return "accepted"
    if isinstance(exc, NotSentError):  # SendGateClosed, or not written within the send budget
        return "gate_closed"
    if isinstance(exc, NotFoundError):
        return "not_found"
    if isinstance(exc, ConflictError):
        return "conflict"
    if isinstance(exc, ForbiddenError):
        return "forbidden"
    return "refused"


def _result(nxt: Next) -> _Result:
    assert nxt.outcome is not None, nxt
    return _Result(nxt.outcome, nxt.status, nxt.error)


class _Absent:
    pass


_ABSENT = _Absent()


def _listed_state(conv: Mapping[str, Any], participant_id: str) -> object:
    """The state a REST reply gives the participant, or `_ABSENT` when it is not listed
    (a malformed reply lists nobody usable: treated as still there, None)."""
    parts = conv.get("participants")
    if not isinstance(parts, list):
        return None
    for p in parts:
        if isinstance(p, Mapping) and p.get("id") == participant_id:
            return p.get("state")
    return _ABSENT
