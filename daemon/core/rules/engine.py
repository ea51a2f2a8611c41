"""The rule engine: edge-triggered evaluation of a `RuleSet` against call changes, timers.

- `on_change(change, now)` judges every live party of the changed call against every rule
  and returns `Decision`s, edge-triggered per (rule, conversation, participant): a triple
  fires once, and again only after it is re-armed. The edge state is the `Enforcement`'s
  (the one owner of enforcement state, `daemon.core.enforcement`): a failed removal re-arms
  there, with no callback.
- `hold_for` and time-dependent conditions (`connected_seconds`) are driven by timers
  (`daemon.core.rules.timers`): `due(now)` fires what became true without any event;
  `next_deadline()` says when to call it.
- `rejudge(released, now)`: removals became possible again (valve resumed, send gate
  opened): held decisions and every live party are judged at once from the state in memory.
- `swap(ruleset)` installs a reloaded rule set, keeping the state of unchanged rules.

All times are epoch seconds (float). No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from daemon.core.enforcement import FIRED, Enforcement
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.logs import get_logger
from daemon.core.model import Call, Change, Decision, Participant
from daemon.core.rules.fields import seen
from daemon.core.rules.ruleset import CompiledRule, RuleSet
from daemon.core.rules.timers import PendingMap, TimerHeap

log = get_logger(__name__)


@dataclass(slots=True)
class _CallState:
    call: Call
    pending: PendingMap = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConditionVerdict:
    """One top-level condition of a rule judged for a party: `text` as written, `scope`
    "call" when it reads only call fields, the value of each field it read, and whether
    it holds."""

    text: str
    scope: Literal["party", "call"]
    holds: bool
    values: dict[str, object]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why a rule does or does not hold for a party (for `explain` and replay)."""

    rule: RuleName
    holds: bool
    failed: tuple[str, ...]  # the top-level conditions that are false, as written
    values: dict[str, object]
    conditions: tuple[ConditionVerdict, ...] = ()  # every top-level condition, in written order


class RuleEngine:
    """Evaluates a RuleSet against call changes; keeps timer state per call.

    The edge state ("rule R fired for party P") lives in `enforcement` (the one owner of
    enforcement state, shared with the enforcer); one is made (with the rule set's valve
    budget) when none is given.
    """

    def __init__(self, ruleset: RuleSet, enforcement: Enforcement | None = None) -> None:
        self.ruleset = ruleset
        self.enforcement = enforcement if enforcement is not None else \
            Enforcement(ruleset.safety.max_disconnects_per_minute)
        self._calls: dict[ConversationId, _CallState] = {}
        self._timers = TimerHeap(lambda: ((cid, cs.pending) for cid, cs in self._calls.items()))
        self.evaluation_errors = 0  # rule judgments that raised (bad data); see _failed

    # -- events ---------------------------------------------------------------

    def on_change(self, change: Change, now: float) -> list[Decision]:
        """Judge every live party of `change.call`; return what newly fired."""
        call = change.call
        cs = self._calls.get(call.id)
        if cs is None:
            cs = self._calls[call.id] = _CallState(call)
        else:
            cs.call = call
            if cs.pending:
                for p in change.changed:
                    if p.is_final:
                        self._drop_party(cs, p.id)
        return self._evaluate_call(cs, now, change.received_at)

    def reevaluate(self, now: float) -> list[Decision]:
        """Judge every tracked call again (e.g. after `swap`, so new rules see live calls)."""
        out: list[Decision] = []
        for cs in list(self._calls.values()):
            out.extend(self._evaluate_call(cs, now, None))
        return out

    def _evaluate_call(self, cs: _CallState, now: float, received_at: float | None) -> list[Decision]:
        out: list[Decision] = []
        call = cs.call
        plan_for = self.ruleset.plan_for
        marks = self.enforcement.marks
        cmarks = marks(call.id)
        for party in call.participants.values():
            if party.is_final:
                continue
            fired = cmarks.get(party.id) if cmarks is not None else None
            plan = plan_for(party.purpose)
            if plan.plain:
                try:
                    hits = plan.fused(call, party, now)
                except Exception:  # unexpected data: judge rule by rule so one cannot mask others
                    hits = self._hits_one_by_one(plan.plain, call, party, now)
                for i in hits:
                    rule = plan.plain[i]
                    if fired is None or not fired.get(rule.name, 0) & FIRED:
                        out.append(self._fire(cs, rule, party, now, received_at))
                        cmarks = marks(call.id)
                        fired = cmarks.get(party.id) if cmarks is not None else None
            for name, test, gate, rule in plan.timed:
                if fired is not None and fired.get(name, 0) & FIRED:
                    continue
                try:
                    if gate(call, party, now):
                        d = self._judge_stateful(cs, rule, party, now, received_at,
                                                 True if gate is test else test(call, party, now))
                        if d is not None:
                            out.append(d)
                            cmarks = marks(call.id)
                            fired = cmarks.get(party.id) if cmarks is not None else None
                    elif cs.pending:
                        # cannot hold and no timer can make it hold: cancel what was pending
                        self._timers.cancel(cs.pending, (name, party.id))
                except Exception as exc:
                    self._failed(rule, call, party, exc)
        return out

    def _hits_one_by_one(self, rules: Sequence[CompiledRule], call: Call, party: Participant,
                         now: float) -> tuple[int, ...]:
        hits: list[int] = []
        for i, rule in enumerate(rules):
            try:
                if rule.test(call, party, now):
                    hits.append(i)
            except Exception as exc:
                self._failed(rule, call, party, exc)
        return tuple(hits)

    def _failed(self, rule: CompiledRule, call: Call, party: Participant, exc: Exception) -> None:
        """A rule could not be judged (malformed data slipped through): counted, logged, and
        treated as not matching; the other rules still run."""
        self.evaluation_errors += 1
        log.warning("rule_evaluation_failed", rule=rule.name, conversation_id=call.id,
                    participant_id=party.id, error=exc.__class__.__name__)

    def _judge_stateful(self, cs: _CallState, rule: CompiledRule, party: Participant, now: float,
                        received_at: float | None, holds: bool) -> Decision | None:
        key = (rule.name, party.id)
        pend = cs.pending.get(key)
        call = cs.call
        if holds:
            if rule.hold is None:
                return self._fire(cs, rule, party, now, received_at)
            deadline = pend.hold_deadline if pend is not None and pend.hold_deadline is not None \
                else now + rule.hold
            if deadline <= now:
                return self._fire(cs, rule, party, now, received_at)
            wake = deadline
            if rule.flip is not None:
                f = rule.flip(call, party, now)
                if f is not None and f < wake:
                    wake = f
            self._schedule(cs, key, deadline, wake)
            return None
        f = None
        if rule.flip is not None and rule.static(call, party, now):
            f = rule.flip(call, party, now)
        if f is None:
            if pend is not None:
                self._timers.cancel(cs.pending, key)
        else:
            self._schedule(cs, key, None, f)
        return None

    def _schedule(self, cs: _CallState, key: tuple[RuleName, ParticipantId],
                  hold_deadline: float | None, wake: float) -> None:
        self._timers.schedule(cs.pending, cs.call.id, key, hold_deadline, wake)

    def _fire(self, cs: _CallState, rule: CompiledRule, party: Participant, now: float,
              received_at: float | None) -> Decision:
        self.enforcement.mark(rule.name, cs.call.id, party.id, FIRED)
        if cs.pending:
            self._timers.cancel(cs.pending, (rule.name, party.id))
        return self._decision(rule, cs.call, party, now, received_at)

    def _decision(self, rule: CompiledRule, call: Call, party: Participant, now: float,
                  received_at: float | None) -> Decision:
        return Decision(
            rule=rule.name, action=rule.action, conversation_id=call.id, participant_id=party.id,
            purpose=party.purpose, matched=rule.matched(call, party, now), severity=rule.severity,
            tags=rule.tags, message=rule.render(call, party, now), decided_at=now,
            received_at=received_at)

    def _drop_party(self, cs: _CallState, pid: ParticipantId) -> None:
        self._timers.cancel_party(cs.pending, pid)

    def _pending_of(self, cid: ConversationId) -> PendingMap | None:
        cs = self._calls.get(cid)
        return cs.pending if cs is not None else None

    # -- timers ---------------------------------------------------------------

    def due(self, now: float) -> list[Decision]:
        """Fire hold_for rules whose deadline passed and time conditions that became true,
        judged against the current call state. Call at or after `next_deadline()`."""
        out: list[Decision] = []
        timers = self._timers
        for cid, name, pid, seq in timers.pop_due(now, self._pending_of):
            cs = self._calls[cid]
            rule = self.ruleset.by_name.get(name)
            party = cs.call.participants.get(pid)
            if rule is None or party is None or not party.is_live or \
                    self.enforcement.has_fired(name, cid, pid):
                timers.cancel(cs.pending, (name, pid))
                continue
            try:
                d = self._judge_stateful(cs, rule, party, now, None, rule.check(cs.call, party, now))
            except Exception as exc:
                self._failed(rule, cs.call, party, exc)
                d = None
            if d is not None:
                out.append(d)
            else:
                after = cs.pending.get((name, pid))
                if after is not None and after.seq == seq:
                    # the same wake time came back (clock at the edge): never spin on it
                    timers.cancel(cs.pending, (name, pid))
        return out

    def next_deadline(self) -> float | None:
        """Earliest pending timer (epoch s), or None."""
        return self._timers.next_deadline(self._pending_of)

    # -- state ----------------------------------------------------------------

    def rearm(self, rule: RuleName, conversation_id: ConversationId, participant_id: ParticipantId,
              *, at: float | None = None) -> None:
        """Let (rule, call, party) fire again (`Enforcement.rearm`). With `at`, `due(at)`
        re-judges the party even if no event arrives; without it, the next change does."""
        self.enforcement.rearm(rule, conversation_id, participant_id)
        cs = self._calls.get(conversation_id)
        if cs is not None and at is not None and rule in self.ruleset.by_name:
            self._schedule(cs, (rule, participant_id), None, at)

    def has_fired(self, rule: RuleName, conversation_id: ConversationId,
                  participant_id: ParticipantId) -> bool:
        return self.enforcement.has_fired(rule, conversation_id, participant_id)

    def rejudge(self, released: Sequence[tuple[RuleName, ConversationId, ParticipantId]],
                now: float) -> list[Decision]:
        """Removals are possible again: `released` are the held decisions
        (`Enforcement.release_held`). A released hold_for/time rule that still holds fires at
        once (its hold was already served); then every tracked call is judged again, so
        every live party that matches and has not been acted on is decided now."""
        out: list[Decision] = []
        by_name = self.ruleset.by_name
        for name, cid, pid in released:
            rule = by_name.get(name)
            cs = self._calls.get(cid)
            if rule is None or cs is None or not rule.stateful:
                continue
            party = cs.call.participants.get(pid)
            if party is None or not party.is_live or self.enforcement.has_fired(name, cid, pid):
                continue
            try:
                if rule.check(cs.call, party, now):
                    out.append(self._fire(cs, rule, party, now, None))
            except Exception as exc:
                self._failed(rule, cs.call, party, exc)
        out.extend(self.reevaluate(now))
        return out

    def forget_call(self, conversation_id: ConversationId) -> None:
        """Drop this engine's timer state for a call (its heap entries expire lazily); the
        call's marks are the `Enforcement`'s (`Engine` evicts both)."""
        cs = self._calls.pop(conversation_id, None)
        if cs is not None:
            self._timers.forget(cs.pending)

    def swap(self, ruleset: RuleSet) -> None:
        """Install a reloaded RuleSet. Fired and timer state survives only for rules whose
        name and definition (conditions, hold_for, action, used list contents) are unchanged."""
        old = self.ruleset.by_name
        keep = {r.name for r in ruleset.rules
                if r.name in old and old[r.name].fingerprint == r.fingerprint}
        self.ruleset = ruleset
        self.enforcement.keep_rules(keep)
        for cs in self._calls.values():
            self._timers.cancel_rules_except(cs.pending, keep)
        log.info("rules_swapped", rules=len(ruleset.rules), kept_state=len(keep))

    @property
    def tracked_calls(self) -> int:
        return len(self._calls)

    @property
    def pending_timers(self) -> int:
        return self._timers.live

    # -- stateless ------------------------------------------------------------

    def evaluate_party(self, call: Call, party: Participant, now: float) -> list[Decision]:
        """Decisions the rules' conditions give for `party` now, ignoring hold_for and
        edge state (nothing is recorded). For replay and explain."""
        return [self._decision(r, call, party, now, None)
                for r in self.ruleset.rules if r.check(call, party, now)]

    def explain(self, call: Call, party: Participant, now: float) -> list[Verdict]:
        """Per rule: does it hold, which top-level conditions fail, and every condition
        with the values it saw (ignoring hold_for and edge state; nothing is recorded)."""
        out: list[Verdict] = []
        for r in self.ruleset.rules:
            conds: list[ConditionVerdict] = []
            for i, (text, pred) in enumerate(r.conditions):
                try:
                    ok = bool(pred(call, party, now))
                except Exception:  # bad data: judged false, as on_change does (but an
                    ok = False     # explanation records nothing: no counter, no log line)
                fields = r.condition_fields[i] if i < len(r.condition_fields) else ()
                scope: Literal["party", "call"] = (
                    "call" if fields and all(f.label.startswith("call.") for f in fields) else "party")
                conds.append(ConditionVerdict(text, scope, ok, seen(fields, call, party, now)))
            failed = tuple(c.text for c in conds if not c.holds)
            out.append(Verdict(r.name, not failed, failed, r.matched(call, party, now), tuple(conds)))
        return out
