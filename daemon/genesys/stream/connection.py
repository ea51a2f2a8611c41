"""`StreamManager`, the notification stream's public face (its contract is the package
docstring, `daemon.genesys.stream`). It puts together the parts, each its own module:

- `settings.StreamSettings`: every timing and limit, one value;
- `subscriptions.Subscriptions`: channels, subscribing with read-back, re-subscribing,
  unsubscribing, channel ages, a reload's update with roll-back;
- `driver.Driver`: one task per shard feeding its sans-I/O `ShardSupervisor`
  (`daemon.genesys.stream.supervisor`) and carrying out its actions;
- `pump.Sockets`: the WebSockets and their pump tasks (frames to `on_message`, control
  messages from what it returns to the supervisor).

Here: start (all or nothing), run, stop (bounded), `update_topics`, readiness, the gap
state, and the counters and gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from daemon.core.events import Message
from daemon.core.ids import ChannelId, Topic
from daemon.errors import StreamError, SubscriptionError
from daemon.genesys.scope import shard
from daemon.genesys.stream.driver import Driver
from daemon.genesys.stream.pump import Shard, Sockets
from daemon.genesys.stream.settings import StreamSettings
from daemon.genesys.stream.subscriptions import (StreamClient, Subscriptions, TopicStateLike,
                                                 rejection_error)
from daemon.genesys.stream.supervisor import Rotate, plan_topics

if TYPE_CHECKING:  # for annotations only: the genesys layer does not import the service
    from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)


class StreamManager:
    """See the package docstring for the contract. `settings`: a `StreamSettings` (times
    in seconds); `clock`: epoch seconds; `start_in_gap`: a gap is open from the start (the
    daemon closes it after its first resync)."""

    def __init__(self, client: StreamClient, topics: Sequence[Topic | str], *,
                 on_message: Callable[[bytes | str, float], Message],
                 on_gap: Callable[[str], None],
                 settings: StreamSettings | None = None,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 start_in_gap: bool = False) -> None:
        self.settings = settings if settings is not None else StreamSettings()
        self._topics: list[Topic] = list(dict.fromkeys(Topic(t) for t in topics))
        self._on_gap = on_gap
        self._metrics = metrics
        self._clock = clock
        self._subs = Subscriptions(client, stop_timeout=self.settings.stop_timeout,
                                   metrics=metrics, clock=clock)
        self._sockets = Sockets(self.settings, on_message=on_message, stopping=lambda: self._stopping,
                                token_expires_at=self._subs.token_expires_at, metrics=metrics,
                                clock=clock)
        self._driver = Driver(client, self.settings.supervisor(), self._subs, self._sockets, self,
                              clock=clock)
        self._shards: list[Shard] = []
        self._update_lock = asyncio.Lock()
        self._bg: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._started = False
        self._fatal: BaseException | None = None
        self._in_gap = start_in_gap
        self._last_gap_at = clock() if start_in_gap else float("-inf")
        self.reconnects: dict[str, int] = {}

    # ------------------------------------------------------------------ public API

    @property
    def ready(self) -> bool:
        """Every shard has a live socket, no gap awaits a resync, every topic is subscribed."""
        return (self._started and not self._stopping and self._fatal is None
                and not self._in_gap and not self._subs.rejected and bool(self._shards)
                and all(s.live for s in self._shards))

    @property
    def rejected_topics(self) -> dict[str, str]:
        """Topics refused on a re-subscription after start (topic -> reason); while any is
        listed the stream is not ready. Each later re-subscription tries them again."""
        return self._subs.rejected

    @property
    def topics(self) -> list[Topic]:
        return [t for s in self._shards for t in s.topics]

    @property
    def channels(self) -> list[ChannelId]:
        return [s.channel.id for s in self._shards if s.channel is not None]

    @property
    def connections_opened(self) -> int:
        return self._sockets.connections_opened

    @property
    def pings_sent(self) -> int:
        return self._sockets.pings_sent

    def backoff_failures(self, shard_index: int) -> int:
        """Consecutive unhealthy connection attempts of a shard (0 after a healthy one)."""
        return self._shards[shard_index].sup.failures

    def mark_resynced(self, started_at: float | None = None) -> None:
        """A resync completed: close the gap. With `started_at` (the resync's start on this
        stream's clock), a gap opened after that start stays open."""
        if started_at is not None and self._last_gap_at > started_at:
            log.info("stream_gap_still_open", started_at=started_at, last_gap_at=self._last_gap_at)
            return
        if self._in_gap:
            log.info("stream_gap_closed")
        self._in_gap = False

    async def start(self) -> None:
        """Create channels, subscribe (all-or-nothing), connect. See the package docstring."""
        if self._started:
            raise StreamError("StreamManager.start() called twice")
        settings = self.settings
        groups = shard(self._topics, settings.per_channel, settings.max_channels)
        if not groups:
            raise SubscriptionError(
                "nothing to subscribe: subscriptions.queues and subscriptions.users are both "
                "empty; add the queues or users whose calls confguard must watch")
        if len(groups) == settings.max_channels:
            log.warning("stream_channel_limit_reached", channels=len(groups),
                        note="every channel slot is in use: a make-before-break handover needs "
                             "one more channel, which makes Genesys retire its least recently "
                             "used one; keep the scope to (max_channels - 1) x per_channel topics")
        rejected: list[TopicStateLike] = []
        shards: list[Shard] = []
        made = []
        try:
            for i, topics in enumerate(groups):
                s = self._driver.new_shard(i, topics)
                shards.append(s)
                ch = await self._subs.create_channel(s.index)
                made.append(ch)
                rejected += await self._subs.subscribe(ch, s.topics)
            if rejected:
                raise rejection_error(rejected)
            self._shards = shards
            for s, ch in zip(shards, made):
                await self._driver.connect_initial(s, ch)
        except BaseException:
            await self._subs.cleanup(made)
            for s in shards:
                s.halt("startup_failed")
            self._shards = []
            raise
        self._started = True
        for s in shards:
            self._driver.start(s, lambda: self._stopping)
        self.update_gauges()
        log.info("stream_started", shards=len(shards), topics=len(self._topics))

    async def run(self) -> None:
        """Until `stop()`. Raises what made the stream unable to keep coverage."""
        await self._stopped.wait()
        if self._fatal is not None:
            raise self._fatal

    async def stop(self) -> None:
        """Close sockets, delete subscriptions (best effort, bounded)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        tasks: list[asyncio.Task[Any]] = []
        for s in self._shards:
            tasks += [t for t in (s.driver, s.ops) if t is not None]
            tasks += [c.pump for c in s.conns.values() if c.pump is not None]
        tasks += list(self._bg)
        for t in tasks:
            if t is not asyncio.current_task():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        async def close_all() -> None:
            conns = [s.current for s in self._shards if s.current is not None]
            await asyncio.gather(*(c.ws.close() for c in conns), return_exceptions=True)
            await self._subs.cleanup([s.channel for s in self._shards if s.channel is not None])

        try:
            await asyncio.wait_for(close_all(), timeout=self.settings.stop_timeout)
        except (TimeoutError, asyncio.TimeoutError):
            log.warning("stream_stop_timeout", seconds=self.settings.stop_timeout)
            for s in self._shards:
                if s.current is not None:
                    s.current.abort("stopped")
        log.info("stream_stopped")
        self._stopped.set()

    def rotate_channels(self) -> None:
        """The client's credentials changed: every shard moves to a channel created with the
        new token, make-before-break (no gap when the handover succeeds)."""
        log.info("stream_rotating_channels", shards=len(self._shards))
        for s in list(self._shards):
            self._driver.tell(s, Rotate())

    async def update_topics(self, new_topics: Sequence[Topic | str]) -> None:
        """Reload: subscribe added topics and unsubscribe dropped ones, without reconnecting
        (`Subscriptions.update`: all or nothing, SubscriptionError naming refused topics).
        New shards are connected, emptied ones closed; added topics open a gap."""
        wanted = list(dict.fromkeys(Topic(t) for t in new_topics))
        if not self._started:
            self._topics = wanted
            return
        async with self._update_lock:
            plan = plan_topics([(s.index, s.topics) for s in self._shards], wanted,
                               per_channel=self.settings.per_channel,
                               max_channels=self.settings.max_channels)
            if plan.empty:
                return
            done = await self._subs.update(self._shards, plan, tell=self._driver.tell,
                                           new_shard=self._driver.new_shard)
            for ns, channel in done.created:
                await self._driver.connect_initial(ns, channel)
                self._shards.append(ns)
                self._driver.start(ns, lambda: self._stopping)
            for s in done.emptied:
                await self._retire_shard(s)
            self._topics = self.topics
            self.update_gauges()
            log.info("stream_topics_updated", added=len(plan.added), removed=len(plan.removed),
                     topics=len(self._topics), shards=len(self._shards))
            if plan.gap:
                self.signal_gap("topics_added")

    async def _retire_shard(self, s: Shard) -> None:
        """A shard lost all its topics (reload): close it."""
        conn, s.current = s.current, None
        s.halt("retired")
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), timeout=2.0)
        if s.channel is not None:
            await self._subs.cleanup([s.channel])
            self._subs.forget(s.channel.id)
        self._shards.remove(s)
        log.info("stream_shard_closed", shard=s.index)

    # ------------------------------------------------------------------ DriverHost

    def signal_gap(self, reason: str) -> None:
        self._in_gap = True
        self._last_gap_at = self._clock()
        if self._metrics is not None:
            self._metrics.stream_gaps.labels(reason=reason).inc()
        log.warning("stream_gap", reason=reason)
        try:
            self._on_gap(reason)
        except Exception:
            log.exception("stream_on_gap_failed", reason=reason)

    def count_reconnect(self, reason: str) -> None:
        self.reconnects[reason] = self.reconnects.get(reason, 0) + 1
        if self._metrics is not None:
            self._metrics.reconnects.labels(reason=reason).inc()

    def update_gauges(self) -> None:
        if self._metrics is None:
            return
        self._metrics.subscribed_topics.set(len(self.topics))
        self._metrics.channels.set(sum(1 for s in self._shards if s.channel is not None))
        for s in self._shards:
            if s.channel is not None:
                self._subs.set_age(s.channel)

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def failed(self, exc: BaseException) -> None:
        """A shard's driver failed (a bug): supervision cannot go on; `run()` raises it."""
        self._fatal = exc
        self._stopped.set()
