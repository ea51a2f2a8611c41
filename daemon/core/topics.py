"""The one grammar of Genesys notification topics (sans-I/O).

Call topics (see /work/shared/genesys-api.md, "Notification service"):

    v2.routing.queues.{queueId}.conversations.calls
    v2.users.{userId}.conversations.calls

An id is one or more characters other than `.` and whitespace (Genesys ids are UUIDs; the
grammar does not insist on that, scope resolution does). Parsing is exact: the whole string
must match, nothing before or after (no trailing newline either).

- `queue_topic(id)` / `user_topic(id)` build a `Topic`;
- `parse_call_topic(topic)` returns `QueueCalls(queue_id)` or `UserCalls(user_id)`, else None;
- `is_call_topic(topic)` is the cheap yes/no;
- `topic_kind(topic)` is the coarse class used as a metric label (queue, user, metadata,
  system, other);
- `CALL_FRAME_PREFIXES` are how the service lays out the start of a call event frame
  (`{"topicName":"v2.routing.queues.` ...), for the stream's cheap peek.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from daemon.core.ids import QueueId, Topic, UserId

__all__ = [
    "CALL_FRAME_PREFIXES", "CALL_FRAME_PREFIXES_BYTES", "CALL_TOPIC_RE", "CALLS_SUFFIX",
    "METADATA_TOPIC", "QUEUE_PREFIX", "SOCKET_CLOSING_TOPIC", "SYSTEM_PREFIX", "USER_PREFIX",
    "CallTopic", "QueueCalls", "UserCalls", "is_call_topic", "parse_call_topic",
    "queue_topic", "topic_kind", "user_topic",
]

QUEUE_PREFIX: Final = "v2.routing.queues."
USER_PREFIX: Final = "v2.users."
CALLS_SUFFIX: Final = ".conversations.calls"
METADATA_TOPIC: Final = "channel.metadata"
SYSTEM_PREFIX: Final = "v2.system."
SOCKET_CLOSING_TOPIC: Final = "v2.system.socket_closing"

CALL_TOPIC_RE: Final = re.compile(r"v2\.(?:routing\.queues|users)\.([^.\s]+)\.conversations\.calls")
"""Matches (with `fullmatch`) the two call topics; group 1 is the queue or user id."""

CALL_FRAME_PREFIXES: Final = ('{"topicName":"' + QUEUE_PREFIX, '{"topicName":"' + USER_PREFIX)
CALL_FRAME_PREFIXES_BYTES: Final = tuple(p.encode() for p in CALL_FRAME_PREFIXES)


@dataclass(frozen=True, slots=True)
class QueueCalls:
    """`v2.routing.queues.{queue_id}.conversations.calls`"""

    queue_id: QueueId

    @property
    def topic(self) -> Topic:
        return queue_topic(self.queue_id)


@dataclass(frozen=True, slots=True)
class UserCalls:
    """`v2.users.{user_id}.conversations.calls`"""

    user_id: UserId

    @property
    def topic(self) -> Topic:
        return user_topic(self.user_id)


CallTopic = QueueCalls | UserCalls


def queue_topic(queue_id: QueueId | str) -> Topic:
    """The call topic of one queue."""
    return Topic(f"{QUEUE_PREFIX}{queue_id}{CALLS_SUFFIX}")


def user_topic(user_id: UserId | str) -> Topic:
    """The call topic of one user."""
    return Topic(f"{USER_PREFIX}{user_id}{CALLS_SUFFIX}")


def parse_call_topic(topic: str) -> CallTopic | None:
    """The queue or user a call topic names; None for any other string."""
    m = CALL_TOPIC_RE.fullmatch(topic)
    if m is None:
        return None
    if topic.startswith(USER_PREFIX):
        return UserCalls(UserId(m.group(1)))
    return QueueCalls(QueueId(m.group(1)))


def is_call_topic(topic: str) -> bool:
    """Whether `topic` is one of the two call topics."""
    return CALL_TOPIC_RE.fullmatch(topic) is not None


def topic_kind(topic: str) -> str:
    """Coarse topic class for metric labels: queue, user, metadata, system or other."""
    if topic.startswith(QUEUE_PREFIX):
        return "queue"
    if topic.startswith(USER_PREFIX):
        return "user"
    if topic == METADATA_TOPIC:
        return "metadata"
    if topic.startswith(SYSTEM_PREFIX):
        return "system"
    return "other"
