"""Issue 19, HA: two `confguard run` nodes (PostgreSQL lease, tests/_ha_harness.py), each
consuming its own SQS queue (moto on 127.0.0.1) fed by the sandbox as an EventBridge rule
with two targets. The standby consumes too (its state stays warm) but acts only after the
take-over; nobody is removed twice."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from _daemon_harness import SALES, DaemonProcess, sample
from _ha_harness import (TAKEOVER, audit, flag, flagged_call, ha_daemon, healthz, new_lease, ok_patches,
                         wait_ops, wait_role, wait_until)
from _moto import MotoServer, moto_server, unique_name  # noqa: F401
from _postgres import PostgresServer, postgres  # noqa: F401  (fixture)

from daemon.sandbox import Sandbox


def with_queue(d: DaemonProcess, moto: MotoServer, url: str) -> DaemonProcess:
    text = d.config.read_text().replace("subscriptions:\n", "subscriptions:\n  reconcile_interval: 0\n", 1)
    d.config.write_text(text + f"eventbridge:\n  queue_url: {url}\n  endpoint_url: {moto.endpoint_url}\n"
                               f"  wait_seconds: 2\n")
    return d


async def test_each_node_its_own_queue_standby_warm_leader_acts_once(
        moto_server: MotoServer, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    qa, qb = moto_server.create_queue(unique_name("ha-a")), moto_server.create_queue(unique_name("ha-b"))
    sb = Sandbox(heartbeat_interval=1.0, closing_grace=0.5, eventbridge_queue_url=[qa, qb],
                 eventbridge_endpoint_url=moto_server.endpoint_url)
    sb.faults.eventbridge_delay = 1.0
    await sb.start()
    lease = new_lease()
    a = with_queue(ha_daemon(sb, postgres, tmp_path / "a", "host-a", lease), moto_server, qa)
    b = with_queue(ha_daemon(sb, postgres, tmp_path / "b", "host-b", lease), moto_server, qb)
    agent = sb.world.create_user("Agent").id
    try:
        await a.start()
        await wait_ops(a)
        await a.wait_http("/readyz", 200, 30)
        await wait_role(a, "leader", 15)
        await b.start()
        await wait_ops(b)
        await b.wait_http("/readyz", 200, 30)
        await wait_role(b, "standby", 15)
        for d in (a, b):
            await d.wait_event("eventbridge_started", 20)

        # 1. Lost on the WebSocket (both nodes): both queues carry it. The leader removes it
        #    once; the standby consumes its own queue as well.
        conv1, cust1 = flagged_call(sb, agent)
        await asyncio.sleep(1.5)  # the call's own queue messages come and go first
        sb.faults.lose_change("websocket", conv1.id)
        flag(sb, conv1, cust1)
        await wait_until(lambda: ok_patches(sb, conv1, cust1), 15, "the leader's removal")
        assert {r.client_id for r in ok_patches(sb, conv1, cust1)} == {"client-host-a"}
        eb = sb.eventbridge
        assert eb is not None
        for d in (a, b):  # every message of both queues handled and deleted
            await d.wait_metrics(lambda t: eb.pending == 0 and (sample(
                t, "confguard_source_messages_total", source="eventbridge", stage="deleted") or 0)
                >= eb.stats.sent // 2, 15, "the node's queue consumed")

        # 2. The leader freezes; a flag lost on the WebSocket reaches the standby's queue. It
        #    acts only once it holds the lease; the old leader, resumed, sends nothing.
        conv2, cust2 = flagged_call(sb, agent)
        await asyncio.sleep(1.5)
        sb.faults.eventbridge_delay = 0.0  # the queue now beats the lease's expiry (>= 1.3 s)
        a.send(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            sb.faults.lose_change("websocket", conv2.id)
            flag(sb, conv2, cust2)
            # the standby decides from its queue while standby: audited, nothing sent ...
            await wait_until(lambda: any(r.get("outcome") == "standby" and r.get("participant_id") == cust2.id
                                         for r in audit(b)), 15, "the standby's decision from its own queue")
            # ... and removes the party once it holds the lease
            await wait_role(b, "leader", TAKEOVER + 5)
            await wait_until(lambda: ok_patches(sb, conv2, cust2), 15, "the new leader's removal")
            assert {r.client_id for r in ok_patches(sb, conv2, cust2)} == {"client-host-b"}
        finally:
            a.send(signal.SIGCONT)
        assert time.monotonic() - stopped < 60
        await wait_role(a, "standby", 15)
        # the old leader now consumes its queue's backlog (conv2's flag among it): no PATCH
        await a.wait_metrics(lambda t: (sample(t, "confguard_source_messages_total", source="eventbridge",
                                               stage="deleted") or 0) >= 4, 20, "the resumed node's backlog")
        await asyncio.sleep(1.0)
        for conv, cust in ((conv1, cust1), (conv2, cust2)):
            assert len(ok_patches(sb, conv, cust)) == 1, conv.id
        assert SALES in sb.world.queues
        h = await healthz(b)
        assert h is not None and h["sources"]["eventbridge"]["state"] == "up"
    finally:
        await a.close()
        await b.close()
        await sb.stop()
