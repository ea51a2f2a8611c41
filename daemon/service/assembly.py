"""The composition root: which objects the daemon is made of and how they are built.

Sources: `SOURCES` lists one factory per input (`daemon.service.sources`); each gets a
`SourceContext` and returns its `Source`, or None when it is not configured. Adding an
input is one module (its `Source` class and factory) and one line here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon.config import Config
from daemon.core.events import Message
from daemon.genesys.api import GenesysClient
from daemon.genesys.scope import Scope
from daemon.genesys.stream import StreamManager
from daemon.core.eventbridge import CallState
from daemon.service.eventbridge import eventbridge_source
from daemon.service.metrics import Metrics
from daemon.service.sources import Sink, Source, WebSocketSource


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


def websocket_source(ctx: SourceContext) -> Source:
    """The notification WebSocket (always on)."""
    subs = ctx.config.subscriptions

    def make_stream(on_message: Callable[[bytes | str, float], Message],
                    on_gap: Callable[[str], None]) -> StreamManager:
        return StreamManager(ctx.client, list(ctx.scope.topics), on_message=on_message,
                             on_gap=on_gap, metrics=ctx.metrics,
                             heartbeat_timeout_factor=subs.heartbeat_timeout_factor,
                             channel_refresh_before=subs.channel_refresh_before)

    return WebSocketSource(ctx.sink, make_stream)


#: Every input of the daemon, in start order (one line per source).
SOURCES: tuple[SourceFactory, ...] = (
    websocket_source,
    eventbridge_source,  # daemon.service.eventbridge: only with an `eventbridge:` section
)
