"""Sources: anything that delivers Genesys events into the daemon.

A source is one module with one class that satisfies `Source`; the composition root
(`daemon.service.assembly.SOURCES`) names it on one line. Today there is one source, the
notification WebSocket (`WebSocketSource`, over `daemon.genesys.stream.StreamManager`);
the next is the EventBridge queue (issue 19).

What a source may hand to the daemon is the `Sink` protocol, implemented by the event router
(`daemon.service.router.EventRouter`):

- `sink.frame(raw, received_at, source=NAME) -> Message`: one message in the WebSocket frame
  shape (`{"topicName": ..., "eventBody": ...}`, bytes or str, exactly as received;
  `received_at` epoch seconds). It is parsed once, folded into the state, judged, and its
  decisions acted on, synchronously, before this returns. The parsed message is returned
  (the WebSocket's pump reads heartbeats and the like from it). Never raises.
- `await sink.reread(conversation_id, source=NAME) -> bool`: "re-read this call now": one
  `GET` of the call (`Priority.NORMAL`: above resync and reconciliation, below removals),
  coalesced per call (a request while a read of that call is under way shares it), folded
  in like a frame (a 404 marks the call gone). False when the read failed (logged).
- `sink.reject(source=NAME, reason=..., excerpt=...)`: a message the source could not turn
  into a frame (not JSON, not its envelope, ...): counted in
  `confguard_events_rejected_total{source=NAME, reason}` and logged once (`event_rejected`).
  Frames given to `frame` are counted by the router itself.
- `sink.gap(reason, source=NAME)`: events may have been missed (a reconnect, new topics):
  the daemon resyncs and is not ready until that resync completes.

Health: `source.health() -> SourceHealth` is read on every `/healthz` and `/readyz`
(cheap, non-blocking); `/healthz` shows `sources: {NAME: {"state": ..., ...}}`. A source
with `required = True` (the WebSocket) must be `ready` for the daemon to be ready; an
optional one (a queue beside the WebSocket) only shows its state.

Lifecycle, driven by the daemon: `await start()` (returns once delivering; raises a
`ConfguardError` when it cannot, which stops the start-up), `await run()` (until `stop()`;
raising means the source failed for good and the daemon stops with that error), `await
stop()` (bounded), `await apply_scope(scope)` (a reload changed the scope: all or nothing,
raises `SubscriptionError` and keeps the old one), `resynced(started_at)` (a resync
started at `started_at`, the daemon's clock, completed: gaps opened before it are closed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from daemon.config import Config
from daemon.core.eventbridge import CallState
from daemon.core.events import Message
from daemon.core.ids import ConversationId
from daemon.genesys.api import GenesysClient
from daemon.genesys.scope import Scope
from daemon.genesys.stream import StreamManager
from daemon.service.metrics import Metrics

SourceState = Literal["starting", "up", "degraded", "down", "stopped"]


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """One source's health. `state`: starting | up | degraded | down | stopped. `ready`:
    delivering everything it should (for a required source: the daemon is ready only then).
    `detail`: small JSON-able facts shown in `/healthz` (e.g. `channels`, `rejected_topics`,
    `last_error`)."""

    state: SourceState
    ready: bool
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "ready": self.ready, **self.detail}


class Sink(Protocol):
    """Where sources deliver (the event router). See the module docstring."""

    def frame(self, raw: bytes | str, received_at: float, *, source: str) -> Message: ...

    async def reread(self, conversation_id: ConversationId | str, *, source: str) -> bool: ...

    def reject(self, *, source: str, reason: str, excerpt: str) -> None: ...

    def gap(self, reason: str, *, source: str) -> None: ...


class Source(Protocol):
    """Anything that delivers Genesys events into the daemon. See the module docstring."""

    @property
    def name(self) -> str:
        """The metric label and `/healthz` key: `websocket`, `eventbridge`, ..."""

    @property
    def required(self) -> bool:
        """The daemon is ready only while this source is."""

    async def start(self) -> None: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...

    async def apply_scope(self, scope: Scope) -> None: ...

    def resynced(self, started_at: float | None) -> None: ...

    def health(self) -> SourceHealth: ...


class WebSocketSource:
    """The notification WebSocket as a source: `daemon.genesys.stream.StreamManager` on the
    scope's topics, delivering every frame to `sink.frame(..., source="websocket")` and its
    gaps to `sink.gap`. Required: the daemon is not ready without it.

    `make_stream(on_message, on_gap)` builds the `StreamManager` (the composition root gives
    it the client, topics and settings)."""

    name = "websocket"
    required = True

    def __init__(self, sink: Sink,
                 make_stream: Callable[[Callable[[bytes | str, float], Message],
                                        Callable[[str], None]], StreamManager]) -> None:
        self._sink = sink
        self.stream = make_stream(self._on_message, self._on_gap)
        self._started = False

    def _on_message(self, raw: bytes | str, received_at: float) -> Message:
        return self._sink.frame(raw, received_at, source="websocket")

    def _on_gap(self, reason: str) -> None:
        self._sink.gap(reason, source="websocket")

    async def start(self) -> None:
        await self.stream.start()
        self._started = True

    async def run(self) -> None:
        await self.stream.run()

    async def stop(self) -> None:
        await self.stream.stop()

    async def apply_scope(self, scope: Scope) -> None:
        await self.stream.update_topics(list(scope.topics))

    def resynced(self, started_at: float | None) -> None:
        self.stream.mark_resynced(started_at=started_at)

    def credentials_rotated(self) -> None:
        """The OAuth client changed: channels belong to the client that created them, so
        every shard moves to a new channel made with the new token (make-before-break).
        Optional for a source: the daemon calls it where a source has it."""
        self.stream.rotate_channels()

    def health(self) -> SourceHealth:
        stream = self.stream
        ready = stream.ready
        rejected = stream.rejected_topics
        detail: dict[str, Any] = {"channels": len(stream.channels), "topics": len(stream.topics)}
        if rejected:
            detail["rejected_topics"] = sorted(rejected)
        if ready:
            state: SourceState = "up"
        elif not self._started:
            state = "starting"
        else:
            state = "degraded"
        return SourceHealth(state, ready, detail)


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What a source factory gets: the loaded configuration, the Genesys client, the sink
    to deliver into (the event router), the metrics, the scope resolved at start-up (a
    reload hands a source its new scope through `Source.apply_scope`), the clock (epoch
    seconds) and the call state (read only: a source that judges what the state already
    shows, the EventBridge queue)."""

    config: Config
    client: GenesysClient
    sink: Sink
    metrics: Metrics
    scope: Scope
    clock: Callable[[], float] = time.time
    state: CallState | None = None


SourceFactory = Callable[[SourceContext], "Source | None"]
