"""The stream's shard driver: one task per shard takes events from the shard's inbox (or a
`Tick` every `SupervisorSettings.tick` seconds, and at each back-off deadline), hands them to
the shard's sans-I/O `ShardSupervisor` and carries out the actions it returns: bookkeeping
at once, the one I/O step (HEAD / create / subscribe / connect) as a task that posts its
answer back to the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, Protocol

import structlog
from websockets.exceptions import InvalidStatus, WebSocketException

from daemon.core.ids import Topic
from daemon.errors import ApiError, ConfguardError, StreamError
from daemon.genesys.retry import classify
from daemon.genesys.stream.pump import Conn, Shard, Sockets
from daemon.genesys.stream.subscriptions import StreamClient, Subscriptions
from daemon.genesys.stream.supervisor import (
    IO_ACTIONS,
    Action,
    Begin,
    ChannelChecked,
    ChannelCreated,
    ChannelLike,
    CheckChannel,
    Connect,
    CountReconnect,
    CreateChannel,
    DeclareGap,
    DiscardChannel,
    Drop,
    Event,
    GiveUp,
    Note,
    Opened,
    Ping,
    Promote,
    RenewToken,
    Retire,
    ShardSupervisor,
    IoStep,
    StepFailed,
    Subscribe,
    Subscribed,
    SupervisorSettings,
    Tick,
)

log = structlog.get_logger(__name__)

# The errors an I/O step may meet and the supervisor decides about; anything else is a bug.
_STEP_ERRORS: Final = (ApiError, OSError, WebSocketException, TimeoutError, asyncio.TimeoutError)

_STEP_OF: Final[dict[type, IoStep]] = {Connect: IoStep.CONNECT, CheckChannel: IoStep.CHECK,
                                       CreateChannel: IoStep.CREATE, Subscribe: IoStep.SUBSCRIBE}


class DriverHost(Protocol):
    """What the driver reports to its stream (`StreamManager`)."""

    def signal_gap(self, reason: str) -> None: ...

    def count_reconnect(self, reason: str) -> None: ...

    def update_gauges(self) -> None: ...

    def background(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def failed(self, exc: BaseException) -> None: ...


class Driver:
    """Drives every shard of one stream (see the module docstring)."""

    def __init__(self, client: StreamClient, settings: SupervisorSettings, subs: Subscriptions,
                 sockets: Sockets, host: DriverHost, *, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._settings = settings
        self._subs = subs
        self._sockets = sockets
        self._host = host
        self._clock = clock

    def new_shard(self, index: int, topics: Sequence[Topic]) -> Shard:
        return Shard(ShardSupervisor(index, topics, self._settings))

    def start(self, s: Shard, stopping: Callable[[], bool]) -> None:
        """Run the shard's driver task until `stopping()`."""
        s.driver = asyncio.create_task(self._supervise(s, stopping), name=f"stream-shard-{s.index}")

    async def connect_initial(self, s: Shard, ch: ChannelLike) -> None:
        """Open a new shard's first socket (the supervisor's attempts and back-off)."""
        self.tell(s, Begin(ch))
        await self._drive(s, lambda: s.current is not None or s.gave_up is not None)
        if s.gave_up is not None:
            raise StreamError(s.gave_up)

    async def _supervise(self, s: Shard, stopping: Callable[[], bool]) -> None:
        try:
            await self._drive(s, stopping)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.error("stream_failed", shard=s.index, error=str(exc) or type(exc).__name__)
            self._host.failed(exc)
            # Not re-raised: the task's owner is StreamManager.run(), which raises it.

    async def _drive(self, s: Shard, done: Callable[[], bool]) -> None:
        """Feed the supervisor events (and ticks) until `done()`; raises a step's bug."""
        tick = self._settings.tick
        next_tick = time.monotonic() + tick
        while not done():
            if s.fatal is not None:
                raise s.fatal
            now = time.monotonic()
            wait = next_tick - now
            if s.sup.wake_at is not None:
                wait = min(wait, s.sup.wake_at - now)
            event: Event | None
            try:
                event = await asyncio.wait_for(s.inbox.get(), timeout=max(0.0, wait))
            except (TimeoutError, asyncio.TimeoutError):
                event = None
            if event is not None:
                self.tell(s, event)
            now = time.monotonic()
            if event is None or now >= next_tick or (s.sup.wake_at is not None and now >= s.sup.wake_at):
                next_tick = now + tick
                self.tell(s, Tick())
                if s.current is not None and s.current.alive and s.channel is not None:
                    self._subs.set_age(s.channel)

    def tell(self, s: Shard, event: Event) -> None:
        """Hand one event to the shard's supervisor and carry out what it returns."""
        self._act(s, s.sup.handle(event, now=time.monotonic(), wall=self._clock()))

    def _act(self, s: Shard, actions: list[Action]) -> None:
        """Carry out the supervisor's actions: the I/O ones (and a token renewal) as one
        chained task, the rest at once."""
        chain: list[Action] = []
        promoted: Conn | None = None
        for a in actions:
            if isinstance(a, (RenewToken, *IO_ACTIONS)):
                chain.append(a)
            elif isinstance(a, Promote):
                s.current = promoted = s.conns[a.conn]
                self._host.update_gauges()
            else:
                self._now(s, a)
        if promoted is not None:  # forget sockets lost before this one (retiring ones stay)
            for cid, c in list(s.conns.items()):
                if c is not promoted and not c.alive and not c.retired:
                    del s.conns[cid]
        if chain:
            previous = s.ops
            s.ops = asyncio.create_task(self._run_chain(s, chain, previous),
                                        name=f"stream-step-{s.index}")

    def _now(self, s: Shard, a: Action) -> None:
        """One bookkeeping action (no I/O awaited here; closing and pings run in the
        background)."""
        host = self._host
        if isinstance(a, Note):
            getattr(log, a.level)(a.event, **a.fields)
        elif isinstance(a, CountReconnect):
            host.count_reconnect(a.reason)
        elif isinstance(a, DeclareGap):
            host.signal_gap(a.reason)
        elif isinstance(a, Drop):
            conn = s.conns.get(a.conn)
            if conn is not None:
                conn.abort(a.reason)
        elif isinstance(a, Ping):
            conn = s.conns.get(a.conn)
            if conn is not None:
                host.background(self._sockets.ping(conn))
        elif isinstance(a, Retire):
            old, new = s.conns.get(a.old), s.conns.get(a.new)
            if old is not None and new is not None:
                old.retired = True
                self._subs.forget(old.channel.id)
                host.background(self._retire(old, new))
        elif isinstance(a, DiscardChannel):
            host.background(self._subs.cleanup([a.channel]))
            self._subs.forget(a.channel.id)
        elif isinstance(a, GiveUp):
            s.gave_up = a.message
        # BackOff: the driver wakes at `sup.wake_at`.

    async def _retire(self, old: Conn, new: Conn) -> None:
        await self._sockets.retire(old, new)
        await self._subs.cleanup([old.channel])

    async def _run_chain(self, s: Shard, chain: list[Action],
                         previous: asyncio.Task[None] | None) -> None:
        """Carry out a token renewal and/or one I/O step; post the step's answer."""
        if previous is not None and not previous.done():
            with contextlib.suppress(Exception):
                await previous
        try:
            for a in chain:
                if isinstance(a, RenewToken):
                    await self._renew_token()
                else:
                    s.inbox.put_nowait(await self._step(s, a))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: supervision cannot go on
            s.fatal = exc
            s.inbox.put_nowait(None)  # wake the driver

    async def _step(self, s: Shard, a: Action) -> Event:
        step = _STEP_OF[type(a)]
        try:
            async with s.lock:
                if isinstance(a, Connect):
                    conn = await self._sockets.open(s, a.channel)
                    return Opened(conn.id, a.channel)
                if isinstance(a, CheckChannel):
                    exists = await self._client.channel_exists(a.channel.id)
                    return ChannelChecked(a.channel, exists, self._subs.token_expires_at())
                if isinstance(a, CreateChannel):
                    return ChannelCreated(await self._subs.create_channel(s.index))
                if isinstance(a, Subscribe):
                    await self._subs.resubscribe(s, a.channel)
                    return Subscribed(a.channel)
        except _STEP_ERRORS as exc:
            status = exc.response.status_code if isinstance(exc, InvalidStatus) else (
                exc.status or None if isinstance(exc, ApiError) else None)
            return StepFailed(step, classify(exc), status, _describe(exc))
        raise TypeError(f"not an I/O action: {a!r}")  # pragma: no cover

    async def _renew_token(self) -> None:
        """Drop the cached token so the next request fetches a new one."""
        try:
            await self._client.tokens.invalidate(await self._client.tokens.token())
        except ConfguardError as exc:
            log.warning("stream_token_renew_failed", error=str(exc))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
