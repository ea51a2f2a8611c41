"""Failover (issue 12, item 7): two daemons as child processes, one sandbox, one PostgreSQL.

Thirty parties on thirty calls are flagged 100 ms apart; the leader is SIGKILLed right after
the tenth flag. Every party must be removed, none twice (at most one 2xx PATCH each),
nobody else touched, and the worst flag-to-removal time at most takeover_after + 3 s. The
restarted old leader comes back as standby, and `audit verify` passes on both hosts' audit
files. takeover_after is 2 s here.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from _ha_harness import (TAKEOVER, audit, flag, flagged_call, ha_daemon, new_lease, ok_patches,
                         wait_ops, wait_role, wait_until)
from _postgres import PostgresServer, postgres  # noqa: F401  (fixture)
from daemon.sandbox import Sandbox
from daemon.service.audit import verify

PARTIES = 30
KILL_AFTER = 10


async def test_leader_sigkill_mid_burst_every_party_removed_once(
        sandbox: Sandbox, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    lease = new_lease()
    a = ha_daemon(sandbox, postgres, tmp_path / "a", "host-a", lease)
    b = ha_daemon(sandbox, postgres, tmp_path / "b", "host-b", lease)
    agent = sandbox.world.create_user("Agent").id
    daemons = [a, b]
    try:
        await a.start()
        await wait_ops(a)
        await wait_role(a, "leader", 20)
        await a.wait_http("/readyz", 200, 20)
        await b.start()
        await wait_ops(b)
        await b.wait_http("/readyz", 200, 20)
        await wait_role(b, "standby", 10)
        leader, standby = a, b

        calls = [flagged_call(sandbox, agent) for _ in range(PARTIES)]
        bystanders = {p.id for conv, _ in calls for p in conv.participants if p.purpose != "customer"}
        flagged_at: dict[str, float] = {}
        for i, (conv, cust) in enumerate(calls, start=1):
            flagged_at[cust.id] = flag(sandbox, conv, cust)
            if i == KILL_AFTER:
                leader.send(signal.SIGKILL)
            await asyncio.sleep(0.1)
        assert await leader.wait_exit(10) == -signal.SIGKILL

        await wait_until(lambda: all(conv.party(c.id).state == "disconnected" for conv, c in calls),
                         TAKEOVER + 15, "every flagged party removed")
        await wait_role(standby, "leader", 5)

        worst = 0.0
        for conv, cust in calls:
            oks = ok_patches(sandbox, conv, cust)
            assert len(oks) == 1, (cust.id, [(r.status, r.client_id) for r in oks])
            worst = max(worst, oks[0].time - flagged_at[cust.id])
        assert worst <= TAKEOVER + 3, f"worst flag-to-removal {worst:.2f} s"
        touched = {r.path.rsplit("/", 1)[1] for r in sandbox.journal.patches()}
        assert touched.isdisjoint(bystanders) and touched == {c.id for _, c in calls}
        senders = {r.client_id for r in sandbox.journal.patches()}
        assert senders <= {"client-host-a", "client-host-b"} and "client-host-b" in senders

        # The old leader comes back as standby.
        restarted = ha_daemon(sandbox, postgres, tmp_path / "a", "host-a", lease)
        daemons.append(restarted)
        await restarted.start()
        await wait_ops(restarted)
        body = await wait_role(restarted, "standby", 20)
        assert body["node"] == "host-a" and body["epoch"] >= 2
        leader_body = await wait_role(standby, "leader", 1)
        assert leader_body["epoch"] == body["epoch"]

        for d in (restarted, standby):
            d.send(signal.SIGTERM)
        assert await restarted.wait_exit(20) == 0
        assert await standby.wait_exit(20) == 0
    finally:
        for d in daemons:
            await d.close()

    for folder in (tmp_path / "a", tmp_path / "b"):
        report = verify([folder / "audit"])
        assert report.ok, report.problem
    records_b = audit(b)
    assert all("node" in r and "epoch" in r for r in records_b)
    assert {r["node"] for r in records_b} == {"host-b"}
    standby_outcomes = [r for r in records_b if r["type"] == "outcome" and r["outcome"] == "standby"]
    assert standby_outcomes, "the standby audited its decisions before the take-over"
    # A `standby` outcome is a decision made while host-b could not send: as the standby
    # (epoch 1), or as the new leader during its take-over re-read (epoch 2: docs/ha.md
    # "Take-over": the gate opens once the old leader's calls are re-read; the flags still
    # arriving then land in that window or not, depending on the machine's load). Each of
    # the latter was acted on when the gate opened: a later epoch-2 `disconnected` record of
    # host-b for the same party (and only one 2xx PATCH for it, checked above).
    assert {r["epoch"] for r in standby_outcomes} <= {1, 2}
    for i, r in enumerate(records_b):
        if r["type"] == "outcome" and r["outcome"] == "standby" and r["epoch"] == 2:
            assert any(later["type"] == "outcome" and later["outcome"] == "disconnected"
                       and later["participant_id"] == r["participant_id"] and later["epoch"] == 2
                       for later in records_b[i + 1:]), (
                "a decision held during the take-over was not acted on when the gate opened", r)
    print(f"\nfailover: worst flag-to-removal {worst:.2f} s (bound {TAKEOVER + 3:g} s)")
