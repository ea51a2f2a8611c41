"""HA failure handling (issue 12, item 5) with real daemons, one sandbox, one PostgreSQL.

Each test runs `confguard run` child processes with `ha.backend: postgres` and
takeover_after 2 s (tests/_ha_harness.py). Leader SIGKILL is the failover test
(tests/e2e/test_failover.py); here: a frozen leader (SIGSTOP) and its resumption, the
database restarted, the database unreachable at start-up, both hosts started at once, and
SIGTERM handing the lease over.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from _ha_harness import (TAKEOVER, audit, flag, flagged_call, ha_daemon, healthz, new_lease,
                         ok_patches, wait_ops, wait_role, wait_until)
from _postgres import PostgresServer, postgres  # noqa: F401  (fixture)
from daemon.sandbox import Sandbox


async def _pair(sb: Sandbox, pg: PostgresServer, tmp_path: Path, lease: str) -> tuple:  # type: ignore[type-arg]
    a = ha_daemon(sb, pg, tmp_path / "a", "host-a", lease)
    b = ha_daemon(sb, pg, tmp_path / "b", "host-b", lease)
    await a.start()
    await b.start()
    await wait_ops(a)
    await wait_ops(b)
    await a.wait_http("/readyz", 200, 30)
    await b.wait_http("/readyz", 200, 30)
    return a, b


async def _roles(*ds: object) -> list[str | None]:
    out = []
    for d in ds:
        h = await healthz(d)  # type: ignore[arg-type]
        out.append(h.get("role") if h else None)
    return out


async def _until_roles(a: object, b: object, want: list[str], timeout: float, *,
                       poll: float = 0.1) -> None:
    """Poll both daemons' /healthz roles until, sorted, they are `want`; fail with the
    roles seen after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while sorted(roles := await _roles(a, b), key=str) != want:
        assert time.monotonic() < deadline, roles
        await asyncio.sleep(poll)


async def test_both_started_at_once_exactly_one_leader_and_sigterm_hands_over(
        sandbox: Sandbox, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    a, b = await _pair(sandbox, postgres, tmp_path, new_lease())
    try:
        await _until_roles(a, b, ["leader", "standby"], 15)
        for _ in range(20):  # stays exactly one leader across several renewals
            roles = await _roles(a, b)
            assert roles.count("leader") <= 1, roles
            await asyncio.sleep(0.1)
        leader, standby = (a, b) if (await _roles(a))[0] == "leader" else (b, a)
        h = await healthz(leader)
        assert h is not None and set(h) >= {"role", "epoch", "node", "lease_age"}
        assert h["node"] in ("host-a", "host-b") and isinstance(h["epoch"], int)
        metrics = await leader.metrics()
        assert 'confguard_ha_role{role="leader"} 1.0' in metrics
        assert 'confguard_ha_role{role="standby"} 0.0' in metrics

        t0 = time.monotonic()
        leader.send(signal.SIGTERM)
        assert await leader.wait_exit(20) == 0
        await wait_role(standby, "leader", TAKEOVER)  # handed back: no wait for the expiry
        took = time.monotonic() - t0
        assert took < TAKEOVER + 1, took
        agent = sandbox.world.create_user("Agent").id
        conv, cust = flagged_call(sandbox, agent)
        flag(sandbox, conv, cust)
        await wait_until(lambda: ok_patches(sandbox, conv, cust), 10, "the new leader's removal")
    finally:
        await a.close()
        await b.close()


async def test_frozen_leader_is_replaced_and_sends_nothing_when_resumed(
        sandbox: Sandbox, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    a, b = await _pair(sandbox, postgres, tmp_path, new_lease())
    agent = sandbox.world.create_user("Agent").id
    try:
        await wait_until(lambda: True, 0.1)
        await _until_roles(a, b, ["leader", "standby"], 15)
        leader, standby = (a, b) if (await _roles(a))[0] == "leader" else (b, a)
        old_client = f"client-{(await healthz(leader) or {})['node']}"

        leader.send(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            await wait_role(standby, "leader", TAKEOVER + 3)
            took = time.monotonic() - stopped
            # Parties flagged while the old leader is frozen: the new leader removes them.
            conv1, cust1 = flagged_call(sandbox, agent)
            flag(sandbox, conv1, cust1)
            await wait_until(lambda: ok_patches(sandbox, conv1, cust1), 10, "removal by the new leader")
        finally:
            leader.send(signal.SIGCONT)
        assert took <= TAKEOVER + 3, took
        # The resumed old leader finds it lost the lease...
        body = await wait_role(leader, "standby", 10)
        assert body["epoch"] == (await healthz(standby) or {})["epoch"]
        # ...and, deciding as standby, sends nothing.
        conv2, cust2 = flagged_call(sandbox, agent)
        flag(sandbox, conv2, cust2)
        await wait_until(lambda: ok_patches(sandbox, conv2, cust2), 10, "removal by the new leader")
        await wait_until(lambda: any(r.get("outcome") == "standby" and r.get("participant_id") == cust2.id
                                     for r in audit(leader)), 10, "the old leader's standby record")
        resumed_patches = [r for r in sandbox.journal.patches()
                           if r.client_id == old_client and r.time >= stopped]
        assert resumed_patches == [], [(r.path, r.status) for r in resumed_patches]
        for conv, cust in ((conv1, cust1), (conv2, cust2)):
            assert len(ok_patches(sandbox, conv, cust)) == 1
        for d in (a, b):  # the resumption was handled as a database failure, not a crash
            assert d.events("ha_attempt_crashed") == []
    finally:
        await a.close()
        await b.close()


async def test_database_restart_both_fail_closed_then_one_reacquires_and_acts_at_once(
        sandbox: Sandbox, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    a, b = await _pair(sandbox, postgres, tmp_path, new_lease())
    agent = sandbox.world.create_user("Agent").id
    try:
        await _until_roles(a, b, ["leader", "standby"], 15)
        postgres.stop("fast")
        try:
            await _until_roles(a, b, ["no-lease", "no-lease"], 5, poll=0.05)
            # No lease, no PATCH: a party flagged now is decided (standby) on both hosts.
            conv, cust = flagged_call(sandbox, agent)
            flag(sandbox, conv, cust)
            for d in (a, b):
                await wait_until(lambda d=d: any(r.get("outcome") == "standby" and r.get("participant_id") == cust.id
                                                 for r in audit(d)), 10, "standby decision")
            await asyncio.sleep(0.5)
            assert ok_patches(sandbox, conv, cust) == []
        finally:
            postgres.start()
        # One re-acquires, and acts at once on the party flagged during the outage (the
        # call has no further event: the removal comes from the state in memory).
        await wait_until(lambda: ok_patches(sandbox, conv, cust), TAKEOVER + 10, "removal after re-acquiring")
        # the other reconnects at its next poll
        await _until_roles(a, b, ["leader", "standby"], 5, poll=0.05)
        await asyncio.sleep(0.5)
        assert len(ok_patches(sandbox, conv, cust)) == 1
    finally:
        await a.close()
        await b.close()


async def test_database_unreachable_at_start_up_waits_without_enforcing(
        sandbox: Sandbox, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    lease = new_lease()
    postgres.stop("fast")
    d = ha_daemon(sandbox, postgres, tmp_path / "a", "host-a", lease)
    agent = sandbox.world.create_user("Agent").id
    try:
        await d.start()
        await wait_ops(d)
        await d.wait_event("ha_db_unreachable", 15)
        await wait_role(d, "no-lease", 15)
        await d.wait_http("/readyz", 200, 30)  # the pipeline runs; only sending waits
        conv, cust = flagged_call(sandbox, agent)
        flag(sandbox, conv, cust)
        await wait_until(lambda: any(r.get("outcome") == "standby" for r in audit(d)), 10, "standby record")
        assert ok_patches(sandbox, conv, cust) == []
        postgres.start()
        await wait_role(d, "leader", TAKEOVER + 10)
        await wait_until(lambda: ok_patches(sandbox, conv, cust), 10, "removal once the lease is held")
    finally:
        if not (postgres.data / "postmaster.pid").exists():
            postgres.start()
        await d.close()
