"""The stream's supervision as a sans-I/O state machine, one per shard.

In the manner of websockets' `protocol.py`: no sockets, no asyncio, no clock of its own.
The connection layer (`daemon.genesys.stream.driver`) feeds each `ShardSupervisor`
what happened, as plain `Event` values, with the time, and carries out the `Action`
values it gets back, in order:

    actions = supervisor.handle(event, now=time.monotonic(), wall=clock())

`now` is monotonic seconds (back-off, watchdog, health); `wall` is the stream's clock,
epoch seconds (channel expiry and refresh). Neither is read by the supervisor itself, so
its tests need neither sockets nor a wall clock.

Events (what the connection layer reports):
- `Begin(channel)`: the shard's channel exists and is subscribed; open its first socket.
- `Opened(conn, channel)`: the `Connect` asked for is up; `conn` is the layer's id for it.
- `FrameSeen(conn)`, or the fast path `note_frame(conn, now)`: any frame arrived (a sign of
  life: the watchdog restarts).
- `Control(conn, kind, message)`: a control frame: `HEARTBEAT`, `SOCKET_CLOSING` or
  `CHANNEL_GONE` (`{"result": "404"}`).
- `Closed(conn, reason)`: a socket ended (`closed`, `error`, or the reason of our `Drop`).
- `Tick()`: timer expiry; the layer ticks at least every `SupervisorSettings.tick` seconds
  and at each `BackOff.until`.
- `ChannelChecked(channel, exists)`, `ChannelCreated(channel)`, `Subscribed(channel)`: a
  `CheckChannel`, `CreateChannel` or `Subscribe` succeeded.
- `StepFailed(step, failure, status, detail)`: one of those (or a `Connect`) raised an
  expected error (API, OS, WebSocket, timeout), classified by `daemon.genesys.retry`.
- `TopicsChanged(topics, subscribed)`: a reload gave the shard a new topic set; when
  `subscribed` is False the channel has not been told yet (the socket was down), so the
  next reconnect re-subscribes.

Every event may carry `token_expires_at` (epoch seconds, or None) where the layer knows it,
so that a channel found gone can be blamed on the token (`token_expired`).

Actions (what the connection layer must do):
- `Connect(channel)`, `CheckChannel(channel)` (HEAD), `CreateChannel()`,
  `Subscribe(channel, topics)` (PUT + GET read-back; a refusal is loud, not fatal): each
  answers with one event above. At most one is in flight per shard, and it is the last
  action of its list. The layer runs each under the shard's lock (shared with reloads)
  and subscribes the shard's topics as they are when the step runs (`topics` is the set
  at decision time; a reload that changed it meanwhile also marked the shard dirty).
- `RenewToken()`: drop the cached token before what follows in the same list.
- `Ping(conn)`; `Drop(conn, reason)`: abort a socket (its `Closed` follows).
- `Promote(conn)`: this socket is now the shard's live one.
- `Retire(old, new)`: make-before-break is done; close `old` after a short overlap (or
  once `new` has delivered a frame) and delete its channel's subscriptions.
- `DiscardChannel(channel)`: a channel no longer used (delete its subscriptions, forget
  its age gauge).
- `BackOff(until, seconds)`: nothing to do until `until` (monotonic); tick then.
- `CountReconnect(reason)`; `DeclareGap(reason)`: events may have been missed, a resync
  must follow.
- `Note(level, event, fields)`: a log line the layer writes as given.
- `GiveUp(message)`: the first socket could not be opened (`max_initial_connects`
  attempts); `start()` raises `StreamError(message)`.

Decisions (unchanged from the asyncio-only version):
- Reconnect back-off: `SupervisorSettings.retry` (`daemon.genesys.retry.RetryPolicy`),
  counted from the last healthy connection: the first retry after a healthy connection is
  immediate; the k-th consecutive one waits `retry.delay(k)`. A connection is healthy once
  a heartbeat arrived or it stayed up `healthy_after` seconds; a handshake alone does not
  reset the back-off (a server that accepts and drops cannot cause a hot loop).
- Watchdog: no frame for `silence_limit` seconds -> `Ping`; still nothing `ping_timeout`
  after it -> `Drop(heartbeat_timeout)`.
- A lost socket: reconnect to the same channel after `CheckChannel`; a new channel (after
  `RenewToken`) when the channel is gone (reason `channel_gone` from a 404 frame, HEAD 404,
  a 404 reply, a WebSocket handshake refused with 401/403/404/410), and `token_expired`
  when a 401 came back. The gap reason is `heartbeat_timeout`, `reconnect`,
  `channel_gone`, `channel_expired` (past the channel's expiry) or `token_expired`.
  A reconnect counts `CountReconnect(gap reason)` and declares the gap after the new
  socket is up (so a resync it triggers sees the new stream).
- `SOCKET_CLOSING` and the channel refresh (`expires - channel_refresh_before`, or half the
  remaining life of a short-lived channel) are make-before-break handovers: create,
  subscribe and connect a new channel while the old socket still delivers, then `Retire`
  the old one. A gap only if the old socket closed before the new one was up
  (`channel_expired` for a refresh, else `socket_closing`). A failed refresh is tried again
  after `max(1 s, next back-off)`; after a failed `socket_closing` handover the old
  socket's end is recovered like any other loss.

`plan_topics()` is the pure half of `StreamManager.update_topics`: which shards gain which
topics (POST), which lose some (PUT of the new set), which are emptied (closed) and which
new shards are needed, or a `SubscriptionError` when the channel limit would be exceeded.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from daemon.core.ids import ChannelId, Topic
from daemon.errors import SubscriptionError
from daemon.genesys.retry import Failure, RetryPolicy
from daemon.genesys.scope import shard as shard_topics

ConnId = int
"""The connection layer's id of one socket (unique within a StreamManager)."""


class ChannelLike(Protocol):
    """A notification channel as the supervisor sees it (`daemon.genesys.api.Channel`)."""

    @property
    def id(self) -> ChannelId: ...
    @property
    def connect_uri(self) -> str: ...
    @property
    def expires(self) -> float: ...


# ---------------------------------------------------------------- settings


RECONNECT_RETRY: Final = RetryPolicy(initial=0.5, factor=2.0, cap=30.0, jitter=0.5)
"""The reconnect back-off (unbounded attempts); `backoff=(initial, cap)` overrides the times."""


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    """Times in seconds. See the module docstring for what each one governs. `tick` is how
    often the connection layer must send `Tick` (the watchdog's resolution)."""

    silence_limit: float = 60.0
    ping_timeout: float = 10.0
    healthy_after: float = 10.0
    channel_refresh_before: float = 3600.0
    retry: RetryPolicy = RECONNECT_RETRY
    max_initial_connects: int = 3
    tick: float = 1.0


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


# ---------------------------------------------------------------- events


class ControlKind(enum.Enum):
    HEARTBEAT = "heartbeat"
    SOCKET_CLOSING = "socket_closing"
    CHANNEL_GONE = "channel_gone"


class IoStep(enum.Enum):
    """The I/O steps whose failure is reported with `StepFailed`."""

    CHECK = "check"  # HEAD the channel
    CREATE = "create"  # POST a channel
    SUBSCRIBE = "subscribe"  # PUT + GET subscriptions
    CONNECT = "connect"  # open the WebSocket


@dataclass(frozen=True, slots=True)
class Begin:
    channel: ChannelLike


@dataclass(frozen=True, slots=True)
class Opened:
    conn: ConnId
    channel: ChannelLike


@dataclass(frozen=True, slots=True)
class FrameSeen:
    conn: ConnId


@dataclass(frozen=True, slots=True)
class Control:
    conn: ConnId
    kind: ControlKind
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Closed:
    conn: ConnId
    reason: str = "closed"
    token_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    pass


@dataclass(frozen=True, slots=True)
class ChannelChecked:
    channel: ChannelLike
    exists: bool
    token_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class ChannelCreated:
    channel: ChannelLike


@dataclass(frozen=True, slots=True)
class Subscribed:
    channel: ChannelLike


@dataclass(frozen=True, slots=True)
class StepFailed:
    step: IoStep
    failure: Failure
    status: int | None = None  # HTTP status of an API error or a refused handshake
    detail: str = ""  # "Type: message", for the log line


@dataclass(frozen=True, slots=True)
class TopicsChanged:
    topics: tuple[Topic, ...]
    subscribed: bool


@dataclass(frozen=True, slots=True)
class Rotate:
    """The client's credentials changed (a reload read new ones): move to a channel created
    with the new token, make-before-break, as for a channel refresh."""


Event = (Begin | Opened | FrameSeen | Control | Closed | Tick | ChannelChecked | ChannelCreated
         | Subscribed | StepFailed | TopicsChanged | Rotate)


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Connect:
    channel: ChannelLike


@dataclass(frozen=True, slots=True)
class CheckChannel:
    channel: ChannelLike


@dataclass(frozen=True, slots=True)
class CreateChannel:
    pass


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: ChannelLike
    topics: tuple[Topic, ...]


@dataclass(frozen=True, slots=True)
class RenewToken:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    conn: ConnId


@dataclass(frozen=True, slots=True)
class Drop:
    conn: ConnId
    reason: str


@dataclass(frozen=True, slots=True)
class Promote:
    conn: ConnId


@dataclass(frozen=True, slots=True)
class Retire:
    old: ConnId
    new: ConnId


@dataclass(frozen=True, slots=True)
class DiscardChannel:
    channel: ChannelLike


@dataclass(frozen=True, slots=True)
class BackOff:
    until: float  # monotonic seconds
    seconds: float


@dataclass(frozen=True, slots=True)
class CountReconnect:
    reason: str


@dataclass(frozen=True, slots=True)
class DeclareGap:
    reason: str


@dataclass(frozen=True, slots=True)
class Note:
    level: str  # "info" | "warning" | "error"
    event: str  # a stable snake_case log event name
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GiveUp:
    message: str


Action = (Connect | CheckChannel | CreateChannel | Subscribe | RenewToken | Ping | Drop | Promote
          | Retire | DiscardChannel | BackOff | CountReconnect | DeclareGap | Note | GiveUp)

IO_ACTIONS: Final = (Connect, CheckChannel, CreateChannel, Subscribe)
"""The actions answered by an event (at most one per `handle` result, and always last)."""


# ---------------------------------------------------------------- the state machine


class Phase(enum.Enum):
    IDLE = "idle"  # before Begin
    CONNECTING = "connecting"  # opening the first socket
    LIVE = "live"  # a socket is up (a handover may be under way)
    RECOVERING = "recovering"  # the socket was lost; backing off or reconnecting
    FAILED = "failed"  # gave up on the first socket


@dataclass(slots=True)
class _Socket:
    """The supervisor's view of one socket. Times: `opened`, `last_frame`, `ping_sent`
    monotonic; `refresh_at` on the stream clock."""

    conn: ConnId
    channel: ChannelLike
    opened: float
    last_frame: float
    refresh_at: float
    ping_sent: float | None = None
    healthy: bool = False
    frames: int = 0
    closing_seen: bool = False
    refresh_requested: bool = False
    drop_reason: str | None = None  # why we dropped it, if we did
    ended: bool = False
    end_reason: str = "closed"
    token_expires_at: float | None = None  # as reported with its end


@dataclass(slots=True)
class _Handover:
    reason: str  # "socket_closing" | "channel_refresh" | "credentials_rotated"
    old: _Socket
    channel: ChannelLike | None = None  # the new channel, once created


class ShardSupervisor:
    """Supervision of one shard (one channel, one socket at a time). See the module
    docstring for the events, the actions and the decisions."""

    def __init__(self, index: int, topics: Sequence[Topic], settings: SupervisorSettings, *,
                 rng: random.Random | None = None) -> None:
        self.index = index
        self.topics: tuple[Topic, ...] = tuple(topics)
        self.settings = settings
        self.phase = Phase.IDLE
        self.channel: ChannelLike | None = None
        self.live: _Socket | None = None
        self.backoff = Backoff(policy=settings.retry, rng=rng)
        self.dirty = False  # topics changed while the channel was not told
        self.wake_at: float | None = None  # monotonic; set while backing off
        self.initial_attempts = 0
        self._handover: _Handover | None = None
        self._pending_handover: str | None = None
        self._rotate_pending = False  # a Rotate came during a handover: rotate after it
        self._in_flight: IoStep | None = None  # the I/O step awaited, if any
        # Recovery state.
        self._gap_reason = "reconnect"
        self._new_channel = False

    # ------------------------------------------------------------------ queries

    @property
    def failures(self) -> int:
        """Consecutive unhealthy connection attempts (0 after a healthy connection)."""
        return self.backoff.failures

    @property
    def busy(self) -> bool:
        """An I/O step is awaited (its answer is the next event that matters)."""
        return self._in_flight is not None

    @property
    def handing_over(self) -> bool:
        return self._handover is not None

    def frames(self, conn: ConnId) -> int:
        """Frames seen on `conn` while it was the live socket (0 if unknown)."""
        live = self.live
        return live.frames if live is not None and live.conn == conn else 0

    # ------------------------------------------------------------------ the hot path

    def note_frame(self, conn: ConnId, now: float) -> None:
        """A frame arrived on `conn` (any frame: a sign of life). Never returns actions."""
        live = self.live
        if live is not None and live.conn == conn:
            live.last_frame = now
            live.ping_sent = None
            live.frames += 1

    # ------------------------------------------------------------------ events

    def handle(self, event: Event, *, now: float, wall: float) -> list[Action]:
        """Take one event; return the actions to carry out, in order."""
        if isinstance(event, FrameSeen):
            self.note_frame(event.conn, now)
            return []
        if isinstance(event, Tick):
            return self._tick(now, wall)
        if isinstance(event, Control):
            return self._control(event, now, wall)
        if isinstance(event, Closed):
            return self._closed(event, now, wall)
        if isinstance(event, Opened):
            return self._opened(event, now, wall)
        if isinstance(event, ChannelChecked):
            return self._checked(event, now, wall)
        if isinstance(event, ChannelCreated):
            return self._created(event)
        if isinstance(event, Subscribed):
            return self._subscribed(event)
        if isinstance(event, StepFailed):
            return self._failed(event, now, wall)
        if isinstance(event, TopicsChanged):
            return self._topics_changed(event)
        if isinstance(event, Rotate):
            return self._rotate()
        if isinstance(event, Begin):
            return self._begin(event)
        raise TypeError(f"not a supervisor event: {event!r}")  # pragma: no cover

    # ------------------------------------------------------------------ start

    def _begin(self, event: Begin) -> list[Action]:
        self.channel = event.channel
        self.phase = Phase.CONNECTING
        self.initial_attempts = 0
        return self._initial_attempt(now=None)

    def _initial_attempt(self, now: float | None) -> list[Action]:
        assert self.channel is not None
        delay = self._next_delay()
        self.initial_attempts += 1
        if delay and now is not None:
            return self._back_off(now, delay, note=False)
        return [self._io(IoStep.CONNECT, Connect(self.channel))]

    # ------------------------------------------------------------------ timers

    def _tick(self, now: float, wall: float) -> list[Action]:
        if self.wake_at is not None:
            if now < self.wake_at:
                return []
            self.wake_at = None
            if self.phase is Phase.CONNECTING:
                assert self.channel is not None
                return [self._io(IoStep.CONNECT, Connect(self.channel))]
            if self.phase is Phase.RECOVERING:
                return self._attempt()
            return []
        live = self.live
        if live is None or live.ended or live.drop_reason is not None:
            return []
        out: list[Action] = []
        s = self.settings
        if not live.healthy and now - live.opened >= s.healthy_after:
            self._healthy(live)
        if live.ping_sent is None:
            if now - live.last_frame > s.silence_limit:
                live.ping_sent = now
                out.append(Note("warning", "stream_silent_ping",
                                self._ids(live, silent_for=round(now - live.last_frame, 2))))
                out.append(Ping(live.conn))
        elif now - live.ping_sent > s.ping_timeout:
            out.append(Note("warning", "stream_heartbeat_timeout",
                            self._ids(live, silent_for=round(now - live.last_frame, 2))))
            live.drop_reason = "heartbeat_timeout"
            out.append(Drop(live.conn, "heartbeat_timeout"))
            return out
        if not live.refresh_requested and wall >= live.refresh_at:
            live.refresh_requested = True
            out += self._start_handover("channel_refresh")
        return out

    # ------------------------------------------------------------------ frames

    def _control(self, event: Control, now: float, wall: float) -> list[Action]:
        live = self.live
        if live is None or live.conn != event.conn:
            return []
        if event.kind is ControlKind.HEARTBEAT:
            if not live.healthy:
                self._healthy(live)
            return []
        if event.kind is ControlKind.SOCKET_CLOSING:
            if live.closing_seen:
                return []
            live.closing_seen = True
            return [Note("warning", "stream_socket_closing", self._ids(live)),
                    *self._start_handover("socket_closing")]
        # CHANNEL_GONE
        if live.drop_reason is not None or live.ended:
            return []
        live.drop_reason = "channel_gone"
        return [Note("warning", "stream_channel_gone", self._ids(live, message=event.message)),
                Drop(live.conn, "channel_gone")]

    def _healthy(self, live: _Socket) -> None:
        live.healthy = True
        self.backoff.reset()

    # ------------------------------------------------------------------ loss and recovery

    def _closed(self, event: Closed, now: float, wall: float) -> list[Action]:
        live = self.live
        if live is None or live.conn != event.conn or live.ended:
            return []  # about a socket already replaced
        live.ended = True
        live.end_reason = live.drop_reason or event.reason
        live.token_expires_at = event.token_expires_at
        if self._handover is not None:
            return []  # decided when the handover ends
        return self._lost(live, now, wall)

    def _lost(self, lost: _Socket, now: float, wall: float) -> list[Action]:
        reason = lost.end_reason
        out: list[Action] = [Note("warning", "stream_connection_lost", self._ids(
            lost, reason=reason, frames=lost.frames, lived=round(now - lost.opened, 2)))]
        self.live = None
        self.phase = Phase.RECOVERING
        if self._in_flight is IoStep.SUBSCRIBE:  # it may not have landed: subscribe again
            self.dirty = True
        self._in_flight = None
        self._gap_reason = "heartbeat_timeout" if reason == "heartbeat_timeout" else "reconnect"
        self._new_channel = reason == "channel_gone"
        if self._new_channel:
            self._gap_reason = gone_reason(lost.channel, wall, lost.token_expires_at)
            out.append(RenewToken())
        out += self._retry(now)
        return out

    def _retry(self, now: float) -> list[Action]:
        """The next reconnect attempt, after the back-off delay."""
        delay = self._next_delay()
        if delay:
            return self._back_off(now, delay, note=True)
        return self._attempt()

    def _back_off(self, now: float, delay: float, *, note: bool) -> list[Action]:
        self.wake_at = now + delay
        out: list[Action] = []
        if note:
            out.append(Note("info", "stream_reconnect_wait",
                            {"shard": self.index, "seconds": round(delay, 3)}))
        out.append(BackOff(self.wake_at, delay))
        return out

    def _attempt(self) -> list[Action]:
        if self._new_channel or self.channel is None:
            return [self._io(IoStep.CREATE, CreateChannel())]
        return [self._io(IoStep.CHECK, CheckChannel(self.channel))]

    def _checked(self, event: ChannelChecked, now: float, wall: float) -> list[Action]:
        if self._in_flight is not IoStep.CHECK or self.phase is not Phase.RECOVERING:
            return []
        self._in_flight = None
        if not event.exists:
            self._gap_reason = gone_reason(event.channel, wall, event.token_expires_at)
            self._new_channel = True
            return [Note("warning", "stream_channel_missing",
                         {"shard": self.index, "channel": event.channel.id,
                          "reason": self._gap_reason}),
                    RenewToken(), *self._retry(now)]
        if self.dirty:
            return [self._subscribe(event.channel)]
        return [self._io(IoStep.CONNECT, Connect(event.channel))]

    def _created(self, event: ChannelCreated) -> list[Action]:
        if self._in_flight is not IoStep.CREATE:
            return []
        self._in_flight = None
        ch = event.channel
        if self._handover is not None:
            self._handover.channel = ch
            return [self._subscribe(ch)]
        out: list[Action] = []
        old, self.channel = self.channel, ch
        if old is not None and old.id != ch.id:
            out.append(DiscardChannel(old))
        self._new_channel = False
        out.append(self._subscribe(ch))
        return out

    def _subscribed(self, event: Subscribed) -> list[Action]:
        if self._in_flight is not IoStep.SUBSCRIBE:
            return []
        self._in_flight = None
        if self._handover is None and self.phase is Phase.LIVE:
            # A re-subscription of the live channel (the topics changed meanwhile).
            return self._start_pending()
        return [self._io(IoStep.CONNECT, Connect(event.channel))]

    def _opened(self, event: Opened, now: float, wall: float) -> list[Action]:
        if self._in_flight is not IoStep.CONNECT:
            return [Drop(event.conn, "unexpected")]  # pragma: no cover - layer bug guard
        self._in_flight = None
        sock = _Socket(conn=event.conn, channel=event.channel, opened=now, last_frame=now,
                       refresh_at=self._refresh_at(event.channel, wall))
        if self._handover is not None:
            return self._handover_done(sock)
        initial = self.phase is Phase.CONNECTING
        self.live = sock
        self.channel = event.channel
        self.phase = Phase.LIVE
        out: list[Action] = [Promote(event.conn)]
        if not initial:
            out += [CountReconnect(self._gap_reason), DeclareGap(self._gap_reason)]
        if self.dirty:  # the topics changed while this socket was being opened
            out.append(self._subscribe(event.channel))
        return out

    def _refresh_at(self, ch: ChannelLike, wall: float) -> float:
        refresh_at = ch.expires - self.settings.channel_refresh_before
        if refresh_at <= wall + 1.0:
            # A channel that lives less than the refresh margin: replace it half-way.
            refresh_at = wall + max(1.0, (ch.expires - wall) / 2)
        return refresh_at

    def _failed(self, event: StepFailed, now: float, wall: float) -> list[Action]:
        if self._in_flight is not event.step:
            return []
        self._in_flight = None
        if self._handover is not None:
            return self._handover_failed(event, now, wall)
        if self.phase is Phase.CONNECTING:
            assert self.channel is not None
            out: list[Action] = [Note("warning", "stream_connect_failed",
                                      {"shard": self.index, "channel": self.channel.id,
                                       "error": event.detail})]
            if self.initial_attempts >= self.settings.max_initial_connects:
                self.phase = Phase.FAILED
                out.append(GiveUp(f"cannot open the notification WebSocket for channel "
                                  f"{self.channel.id}: {event.detail or 'unknown error'}"))
                return out
            return out + self._initial_attempt(now)
        if self.phase is Phase.LIVE:
            # A re-subscription of the live channel failed: the next reconnect tries again.
            self.dirty = True
            return [Note("error", "stream_resubscribe_failed",
                         {"shard": self.index, "error": event.detail}), *self._start_pending()]
        if self.phase is not Phase.RECOVERING:
            return []
        out = []
        if event.step is IoStep.CHECK and event.failure is Failure.AUTH:
            self._gap_reason = "token_expired"
            self._new_channel = True
            out.append(RenewToken())
        elif event.failure is Failure.GONE:
            if event.step is IoStep.CONNECT:
                out.append(Note("warning", "stream_reconnect_refused",
                                {"shard": self.index, "status": event.status}))
            self._gap_reason = "channel_gone"
            self._new_channel = True
        elif event.failure is Failure.AUTH:
            out.append(Note("warning", "stream_reconnect_unauthorized",
                            {"shard": self.index, "error": event.detail}))
            self._gap_reason = "token_expired"
            self._new_channel = True
            out.append(RenewToken())
        elif event.step is IoStep.CONNECT and event.status is not None:
            out.append(Note("warning", "stream_reconnect_refused",
                            {"shard": self.index, "status": event.status}))
        else:
            out.append(Note("warning", "stream_reconnect_failed",
                            {"shard": self.index, "error": event.detail}))
        return out + self._retry(now)

    # ------------------------------------------------------------------ handover

    def _start_handover(self, reason: str) -> list[Action]:
        live = self.live
        if live is None:
            return []
        if self._handover is not None or self._in_flight is not None:
            self._pending_handover = self._pending_handover or reason
            return []
        self._handover = _Handover(reason, live)
        return [Note("info", "stream_handover_start", self._ids(live, reason=reason)),
                self._io(IoStep.CREATE, CreateChannel())]

    def _handover_done(self, new: _Socket) -> list[Action]:
        h = self._handover
        assert h is not None and h.channel is not None
        self._handover = None
        old = h.old
        gap = old.ended  # the old socket closed before the new one was up
        self.live = new
        self.channel = h.channel
        self.phase = Phase.LIVE
        self._pending_handover = None
        out: list[Action] = [
            Promote(new.conn),
            CountReconnect(h.reason),
            Note("info", "stream_handover_done",
                 {"shard": self.index, "old_channel": old.channel.id,
                  "new_channel": h.channel.id, "reason": h.reason, "gap": gap}),
            Retire(old.conn, new.conn),
        ]
        if gap:
            out.append(DeclareGap("channel_expired" if h.reason == "channel_refresh" else h.reason))
        if self.dirty:  # a reload changed the topics after the new channel was subscribed
            out.append(self._subscribe(h.channel))
        return out + self._after_handover()

    def _rotate(self) -> list[Action]:
        """New credentials: the live channel belongs to the old client, so hand over to a
        new one (the handover creates it with the new token); while no socket is live, the
        next attempt creates a new channel instead of reusing the old one."""
        live = self.live
        if live is None or live.ended or self.phase is not Phase.LIVE:
            self._new_channel = True
            return []
        if self._handover is not None:
            self._rotate_pending = True  # that handover's channel may be the old client's
            return []
        if self._in_flight is not None:
            self._pending_handover = "credentials_rotated"
            return []
        return self._start_handover("credentials_rotated")

    def _after_handover(self) -> list[Action]:
        if not self._rotate_pending:
            return []
        self._rotate_pending = False
        return self._start_handover("credentials_rotated")

    def _handover_failed(self, event: StepFailed, now: float, wall: float) -> list[Action]:
        h = self._handover
        assert h is not None
        self._handover = None
        out: list[Action] = [Note("warning", "stream_handover_failed",
                                  {"shard": self.index, "reason": h.reason,
                                   "error": event.detail})]
        if h.channel is not None:
            out.append(DiscardChannel(h.channel))
        old = h.old
        if old.ended:
            # The old socket ended meanwhile: recover it like any other loss.
            self._pending_handover = None
            return out + self._lost(old, now, wall)
        if h.reason == "channel_refresh":
            old.refresh_requested = False
            old.refresh_at = wall + max(1.0, self._next_delay())
        if self._pending_handover == h.reason:
            self._pending_handover = None
        if self._rotate_pending:
            self._rotate_pending = False
            self._pending_handover = "credentials_rotated"
        # For socket_closing: the old socket's end arrives as Closed and is recovered.
        return out + self._start_pending()

    def _start_pending(self) -> list[Action]:
        pending, self._pending_handover = self._pending_handover, None
        if pending is None or self.live is None or self.live.ended:
            return []
        return self._start_handover(pending)

    # ------------------------------------------------------------------ reload

    def _topics_changed(self, event: TopicsChanged) -> list[Action]:
        self.topics = tuple(event.topics)
        # Only the live channel was told: a channel being set up (handover, reconnect)
        # was subscribed with the old set and must be told again.
        if not event.subscribed or self.phase is not Phase.LIVE or self._handover is not None:
            self.dirty = True
        return []

    # ------------------------------------------------------------------ helpers

    def _subscribe(self, ch: ChannelLike) -> Action:
        self.dirty = False  # this Subscribe carries the current set
        return self._io(IoStep.SUBSCRIBE, Subscribe(ch, self.topics))

    def _io(self, step: IoStep, action: Action) -> Action:
        self._in_flight = step
        return action

    def _next_delay(self) -> float:
        return self.backoff.next()

    def _ids(self, sock: _Socket, **fields: Any) -> dict[str, Any]:
        return {"shard": self.index, "channel": sock.channel.id, **fields}


def gone_reason(ch: ChannelLike, wall: float, token_expires_at: float | None) -> str:
    """Why a channel is gone: `channel_expired` past its expiry, `token_expired` when the
    token it was made with has expired, else `channel_gone`."""
    if ch.expires <= wall:
        return "channel_expired"
    if token_expires_at is not None and token_expires_at <= wall:
        return "token_expired"
    return "channel_gone"


# ---------------------------------------------------------------- reload planning


@dataclass(frozen=True, slots=True)
class ShardChange:
    """One existing shard's part of a reload: its new topic set, what it gains and loses.
    Subscribed with a PUT of `new_topics` when it `lost` any, else a POST of `gained`; an
    empty `new_topics` closes the shard."""

    index: int
    new_topics: tuple[Topic, ...]
    gained: tuple[Topic, ...]
    lost: tuple[Topic, ...]

    @property
    def closes(self) -> bool:
        return not self.new_topics


@dataclass(frozen=True, slots=True)
class TopicPlan:
    added: tuple[Topic, ...]
    removed: frozenset[Topic]
    changes: tuple[ShardChange, ...]  # only shards that change
    new_shards: tuple[tuple[Topic, ...], ...]  # topic sets of shards to open

    @property
    def empty(self) -> bool:
        return not self.added and not self.removed

    @property
    def gap(self) -> bool:
        """Added topics open a gap: calls already live on them must be found by a resync."""
        return bool(self.added)


def plan_topics(shards: Sequence[tuple[int, Sequence[Topic]]], wanted: Sequence[Topic], *,
                per_channel: int, max_channels: int) -> TopicPlan:
    """Plan a reload from the shards' current topic sets (index, topics) to `wanted`.

    Added topics fill shards with room first (in shard order), then new shards of at most
    `per_channel`; unchanged shards are left alone; nothing is re-packed. Raises
    SubscriptionError when the result would need more than `max_channels` channels."""
    wanted = list(dict.fromkeys(wanted))
    wanted_set = set(wanted)
    current = {t for _, topics in shards for t in topics}
    added = [t for t in wanted if t not in current]
    removed = frozenset(current - wanted_set)
    if not added and not removed:
        return TopicPlan((), frozenset(), (), ())
    take_for: dict[int, list[Topic]] = {}
    rest = list(added)
    for index, topics in shards:
        room = per_channel - sum(1 for t in topics if t not in removed)
        take = rest[:max(0, room)]
        if take:
            take_for[index] = take
            rest = rest[len(take):]
    new_groups = [tuple(rest[i:i + per_channel]) for i in range(0, len(rest), per_channel)]
    kept = [i for i, topics in shards if any(t not in removed for t in topics) or i in take_for]
    if len(kept) + len(new_groups) > max_channels:
        shard_topics(wanted, per_channel, max_channels)  # raises the clear message
        raise SubscriptionError(
            f"{len(wanted)} topics would need {len(kept) + len(new_groups)} channels "
            f"(limit {max_channels}) without re-packing; restart confguard to apply")
    changes = []
    for index, topics in shards:
        lost = tuple(t for t in topics if t in removed)
        gained = tuple(take_for.get(index, ()))
        if not lost and not gained:
            continue
        new_set = tuple(t for t in topics if t not in removed) + gained
        changes.append(ShardChange(index, new_set, gained, lost))
    return TopicPlan(tuple(added), removed, tuple(changes), tuple(new_groups))
