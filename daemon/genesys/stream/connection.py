"""The stream's thin asyncio layer: channels, subscriptions, WebSockets, and the loop that
feeds each shard's `ShardSupervisor` (`daemon.genesys.stream.supervisor`) and carries out
its actions. The contract of `StreamManager` is in the package docstring
(`daemon.genesys.stream`); every reconnect, handover, watchdog and gap decision is the
supervisor's.

Per shard: one driver task (`_drive`) takes events from the shard's inbox (or a `Tick`
every `SupervisorSettings.tick` seconds, and at each back-off deadline), hands them to the
supervisor and runs the actions it returns: bookkeeping at once, the one I/O step
(HEAD / create / subscribe / connect) as a task that posts its answer to the inbox. One
pump task per socket delivers every frame to `on_message`, reports the control messages
among what it returns (the frame parsed once, by the consumer) and the socket's end. A reload (`update_topics`) plans with `plan_topics` and tells each
supervisor its new topic set (`TopicsChanged`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from daemon.core.events import ChannelGone, Heartbeat, Message, SocketClosing
from daemon.core.ids import ChannelId, Topic
from daemon.errors import ApiError, ConfguardError, StreamError, SubscriptionError
from daemon.genesys.retry import RetryPolicy, classify
from daemon.genesys.scope import MAX_CHANNELS, MAX_TOPICS_PER_CHANNEL, shard
from daemon.genesys.stream.supervisor import (
    IO_ACTIONS,
    Rotate,
    RECONNECT_RETRY,
    Action,
    Begin,
    ChannelChecked,
    ChannelCreated,
    ChannelLike,
    CheckChannel,
    Closed,
    Connect,
    Control,
    ControlKind,
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
    TopicsChanged,
    plan_topics,
)

if TYPE_CHECKING:  # for annotations only: the genesys layer does not import the service
    from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)

#: The parsed messages (what `on_message` returns) the shard's supervisor is told about.
_CONTROL_KINDS: Final[dict[type, ControlKind]] = {
    Heartbeat: ControlKind.HEARTBEAT, SocketClosing: ControlKind.SOCKET_CLOSING,
    ChannelGone: ControlKind.CHANNEL_GONE}
_PING: Final = '{"message":"ping"}'

# The errors an I/O step may meet and the supervisor decides about; anything else is a bug.
_STEP_ERRORS: Final = (ApiError, OSError, WebSocketException, TimeoutError, asyncio.TimeoutError)


# ---------------------------------------------------------------- what the stream needs


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
    """The part of `daemon.genesys.api.GenesysClient` the stream uses."""

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


# ---------------------------------------------------------------- per shard / connection


@dataclass(eq=False)
class _Conn:
    id: int
    shard: _Shard
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
class _Shard:
    sup: ShardSupervisor
    current: _Conn | None = None
    conns: dict[int, _Conn] = field(default_factory=dict)  # open sockets, by id
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


class StreamManager:
    """See the package docstring for the contract. Times: seconds; `clock` is epoch seconds.

    `backoff=(initial, cap)` sets the reconnect back-off's times; `retry`, when given,
    replaces the whole `RetryPolicy` (its `max_attempts` is ignored: reconnects never stop)."""

    def __init__(self, client: StreamClient, topics: Sequence[Topic | str], *,
                 on_message: Callable[[bytes | str, float], Message],
                 on_gap: Callable[[str], None],
                 heartbeat_interval: float = 30.0,
                 heartbeat_timeout_factor: float = 2.0,
                 ping_timeout: float | None = None,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 channel_refresh_before: float = 3600.0,
                 backoff: tuple[float, float] = (0.5, 30.0),
                 retry: RetryPolicy | None = None,
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
        policy = retry or RECONNECT_RETRY.replace(initial=backoff[0], cap=backoff[1])
        self.settings = SupervisorSettings(
            silence_limit=self.silence_limit, ping_timeout=self.ping_timeout,
            healthy_after=healthy_after, channel_refresh_before=channel_refresh_before,
            retry=policy.replace(max_attempts=None),
            tick=max(0.05, min(1.0, heartbeat_interval / 4, self.ping_timeout / 2)))
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
        self._conn_ids = itertools.count(1)
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
                and all(s.live for s in self._shards))

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
        made: list[ChannelLike] = []
        try:
            for i, topics in enumerate(groups):
                s = self._new_shard(i, topics)
                shards.append(s)
                ch = await self._create_channel(s)
                made.append(ch)
                rejected += await self._subscribe(ch, s.topics)
            if rejected:
                raise _rejection_error(rejected)
            self._shards = shards
            for s, ch in zip(shards, made):
                await self._connect_initial(s, ch)
        except BaseException:
            await self._cleanup_channels(made)
            for s in shards:
                self._halt_shard(s, "startup_failed")
            self._shards = []
            raise
        self._started = True
        for s in shards:
            self._start_driver(s)
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

    def rotate_channels(self) -> None:
        """The client's credentials changed: every shard moves to a channel created with the
        new token, make-before-break (no gap when the handover succeeds)."""
        log.info("stream_rotating_channels", shards=len(self._shards))
        for s in list(self._shards):
            self._tell(s, Rotate())

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
            plan = plan_topics([(s.index, s.topics) for s in self._shards], wanted,
                               per_channel=self.per_channel, max_channels=self.max_channels)
            if plan.empty:
                return
            by_index = {s.index: s for s in self._shards}
            before = {s.index: s.topics for s in self._shards}
            touched: list[_Shard] = []
            created: list[_Shard] = []
            emptied: list[_Shard] = []
            rejected: list[TopicStateLike] = []
            try:
                for change in plan.changes:
                    s = by_index[change.index]
                    if change.closes:
                        emptied.append(s)
                        continue
                    new_set = list(change.new_topics)
                    async with s.lock:
                        touched.append(s)
                        ch = s.channel
                        if ch is None or not s.live:
                            self._tell(s, TopicsChanged(change.new_topics, subscribed=False))
                            continue
                        if change.lost:
                            states = await self._client.put_subscriptions(
                                ch.id, new_set, ignore_errors=True)
                        else:
                            states = await self._client.add_subscriptions(
                                ch.id, list(change.gained), ignore_errors=True)
                        self._tell(s, TopicsChanged(change.new_topics, subscribed=True))
                        rejected += await self._check(ch, new_set, states)
                        log.info("stream_subscriptions_updated", shard=s.index, channel=ch.id,
                                 added=len(change.gained), removed=len(change.lost),
                                 topics=len(new_set))
                for group in plan.new_shards:
                    index = max((x.index for x in [*self._shards, *created]), default=-1) + 1
                    ns = self._new_shard(index, group)
                    created.append(ns)
                    ch = await self._create_channel(ns)
                    ns.sup.channel = ch  # for the roll-back; Begin sets it again
                    rejected += await self._subscribe(ch, ns.topics)
                if rejected:
                    raise _rejection_error(rejected)
            except BaseException as exc:
                await self._roll_back(touched, before, created)
                if isinstance(exc, ApiError):
                    raise SubscriptionError(f"subscription update failed, nothing changed: {exc}") from exc
                raise
            for ns in created:
                assert ns.channel is not None
                await self._connect_initial(ns, ns.channel)
                self._shards.append(ns)
                self._start_driver(ns)
            for s in emptied:
                await self._retire_shard(s)
            self._topics = self.topics
            self._update_gauges()
            log.info("stream_topics_updated", added=len(plan.added), removed=len(plan.removed),
                     topics=len(self._topics), shards=len(self._shards))
            if plan.gap:
                self._signal_gap("topics_added")

    async def _roll_back(self, touched: Sequence[_Shard], before: dict[int, tuple[Topic, ...]],
                         created: Sequence[_Shard]) -> None:
        """Put shards back to their topic sets before a failed update (best effort)."""
        for s in touched:
            old = before[s.index]
            ok = False
            ch = s.channel
            if ch is not None and s.live:
                try:
                    await self._client.put_subscriptions(ch.id, list(old), ignore_errors=True)
                    ok = True
                except ConfguardError as exc:
                    log.error("stream_rollback_failed", shard=s.index, error=str(exc))
            self._tell(s, TopicsChanged(old, subscribed=ok))
        await self._cleanup_channels([ns.channel for ns in created if ns.channel is not None])
        for ns in created:
            if ns.channel is not None:
                self._forget_channel(ns.channel.id)

    # ------------------------------------------------------------------ driving supervisors

    def _new_shard(self, index: int, topics: Sequence[Topic]) -> _Shard:
        return _Shard(ShardSupervisor(index, topics, self.settings))

    def _start_driver(self, s: _Shard) -> None:
        s.driver = asyncio.create_task(self._supervise(s), name=f"stream-shard-{s.index}")

    async def _connect_initial(self, s: _Shard, ch: ChannelLike) -> None:
        """Open a new shard's first socket (the supervisor's attempts and back-off)."""
        self._tell(s, Begin(ch))
        await self._drive(s, lambda: s.current is not None or s.gave_up is not None)
        if s.gave_up is not None:
            raise StreamError(s.gave_up)

    async def _supervise(self, s: _Shard) -> None:
        try:
            await self._drive(s, lambda: self._stopping)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.error("stream_failed", shard=s.index, error=str(exc) or type(exc).__name__)
            self._fatal = exc
            self._stopped.set()
            # Not re-raised: the task's owner is run(), which raises self._fatal.

    async def _drive(self, s: _Shard, done: Callable[[], bool]) -> None:
        """Feed the supervisor events (and ticks) until `done()`; raises a step's bug."""
        tick = self.settings.tick
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
                self._tell(s, event)
            now = time.monotonic()
            if event is None or now >= next_tick or (s.sup.wake_at is not None and now >= s.sup.wake_at):
                next_tick = now + tick
                self._tell(s, Tick())
                if s.current is not None and s.current.alive and s.channel is not None:
                    self._set_age(s.channel)

    def _tell(self, s: _Shard, event: Event) -> None:
        """Hand one event to the shard's supervisor and carry out what it returns."""
        self._act(s, s.sup.handle(event, now=time.monotonic(), wall=self._clock()))

    def _act(self, s: _Shard, actions: list[Action]) -> None:
        chain: list[Action] = []
        promoted: _Conn | None = None
        for a in actions:
            if isinstance(a, (RenewToken, *IO_ACTIONS)):
                chain.append(a)
            elif isinstance(a, Note):
                getattr(log, a.level)(a.event, **a.fields)
            elif isinstance(a, Promote):
                s.current = promoted = s.conns[a.conn]
                self._update_gauges()
            elif isinstance(a, CountReconnect):
                self._count_reconnect(a.reason)
            elif isinstance(a, DeclareGap):
                self._signal_gap(a.reason)
            elif isinstance(a, Drop):
                conn = s.conns.get(a.conn)
                if conn is not None:
                    conn.abort(a.reason)
            elif isinstance(a, Ping):
                conn = s.conns.get(a.conn)
                if conn is not None:
                    self.pings_sent += 1
                    self._background(self._ping(conn))
            elif isinstance(a, Retire):
                old, new = s.conns.get(a.old), s.conns.get(a.new)
                if old is not None and new is not None:
                    old.retired = True
                    self._forget_channel(old.channel.id)
                    self._background(self._retire(old, new))
            elif isinstance(a, DiscardChannel):
                self._background(self._cleanup_channels([a.channel]))
                self._forget_channel(a.channel.id)
            elif isinstance(a, GiveUp):
                s.gave_up = a.message
            # BackOff: the driver wakes at `sup.wake_at`.
        if promoted is not None:  # forget sockets lost before this one (retiring ones stay)
            for cid, c in list(s.conns.items()):
                if c is not promoted and not c.alive and not c.retired:
                    del s.conns[cid]
        if chain:
            previous = s.ops
            s.ops = asyncio.create_task(self._run_chain(s, chain, previous),
                                        name=f"stream-step-{s.index}")

    async def _run_chain(self, s: _Shard, chain: list[Action],
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

    async def _step(self, s: _Shard, a: Action) -> Event:
        step = _STEP_OF[type(a)]
        try:
            async with s.lock:
                if isinstance(a, Connect):
                    conn = await self._connect(s, a.channel)
                    return Opened(conn.id, a.channel)
                if isinstance(a, CheckChannel):
                    exists = await self._client.channel_exists(a.channel.id)
                    return ChannelChecked(a.channel, exists, self._token_expires_at())
                if isinstance(a, CreateChannel):
                    return ChannelCreated(await self._create_channel(s))
                if isinstance(a, Subscribe):
                    await self._resubscribe(s, a.channel)
                    return Subscribed(a.channel)
        except _STEP_ERRORS as exc:
            status = exc.response.status_code if isinstance(exc, InvalidStatus) else (
                exc.status or None if isinstance(exc, ApiError) else None)
            return StepFailed(step, classify(exc), status, _describe(exc))
        raise TypeError(f"not an I/O action: {a!r}")  # pragma: no cover

    def _halt_shard(self, s: _Shard, reason: str) -> None:
        for t in (s.driver, s.ops):
            if t is not None and t is not asyncio.current_task():
                t.cancel()
        for c in list(s.conns.values()):
            c.retired = True
            c.abort(reason)
            if c.pump is not None:
                c.pump.cancel()

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
        """Subscribe a shard's topics (as they are now) after start. A refusal is not fatal
        (dropping every topic would be worse than missing the refused ones) but it is loud:
        logged as an error, listed in `rejected_topics`, and the stream is not ready while
        it lasts."""
        topics = s.topics
        bad = await self._subscribe(ch, topics)
        for t in topics:
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

    def _token_expires_at(self) -> float | None:
        with contextlib.suppress(Exception):
            return self._client.tokens.expires_at
        return None

    # ------------------------------------------------------------------ sockets

    async def _connect(self, s: _Shard, ch: ChannelLike) -> _Conn:
        self.connect_attempts += 1
        ws = await connect(ch.connect_uri, ping_interval=None, open_timeout=self.connect_timeout,
                           close_timeout=2.0, max_size=self.max_frame_bytes,
                           user_agent_header="confguard/0.1")
        conn = _Conn(id=next(self._conn_ids), shard=s, channel=ch, ws=ws,
                     log=log.bind(shard=s.index, channel=ch.id))
        s.conns[conn.id] = conn
        conn.pump = asyncio.create_task(self._pump(conn), name=f"stream-pump-{s.index}")
        self.connections_opened += 1
        if self._metrics is not None:
            self._metrics.stream_connections.inc()
        conn.log.info("stream_connected", topics=len(s.topics))
        return conn

    async def _pump(self, conn: _Conn) -> None:
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
            if not conn.retired and not self._stopping:
                conn.shard.inbox.put_nowait(
                    Closed(conn.id, conn.end_reason, self._token_expires_at()))

    async def _ping(self, conn: _Conn) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):  # the pump sees the close
            await conn.ws.send(_PING)

    async def _retire(self, old: _Conn, new: _Conn) -> None:
        """Close a replaced socket after a short overlap, then drop its subscriptions."""
        sup = new.shard.sup
        deadline = time.monotonic() + self.handover_overlap
        while old.alive and sup.frames(new.id) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if old.pump is not None:
            old.pump.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.ws.close(), timeout=2.0)
        old.abort("retired")
        old.shard.conns.pop(old.id, None)
        await self._cleanup_channels([old.channel])

    async def _retire_shard(self, s: _Shard) -> None:
        """A shard lost all its topics (reload): close it."""
        conn, s.current = s.current, None
        self._halt_shard(s, "retired")
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), timeout=2.0)
        if s.channel is not None:
            await self._cleanup_channels([s.channel])
            self._forget_channel(s.channel.id)
        self._shards.remove(s)
        log.info("stream_shard_closed", shard=s.index)

    # ------------------------------------------------------------------ gaps and gauges

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


_STEP_OF: Final[dict[type, IoStep]] = {Connect: IoStep.CONNECT, CheckChannel: IoStep.CHECK,
                                     CreateChannel: IoStep.CREATE, Subscribe: IoStep.SUBSCRIBE}


@dataclass(frozen=True)
class _Missing:
    """A topic absent from the GET read-back (neither Permitted nor Rejected)."""

    id: str
    state: str = "Missing"
    rejection_reason: str | None = "not listed by GET subscriptions after PUT"
    missing_permissions: tuple[str, ...] = ()


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
