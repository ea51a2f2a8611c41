"""daemon.core.engine.Engine: parse -> apply -> rules glue, with a stub rule evaluator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from _core_payloads import conversation, frame, party
from daemon.core.engine import MESSAGE_KINDS, Engine, RuleEvaluator
from daemon.core.enforcement import Enforcement
from daemon.core.events import REJECT_REASONS, CallEvent, Heartbeat, Rejected
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Change, Decision
from daemon.core.state import CallStore

T0 = 1_795_000_000.0


def decision(change: Change, pid: str, now: float) -> Decision:
    return Decision(rule=RuleName("no-external"), action="disconnect", conversation_id=change.call.id,
                    participant_id=ParticipantId(pid), purpose="external", matched={"purpose": "external"},
                    severity="critical", tags=(), message="external party", decided_at=now,
                    received_at=change.received_at)


class StubRules:
    """Decides on every changed live external party; one timer; records calls."""

    def __init__(self) -> None:
        self.changes: list[tuple[Change, float]] = []
        self.forgotten: list[str] = []
        self.deadline: float | None = None
        self.due_calls: list[float] = []
        self.fail = False
        self.enforcement = Enforcement()
        self.rejudged: list[tuple[Sequence[Any], float]] = []

    def rejudge(self, released: Sequence[tuple[RuleName, ConversationId, ParticipantId]],
                now: float) -> list[Decision]:
        self.rejudged.append((released, now))
        return []

    def on_change(self, change: Change, now: float) -> list[Decision]:
        if self.fail:
            raise RuntimeError("rule bug")
        self.changes.append((change, now))
        return [decision(change, p.id, now) for p in change.changed
                if p.purpose == "external" and p.is_live]

    def due(self, now: float) -> list[Decision]:
        self.due_calls.append(now)
        if self.fail:
            raise RuntimeError("rule bug")
        return []

    def next_deadline(self) -> float | None:
        return self.deadline

    def forget_call(self, conversation_id: ConversationId) -> None:
        if self.fail:
            raise RuntimeError("rule bug")
        self.forgotten.append(conversation_id)


def make() -> tuple[Engine, StubRules]:
    rules = StubRules()
    checked: RuleEvaluator = rules  # the stub satisfies the protocol (mypy checks this line)
    return Engine(checked, CallStore(ended_grace=30.0)), rules


def body(*parties: dict[str, Any]) -> dict[str, Any]:
    return conversation("c1", list(parties))


def test_feed_call_event_decides() -> None:
    engine, rules = make()
    fed = engine.feed(frame(body(party("a"), party("x", purpose="external"))), T0)
    assert isinstance(fed.message, CallEvent)
    assert fed.change is not None and fed.change.received_at == T0 and fed.change.source == "event"
    assert [d.participant_id for d in fed.decisions] == ["x"]
    assert rules.changes[0][1] == T0
    assert engine.messages["call_event"] == 1 and engine.call_events == {"queue": 1}
    assert engine.counters["changes"] == 1 and engine.counters["decisions"] == 1


def test_duplicate_event_no_rule_call() -> None:
    engine, rules = make()
    raw = frame(body(party("a"), party("x", purpose="external")), "v2.users.u1.conversations.calls")
    engine.feed(raw, T0)
    fed = engine.feed(raw, T0 + 1)
    assert fed.change is None and fed.decisions == []
    assert len(rules.changes) == 1
    assert engine.counters["duplicates"] == 1 and engine.call_events == {"user": 2}


def test_non_call_messages_and_rejections_counted() -> None:
    engine, rules = make()
    hb = orjson.dumps({"topicName": "channel.metadata", "eventBody": {"message": "WebSocket Heartbeat"}})
    assert isinstance(engine.feed(hb, T0).message, Heartbeat)
    for raw in (b"nope", b"[]", frame({"id": "c"})):
        fed = engine.feed(raw, T0)
        assert isinstance(fed.message, Rejected) and fed.change is None and fed.decisions == []
    engine.feed(b'{"message": "pong"}', T0)
    engine.feed(orjson.dumps({"topicName": "v2.system.socket_closing"}), T0)
    engine.feed(orjson.dumps({"result": "404", "message": "gone"}), T0)
    engine.feed(orjson.dumps({"topicName": "v2.users.u.presence"}), T0)
    assert {k: v for k, v in engine.rejected.items() if v} == {"not_json": 1, "not_object": 1,
                                                               "bad_participants": 1}
    assert set(engine.rejected) == set(REJECT_REASONS)
    assert engine.messages == {"heartbeat": 1, "pong": 1, "socket_closing": 1, "channel_gone": 1,
                               "call_event": 0, "other": 1, "rejected": 3}
    assert set(engine.messages) == set(MESSAGE_KINDS)
    assert rules.changes == []


def test_reordered_events_through_engine() -> None:
    engine, rules = make()
    engine.feed(frame(body(party("a"), party("x", purpose="external", state="disconnected"))), T0)
    fed = engine.feed(frame(body(party("a"), party("x", purpose="external"))), T0 + 1)
    assert fed.change is None and fed.decisions == []


def test_apply_conversation_resync() -> None:
    engine, rules = make()
    rest = {"id": "c1", "participants": [party("x", purpose="external", rest=True)],
            "selfUri": "/api/v2/conversations/calls/c1"}
    step = engine.apply_conversation(rest, T0)
    # the same result type as a frame's, without a message
    assert type(step) is type(engine.feed(b"{}", T0)) and step.message is None
    assert [d.participant_id for d in step.decisions] == ["x"]
    assert step.change is not None and step.change.source == "resync"
    assert rules.changes[0][0].source == "resync"
    assert engine.apply_conversation(rest, T0 + 1).decisions == []
    assert engine.apply_conversation({"id": 5}, T0 + 2).change is None
    assert engine.store.stats["conversations_rejected"] == 1


def test_tick_evicts_and_forgets() -> None:
    engine, rules = make()
    engine.feed(frame(body(party("a"))), T0)
    engine.feed(frame(body(party("a", state="disconnected"))), T0 + 1)
    assert engine.tick(T0 + 10) == [] and rules.forgotten == []
    assert rules.due_calls == [T0 + 10]
    engine.tick(T0 + 31)
    assert rules.forgotten == ["c1"] and len(engine.store) == 0 and engine.counters["evicted"] == 1
    rules.deadline = T0 + 99
    assert engine.next_deadline() == T0 + 99


def test_mark_gone_judged() -> None:
    engine, rules = make()
    engine.feed(frame(body(party("a"), party("x", purpose="external"))), T0)
    assert engine.mark_gone("c1", T0 + 2).decisions == []  # the stub only decides on live externals
    change, now = rules.changes[-1]
    assert now == T0 + 2 and change.call.ended_at == T0 + 2
    assert {p.id for p in change.changed} == {"a", "x"}
    assert engine.mark_gone("c1", T0 + 3).change is None and engine.mark_gone("nope", T0).change is None
    assert engine.counters["gone"] == 1 and len(rules.changes) == 2


def test_rule_errors_are_contained() -> None:
    engine, rules = make()
    engine.feed(frame(body(party("a"))), T0)
    engine.feed(frame(body(party("a", state="disconnected"))), T0 + 1)
    rules.fail = True
    fed = engine.feed(frame(conversation("c2", [party("x", purpose="external")])), T0 + 2)
    assert fed.change is not None and fed.decisions == []
    assert engine.tick(T0 + 60) == []
    assert engine.counters["rule_errors"] == 3  # on_change, due, forget_call
    assert len(engine.store) == 1  # c1 evicted even though forget_call failed


class _BrokenStore(CallStore):
    def apply(self, conv: Any, now: float, **kw: Any) -> Change | None:  # type: ignore[override]
        raise RuntimeError("store bug")


def test_store_errors_are_contained() -> None:
    rules = StubRules()
    engine = Engine(rules, _BrokenStore())
    fed = engine.feed(frame(body(party("x", purpose="external"))), T0)
    assert isinstance(fed.message, CallEvent) and fed.change is None and fed.decisions == []
    assert engine.apply_conversation(body(party("a")), T0).decisions == []
    assert engine.counters["state_errors"] == 2 and rules.changes == []
    assert engine.counters["duplicates"] == 0  # a failure is not also a duplicate


# ------------------------------------------------------------------ malformed input, counted once


def test_participant_without_id_is_counted_on_both_paths() -> None:
    engine, _ = make()
    bad = {k: v for k, v in party("nobody").items() if k != "id"}
    step = engine.feed(frame(body(party("a"), bad)), T0)
    assert step.change is not None and step.rejected == ("participant_missing_id",)
    assert engine.rejected["participant_missing_id"] == 1
    assert "a" in step.change.call.participants  # the rest of the event was applied
    # the path of a call already evicted: the frame is dropped, the bad participant counted
    engine.feed(frame(body(party("a", state="disconnected"))), T0 + 1)
    engine.tick(T0 + 100)
    assert engine.store.was_evicted("c1")
    late = engine.feed(frame(body(party("a", state="disconnected"), bad)), T0 + 101)
    assert late.change is None and late.rejected == ("participant_missing_id",)
    assert engine.rejected["participant_missing_id"] == 2
    # a participant that is not an object
    step = engine.feed(frame(conversation("c2", [party("x"), "not an object"])), T0 + 102)
    assert step.rejected == ("bad_participant",) and engine.rejected["bad_participant"] == 1


def test_wrong_typed_field_is_ignored_counted_and_the_rest_applied() -> None:
    engine, _ = make()
    step = engine.feed(frame(body(party("a", held="yes", muted=True))), T0)
    assert step.rejected == ("bad_field",) and engine.rejected["bad_field"] == 1
    assert step.change is not None
    p = step.change.call.participants[ParticipantId("a")]
    assert p.held is None and p.muted is True
    # every such frame is counted, even when it changes nothing else
    again = engine.feed(frame(body(party("a", held="yes", muted=True))), T0 + 1)
    assert again.change is None and again.rejected == ("bad_field",)
    assert engine.rejected["bad_field"] == 2
    clean = engine.feed(frame(body(party("a", held=True, muted=True))), T0 + 2)
    assert clean.rejected == () and clean.change is not None


def test_oversized_frame_is_rejected_unread() -> None:
    engine, rules = make()
    big = frame(body(party("a", attributes={"blob": "x" * (2 << 20)})))
    assert len(big) > 2_000_000
    step = engine.feed(big, T0)
    assert isinstance(step.message, Rejected) and step.message.reason == "too_large"
    assert step.rejected == ("too_large",) and engine.rejected["too_large"] == 1
    assert step.change is None and rules.changes == [] and len(engine.store) == 0


def test_every_store_problem_is_a_reject_reason() -> None:
    from daemon.core.state import PROBLEMS
    assert set(PROBLEMS) <= set(REJECT_REASONS)
    assert set(REJECT_REASONS) <= set(Engine(StubRules()).rejected)
