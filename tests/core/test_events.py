"""daemon.core.events: classification of notification frames; never raises."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.events import (
    CALL_TOPIC_RE,
    EXCERPT_LEN,
    CallEvent,
    ChannelGone,
    Heartbeat,
    OtherMessage,
    Pong,
    Rejected,
    SocketClosing,
    parse_message,
    topic_kind,
)
from _core_payloads import conversation, frame, party

MESSAGE_TYPES = (Heartbeat, Pong, SocketClosing, ChannelGone, CallEvent, OtherMessage, Rejected)


def test_heartbeat_bytes_and_str() -> None:
    raw = {"topicName": "channel.metadata", "eventBody": {"message": "WebSocket Heartbeat"}}
    assert parse_message(orjson.dumps(raw)) == Heartbeat()
    assert parse_message(orjson.dumps(raw).decode()) == Heartbeat()


def test_pong_both_shapes() -> None:
    assert parse_message('{"message": "pong"}') == Pong()
    assert parse_message(orjson.dumps(
        {"topicName": "channel.metadata", "eventBody": {"message": "pong"}})) == Pong()


def test_socket_closing() -> None:
    raw = {"topicName": "v2.system.socket_closing", "eventBody": {"message": "closing"}}
    assert parse_message(orjson.dumps(raw)) == SocketClosing()


@pytest.mark.parametrize("result", ["404", 404])
def test_channel_gone(result: object) -> None:
    msg = parse_message(orjson.dumps({"result": result, "message": "channel not found"}))
    assert msg == ChannelGone("channel not found")


def test_channel_gone_with_topic_and_non_string_message() -> None:
    msg = parse_message(orjson.dumps({"topicName": "x", "result": "404", "message": {"a": 1}}))
    assert msg == ChannelGone("")


def test_result_other_than_404_is_not_gone() -> None:
    msg = parse_message(orjson.dumps({"result": "200", "message": "ok"}))
    assert isinstance(msg, Rejected) and msg.reason == "no_topic"


@pytest.mark.parametrize("topic", [
    "v2.routing.queues.7a3e-11.conversations.calls",
    "v2.users.u-42.conversations.calls",
])
def test_call_event(topic: str) -> None:
    body = conversation("c1", [party("p1")])
    msg = parse_message(frame(body, topic))
    assert isinstance(msg, CallEvent)
    assert msg.topic == topic
    assert msg.body["id"] == "c1"
    assert msg.body["participants"][0]["id"] == "p1"


def test_extra_unknown_fields_ignored() -> None:
    raw = orjson.dumps({"topicName": "v2.users.u.conversations.calls", "brandNew": [1, {"x": 2}],
                        "eventBody": {"id": "c", "participants": [], "newThing": {"deep": True}}})
    assert isinstance(parse_message(raw), CallEvent)


def test_other_topics() -> None:
    assert parse_message(orjson.dumps({"topicName": "v2.users.u.presence", "eventBody": {}})) \
        == OtherMessage("v2.users.u.presence")
    assert parse_message(orjson.dumps({"topicName": "channel.metadata",
                                       "eventBody": {"message": "something"}})) \
        == OtherMessage("channel.metadata")
    # A near-miss of the call topic is not a call event.
    near = "v2.routing.queues.q.conversations.calls.extra"
    assert parse_message(frame(conversation("c", []), near)) == OtherMessage(near)


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "not_json"),
    (b"{not json", "not_json"),
    (b"\xff\xfe\x00", "not_json"),
    ("\ud800", "not_json"),
    (b"[1, 2]", "not_object"),
    (b'"text"', "not_object"),
    (b"null", "not_object"),
    (b"{}", "no_topic"),
    (b'{"topicName": 5}', "bad_topic"),
    (b'{"topicName": "channel.metadata", "eventBody": []}', "bad_event_body"),
    (frame([1, 2]), "bad_event_body"),
    (frame("body"), "bad_event_body"),
    (frame({"participants": []}), "missing_id"),
    (frame({"id": "", "participants": []}), "missing_id"),
    (frame({"id": 12, "participants": []}), "missing_id"),
    (frame({"id": "c"}), "bad_participants"),
    (frame({"id": "c", "participants": {"p": 1}}), "bad_participants"),
])
def test_rejected(raw: bytes | str, reason: str) -> None:
    msg = parse_message(raw)
    assert isinstance(msg, Rejected), msg
    assert msg.reason == reason
    assert len(msg.excerpt) <= EXCERPT_LEN
    assert msg.excerpt.isprintable()


def test_rejected_excerpt_is_short_and_printable() -> None:
    raw = b"\x00\x01garbage" + b"x" * 10_000
    msg = parse_message(raw)
    assert isinstance(msg, Rejected)
    assert len(msg.excerpt) == EXCERPT_LEN
    assert msg.excerpt.startswith("??garbage")


def test_wrong_argument_type_does_not_raise() -> None:
    msg = parse_message(12345)  # type: ignore[arg-type]
    assert isinstance(msg, Rejected) and msg.reason == "not_json"


def test_deeply_nested_does_not_raise() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    assert isinstance(parse_message(deep), Rejected)
    nested_result = b'{"result": ' + b"[" * 1000 + b"]" * 1000 + b', "message": "m"}'
    assert isinstance(parse_message(nested_result), Rejected)


def test_topic_kind() -> None:
    assert topic_kind("v2.routing.queues.q.conversations.calls") == "queue"
    assert topic_kind("v2.users.u.conversations.calls") == "user"
    assert topic_kind("channel.metadata") == "metadata"
    assert topic_kind("v2.system.socket_closing") == "system"
    assert topic_kind("v2.analytics.x") == "other"


def test_call_topic_re_groups() -> None:
    m = CALL_TOPIC_RE.fullmatch("v2.routing.queues.abc-123.conversations.calls")
    assert m is not None and m.group(1) == "abc-123"
    assert CALL_TOPIC_RE.fullmatch("v2.users..conversations.calls") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
keys = st.sampled_from(["topicName", "eventBody", "id", "participants", "message", "result", "x"])
topics = st.sampled_from(["channel.metadata", "v2.system.socket_closing",
                          "v2.routing.queues.q.conversations.calls", "v2.users.u.conversations.calls",
                          "v2.other"]) | st.text(max_size=30)
shaped = st.fixed_dictionaries(
    {"topicName": topics | json_values},
    optional={"eventBody": st.dictionaries(keys, json_values | topics, max_size=5) | json_values,
              "result": st.sampled_from(["404", 404, "200"]) | json_values,
              "message": json_values},
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes_never_raise(raw: bytes) -> None:
    assert isinstance(parse_message(raw), MESSAGE_TYPES)


@settings(max_examples=300, deadline=None)
@given(json_values | shaped)
def test_fuzz_json_never_raise(value: object) -> None:
    raw = json.dumps(value).encode()  # stdlib: also big ints, Infinity, lone surrogates
    msg = parse_message(raw)
    assert isinstance(msg, MESSAGE_TYPES)
    assert isinstance(parse_message(raw.decode()), type(msg))
    if isinstance(msg, Rejected):
        assert len(msg.excerpt) <= EXCERPT_LEN
    if isinstance(msg, CallEvent):
        assert isinstance(msg.body["id"], str) and isinstance(msg.body["participants"], list)
