"""The notification stream: channels, subscriptions, WebSockets, watchdog and self-healing.

`StreamManager(client, topics, on_message=..., on_gap=...)` keeps every topic subscribed on
one channel per shard of at most 1000 topics (`daemon.scope.shard`), one WebSocket per
channel, for as long as it runs.

Lifecycle:
- `await start()`: create the channels one after another (Genesys throttles parallel channel
  creation), subscribe each shard with `PUT ...?ignoreErrors=true`, then read the set back
  with `GET`. Any topic that is Rejected (or missing from the read-back) raises
  `SubscriptionError` naming every such topic, its `rejectionReason` and
  `missingPermissions`: a silent hole in compliance coverage is worse than not starting.
  Then one WebSocket per channel is opened.
- `await run()`: returns after `stop()`; raises only if supervision itself failed (a bug),
  and the stream is then not ready. A topic refused when re-subscribing after start (a
  queue deleted, a permission withdrawn) is not fatal, since dropping every topic would be
  worse, but it is loud: logged as an error, listed in `rejected_topics`, and `ready` stays
  False until a later re-subscription (each reconnect/handover, or a reload) succeeds.
- `await stop()`: closes the sockets and deletes the channels' subscriptions (best effort,
  bounded by `stop_timeout` seconds).

Hot path: `on_message(raw, received_at)` is called synchronously for EVERY data frame, with
the frame exactly as received and `clock()` at receipt (epoch seconds). The stream does not
parse call events: the consumer (the engine) parses each frame once. The stream only needs
control messages (heartbeat, pong, socket_closing, `"result": "404"`), so it peeks:
a frame that starts `{"topicName":"v2.routing.queues.` or `{"topicName":"v2.users.` (how
the service lays out call events) is a call event and is not looked at further (~0.1 us);
any other frame of at most `CONTROL_PEEK_MAX` bytes that contains a control marker
(`channel.metadata`, `v2.system.`, `"result"`, `pong`) is parsed with
`daemon.events.parse_message`. So a call event is never parsed twice unless it comes with
another key order, is short and contains a marker, which is harmless (and cheap) anyway.
Every frame, whatever it is, counts as a sign of life for the watchdog.

Self-healing (per shard, one supervisor task each):
- Watchdog: no frame for `heartbeat_timeout_factor x heartbeat_interval` seconds -> send
  `{"message": "ping"}`; no frame at all within `ping_timeout` -> drop the socket and
  reconnect (gap reason `heartbeat_timeout`).
- Reconnect: jittered, capped exponential back-off (`backoff=(initial, max)`). The first
  retry after a healthy connection is immediate. The back-off is NOT reset by a successful
  handshake, only once a connection has proved healthy (a heartbeat arrived, or it stayed
  up `healthy_after` seconds), so a server that accepts and drops at once cannot cause a
  hot loop.
- Before reconnecting to the same channel, `HEAD` checks it still exists. 404 (or a
  `"result": "404"` frame, or a 404 on the WebSocket handshake) -> the channel is gone:
  invalidate the token, create a new channel, re-subscribe (reasons `channel_gone`,
  `channel_expired` when past its expiry, `token_expired` when the token was at fault or a
  401 came back).
- `v2.system.socket_closing` and the channel refresh (`expires - channel_refresh_before`)
  are make-before-break handovers: a NEW channel with the same topics is created,
  subscribed and connected while the old socket still delivers; only then is the old one
  retired (after a short overlap, or its first frame on the new socket). Events seen on both
  are duplicates the state store drops. If the old socket closed before the new one was
  up, events may have been lost, and only then is `on_gap` called.
- After every reconnect or replacement where events may have been missed, `on_gap(reason)`
  is called (after the new socket is up, so a resync it triggers sees the new stream).

`ready` is True when every shard has a live socket, no topic is refused and no gap is open. A gap opens when
`on_gap` is called and is closed by `mark_resynced()` (the daemon calls it after a
completed resync).

`update_topics(new)` (config reload) subscribes added topics (POST to shards with room, new
shards/channels when needed) and re-PUTs shards that lost topics, without touching
unchanged shards or reconnecting anything. It is all or nothing: a refused topic or a
failed request rolls every shard back and raises `SubscriptionError`. Added topics open a
gap (`topics_added`): calls already live on a newly covered queue must be found by a resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TYPE_CHECKING

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from daemon.errors import (
    ApiError,
    ConfguardError,
    NotFoundError,
    StreamError,
    SubscriptionError,
    UnauthorizedError,
)
from daemon.core.events import ChannelGone, Heartbeat, SocketClosing, parse_message
from daemon.core.ids import ChannelId, Topic
from daemon.core.topics import CALL_FRAME_PREFIXES, CALL_FRAME_PREFIXES_BYTES
from daemon.genesys.retry import RetryPolicy
from daemon.genesys.scope import MAX_CHANNELS, MAX_TOPICS_PER_CHANNEL, shard

if TYPE_CHECKING:  # for annotations only: the genesys layer does not import the service
    from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)

CONTROL_PEEK_MAX: Final = 4096
"""Frames longer than this are never control messages (those are a few hundred bytes)."""
_MARKERS_STR: Final = ("channel.metadata", "v2.system.", '"result"', "pong")
_MARKERS_BYTES: Final = tuple(m.encode() for m in _MARKERS_STR)
_CALL_PREFIXES_STR: Final = CALL_FRAME_PREFIXES
_CALL_PREFIXES_BYTES: Final = CALL_FRAME_PREFIXES_BYTES
_PING: Final = '{"message":"ping"}'


# ---------------------------------------------------------------- what the stream needs


class ChannelLike(Protocol):
    @property
    def id(self) -> ChannelId: ...
    @property
    def connect_uri(self) -> str: ...
    @property
    def expires(self) -> float: ...


class TopicStateLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def rejection_reason(self) -> str | None: ...
    @property
    def missing_permissions(self) -> tuple[str, ...]: ...


class TokensLike(Protocol):
    async def token(self) -> str: ...
    async def invalidate(self, token: str) -> None: ...
    @property
    def expires_at(self) -> float | None: ...


class StreamClient(Protocol):
    """The part of `daemon.api.GenesysClient` the stream uses."""

    @property
    def tokens(self) -> TokensLike: ...
    async def create_channel(self) -> ChannelLike: ...
    async def channel_exists(self, channel_id: ChannelId) -> bool: ...
    async def put_subscriptions(self, channel_id: ChannelId, topics: Sequence[str], *,
                                ignore_errors: bool = False) -> Sequence[TopicStateLike]: ...
    async def add_subscriptions(self, channel_id: ChannelId, topics: Sequence[str], *,
                                ignore_errors: bool = False) -> Sequence[TopicStateLike]: ...
    async def get_subscriptions(self, channel_id: ChannelId) -> Sequence[TopicStateLike]: ...
    async def delete_subscriptions(self, channel_id: ChannelId) -> None: ...


# ---------------------------------------------------------------- back-off


RECONNECT_RETRY = RetryPolicy(initial=0.5, factor=2.0, cap=30.0, jitter=0.5)
"""The reconnect back-off (unbounded attempts); `backoff=(initial, cap)` overrides the times."""


class Backoff:
    """A shard's reconnect back-off: `RetryPolicy` delays counted from the last healthy
    connection. `next()` after `reset()` is 0 (retry at once); the k-th after that is
    `policy.delay(k)` (`initial * 2**(k-1)`, capped, drawn uniformly from [d/2, d])."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0,
                 rng: random.Random | None = None, *,
                 policy: RetryPolicy | None = None) -> None:
        self.policy = policy or RECONNECT_RETRY.replace(initial=initial, cap=maximum)
        self.failures = 0
        self._rng = rng or random.Random()

    @property
    def initial(self) -> float:
        return self.policy.initial

    @property
    def maximum(self) -> float:
        return self.policy.cap

    def reset(self) -> None:
        self.failures = 0

    def next(self) -> float:
        n = self.failures
        self.failures += 1
        if n == 0:
            return 0.0
        return self.policy.delay(n, self._rng)


# ---------------------------------------------------------------- per shard / connection


@dataclass(eq=False)
class _Conn:
    shard: _Shard
    channel: ChannelLike
    ws: ClientConnection
    opened: float  # monotonic
    last_frame: float  # monotonic
    refresh_at: float  # epoch (stream clock)
    ping_sent: float | None = None
    healthy: bool = False
    end_reason: str | None = None  # set when this socket has ended (or is being dropped)
    retired: bool = False  # replaced by a handover; its end is expected
    closing_seen: bool = False
    refresh_requested: bool = False
    frames: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

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
class _Shard:
    index: int
    topics: list[Topic]
    channel: ChannelLike | None = None
    current: _Conn | None = None
    backoff: Backoff = field(default_factory=Backoff)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inbox: asyncio.Queue[tuple[str, _Conn]] = field(default_factory=asyncio.Queue)
    supervisor: asyncio.Task[None] | None = None
    dirty: bool = False  # topics changed while disconnected: re-PUT on the reused channel


class StreamManager:
    """See the module docstring for the contract. Times: seconds; `clock` is epoch seconds."""

    def __init__(self, client: StreamClient, topics: Sequence[Topic | str], *,
                 on_message: Callable[[bytes | str, float], None],
                 on_gap: Callable[[str], None],
                 heartbeat_interval: float = 30.0,
                 heartbeat_timeout_factor: float = 2.0,
                 ping_timeout: float | None = None,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 channel_refresh_before: float = 3600.0,
                 backoff: tuple[float, float] = (0.5, 30.0),
                 healthy_after: float = 10.0,
                 handover_overlap: float = 2.0,
                 per_channel: int = MAX_TOPICS_PER_CHANNEL,
                 max_channels: int = MAX_CHANNELS,
                 connect_timeout: float = 10.0,
                 stop_timeout: float = 5.0,
                 max_frame_bytes: int = 16 * 1024 * 1024,
                 start_in_gap: bool = False) -> None:
        self._client: StreamClient = client
        self._topics: list[Topic] = list(dict.fromkeys(Topic(t) for t in topics))
        self._on_message = on_message
        self._on_gap = on_gap
        self.heartbeat_interval = heartbeat_interval
        self.silence_limit = heartbeat_timeout_factor * heartbeat_interval
        self.ping_timeout = ping_timeout if ping_timeout is not None else min(10.0, max(0.2, heartbeat_interval / 2))
        self._metrics = metrics
        self._clock = clock
        self.channel_refresh_before = channel_refresh_before
        self._backoff_cfg = backoff
        self.healthy_after = healthy_after
        self.handover_overlap = handover_overlap
        self.per_channel = per_channel
        self.max_channels = max_channels
        self.connect_timeout = connect_timeout
        self.stop_timeout = stop_timeout
        self.max_frame_bytes = max_frame_bytes
        self._shards: list[_Shard] = []
        self._create_lock = asyncio.Lock()  # channel creation is sequential
        self._update_lock = asyncio.Lock()
        self._bg: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._started = False
        self._fatal: BaseException | None = None
        self._in_gap = start_in_gap
        self._last_gap_at = clock() if start_in_gap else float("-inf")
        self.gap_count = 0
        self._created: dict[str, float] = {}  # channel id -> creation time (stream clock)
        self._rejected: dict[str, str] = {}  # topic -> why, for topics refused after start
        self.connections_opened = 0
        self.connect_attempts = 0
        self.pings_sent = 0
        self.reconnects: dict[str, int] = {}

    # ------------------------------------------------------------------ public API

    @property
    def ready(self) -> bool:
        """Every shard has a live socket, no gap awaits a resync, every topic is subscribed."""
        return (self._started and not self._stopping and self._fatal is None
                and not self._in_gap and not self._rejected and bool(self._shards)
                and all(s.current is not None and s.current.alive for s in self._shards))

    @property
    def rejected_topics(self) -> dict[str, str]:
        """Topics refused on a re-subscription after start (topic -> reason); while any is
        listed the stream is not ready. Each later re-subscription tries them again."""
        return dict(self._rejected)

    @property
    def in_gap(self) -> bool:
        return self._in_gap

    @property
    def topics(self) -> list[Topic]:
        return [t for s in self._shards for t in s.topics]

    @property
    def channels(self) -> list[ChannelId]:
        return [s.channel.id for s in self._shards if s.channel is not None]

    def backoff_failures(self, shard_index: int) -> int:
        """Consecutive unhealthy connection attempts of a shard (0 after a healthy one)."""
        return self._shards[shard_index].backoff.failures

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
        """Create channels, subscribe (all-or-nothing), connect. See the module docstring."""
        if self._started:
            raise StreamError("StreamManager.start() called twice")
        groups = shard(self._topics, self.per_channel, self.max_channels)
        if not groups:
            raise SubscriptionError(
                "nothing to subscribe: subscriptions.queues and subscriptions.users are both "
                "empty; add the queues or users whose calls confguard must watch")
        if len(groups) == self.max_channels:
            log.warning("stream_channel_limit_reached", channels=len(groups),
                        note="every channel slot is in use: a make-before-break handover needs "
                             "one more channel, which makes Genesys retire its least recently "
                             "used one; keep the scope to (max_channels - 1) x per_channel topics")
        rejected: list[TopicStateLike] = []
        shards: list[_Shard] = []
        try:
            for i, topics in enumerate(groups):
                s = _Shard(i, list(topics), backoff=Backoff(*self._backoff_cfg))
                shards.append(s)
                s.channel = await self._create_channel(s)
                rejected += await self._subscribe(s.channel, s.topics)
            if rejected:
                raise _rejection_error(rejected)
            self._shards = shards
            for s in shards:
                await self._connect_initial(s)
        except BaseException:
            await self._cleanup_channels([s.channel for s in shards if s.channel is not None])
            for s in shards:
                if s.current is not None:
                    s.current.abort("startup_failed")
                    for t in s.current.tasks:
                        t.cancel()
            self._shards = []
            raise
        self._started = True
        for s in shards:
            s.supervisor = asyncio.create_task(self._supervise(s), name=f"stream-shard-{s.index}")
        self._update_gauges()
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
        tasks: list[asyncio.Task[Any]] = [s.supervisor for s in self._shards if s.supervisor]
        for s in self._shards:
            if s.current is not None:
                tasks += s.current.tasks
        tasks += list(self._bg)
        for t in tasks:
            if t is not asyncio.current_task():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        async def close_all() -> None:
            conns = [s.current for s in self._shards if s.current is not None]
            await asyncio.gather(*(c.ws.close() for c in conns), return_exceptions=True)
            await self._cleanup_channels([s.channel for s in self._shards if s.channel is not None])

        try:
            await asyncio.wait_for(close_all(), timeout=self.stop_timeout)
        except (TimeoutError, asyncio.TimeoutError):
            log.warning("stream_stop_timeout", seconds=self.stop_timeout)
            for s in self._shards:
                if s.current is not None:
                    s.current.abort("stopped")
        log.info("stream_stopped")
        self._stopped.set()

    async def update_topics(self, new_topics: Sequence[Topic | str]) -> None:
        """Reload: subscribe added topics and unsubscribe dropped ones, without reconnecting.

        Shards that only gain topics get a POST (add); shards that lose some get a PUT of
        their new set; unchanged shards are not touched; topics that fit nowhere get new
        shards (channel + socket). All or nothing: if the new set needs too many channels,
        or a topic is refused, or a request fails, every shard is put back as it was and
        SubscriptionError (naming refused topics) is raised. A shard whose socket is down
        just records its new set; its supervisor subscribes it when reconnecting.
        """
        wanted = list(dict.fromkeys(Topic(t) for t in new_topics))
        if not self._started:
            self._topics = wanted
            return
        async with self._update_lock:
            wanted_set = set(wanted)
            current = set(self.topics)
            added = [t for t in wanted if t not in current]
            removed = current - wanted_set
            if not added and not removed:
                return
            # Plan first, so an impossible plan changes nothing.
            plan: dict[int, list[Topic]] = {}
            rest = list(added)
            for s in self._shards:
                room = self.per_channel - sum(1 for t in s.topics if t not in removed)
                take = rest[:max(0, room)]
                if take:
                    plan[s.index] = take
                    rest = rest[len(take):]
            new_groups = [rest[i:i + self.per_channel] for i in range(0, len(rest), self.per_channel)]
            kept = [s for s in self._shards if any(t not in removed for t in s.topics) or s.index in plan]
            if len(kept) + len(new_groups) > self.max_channels:
                shard(wanted, self.per_channel, self.max_channels)  # raises the clear message
                raise SubscriptionError(
                    f"{len(wanted)} topics would need {len(kept) + len(new_groups)} channels "
                    f"(limit {self.max_channels}) without re-packing; restart confguard to apply")
            before = {s.index: list(s.topics) for s in self._shards}
            touched: list[_Shard] = []
            created: list[_Shard] = []
            emptied: list[_Shard] = []
            rejected: list[TopicStateLike] = []
            try:
                for s in self._shards:
                    lost = [t for t in s.topics if t in removed]
                    gained = plan.get(s.index, [])
                    if not lost and not gained:
                        continue
                    new_set = [t for t in s.topics if t not in removed] + gained
                    if not new_set:
                        emptied.append(s)
                        continue
                    async with s.lock:
                        touched.append(s)
                        if s.channel is None or s.current is None or not s.current.alive:
                            s.topics, s.dirty = new_set, True
                            continue
                        if lost:
                            states = await self._client.put_subscriptions(
                                s.channel.id, list(new_set), ignore_errors=True)
                        else:
                            states = await self._client.add_subscriptions(
                                s.channel.id, list(gained), ignore_errors=True)
                        s.topics = new_set
                        rejected += await self._check(s.channel, new_set, states)
                        log.info("stream_subscriptions_updated", shard=s.index, channel=s.channel.id,
                                 added=len(gained), removed=len(lost), topics=len(new_set))
                for group in new_groups:
                    index = max((x.index for x in [*self._shards, *created]), default=-1) + 1
                    ns = _Shard(index, list(group), backoff=Backoff(*self._backoff_cfg))
                    created.append(ns)
                    ns.channel = await self._create_channel(ns)
                    rejected += await self._subscribe(ns.channel, ns.topics)
                if rejected:
                    raise _rejection_error(rejected)
            except BaseException as exc:
                await self._roll_back(touched, before, created)
                if isinstance(exc, ApiError):
                    raise SubscriptionError(f"subscription update failed, nothing changed: {exc}") from exc
                raise
            for ns in created:
                await self._connect_initial(ns)
                self._shards.append(ns)
                ns.supervisor = asyncio.create_task(self._supervise(ns), name=f"stream-shard-{ns.index}")
            for s in emptied:
                await self._retire_shard(s)
            self._topics = self.topics
            self._update_gauges()
            log.info("stream_topics_updated", added=len(added), removed=len(removed),
                     topics=len(self._topics), shards=len(self._shards))
            if added:
                self._signal_gap("topics_added")

    async def _roll_back(self, touched: Sequence[_Shard], before: dict[int, list[Topic]],
                         created: Sequence[_Shard]) -> None:
        """Put shards back to their topic sets before a failed update (best effort)."""
        for s in touched:
            s.topics = before[s.index]
            if s.channel is not None and s.current is not None and s.current.alive:
                try:
                    await self._client.put_subscriptions(s.channel.id, list(s.topics), ignore_errors=True)
                except ConfguardError as exc:
                    s.dirty = True
                    log.error("stream_rollback_failed", shard=s.index, error=str(exc))
            else:
                s.dirty = True
        await self._cleanup_channels([ns.channel for ns in created if ns.channel is not None])
        for ns in created:
            if ns.channel is not None:
                self._forget_channel(ns.channel.id)


    # ------------------------------------------------------------------ channels

    async def _create_channel(self, s: _Shard) -> ChannelLike:
        async with self._create_lock:
            ch = await self._client.create_channel()
        self._created[ch.id] = self._clock()
        log.info("stream_channel_created", shard=s.index, channel=ch.id,
                 expires_in=round(ch.expires - self._clock(), 1))
        return ch

    async def _subscribe(self, ch: ChannelLike, topics: Sequence[Topic]) -> list[TopicStateLike]:
        """PUT the topics (ignoreErrors) then GET them back; returns the refused ones."""
        states = await self._client.put_subscriptions(ch.id, list(topics), ignore_errors=True)
        bad = await self._check(ch, topics, states)
        log.info("stream_subscribed", channel=ch.id, topics=len(topics), rejected=len(bad))
        return bad

    async def _check(self, ch: ChannelLike, topics: Sequence[Topic],
                     states: Sequence[TopicStateLike]) -> list[TopicStateLike]:
        listed = await self._client.get_subscriptions(ch.id)
        # Matched without regard to case: the service may echo ids in its own spelling.
        bad: dict[str, TopicStateLike] = {}
        permitted: set[str] = set()
        for st in (*states, *listed):
            if st.state.lower() == "rejected":
                bad.setdefault(st.id.casefold(), st)
        for st in listed:
            if st.state.lower() != "rejected":
                permitted.add(st.id.casefold())
        for t in topics:
            key = t.casefold()
            if key not in permitted and key not in bad:
                bad[key] = _Missing(t)
        for st in bad.values():
            log.error("stream_topic_rejected", channel=ch.id, topic=st.id,
                      reason=st.rejection_reason, missing_permissions=list(st.missing_permissions))
        return list(bad.values())

    async def _resubscribe(self, s: _Shard, ch: ChannelLike) -> None:
        """Subscribe a shard's topics after start. A refusal is not fatal (dropping every
        topic would be worse than missing the refused ones) but it is loud: logged as an
        error, listed in `rejected_topics`, and the stream is not ready while it lasts."""
        bad = await self._subscribe(ch, s.topics)
        for t in s.topics:
            self._rejected.pop(t, None)
        for b in bad:
            self._rejected[b.id] = b.rejection_reason or b.state
        if bad:
            log.error("stream_coverage_incomplete", shard=s.index, channel=ch.id,
                      error=str(_rejection_error(bad)))

    def _forget_channel(self, channel_id: str) -> None:
        self._created.pop(channel_id, None)
        if self._metrics is not None:
            with contextlib.suppress(KeyError):  # never had a sample
                self._metrics.channel_age_seconds.remove(channel_id)

    async def _cleanup_channels(self, channels: Sequence[ChannelLike]) -> None:
        for ch in channels:
            try:
                await asyncio.wait_for(self._client.delete_subscriptions(ch.id), timeout=self.stop_timeout)
            except (ConfguardError, TimeoutError, asyncio.TimeoutError, OSError) as exc:
                log.info("stream_unsubscribe_failed", channel=ch.id, error=str(exc) or type(exc).__name__)

    async def _renew_token(self) -> None:
        """Drop the cached token so the next request fetches a new one."""
        try:
            await self._client.tokens.invalidate(await self._client.tokens.token())
        except ConfguardError as exc:
            log.warning("stream_token_renew_failed", error=str(exc))

    # ------------------------------------------------------------------ sockets

    async def _connect(self, s: _Shard, ch: ChannelLike) -> _Conn:
        self.connect_attempts += 1
        ws = await connect(ch.connect_uri, ping_interval=None, open_timeout=self.connect_timeout,
                           close_timeout=2.0, max_size=self.max_frame_bytes,
                           user_agent_header="confguard/0.1")
        mono = time.monotonic()
        now = self._clock()
        refresh_at = ch.expires - self.channel_refresh_before
        if refresh_at <= now + 1.0:
            # A channel that lives less than the refresh margin: replace it half-way.
            refresh_at = now + max(1.0, (ch.expires - now) / 2)
        conn = _Conn(shard=s, channel=ch, ws=ws, opened=mono, last_frame=mono, refresh_at=refresh_at)
        conn.tasks = [asyncio.create_task(self._pump(conn), name=f"stream-pump-{s.index}"),
                      asyncio.create_task(self._watch(conn), name=f"stream-watch-{s.index}")]
        self.connections_opened += 1
        if self._metrics is not None:
            self._metrics.stream_connections.inc()
        log.info("stream_connected", shard=s.index, channel=ch.id, topics=len(s.topics))
        return conn

    async def _connect_initial(self, s: _Shard) -> None:
        assert s.channel is not None
        last: Exception | None = None
        for _ in range(3):
            delay = s.backoff.next()
            if delay:
                await asyncio.sleep(delay)
            try:
                s.current = await self._connect(s, s.channel)
                return
            except (OSError, WebSocketException, TimeoutError, asyncio.TimeoutError) as exc:
                last = exc
                log.warning("stream_connect_failed", shard=s.index, channel=s.channel.id,
                            error=_describe(exc))
        raise StreamError(f"cannot open the notification WebSocket for channel {s.channel.id}: "
                          f"{_describe(last) if last else 'unknown error'}")

    async def _pump(self, conn: _Conn) -> None:
        """Deliver every frame; react to control frames; report the socket's end."""
        ws = conn.ws
        on_message = self._on_message
        clock = self._clock
        monotonic = time.monotonic
        try:
            async for data in ws:
                conn.last_frame = monotonic()
                conn.ping_sent = None
                conn.frames += 1
                try:
                    on_message(data, clock())
                except Exception:  # the consumer's bug must not take the stream down
                    log.exception("stream_on_message_failed", shard=conn.shard.index)
                if _maybe_control(data):
                    self._control(conn, data)
                    if not conn.alive:
                        break
        except ConnectionClosed as exc:
            if conn.end_reason is None:
                conn.end_reason = "closed"
            log.info("stream_socket_closed", shard=conn.shard.index, channel=conn.channel.id,
                     code=exc.rcvd.code if exc.rcvd else None, retired=conn.retired)
        except Exception:  # anything else ends this socket too; the supervisor reconnects
            log.exception("stream_pump_failed", shard=conn.shard.index, channel=conn.channel.id)
            conn.abort("error")
        finally:
            if conn.end_reason is None:
                conn.end_reason = "closed"
            if not conn.retired and not self._stopping:
                conn.shard.inbox.put_nowait(("ended", conn))

    def _control(self, conn: _Conn, data: bytes | str) -> None:
        msg = parse_message(data)
        if isinstance(msg, Heartbeat):
            if not conn.healthy:
                conn.healthy = True
                conn.shard.backoff.reset()
        elif isinstance(msg, SocketClosing):
            if not conn.closing_seen and not conn.retired:
                conn.closing_seen = True
                log.warning("stream_socket_closing", shard=conn.shard.index, channel=conn.channel.id)
                conn.shard.inbox.put_nowait(("socket_closing", conn))
        elif isinstance(msg, ChannelGone):
            log.warning("stream_channel_gone", shard=conn.shard.index, channel=conn.channel.id,
                        message=msg.message)
            conn.abort("channel_gone")

    async def _watch(self, conn: _Conn) -> None:
        """Heartbeat watchdog, health promotion and the channel refresh timer."""
        tick = max(0.05, min(1.0, self.heartbeat_interval / 4, self.ping_timeout / 2))
        while conn.alive and not conn.retired:
            await asyncio.sleep(tick)
            mono = time.monotonic()
            if not conn.healthy and mono - conn.opened >= self.healthy_after:
                conn.healthy = True
                conn.shard.backoff.reset()
            if conn.ping_sent is None:
                if mono - conn.last_frame > self.silence_limit:
                    conn.ping_sent = mono
                    self.pings_sent += 1
                    log.warning("stream_silent_ping", shard=conn.shard.index, channel=conn.channel.id,
                                silent_for=round(mono - conn.last_frame, 2))
                    try:
                        await conn.ws.send(_PING)
                    except (ConnectionClosed, OSError):
                        pass  # the pump sees the close
            elif mono - conn.ping_sent > self.ping_timeout:
                log.warning("stream_heartbeat_timeout", shard=conn.shard.index, channel=conn.channel.id,
                            silent_for=round(mono - conn.last_frame, 2))
                conn.abort("heartbeat_timeout")
                return
            self._set_age(conn.channel)
            if not conn.refresh_requested and self._clock() >= conn.refresh_at:
                conn.refresh_requested = True
                conn.shard.inbox.put_nowait(("refresh", conn))

    # ------------------------------------------------------------------ supervision

    async def _supervise(self, s: _Shard) -> None:
        try:
            while not self._stopping:
                kind, conn = await s.inbox.get()
                if conn is not s.current:
                    continue  # about a socket already replaced
                if kind == "ended":
                    await self._recover(s, conn)
                elif kind == "socket_closing":
                    await self._handover(s, conn, "socket_closing")
                elif kind == "refresh":
                    await self._handover(s, conn, "channel_refresh")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.error("stream_failed", shard=s.index, error=str(exc) or type(exc).__name__)
            self._fatal = exc
            self._stopped.set()
            # Not re-raised: the task's owner is run(), which raises self._fatal.

    async def _recover(self, s: _Shard, lost: _Conn) -> None:
        """Reconnect a shard whose socket ended; new channel when the old one is gone."""
        reason = lost.end_reason or "closed"
        for t in lost.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        log.warning("stream_connection_lost", shard=s.index, channel=lost.channel.id, reason=reason,
                    frames=lost.frames, lived=round(time.monotonic() - lost.opened, 2))
        gap_reason = "heartbeat_timeout" if reason == "heartbeat_timeout" else "reconnect"
        new_channel = reason == "channel_gone"
        if new_channel:
            gap_reason = self._gone_reason(lost.channel)
            await self._renew_token()
        while not self._stopping:
            delay = s.backoff.next()
            if delay:
                log.info("stream_reconnect_wait", shard=s.index, seconds=round(delay, 3))
                await asyncio.sleep(delay)
            try:
                async with s.lock:
                    if new_channel or s.channel is None:
                        old = s.channel
                        s.channel = None
                        ch = await self._create_channel(s)
                        s.channel = ch
                        s.dirty = False
                        if old is not None and old.id != ch.id:
                            self._background(self._cleanup_channels([old]))
                            self._forget_channel(old.id)
                        new_channel = False
                        await self._resubscribe(s, ch)
                    else:
                        try:
                            exists = await self._client.channel_exists(s.channel.id)
                        except UnauthorizedError:
                            gap_reason = "token_expired"
                            await self._renew_token()
                            new_channel = True
                            continue
                        if not exists:
                            gap_reason = self._gone_reason(s.channel)
                            log.warning("stream_channel_missing", shard=s.index, channel=s.channel.id,
                                        reason=gap_reason)
                            await self._renew_token()
                            new_channel = True
                            continue
                        if s.dirty:
                            await self._resubscribe(s, s.channel)
                            s.dirty = False
                    conn = await self._connect(s, s.channel)
            except NotFoundError:
                gap_reason = "channel_gone"
                new_channel = True
                continue
            except UnauthorizedError as exc:
                log.warning("stream_reconnect_unauthorized", shard=s.index, error=str(exc))
                gap_reason = "token_expired"
                await self._renew_token()
                new_channel = True
                continue
            except InvalidStatus as exc:
                status = exc.response.status_code
                log.warning("stream_reconnect_refused", shard=s.index, status=status)
                if status in (401, 403, 404, 410):
                    gap_reason = "channel_gone"
                    new_channel = True
                continue
            except (ApiError, OSError, WebSocketException, TimeoutError, asyncio.TimeoutError) as exc:
                log.warning("stream_reconnect_failed", shard=s.index, error=_describe(exc))
                continue
            s.current = conn
            self._count_reconnect(gap_reason)
            self._update_gauges()
            self._signal_gap(gap_reason)
            return

    async def _handover(self, s: _Shard, old: _Conn, reason: str) -> None:
        """Make-before-break: new channel + socket first, then retire the old one."""
        log.info("stream_handover_start", shard=s.index, channel=old.channel.id, reason=reason)
        ch: ChannelLike | None = None
        try:
            async with s.lock:
                ch = await self._create_channel(s)
                await self._resubscribe(s, ch)
                new = await self._connect(s, ch)
                s.channel = ch
                s.dirty = False
        except (ApiError, OSError, WebSocketException, TimeoutError, asyncio.TimeoutError) as exc:
            log.warning("stream_handover_failed", shard=s.index, reason=reason, error=_describe(exc))
            if ch is not None:
                self._background(self._cleanup_channels([ch]))
                self._forget_channel(ch.id)
            if reason == "channel_refresh" and old.alive:
                old.refresh_requested = False
                old.refresh_at = self._clock() + max(1.0, s.backoff.next())
            # For socket_closing: the old socket's end arrives as "ended" and is recovered.
            return
        gap = not old.alive  # the old socket closed before the new one was up
        old.retired = True
        s.current = new
        self._count_reconnect(reason)
        log.info("stream_handover_done", shard=s.index, old_channel=old.channel.id,
                 new_channel=ch.id, reason=reason, gap=gap)
        self._background(self._retire(old, new))
        self._forget_channel(old.channel.id)
        self._update_gauges()
        if gap:
            self._signal_gap("channel_expired" if reason == "channel_refresh" else reason)

    async def _retire(self, old: _Conn, new: _Conn) -> None:
        """Close a replaced socket after a short overlap, then drop its subscriptions."""
        deadline = time.monotonic() + self.handover_overlap
        while old.alive and new.frames == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in old.tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.ws.close(), timeout=2.0)
        old.abort("retired")
        await self._cleanup_channels([old.channel])

    async def _retire_shard(self, s: _Shard) -> None:
        """A shard lost all its topics (reload): close it."""
        conn, s.current = s.current, None
        if s.supervisor is not None:
            s.supervisor.cancel()
        if conn is not None:
            conn.retired = True
            for t in conn.tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), timeout=2.0)
        if s.channel is not None:
            await self._cleanup_channels([s.channel])
            self._forget_channel(s.channel.id)
        self._shards.remove(s)
        log.info("stream_shard_closed", shard=s.index)

    # ------------------------------------------------------------------ helpers

    def _gone_reason(self, ch: ChannelLike) -> str:
        now = self._clock()
        if ch.expires <= now:
            return "channel_expired"
        expires_at = None
        with contextlib.suppress(Exception):
            expires_at = self._client.tokens.expires_at
        if expires_at is not None and expires_at <= now:
            return "token_expired"
        return "channel_gone"

    def _signal_gap(self, reason: str) -> None:
        self._in_gap = True
        self._last_gap_at = self._clock()
        self.gap_count += 1
        if self._metrics is not None:
            self._metrics.stream_gaps.labels(reason=reason).inc()
        log.warning("stream_gap", reason=reason)
        try:
            self._on_gap(reason)
        except Exception:
            log.exception("stream_on_gap_failed", reason=reason)

    def _count_reconnect(self, reason: str) -> None:
        self.reconnects[reason] = self.reconnects.get(reason, 0) + 1
        if self._metrics is not None:
            self._metrics.reconnects.labels(reason=reason).inc()

    def _update_gauges(self) -> None:
        if self._metrics is None:
            return
        self._metrics.subscribed_topics.set(len(self.topics))
        self._metrics.channels.set(sum(1 for s in self._shards if s.channel is not None))
        for s in self._shards:
            if s.channel is not None:
                self._set_age(s.channel)

    def _set_age(self, ch: ChannelLike) -> None:
        created = self._created.get(ch.id)
        if created is not None and self._metrics is not None:
            self._metrics.channel_age_seconds.labels(channel=str(ch.id)).set(
                max(0.0, self._clock() - created))

    def _background(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)


@dataclass(frozen=True)
class _Missing:
    """A topic absent from the GET read-back (neither Permitted nor Rejected)."""

    id: str
    state: str = "Missing"
    rejection_reason: str | None = "not listed by GET subscriptions after PUT"
    missing_permissions: tuple[str, ...] = ()


def _maybe_control(data: bytes | str) -> bool:
    """Could this frame be a control message? Cheap: a prefix test settles call events as
    the service lays them out (~0.1 us); other frames are scanned for markers only when
    short enough to be control messages."""
    if isinstance(data, str):
        if data.startswith(_CALL_PREFIXES_STR):
            return False
        return len(data) <= CONTROL_PEEK_MAX and any(m in data for m in _MARKERS_STR)
    if data.startswith(_CALL_PREFIXES_BYTES):
        return False
    return len(data) <= CONTROL_PEEK_MAX and any(m in data for m in _MARKERS_BYTES)


def _rejection_error(rejected: Sequence[TopicStateLike]) -> SubscriptionError:
    parts = []
    for st in rejected[:50]:
        perms = ", ".join(st.missing_permissions) or "none named"
        parts.append(f"{st.id} (reason: {st.rejection_reason or 'not given'}; "
                     f"missing permissions: {perms})")
    more = f"; and {len(rejected) - 50} more" if len(rejected) > 50 else ""
    return SubscriptionError(
        f"{len(rejected)} notification topic(s) refused, so their calls would not be watched: "
        + "; ".join(parts) + more
        + ". Fix the queue/user ids in subscriptions or grant the OAuth client's role the "
          "missing permissions.")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
