"""The sandbox's Amazon EventBridge integration: conversation detail events into SQS.

Genesys' `amazon-eventbridge-source` integration publishes conversation detail events
(`v2.detail.events.conversation.{id}.<kind>`) to an EventBridge partner event bus; a rule
whose target is an SQS queue delivers each as the body of one SQS message. The sandbox
plays both parts: every change of its world becomes the detail events Genesys would raise,
wrapped in the EventBridge envelope and sent to one SQS queue (a moto server in the tests).

- `DetailEmitter` (pure): compares each changed conversation with what it saw last and
  returns the detail events of the difference: a new party -> `<kind>.start` (then
  `attributes` when it has any), a party that became final -> `<kind>.end`, attributes
  that changed -> `attributes` (the participant's whole attribute map). Kinds by purpose:
  customer and external -> customer, agent and user -> user, acd -> acd, ivr and workflow
  -> flow, voicemail -> voicemail; other purposes raise only attribute events. Bodies
  follow the SDK 269 models (`CustomerStartDetailEventTopicCustomerStartEvent`, ...,
  `AttributeDetailEventTopicAttributeUpdateEvent`; tests/sandbox/test_eventbridge_sandbox.py
  checks them like the call events): `eventTime` epoch ms, enums in upper case as the SDK
  lists them (`VOICE`, `INBOUND`, `CLIENT`, ...).
- `envelope(...)`: the EventBridge event (`version`, `id`, `detail-type` = the topic
  pattern with `{id}`, `source` = `aws.partner/genesys.com/cloud/<orgId>/<suffix>`,
  `account`, `time`, `region`, `resources`, `detail` = `{topicName, version, eventBody,
  metadata: {CorrelationId}, timestamp}`).
- `EventBridgePublisher` (asyncio): a world listener that emits at once (the world changes
  under it), applies the faults (`Faults.take_loss("eventbridge", cid)`: lose a change's
  events; `Faults.eventbridge_delay`: deliver N seconds later) and sends in batches of up
  to 10 (`SendMessageBatch`) from one task, in order; a failed send is retried every
  `retry_interval` seconds. aiobotocore is imported only when a publisher starts;
  credentials from the standard AWS chain.
Times are epoch seconds unless named `..._ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from daemon.core.timefmt import format_time
from daemon.sandbox.world import DIVISION_ID, Conversation, Party

if TYPE_CHECKING:
    from daemon.sandbox.faults import Faults

log = structlog.get_logger(__name__)

DETAIL_TOPIC = "v2.detail.events.conversation.{id}."
ACCOUNT = "123456789012"
SOURCE_SUFFIX = "confguard-sandbox"

_KIND_OF_PURPOSE = {"customer": "customer", "external": "customer", "agent": "user", "user": "user",
                    "acd": "acd", "ivr": "flow", "workflow": "flow", "voicemail": "voicemail"}
_DISCONNECT = {"endpoint": "ENDPOINT", "client": "CLIENT", "system": "SYSTEM", "transfer": "TRANSFER",
               "transfer.conference": "CONFERENCE_TRANSFER", "transfer.consult": "CONSULT_TRANSFER",
               "transfer.forward": "FORWARD_TRANSFER", "transfer.noanswer": "NO_ANSWER_TRANSFER",
               "transfer.notavailable": "NOT_AVAILABLE_TRANSFER", "peer": "PEER", "error": "ERROR",
               "timeout": "TIMEOUT", "spam": "SPAM", "other": "OTHER"}


def _ms(t: float | None) -> int | None:
    return None if t is None else int(round(t * 1000))


@dataclass(frozen=True, slots=True)
class Detail:
    """One detail event: `kind` (e.g. `customer.start`), its conversation and its body."""

    kind: str
    conversation_id: str
    body: dict[str, Any]

    @property
    def topic(self) -> str:
        return f"v2.detail.events.conversation.{self.conversation_id}.{self.kind}"


@dataclass(slots=True)
class _Seen:
    live: bool
    attributes: dict[str, str]


class DetailEmitter:
    """Detail events from successive conversation snapshots (see the module docstring).
    Forgets a conversation once it ended and its ends were emitted."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, _Seen]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def changes(self, conv: Conversation, now: float) -> list[Detail]:
        seen = self._seen.setdefault(conv.id, {})
        out: list[Detail] = []
        for p in conv.participants:
            old = seen.get(p.id)
            kind = _KIND_OF_PURPOSE.get(p.purpose)
            if old is None:
                if kind is not None:
                    out.append(Detail(f"{kind}.start", conv.id, _start_body(kind, conv, p, now)))
                if p.attributes:
                    out.append(Detail("attributes", conv.id, _attribute_body(conv, p, now)))
                if not p.live and kind is not None:
                    out.append(Detail(f"{kind}.end", conv.id, _end_body(kind, conv, p, now)))
                seen[p.id] = _Seen(p.live, dict(p.attributes))
                continue
            if p.attributes != old.attributes:
                out.append(Detail("attributes", conv.id, _attribute_body(conv, p, now)))
                old.attributes = dict(p.attributes)
            if old.live and not p.live:
                if kind is not None:
                    out.append(Detail(f"{kind}.end", conv.id, _end_body(kind, conv, p, now)))
                old.live = False
        if conv.end is not None and all(not s.live for s in seen.values()):
            del self._seen[conv.id]
        return out


def _common(conv: Conversation, p: Party, now: float) -> dict[str, Any]:
    d: dict[str, Any] = {
        "eventTime": _ms(now), "conversationId": conv.id, "participantId": p.id, "sessionId": p.id,
        "mediaType": "VOICE", "provider": p.provider, "direction": p.direction.upper(),
        "ani": p.ani, "dnis": p.dnis, "divisionId": DIVISION_ID,
    }
    if p.direction == "inbound":
        d["addressFrom"], d["addressTo"] = p.ani, p.dnis
    else:
        d["addressFrom"], d["addressTo"] = p.dnis, p.address
    return d


def _start_body(kind: str, conv: Conversation, p: Party, now: float) -> dict[str, Any]:
    d = _common(conv, p, now)
    if kind == "customer":
        d["externalContactId"] = p.external_contact_id
        d["externalOrganizationId"] = p.external_organization_id
    elif kind == "user":
        d["userId"], d["queueId"] = p.user_id, p.queue_id
    elif kind == "acd":
        d["queueId"] = p.queue_id
    elif kind == "flow":
        d["flowType"] = "INBOUNDCALL"
    elif kind == "voicemail":
        d["userId"], d["queueId"] = p.user_id, p.queue_id
        for k in ("addressFrom", "addressTo"):
            d.pop(k, None)  # not in the voicemail models
    return {k: v for k, v in d.items() if v is not None}


def _end_body(kind: str, conv: Conversation, p: Party, now: float) -> dict[str, Any]:
    d = _start_body(kind, conv, p, now)
    d["disconnectType"] = _DISCONNECT.get(p.disconnect_type or "", "OTHER")
    connected = (p.end_time or now) - p.connected_time if p.connected_time is not None else None
    if connected is not None:
        dur = max(0, int(round(connected * 1000)))
        if kind in ("customer", "user"):
            d["interactingDurationMs"] = dur
        elif kind in ("acd", "flow"):
            d["connectedDurationMs"] = dur
        elif kind == "voicemail":
            d["voicemailDurationMs"] = dur
    return d


def _attribute_body(conv: Conversation, p: Party, now: float) -> dict[str, Any]:
    d: dict[str, Any] = {"eventTime": _ms(now), "conversationId": conv.id, "participantId": p.id,
                         "attributes": dict(p.attributes),
                         "communications": [{"id": p.id, "mediaType": "VOICE"}],
                         "participantStartTime": _ms(p.start_time)}
    return d


def envelope(detail: Detail, *, org_id: str, region: str, now: float,
             correlation_id: str | None = None) -> dict[str, Any]:
    """The EventBridge event an SQS rule target receives as the message body."""
    return {
        "version": "0", "id": str(uuid.uuid4()),
        "detail-type": f"{DETAIL_TOPIC}{detail.kind}",
        "source": f"aws.partner/genesys.com/cloud/{org_id}/{SOURCE_SUFFIX}",
        "account": ACCOUNT, "time": format_time(now)[:19] + "Z", "region": region, "resources": [],
        "detail": {"topicName": detail.topic, "version": "2", "eventBody": detail.body,
                   "metadata": {"CorrelationId": correlation_id or str(uuid.uuid4())},
                   "timestamp": format_time(now)},
    }


@dataclass(slots=True)
class PublisherStats:
    """Counts: detail events emitted, lost on purpose, sent to SQS; failed sends."""

    emitted: int = 0
    lost: int = 0
    sent: int = 0
    """Events sent, counted once per queue."""
    send_errors: int = 0
    sent_log: deque[tuple[float, str, str]] = field(default_factory=lambda: deque(maxlen=100_000))
    """(time its SendMessageBatch began, conversation id, kind) of the last events sent to
    the first queue: the message is in the queue from some moment of that request on."""


class EventBridgePublisher:
    """Sends the world's detail events to one SQS queue (see the module docstring).

    `queue_url`: one queue, or several (a rule with several targets: every queue gets
    every event, with the same envelope id); `endpoint_url` (None: AWS itself), `region` (None: `AWS_REGION` or
    `AWS_DEFAULT_REGION`, else `us-east-1`); `kinds`: publish only these detail kinds
    (the integration's topic filter; None: all); `faults` for `take_loss` and `eventbridge_delay`; `clock` epoch s."""

    def __init__(self, queue_url: str | Sequence[str], *, endpoint_url: str | None, region: str | None,
                 faults: Faults,
                 org_id: str | None = None, clock: Callable[[], float] = time.time,
                 retry_interval: float = 0.5, kinds: Collection[str] | None = None) -> None:
        self.queue_urls: list[str] = [queue_url] if isinstance(queue_url, str) else list(queue_url)
        if not self.queue_urls:
            raise ValueError("EventBridgePublisher needs at least one queue URL")
        self.endpoint_url = endpoint_url
        self.region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or "us-east-1")
        self.faults = faults
        self.org_id = org_id or str(uuid.uuid4())
        self.clock = clock
        self.retry_interval = retry_interval
        self.kinds = frozenset(kinds) if kinds is not None else None
        self.emitter = DetailEmitter()
        self._delayed = 0
        self.stats = PublisherStats()
        self._ready: dict[str, deque[tuple[str, str, bytes]]] = {u: deque() for u in self.queue_urls}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()

    def listener(self, conv: Conversation) -> None:
        """World listener: emit the change's detail events now, deliver them per the faults."""
        now = self.clock()
        details = self.emitter.changes(conv, now)
        if self.kinds is not None:
            details = [d for d in details if d.kind in self.kinds]
        if not details:
            return
        self.stats.emitted += len(details)
        if self.faults.take_loss("eventbridge", conv.id):
            self.stats.lost += len(details)
            return
        bodies = [(d.conversation_id, d.kind, orjson.dumps(envelope(d, org_id=self.org_id, region=self.region, now=now)))
                  for d in details]
        delay = self.faults.eventbridge_delay
        if delay > 0:
            loop = asyncio.get_running_loop()
            handle: asyncio.TimerHandle | None = None

            def due() -> None:
                if handle is not None:
                    self._timers.discard(handle)
                self._delayed -= len(bodies)
                self._enqueue(bodies)

            self._delayed += len(bodies)
            handle = loop.call_later(delay, due)
            self._timers.add(handle)
        else:
            self._enqueue(bodies)

    def _enqueue(self, bodies: list[tuple[str, str, bytes]]) -> None:
        for ready in self._ready.values():
            ready.extend(bodies)
        self._wake.set()

    @property
    def queue_url(self) -> str:
        """The first (usually the only) queue."""
        return self.queue_urls[0]

    @property
    def pending(self) -> int:
        """Events not sent yet: waiting to be sent (over every queue) or delayed."""
        return sum(len(r) for r in self._ready.values()) + self._delayed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sandbox-eventbridge")

    async def stop(self) -> None:
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(connect_timeout=5, read_timeout=10, retries={"total_max_attempts": 1})
        async with get_session().create_client("sqs", region_name=self.region,
                                               endpoint_url=self.endpoint_url, config=config) as sqs:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while any(self._ready.values()):
                    for url, ready in self._ready.items():
                        if ready and not await self._send_batch(sqs, url, ready):
                            await asyncio.sleep(self.retry_interval)

    async def _send_batch(self, sqs: Any, url: str, ready: deque[tuple[str, str, bytes]]) -> bool:
        """Send up to 10 events of `ready` to `url`; False when (part of) it failed."""
        batch = [ready[i] for i in range(min(10, len(ready)))]
        entries = [{"Id": str(i), "MessageBody": body.decode()} for i, (_, _, body) in enumerate(batch)]
        started = self.clock()
        try:
            out = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
        except Exception as e:  # the queue is unreachable: keep the events, retry
            self.stats.send_errors += 1
            log.warning("sandbox_eventbridge_send_failed", error=type(e).__name__)
            return False
        failed = {int(f["Id"]) for f in out.get("Failed", [])}
        for i, (cid, kind, _) in enumerate(batch):
            if i not in failed:
                self.stats.sent += 1
                if url == self.queue_urls[0]:
                    self.stats.sent_log.append((started, cid, kind))
        for _ in batch:
            ready.popleft()
        if failed:  # put the refused ones back in front, in order
            self.stats.send_errors += 1
            for i in sorted(failed, reverse=True):
                ready.appendleft(batch[i])
            return False
        return True
