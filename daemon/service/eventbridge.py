"""The EventBridge source: Genesys events from this host's SQS queue (issue 19).

Genesys' Amazon EventBridge integration puts conversation detail events on an event bus; a
rule sends them to one SQS queue per confguard host. `EventBridgeSource` (a `Source` of
`daemon.service.sources`, optional: the daemon is ready without it) long-polls that queue
(`POLLERS` long polls at once, so one batch waiting for its re-reads does not hold the
others back) and hands each message to the daemon:

- the body is decoded by the sans-I/O `daemon.core.eventbridge.decode`;
- a call-topic event (its `detail` is a WebSocket frame) goes to `sink.frame(...)`: the same
  parser, state and rules as a frame;
- a detail event is judged by `DetailDecider` against the call state and the scope: what the
  state does not show (an unknown participant, attributes that differ, an end of a party
  still connected, a start of an unseen call in scope) asks `sink.reread(cid)`: one GET at
  `Priority.NORMAL` (above resync and reconciliation, below removals), coalesced per call
  (within a batch here, and while a read of the call is under way by the sink); what the
  state shows, older events, duplicates and calls out of scope cost no request;
- a malformed body goes to `sink.reject(...)` (counted in
  `confguard_events_rejected_total{source="eventbridge", reason}`, logged once) and is
  deleted: it is never retried forever.

A batch (up to 10 messages) is deleted together (`DeleteMessageBatch`) once every message
in it was handled: its frame applied, its re-read done. A message whose re-read failed is
not deleted (and its id is forgotten as a duplicate): SQS offers it again after the queue's
visibility timeout, and its redrive policy moves it to a dead-letter queue in the end.

SQS unreachable, access denied, no credentials: logged (`eventbridge_receive_failed`, at
most once a minute per kind while it lasts, then `eventbridge_recovered`), counted
(`confguard_source_errors_total{source, kind}`), retried with the project's one back-off
policy (`daemon.genesys.retry.RetryPolicy`); the source is `degraded` in `/healthz` and
`confguard_source_up{source="eventbridge"}` is 0 meanwhile. The WebSocket path is not
affected.

Metrics (`service/metrics.Metrics`): `source_messages{source, stage}` (received, handled,
rejected, deleted), `source_event_age_seconds{source}` (now - the detail's `timestamp`,
at arrival), `source_rereads{source, reason}` (re-reads triggered), `source_skipped{source,
reason}` (events that cost nothing), `source_errors{source, kind}`, `source_up{source}`.

AWS is reached through `daemon.service.aws.aws_client` only (aiobotocore imported when the
source starts; nothing of it without an `eventbridge:` section). Credentials: the standard
AWS chain, never logged. `check_queue(settings)` is `confguard check --online`'s look at the
queue. Times are epoch seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from daemon.config import EventBridgeSettings
from daemon.core.eventbridge import DetailDecider, DetailEvent, FrameEvent, decode
from daemon.core.events import Rejected, excerpt
from daemon.genesys.retry import RetryPolicy
from daemon.genesys.scope import Scope
from daemon.service.aws import AwsFailure, aws_client, describe_aws_error
from daemon.service.sources import Sink, SourceHealth, SourceState

if TYPE_CHECKING:
    from daemon.core.eventbridge import CallState
    from daemon.service.sources import SourceContext
    from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)

NAME = "eventbridge"
#: The back-off between failed SQS calls: 0.5 s doubling to 5 s, jittered (unbounded tries).
RETRY = RetryPolicy(initial=0.5, factor=2.0, cap=5.0, jitter=0.5, max_attempts=None)
#: Seconds between two `eventbridge_receive_failed` lines of the same kind while it lasts.
ERROR_LOG_INTERVAL = 60.0
MAX_MESSAGES = 10  # SQS' most per ReceiveMessage
#: Concurrent long polls: one waits for its batch's re-reads while the others receive.
POLLERS = 3


@dataclass(slots=True)
class _Message:
    receipt: str
    body: str


class EventBridgeSource:
    """This host's SQS queue of Genesys EventBridge events (see the module docstring).

    `settings`: the `eventbridge:` section; `sink`: the event router; `state`: the call
    store (read only); `scope`: queue and user ids in scope; `retry`: the back-off;
    `clock`: epoch seconds."""

    name = NAME
    required = False

    def __init__(self, settings: EventBridgeSettings, sink: Sink, state: CallState, scope: Scope,
                 metrics: Metrics | None = None, *, clock: Callable[[], float] = time.time,
                 retry: RetryPolicy = RETRY) -> None:
        if settings.queue_url is None:
            raise ValueError("EventBridgeSource needs eventbridge.queue_url")
        self.settings = settings
        self.queue_url: str = settings.queue_url
        self._sink = sink
        self._state = state
        self._metrics = metrics
        self._clock = clock
        self._retry = retry
        self.decider = DetailDecider()
        self._queues: frozenset[str] = frozenset(scope.queue_ids)
        self._users: frozenset[str] = frozenset(scope.user_ids)
        self._stop = asyncio.Event()
        self._state_name: SourceState = "starting"
        self._last_error: AwsFailure | None = None
        self._failures = 0
        self._delays = retry.backoff()
        self._logged: dict[str, float] = {}
        self.counts: dict[str, int] = dict.fromkeys(("received", "handled", "rejected", "deleted"), 0)
        self._set_up(False)

    # ------------------------------------------------------------------ Source protocol

    async def start(self) -> None:
        """Nothing to wait for: the queue is polled by `run()`; an unreachable queue makes
        the source degraded, never the daemon fail to start."""
        self._state_name = "starting"

    async def run(self) -> None:
        """Poll until `stop()` with `POLLERS` concurrent long polls on one client. Never
        raises for SQS trouble: any poll's failure stops them all, and they start again
        after the back-off."""
        self._delays = self._retry.backoff()
        read_timeout = self.settings.wait_seconds + 10.0
        while not self._stop.is_set():
            try:
                async with aws_client("sqs", region=self.settings.effective_region,
                                      endpoint_url=self.settings.endpoint_url,
                                      read_timeout=read_timeout) as sqs:
                    await self._connected(sqs)
                    self._delays = self._retry.backoff()
                    async with asyncio.TaskGroup() as polls:
                        for i in range(POLLERS):
                            polls.create_task(self._poll(sqs), name=f"eventbridge-poll-{i}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # SQS down, refused, no credentials: degraded, retried
                self._failed(_first(exc))
                delay = next(self._delays, self._retry.cap)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)

    async def _poll(self, sqs: Any) -> None:
        """One long-poll loop: receive, handle, delete; returns at `stop()`."""
        while not self._stop.is_set():
            messages = await self._receive(sqs)
            if messages is None:
                return  # stopped while waiting
            if self._failures:
                self._recovered()
            self._delays = self._retry.backoff()
            self._state_name = "up"
            self._set_up(True)
            if messages:
                await self._handle_batch(sqs, messages)

    async def stop(self) -> None:
        """Ends `run()` (an SQS long poll under way is abandoned at once)."""
        self._stop.set()
        self._state_name = "stopped"
        self._set_up(False)

    async def apply_scope(self, scope: Scope) -> None:
        self._queues = frozenset(scope.queue_ids)
        self._users = frozenset(scope.user_ids)

    def resynced(self, started_at: float | None) -> None:
        """Nothing to do: the queue holds what the WebSocket lost, gap or not."""

    def health(self) -> SourceHealth:
        detail: dict[str, Any] = {"queue": self.queue_url.rsplit("/", 1)[-1], **self.counts}
        if self._last_error is not None and self._state_name == "degraded":
            detail["last_error"] = f"{self._last_error.kind}: {self._last_error.code}"
        return SourceHealth(self._state_name, self._state_name == "up", detail)

    # ------------------------------------------------------------------ receiving

    async def _connected(self, sqs: Any) -> None:
        """One GetQueueAttributes: the queue exists and is ours to read -> `up`."""
        reply = await sqs.get_queue_attributes(QueueUrl=self.queue_url,
                                               AttributeNames=["VisibilityTimeout", "RedrivePolicy"])
        attrs = reply.get("Attributes", {}) or {}
        if self._failures:
            self._recovered()
        elif self._state_name == "starting":
            log.info("eventbridge_started", queue=self.queue_url,
                     visibility_timeout=attrs.get("VisibilityTimeout"),
                     redrive_policy="RedrivePolicy" in attrs)
        self._state_name = "up"
        self._set_up(True)

    async def _receive(self, sqs: Any) -> list[_Message] | None:
        """One long poll; None when `stop()` came first."""
        call = asyncio.ensure_future(sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=MAX_MESSAGES,
            WaitTimeSeconds=self.settings.wait_seconds))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({call, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (call, stopped):
                if not f.done():
                    f.cancel()
            for f in (call, stopped):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await f
        if call not in done:
            return None
        reply = call.result()
        out: list[_Message] = []
        for m in reply.get("Messages", []) or []:
            receipt, body = m.get("ReceiptHandle"), m.get("Body")
            if isinstance(receipt, str) and isinstance(body, str):
                out.append(_Message(receipt, body))
        return out

    async def _handle_batch(self, sqs: Any, messages: list[_Message]) -> None:
        """Handle every message, re-read the calls they need (one read per call), then
        delete the handled ones in one request."""
        now = self._clock()
        rereads: dict[str, list[tuple[int, str]]] = {}  # cid -> [(message index, event id)]
        done: list[int] = []
        for i, msg in enumerate(messages):
            self._count("received")
            try:
                cid, event_id = self._handle(msg.body, now)
            except Exception:  # a bug here must not stop the queue nor offer the message forever
                log.exception("eventbridge_message_failed")
                self._count("rejected")
                self._sink.reject(source=NAME, reason="internal_error", excerpt=excerpt(msg.body))
                cid, event_id = None, ""
            if cid is None:
                done.append(i)
            else:
                rereads.setdefault(cid, []).append((i, event_id))
        if rereads:
            results = await asyncio.gather(*(self._sink.reread(cid, source=NAME) for cid in rereads),
                                           return_exceptions=True)
            for waiting, ok in zip(rereads.values(), results):
                if ok is True:
                    done.extend(i for i, _ in waiting)
                    for _ in waiting:
                        self._count("handled")
                else:  # offered again after the visibility timeout: decide it again then
                    for _, event_id in waiting:
                        self.decider.forget(event_id)
                    if isinstance(ok, BaseException) and not isinstance(ok, Exception):
                        raise ok
        if done:
            await self._delete(sqs, [messages[i] for i in sorted(done)])

    def _handle(self, body: str, now: float) -> tuple[str | None, str]:
        """Decode and route one message. (conversation id to re-read, event id), or
        (None, "") when it is handled already."""
        decoded = decode(body)
        if isinstance(decoded, Rejected):
            self._count("rejected")
            self._sink.reject(source=NAME, reason=decoded.reason, excerpt=decoded.excerpt)
            return None, ""
        self._observe_age(decoded.published_at, now)
        if isinstance(decoded, FrameEvent):
            self._sink.frame(decoded.frame, now, source=NAME)
            self._count("handled")
            return None, ""
        assert isinstance(decoded, DetailEvent)
        verdict = self.decider.decide(decoded, self._state, queues=self._queues, users=self._users)
        m = self._metrics
        if verdict.reread:
            if m is not None:
                m.source_rereads.labels(source=NAME, reason=verdict.reason).inc()
            return decoded.conversation_id, decoded.event_id
        if m is not None:
            m.source_skipped.labels(source=NAME, reason=verdict.reason).inc()
        self._count("handled")
        return None, ""

    async def _delete(self, sqs: Any, messages: list[_Message]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": m.receipt} for i, m in enumerate(messages)]
        reply = await sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        ok = len(reply.get("Successful", []) or [])
        failed = reply.get("Failed", []) or []
        self._count("deleted", ok)
        if failed:  # offered again later; the duplicate check makes that cheap
            log.warning("eventbridge_delete_failed", count=len(failed),
                        code=str(failed[0].get("Code", "")))

    # ------------------------------------------------------------------ accounting

    def _count(self, stage: str, n: int = 1) -> None:
        self.counts[stage] += n
        if self._metrics is not None and n:
            self._metrics.source_messages.labels(source=NAME, stage=stage).inc(n)

    def _observe_age(self, published_at: float | None, now: float) -> None:
        if published_at is not None and self._metrics is not None:
            self._metrics.source_event_age_seconds.labels(source=NAME).observe(max(0.0, now - published_at))

    def _set_up(self, up: bool) -> None:
        if self._metrics is not None:
            self._metrics.source_up.labels(source=NAME).set(1 if up else 0)

    def _failed(self, exc: BaseException) -> None:
        failure = describe_aws_error(exc)
        self._failures += 1
        self._last_error = failure
        if self._state_name != "stopped":
            self._state_name = "degraded"
        self._set_up(False)
        if self._metrics is not None:
            self._metrics.source_errors.labels(source=NAME, kind=failure.kind).inc()
        now = time.monotonic()
        last = self._logged.get(failure.kind)
        if last is None or now - last >= ERROR_LOG_INTERVAL:
            self._logged[failure.kind] = now
            log.warning("eventbridge_receive_failed", kind=failure.kind, code=failure.code,
                        error=failure.message, failures=self._failures)

    def _recovered(self) -> None:
        log.info("eventbridge_recovered", failures=self._failures)
        self._failures = 0
        self._logged.clear()
        self._last_error = None


def _first(exc: BaseException) -> BaseException:
    """The first failure inside (nested) exception groups (a poll's error in the TaskGroup)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def eventbridge_source(ctx: SourceContext) -> EventBridgeSource | None:
    """The composition root's factory: a source when `eventbridge.queue_url` is set."""
    settings = ctx.config.eventbridge
    if not settings.enabled:
        return None
    if ctx.state is None:
        raise ValueError("the EventBridge source needs the call state (SourceContext.state)")
    return EventBridgeSource(settings, ctx.sink, ctx.state, ctx.scope, ctx.metrics, clock=ctx.clock)


# ---------------------------------------------------------------------- check --online


@dataclass(frozen=True, slots=True)
class QueueReport:
    """What `check_queue` found: the queue's visibility timeout (s), its redrive policy
    (dead-letter queue ARN and maxReceiveCount, or None) and the messages waiting."""

    queue_url: str
    visibility_timeout: int | None
    dead_letter_arn: str | None
    max_receive_count: int | None
    messages: int | None

    def lines(self) -> list[str]:
        """The `confguard check --online` lines (`ok:` / `WARN:`)."""
        out = [f"ok: eventbridge queue {self.queue_url} exists and its attributes are readable"
               f" ({self.messages if self.messages is not None else '?'} message(s) waiting)"]
        vt = self.visibility_timeout
        out.append(f"ok: eventbridge queue visibility timeout {vt} s" if vt is not None
                   else "WARN: eventbridge queue visibility timeout unknown")
        if self.dead_letter_arn:
            out.append(f"ok: eventbridge queue redrive policy: dead-letter queue {self.dead_letter_arn}, "
                       f"maxReceiveCount {self.max_receive_count}")
        else:
            out.append("WARN: eventbridge queue has no redrive policy: a message whose re-read keeps "
                       "failing is offered again until the queue's retention ends; add a dead-letter queue")
        return out


async def check_queue(settings: EventBridgeSettings) -> QueueReport:
    """GetQueueAttributes of the configured queue (needs `sqs:GetQueueAttributes`). No
    message is received (that would count against its redrive policy). Raises the AWS
    exception; `describe_aws_error` explains it."""
    assert settings.queue_url is not None
    async with aws_client("sqs", region=settings.effective_region, endpoint_url=settings.endpoint_url) as sqs:
        reply = await sqs.get_queue_attributes(QueueUrl=settings.queue_url, AttributeNames=["All"])
    attrs: dict[str, str] = reply.get("Attributes", {}) or {}

    def as_int(key: str) -> int | None:
        try:
            return int(attrs[key])
        except (KeyError, ValueError):
            return None

    dlq: str | None = None
    max_receive: int | None = None
    raw = attrs.get("RedrivePolicy")
    if raw:
        try:
            policy = json.loads(raw)
            dlq = str(policy.get("deadLetterTargetArn") or "") or None
            max_receive = int(policy.get("maxReceiveCount")) if policy.get("maxReceiveCount") is not None else None
        except (ValueError, TypeError, AttributeError):
            dlq = None
    return QueueReport(settings.queue_url, as_int("VisibilityTimeout"), dlq, max_receive,
                       as_int("ApproximateNumberOfMessages"))
