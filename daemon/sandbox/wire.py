"""The sandbox's wire pieces shared by the server (`server.Sandbox`) and its HTTP app
(`app`, `scenario`): one open notification socket (`Conn`), the frames written to it
(`metadata_message`, `gone_message`, call events), the app key under which the app finds
its host (`SANDBOX`) and what the app needs of that host (`SandboxHost`, a protocol, so the
app does not import the server that builds it: no import cycle).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from aiohttp import web

from daemon.sandbox.faults import Faults
from daemon.sandbox.journal import Journal
from daemon.sandbox.world import World


EXTRA_PREFIX = "sandboxExtra"
"""Key prefix of the deliberate unknown fields added to events (Genesys adds fields without
notice; clients must ignore what they do not know)."""


class _Close:
    """Outbox sentinel: close the socket after what is queued before it."""

    def __init__(self, code: int = 1000, message: bytes = b"") -> None:
        self.code = code
        self.message = message


@dataclass(eq=False)
class Conn:
    """One open notification WebSocket (one per channel)."""

    channel_id: str
    ws: web.WebSocketResponse
    request: web.Request
    outbox: deque[bytes | _Close] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    held: bytes | None = None
    sent: int = 0

    def push(self, item: bytes | _Close) -> None:
        self.outbox.append(item)
        self.wake.set()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (a network failure)."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()


def _message(topic: str, body: bytes, correlation_id: str) -> bytes:
    return b"".join((b'{"topicName":"', topic.encode(), b'","version":"2","eventBody":', body,
                     b',"metadata":{"CorrelationId":"', correlation_id.encode(), b'"}}'))


def metadata_message(text: str, topic: str = "channel.metadata") -> bytes:
    return _message(topic, orjson.dumps({"message": text}), str(uuid.uuid4()))


def gone_message(text: str) -> bytes:
    return orjson.dumps({"result": "404", "message": text})


class SandboxHost(Protocol):
    """What the HTTP app (`app`, `scenario`) uses of the `server.Sandbox` serving it."""

    world: World
    faults: Faults
    journal: Journal
    conns: dict[str, Conn]
    client_id: str
    client_secret: str
    heartbeat_interval: float
    closing_grace: float
    patch_final_status: int

    @property
    def base_url(self) -> str: ...

    @property
    def ws_base(self) -> str: ...

    async def writer(self, conn: Conn) -> None: ...

    def send_raw(self, data: bytes, channel_id: str | None = None) -> int: ...

    def drop_sockets(self, channel_id: str | None = None) -> int: ...

    def socket_closing(self, channel_id: str | None = None, grace: float | None = None) -> int: ...

    def expire_channel(self, channel_id: str) -> None: ...


SANDBOX: web.AppKey[SandboxHost] = web.AppKey("sandbox")
