"""The control API in an HA pair (real PostgreSQL, two `confguard run` child processes):
the standby answers 503 naming the leader's node and sends nothing; the leader removes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from _daemon_harness import DaemonProcess
from _ha_harness import ha_daemon, healthz, new_lease, wait_ops
from _postgres import PostgresServer, postgres  # noqa: F401  (fixture)
from daemon.sandbox import Sandbox

TOKEN = "ha-control-token-0123456789abcdef"
CONTROL = """control:
  listen: 127.0.0.1:0
  callers:
    orchestrator: {token_file: orchestrator.token}
"""


def _with_control(d: DaemonProcess) -> DaemonProcess:
    (d.folder / "orchestrator.token").write_text(TOKEN + "\n")
    (d.folder / "orchestrator.token").chmod(0o600)
    d.config.write_text(d.config.read_text() + CONTROL)
    return d


async def test_standby_answers_503_with_the_leader_and_the_leader_removes(
        sandbox: Sandbox, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    lease = new_lease()
    a = _with_control(ha_daemon(sandbox, postgres, tmp_path / "a", "host-a", lease))
    b = _with_control(ha_daemon(sandbox, postgres, tmp_path / "b", "host-b", lease))
    await a.start()
    await b.start()
    try:
        await wait_ops(a)
        await wait_ops(b)
        ports = {d: int((await d.wait_event("control_listening", 30))["port"]) for d in (a, b)}
        deadline = time.monotonic() + 20
        roles: dict[str, DaemonProcess] = {}
        while set(roles) != {"leader", "standby"}:
            assert time.monotonic() < deadline, roles
            roles = {}
            for d in (a, b):
                h = await healthz(d)
                if h and h.get("role") in ("leader", "standby"):
                    roles[str(h["role"])] = d
            await asyncio.sleep(0.1)
        leader, standby = roles["leader"], roles["standby"]
        leader_node = "host-a" if leader is a else "host-b"
        w = sandbox.world
        conv = w.start_call(w.queues[next(iter(w.queues))].id)
        ext = w.add_external(conv.id, "tel:+14155550654")
        body = {"conversationId": conv.id, "participantId": ext.id, "reason": "ha test"}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            async with s.post(f"http://127.0.0.1:{ports[standby]}/v1/ejections", json=body,
                              headers=headers) as r:
                err = await r.json()
                assert r.status == 503, err
                assert err["code"] == "not_leader" and err["leader"] == leader_node, err
            assert sandbox.journal.patches(conv.id) == []
            async with s.post(f"http://127.0.0.1:{ports[leader]}/v1/ejections", json=body,
                              headers=headers) as r:
                assert r.status == 202, await r.text()
                eid = (await r.json())["id"]
            state = "pending"
            for _ in range(200):  # bounded: 200 x 50 ms
                async with s.get(f"http://127.0.0.1:{ports[leader]}/v1/ejections/{eid}",
                                 headers=headers) as r:
                    state = (await r.json())["state"]
                if state != "pending":
                    break
                await asyncio.sleep(0.05)
            assert state == "disconnected"
        assert len(sandbox.journal.patches(conv.id)) == 1
    finally:
        await a.close()
        await b.close()
