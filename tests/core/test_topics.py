"""The one topic grammar: build, parse, classify."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.core.events import CALL_TOPIC_RE, topic_kind as events_topic_kind
from daemon.core.ids import QueueId, UserId
from daemon.core.topics import (
    CALL_FRAME_PREFIXES,
    QueueCalls,
    UserCalls,
    is_call_topic,
    parse_call_topic,
    queue_topic,
    topic_kind,
    user_topic,
)
from daemon.genesys.scope import ids_from_topics

QID = "5f0c8a8e-2f6b-4a51-9b8e-0d7c1a2b3c4d"


def test_build_and_parse_round_trip() -> None:
    t = queue_topic(QueueId(QID))
    assert t == f"v2.routing.queues.{QID}.conversations.calls"
    assert parse_call_topic(t) == QueueCalls(QueueId(QID))
    assert QueueCalls(QueueId(QID)).topic == t
    u = user_topic(UserId(QID))
    assert u == f"v2.users.{QID}.conversations.calls"
    assert parse_call_topic(u) == UserCalls(UserId(QID))
    assert UserCalls(UserId(QID)).topic == u


@pytest.mark.parametrize("bad", [
    "", "v2.users..conversations.calls", "v2.routing.queues.a.b.conversations.calls",
    f"v2.users.{QID}.conversations.calls\n", f" v2.users.{QID}.conversations.calls",
    "v2.users.a b.conversations.calls", f"v2.users.{QID}.conversations.emails",
    "v2.system.socket_closing", "channel.metadata", f"v2.queues.{QID}.conversations.calls",
])
def test_anything_else_is_not_a_call_topic(bad: str) -> None:
    assert parse_call_topic(bad) is None
    assert not is_call_topic(bad)


@given(st.text(alphabet=st.characters(blacklist_characters=".", blacklist_categories=("Zs", "Cc")),
               min_size=1, max_size=40))
def test_any_dotless_id_round_trips(ident: str) -> None:
    if any(c.isspace() for c in ident):
        return
    assert parse_call_topic(queue_topic(ident)) == QueueCalls(QueueId(ident))
    assert parse_call_topic(user_topic(ident)) == UserCalls(UserId(ident))


def test_events_and_scope_use_the_same_grammar() -> None:
    assert CALL_TOPIC_RE.fullmatch(queue_topic(QID)) is not None
    assert events_topic_kind is topic_kind
    q, u = ids_from_topics([queue_topic(QID), user_topic("u1"), "v2.users.a b.conversations.calls",
                            "channel.metadata"])
    assert q == [QID] and u == ["u1"]


def test_kinds_and_frame_prefixes() -> None:
    assert topic_kind(queue_topic(QID)) == "queue"
    assert topic_kind(user_topic(QID)) == "user"
    assert topic_kind("channel.metadata") == "metadata"
    assert topic_kind("v2.system.socket_closing") == "system"
    assert topic_kind("v2.analytics.x") == "other"
    frame = '{"topicName":"' + queue_topic(QID) + '","version":"2","eventBody":{}}'
    assert frame.startswith(CALL_FRAME_PREFIXES)
