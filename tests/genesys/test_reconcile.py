"""Reconciliation that scales (issue 11): riskiest calls first, fresh calls skipped, at most
`reconcile_share` of every budget window. Over the sandbox (REST on 127.0.0.1) with the
real Engine/CallStore; the reconciler's clock is a manual one so "due" is exact."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from _wait import wait_until
from _stream_helpers import client_for, make_engine

from daemon.core.ids import ConversationId, ParticipantId, QueueId
from daemon.core.model import Call, Participant
from daemon.genesys.ratelimit import Priority
from daemon.genesys.reconcile import Reconciler, reconcile_class
from daemon.genesys.scope import Scope
from daemon.genesys.resync import Resyncer
from daemon.sandbox import Sandbox

CALLS = "/api/v2/conversations/calls/"


def _party(i: str, purpose: str, state: str = "connected") -> Participant:
    return Participant(ParticipantId(i), purpose=purpose, state=state)


def test_reconcile_class_ranks_conferences_then_outside_parties() -> None:
    conf = Call(ConversationId("c"), participants={
        ParticipantId(p.id): p for p in (_party("1", "customer"), _party("2", "agent"),
                                         _party("3", "external"))})
    routed = Call(ConversationId("r"), participants={
        ParticipantId(p.id): p for p in (_party("1", "customer"), _party("2", "agent"))})
    internal = Call(ConversationId("i"), participants={
        ParticipantId(p.id): p for p in (_party("1", "agent"), _party("2", "user"),
                                         _party("3", "external", "disconnected"))})
    assert [reconcile_class(c) for c in (conf, routed, internal)] == [0, 1, 2]


def _gets(sb: Sandbox) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in sb.journal.find("GET", CALLS)]


async def test_riskiest_first_fresh_skipped_unknown_found(sandbox_factory: Any) -> None:
    sb: Sandbox = await sandbox_factory()
    w = sb.world
    q = w.create_queue("Sales").id
    agent = w.create_user("Agent").id
    now = [time.time()]
    engine = make_engine()
    routed_old = w.start_call(q)
    w.connect_agent(routed_old.id, agent)
    conf_new, conf_old, conf_fresh = (w.start_call(q) for _ in range(3))
    for c in (conf_new, conf_old, conf_fresh):
        w.connect_agent(c.id, agent)
        w.add_external(c.id, "tel:+14155550123")
    # What the store saw, and when (the sandbox's REST bodies, applied without REST).
    for c, t in ((routed_old, 100.0), (conf_old, 200.0), (conf_new, 300.0), (conf_fresh, 900.0)):
        engine.apply_conversation(w.get_call(c.id).rest_body(), now[0] - 1000 + t, source="resync")
    lost = w.start_call(q)  # a call whose every event was lost: only analytics knows it
    w.connect_agent(lost.id, agent)
    async with client_for(sb) as client:
        rs = Resyncer(client, engine, Scope(queue_ids=(QueueId(q),)), on_decisions=lambda d: None,
                      clock=lambda: now[0])
        rec = Reconciler(rs, interval=300.0, share=1.0, limiter=client.limiter,
                         clock=lambda: now[0], concurrency=1, discover=True, idle=0.05)
        # conf_fresh changed 100 s ago (< interval): skipped. Conferences before routed calls,
        # the one longest without an event first.
        assert rec.due(now[0]) == [conf_old.id, conf_new.id, routed_old.id]
        assert rec.stats.last_fresh == 1
        await rec.discover_unknown(now[0])
        assert rec.stats.discovered_unknown == 1
        assert rec.due(now[0])[0] == lost.id  # unknown to the store: read first of all
        stop = asyncio.Event()
        task = asyncio.create_task(rec.run(stop))
        try:
            await wait_until(lambda: rec.stats.reads == 4, what="four reads")
            assert _gets(sb) == [lost.id, conf_old.id, conf_new.id, routed_old.id]
            assert engine.store.get(ConversationId(lost.id)) is not None
            # Just read: nothing is due until an interval has passed without an event.
            assert rec.due(now[0]) == []
            now[0] += 301.0  # an interval later every call is due again, conf_fresh too
            await wait_until(lambda: rec.stats.reads >= 9, what="the next round")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    # Round two: conferences first, conf_fresh (longest without an event or read) leading.
    second = _gets(sb)[4:]
    assert second[0] == conf_fresh.id and set(second[1:3]) == {conf_old.id, conf_new.id}
    assert set(second[3:]) == {lost.id, routed_old.id}
    assert rec.stats.errors == 0


async def test_reconciliation_stays_within_its_share(sandbox_factory: Any) -> None:
    sb: Sandbox = await sandbox_factory(request_budget=40)  # share 0.25: 10 reads a window
    w = sb.world
    q = w.create_queue("Sales").id
    calls = [w.start_call(q) for _ in range(30)]
    now = [time.time()]
    engine = make_engine()
    for c in calls:
        engine.apply_conversation(w.get_call(c.id).rest_body(), now[0] - 1000, source="resync")
    async with client_for(sb, rpm=300) as client:
        await client.get_call(calls[0].id, priority=Priority.NORMAL)
        assert await client.read_budget_limit() == 40  # learn the allowance (no headers today)
        assert client.limiter.allowed == 40
        rs = Resyncer(client, engine, Scope(queue_ids=(QueueId(q),)), on_decisions=lambda d: None,
                      clock=lambda: now[0])
        rec = Reconciler(rs, interval=300.0, share=0.25, limiter=client.limiter,
                         clock=lambda: now[0], discover=False)
        stop = asyncio.Event()
        task = asyncio.create_task(rec.run(stop))
        try:
            await wait_until(lambda: client.limiter.waiting(Priority.RESYNC) > 0
                           and rec.stats.reads == 10, what="the share to be spent")
            await asyncio.sleep(0.2)
            assert rec.stats.reads == 10 and client.limiter.tag_used("reconcile") == 10
            # The rest of the window is there for everybody else, removals first.
            conv = calls[-1]
            assert await asyncio.wait_for(client.disconnect_participant(
                conv.id, conv.participants[0].id), 5) == 202
            await asyncio.wait_for(client.get_call(calls[1].id, priority=Priority.NORMAL), 5)
            await asyncio.wait_for(client.get_call(calls[2].id, priority=Priority.RESYNC), 5)
            assert rec.stats.reads == 10
        finally:
            stop.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    statuses = [r.status for r in sb.journal.requests if r.path.startswith("/api/v2/")]
    assert 429 not in statuses
    assert len(sb.journal.find("GET", CALLS)) == 1 + 10 + 2


async def test_a_gap_resync_skips_calls_updated_since_it_began(sandbox_factory: Any) -> None:
    sb: Sandbox = await sandbox_factory()
    w = sb.world
    q = w.create_queue("Sales").id
    now = [time.time()]
    engine = make_engine()
    stale, fresh = w.start_call(q), w.start_call(q)
    engine.apply_conversation(w.get_call(stale.id).rest_body(), now[0] - 60, source="resync")
    # An event for `fresh` lands after the resync began (its clock reads now).
    engine.apply_conversation(w.get_call(fresh.id).rest_body(), now[0] + 5, source="resync")
    async with client_for(sb) as client:
        rs = Resyncer(client, engine, Scope(queue_ids=(QueueId(q),)), on_decisions=lambda d: None,
                      clock=lambda: now[0])
        report = await asyncio.wait_for(rs.resync("reconnect"), 10)
    assert report.calls == 2 and report.fresh == 1 and report.updated == 1
    assert _gets(sb) == [stale.id]


def test_reconciler_uses_only_the_resyncers_public_api() -> None:
    """Issue 17: reconciliation reads, discovers and delivers through `Resyncer`'s public
    API; daemon/genesys/reconcile.py touches no private member of another object."""
    import ast
    from pathlib import Path

    import daemon.genesys.reconcile as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    private = [f"{ast.unparse(n)} (line {n.lineno})" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]
    assert private == []


def test_reconciliation_order_ages_so_nothing_waits_forever() -> None:
    """Sans-I/O over `due()`: a routed call unread for a class' worth (`interval`) longer
    than a due conference goes before it; one unread less long stays behind."""
    now = 100_000.0
    engine = make_engine()

    def body(cid: str, purposes: list[str]) -> dict[str, Any]:
        return {"id": cid, "participants": [
            {"id": f"{cid}-{i}", "purpose": p, "state": "connected", "calls": [{"state": "connected"}]}
            for i, p in enumerate(purposes)]}

    engine.apply_conversation(body("conf", ["customer", "agent", "external"]), now - 400, source="resync")
    engine.apply_conversation(body("routed_old", ["customer", "agent"]), now - 1100, source="resync")
    engine.apply_conversation(body("routed", ["customer", "agent"]), now - 600, source="resync")
    rs = Resyncer(None, engine, Scope(), clock=lambda: now)  # type: ignore[arg-type]
    rec = Reconciler(rs, interval=300.0, share=0.25, clock=lambda: now, discover=False)
    # keys: conf -400, routed_old -1100 + 300 = -800, routed -600 + 300 = -300
    assert rec.due(now) == ["routed_old", "conf", "routed"]
