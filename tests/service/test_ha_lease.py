"""The PostgreSQL lease (daemon.service.ha.HaNode) against a real PostgreSQL server.

Each test uses its own lease name on one module-scoped server (tests/_postgres.py), so the
tests do not see each other's rows. takeover_after is 1 s here: every wait is bounded by a
few multiples of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from structlog.testing import capture_logs

from _wait import wait_until
from _postgres import PostgresServer, postgres  # noqa: F401  (fixture)
from daemon.core.lease import LeasePolicy, Role
from daemon.service.ha import HaNode, mask_dsn
from daemon.service.metrics import Metrics

TAKEOVER = 1.0
_names = itertools.count()


class Pair:
    """Nodes running their lease loops as tasks, stopped at the end."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.lease = f"test-{time.time_ns()}-{next(_names)}"
        self.stops: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.nodes: dict[str, HaNode] = {}
        self.terms: list[tuple[str, int]] = []

    def node(self, name: str, *, dsn: str | None = None, metrics: Metrics | None = None) -> HaNode:
        n = HaNode(dsn or self.dsn, lease=self.lease, node=name, policy=LeasePolicy(TAKEOVER),
                   metrics=metrics, on_term=lambda e, name=name: self.terms.append((name, e)))
        self.nodes[name] = n
        return n

    def run(self, name: str) -> None:
        self.stops[name] = asyncio.Event()
        self.tasks[name] = asyncio.create_task(self.nodes[name].run(self.stops[name]))

    async def halt(self, name: str, *, release: bool = True) -> None:
        self.stops[name].set()
        await asyncio.wait_for(self.tasks[name], 10)
        if release:
            await self.nodes[name].release()

    async def a_leads_b_stands_by(self) -> None:
        """Run node "a" until it leads, then node "b" until it is the standby (both made
        with `node()` first)."""
        a, b = self.nodes["a"], self.nodes["b"]
        self.run("a")
        await wait_until(a.may_send, 5, "a leader")
        self.run("b")
        await wait_until(lambda: b.role is Role.STANDBY, 5, "b standby")

    def leaders(self) -> list[str]:
        return [k for k, n in self.nodes.items() if n.may_send()]

    async def close(self) -> None:
        for stop in self.stops.values():
            stop.set()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                await n.release()


@pytest.fixture
async def pair(postgres: PostgresServer) -> AsyncIterator[Pair]:  # noqa: F811
    p = Pair(postgres.dsn)
    try:
        yield p
    finally:
        await p.close()


async def test_two_nodes_started_at_once_elect_exactly_one_leader(pair: Pair) -> None:
    m = Metrics()
    a, b = pair.node("a", metrics=m), pair.node("b")
    pair.run("a")
    pair.run("b")
    await wait_until(lambda: len(pair.leaders()) == 1 and all(n.role is not Role.NO_LEASE
                                                          for n in (a, b)), 5, "one leader")
    for _ in range(int(3 * TAKEOVER / 0.05)):  # stays exactly one over several renewals
        assert len(pair.leaders()) <= 1
        await asyncio.sleep(0.05)
    leader = pair.nodes[pair.leaders()[0]]
    standby = b if leader is a else a
    assert leader.epoch == 1 and standby.role is Role.STANDBY and standby.epoch == 1
    assert leader.renewals["ok"] >= 3 and leader.renewals["lost"] == 0
    assert pair.terms == [(leader.node, 1)]
    h = leader.health()
    assert h["role"] == "leader" and h["epoch"] == 1 and h["node"] == leader.node
    assert 0 <= h["lease_age"] < TAKEOVER
    hs = standby.health()
    assert hs["role"] == "standby" and 0 <= hs["lease_age"] < TAKEOVER  # the leader's renewal, seen
    text = m.render().decode()
    role = "leader" if leader is a else "standby"
    assert f'confguard_ha_role{{role="{role}"}} 1.0' in text
    assert 'confguard_ha_epoch 1.0' in text


async def test_release_hands_over_at_once_with_a_new_epoch(pair: Pair) -> None:
    a, b = pair.node("a"), pair.node("b")
    await pair.a_leads_b_stands_by()
    t0 = time.monotonic()
    await pair.halt("a")
    assert not a.may_send()
    await wait_until(b.may_send, 3, "b leader")
    assert time.monotonic() - t0 < TAKEOVER  # did not wait for the lease to expire
    assert b.epoch == 2


async def test_killed_leader_is_replaced_before_its_lease_expires(pair: Pair, postgres: PostgresServer) -> None:  # noqa: F811
    """A killed process's session ends, so its advisory lock frees: no wait for expiry."""
    a, b = pair.node("a"), pair.node("b")
    await pair.a_leads_b_stands_by()
    pair.stops["a"].set()  # a stops renewing...
    await asyncio.wait_for(pair.tasks["a"], 5)
    t0 = time.monotonic()
    a._conn.terminate()  # ...and its socket closes, as when the kernel reaps a killed process
    await wait_until(b.may_send, 5, "b leader")
    assert b.epoch == 2
    assert time.monotonic() - t0 < TAKEOVER + 0.5


async def test_frozen_leader_loses_the_lease_and_sends_nothing_when_it_wakes(pair: Pair) -> None:
    a, b = pair.node("a"), pair.node("b")
    await pair.a_leads_b_stands_by()
    # Freeze a: no more renewals, but its connection (and advisory lock) stay open.
    pair.stops["a"].set()
    await asyncio.wait_for(pair.tasks["a"], 5)
    frozen_at = time.monotonic()
    await wait_until(lambda: not a.may_send(), TAKEOVER, "a's lease to run out locally")
    assert not b.may_send()  # the standby waits for the database's expiry...
    await wait_until(b.may_send, TAKEOVER + 3, "b leader")
    assert time.monotonic() - frozen_at >= TAKEOVER * 0.9  # ...not earlier
    assert b.epoch == 2
    # a wakes up: its session was ended by b; the renewal fails, then finds epoch 2.
    assert not a.may_send()
    await a.attempt()
    assert not a.may_send()
    await a.attempt()
    assert a.role is Role.STANDBY and a.epoch == 2 and not a.may_send()
    assert a.renewals["failed"] + a.renewals["lost"] >= 1
    assert b.may_send()


async def test_database_restart_fails_both_closed_then_one_reacquires(pair: Pair, postgres: PostgresServer) -> None:  # noqa: F811
    a, b = pair.node("a"), pair.node("b")
    pair.run("a")
    pair.run("b")
    await wait_until(lambda: len(pair.leaders()) == 1 and b.role is not Role.NO_LEASE
                and a.role is not Role.NO_LEASE, 5, "one leader")
    first = pair.leaders()[0]
    postgres.stop("fast")
    try:
        # The leader's connection closes: it stops sending at once (termination listener).
        await wait_until(lambda: not pair.leaders(), 1.0, "no leader while the database is down")
        await asyncio.sleep(TAKEOVER)
        assert not pair.leaders()
        assert a.role is Role.NO_LEASE and b.role is Role.NO_LEASE
    finally:
        postgres.start()
    await wait_until(lambda: len(pair.leaders()) == 1, 10, "a leader again")
    for _ in range(20):
        assert len(pair.leaders()) <= 1
        await asyncio.sleep(0.05)
    assert pair.nodes[pair.leaders()[0]].epoch >= 1
    assert first in pair.nodes


async def test_unreachable_database_at_start_up_waits_without_a_lease(pair: Pair, postgres: PostgresServer) -> None:  # noqa: F811
    with socket_port() as port:
        dead = f"postgresql://confguard@127.0.0.1:{port}/postgres"
        a = pair.node("a", dsn=dead)
        pair.run("a")
        await asyncio.sleep(TAKEOVER)
        assert a.role is Role.NO_LEASE and not a.may_send()
        assert a.health()["role"] == "no-lease" and a.health()["lease_age"] is None


async def test_decision_rows_are_visible_to_the_other_node(pair: Pair) -> None:
    a, b = pair.node("a"), pair.node("b")
    pair.run("a")
    await wait_until(a.may_send, 5, "a leader")
    pair.run("b")
    a.record_intent("c1", "p1", "flagged")
    a.record_intent("c2", "p2", "flagged")
    a.record_outcome("c2", "p2", "flagged", "disconnected")
    await wait_until(lambda: not a._writes, 5, "rows written")
    rows = await b.recent_decisions(60)
    got = {(r.conversation_id, r.node, r.epoch, r.outcome) for r in rows}
    assert got == {("c1", "a", 1, None), ("c2", "a", 1, "disconnected")}
    assert [r.conversation_id for r in rows] == ["c1", "c2"]  # oldest first
    open_row = next(r for r in rows if r.outcome is None)
    await b.close_decision(open_row.id, "unknown")
    rows = await b.recent_decisions(60)
    assert {r.outcome for r in rows} == {"unknown", "disconnected"}


async def test_lease_row_by_the_database_clock(pair: Pair) -> None:
    a = pair.node("a")
    pair.run("a")
    await wait_until(a.may_send, 5, "a leader")
    conn = await asyncpg.connect(pair.dsn)
    try:
        row = await conn.fetchrow("SELECT holder, epoch, expires_at - renewed_at AS ttl "
                                  "FROM confguard_lease WHERE name = $1", pair.lease)
    finally:
        await conn.close()
    assert row["holder"] == "a" and row["epoch"] == 1
    assert abs(row["ttl"].total_seconds() - TAKEOVER) < 0.05


def test_mask_dsn_hides_the_password() -> None:
    assert mask_dsn("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert mask_dsn("postgresql://u@db/x") == "postgresql://u@db/x"


@contextlib.contextmanager
def socket_port() -> object:
    """A 127.0.0.1 port with nothing listening on it (bound, not listening)."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


async def test_decision_writer_survives_a_crash_and_writes_the_rows_later(pair: Pair) -> None:
    """A bug in the row writer (not a database error) is logged and the writer goes on:
    queued rows are not left to pile up unseen. (Injected: a server cannot produce it.)"""
    a = pair.node("a")
    real = a._flush_writes
    crashes = 0

    async def flaky() -> bool:
        nonlocal crashes
        if crashes == 0 and a._writes:
            crashes += 1
            raise RuntimeError("injected bug")
        return await real()

    a._flush_writes = flaky  # type: ignore[method-assign]
    with capture_logs() as logs:
        pair.run("a")
        await wait_until(a.may_send, 5, "a leader")
        a.record_intent("c1", "p1", "flagged")
        await wait_until(lambda: not a._writes, 10, "row written after the crash")
    assert crashes == 1
    assert any(e["event"] == "ha_writer_crashed" for e in logs)
    rows = await a.recent_decisions(60)
    assert [r.conversation_id for r in rows] == ["c1"]
