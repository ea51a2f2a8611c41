"""daemon.genesys.stream.StreamManager against the real sandbox over real sockets (127.0.0.1).

Every wait is a bounded wait on a condition (`wait_until`, deadline 10 s)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from _wait import wait_until
from _stream_helpers import Collector, client_for, make_engine, queue_topic
from daemon.genesys.api import Channel, GenesysClient
from daemon.errors import SubscriptionError
from daemon.core.ids import Topic
from daemon.service.metrics import Metrics
from daemon.sandbox import Sandbox
from daemon.sandbox.world import Queue
from daemon.genesys.stream import Backoff, StreamManager, StreamSettings

HB = 0.3  # sandbox heartbeat for the tests that need a fast one


@contextlib.asynccontextmanager
async def running(stream: StreamManager) -> AsyncIterator[asyncio.Task[None]]:
    """start() + run() in a task; stop() (bounded) afterwards."""
    await stream.start()
    task = asyncio.create_task(stream.run())
    try:
        yield task
    finally:
        await asyncio.wait_for(stream.stop(), 10)
        await asyncio.wait_for(task, 10)


def own_sandbox(**kw: Any) -> Sandbox:
    """`async with own_sandbox() as sb`: a Sandbox of its own (Sandbox's own context
    manager starts it and stops it)."""
    kw.setdefault("heartbeat_interval", HB)
    kw.setdefault("closing_grace", 0.5)
    kw.setdefault("seed", 7)
    return Sandbox(**kw)


@contextlib.asynccontextmanager
async def queue_stream(sb: Sandbox, **kw: Any) -> AsyncIterator[
        tuple[Any, Collector, GenesysClient, StreamManager, asyncio.Task[None]]]:
    """A queue "Sales", a Collector and a running StreamManager on its topic, once ready.
    Yields (queue, collector, client, stream, run task)."""
    kw.setdefault("heartbeat_interval", HB)
    q = sb.world.create_queue("Sales")
    col = Collector()
    async with client_for(sb) as client:
        stream = collecting(client, col, q, **kw)
        async with running(stream) as task:
            await wait_until(lambda: stream.ready, what="ready")
            yield q, col, client, stream, task


def collecting(client: GenesysClient, col: Collector, *queues: Queue, **kw: Any) -> StreamManager:
    """A StreamManager on the queues' call topics that hands every message and gap to `col`
    (`kw`: the StreamManager's own settings)."""
    metrics = kw.pop("metrics", None)
    return StreamManager(client, [Topic(queue_topic(q.id)) for q in queues],
                         on_message=col.on_message, on_gap=col.on_gap,
                         settings=StreamSettings(**kw), metrics=metrics)


def topics_of(sb: Sandbox, channel_id: str) -> dict[str, str]:
    return {t: s.state for t, s in sb.world.channels[channel_id].topics.items()}


async def rest_topics(client: GenesysClient, channel_id: str) -> set[str]:
    return {s.id for s in await client.get_subscriptions(channel_id) if s.state == "Permitted"}


# ---------------------------------------------------------------- subscription


async def test_2500_queues_across_3_channels(sandbox: Sandbox) -> None:
    queues = [sandbox.world.create_queue(f"Q{i:04d}") for i in range(2500)]
    topics = [Topic(queue_topic(q.id)) for q in queues]
    col = Collector()
    metrics = Metrics()
    async with client_for(sandbox) as client:
        stream = StreamManager(client, topics, on_message=col.on_message, on_gap=col.on_gap,
                               settings=StreamSettings(heartbeat_interval=1.0), metrics=metrics)
        async with running(stream):
            assert len(stream.channels) == 3
            seen: set[str] = set()
            sizes = []
            for ch in stream.channels:
                got = await rest_topics(client, ch)  # GET subscriptions over REST
                sizes.append(len(got))
                assert not (got & seen), "a topic subscribed on two channels"
                seen |= got
            assert sorted(sizes) == [500, 1000, 1000]
            assert seen == set(topics)
            # Channels were created one after another (no parallel POSTs).
            posts = sandbox.journal.find("POST", "/api/v2/notifications/channels", 200)
            posts = [p for p in posts if p.path.endswith("/channels")]
            assert len(posts) == 3
            await wait_until(lambda: stream.ready, what="stream ready")
            assert metrics.subscribed_topics._value.get() == 2500
            assert metrics.channels._value.get() == 3
            assert metrics.stream_connections._value.get() == 3
            # Events on a queue in each shard arrive.
            calls = [sandbox.world.start_call(queues[i].id).id for i in (0, 1500, 2499)]
            await wait_until(lambda: set(calls) <= col.conversation_ids, what="events from all 3 shards")
            assert not col.gaps


async def test_rejected_topic_fails_startup_naming_it(sandbox: Sandbox) -> None:
    good = sandbox.world.create_queue("Good")
    missing = "00000000-0000-4000-8000-000000000abc"
    topics = [Topic(queue_topic(good.id)), Topic(queue_topic(missing))]
    col = Collector()
    async with client_for(sandbox) as client:
        stream = StreamManager(client, topics, on_message=col.on_message, on_gap=col.on_gap)
        with pytest.raises(SubscriptionError) as err:
            await stream.start()
    msg = str(err.value)
    assert queue_topic(missing) in msg
    assert "Queue not found" in msg  # the rejectionReason
    assert queue_topic(good.id) not in msg
    assert not stream.ready
    # No socket was opened and the half-made channel's subscriptions were removed.
    assert not sandbox.conns
    assert sandbox.journal.find("DELETE", "/subscriptions")


async def test_missing_permission_is_named(sandbox: Sandbox) -> None:
    q = sandbox.world.create_queue("Sales")
    sandbox.world.clients[sandbox.client_id].permissions.discard("routing:queue:view")
    col = Collector()
    async with client_for(sandbox) as client:
        stream = collecting(client, col, q)
        with pytest.raises(SubscriptionError, match="routing:queue:view"):
            await stream.start()


async def test_empty_scope_refuses_to_start(sandbox: Sandbox) -> None:
    async with client_for(sandbox) as client:
        stream = StreamManager(client, [], on_message=lambda r, t: None, on_gap=lambda r: None)
        with pytest.raises(SubscriptionError, match="nothing to subscribe"):
            await stream.start()


async def test_stop_closes_sockets_and_deletes_subscriptions() -> None:
    async with own_sandbox() as sb:
        q = sb.world.create_queue("Sales")
        col = Collector()
        async with client_for(sb) as client:
            stream = collecting(client, col, q, heartbeat_interval=HB)
            await stream.start()
            task = asyncio.create_task(stream.run())
            ch = stream.channels[0]
            await wait_until(lambda: ch in sb.conns, what="socket open")
            await asyncio.wait_for(stream.stop(), 10)
            await asyncio.wait_for(task, 10)
            await wait_until(lambda: ch not in sb.conns, what="socket closed")
            assert topics_of(sb, ch) == {}
            assert not stream.ready


# ---------------------------------------------------------------- self-healing


async def test_dropped_socket_reconnects_and_signals_gap() -> None:
    async with own_sandbox() as sb:
        q = sb.world.create_queue("Sales")
        col = Collector()
        metrics = Metrics()
        async with client_for(sb) as client:
            stream = collecting(client, col, q, heartbeat_interval=HB, metrics=metrics)
            async with running(stream):
                ch = stream.channels[0]
                await wait_until(lambda: stream.ready, what="ready")
                assert sb.drop_sockets() == 1
                await wait_until(lambda: col.gaps == ["reconnect"], what="gap after reconnect")
                assert not stream.ready  # in a gap until resynced
                assert stream.channels == [ch]  # the channel survived: same channel
                stream.mark_resynced()
                await wait_until(lambda: stream.ready, what="ready after resync")
                cid = sb.world.start_call(q.id).id
                await wait_until(lambda: cid in col.conversation_ids, what="events after reconnect")
                assert metrics.reconnects.labels(reason="reconnect")._value.get() == 1
                assert metrics.stream_gaps.labels(reason="reconnect")._value.get() == 1


async def test_heartbeat_silence_pings_then_reconnects() -> None:
    async with own_sandbox() as sb, queue_stream(sb, ping_timeout=0.5) as (q, col, client, stream, _):
        first = stream.connections_opened
        # The socket stays open but nothing gets through any more: not even the pong.
        sb.faults.event_latency = 30.0
        await wait_until(lambda: stream.pings_sent >= 1, what="a ping after silence")
        await wait_until(lambda: "heartbeat_timeout" in col.gaps, what="heartbeat_timeout gap")
        sb.faults.event_latency = 0.0
        assert stream.connections_opened > first
        # The reconnected socket works: events arrive again (the stalled writer of the
        # new socket, if any, is bounded by further watchdog rounds).
        stream.mark_resynced()
        # Delivery has no durability: an event written to a socket that the watchdog drops a
        # moment later (its sandbox writer may still be stalled) is gone. So start a call
        # every 0.5 s until one arrives (bounded: 30 tries, 15 s).
        started: list[str] = []
        for _ in range(30):
            started.append(sb.world.start_call(q.id).id)
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: any(c in col.conversation_ids for c in started),
                               timeout=0.5, what="events after heartbeat reconnect")
                break
        assert any(c in col.conversation_ids for c in started), \
            "no event arrived over the reconnected socket within 15 s"


async def test_ping_answered_keeps_connection() -> None:
    # No heartbeats at all (interval 60 s), but the server answers pings: no reconnect.
    async with own_sandbox(heartbeat_interval=60.0) as sb:
        q = sb.world.create_queue("Sales")
        col = Collector()
        async with client_for(sb) as client:
            stream = collecting(client, col, q, heartbeat_interval=0.2, ping_timeout=1.0)
            async with running(stream):
                await wait_until(lambda: stream.pings_sent >= 3, what="three pings")
                assert col.gaps == []
                assert stream.connections_opened == 1
                assert any(b'"pong"' in (r if isinstance(r, bytes) else r.encode()) for r, _ in col.frames)


@pytest.mark.parametrize("compression", [False, True])
async def test_permessage_deflate_is_offered_only_when_asked(compression: bool) -> None:
    # Off by default (StreamSettings.compression: latency over bandwidth); the sandbox, like
    # any RFC 7692 server, accepts it when offered. Events arrive either way.
    async with own_sandbox() as sb:
        async with queue_stream(sb, compression=compression) as (q, col, _client, stream, _task):
            conns = [c for s in stream._shards for c in s.conns.values()]
            assert len(conns) == 1
            names = [e.name for e in conns[0].ws.protocol.extensions]
            assert names == (["permessage-deflate"] if compression else [])
            call = sb.world.start_call(q.id)
            await wait_until(lambda: any(call.id in str(r) for r, _ in col.frames),
                             what="the call's event")


async def test_accept_and_drop_server_does_not_hot_loop(sandbox: Sandbox) -> None:
    """A WebSocket server that completes the handshake and hangs up at once: reconnects
    back off instead of spinning (the back-off is not reset by a successful handshake)."""
    handshakes: list[float] = []

    async def drop(ws: ServerConnection) -> None:
        handshakes.append(time.monotonic())
        await ws.close()

    q = sandbox.world.create_queue("Sales")
    async with serve(drop, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]

        class Redirect(GenesysClient):
            async def create_channel(self) -> Channel:
                ch = await super().create_channel()
                return Channel(ch.id, f"ws://127.0.0.1:{port}/channels/{ch.id}", ch.expires)

        async with client_for(sandbox, cls=Redirect) as client:
            col = Collector()
            stream = collecting(client, col, q, heartbeat_interval=HB,
                                backoff=(0.2, 5.0))
            async with running(stream):
                t0 = time.monotonic()
                await wait_until(lambda: len(handshakes) >= 4, what="several reconnect attempts")
                window = 3.0
                await wait_until(lambda: time.monotonic() - t0 >= window, timeout=window + 1,
                               what="observation window")
                n = len([h for h in handshakes if h - t0 <= window])
                # Delays 0, 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6 s...: at most ~8 attempts in
                # 3 s; a hot loop would make hundreds.
                assert n <= 8, f"{n} handshakes in {window} s: hot loop"
                assert stream.backoff_failures(0) >= 3
                assert not stream.ready


def test_backoff_sequence_is_capped_and_jittered() -> None:
    import random

    b = Backoff(0.5, 4.0, rng=random.Random(1))
    delays = [b.next() for _ in range(10)]
    assert delays[0] == 0.0
    for n, d in enumerate(delays[1:], start=1):
        cap = min(4.0, 0.5 * 2 ** (n - 1))
        assert cap / 2 <= d <= cap
    b.reset()
    assert b.next() == 0.0


async def test_socket_closing_handover_loses_no_event() -> None:
    async with own_sandbox(closing_grace=2.0) as sb, queue_stream(sb) as (q, col, client, stream, _):
        old = stream.channels[0]
        calls = [sb.world.start_call(q.id).id for _ in range(5)]
        stop = asyncio.Event()
        published = 0

        async def publish() -> None:
            nonlocal published
            for i in range(100_000):  # bounded; stopped by the event long before
                if stop.is_set():
                    return
                sb.world.touch(calls[i % len(calls)])
                published += 1
                await asyncio.sleep(0.002)

        pub = asyncio.create_task(publish())
        await wait_until(lambda: published >= 50, what="publishing")
        assert sb.socket_closing() == 1
        await wait_until(lambda: stream.reconnects.get("socket_closing") == 1,
                       what="handover")
        await wait_until(lambda: old not in sb.conns, what="old socket closed")
        mark = published
        await wait_until(lambda: published >= mark + 50, what="publishing after handover")
        stop.set()
        await asyncio.wait_for(pub, 5)
        sent = [e for e in sb.journal.events if e.conversation_id in calls]
        assert len(sent) >= 100
        assert all(e.sockets >= 1 for e in sent), "an event was published to nobody"
        want = {e.correlation_id for e in sent}
        await wait_until(lambda: want <= col.correlation_ids, what="every event delivered")
        assert stream.channels != [old]
        assert col.gaps == []  # make-before-break: no gap, no resync needed
        assert stream.ready


async def test_socket_closing_with_immediate_close_signals_gap() -> None:
    # The old socket closes before a replacement can be up: events may be lost -> gap.
    async with own_sandbox(closing_grace=0.0) as sb, queue_stream(sb) as (q, col, client, stream, _):
        sb.socket_closing(grace=0.0)
        await wait_until(lambda: len(col.gaps) >= 1, what="gap")
        stream.mark_resynced()
        await wait_until(lambda: stream.ready, what="ready again")
        cid = sb.world.start_call(q.id).id
        await wait_until(lambda: cid in col.conversation_ids, what="events flow")


async def test_channel_expiry_recovers_without_restart() -> None:
    async with own_sandbox() as sb, queue_stream(sb) as (q, col, client, stream, task):
        old = stream.channels[0]
        sb.expire_channel(old)  # the service sends {"result":"404"} and closes
        await wait_until(lambda: len(col.gaps) == 1, what="gap")
        assert col.gaps[0] in ("channel_gone", "channel_expired")
        new = stream.channels[0]
        assert new != old and new in sb.world.channels
        assert topics_of(sb, new) == {queue_topic(q.id): "Permitted"}
        stream.mark_resynced()
        cid = sb.world.start_call(q.id).id
        await wait_until(lambda: cid in col.conversation_ids, what="events on the new channel")
        assert not task.done()  # no restart


async def test_channel_refreshed_before_expiry_without_gap() -> None:
    # Channels live 3 s here; refresh 2 s before the end -> a make-before-break replacement.
    async with own_sandbox(channel_lifetime=3.0) as sb:
        q = sb.world.create_queue("Sales")
        col = Collector()
        metrics = Metrics()
        async with client_for(sb) as client:
            stream = collecting(client, col, q, heartbeat_interval=HB,
                                channel_refresh_before=2.0, metrics=metrics)
            async with running(stream):
                first = stream.channels[0]
                assert f'channel="{first}"' in metrics.render().decode()
                await wait_until(lambda: stream.reconnects.get("channel_refresh", 0) >= 1,
                               what="refresh handover")
                assert stream.channels[0] != first
                text = metrics.render().decode()
                # The age gauge follows the live channel only; the retired one is dropped.
                assert f'channel="{stream.channels[0]}"' in text and f'channel="{first}"' not in text
                assert metrics.reconnects.labels(reason="channel_refresh")._value.get() >= 1
                await wait_until(lambda: first not in sb.world.channels or first not in sb.conns,
                               what="old channel retired")
                cid = sb.world.start_call(q.id).id
                await wait_until(lambda: cid in col.conversation_ids, what="events on the new channel")
                assert col.gaps == []


@pytest.mark.parametrize("how", ["expire", "revoke"])
async def test_token_expiry_recovers_without_restart(how: str) -> None:
    async with own_sandbox() as sb, queue_stream(sb) as (q, col, client, stream, task):
        old = stream.channels[0]
        old_token = await client.tokens.token()
        if how == "expire":
            sb.world.expire_tokens()
        else:
            sb.world.revoke_tokens()
        # The channel dies with its token ({"result":"404"} + close).
        await wait_until(lambda: len(col.gaps) >= 1, what="gap")
        assert stream.channels[0] != old
        assert await client.tokens.token() != old_token
        stream.mark_resynced()
        cid = sb.world.start_call(q.id).id
        await wait_until(lambda: cid in col.conversation_ids, what="events after token renewal")
        assert not task.done()


async def test_channel_gone_on_reconnect_gets_a_new_channel() -> None:
    # The socket drops, and by the time we come back the channel no longer exists (HEAD 404).
    async with own_sandbox() as sb, queue_stream(sb, backoff=(0.3, 1.0)) as (q, col, client, stream, _):
        old = stream.channels[0]
        # Remove the channel silently (no 404 frame) and drop the socket.
        sb.world.channel_listeners.clear()
        sb.world.remove_channel(old, "test")
        sb.drop_sockets()
        await wait_until(lambda: len(col.gaps) >= 1, what="gap")
        assert col.gaps[0] in ("channel_gone", "channel_expired")
        assert stream.channels[0] != old
        heads = sb.journal.find("HEAD", old)
        assert heads and heads[0].status == 404


# ---------------------------------------------------------------- duplicates and reordering


async def test_duplicate_and_reordered_events_leave_correct_state() -> None:
    async with own_sandbox(seed=11) as sb:
        q = sb.world.create_queue("Sales")
        agent = sb.world.create_user("Agent")
        engine = make_engine()
        col = Collector(engine=engine)
        async with client_for(sb) as client:
            stream = collecting(client, col, q, heartbeat_interval=HB)
            async with running(stream):
                await wait_until(lambda: stream.ready, what="ready")
                sb.faults.configure({"duplicate": {"probability": 0.5},
                                     "reorder": {"probability": 0.4}})
                conv = sb.world.start_call(q.id)
                sb.world.connect_agent(conv.id, agent.id)
                ext = sb.world.add_external(conv.id, "tel:+14155550123")
                ext2 = sb.world.add_external(conv.id, "tel:+14155550199")
                sb.world.disconnect(conv.id, ext.id)
                other = sb.world.start_call(q.id)
                sb.world.end_call(other.id)
                sb.faults.reset()
                # A held-back (reordered) event is flushed by the next heartbeat.
                want = {p.id: p.state for p in sb.world.get_call(conv.id).participants}

                def matches() -> bool:
                    call = engine.store.get(conv.id)
                    if call is None:
                        return False
                    got = {pid: p.state for pid, p in call.participants.items()}
                    return got == want

                await wait_until(matches, what="store state equals the sandbox's")
                await wait_until(lambda: (c := engine.store.get(other.id)) is not None and c.is_ended,
                               what="other call ended")
                # Duplicates were delivered and dropped as such.
                assert engine.counters["duplicates"] >= 1
                # The still-connected external in a 3+ party call was decided exactly once.
                decided = [d for d in col.decisions if d.participant_id == ext2.id]
                assert len(decided) == 1


# ---------------------------------------------------------------- reload


async def test_update_topics_adds_and_removes_without_reconnecting() -> None:
    async with own_sandbox() as sb:
        qa, qb, qc = (sb.world.create_queue(n) for n in ("A", "B", "C"))
        col = Collector()
        async with client_for(sb) as client:
            stream = collecting(client, col, qa, qb, heartbeat_interval=HB)
            async with running(stream):
                await wait_until(lambda: stream.ready, what="ready")
                ch = stream.channels[0]
                opened = stream.connections_opened
                await stream.update_topics([Topic(queue_topic(qb.id)), Topic(queue_topic(qc.id))])
                assert await rest_topics(client, ch) == {queue_topic(qb.id), queue_topic(qc.id)}
                assert stream.channels == [ch]
                assert stream.connections_opened == opened
                assert stream.reconnects == {}
                assert col.gaps == ["topics_added"]  # live calls on C must be discovered
                stream.mark_resynced()
                cid = sb.world.start_call(qc.id).id
                await wait_until(lambda: cid in col.conversation_ids, what="event on the added queue")
                gone = sb.world.start_call(qa.id).id
                probe = sb.world.start_call(qb.id).id  # sent after `gone` on the same loop
                await wait_until(lambda: probe in col.conversation_ids, what="event on kept queue")
                assert gone not in col.conversation_ids
                # Only removals: a PUT on the shard, no gap.
                await stream.update_topics([Topic(queue_topic(qc.id))])
                assert await rest_topics(client, ch) == {queue_topic(qc.id)}
                assert col.gaps == ["topics_added"]
                assert stream.connections_opened == opened


async def test_update_topics_opens_a_new_shard_when_full() -> None:
    async with own_sandbox() as sb:
        qs = [sb.world.create_queue(f"Q{i}") for i in range(5)]
        col = Collector()
        async with client_for(sb) as client:
            stream = collecting(client, col, *qs[:2], heartbeat_interval=HB, per_channel=2, max_channels=2)
            async with running(stream):
                first = stream.channels[0]
                await stream.update_topics([Topic(queue_topic(q.id)) for q in qs[:4]])
                assert len(stream.channels) == 2 and stream.channels[0] == first
                assert await rest_topics(client, stream.channels[1]) == {
                    queue_topic(qs[2].id), queue_topic(qs[3].id)}
                cid = sb.world.start_call(qs[3].id).id
                await wait_until(lambda: cid in col.conversation_ids, what="event on the new shard")
                with pytest.raises(SubscriptionError, match="topics per channel"):
                    await stream.update_topics([Topic(queue_topic(q.id)) for q in qs])
                assert len(stream.topics) == 4  # an impossible plan changed nothing


async def test_update_topics_rejected_topic_is_reported() -> None:
    async with own_sandbox() as sb:
        q = sb.world.create_queue("A")
        col = Collector()
        async with client_for(sb) as client:
            stream = collecting(client, col, q, heartbeat_interval=HB)
            async with running(stream):
                bad = queue_topic("00000000-0000-4000-8000-00000000dead")
                with pytest.raises(SubscriptionError, match="Queue not found"):
                    await stream.update_topics([Topic(queue_topic(q.id)), Topic(bad)])
                assert stream.topics == [queue_topic(q.id)]
                assert await rest_topics(client, stream.channels[0]) == {queue_topic(q.id)}


async def test_topic_refused_after_start_is_loud_but_not_fatal() -> None:
    async with own_sandbox(closing_grace=2.0) as sb:
        qa, qb = sb.world.create_queue("A"), sb.world.create_queue("B")
        col = Collector()
        async with client_for(sb) as client:
            stream = collecting(client, col, qa, qb, heartbeat_interval=HB)
            async with running(stream) as task:
                await wait_until(lambda: stream.ready, what="ready")
                deleted = sb.world.queues.pop(qb.id)  # queue B deleted in Genesys meanwhile
                sb.socket_closing()
                await wait_until(lambda: stream.reconnects.get("socket_closing") == 1, what="handover")
                assert list(stream.rejected_topics) == [queue_topic(qb.id)]
                assert "Queue not found" in stream.rejected_topics[queue_topic(qb.id)]
                assert not stream.ready and not task.done()
                cid = sb.world.start_call(qa.id).id  # the permitted topic still streams
                await wait_until(lambda: cid in col.conversation_ids, what="events on queue A")
                sb.world.queues[qb.id] = deleted  # restored: the next re-subscription heals
                sb.socket_closing()
                await wait_until(lambda: stream.reconnects.get("socket_closing") == 2, what="handover 2")
                assert stream.rejected_topics == {}
                await wait_until(lambda: stream.ready, what="ready again")


async def test_update_topics_on_a_disconnected_shard_applies_on_reconnect() -> None:
    # No heartbeats, so the first reconnect does not prove health and the second one waits.
    async with own_sandbox(heartbeat_interval=60.0) as sb:
        qa, qb = sb.world.create_queue("A"), sb.world.create_queue("B")
        col = Collector()
        async with client_for(sb) as client:
            stream = collecting(client, col, qa, heartbeat_interval=30.0, backoff=(1.0, 2.0))
            async with running(stream):
                await wait_until(lambda: stream.ready, what="ready")
                ch = stream.channels[0]
                puts = len(sb.journal.find("PUT", "/subscriptions"))
                # Make the reconnect wait: drop twice quickly so the back-off is non-zero.
                sb.drop_sockets()
                await wait_until(lambda: stream.connections_opened == 2, what="first reconnect")
                sb.drop_sockets()
                await wait_until(lambda: not stream.ready and ch not in sb.conns, what="socket down")
                await stream.update_topics([Topic(queue_topic(qa.id)), Topic(queue_topic(qb.id))])
                assert stream.connections_opened == 2  # still down: only recorded
                assert len(sb.journal.find("PUT", "/subscriptions")) == puts
                await wait_until(lambda: stream.connections_opened == 3, what="second reconnect")
                assert stream.channels == [ch]
                assert len(sb.journal.find("PUT", "/subscriptions")) == puts + 1  # on reconnect
                assert await rest_topics(client, ch) == {queue_topic(qa.id), queue_topic(qb.id)}
                stream.mark_resynced()
                cid = sb.world.start_call(qb.id).id
                await wait_until(lambda: cid in col.conversation_ids, what="event on the added queue")


async def test_401_on_head_renews_token_and_channel() -> None:
    async with own_sandbox() as sb, queue_stream(sb) as (q, col, client, stream, _):
        old = stream.channels[0]
        tokens_before = len(sb.journal.find("POST", "/oauth/token"))
        # HEAD answers 401 (even after the client's own refresh and retry).
        sb.faults.add_burst("HEAD", "/notifications/channels/", 401, 2)
        sb.drop_sockets()
        await wait_until(lambda: col.gaps == ["token_expired"], what="token_expired gap")
        assert stream.channels[0] != old
        assert len(sb.journal.find("POST", "/oauth/token")) > tokens_before
        stream.mark_resynced()
        cid = sb.world.start_call(q.id).id
        await wait_until(lambda: cid in col.conversation_ids, what="events on the new channel")


def test_control_frames_are_recognised_from_the_consumers_one_parse() -> None:
    """The stream parses nothing: the consumer's `on_message` returns the parsed frame and
    the pump tells the supervisor about the control messages among those (formerly a
    second, peeking parse in the pump)."""
    from daemon.core.events import parse_message
    from daemon.genesys.stream.pump import _CONTROL_KINDS
    from daemon.genesys.stream.supervisor import ControlKind

    event = '{"topicName":"v2.routing.queues.q1.conversations.calls","eventBody":{"id":"c","note":"pong"}}'
    user_event = b'{"topicName":"v2.users.u1.conversations.calls","eventBody":{"x":"channel.metadata"}}'
    heartbeat = '{"topicName":"channel.metadata","version":"2","eventBody":{"message":"WebSocket Heartbeat"}}'
    closing = b'{"topicName":"v2.system.socket_closing","eventBody":{"message":"closing"}}'
    gone = '{"result":"404","message":"channel not found"}'
    other_order = '{"eventBody":{"message":"WebSocket Heartbeat"},"topicName":"channel.metadata"}'
    big_other = '{"eventBody":{"x":"' + "a" * 5000 + '"},"topicName":"channel.metadata"}'

    def kind(frame: str | bytes) -> ControlKind | None:
        return _CONTROL_KINDS.get(type(parse_message(frame)))

    assert kind(event) is None and kind(user_event) is None and kind(big_other) is None
    assert kind(heartbeat) is kind(other_order) is ControlKind.HEARTBEAT
    assert kind(closing) is ControlKind.SOCKET_CLOSING
    assert kind(gone) is ControlKind.CHANNEL_GONE
    assert kind(b'{"message":"pong"}') is None  # a sign of life (every frame is), not a control


async def test_update_topics_during_a_handover_reaches_the_new_channel() -> None:
    """A reload that lands while a socket_closing handover is half-way (its new channel
    already subscribed with the old set) is applied to the new channel as well."""
    state: dict[str, Any] = {"first": None, "gate": None, "waiting": False}

    class Paused(GenesysClient):
        async def put_subscriptions(self, channel_id: Any, topics: Any, *,
                                    ignore_errors: bool = False) -> list[Any]:
            gate = state["gate"]
            if gate is not None and channel_id != state["first"]:
                state["waiting"] = True
                await gate.wait()
            return await super().put_subscriptions(channel_id, topics, ignore_errors=ignore_errors)

    async with own_sandbox(closing_grace=8.0) as sb:
        qa, qb = sb.world.create_queue("A"), sb.world.create_queue("B")
        col = Collector()
        async with client_for(sb, cls=Paused) as client:
            stream = collecting(client, col, qa, heartbeat_interval=HB)
            async with running(stream):
                await wait_until(lambda: stream.ready, what="ready")
                state["first"] = stream.channels[0]
                state["gate"] = gate = asyncio.Event()
                sb.socket_closing(grace=8.0)
                await wait_until(lambda: state["waiting"], what="handover paused at its PUT")
                update = asyncio.create_task(
                    stream.update_topics([Topic(queue_topic(qa.id)), Topic(queue_topic(qb.id))]))
                await asyncio.sleep(0.05)  # let the reload queue behind the handover's step
                gate.set()
                await asyncio.wait_for(update, 10)
                await wait_until(lambda: stream.reconnects.get("socket_closing") == 1, what="handover")
                new = stream.channels[0]
                assert new != state["first"]
                want = {queue_topic(qa.id), queue_topic(qb.id)}
                await wait_until(lambda: new in sb.world.channels and set(topics_of(sb, new)) == want,
                               what="the new channel subscribed to the reloaded set")
                assert stream.topics == [queue_topic(qa.id), queue_topic(qb.id)]
                stream.mark_resynced()
                cid = sb.world.start_call(qb.id).id
                await wait_until(lambda: cid in col.conversation_ids, what="event on the added queue")
