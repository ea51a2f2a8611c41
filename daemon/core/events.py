"""Classify raw notification-service frames into plain messages (sans-I/O).

`parse_message(raw)` takes one WebSocket frame exactly as received (bytes or str) and
returns one `Message`; it never raises. Malformed input becomes `Rejected(reason,
excerpt)`, where `reason` is a short stable token fit for a metric label and `excerpt`
is at most `EXCERPT_LEN` printable characters of the frame for the log line.

Shapes recognised (see /work/shared/genesys-api.md, "Notification service"):

- `{"topicName": "channel.metadata", "eventBody": {"message": "WebSocket Heartbeat"}}`
  -> `Heartbeat`
- `{"message": "pong"}`, or `channel.metadata` with eventBody `{"message": "pong"}` -> `Pong`
- topicName `v2.system.socket_closing` -> `SocketClosing`
- `{"result": "404", "message": "..."}` (channel gone) -> `ChannelGone(message)`
- a call topic (`daemon.core.topics`: `v2.routing.queues.{id}.conversations.calls` /
  `v2.users.{id}.conversations.calls`) with a
  dict eventBody carrying a non-empty string `id` and a list `participants`
  -> `CallEvent(topic, body)`; `body` is the decoded eventBody, not copied
- any other JSON object with a string topicName -> `OtherMessage(topic)`

Rejection reasons (stable): `too_large` (more than `MAX_FRAME_BYTES`, not decoded),
`not_json`, `not_object`, `no_topic`, `bad_topic`, `bad_event_body`, `missing_id`,
`invalid_id` (a conversation id that could not stand as a URL path segment:
`daemon.core.ids.is_path_id`), `bad_participants`. `REJECT_REASONS` also lists what the call store reports about a call
event it applied in part (`daemon.core.state.PROBLEMS`: `bad_participant`,
`participant_missing_id`, `bad_field`; `bad_conversation` for a REST reply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from daemon.core.ids import is_path_id

# The one topic grammar lives in daemon.core.topics; these names are re-exported.
from daemon.core.topics import CALL_TOPIC_RE as CALL_TOPIC_RE
from daemon.core.topics import METADATA_TOPIC as METADATA_TOPIC
from daemon.core.topics import SOCKET_CLOSING_TOPIC as SOCKET_CLOSING_TOPIC
from daemon.core.topics import topic_kind as topic_kind

EXCERPT_LEN: Final = 120
#: Genesys documents 256 KB per notification event; a frame four times that is not one of
#: its events (and decoding it would only cost time on the hot path).
MAX_FRAME_BYTES: Final = 1 << 20

HEARTBEAT_TEXT: Final = "WebSocket Heartbeat"

REJECT_REASONS: Final = (
    "too_large", "not_json", "not_object", "no_topic", "bad_topic", "bad_event_body",
    "missing_id", "invalid_id", "bad_participants",
    # reported by the call store for a snapshot it applied in part (state.PROBLEMS)
    "bad_conversation", "bad_participant", "participant_missing_id", "bad_field",
)


@dataclass(slots=True, frozen=True)
class Heartbeat:
    """The service's ~30 s keep-alive on `channel.metadata`."""


@dataclass(slots=True, frozen=True)
class Pong:
    """The reply to our `{"message": "ping"}`."""


@dataclass(slots=True, frozen=True)
class SocketClosing:
    """The service will close this socket in about a minute; open a new one first."""


@dataclass(slots=True, frozen=True)
class ChannelGone:
    """`"result": "404"`: the channel no longer exists (expired, or its token expired)."""

    message: str


@dataclass(slots=True, frozen=True)
class CallEvent:
    """A call conversation event; `body` is the whole conversation (eventBody)."""

    topic: str
    body: dict[str, Any]


@dataclass(slots=True, frozen=True)
class OtherMessage:
    """Valid, but not something the core acts on (another topic, other metadata)."""

    topic: str


@dataclass(slots=True, frozen=True)
class Rejected:
    """Malformed frame. `reason` is a stable token (metric label); `excerpt` is for logs."""

    reason: str
    excerpt: str


Message = Heartbeat | Pong | SocketClosing | ChannelGone | CallEvent | OtherMessage | Rejected

_HEARTBEAT: Final = Heartbeat()
_PONG: Final = Pong()
_SOCKET_CLOSING: Final = SocketClosing()


def excerpt(raw: bytes | str | object, limit: int = EXCERPT_LEN) -> str:
    """At most `limit` characters of `raw`, non-printable characters replaced by `?`."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        text = bytes(raw[: limit * 4]).decode("utf-8", "replace")
    elif isinstance(raw, str):
        text = raw
    else:
        text = type(raw).__name__
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


def parse_message(raw: bytes | str) -> Message:
    """Decode and classify one frame. Never raises; see the module docstring."""
    if isinstance(raw, (bytes, str)) and len(raw) > MAX_FRAME_BYTES:
        return Rejected("too_large", excerpt(raw))
    try:
        data = orjson.loads(raw)
    except Exception:  # JSONDecodeError, or TypeError for a non-bytes/str argument
        return Rejected("not_json", excerpt(raw))
    if data.__class__ is not dict:
        return Rejected("not_object", excerpt(raw))
    topic = data.get("topicName")
    if topic.__class__ is not str:
        return _without_topic(data, raw) if topic is None else Rejected("bad_topic", excerpt(raw))
    if CALL_TOPIC_RE.fullmatch(topic) is not None:
        return _call_event(topic, data.get("eventBody"), raw)
    return _other_topic(topic, data, raw)


def _call_event(topic: str, body: object, raw: bytes | str) -> CallEvent | Rejected:
    """A call topic's frame: a CallEvent when its body has a string id and a participant
    list (the hot path: checked once here, the store type-checks the rest)."""
    if body.__class__ is not dict:
        return Rejected("bad_event_body", excerpt(raw))
    cid = body.get("id")
    if cid.__class__ is not str or not cid:
        return Rejected("missing_id", excerpt(raw))
    if not is_path_id(cid):  # ".." or "a/b" would reach a REST path (resync, the PATCH)
        return Rejected("invalid_id", excerpt(raw))
    if body.get("participants").__class__ is not list:
        return Rejected("bad_participants", excerpt(raw))
    return CallEvent(topic, body)


def _without_topic(data: dict[str, Any], raw: bytes | str) -> Message:
    """A frame without a topicName: a control reply (channel gone, pong) or a rejection."""
    if _is_gone(data):
        return _gone(data)
    if data.get("message") == "pong":
        return _PONG
    return Rejected("no_topic", excerpt(raw))


def _other_topic(topic: str, data: dict[str, Any], raw: bytes | str) -> Message:
    """A frame of a topic that is not a call topic: the channel metadata (heartbeat,
    pong), socket closing, channel gone, or any other topic."""
    if topic == METADATA_TOPIC:
        body = data.get("eventBody")
        if body.__class__ is not dict:
            return Rejected("bad_event_body", excerpt(raw))
        text = body.get("message")
        if text == HEARTBEAT_TEXT:
            return _HEARTBEAT
        if text == "pong":
            return _PONG
        return OtherMessage(topic)
    if topic == SOCKET_CLOSING_TOPIC:
        return _SOCKET_CLOSING
    if _is_gone(data):
        return _gone(data)
    return OtherMessage(topic)


def _is_gone(data: dict[str, Any]) -> bool:
    result = data.get("result")
    # Compared by value, never str()'d: a hostile deeply nested value must not recurse.
    return (result == "404" or (result.__class__ is int and result == 404)) and "message" in data


def _gone(data: dict[str, Any]) -> ChannelGone:
    msg = data["message"]
    return ChannelGone(excerpt(msg, 500) if isinstance(msg, str) else "")
