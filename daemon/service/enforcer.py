"""Enforcement: turn `Decision`s into exactly one PATCH per party, confirmed, audited.

Contract (docs/architecture.md, enforce.py):

- `Enforcer.submit(decisions)` is SYNCHRONOUS and is called from the WebSocket receive
  callback. For each decision, in order: count it (`metrics.decisions`), log one structlog
  line `decision` carrying every decision field (level INFO for rules of severity info,
  else WARNING; the severity is a field), write the audit `decision` record (`AuditLog.write`
  hands the line to the OS before it returns, so the record is in the page cache BEFORE any
  PATCH for it exists), then act:
    * rule action `observe`, or the enforcer in `observe` mode: an `observed` outcome
      record; nothing is sent;
    * `disconnect` in `enforce` mode: if the safety valve allows, the PATCH task is created
      with `loop.create_task` in this same turn of the event loop; it starts running on the
      loop's next iteration (no polling, no batching, no queue between the decision and the
      request). When the valve refuses: a `suppressed` outcome record, and one CRITICAL log
      line when the valve trips.
  `submit` never raises: a failure with one decision is logged and the next one is handled.
- One action in flight per party `(conversation_id, participant_id)`. A decision for a party
  that already has an action in flight (another rule, the same event) is audited and JOINS
  that action: nothing is sent twice, and when the action ends the joined decision gets an
  outcome record with the same outcome (`attempts` 0, the error names the rule it joined).
- A party is acted on once per rule: a repeat decision of the same rule for the same party
  (after a reload, say) gets a `suppressed` outcome with the reason, unless the earlier action
  failed. On failure the rule is re-armed (`rules_engine.rearm`) so a later event can fire
  it again.
- Per action (`attempts` counts PATCHes this module sent; the client's own retries of
  429/5xx/transport errors inside one call are not counted):
    * the party already final (seen in the store or an applied change) before a PATCH is
      sent -> `already_gone`, nothing (more) sent;
    * 2xx -> CONFIRM: the party must show final within `confirm_timeout` seconds, either via
      `observe_change` (the daemon calls it for every applied Change) or, when no event shows
      it in time, one `GET` of the call (404, or the participant final or absent -> confirmed).
      Confirmed -> `disconnected`. Not confirmed -> an `unconfirmed` record and the PATCH is
      retried ONCE; still not confirmed -> final `unconfirmed` and the rule is re-armed;
    * 404 -> `already_gone` (a party that left meanwhile is not an error); but when an
      earlier PATCH of the same action was accepted (the confirm retry), the party left
      because of it -> `disconnected`, as when it is seen final after an accepted PATCH;
    * 409 -> retried with jittered back-off until `max_attempts` PATCHes, then `failed`;
    * 403 -> `failed`, the error names the missing permission, CRITICAL log;
    * any other API error (the client already retried 429/5xx/transport) -> `failed`,
      unless the party is by then seen final (an event, the store, or for a 400 one GET of
      the call: Genesys may refuse a PATCH for a party that just left) -> `already_gone`.
  Every outcome record carries `http_status` (of the last PATCH; None when nothing was
  sent), `attempts`, `event_to_request_ms` and `error`. `event_to_request_ms` runs from
  `decision.received_at` (or `decided_at` when the decision came from a timer) to the
  moment the client is about to write the first PATCH (its `on_send` hook, after the shared
  request limiter granted a slot and a token is at hand, so a wait for budget is included),
  measured with the same `clock`; it is also observed as `metrics.event_to_request_seconds`.
- Draining: `stop_accepting()` makes later `submit` calls still audit every decision they see
  (a `decision` record, then a `suppressed` outcome whose error says the daemon was stopping)
  but send nothing new. `await drain(timeout)` waits for in-flight actions, at most `timeout`
  seconds, then cancels the rest; each abandoned action gets an outcome record (`unconfirmed`
  when a PATCH had been sent, else `failed`). It returns how many were abandoned.
- Safety valve: `safety.allow(now)` is asked once per new party action (joined decisions,
  retries and confirmations do not count). When it refuses, parties are `suppressed` and
  remembered (bounded); `resume_enforcement()` resets the valve and re-arms their rules so
  that their next event can act on them. A valve reset done elsewhere (e.g. the daemon's
  SIGUSR1 handler calling `safety.resume()`) is noticed at the next `submit` and does the same.

Failure of the audit trail: when the decision record cannot be written the PATCH is NOT
sent (no disconnect without its audit record), a CRITICAL line is logged and the rule is
re-armed, so the party is acted on at a later change once the trail can be written again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog

from daemon.service.audit import decision_record, outcome_record
from daemon.errors import ApiError, ConflictError, ForbiddenError, NotFoundError
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import FINAL_STATES, Call, Change, Decision
from daemon.genesys.ratelimit import Priority
from daemon.service.metrics import Metrics

Mode = Literal["enforce", "observe"]
PartyKey = tuple[ConversationId, ParticipantId]

# Bounds on bookkeeping, so a long run cannot grow memory without limit.
MAX_ACTED_CONVERSATIONS = 100_000  # conversations remembered for "once per rule"
MAX_SUPPRESSED = 10_000  # parties remembered for re-arming on resume
DISCONNECT_PERMISSION = "conversation:communication:disconnect"


# ---------------------------------------------------------------- collaborators (structural)


class DisconnectClient(Protocol):
    """What the enforcer needs from `daemon.api.GenesysClient`."""

    async def disconnect_participant(self, conversation_id: ConversationId | str,
                                     participant_id: ParticipantId | str, *,
                                     retry_conflict: int = ...,
                                     priority: Priority = ...,
                                     on_send: Callable[[], None] | None = ...) -> object: ...

    async def get_call(self, conversation_id: ConversationId | str, *,
                       priority: Priority = ...) -> dict[str, Any]: ...


class AuditSink(Protocol):
    """What the enforcer needs from `daemon.audit.AuditLog`."""

    def write(self, record: dict[str, Any]) -> dict[str, Any]: ...


class Rearmable(Protocol):
    """What the enforcer needs from `daemon.rules.RuleEngine`."""

    def rearm(self, rule: RuleName, conversation_id: ConversationId,
              participant_id: ParticipantId) -> None: ...


class Valve(Protocol):
    """What the enforcer needs from `daemon.rules.SafetyValve`."""

    def allow(self, now: float) -> bool: ...

    @property
    def tripped(self) -> bool: ...

    def resume(self) -> None: ...


class CallLookup(Protocol):
    """What the enforcer needs from `daemon.state.CallStore` (optional)."""

    def get(self, conversation_id: ConversationId) -> Call | None: ...


# ---------------------------------------------------------------- bookkeeping


@dataclass(eq=False)
class _Action:
    """One party's disconnect in flight: the leading decision and those that joined it."""

    decision: Decision
    key: PartyKey
    started_at: float
    followers: list[Decision] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    attempts: int = 0
    last_status: int | None = None
    event_to_request_ms: float | None = None
    gone: bool = False  # an applied change showed the party final
    accepted: bool = False  # a PATCH of this action got a 2xx
    sending: bool = False  # a PATCH is with the client, its answer not yet read
    confirm: asyncio.Future[bool] | None = None
    finished: bool = False


@dataclass(frozen=True, slots=True)
class _Result:
    outcome: str
    http_status: int | None
    error: str | None
    rearm: bool = False


class Enforcer:
    """Acts on decisions: audit first, then at most one PATCH per party, then confirmation.

    `client`: the GenesysClient. `audit`: the AuditLog (opened). `rules_engine`: for `rearm`.
    `mode`: `enforce` or `observe` (a plain attribute; a reload may change it). `safety`: the
    SafetyValve. `metrics`: the `daemon.service.metrics.Metrics` or None. `clock`: epoch seconds, the
    clock of `Decision.received_at`. `confirm_timeout`: seconds to wait for an event showing
    the party gone before asking the API. `max_attempts`: PATCHes per action through 409
    conflicts. `store`: the CallStore, to skip parties already final (optional; applied changes
    seen by `observe_change` are used as well). `conflict_backoff`: base seconds of the 409
    back-off (doubles per attempt, jittered, capped at 2 s).

    Must be used from one event loop. See the module docstring for the full contract.
    """

    def __init__(self, client: DisconnectClient, audit: AuditSink, rules_engine: Rearmable, *,
                 mode: Mode, safety: Valve, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time, confirm_timeout: float = 5.0,
                 max_attempts: int = 3, log: Any = None, store: CallLookup | None = None,
                 conflict_backoff: float = 0.25) -> None:
        if mode not in ("enforce", "observe"):
            raise ValueError(f"mode must be 'enforce' or 'observe', got {mode!r}")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if confirm_timeout < 0:
            raise ValueError("confirm_timeout must not be negative")
        self.client = client
        self.audit = audit
        self.rules_engine = rules_engine
        self.mode: Mode = mode
        self.safety = safety
        self.metrics = metrics
        self.store = store
        self.confirm_timeout = confirm_timeout
        self.max_attempts = max_attempts
        self.conflict_backoff = conflict_backoff
        self._clock = clock
        self._log: Any = log if log is not None else structlog.get_logger(__name__)
        self._accepting = True
        self._actions: dict[PartyKey, _Action] = {}
        self._by_conv: dict[ConversationId, dict[ParticipantId, _Action]] = {}
        # (conversation) -> {(rule, participant)} acted on and not failed; oldest first.
        self._acted: OrderedDict[ConversationId, set[tuple[RuleName, ParticipantId]]] = OrderedDict()
        self._suppressed: OrderedDict[tuple[RuleName, ConversationId, ParticipantId], None] = OrderedDict()
        self._trip_logged = False

    # ------------------------------------------------------------------ public

    @property
    def in_flight(self) -> int:
        """Party actions started and not yet finished."""
        return len(self._actions)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, decisions: list[Decision]) -> None:
        """Audit and act on each decision at once. Synchronous; never raises."""
        for decision in decisions:
            try:
                self._submit_one(decision)
            except Exception as exc:  # one bad decision must not cost the others
                self._log.error("enforce_submit_failed", rule=decision.rule,
                                conversation_id=decision.conversation_id,
                                participant_id=decision.participant_id,
                                error=f"{exc.__class__.__name__}: {exc}")

    def observe_change(self, change: Change) -> None:
        """Called for every applied Change: resolves confirmations of parties now final and
        forgets per-call bookkeeping when a call ends. O(actions in flight on that call)."""
        call = change.call
        pending = self._by_conv.get(call.id)
        if pending:
            for pid, action in pending.items():
                p = call.participants.get(pid)
                if p is not None and p.is_final:
                    action.gone = True
                    if action.confirm is not None and not action.confirm.done():
                        action.confirm.set_result(True)
        if call.is_ended and call.id not in self._by_conv:
            self._acted.pop(call.id, None)

    def resume_enforcement(self) -> None:
        """Reset a tripped safety valve and re-arm the rules of suppressed parties."""
        was = self.safety.tripped
        self.safety.resume()
        self._on_resumed()
        if was:
            self._log.warning("safety valve reset: enforcement resumed")

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

    def _submit_one(self, d: Decision) -> None:
        mode = self.mode
        key: PartyKey = (d.conversation_id, d.participant_id)
        self._count_decision(d, mode)
        self._log_decision(d, mode)
        try:
            self.audit.write(decision_record(d, mode=mode))
        except Exception as exc:
            self._log.critical("audit write failed: decision not acted on", rule=d.rule,
                               conversation_id=d.conversation_id, participant_id=d.participant_id,
                               error=f"{exc.__class__.__name__}: {exc}")
            self._count_outcome(d, "failed")
            if d.action == "disconnect" and mode == "enforce":
                self._rearm(d)
            return

        if d.action != "disconnect" or mode == "observe":
            self._outcome(d, "observed", None, 0, None, None)
            return
        if not self._accepting:
            self._outcome(d, "suppressed", None, 0, None,
                          "daemon stopping (draining): decision audited, nothing sent")
            return
        leader = self._actions.get(key)
        if leader is not None:
            leader.followers.append(d)
            self._log.info("enforce_joined", rule=d.rule, joined_rule=leader.decision.rule,
                           conversation_id=d.conversation_id, participant_id=d.participant_id)
            return
        acted = self._acted.get(d.conversation_id)
        if acted is not None and (d.rule, d.participant_id) in acted:
            self._outcome(d, "suppressed", None, 0, None,
                          f"party already acted on by rule {d.rule}; not sent twice")
            return
        if self._store_final(key):
            self._outcome(d, "already_gone", None, 0, None,
                          "party already disconnected before any request was sent")
            return
        if not self.safety.tripped:
            self._on_resumed()
        now = self._clock()
        if not self.safety.allow(now):
            self._suppress(d, now)
            return
        loop = asyncio.get_running_loop()
        action = _Action(decision=d, key=key, started_at=now)
        self._actions[key] = action
        self._by_conv.setdefault(d.conversation_id, {})[d.participant_id] = action
        self._mark_acted(d)
        # Created in this turn of the loop; runs at the loop's next iteration.
        action.task = loop.create_task(self._run(action),
                                       name=f"disconnect {d.conversation_id}/{d.participant_id}")

    def _suppress(self, d: Decision, now: float) -> None:
        limit = getattr(self.safety, "max_per_minute", None)
        if not self._trip_logged:
            self._trip_logged = True
            count = getattr(self.safety, "count", None)
            recent = count(now) if callable(count) else limit
            self._log.critical(
                "safety_valve_tripped", max_per_minute=limit, recent=recent,
                detail=f"{recent} disconnects in the last minute, the next one would exceed the "
                       f"max of {limit}: enforcement paused, decisions are audited as suppressed",
                resume="systemctl kill -s USR1 confguard (or kill -USR1 <pid>), or restart")
            if self.metrics is not None:
                self.metrics.safety_valve_tripped.set(1)
        skey = (d.rule, d.conversation_id, d.participant_id)
        self._suppressed[skey] = None
        self._suppressed.move_to_end(skey)
        while len(self._suppressed) > MAX_SUPPRESSED:
            self._suppressed.popitem(last=False)
        self._outcome(d, "suppressed", None, 0, None,
                      f"safety valve tripped (max {limit} disconnects a minute); nothing sent")

    def _on_resumed(self) -> None:
        """The valve is open again: re-arm suppressed parties (their next event acts)."""
        if self._trip_logged and self.metrics is not None:
            self.metrics.safety_valve_tripped.set(0)
        self._trip_logged = False
        while self._suppressed:
            (rule, cid, pid), _ = self._suppressed.popitem(last=False)
            self._safe_rearm(rule, cid, pid)

    # ------------------------------------------------------------------ one action

    async def _run(self, action: _Action) -> None:
        d = action.decision
        result: _Result
        try:
            result = await self._perform(action)
        except asyncio.CancelledError:
            if action.sending or action.accepted:
                result = _Result("unconfirmed", action.last_status,
                                 "abandoned at shutdown after the PATCH was sent; removal not confirmed",
                                 rearm=True)
            else:
                last = f" (last answer HTTP {action.last_status})" if action.last_status else ""
                result = _Result("failed", action.last_status,
                                 f"abandoned at shutdown with no PATCH accepted{last}", rearm=True)
            self._finish(action, result)
            raise
        except Exception as exc:  # a bug must not leave the party marked in flight forever
            self._log.exception("enforce_action_crashed", rule=d.rule,
                                conversation_id=d.conversation_id, participant_id=d.participant_id)
            result = _Result("failed", action.last_status,
                             f"internal error: {exc.__class__.__name__}: {exc}", rearm=True)
        self._finish(action, result)

    async def _perform(self, action: _Action) -> _Result:
        d = action.decision
        cid, pid = action.key
        loop = asyncio.get_running_loop()
        confirm_retried = False
        while True:
            if action.gone or self._store_final(action.key):
                if action.accepted:  # our accepted PATCH took effect after all
                    return _Result("disconnected", action.last_status, None)
                err = None if action.attempts else "party left before any request was sent"
                return _Result("already_gone", action.last_status, err)
            action.attempts += 1
            # Registered before sending: the event showing the party gone may arrive before
            # the PATCH reply does.
            action.confirm = loop.create_future()
            exc = await self._send(action)
            if isinstance(exc, NotFoundError):
                self._log.info("enforce_already_gone", rule=d.rule, conversation_id=cid,
                               participant_id=pid, detail=exc.message)
                if action.accepted:  # the earlier accepted PATCH removed the party
                    return _Result("disconnected", 404, None)
                return _Result("already_gone", 404, None)
            if isinstance(exc, ConflictError):
                if action.attempts < self.max_attempts:
                    wait = min(2.0, self.conflict_backoff * 2.0 ** (action.attempts - 1))
                    self._log.info("enforce_conflict_retry", rule=d.rule, conversation_id=cid,
                                   participant_id=pid, attempt=action.attempts,
                                   retry_in=round(wait, 3))
                    await asyncio.sleep(wait * random.uniform(0.5, 1.0))
                    continue
                return _Result("failed", 409,
                               f"409 conflict on every one of {action.attempts} attempts: {exc}",
                               rearm=True)
            if isinstance(exc, ForbiddenError):
                missing = exc.missing_permissions or [DISCONNECT_PERMISSION]
                text = (f"403 forbidden: the OAuth client's role lacks permission "
                        f"{', '.join(missing)}: {exc}")
                self._log.critical("enforcement forbidden: grant the permission to the OAuth "
                                   "client's role", rule=d.rule, conversation_id=cid,
                                   participant_id=pid, missing_permissions=missing,
                                   error=str(exc))
                return _Result("failed", 403, text, rearm=True)
            if exc is not None:
                # Genesys may refuse a PATCH for a party that has just left (e.g. 400
                # "participant not connected"): that is not a failure.
                if await self._gone_after_error(action, exc):
                    if action.accepted:
                        return _Result("disconnected", action.last_status, None)
                    self._log.info("enforce_already_gone", rule=d.rule, conversation_id=cid,
                                   participant_id=pid, status=exc.status, detail=exc.message)
                    return _Result("already_gone", action.last_status,
                                   f"party had left; the PATCH was refused: {exc}")
                self._log.error("enforce_failed", rule=d.rule, conversation_id=cid,
                                participant_id=pid, status=exc.status, error=str(exc))
                return _Result("failed", exc.status or None, str(exc), rearm=True)
            if await self._confirm(action):
                return _Result("disconnected", action.last_status, None)
            if not confirm_retried:
                confirm_retried = True
                self._log.warning("enforce_unconfirmed_retry", rule=d.rule, conversation_id=cid,
                                  participant_id=pid, confirm_timeout=self.confirm_timeout)
                self._outcome(d, "unconfirmed", action.last_status, action.attempts,
                              action.event_to_request_ms,
                              f"PATCH accepted but the party was not seen disconnected within "
                              f"{self.confirm_timeout:g} s; sending the PATCH once more")
                continue
            return _Result("unconfirmed", action.last_status,
                           f"PATCH accepted {action.attempts} times but the party was never "
                           f"seen disconnected; rule re-armed", rearm=True)

    async def _send(self, action: _Action) -> ApiError | None:
        """One PATCH. Returns the API error, or None when it was accepted (2xx). A
        cancellation propagates with `action.sending` still set: the PATCH may have landed."""
        cid, pid = action.key
        action.sending = True
        try:
            # The client would retry 409 itself; conflicts are retried by `_perform` instead,
            # so that `attempts` counts every PATCH.
            reply = await self.client.disconnect_participant(
                cid, pid, retry_conflict=0, on_send=lambda: self._sending(action))
        except ApiError as exc:
            action.sending = False
            action.last_status = exc.status or None
            return exc
        action.sending = False
        action.accepted = True
        action.last_status = reply if isinstance(reply, int) else None
        return None

    def _sending(self, action: _Action) -> None:
        """The client is about to write the first PATCH (limiter wait and token included):
        event-to-request is measured here, once per action."""
        if action.event_to_request_ms is not None:
            return
        d = action.decision
        origin = d.received_at if d.received_at is not None else d.decided_at
        delay = max(0.0, self._clock() - origin)
        action.event_to_request_ms = round(delay * 1000.0, 3)
        if self.metrics is not None:
            self.metrics.event_to_request_seconds.observe(delay)

    async def _confirm(self, action: _Action) -> bool:
        """True when the party is seen final: an applied change within `confirm_timeout`,
        else one GET of the call (404, or the participant final or absent)."""
        fut = action.confirm
        if action.gone or self._store_final(action.key):
            return True
        if fut is not None and self.confirm_timeout > 0:
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout=self.confirm_timeout)
                return True
            except TimeoutError:
                pass
        if action.gone or self._store_final(action.key):
            return True
        cid, pid = action.key
        try:
            call = await self.client.get_call(cid, priority=Priority.ENFORCE)
        except NotFoundError:
            return True
        except ApiError as exc:
            self._log.warning("enforce_confirm_get_failed", conversation_id=cid,
                              participant_id=pid, error=str(exc))
            return False
        # An event may have shown the party gone while the GET was under way.
        return action.gone or _participant_final_or_absent(call, pid)

    async def _gone_after_error(self, action: _Action, exc: ApiError) -> bool:
        """After a refused PATCH: is the party final? Events and the store first; for a 400
        (the API answering, but refusing this party) one GET of the call as well. Not after
        429/5xx/transport errors, which the client already retried: the API is struggling."""
        if action.gone or self._store_final(action.key):
            return True
        if exc.status != 400:
            return False
        cid, pid = action.key
        try:
            call = await self.client.get_call(cid, priority=Priority.ENFORCE)
        except NotFoundError:
            return True
        except ApiError:
            return False
        if action.gone:
            return True
        parts = call.get("participants")
        if not isinstance(parts, list):
            return False
        return any(isinstance(p, Mapping) and p.get("id") == pid
                   and p.get("state") in FINAL_STATES for p in parts)

    def _finish(self, action: _Action, result: _Result) -> None:
        if action.finished:
            return
        action.finished = True
        d = action.decision
        cid, pid = action.key
        if self._actions.get(action.key) is action:
            del self._actions[action.key]
        conv = self._by_conv.get(cid)
        if conv is not None and conv.get(pid) is action:
            del conv[pid]
            if not conv:
                del self._by_conv[cid]
        if action.confirm is not None and not action.confirm.done():
            action.confirm.cancel()
        level = "info" if result.outcome in ("disconnected", "already_gone") else "error"
        getattr(self._log, level)("enforce_outcome", rule=d.rule, conversation_id=cid,
                                  participant_id=pid, outcome=result.outcome,
                                  http_status=result.http_status, attempts=action.attempts,
                                  event_to_request_ms=action.event_to_request_ms,
                                  error=result.error)
        self._outcome(d, result.outcome, result.http_status, action.attempts,
                      action.event_to_request_ms, result.error)
        if result.rearm:
            self._unmark_acted(d)
            self._rearm(d)
        for f in action.followers:
            note = f"joined the in-flight action of rule {d.rule}"
            self._outcome(f, result.outcome, result.http_status, 0, None,
                          f"{note}: {result.error}" if result.error else note)
            if result.rearm:
                self._rearm(f)
            else:
                self._mark_acted(f)

    # ------------------------------------------------------------------ helpers

    def _store_final(self, key: PartyKey) -> bool:
        if self.store is None:
            return False
        call = self.store.get(key[0])
        if call is None:
            return False
        p = call.participants.get(key[1])
        return p is not None and p.is_final

    def _mark_acted(self, d: Decision) -> None:
        entry = self._acted.get(d.conversation_id)
        if entry is None:
            entry = self._acted[d.conversation_id] = set()
            while len(self._acted) > MAX_ACTED_CONVERSATIONS:
                self._acted.popitem(last=False)
        entry.add((d.rule, d.participant_id))

    def _unmark_acted(self, d: Decision) -> None:
        entry = self._acted.get(d.conversation_id)
        if entry is not None:
            entry.discard((d.rule, d.participant_id))

    def _rearm(self, d: Decision) -> None:
        self._safe_rearm(d.rule, d.conversation_id, d.participant_id)

    def _safe_rearm(self, rule: RuleName, cid: ConversationId, pid: ParticipantId) -> None:
        try:
            self.rules_engine.rearm(rule, cid, pid)
        except Exception as exc:
            self._log.error("enforce_rearm_failed", rule=rule, conversation_id=cid,
                            participant_id=pid, error=f"{exc.__class__.__name__}: {exc}")

    def _outcome(self, d: Decision, outcome: str, http_status: int | None, attempts: int,
                 event_to_request_ms: float | None, error: str | None) -> None:
        """Write one outcome record (an audit failure is logged, never raised) and count it."""
        self._count_outcome(d, outcome)
        try:
            self.audit.write(outcome_record(d, outcome=outcome, http_status=http_status,
                                            attempts=attempts,
                                            event_to_request_ms=event_to_request_ms,
                                            error=error))
        except Exception as exc:
            self._log.critical("audit write failed: outcome record lost", rule=d.rule,
                               conversation_id=d.conversation_id,
                               participant_id=d.participant_id, outcome=outcome,
                               error=f"{exc.__class__.__name__}: {exc}")

    def _count_decision(self, d: Decision, mode: str) -> None:
        if self.metrics is not None:
            self.metrics.decisions.labels(rule=d.rule, action=d.action, mode=mode).inc()

    def _count_outcome(self, d: Decision, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.outcomes.labels(rule=d.rule, outcome=outcome).inc()

    def _log_decision(self, d: Decision, mode: str) -> None:
        # The rule's severity is a field of the line; the level is capped at WARNING so that
        # the daemon's own CRITICAL lines (safety valve, missing permission) stand out.
        level = "info" if d.severity == "info" else "warning"
        getattr(self._log, level)(
            "decision", rule=d.rule, conversation_id=d.conversation_id,
            participant_id=d.participant_id, purpose=d.purpose, matched=d.matched, mode=mode,
            action=d.action, severity=d.severity, tags=list(d.tags), message=d.message,
            decided_at=d.decided_at, received_at=d.received_at)


def _participant_final_or_absent(call: Mapping[str, Any], participant_id: str) -> bool:
    parts = call.get("participants")
    if not isinstance(parts, list):
        return False  # malformed reply: cannot tell; treated as not confirmed
    for p in parts:
        if isinstance(p, Mapping) and p.get("id") == participant_id:
            return p.get("state") in FINAL_STATES
    return True
