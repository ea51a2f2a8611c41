"""The enforcement policy: the one owner of enforcement state (pure, sans-I/O).

`Enforcement` knows, per party `(conversation_id, participant_id)`:

- which rules have *fired* for it (the rules' edge state: a (rule, party) decides once,
  and again only after it is re-armed);
- which rules have *acted* on it (a disconnect was started or joined and did not fail:
  the same rule never sends twice for the same party, even after a reload resets its edge);
- which decisions are *held* (suppressed by the safety valve, or decided while the send
  gate was closed, i.e. `standby`): they are judged again, at once, when removals become
  possible again (`release_held`);
- what is *in flight* (one action per party; later decisions for the party join it) and
  whether the state has shown the party final since (`observe`);
- what the safety valve allows (`valve`, a `SafetyValve`);
- what each outcome means (`MEANING`).

`RuleEngine` reads and writes the fired marks through it; the `Engine` shows it every
applied change (events, resync reads, 404s) and evicts its per-call records when the
store evicts the call (the store is the one eviction owner); the enforcer's I/O shell
(`daemon.service.enforcer.Enforcer`) asks it what to do with each decision (`admit`) and
reports how each action ended (`finish`). There are no callbacks: everyone holds the same
object.

All times are epoch seconds (float). Nothing here reads a clock, logs or does I/O.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Call, Change, Decision, Participant
from daemon.core.model import Origin as Origin  # re-exported: Origin lived here before it moved to model

PartyKey = tuple[ConversationId, ParticipantId]
Mode = Literal["enforce", "observe"]

Outcome = Literal["disconnected", "already_gone", "failed", "unconfirmed", "observed",
                  "suppressed", "standby", "unknown"]
OUTCOMES: Final[frozenset[str]] = frozenset(get_args(Outcome))  # one list: the Literal's

# Marks per (rule, party), as bit flags (one small int per rule per party).
FIRED: Final = 1  # the rule decided for the party and has not been re-armed
ACTED: Final = 2  # a disconnect for it was started or joined and did not fail
HELD_VALVE: Final = 4  # suppressed by the safety valve: judged again when it resumes
HELD_STANDBY: Final = 8  # decided while the send gate was closed: judged again when it opens
HELD: Final = HELD_VALVE | HELD_STANDBY

# Bound on the conversations with marks (the store evicts them; this only guards against
# decisions for calls the store never tracked, e.g. manual removals of untracked calls).
MAX_CONVERSATIONS: Final = 100_000

@dataclass(frozen=True, slots=True)
class Meaning:
    """What an outcome means for the party and its rule.

    `final`: the action is over for this decision (an `unconfirmed` written while the
    PATCH is retried once is an interim record, not the outcome). `rearm`: the rule may
    fire again for the party at its next change (the removal did not happen). `held`:
    the decision is judged again as soon as removals become possible (valve resumed, gate
    opened). `valve`: an action ending with this outcome used one slot of the safety valve
    (the slot is taken when the action is admitted, never given back).
    """

    final: bool
    rearm: bool
    held: bool
    valve: bool


MEANING: Final[Mapping[str, Meaning]] = {
    "disconnected": Meaning(final=True, rearm=False, held=False, valve=True),
    "already_gone": Meaning(final=True, rearm=False, held=False, valve=True),
    "failed": Meaning(final=True, rearm=True, held=False, valve=True),
    "unconfirmed": Meaning(final=True, rearm=True, held=False, valve=True),
    "observed": Meaning(final=True, rearm=False, held=False, valve=False),
    "suppressed": Meaning(final=True, rearm=False, held=False, valve=False),
    "standby": Meaning(final=True, rearm=False, held=True, valve=False),
    "unknown": Meaning(final=True, rearm=False, held=False, valve=False),
}


def manual_decision(call: Call, party: Participant, *, origin: Origin, now: float,
                    rule: str | None = None, message: str | None = None) -> Decision:
    """A removal asked for from outside the rules, as a `Decision` the enforcer treats like
    a rule's. `rule` defaults to `control:<caller>` (the metric label and audit `rule`); it
    is what "once per party" is keyed by. `now` is the decision time (epoch s)."""
    name = RuleName(rule if rule is not None else f"control:{origin.caller}")
    text = message if message is not None else (
        f"removal requested by {origin.caller}" + (f": {origin.reason}" if origin.reason else ""))
    return Decision(rule=name, action="disconnect", conversation_id=call.id,
                    participant_id=party.id, purpose=party.purpose,
                    matched={"participant_id": party.id}, severity="critical", tags=(),
                    message=text, decided_at=now, received_at=None, origin=origin)


# ---------------------------------------------------------------- safety valve


class SafetyValve:
    """Caps disconnects: at most `max_per_minute` in any sliding 60 s window.

    `allow(now)` returns True and counts one disconnect, or returns False and trips the
    valve when the budget is spent. Once tripped it stays tripped (every `allow` is False)
    until `resume()`. `max_per_minute == 0` allows nothing: the first attempt trips the
    valve (there is no "unlimited"; set a large number instead). Pure: `now` in seconds.
    """

    WINDOW = 60.0

    def __init__(self, max_per_minute: int) -> None:
        if max_per_minute < 0:
            raise ValueError("max_per_minute must be >= 0")
        self.max_per_minute = max_per_minute
        self._times: deque[float] = deque()
        self.tripped = False
        self.tripped_at: float | None = None

    def _prune(self, now: float) -> None:
        times = self._times
        while times and times[0] <= now - self.WINDOW:
            times.popleft()

    def allow(self, now: float) -> bool:
        if self.tripped:
            return False
        self._prune(now)
        if len(self._times) >= self.max_per_minute:
            self.tripped = True
            self.tripped_at = now
            return False
        self._times.append(now)
        return True

    def set_limit(self, max_per_minute: int) -> None:
        """A reload changed `safety.max_disconnects_per_minute`; the window is kept."""
        if max_per_minute < 0:
            raise ValueError("max_per_minute must be >= 0")
        self.max_per_minute = max_per_minute

    def count(self, now: float) -> int:
        """Disconnects allowed in the last 60 s."""
        self._prune(now)
        return len(self._times)

    def resume(self) -> None:
        """Operator reset: untrip and start a fresh window."""
        self.tripped = False
        self.tripped_at = None
        self._times.clear()


# ---------------------------------------------------------------- admission


Verdict = Literal["send", "observed", "stopping", "joined", "repeat", "already_gone",
                  "standby", "suppressed"]


@dataclass(frozen=True, slots=True)
class Admission:
    """What to do with one decision. `verdict`:

    - `send`: a new action is in flight for the party (`flight`); send the PATCH;
    - `joined`: another action for the party is in flight (`flight`); its outcome will be
      this decision's too;
    - `observed` (observe rule or observe mode), `stopping` (draining), `repeat` (the rule
      already acted on the party), `already_gone` (the party is final), `standby` (the send
      gate is closed), `suppressed` (the valve refused; `tripped` says it tripped now):
      nothing is sent, the decision's outcome is written at once with `reason`.
    """

    verdict: Verdict
    reason: str | None = None
    flight: InFlight | None = None
    tripped: bool = False

    @property
    def outcome(self) -> Outcome | None:
        """The outcome to write now (None for `send` and `joined`)."""
        return _IMMEDIATE.get(self.verdict)


_IMMEDIATE: Final[dict[str, Outcome]] = {
    "observed": "observed", "stopping": "suppressed", "repeat": "suppressed",
    "already_gone": "already_gone", "standby": "standby", "suppressed": "suppressed",
}


# ---------------------------------------------------------------- one action's course (pure)


ReplyKind = Literal["accepted", "gate_closed", "not_found", "conflict", "forbidden", "refused"]
"""What came back from one PATCH: 2xx (`accepted`), the send gate closed before it was
written (`gate_closed`), 404, 409, 403, or any other refusal (`refused`; the client already
retried 429/5xx/transport errors)."""

NextStep = Literal["finish", "retry", "confirm", "check_gone", "resend"]


@dataclass(frozen=True, slots=True)
class Next:
    """What the enforcer's shell does next with an action in flight:

    - `finish`: the action ends with `outcome` (`status`: the HTTP status to record, `error`);
    - `retry`: a 409: wait the conflict policy's delay, then send again;
    - `confirm`: the PATCH was accepted: wait for the party to show final (a settled step
      within `confirm_timeout`, else one GET), then `after_confirm`;
    - `check_gone`: a refusal: is the party final after all (settled steps; for a 400 one
      GET)? then `after_gone_check`;
    - `resend`: accepted but never seen final: write the interim `unconfirmed` record
      (`error`) and send the PATCH once more.
    """

    step: NextStep
    outcome: Outcome | None = None
    status: int | None = None
    error: str | None = None


def _finish(outcome: Outcome, status: int | None, error: str | None = None) -> Next:
    return Next("finish", outcome, status, error)


@dataclass(frozen=True, slots=True)
class Ended:
    """One decision's result when its action ends (`Enforcement.finish`): the leading
    decision's own (`leader`; `attempts`: the PATCHes sent), or a follower's (the leader's
    outcome and status, `attempts` 0, `error` naming the rule whose action it joined)."""

    decision: Decision
    outcome: Outcome
    status: int | None
    attempts: int
    error: str | None
    leader: bool


@dataclass(eq=False, slots=True)
class InFlight:
    """One party's action: the leading decision, those that joined it, and whether an
    applied change (event, resync read, 404) has shown the party final since it started,
    and its course: the enforcer's shell sends each PATCH and reports what came back
    (`replied`); `before_send`, `after_reply`, `after_gone_check`, `after_confirm` and
    `abandoned` decide what happens next and, in the end, the outcome (`Next`)."""

    decision: Decision
    started_at: float
    followers: list[Decision] = field(default_factory=list)
    gone: bool = False
    attempts: int = 0  # PATCHes sent for it (the enforcer's; not the client's own retries)
    accepted: bool = False  # a PATCH of this action got a 2xx
    last_status: int | None = None  # HTTP status of the last PATCH (None: none yet)
    resent: bool = False  # sent once more after an unconfirmed acceptance

    @property
    def key(self) -> PartyKey:
        return (self.decision.conversation_id, self.decision.participant_id)

    # -- the action's course (the shell sends; these decide) ---------------------------------

    def before_send(self, *, may_send: bool) -> Next | None:
        """At the top of each attempt: ends the action when the party is already final or
        the send gate is closed; else counts the attempt (None: send the PATCH)."""
        if self.gone:
            if self.accepted:  # our accepted PATCH took effect after all
                return _finish("disconnected", self.last_status)
            return _finish("already_gone", self.last_status,
                           None if self.attempts else "party left before any request was sent")
        if not may_send:
            return _finish("standby", self.last_status,
                           "not the leader (standby) when the PATCH was due; nothing sent")
        self.attempts += 1
        return None

    def replied(self, kind: ReplyKind, status: int | None) -> None:
        """What one PATCH got back (`status`: its HTTP status, None when none)."""
        if kind == "accepted":
            self.accepted = True
        self.last_status = status

    def unsent(self) -> None:
        """The send gate closed before the counted attempt's PATCH was written: it does not
        count."""
        self.attempts -= 1

    def after_reply(self, kind: ReplyKind, text: str, *, max_attempts: int,
                    missing: Sequence[str] = ()) -> Next:
        """The next step after a PATCH's answer (`replied` first). `text`: the error's
        message; `missing`: the permissions a 403 names."""
        if kind == "accepted":
            return Next("confirm")
        if kind == "gate_closed":
            if self.accepted:  # an earlier PATCH of this action was accepted
                return _finish("unconfirmed", self.last_status, f"PATCH accepted, not confirmed; {text}")
            return _finish("standby", self.last_status, text)
        if kind == "not_found":
            # the earlier accepted PATCH removed the party, or it had left
            return _finish("disconnected" if self.accepted else "already_gone", 404)
        if kind == "conflict":
            if self.attempts < max_attempts:
                return Next("retry")
            return _finish("failed", 409, f"409 conflict on every one of {self.attempts} attempts: {text}")
        if kind == "forbidden":
            return _finish("failed", 403, f"403 forbidden: the OAuth client's role lacks permission "
                                          f"{', '.join(missing)}: {text}")
        return Next("check_gone")

    def after_gone_check(self, gone: bool, *, status: int | None, text: str) -> Next:
        """After a refused PATCH: the party final after all (Genesys may refuse a PATCH for a
        party that has just left) is not a failure."""
        if gone:
            if self.accepted:
                return _finish("disconnected", self.last_status)
            return _finish("already_gone", self.last_status, f"party had left; the PATCH was refused: {text}")
        return _finish("failed", status or None, text)

    def after_confirm(self, confirmed: bool, *, confirm_timeout: float) -> Next:
        """After waiting for the accepted PATCH to show: confirmed -> `disconnected`; not,
        the first time -> send once more (an interim `unconfirmed` record); else the final
        `unconfirmed` (the rule is re-armed)."""
        if confirmed:
            return _finish("disconnected", self.last_status)
        if not self.resent:
            self.resent = True
            return Next("resend", "unconfirmed", self.last_status,
                        f"PATCH accepted but the party was not seen disconnected within "
                        f"{confirm_timeout:g} s; sending the PATCH once more")
        return _finish("unconfirmed", self.last_status,
                       f"PATCH accepted {self.attempts} times but the party was never "
                       f"seen disconnected; rule re-armed")

    def abandoned(self, *, sending: bool) -> Next:
        """The action was cancelled at shutdown (`sending`: a PATCH was with the client)."""
        if sending or self.accepted:
            return _finish("unconfirmed", self.last_status,
                           "abandoned at shutdown after the PATCH was sent; removal not confirmed")
        last = f" (last answer HTTP {self.last_status})" if self.last_status else ""
        return _finish("failed", self.last_status, f"abandoned at shutdown with no PATCH accepted{last}")


# ---------------------------------------------------------------- the owner


class Enforcement:
    """The one owner of enforcement state. See the module docstring.

    `max_per_minute`: the safety valve's budget (`valve.max_per_minute` may be changed on
    reload). `max_conversations`: bound on conversations with marks (oldest dropped).
    """

    def __init__(self, max_per_minute: int = 1_000_000, *,
                 max_conversations: int = MAX_CONVERSATIONS) -> None:
        self.valve = SafetyValve(max_per_minute)
        self.max_conversations = max_conversations
        # conversation -> party -> rule -> flags; conversations oldest first (bounded).
        self._marks: OrderedDict[ConversationId, dict[ParticipantId, dict[RuleName, int]]] = OrderedDict()
        self._flights: dict[PartyKey, InFlight] = {}
        self._flights_by_conv: dict[ConversationId, dict[ParticipantId, InFlight]] = {}
        self._held = 0  # (rule, party) pairs with a HELD flag, so release is O(1) when none

    # -- marks (the rules' edge state and "acted on") ---------------------------------------

    def marks(self, conversation_id: ConversationId) -> dict[ParticipantId, dict[RuleName, int]] | None:
        """The marks of one call: party -> rule -> flags (read-only by convention; for the
        rule engine's hot path, which tests `rule in marks[party]` for "has fired")."""
        return self._marks.get(conversation_id)

    def flags(self, rule: RuleName, conversation_id: ConversationId,
              participant_id: ParticipantId) -> int:
        conv = self._marks.get(conversation_id)
        party = conv.get(participant_id) if conv is not None else None
        return party.get(rule, 0) if party is not None else 0

    def has_fired(self, rule: RuleName, conversation_id: ConversationId,
                  participant_id: ParticipantId) -> bool:
        return bool(self.flags(rule, conversation_id, participant_id) & FIRED)

    def has_acted(self, rule: RuleName, conversation_id: ConversationId,
                  participant_id: ParticipantId) -> bool:
        return bool(self.flags(rule, conversation_id, participant_id) & ACTED)

    def mark(self, rule: RuleName, conversation_id: ConversationId,
             participant_id: ParticipantId, flag: int) -> None:
        """Set `flag` (FIRED, ACTED, HELD_*) for (rule, party)."""
        conv = self._marks.get(conversation_id)
        if conv is None:
            conv = self._marks[conversation_id] = {}
            while len(self._marks) > self.max_conversations:
                _, dropped = self._marks.popitem(last=False)
                self._held -= _count_held(dropped)
        party = conv.get(participant_id)
        if party is None:
            party = conv[participant_id] = {}
        old = party.get(rule, 0)
        if flag & HELD and not old & HELD:
            self._held += 1
        party[rule] = old | flag

    def clear(self, rule: RuleName, conversation_id: ConversationId,
              participant_id: ParticipantId, flag: int) -> None:
        """Clear `flag` for (rule, party); drops empty records."""
        conv = self._marks.get(conversation_id)
        party = conv.get(participant_id) if conv is not None else None
        if party is None or conv is None:
            return
        old = party.get(rule, 0)
        new = old & ~flag
        if old & HELD and not new & HELD:
            self._held -= 1
        if new:
            party[rule] = new
        else:
            party.pop(rule, None)
            if not party:
                del conv[participant_id]

    def rearm(self, rule: RuleName, conversation_id: ConversationId,
              participant_id: ParticipantId) -> None:
        """The removal did not happen: the rule may fire and act on the party again."""
        self.clear(rule, conversation_id, participant_id, FIRED | ACTED | HELD)

    def keep_rules(self, keep: Iterable[RuleName]) -> None:
        """After a reload: edge state (fired, held) survives only for the rules in `keep`
        (unchanged definitions); "acted on" survives for every rule (never send twice)."""
        kept = frozenset(keep)
        for conv in self._marks.values():
            for pid in list(conv):
                party = conv[pid]
                for rule in list(party):
                    if rule not in kept:
                        old = party[rule]
                        if old & HELD:
                            self._held -= 1
                        new = old & ACTED
                        if new:
                            party[rule] = new
                        else:
                            del party[rule]
                if not party:
                    del conv[pid]

    def release_held(self) -> list[tuple[RuleName, ConversationId, ParticipantId]]:
        """Removals are possible again (valve resumed, gate opened): every held decision is
        un-fired so the rules judge it again. Returns the (rule, conversation, party) that
        were held, for the rule engine to act on at once."""
        out: list[tuple[RuleName, ConversationId, ParticipantId]] = []
        if not self._held:
            return out
        for cid, conv in self._marks.items():
            for pid in list(conv):
                party = conv[pid]
                for rule in [r for r, f in party.items() if f & HELD]:
                    new = party[rule] & ~(HELD | FIRED)
                    if new:
                        party[rule] = new
                    else:
                        del party[rule]
                    out.append((rule, cid, pid))
                if not party:
                    del conv[pid]
        self._held = 0
        return out

    @property
    def held(self) -> int:
        """(rule, party) decisions held back by the valve or the closed gate."""
        return self._held

    def forget_call(self, conversation_id: ConversationId) -> None:
        """The store evicted the call: drop its marks (actions in flight keep running)."""
        conv = self._marks.pop(conversation_id, None)
        if conv is not None:
            self._held -= _count_held(conv)

    @property
    def tracked_calls(self) -> int:
        """Conversations with marks."""
        return len(self._marks)

    # -- changes --------------------------------------------------------------------------

    def observe(self, change: Change) -> tuple[PartyKey, ...]:
        """An applied change (event, resync read, REST reply, 404): the in-flight parties it
        shows final, now marked `gone`. O(actions in flight on that call)."""
        flights = self._flights_by_conv.get(change.call.id)
        if not flights:
            return ()
        parties = change.call.participants
        out: list[PartyKey] = []
        for pid, flight in flights.items():
            p = parties.get(pid)
            if p is not None and p.is_final and not flight.gone:
                flight.gone = True
                out.append(flight.key)
        return tuple(out)

    # -- actions --------------------------------------------------------------------------

    def in_flight(self, key: PartyKey) -> InFlight | None:
        return self._flights.get(key)

    @property
    def flights(self) -> int:
        """Actions in flight."""
        return len(self._flights)

    def admit(self, d: Decision, now: float, *, mode: Mode, accepting: bool = True,
              may_send: bool = True, party_final: bool = False) -> Admission:
        """Decide what to do with `d` (see `Admission`). For `send` the action is recorded in
        flight and the rule marked acted on; the caller must `finish` it.

        Order: observe rule/mode; draining; joining an action in flight; the rule already
        acted on the party; the party already final (`party_final`, as the state knows it);
        the send gate (`may_send` False: `standby`, held); the valve (refused: `suppressed`,
        held). `now` (epoch s) is the valve's clock.
        """
        rule, cid, pid = d.rule, d.conversation_id, d.participant_id
        if d.action != "disconnect" or mode == "observe":
            return Admission("observed")
        if not accepting:
            return Admission("stopping", "daemon stopping (draining): decision audited, nothing sent")
        leader = self._flights.get((cid, pid))
        if leader is not None:
            leader.followers.append(d)
            return Admission("joined", f"joined the in-flight action of rule {leader.decision.rule}",
                             flight=leader)
        if self.has_acted(rule, cid, pid):
            return Admission("repeat", f"party already acted on by rule {rule}; not sent twice")
        if party_final:
            return Admission("already_gone", "party already disconnected before any request was sent")
        if not may_send:
            self.mark(rule, cid, pid, FIRED | HELD_STANDBY)
            return Admission("standby", "not the leader (standby): decision audited, nothing sent")
        valve = self.valve
        was_tripped = valve.tripped
        if not valve.allow(now):
            self.mark(rule, cid, pid, FIRED | HELD_VALVE)
            return Admission("suppressed", f"safety valve tripped (max {valve.max_per_minute} "
                                           f"disconnects a minute); nothing sent",
                             tripped=not was_tripped)
        flight = InFlight(d, now)
        self._flights[(cid, pid)] = flight
        self._flights_by_conv.setdefault(cid, {})[pid] = flight
        self.mark(rule, cid, pid, FIRED | ACTED)
        return Admission("send", flight=flight)

    def finish(self, flight: InFlight, outcome: Outcome, *, status: int | None = None,
               error: str | None = None) -> list[Ended]:
        """The action ended with `outcome` (`status`: the HTTP status of its last PATCH,
        `error`): no longer in flight; by `MEANING`, its rule and its followers' rules are
        re-armed (the removal did not happen), held (standby: judged again when the gate
        opens), or marked acted on. Returns each decision's result to record, the leading
        decision first, then the followers in the order they joined (see `Ended`)."""
        key = flight.key
        if self._flights.get(key) is flight:
            del self._flights[key]
        conv = self._flights_by_conv.get(key[0])
        if conv is not None and conv.get(key[1]) is flight:
            del conv[key[1]]
            if not conv:
                del self._flights_by_conv[key[0]]
        meaning = MEANING[outcome]
        for d in (flight.decision, *flight.followers):
            if meaning.rearm:
                self.rearm(d.rule, d.conversation_id, d.participant_id)
            elif meaning.held:
                self.clear(d.rule, d.conversation_id, d.participant_id, ACTED)
                self.mark(d.rule, d.conversation_id, d.participant_id, FIRED | HELD_STANDBY)
            else:
                self.mark(d.rule, d.conversation_id, d.participant_id, FIRED | ACTED)
        lead = flight.decision
        note = f"joined the in-flight action of rule {lead.rule}"
        joined_error = f"{note}: {error}" if error else note
        return [Ended(lead, outcome, status, flight.attempts, error, leader=True),
                *(Ended(d, outcome, status, 0, joined_error, leader=False) for d in flight.followers)]

    def not_sent(self, d: Decision) -> None:
        """The decision could not be acted on before any action began (its audit record
        could not be written): re-arm its rule so a later change acts on the party."""
        self.rearm(d.rule, d.conversation_id, d.participant_id)


def _count_held(conv: dict[ParticipantId, dict[RuleName, int]]) -> int:
    return sum(1 for party in conv.values() for f in party.values() if f & HELD)
