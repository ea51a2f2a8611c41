"""Genesys events delivered by Amazon EventBridge (through SQS): decode, then decide (sans-I/O).

An SQS message body is one whole EventBridge event (see /work/shared/genesys-api.md,
"Amazon EventBridge"):

    {"version": "0", "id": "<uuid>", "detail-type": "v2.detail.events.conversation.{id}.attributes",
     "source": "aws.partner/genesys.com/cloud/<orgId>/<suffix>", "account", "time", "region",
     "resources": [], "detail": {"topicName": "v2.detail.events.conversation.<cid>.attributes",
     "version": "2", "eventBody": {...}, "metadata": {"CorrelationId": "..."},
     "timestamp": "2026-12-07T19:00:00.123Z"}}

`decode(body)` never raises and returns one of:

- `DetailEvent`: a conversation detail event (`DETAIL_KINDS`: attributes, customer.start,
  customer.end, user.start, user.end, acd.start, acd.end, acw, outbound, flow.start,
  flow.end, voicemail.start, voicemail.end). Field names are the SDK 269 models'
  (`AttributeDetailEventTopicAttributeUpdateEvent`, `CustomerStartDetailEventTopicCustomerStartEvent`,
  `UserStart...`, `AcdStart...` with `queueId`, the `...End...` events with
  `disconnectType`): `eventTime` (epoch ms), `conversationId`, `participantId`,
  `attributes`, `queueId`, `userId`, `mediaType`, `disconnectType`.
- `FrameEvent`: the event carries a call topic (`v2.routing.queues.{id}.conversations.calls`,
  `v2.users.{id}.conversations.calls`); its `detail` is exactly a WebSocket frame and
  `frame` holds it re-encoded, for the same parser and engine as a frame.
- `Rejected(reason, excerpt)` (`daemon.core.events.Rejected`) with a reason of
  `REJECT_REASONS`: `too_large`, `not_json`, `not_object`, `not_envelope` (a key of the
  EventBridge envelope missing or of the wrong type), `unknown_detail_type` (neither a
  detail nor a call topic), `bad_detail` (`detail` not a Genesys notification, or its
  topicName disagreeing with `detail-type`), `bad_event_body` (fails the model's
  validation: ids, eventTime, attributes), `bad_call_event` (a call topic whose detail is
  not a valid call frame).

`DetailDecider.decide(event, state, scope, now)` says whether a detail event needs the call
re-read (`REREAD_REASONS`: `unknown_participant`, `attributes_differ`,
`ended_but_connected`, `unseen_call_in_scope`) or costs nothing (`SKIP_REASONS`:
`duplicate` (the envelope id was seen: SQS is at-least-once), `reflected` (the state shows
it), `older` (the call's state was applied after the event happened, with
`stale_margin` seconds to spare: every call snapshot is a whole conversation, so it
includes the event), `out_of_scope` (an unknown call that no in-scope `acd.start` or
`user.start` names; a non-voice start), `ended_call` (the call ended and was evicted),
`not_tracked` (`acw`: nothing the state keeps)). Coalescing of re-reads per call is the
shell's job (a call queued once is read once).

Times are epoch seconds (float).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import orjson

from daemon.core.events import MAX_FRAME_BYTES, CallEvent, Rejected, excerpt, parse_message
from daemon.core.ids import ConversationId, ParticipantId, QueueId, UserId
from daemon.core.model import Call
from daemon.core.timefmt import parse_time
from daemon.core.topics import CALL_TOPIC_RE

__all__ = [
    "DETAIL_KINDS", "REJECT_REASONS", "REREAD_REASONS", "SKIP_REASONS", "STALE_MARGIN",
    "DetailDecider", "DetailEvent", "FrameEvent", "Verdict", "decode", "detail_topic",
]

DetailKind = Literal[
    "attributes", "customer.start", "customer.end", "user.start", "user.end", "acd.start",
    "acd.end", "acw", "outbound", "flow.start", "flow.end", "voicemail.start", "voicemail.end",
]
DETAIL_KINDS: Final[tuple[DetailKind, ...]] = (
    "attributes", "customer.start", "customer.end", "user.start", "user.end", "acd.start",
    "acd.end", "acw", "outbound", "flow.start", "flow.end", "voicemail.start", "voicemail.end",
)
_STARTS: Final = frozenset({"customer.start", "user.start", "acd.start", "outbound", "flow.start",
                            "voicemail.start"})
_ENDS: Final = frozenset({"customer.end", "user.end", "acd.end", "flow.end", "voicemail.end"})

DETAIL_PREFIX: Final = "v2.detail.events.conversation."
_DETAIL_TOPIC_RE: Final = re.compile(
    r"v2\.detail\.events\.conversation\.([^.\s]+)\.(" + "|".join(re.escape(k) for k in DETAIL_KINDS) + ")")
_CALL_DETAIL_TYPES: Final = frozenset({"v2.routing.queues.{id}.conversations.calls",
                                       "v2.users.{id}.conversations.calls"})

REJECT_REASONS: Final = (
    "too_large", "not_json", "not_object", "not_envelope", "unknown_detail_type", "bad_detail",
    "bad_event_body", "bad_call_event",
)
RereadReason = Literal["unknown_participant", "attributes_differ", "ended_but_connected",
                       "unseen_call_in_scope"]
SkipReason = Literal["duplicate", "reflected", "older", "out_of_scope", "ended_call", "not_tracked"]
REREAD_REASONS: Final[tuple[RereadReason, ...]] = (
    "unknown_participant", "attributes_differ", "ended_but_connected", "unseen_call_in_scope")
SKIP_REASONS: Final[tuple[SkipReason, ...]] = (
    "duplicate", "reflected", "older", "out_of_scope", "ended_call", "not_tracked")

#: Seconds by which a call's last applied snapshot must follow a detail event's `eventTime`
#: for the event to count as `older` (room for the WebSocket's delivery delay and clocks).
STALE_MARGIN: Final = 10.0
#: Media types of a call: a start event for an unknown call with another one is out of scope.
_VOICE: Final = frozenset({"VOICE", "UNKNOWN"})


def detail_topic(kind: DetailKind, conversation_id: str) -> str:
    """`v2.detail.events.conversation.{conversation_id}.{kind}`."""
    return f"{DETAIL_PREFIX}{conversation_id}.{kind}"


@dataclass(frozen=True, slots=True)
class DetailEvent:
    """One conversation detail event. `event_time` is the eventBody's `eventTime` and
    `published_at` the detail's `timestamp` (None when absent or unparseable), epoch s."""

    event_id: str
    kind: DetailKind
    conversation_id: ConversationId
    participant_id: ParticipantId
    event_time: float
    published_at: float | None
    attributes: Mapping[str, str] | None = None
    queue_id: QueueId | None = None
    user_id: UserId | None = None
    media_type: str | None = None
    disconnect_type: str | None = None


@dataclass(frozen=True, slots=True)
class FrameEvent:
    """A call-topic event: `frame` is its `detail` as a WebSocket frame (JSON bytes)."""

    event_id: str
    topic: str
    frame: bytes
    published_at: float | None


Decoded = DetailEvent | FrameEvent | Rejected

_ENVELOPE_STR: Final = ("id", "detail-type", "source")


def decode(body: bytes | str) -> Decoded:
    """Decode one SQS message body; never raises (see the module docstring)."""
    if len(body) > MAX_FRAME_BYTES:
        return Rejected("too_large", excerpt(body))
    try:
        data = orjson.loads(body)
    except Exception:
        return Rejected("not_json", excerpt(body))
    if data.__class__ is not dict:
        return Rejected("not_object", excerpt(body))
    for key in _ENVELOPE_STR:
        v = data.get(key)
        if v.__class__ is not str or not v:
            return Rejected("not_envelope", excerpt(body))
    detail = data.get("detail")
    if detail.__class__ is not dict:
        return Rejected("not_envelope", excerpt(body))
    event_id: str = data["id"]
    detail_type: str = data["detail-type"]
    topic = detail.get("topicName")
    published = parse_time(detail.get("timestamp"))
    if detail_type in _CALL_DETAIL_TYPES or CALL_TOPIC_RE.fullmatch(detail_type):
        if topic.__class__ is not str or CALL_TOPIC_RE.fullmatch(topic) is None:
            return Rejected("bad_detail", excerpt(body))
        frame = orjson.dumps(detail)
        if not isinstance(parse_message(frame), CallEvent):
            return Rejected("bad_call_event", excerpt(body))
        return FrameEvent(event_id, topic, frame, published)
    kind = _detail_kind(detail_type)
    if kind is None:
        return Rejected("unknown_detail_type", excerpt(body))
    if topic.__class__ is not str:
        return Rejected("bad_detail", excerpt(body))
    m = _DETAIL_TOPIC_RE.fullmatch(topic)
    if m is None or m.group(2) != kind:
        return Rejected("bad_detail", excerpt(body))
    ev = _event_body(event_id, kind, m.group(1), detail.get("eventBody"), published)
    if ev is None:
        return Rejected("bad_event_body", excerpt(body))
    return ev


def _detail_kind(detail_type: str) -> DetailKind | None:
    """The kind named by a detail-type: the pattern (`...conversation.{id}.attributes`) or,
    should Genesys ever send it so, the topic with the real id."""
    if not detail_type.startswith(DETAIL_PREFIX):
        return None
    m = _DETAIL_TOPIC_RE.fullmatch(detail_type)
    if m is None:
        return None
    kind: DetailKind = m.group(2)  # type: ignore[assignment]  # one of DETAIL_KINDS by the regex
    return kind


def _opt_str(body: Mapping[str, Any], key: str) -> tuple[str | None, bool]:
    """(value, ok): absent/None is (None, True); a non-empty string is kept; else not ok."""
    v = body.get(key)
    if v is None:
        return None, True
    if v.__class__ is str and v:
        return v, True
    return None, False


def _event_body(event_id: str, kind: DetailKind, topic_cid: str, body: object,
                published: float | None) -> DetailEvent | None:
    """The model's validation: string ids (the conversation the topic names), an integer
    `eventTime` (epoch ms), a string map of `attributes` for `attributes`, optional string
    `queueId`/`userId`/`mediaType`/`disconnectType`. None: invalid."""
    if body.__class__ is not dict:
        return None
    assert isinstance(body, dict)
    cid = body.get("conversationId")
    pid = body.get("participantId")
    t = body.get("eventTime")
    if cid.__class__ is not str or cid != topic_cid or pid.__class__ is not str or not pid:
        return None
    if t.__class__ is not int or t < 0:
        return None
    attributes: dict[str, str] | None = None
    if kind == "attributes":
        a = body.get("attributes")
        if a.__class__ is not dict or not all(v.__class__ is str for v in a.values()):
            return None
        attributes = a
    queue_id, ok_q = _opt_str(body, "queueId")
    user_id, ok_u = _opt_str(body, "userId")
    media, ok_m = _opt_str(body, "mediaType")
    disconnect, ok_d = _opt_str(body, "disconnectType")
    if not (ok_q and ok_u and ok_m and ok_d):
        return None
    return DetailEvent(
        event_id, kind, ConversationId(cid), ParticipantId(pid), t / 1000.0, published,
        attributes=attributes, queue_id=QueueId(queue_id) if queue_id else None,
        user_id=UserId(user_id) if user_id else None, media_type=media, disconnect_type=disconnect)


# ------------------------------------------------------------------------------ deciding


class CallState(Protocol):
    """What the decider reads of the call store (`daemon.core.state.CallStore` fits)."""

    def get(self, conversation_id: str) -> Call | None: ...

    def was_evicted(self, conversation_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """`reread`: read the call now (`reason` in `REREAD_REASONS`); otherwise `reason` is in
    `SKIP_REASONS` and the event costs no request."""

    reread: bool
    reason: RereadReason | SkipReason


_SKIP: Final = {r: Verdict(False, r) for r in SKIP_REASONS}
_READ: Final = {r: Verdict(True, r) for r in REREAD_REASONS}


class DetailDecider:
    """Whether a detail event needs a re-read. Keeps only the last `remember` envelope ids
    (duplicates); `stale_margin` in seconds (see `STALE_MARGIN`). `counts[reason]` counts
    every verdict by reason (all of `REREAD_REASONS` and `SKIP_REASONS` present at 0)."""

    def __init__(self, *, stale_margin: float = STALE_MARGIN, remember: int = 50_000) -> None:
        self.stale_margin = stale_margin
        self.remember = max(1, remember)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.counts: dict[str, int] = dict.fromkeys((*REREAD_REASONS, *SKIP_REASONS), 0)

    def seen(self, event_id: str) -> bool:
        """Note an envelope id; True when it was seen before (a duplicate delivery)."""
        seen = self._seen
        if event_id in seen:
            seen.move_to_end(event_id)
            return True
        seen[event_id] = None
        if len(seen) > self.remember:
            seen.popitem(last=False)
        return False

    def forget(self, event_id: str) -> None:
        """Forget an envelope id (its handling failed: the next delivery is decided again)."""
        self._seen.pop(event_id, None)

    def decide(self, event: DetailEvent, state: CallState, *, queues: Collection[str],
               users: Collection[str]) -> Verdict:
        """The verdict for one event, given the call state and the scope (queue and user
        ids in scope). Counts it in `counts`."""
        verdict = self._decide(event, state, queues, users)
        self.counts[verdict.reason] += 1
        return verdict

    def _decide(self, event: DetailEvent, state: CallState, queues: Collection[str],
                users: Collection[str]) -> Verdict:
        if self.seen(event.event_id):
            return _SKIP["duplicate"]
        kind = event.kind
        call = state.get(event.conversation_id)
        if call is None:
            if state.was_evicted(event.conversation_id):
                return _SKIP["ended_call"]
            if kind not in ("acd.start", "user.start"):
                return _SKIP["out_of_scope"]
            if event.media_type is not None and event.media_type.upper() not in _VOICE:
                return _SKIP["out_of_scope"]
            if (kind == "acd.start" and event.queue_id is not None and event.queue_id in queues) or (
                    kind == "user.start" and event.user_id is not None and event.user_id in users):
                return _READ["unseen_call_in_scope"]
            return _SKIP["out_of_scope"]
        if kind == "acw":
            return _SKIP["not_tracked"]
        if event.event_time < call.last_update - self.stale_margin:
            return _SKIP["older"]
        party = call.participants.get(event.participant_id)
        if party is None:
            return _READ["unknown_participant"]
        if kind in _STARTS:
            return _SKIP["reflected"]
        if kind in _ENDS:
            return _SKIP["reflected"] if party.is_final else _READ["ended_but_connected"]
        # attributes: every key the event names has that value in the state (a party that
        # has ended is frozen: its attributes no longer matter to any rule).
        if party.is_final:
            return _SKIP["reflected"]
        have = party.attributes
        wanted = event.attributes or {}
        if all(have.get(k) == v for k, v in wanted.items()):
            return _SKIP["reflected"]
        return _READ["attributes_differ"]
