"""daemon.core.enforcement.Enforcement: the one owner of enforcement state, pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.core.enforcement import (
    ACTED, FIRED, HELD_STANDBY, HELD_VALVE, MEANING, OUTCOMES, Ended, Enforcement, InFlight, Next, Origin,
    manual_decision,
)
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Call, Change, Decision, Participant
try:
    from tests._rules_helpers import change, make_call, one_rule, party
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ on sys.path
    from _rules_helpers import change, make_call, one_rule, party  # type: ignore[no-redef]

from daemon.core.rules import RuleEngine

T0 = 1_795_000_000.0
C1, P1, P2 = ConversationId("c1"), ParticipantId("p1"), ParticipantId("p2")
R1, R2 = RuleName("r1"), RuleName("r2")


def decision(rule: RuleName = R1, pid: ParticipantId = P1, action: str = "disconnect") -> Decision:
    return Decision(rule=rule, action=action, conversation_id=C1, participant_id=pid,  # type: ignore[arg-type]
                    purpose="external", matched={}, severity="critical", tags=(), message="m",
                    decided_at=T0, received_at=T0)


def test_every_outcome_has_a_meaning() -> None:
    assert set(MEANING) == OUTCOMES
    assert MEANING["failed"].rearm and MEANING["unconfirmed"].rearm
    assert MEANING["standby"].held and not MEANING["disconnected"].rearm


def test_admission_order_and_verdicts() -> None:
    e = Enforcement(max_per_minute=1)
    assert e.admit(decision(action="observe"), T0, mode="enforce").verdict == "observed"
    assert e.admit(decision(), T0, mode="observe").verdict == "observed"
    assert e.admit(decision(), T0, mode="enforce", accepting=False).verdict == "stopping"
    assert e.admit(decision(), T0, mode="enforce", party_final=True).verdict == "already_gone"
    sent = e.admit(decision(), T0, mode="enforce")
    assert sent.verdict == "send" and sent.flight is not None and e.flights == 1
    assert e.flags(R1, C1, P1) == FIRED | ACTED
    joined = e.admit(decision(R2), T0, mode="enforce")
    assert joined.verdict == "joined" and joined.flight is sent.flight
    assert sent.flight.followers == [joined.flight.followers[0]]
    # another party: the gate first, then the valve (budget 1, spent)
    st = e.admit(decision(pid=P2), T0, mode="enforce", may_send=False)
    assert st.verdict == "standby" and st.outcome == "standby" and e.flags(R1, C1, P2) & HELD_STANDBY
    sup = e.admit(decision(R2, pid=P2), T0, mode="enforce")
    assert sup.verdict == "suppressed" and sup.tripped and e.valve.tripped
    assert e.admit(decision(RuleName("r3"), pid=P2), T0, mode="enforce").tripped is False  # tripped once
    assert e.held == 3


def test_finish_rearms_holds_or_marks_acted() -> None:
    e = Enforcement()
    a = e.admit(decision(), T0, mode="enforce").flight
    assert a is not None
    e.admit(decision(R2), T0, mode="enforce")  # joins
    e.finish(a, "failed")
    assert e.flights == 0 and e.flags(R1, C1, P1) == 0 and e.flags(R2, C1, P1) == 0
    b = e.admit(decision(), T0, mode="enforce").flight
    assert b is not None
    e.finish(b, "disconnected")
    assert e.has_acted(R1, C1, P1)
    assert e.admit(decision(), T0, mode="enforce").verdict == "repeat"
    c = e.admit(decision(pid=P2), T0, mode="enforce").flight
    assert c is not None
    e.finish(c, "standby")
    assert e.flags(R1, C1, P2) == FIRED | HELD_STANDBY and e.held == 1


def test_finish_gives_every_decision_of_the_action_its_result() -> None:
    """Core owns the followers: `finish` returns the leader's result, then each follower's
    (same outcome and status, no attempts of its own, the join named in the error)."""
    e = Enforcement()
    lead_d, f1, f2 = decision(), decision(R2), decision(RuleName("r3"))
    flight = e.admit(lead_d, T0, mode="enforce").flight
    assert flight is not None
    assert e.admit(f1, T0, mode="enforce").verdict == "joined"
    assert e.admit(f2, T0, mode="enforce").verdict == "joined"
    assert flight.before_send(may_send=True) is None  # one PATCH sent
    flight.replied("refused", 400)
    ended = e.finish(flight, "failed", status=400, error="HTTP 400: bad")
    assert ended == [
        Ended(lead_d, "failed", 400, 1, "HTTP 400: bad", leader=True),
        Ended(f1, "failed", 400, 0, "joined the in-flight action of rule r1: HTTP 400: bad", leader=False),
        Ended(f2, "failed", 400, 0, "joined the in-flight action of rule r1: HTTP 400: bad", leader=False),
    ]
    assert [x.decision for x in ended] == [lead_d, f1, f2]  # the very objects admitted
    assert all(x.decision is y for x, y in zip(ended, (lead_d, f1, f2), strict=True))
    g = e.admit(decision(pid=P2), T0, mode="enforce").flight
    assert g is not None
    assert e.finish(g, "disconnected", status=202) == [
        Ended(g.decision, "disconnected", 202, 0, None, leader=True)]


def test_release_held_and_eviction_and_reload() -> None:
    e = Enforcement(max_per_minute=0)
    e.admit(decision(), T0, mode="enforce")  # valve: nothing allowed
    assert e.flags(R1, C1, P1) == FIRED | HELD_VALVE
    assert e.release_held() == [(R1, C1, P1)] and e.flags(R1, C1, P1) == 0 and e.held == 0
    assert e.release_held() == []
    e.mark(R1, C1, P1, FIRED | ACTED)
    e.mark(R2, C1, P1, FIRED)
    e.keep_rules([])  # a reload changed both rules: the edge goes, "acted on" stays
    assert e.flags(R1, C1, P1) == ACTED and e.flags(R2, C1, P1) == 0
    e.forget_call(C1)
    assert e.marks(C1) is None and e.tracked_calls == 0


def test_observe_marks_in_flight_parties_gone_once() -> None:
    e = Enforcement()
    flight = e.admit(decision(), T0, mode="enforce").flight
    assert flight is not None
    gone = Participant(id=P1, state="Disconnected")  # any letter case is final
    ch = Change(Call(C1, participants={P1: gone}), (gone,), False, "resync", T0)
    assert e.observe(ch) == ((C1, P1),) and flight.gone
    assert e.observe(ch) == ()


def test_marks_are_bounded() -> None:
    e = Enforcement(max_conversations=2)
    for i in range(5):
        e.mark(R1, ConversationId(f"c{i}"), P1, FIRED | HELD_VALVE)
    assert e.tracked_calls == 2 and e.held == 2


def test_manual_decision_carries_its_origin() -> None:
    p = Participant(id=P1, purpose="customer", state="connected")
    d = manual_decision(Call(C1, participants={P1: p}), p, origin=Origin("orch", "fraud"), now=T0)
    assert d.rule == "control:orch" and d.origin == Origin("orch", "fraud") and d.action == "disconnect"
    assert d.conversation_id == C1 and d.participant_id == P1 and "fraud" in d.message


def test_rejudge_acts_at_once_on_held_hold_for_rules(tmp_path: Path) -> None:
    """A held hold_for decision is decided again at once on release (its hold was served);
    a plain rule held by the valve too; both from the state in memory, no event."""
    rs = one_rule(tmp_path, when={"purpose": "external"}, hold_for="10s")
    eng = RuleEngine(rs)
    call = make_call(party("x", purpose="external"))
    assert eng.on_change(change(call, T0), T0) == []
    [d] = eng.due(T0 + 10)
    eng.enforcement.valve = type(eng.enforcement.valve)(0)
    assert eng.enforcement.admit(d, T0 + 10, mode="enforce").verdict == "suppressed"
    assert eng.on_change(change(call, T0 + 11), T0 + 11) == []  # held: no repeat decision
    again = eng.rejudge(eng.enforcement.release_held(), T0 + 12)
    assert [(x.rule, x.participant_id, x.decided_at) for x in again] == [("r", "x", T0 + 12)]


@pytest.mark.parametrize("state, final", [("disconnected", True), ("TERMINATED", True),
                                          ("connected", False), (None, False), (3, False)])
def test_is_final_state(state: object, final: bool) -> None:
    from daemon.core.model import is_final_state
    assert is_final_state(state) is final


def _flight() -> InFlight:
    return InFlight(decision(), T0)


def test_an_actions_course_is_decided_in_core() -> None:
    """The enforcer only sends; `InFlight` decides each next step and the outcome."""
    f = _flight()
    assert f.before_send(may_send=True) is None and f.attempts == 1
    f.replied("accepted", 202)
    assert f.after_reply("accepted", "", max_attempts=3) == Next("confirm")
    first = f.after_confirm(False, confirm_timeout=5.0)
    assert (first.step, first.outcome, first.status) == ("resend", "unconfirmed", 202)
    assert "within 5 s" in (first.error or "")
    assert f.before_send(may_send=True) is None and f.attempts == 2
    f.replied("accepted", 202)
    last = f.after_confirm(False, confirm_timeout=5.0)
    assert (last.step, last.outcome) == ("finish", "unconfirmed") and "2 times" in (last.error or "")
    # confirmed at once
    g = _flight()
    g.before_send(may_send=True)
    g.replied("accepted", 202)
    assert g.after_confirm(True, confirm_timeout=5.0) == Next("finish", "disconnected", 202)


def test_replies_decide_the_outcome() -> None:
    f = _flight()
    f.before_send(may_send=True)
    f.replied("conflict", 409)
    assert f.after_reply("conflict", "409", max_attempts=2) == Next("retry")
    f.before_send(may_send=True)
    f.replied("conflict", 409)
    done = f.after_reply("conflict", "busy", max_attempts=2)
    assert (done.outcome, done.status, done.error) == ("failed", 409, "409 conflict on every one of 2 attempts: busy")
    g = _flight()
    g.before_send(may_send=True)
    g.replied("forbidden", 403)
    nxt = g.after_reply("forbidden", "no", max_attempts=3, missing=["conversation:communication:disconnect"])
    assert (nxt.outcome, nxt.status) == ("failed", 403) and "conversation:communication:disconnect" in (nxt.error or "")
    h = _flight()
    h.before_send(may_send=True)
    h.replied("not_found", 404)
    assert h.after_reply("not_found", "", max_attempts=3) == Next("finish", "already_gone", 404)
    # a refusal: the shell checks whether the party left
    r = _flight()
    r.before_send(may_send=True)
    r.replied("refused", 400)
    assert r.after_reply("refused", "not connected", max_attempts=3) == Next("check_gone")
    assert r.after_gone_check(True, status=400, text="not connected").outcome == "already_gone"
    assert r.after_gone_check(False, status=400, text="x") == Next("finish", "failed", 400, "x")


def test_gate_party_gone_and_abandon() -> None:
    f = _flight()
    assert f.before_send(may_send=False) == Next(
        "finish", "standby", None, "not the leader (standby) when the PATCH was due; nothing sent")
    f.gone = True
    assert f.before_send(may_send=True) == Next(
        "finish", "already_gone", None, "party left before any request was sent")
    g = _flight()
    g.before_send(may_send=True)
    g.replied("gate_closed", None)
    g.unsent()
    assert g.attempts == 0
    assert g.after_reply("gate_closed", "closed", max_attempts=3) == Next("finish", "standby", None, "closed")
    h = _flight()
    h.before_send(may_send=True)
    assert h.abandoned(sending=True).outcome == "unconfirmed"
    assert h.abandoned(sending=False).outcome == "failed"
