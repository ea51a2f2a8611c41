"""daemon.genesys.resync.Resyncer against the real sandbox (REST over 127.0.0.1), with the real
Engine/CallStore and a real compiled rule. Bounded waits only."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from _wait import wait_until
from _stream_helpers import Collector, client_for, make_engine, queue_topic
from daemon.errors import ConfguardError
from daemon.core.ids import ConversationId, QueueId, Topic
from daemon.service.metrics import Metrics
from daemon.genesys.scope import Scope
from daemon.genesys.resync import Resyncer, ResyncReport, analytics_parties
from daemon.sandbox import Sandbox
from daemon.genesys.stream import StreamManager, StreamSettings

ANALYTICS = "/api/v2/analytics/conversations/details/query"


def own_sandbox(**kw: Any) -> Sandbox:
    """`async with own_sandbox() as sb`: a Sandbox of its own (Sandbox's own context
    manager starts it and stops it)."""
    kw.setdefault("heartbeat_interval", 0.3)
    return Sandbox(**kw)


def call_gets(sb: Sandbox) -> list[str]:
    """Conversation ids of GET /api/v2/conversations/calls/{id}, in arrival order."""
    out = []
    for r in sb.journal.find("GET", "/api/v2/conversations/calls/"):
        out.append(r.path.rsplit("/", 1)[1])
    return out


async def test_resync_after_drop_finds_call_started_during_outage() -> None:
    async with own_sandbox() as sb:
        q = sb.world.create_queue("Sales")
        agent = sb.world.create_user("Agent")
        engine = make_engine()
        col = Collector(engine=engine)
        reports: list[ResyncReport] = []
        async with client_for(sb) as client:
            stream: StreamManager | None = None

            def resynced(report: ResyncReport) -> None:
                reports.append(report)
                assert stream is not None
                stream.mark_resynced(report.started_at)

            resyncer = Resyncer(client, engine, Scope(queue_ids=(QueueId(q.id),)), on_decisions=col.on_decisions,
                                on_resynced=resynced)
            def on_gap(reason: str) -> None:
                col.on_gap(reason)
                resyncer.request(reason)

            stream = StreamManager(client, [Topic(queue_topic(q.id))], on_message=col.on_message,
                                   on_gap=on_gap, settings=StreamSettings(heartbeat_interval=0.3))
            await stream.start()
            task = asyncio.create_task(stream.run())
            try:
                await wait_until(lambda: stream is not None and stream.ready, what="ready")
                assert sb.drop_sockets() == 1
                # Same loop turn as the drop: these events go to a dead socket and are lost.
                conv = sb.world.start_call(q.id)
                sb.world.connect_agent(conv.id, agent.id)
                ext = sb.world.add_external(conv.id, "tel:+14155550123")
                await wait_until(lambda: len(reports) >= 1, what="a resync after the gap")
                await wait_until(lambda: stream is not None and stream.ready, what="ready after resync")
                assert col.gaps == ["reconnect"]
                assert conv.id not in col.conversation_ids, "the event was not actually lost"
                call = engine.store.get(conv.id)
                assert call is not None and call.connected_parties == 3
                assert reports[0].discovered == 1 and reports[0].calls == 1
                # The rule fired from the resync read (not from an event).
                assert [d.participant_id for d in col.decisions] == [ext.id]
                # The analytics query asked for active calls on our queue.
                posts = sb.journal.find("POST", ANALYTICS, 200)
                assert posts
                body = posts[-1].body
                assert {"type": "dimension", "dimension": "conversationEnd",
                        "operator": "notExists"} in body["conversationFilters"][0]["predicates"]
                preds = body["segmentFilters"][0]["predicates"]
                assert {"type": "dimension", "dimension": "queueId", "operator": "matches",
                        "value": q.id} in preds
            finally:
                await asyncio.wait_for(stream.stop(), 10)
                await asyncio.wait_for(task, 10)
                await resyncer.aclose()


async def test_conferences_are_read_first_and_decisions_flow_immediately() -> None:
    async with own_sandbox() as sb:
        q = sb.world.create_queue("Sales")
        agent = sb.world.create_user("Agent")
        plain = [sb.world.start_call(q.id).id for _ in range(12)]
        routed = sb.world.start_call(q.id)
        sb.world.connect_agent(routed.id, agent.id)  # customer, (ended) acd, agent: 2 parties
        conf = sb.world.start_call(q.id)  # started last: analytics lists it last
        sb.world.connect_agent(conf.id, agent.id)
        ext = sb.world.add_external(conf.id)
        engine = make_engine()
        col = Collector(engine=engine)
        gets_at_decision: list[int] = []

        def on_decisions(ds: list[Any]) -> None:
            gets_at_decision.append(len(call_gets(sb)))
            col.on_decisions(ds)

        sb.faults.latency = 0.02  # each REST call takes a moment, so the order is visible
        async with client_for(sb) as client:
            resyncer = Resyncer(client, engine, Scope(queue_ids=(QueueId(q.id),)), on_decisions=on_decisions,
                                concurrency=1)
            report = await asyncio.wait_for(resyncer.resync("test"), 10)
        order = call_gets(sb)
        assert order[0] == conf.id
        assert set(order) == {*plain, routed.id, conf.id}
        assert report.conferences == 1 and report.calls == 14 and report.updated == 14
        assert [d.participant_id for d in col.decisions] == [ext.id]
        # Handed over after the first GET, not after all 14.
        assert gets_at_decision and gets_at_decision[0] < 14


async def test_tracked_calls_are_reread_and_404_marks_gone() -> None:
    async with own_sandbox() as sb:
        q = sb.world.create_queue("Sales")
        live = sb.world.start_call(q.id)
        engine = make_engine()
        now = time.time()
        ghost = "11111111-2222-4333-8444-555555555555"
        engine.apply_conversation({"id": ghost, "participants": [
            {"id": "p1", "purpose": "customer", "state": "connected"},
            {"id": "p2", "purpose": "agent", "state": "connected"}]}, now, source="event")
        assert not engine.store.get(ghost).is_ended  # type: ignore[union-attr]
        col = Collector()
        async with client_for(sb) as client:
            resyncer = Resyncer(client, engine, Scope(queue_ids=(QueueId(q.id),)), on_decisions=col.on_decisions)
            report = await asyncio.wait_for(resyncer.resync("test"), 10)
        assert report.tracked == 1 and report.discovered == 1 and report.calls == 2
        assert report.gone == 1 and report.updated == 1 and report.errors == 0
        ghost_call = engine.store.get(ghost)
        assert ghost_call is None or ghost_call.is_ended
        assert engine.store.get(live.id) is not None


async def test_overlapping_requests_coalesce_into_one_more_run() -> None:
    async with own_sandbox() as sb:
        q = sb.world.create_queue("Sales")
        for _ in range(3):
            sb.world.start_call(q.id)
        engine = make_engine()
        col = Collector()
        sb.faults.latency = 0.05
        async with client_for(sb) as client:
            resyncer = Resyncer(client, engine, Scope(queue_ids=(QueueId(q.id),)), on_decisions=col.on_decisions,
                                concurrency=1)
            first = asyncio.create_task(resyncer.resync("a"))
            await wait_until(lambda: resyncer.running, what="first resync running")
            more = [asyncio.create_task(resyncer.resync(r)) for r in ("b", "c", "d")]
            reports = await asyncio.wait_for(asyncio.gather(first, *more), 15)
        assert len(sb.journal.find("POST", ANALYTICS)) == 2  # exactly one more run
        assert reports[1] is reports[2] is reports[3]
        assert reports[0] is not reports[1]
        assert reports[0].reasons == ["a"] and reports[1].reasons == ["b", "c", "d"]
        assert resyncer.completed == 2


async def test_discovery_failure_retries_then_raises_then_recovers() -> None:
    async with own_sandbox() as sb:
        q = sb.world.create_queue("Sales")
        cid = sb.world.start_call(q.id).id
        engine = make_engine()
        col = Collector()
        metrics = Metrics()
        async with client_for(sb, max_retries=1) as client:
            resyncer = Resyncer(client, engine, Scope(queue_ids=(QueueId(q.id),)), on_decisions=col.on_decisions,
                                attempts=2, retry_initial=0.05, metrics=metrics)
            sb.faults.add_burst("POST", "analytics", 503, 100)
            with pytest.raises(ConfguardError) as err:
                await asyncio.wait_for(resyncer.resync("gap"), 10)
            assert "503" in str(err.value)
            # 2 attempts x (1 try + 1 client retry)
            assert len(sb.journal.find("POST", ANALYTICS, 503)) == 4
            assert resyncer.failed == 2 and resyncer.completed == 0
            assert metrics.resync_errors.labels(kind="resync")._value.get() == 2
            sb.faults.bursts.clear()
            report = await asyncio.wait_for(resyncer.resync("gap"), 10)
        assert report.calls == 1 and engine.store.get(cid) is not None


async def test_single_call_errors_are_counted_not_fatal() -> None:
    async with own_sandbox() as sb:
        q = sb.world.create_queue("Sales")
        ok = [sb.world.start_call(q.id).id for _ in range(3)]
        bad = sb.world.start_call(q.id).id
        engine = make_engine()
        col = Collector()
        metrics = Metrics()
        async with client_for(sb, max_retries=0) as client:
            resyncer = Resyncer(client, engine, Scope(queue_ids=(QueueId(q.id),)), on_decisions=col.on_decisions,
                                metrics=metrics)
            sb.faults.add_burst("GET", f"/calls/{bad}$", 500, 10)
            report = await asyncio.wait_for(resyncer.resync("gap"), 10)
            assert report.errors == 1 and report.updated == 3
            assert metrics.resync_errors.labels(kind="resync")._value.get() == 1
            sb.faults.add_burst("GET", f"/calls/{bad}$", 500, 10)
            await asyncio.wait_for(resyncer.resync("reconcile"), 10)
            assert metrics.resync_errors.labels(kind="reconcile")._value.get() == 1
        assert all(engine.store.get(c) is not None for c in ok)
        assert engine.store.get(bad) is None


async def test_set_scope_is_read_at_the_next_resync() -> None:
    async with own_sandbox() as sb:
        qa, qb = sb.world.create_queue("A"), sb.world.create_queue("B")
        ca, cb = sb.world.start_call(qa.id).id, sb.world.start_call(qb.id).id
        engine = make_engine()
        async with client_for(sb) as client:
            resyncer = Resyncer(client, engine, Scope(queue_ids=(QueueId(qa.id),)), on_decisions=lambda d: None)
            await asyncio.wait_for(resyncer.resync("x"), 10)
            assert engine.store.get(ca) is not None and engine.store.get(cb) is None
            resyncer.set_scope(Scope(queue_ids=(QueueId(qb.id),)))  # what the daemon does on reload
            await asyncio.wait_for(resyncer.resync("reload"), 10)
            assert engine.store.get(cb) is not None


async def test_resync_timing_metrics_for_n_calls() -> None:
    n = 300
    async with own_sandbox() as sb:
        qs = [sb.world.create_queue(f"Q{i}") for i in range(60)]  # > one analytics batch
        agent = sb.world.create_user("Agent")
        for i in range(n):
            c = sb.world.start_call(qs[i % len(qs)].id)
            if i % 10 == 0:
                sb.world.connect_agent(c.id, agent.id)
                sb.world.add_external(c.id)
        engine = make_engine()
        col = Collector()
        metrics = Metrics()
        async with client_for(sb) as client:
            resyncer = Resyncer(client, engine, Scope(queue_ids=tuple(QueueId(q.id) for q in qs)),
                                on_decisions=col.on_decisions, metrics=metrics)
            t0 = time.monotonic()
            report = await asyncio.wait_for(resyncer.resync("timing"), 30)
            took = time.monotonic() - t0
        assert report.calls == n and report.updated == n and report.conferences == n // 10
        assert len(engine.store) == n
        assert len(col.decisions) == n // 10
        assert metrics.resync_last_calls._value.get() == n
        assert 0 < metrics.resync_last_seconds._value.get() <= took
        assert metrics.resyncs.labels(reason="timing")._value.get() == 1
        text = metrics.render().decode()
        assert "resync_duration_seconds_count" in text
        print(f"\nresync of {n} calls: {report.seconds:.3f} s "
              f"({n / report.seconds:.0f} calls/s, concurrency {resyncer.concurrency})")


def test_analytics_parties_counts_live_non_system_parties() -> None:
    def part(purpose: str, ended: bool) -> dict[str, Any]:
        seg: dict[str, Any] = {"segmentStart": "2026-11-21T09:15:00.000Z"}
        if ended:
            seg["segmentEnd"] = "2026-11-21T09:16:00.000Z"
        return {"purpose": purpose, "sessions": [{"segments": [seg]}]}

    routed = {"participants": [part("customer", False), part("acd", True), part("agent", False)]}
    conf = {"participants": [part("customer", False), part("acd", True), part("agent", False),
                             part("external", False)]}
    left = {"participants": [part("customer", False), part("agent", False),
                             part("external", True)]}
    sparse = {"participants": [{"purpose": "customer"}, {"purpose": "agent"},
                               {"purpose": "external"}]}
    assert analytics_parties(routed) == 2
    assert analytics_parties(conf) == 3
    assert analytics_parties(left) == 2
    assert analytics_parties(sparse) == 3
    assert analytics_parties({"participants": "junk"}) == 0
    assert analytics_parties(orjson.loads(b"{}")) == 0


async def test_order_conferences_then_outside_then_the_rest_and_coverage_books() -> None:
    """Conferences, then calls with a live customer or external party, then the rest (here
    two agents whose customer hung up), whatever analytics' listing order; `on_listed` is
    called once, before the first GET, and the coverage books follow the reads."""
    async with own_sandbox() as sb:
        w = sb.world
        q = w.create_queue("Sales")
        a1, a2 = w.create_user("A1"), w.create_user("A2")
        internal = []
        for _ in range(3):  # listed first by analytics
            c = w.start_call(q.id)
            w.connect_agent(c.id, a1.id)
            w.add_agent(c.id, a2.id)
            w.disconnect(c.id, c.participants[0].id)
            internal.append(c.id)
        outside = [w.start_call(q.id).id for _ in range(3)]
        conf = w.start_call(q.id)
        w.connect_agent(conf.id, a1.id)
        w.add_external(conf.id)
        engine = make_engine()
        listed: list[tuple[int, int]] = []
        async with client_for(sb) as client:
            resyncer = Resyncer(client, engine, Scope(queue_ids=(QueueId(q.id),)),
                                on_decisions=lambda ds: None, concurrency=1)
            resyncer.on_listed = lambda rep: listed.append((rep.calls, len(call_gets(sb))))
            report = await asyncio.wait_for(resyncer.resync("test"), 10)
        order = call_gets(sb)
        assert order[0] == conf.id
        assert set(order[1:4]) == set(outside) and set(order[4:]) == set(internal)
        assert listed == [(7, 0)] and report.conferences == 1
        snap = resyncer.coverage.snapshot(time.time())
        assert (snap.calls_known, snap.calls_read, snap.conferences_unread) == (7, 7, 0)


async def test_gap_resync_is_strict_class_order_and_ages_what_stayed_unread() -> None:
    """After a gap every call is stale at once: conferences first even when a routed call
    was read long before them. A call an earlier resync listed and nobody read since has
    waited longer: it goes first once that is a class' worth (`age_step`)."""
    async with own_sandbox() as sb:
        w = sb.world
        q = w.create_queue("Sales")
        agent = w.create_user("A1")
        routed = w.start_call(q.id)
        w.connect_agent(routed.id, agent.id)
        conf = w.start_call(q.id)
        w.connect_agent(conf.id, agent.id)
        w.add_external(conf.id)
        engine = make_engine()
        now = [time.time()]
        engine.apply_conversation(w.get_call(routed.id).rest_body(), now[0] - 3000, source="resync")
        engine.apply_conversation(w.get_call(conf.id).rest_body(), now[0] - 10, source="resync")
        async with client_for(sb) as client:
            rs = Resyncer(client, engine, Scope(queue_ids=(QueueId(q.id),)),
                          on_decisions=lambda ds: None, concurrency=1, clock=lambda: now[0],
                          age_step=300.0)
            await asyncio.wait_for(rs.resync("gap"), 10)
            assert call_gets(sb) == [conf.id, routed.id]  # strict class order
            # The routed call stayed unread since a listing 400 s ago (one class = 300 s).
            rs.coverage.gone(ConversationId(routed.id))
            rs.coverage.stale([(ConversationId(routed.id), False)], since=now[0] - 400)
            sb.journal.clear()
            now[0] += 1.0
            await asyncio.wait_for(rs.resync("gap"), 10)
            assert call_gets(sb) == [routed.id, conf.id]
