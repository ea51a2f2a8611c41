"""The stream's sockets: one shard's record (`Shard`), one socket's (`Conn`), and `Sockets`,
which opens a WebSocket and runs its pump task.

The pump delivers every frame to `on_message(raw, received_at) -> Message` (the frame
exactly as received, `clock()` at receipt) and reads the control messages the shard's
supervisor needs (heartbeat, `socket_closing`, channel gone) from what it returns: the
consumer parses each frame once, the stream never. Every frame is a sign of life for the
watchdog (`ShardSupervisor.note_frame`). When the socket ends, `Closed` is posted to the
shard's inbox (unless the socket was retired or the stream is stopping).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from daemon.core.events import ChannelGone, Heartbeat, Message, SocketClosing
from daemon.core.ids import Topic
from daemon.genesys.stream.settings import StreamSettings
from daemon.genesys.stream.supervisor import ChannelLike, Closed, Control, ControlKind, Event, ShardSupervisor

if TYPE_CHECKING:  # for annotations only: the genesys layer does not import the service
    from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)

_PING: Final = '{"message":"ping"}'

#: The parsed messages (what `on_message` returns) the shard's supervisor is told about.
_CONTROL_KINDS: Final[dict[type, ControlKind]] = {
    Heartbeat: ControlKind.HEARTBEAT, SocketClosing: ControlKind.SOCKET_CLOSING,
    ChannelGone: ControlKind.CHANNEL_GONE}


@dataclass(eq=False)
class Conn:
    """One socket of a shard."""

    id: int
    shard: Shard
    channel: ChannelLike
    ws: ClientConnection
    end_reason: str | None = None  # set when this socket has ended (or is being dropped)
    retired: bool = False  # replaced by a handover; its end is expected
    pump: asyncio.Task[None] | None = None
    log: Any = None  # bound once to this socket's shard and channel

    @property
    def alive(self) -> bool:
        return self.end_reason is None

    def abort(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        transport = self.ws.transport
        if transport is not None:
            transport.abort()


@dataclass(eq=False)
class Shard:
    """One channel's worth of topics: its supervisor (the decisions), its sockets and the
    driver's tasks."""

    sup: ShardSupervisor
    current: Conn | None = None
    conns: dict[int, Conn] = field(default_factory=dict)  # open sockets, by id
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inbox: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    driver: asyncio.Task[None] | None = None
    ops: asyncio.Task[None] | None = None  # the action chain in flight (one I/O step)
    gave_up: str | None = None
    fatal: BaseException | None = None

    @property
    def index(self) -> int:
        return self.sup.index

    @property
    def topics(self) -> tuple[Topic, ...]:
        return self.sup.topics

    @property
    def channel(self) -> ChannelLike | None:
        return self.sup.channel

    @property
    def live(self) -> bool:
        return self.current is not None and self.current.alive

    def halt(self, reason: str) -> None:
        """Cancel the shard's tasks and drop its sockets."""
        for t in (self.driver, self.ops):
            if t is not None and t is not asyncio.current_task():
                t.cancel()
        for c in list(self.conns.values()):
            c.retired = True
            c.abort(reason)
            if c.pump is not None:
                c.pump.cancel()


class Sockets:
    """Opens sockets and pumps them (see the module docstring). `stopping()`: whether the
    stream is stopping (a socket's end is then not reported). `token_expires_at()`: for
    `Closed`. Counts `connections_opened` and `pings_sent`."""

    def __init__(self, settings: StreamSettings, *,
                 on_message: Callable[[bytes | str, float], Message],
                 stopping: Callable[[], bool], token_expires_at: Callable[[], float | None],
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._on_message = on_message
        self._stopping = stopping
        self._token_expires_at = token_expires_at
        self._metrics = metrics
        self._clock = clock
        self._ids = itertools.count(1)
        self.connections_opened = 0
        self.pings_sent = 0

    async def open(self, s: Shard, ch: ChannelLike) -> Conn:
        """Connect to `ch` and start the socket's pump."""
        ws = await connect(ch.connect_uri, ping_interval=None, open_timeout=self._settings.connect_timeout,
                           close_timeout=2.0, max_size=self._settings.max_frame_bytes,
                           user_agent_header="confguard/0.1",
                           compression="deflate" if self._settings.compression else None)
        conn = Conn(id=next(self._ids), shard=s, channel=ch, ws=ws,
                    log=log.bind(shard=s.index, channel=ch.id))
        s.conns[conn.id] = conn
        conn.pump = asyncio.create_task(self._pump(conn), name=f"stream-pump-{s.index}")
        self.connections_opened += 1
        if self._metrics is not None:
            self._metrics.stream_connections.inc()
        conn.log.info("stream_connected", topics=len(s.topics))
        return conn

    async def _pump(self, conn: Conn) -> None:
        """Deliver every frame; report control frames and the socket's end."""
        ws = conn.ws
        on_message = self._on_message
        clock = self._clock
        monotonic = time.monotonic
        note_frame = conn.shard.sup.note_frame
        cid = conn.id
        clog = conn.log
        try:
            async for data in ws:
                note_frame(cid, monotonic())
                try:
                    msg = on_message(data, clock())
                except Exception:  # the consumer's bug must not take the stream down
                    clog.exception("stream_on_message_failed")
                    continue
                control = _CONTROL_KINDS.get(type(msg))
                if control is not None and not conn.retired:
                    text = msg.message if isinstance(msg, ChannelGone) else None
                    conn.shard.inbox.put_nowait(Control(cid, control, text))
        except ConnectionClosed as exc:
            if conn.end_reason is None:
                conn.end_reason = "closed"
            clog.info("stream_socket_closed", code=exc.rcvd.code if exc.rcvd else None,
                      retired=conn.retired)
        except Exception:  # anything else ends this socket too; the supervisor reconnects
            clog.exception("stream_pump_failed")
            conn.abort("error")
        finally:
            if conn.end_reason is None:
                conn.end_reason = "closed"
            if not conn.retired and not self._stopping():
                conn.shard.inbox.put_nowait(
                    Closed(conn.id, conn.end_reason, self._token_expires_at()))

    def ping(self, conn: Conn) -> Coroutine[Any, Any, None]:
        """Count a ping now; the returned coroutine sends it (run in the background)."""
        self.pings_sent += 1
        return self._send_ping(conn)

    async def _send_ping(self, conn: Conn) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):  # the pump sees the close
            await conn.ws.send(_PING)

    async def retire(self, old: Conn, new: Conn) -> None:
        """Close a replaced socket after a short overlap (`handover_overlap`, or until the
        new one's first frame)."""
        sup = new.shard.sup
        deadline = time.monotonic() + self._settings.handover_overlap
        while old.alive and sup.frames(new.id) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if old.pump is not None:
            old.pump.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.ws.close(), timeout=2.0)
        old.abort("retired")
        old.shard.conns.pop(old.id, None)
