"""The stream supervisor as a state machine: events and times in, actions out. No sockets,
no event loop, no wall clock: every time below is a number the test chooses."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from daemon.core.ids import ChannelId, Topic
from daemon.errors import SubscriptionError
from daemon.genesys.retry import Failure, RetryPolicy
from daemon.genesys.stream.supervisor import (
    Action,
    BackOff,
    Begin,
    ChannelChecked,
    ChannelCreated,
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
    FrameSeen,
    GiveUp,
    Note,
    Opened,
    Phase,
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
    gone_reason,
    plan_topics,
)

T = TypeVar("T")
TOPICS = (Topic("v2.routing.queues.q1.conversations.calls"),)
DAY = 86400.0


@dataclass(frozen=True)
class Ch:
    id: ChannelId
    connect_uri: str
    expires: float


def ch(name: str, expires: float = DAY) -> Ch:
    return Ch(ChannelId(name), f"ws://127.0.0.1/{name}", expires)


class Harness:
    """One supervisor and a test-controlled clock: `now` (monotonic) and `wall` (epoch)."""

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("silence_limit", 4.0)
        settings.setdefault("ping_timeout", 1.0)
        settings.setdefault("healthy_after", 10.0)
        settings.setdefault("channel_refresh_before", 3600.0)
        settings.setdefault("retry", RetryPolicy(initial=0.5, cap=8.0))
        self.sup = ShardSupervisor(0, TOPICS, SupervisorSettings(**settings),
                                   rng=random.Random(42))
        self.now = 1000.0
        self.wall = 0.0
        self.next_conn = 1

    def __call__(self, event: Event) -> list[Action]:
        return self.sup.handle(event, now=self.now, wall=self.wall)

    def advance(self, seconds: float) -> list[Action]:
        self.now += seconds
        self.wall += seconds
        return self(Tick())

    def open(self, channel: Ch) -> tuple[int, list[Action]]:
        conn = self.next_conn
        self.next_conn += 1
        return conn, self(Opened(conn, channel))

    def start(self, channel: Ch | None = None, *, healthy: bool = True) -> int:
        """Open the first socket; `healthy`: a heartbeat arrives on it (so the back-off is
        reset and the first retry after a loss is immediate)."""
        channel = channel or ch("c1")
        assert self(Begin(channel)) == [Connect(channel)]
        conn, out = self.open(channel)
        assert out == [Promote(conn)]
        if healthy:
            assert self(Control(conn, ControlKind.HEARTBEAT)) == []
        return conn


def only(actions: list[Action], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


def notes(actions: list[Action]) -> list[str]:
    return [a.event for a in only(actions, Note)]


def without_notes(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Note)]


# ---------------------------------------------------------------- first socket


def test_first_socket_opens_without_gap() -> None:
    h = Harness()
    h.start()
    assert h.sup.phase is Phase.LIVE and h.sup.live is not None


def test_first_socket_gives_up_after_three_attempts_with_back_off() -> None:
    h = Harness()
    c = ch("c1")
    assert h(Begin(c)) == [Connect(c)]
    out = h(StepFailed(IoStep.CONNECT, Failure.TRANSIENT, None, "OSError: refused"))
    assert notes(out) == ["stream_connect_failed"]
    (wait,) = only(out, BackOff)
    assert 0.25 <= wait.seconds <= 0.5
    assert h.advance(wait.seconds / 2) == []  # not yet
    assert h.advance(wait.seconds) == [Connect(c)]
    out = h(StepFailed(IoStep.CONNECT, Failure.TRANSIENT, None, "OSError: refused"))
    (wait,) = only(out, BackOff)
    assert h.advance(wait.seconds) == [Connect(c)]
    out = h(StepFailed(IoStep.CONNECT, Failure.TRANSIENT, None, "OSError: refused"))
    (give_up,) = only(out, GiveUp)
    assert "c1" in give_up.message and "OSError: refused" in give_up.message
    assert h.sup.phase is Phase.FAILED


# ---------------------------------------------------------------- watchdog


def test_silence_pings_then_times_out_and_reconnects_with_gap() -> None:
    h = Harness()
    conn = h.start()
    assert h.advance(3.0) == []
    out = h.advance(1.5)  # 4.5 s of silence > 4 s
    assert only(out, Ping) == [Ping(conn)] and notes(out) == ["stream_silent_ping"]
    assert h.advance(0.5) == []  # the ping has 1 s
    out = h.advance(0.6)
    assert only(out, Drop) == [Drop(conn, "heartbeat_timeout")]
    assert notes(out) == ["stream_heartbeat_timeout"]
    assert h.advance(1.0) == []  # nothing more about a socket being dropped
    out = h(Closed(conn, "closed"))
    assert notes(out)[0] == "stream_connection_lost"
    assert without_notes(out) == [CheckChannel(ch("c1"))]  # first retry is immediate
    out = h(ChannelChecked(ch("c1"), True))
    assert out == [Connect(ch("c1"))]
    conn2, out = h.open(ch("c1"))
    assert out == [Promote(conn2), CountReconnect("heartbeat_timeout"),
                   DeclareGap("heartbeat_timeout")]


def test_any_frame_restarts_the_watchdog_and_answers_a_ping() -> None:
    h = Harness()
    conn = h.start()
    out = h.advance(4.5)
    assert only(out, Ping)
    h.sup.note_frame(conn, h.now)  # the pong (or anything)
    assert h.advance(0.9) == [] and h.advance(0.9) == []
    assert h(FrameSeen(conn)) == []
    assert h.advance(3.5) == []


def test_frames_of_an_old_socket_are_ignored() -> None:
    h = Harness()
    conn = h.start()
    assert h(Control(conn + 99, ControlKind.SOCKET_CLOSING)) == []
    assert h(Closed(conn + 99)) == []
    assert h.sup.live is not None and h.sup.live.conn == conn


# ---------------------------------------------------------------- back-off and health


def lose(h: Harness, conn: int) -> list[Action]:
    return h(Closed(conn, "closed"))


def test_accept_and_drop_backs_off_instead_of_spinning() -> None:
    h = Harness()
    conn = h.start(healthy=False)  # the first attempt used the immediate slot
    delays = []
    for _ in range(6):
        out = lose(h, conn)
        (wait,) = only(out, BackOff)
        delays.append(wait.seconds)
        assert h.advance(wait.seconds) == [CheckChannel(ch("c1"))]
        assert h(ChannelChecked(ch("c1"), True)) == [Connect(ch("c1"))]
        conn, _ = h.open(ch("c1"))  # handshake done, then dropped at once
    for k, d in enumerate(delays, start=1):
        ceiling = min(8.0, 0.5 * 2 ** (k - 1))
        assert ceiling / 2 <= d <= ceiling
    assert h.sup.failures == 7


def test_a_heartbeat_proves_health_and_resets_the_back_off() -> None:
    h = Harness()
    conn = h.start()
    out = lose(h, conn)
    assert without_notes(out) == [CheckChannel(ch("c1"))]
    h(ChannelChecked(ch("c1"), True))
    conn, _ = h.open(ch("c1"))
    assert h(Control(conn, ControlKind.HEARTBEAT)) == []
    assert h.sup.failures == 0
    assert without_notes(lose(h, conn)) == [CheckChannel(ch("c1"))]  # immediate again


def test_staying_up_long_enough_proves_health() -> None:
    h = Harness(silence_limit=100.0)
    h.start(healthy=False)
    assert h.sup.failures == 1
    h.advance(9.0)
    assert h.sup.failures == 1
    h.advance(10.0)
    assert h.sup.failures == 0


# ---------------------------------------------------------------- a channel gone


def test_channel_gone_frame_makes_a_new_channel_after_renewing_the_token() -> None:
    h = Harness()
    conn = h.start()
    out = h(Control(conn, ControlKind.CHANNEL_GONE, "channel is gone"))
    assert notes(out) == ["stream_channel_gone"] and only(out, Drop) == [Drop(conn, "channel_gone")]
    out = h(Closed(conn, "closed"))  # the drop's reason wins over the pump's
    assert without_notes(out) == [RenewToken(), CreateChannel()]
    out = h(ChannelCreated(ch("c2")))
    assert out == [DiscardChannel(ch("c1")), Subscribe(ch("c2"), TOPICS)]
    assert h(Subscribed(ch("c2"))) == [Connect(ch("c2"))]
    conn2, out = h.open(ch("c2"))
    assert out == [Promote(conn2), CountReconnect("channel_gone"), DeclareGap("channel_gone")]
    assert h.sup.channel == ch("c2")


@pytest.mark.parametrize(("expires", "token_expires_at", "reason"), [
    (50.0, None, "channel_expired"),  # wall is 100
    (DAY, 90.0, "token_expired"),
    (DAY, 200.0, "channel_gone"),
    (DAY, None, "channel_gone"),
])
def test_why_a_channel_is_gone(expires: float, token_expires_at: float | None, reason: str) -> None:
    assert gone_reason(ch("c", expires), 100.0, token_expires_at) == reason


def test_head_404_on_reconnect_means_a_new_channel() -> None:
    h = Harness()
    conn = h.start()
    lose(h, conn)
    out = h(ChannelChecked(ch("c1"), False))
    assert notes(out) == ["stream_channel_missing", "stream_reconnect_wait"]
    # Each attempt moves the back-off on, as before: this one waits.
    assert RenewToken() in out
    (wait,) = only(out, BackOff)
    assert h.advance(wait.seconds) == [CreateChannel()]
    h(ChannelCreated(ch("c2")))
    h(Subscribed(ch("c2")))
    conn2, out = h.open(ch("c2"))
    assert DeclareGap("channel_gone") in out


def test_head_401_means_token_expired_and_a_new_channel() -> None:
    h = Harness()
    conn = h.start()
    lose(h, conn)
    out = h(StepFailed(IoStep.CHECK, Failure.AUTH, 401, "UnauthorizedError: x"))
    assert RenewToken() in out and notes(out) == ["stream_reconnect_wait"]
    (wait,) = only(out, BackOff)
    assert h.advance(wait.seconds) == [CreateChannel()]
    h(ChannelCreated(ch("c2")))
    h(Subscribed(ch("c2")))
    _, out = h.open(ch("c2"))
    assert only(out, DeclareGap) == [DeclareGap("token_expired")]


@pytest.mark.parametrize(("failure", "status", "note", "new_channel", "gap"), [
    (Failure.GONE, 404, "stream_reconnect_refused", True, "channel_gone"),
    (Failure.TRANSIENT, 503, "stream_reconnect_refused", False, "reconnect"),
    (Failure.TRANSIENT, None, "stream_reconnect_failed", False, "reconnect"),
])
def test_refused_handshakes(failure: Failure, status: int | None, note: str, new_channel: bool,
                            gap: str) -> None:
    h = Harness()
    conn = h.start()
    lose(h, conn)
    assert h(ChannelChecked(ch("c1"), True)) == [Connect(ch("c1"))]
    out = h(StepFailed(IoStep.CONNECT, failure, status, "InvalidStatus: x"))
    assert notes(out)[0] == note
    (wait,) = only(out, BackOff)
    nxt = h.advance(wait.seconds)
    assert nxt == ([CreateChannel()] if new_channel else [CheckChannel(ch("c1"))])
    if new_channel:
        h(ChannelCreated(ch("c2")))
        h(Subscribed(ch("c2")))
        _, out = h.open(ch("c2"))
    else:
        h(ChannelChecked(ch("c1"), True))
        _, out = h.open(ch("c1"))
    assert only(out, DeclareGap) == [DeclareGap(gap)]


def test_unauthorized_while_creating_renews_the_token_and_retries() -> None:
    h = Harness()
    conn = h.start()
    h(Control(conn, ControlKind.CHANNEL_GONE))
    h(Closed(conn))
    out = h(StepFailed(IoStep.CREATE, Failure.AUTH, 401, "UnauthorizedError: refused"))
    assert "stream_reconnect_unauthorized" in notes(out) and RenewToken() in out
    (wait,) = only(out, BackOff)
    assert h.advance(wait.seconds) == [CreateChannel()]


# ---------------------------------------------------------------- handovers


def test_socket_closing_is_make_before_break_without_gap() -> None:
    h = Harness()
    old = h.start()
    out = h(Control(old, ControlKind.SOCKET_CLOSING))
    assert notes(out) == ["stream_socket_closing", "stream_handover_start"]
    assert without_notes(out) == [CreateChannel()]
    assert h(Control(old, ControlKind.SOCKET_CLOSING)) == []  # once
    assert h(ChannelCreated(ch("c2"))) == [Subscribe(ch("c2"), TOPICS)]
    assert h(Subscribed(ch("c2"))) == [Connect(ch("c2"))]
    new, out = h.open(ch("c2"))
    assert without_notes(out) == [Promote(new), CountReconnect("socket_closing"), Retire(old, new)]
    assert notes(out) == ["stream_handover_done"]
    assert h(Closed(old)) == []  # the retired socket's end is expected


def test_old_socket_closing_first_is_a_gap() -> None:
    h = Harness()
    old = h.start()
    h(Control(old, ControlKind.SOCKET_CLOSING))
    h(ChannelCreated(ch("c2")))
    assert h(Closed(old)) == []  # decided when the handover ends
    h(Subscribed(ch("c2")))
    new, out = h.open(ch("c2"))
    assert DeclareGap("socket_closing") in out and Retire(old, new) in out


def test_failed_socket_closing_handover_recovers_when_the_old_socket_ends() -> None:
    h = Harness()
    old = h.start()
    h(Control(old, ControlKind.SOCKET_CLOSING))
    out = h(StepFailed(IoStep.CREATE, Failure.TRANSIENT, 503, "ServerError: x"))
    assert notes(out) == ["stream_handover_failed"] and without_notes(out) == []
    out = h(Closed(old))
    assert without_notes(out) == [CheckChannel(ch("c1"))]


def test_handover_failing_after_the_old_socket_ended_recovers_at_once() -> None:
    h = Harness()
    old = h.start()
    h(Control(old, ControlKind.SOCKET_CLOSING))
    h(ChannelCreated(ch("c2")))
    h(Closed(old, "error"))
    out = h(StepFailed(IoStep.SUBSCRIBE, Failure.TRANSIENT, 500, "ServerError: x"))
    assert notes(out)[:2] == ["stream_handover_failed", "stream_connection_lost"]
    assert DiscardChannel(ch("c2")) in out and CheckChannel(ch("c1")) in out


def test_channel_refresh_before_expiry_and_retry_after_failure() -> None:
    h = Harness(channel_refresh_before=100.0, silence_limit=1e9)
    old = h.start(ch("c1", expires=1000.0))  # wall 0: refresh at 900
    h.wall = 899.0
    assert h(Tick()) == []
    h.wall = 900.0
    out = h(Tick())
    assert without_notes(out) == [CreateChannel()] and notes(out) == ["stream_handover_start"]
    assert not only(h(Tick()), CreateChannel)  # once
    out = h(StepFailed(IoStep.CREATE, Failure.TRANSIENT, 503, "ServerError: x"))
    assert notes(out) == ["stream_handover_failed"]
    h.wall += 0.9
    assert h(Tick()) == []  # tried again later (at least 1 s), not at once
    h.wall += 30.0
    assert only(h(Tick()), CreateChannel) == [CreateChannel()]
    h(ChannelCreated(ch("c2", expires=5000.0)))
    h(Subscribed(ch("c2", expires=5000.0)))
    new, out = h.open(ch("c2", expires=5000.0))
    assert CountReconnect("channel_refresh") in out and not only(out, DeclareGap)
    assert Retire(old, new) in out


def test_short_lived_channel_is_refreshed_half_way() -> None:
    h = Harness(channel_refresh_before=3600.0)
    h.wall = 0.0
    h.start(ch("c1", expires=10.0))
    h.now += 4.9
    h.wall = 4.9
    assert not only(h(Tick()), CreateChannel)
    h.now += 0.2
    h.wall = 5.1
    assert only(h(Tick()), CreateChannel)


# ---------------------------------------------------------------- reloads


def test_topics_changed_while_down_are_subscribed_on_reconnect() -> None:
    h = Harness()
    conn = h.start()
    lose(h, conn)
    more = TOPICS + (Topic("v2.users.u1.conversations.calls"),)
    assert h(TopicsChanged(more, subscribed=False)) == []
    assert h(ChannelChecked(ch("c1"), True)) == [Subscribe(ch("c1"), more)]
    assert h(Subscribed(ch("c1"))) == [Connect(ch("c1"))]
    _, out = h.open(ch("c1"))
    assert not only(out, Subscribe)


def test_topics_changed_during_a_handover_reach_the_new_channel() -> None:
    h = Harness()
    old = h.start()
    h(Control(old, ControlKind.SOCKET_CLOSING))
    h(ChannelCreated(ch("c2")))  # subscribed with the old set
    more = TOPICS + (Topic("v2.users.u1.conversations.calls"),)
    assert h(TopicsChanged(more, subscribed=True)) == []  # only the old channel was told
    h(Subscribed(ch("c2")))
    new, out = h.open(ch("c2"))
    assert out[-1] == Subscribe(ch("c2"), more)
    assert h(Subscribed(ch("c2"))) == []


def test_topics_changed_on_a_live_channel_need_nothing_more() -> None:
    h = Harness()
    h.start()
    assert h(TopicsChanged(TOPICS, subscribed=True)) == []
    assert not h.sup.dirty


def test_plan_fills_room_then_opens_shards_and_closes_emptied_ones() -> None:
    t = [Topic(f"v2.users.u{i}.conversations.calls") for i in range(7)]
    plan = plan_topics([(0, t[0:3]), (1, t[3:4])], [t[0], t[1], t[3], t[4], t[5], t[6]],
                       per_channel=3, max_channels=3)
    assert plan.added == (t[4], t[5], t[6]) and plan.removed == {t[2]}
    by_index = {c.index: c for c in plan.changes}
    assert by_index[0].new_topics == (t[0], t[1], t[4]) and by_index[0].lost == (t[2],)
    assert by_index[1].new_topics == (t[3], t[5], t[6]) and by_index[1].gained == (t[5], t[6])
    assert plan.new_shards == () and plan.gap

    plan = plan_topics([(0, t[0:1]), (1, t[1:2])], [t[0], t[2], t[3], t[4], t[5]],
                       per_channel=2, max_channels=3)
    by_index = {c.index: c for c in plan.changes}
    assert by_index[1].closes is False and by_index[1].new_topics == (t[3], t[4])
    assert plan.new_shards == ((t[5],),)

    plan = plan_topics([(0, t[0:1]), (1, t[1:2])], [t[0]], per_channel=2, max_channels=3)
    assert [c.index for c in plan.changes if c.closes] == [1] and not plan.gap

    assert plan_topics([(0, t[0:2])], [t[1], t[0]], per_channel=2, max_channels=1).empty


def test_plan_refuses_more_channels_than_allowed() -> None:
    t = [Topic(f"v2.users.u{i}.conversations.calls") for i in range(5)]
    with pytest.raises(SubscriptionError, match="channels"):
        plan_topics([(0, t[0:2])], t, per_channel=2, max_channels=2)
