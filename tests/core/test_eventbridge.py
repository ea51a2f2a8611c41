"""core/eventbridge.py: decoding EventBridge events from SQS and deciding re-reads (sans-I/O)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.eventbridge import (
    DETAIL_KINDS,
    REJECT_REASONS,
    DetailDecider,
    DetailEvent,
    FrameEvent,
    decode,
    detail_topic,
)
from daemon.core.events import Rejected
from daemon.core.state import CallStore

NOW = 1_765_134_000.0
CID = "c0ffee00-0000-4000-8000-000000000001"
QUEUE = "q0000000-0000-4000-8000-000000000001"


def envelope(kind: str, body: dict[str, Any], *, cid: str = CID, eid: str = "e-1",
             detail_type: str | None = None, topic: str | None = None) -> bytes:
    return orjson.dumps({
        "version": "0", "id": eid,
        "detail-type": detail_type or f"v2.detail.events.conversation.{{id}}.{kind}",
        "source": "aws.partner/genesys.com/cloud/org/confguard", "account": "123456789012",
        "time": "2026-12-07T19:00:00Z", "region": "eu-west-1", "resources": [],
        "detail": {"topicName": topic or detail_topic(kind, cid), "version": "2",  # type: ignore[arg-type]
                   "eventBody": body, "metadata": {"CorrelationId": "x"},
                   "timestamp": "2026-12-07T19:00:00.123Z"}})


def body(pid: str = "p-cust", t: float = NOW, cid: str = CID, **extra: Any) -> dict[str, Any]:
    return {"eventTime": int(t * 1000), "conversationId": cid, "participantId": pid, **extra}


def ev(kind: str, *, eid: str = "e-1", **kw: Any) -> DetailEvent:
    got = decode(envelope(kind, body(**kw), eid=eid))
    assert isinstance(got, DetailEvent), got
    return got


def store_with_call(last_update: float = NOW - 1) -> CallStore:
    store = CallStore()
    store.apply({"id": CID, "participants": [
        {"id": "p-cust", "purpose": "customer", "state": "connected", "attributes": {"a": "1"}},
        {"id": "p-agent", "purpose": "agent", "state": "connected", "user": {"id": "u-1"}},
        {"id": "p-gone", "purpose": "external", "state": "disconnected"},
    ]}, last_update)
    return store


def test_decode_attribute_event_as_in_the_issue() -> None:
    got = decode(envelope("attributes", body(attributes={"complianceFlag": "true"})))
    assert isinstance(got, DetailEvent)
    assert (got.kind, got.conversation_id, got.participant_id) == ("attributes", CID, "p-cust")
    assert got.attributes == {"complianceFlag": "true"}
    assert got.event_time == pytest.approx(NOW)
    assert got.published_at == pytest.approx(1_796_670_000.123)


@pytest.mark.parametrize("kind", DETAIL_KINDS)
def test_every_detail_kind_decodes(kind: str) -> None:
    extra: dict[str, Any] = {"attributes": {}} if kind == "attributes" else {}
    got = decode(envelope(kind, body(queueId=QUEUE, userId="u-1", mediaType="VOICE", **extra)))
    assert isinstance(got, DetailEvent) and got.kind == kind and got.queue_id == QUEUE


def test_call_topic_detail_is_a_frame() -> None:
    frame = {"topicName": f"v2.routing.queues.{QUEUE}.conversations.calls", "version": "2",
             "eventBody": {"id": CID, "participants": [{"id": "p", "state": "connected"}]},
             "metadata": {"CorrelationId": "x"}, "timestamp": "2026-12-07T19:00:00.123Z"}
    raw = orjson.dumps({"version": "0", "id": "e-9", "detail-type": "v2.routing.queues.{id}.conversations.calls",
                        "source": "aws.partner/genesys.com/cloud/org/x", "detail": frame})
    got = decode(raw)
    assert isinstance(got, FrameEvent)
    assert orjson.loads(got.frame) == frame and got.topic == frame["topicName"]
    broken = orjson.dumps({"version": "0", "id": "e-9", "detail-type": "v2.routing.queues.{id}.conversations.calls",
                           "source": "s", "detail": {**frame, "eventBody": {"id": CID}}})
    assert decode(broken) == Rejected("bad_call_event", decode(broken).excerpt)  # type: ignore[union-attr]


@pytest.mark.parametrize(("raw", "reason"), [
    (b"not json", "not_json"),
    (b"[1, 2]", "not_object"),
    (b'{"id": "x", "detail-type": "v2.detail.events.conversation.{id}.attributes", "source": "s"}', "not_envelope"),
    (b'{"id": 1, "detail-type": "x", "source": "s", "detail": {}}', "not_envelope"),
    (envelope("attributes", body(attributes={}), detail_type="v2.detail.events.conversation.{id}.wrapup"),
     "unknown_detail_type"),
    (envelope("attributes", body(attributes={}), detail_type="aws.s3.thing"), "unknown_detail_type"),
    (envelope("attributes", body(attributes={}), topic="v2.detail.events.conversation.x.customer.start"),
     "bad_detail"),
    (envelope("attributes", body(attributes={"a": 1})), "bad_event_body"),
    (envelope("attributes", body()), "bad_event_body"),
    (envelope("customer.start", body(cid="other")), "bad_event_body"),
    (envelope("customer.start", {**body(), "eventTime": "soon"}), "bad_event_body"),
    (envelope("customer.start", {**body(), "participantId": ""}), "bad_event_body"),
    (envelope("acd.start", body(queueId=7)), "bad_event_body"),
    (b"x" * (1 << 21), "too_large"),
])
def test_malformed_bodies_are_rejected_with_a_stable_reason(raw: bytes, reason: str) -> None:
    got = decode(raw)
    assert isinstance(got, Rejected) and got.reason == reason and got.reason in REJECT_REASONS
    assert len(got.excerpt) <= 120


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                     max_leaves=20)
_KEYS = st.sampled_from(["eventTime", "conversationId", "participantId", "attributes", "queueId", "userId",
                         "mediaType", "disconnectType"])


@st.composite
def _envelopes(draw: st.DrawFn) -> bytes:
    """Well-formed envelopes of every kind whose event bodies are partly random."""
    kind = draw(st.sampled_from(DETAIL_KINDS))
    b: dict[str, Any] = body(attributes={"a": "1"}) if draw(st.booleans()) else {}
    b.update(draw(st.dictionaries(_KEYS, _JSON, max_size=4)))
    return envelope(kind, b)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), _JSON.map(orjson.dumps), _envelopes()))
def test_decode_never_raises(raw: bytes | str) -> None:
    got = decode(raw)
    assert isinstance(got, (DetailEvent, FrameEvent, Rejected))
    if isinstance(got, Rejected):
        assert got.reason in REJECT_REASONS


# ------------------------------------------------------------------------------ deciding


def decide(e: DetailEvent, store: CallStore, decider: DetailDecider | None = None) -> tuple[bool, str]:
    v = (decider or DetailDecider()).decide(e, store, queues={QUEUE}, users={"u-in"})
    return v.reread, v.reason


def test_events_the_state_shows_cost_nothing() -> None:
    store = store_with_call()
    assert decide(ev("attributes", attributes={"a": "1"}), store) == (False, "reflected")
    assert decide(ev("customer.start"), store) == (False, "reflected")
    assert decide(ev("user.start", pid="p-agent", userId="u-1"), store) == (False, "reflected")
    assert decide(ev("customer.end", pid="p-gone"), store) == (False, "reflected")
    assert decide(ev("attributes", pid="p-gone", attributes={"new": "x"}), store) == (False, "reflected")
    assert decide(ev("acw", pid="p-agent"), store) == (False, "not_tracked")


def test_events_the_state_does_not_show_need_a_read() -> None:
    store = store_with_call()
    assert decide(ev("attributes", attributes={"complianceFlag": "true"}), store) == (True, "attributes_differ")
    assert decide(ev("attributes", attributes={"a": "2"}), store) == (True, "attributes_differ")
    assert decide(ev("customer.start", pid="p-new"), store) == (True, "unknown_participant")
    assert decide(ev("attributes", pid="p-new", attributes={}), store) == (True, "unknown_participant")
    assert decide(ev("user.end", pid="p-agent"), store) == (True, "ended_but_connected")


def test_older_than_the_state_costs_nothing() -> None:
    store = store_with_call(last_update=NOW)
    old = ev("attributes", attributes={"complianceFlag": "true"}, t=NOW - 60)
    assert decide(old, store) == (False, "older")
    recent = ev("attributes", eid="e-2", attributes={"complianceFlag": "true"}, t=NOW - 5)
    assert decide(recent, store) == (True, "attributes_differ")


def test_duplicates_cost_nothing_and_the_memory_is_bounded() -> None:
    store = store_with_call()
    decider = DetailDecider(remember=2)
    flag = ev("attributes", eid="dup", attributes={"complianceFlag": "true"})
    assert decide(flag, store, decider) == (True, "attributes_differ")
    assert decide(flag, store, decider) == (False, "duplicate")
    for i in range(3):
        decide(ev("customer.start", eid=f"other-{i}"), store, decider)
    assert decide(flag, store, decider) == (True, "attributes_differ")  # forgotten: decided again
    decider.forget("dup")  # a failed re-read: the redelivery is decided again, not a duplicate
    assert decide(flag, store, decider) == (True, "attributes_differ")
    assert decider.counts["duplicate"] == 1 and decider.counts["attributes_differ"] == 3


def test_scope_of_unseen_calls() -> None:
    store = CallStore()
    other = "c0ffee00-0000-4000-8000-000000000002"
    assert decide(ev("acd.start", pid="p-acd", queueId=QUEUE, mediaType="VOICE"), store) == (
        True, "unseen_call_in_scope")
    assert decide(ev("acd.start", eid="e-2", pid="p-acd", queueId="q-other"), store) == (False, "out_of_scope")
    assert decide(ev("acd.start", eid="e-3", pid="p-acd", queueId=QUEUE, mediaType="EMAIL"), store) == (
        False, "out_of_scope")
    assert decide(ev("user.start", eid="e-4", pid="p-u", userId="u-in"), store) == (True, "unseen_call_in_scope")
    assert decide(ev("user.start", eid="e-5", pid="p-u", userId="u-out"), store) == (False, "out_of_scope")
    assert decide(ev("customer.start", eid="e-6"), store) == (False, "out_of_scope")
    assert decide(ev("attributes", eid="e-7", attributes={"f": "1"}), store) == (False, "out_of_scope")
    # an ended call that was evicted: late events for it are not read
    store.apply({"id": other, "participants": [{"id": "p", "state": "disconnected"}]}, NOW - 100)
    store.evict(NOW)
    assert store.was_evicted(other)
    late = decode(envelope("acd.start", body(pid="p", cid=other, queueId=QUEUE), cid=other, eid="e-8"))
    assert isinstance(late, DetailEvent)
    assert decide(late, store) == (False, "ended_call")
