"""Two `confguard run` daemons with `ha.backend: postgres`, one sandbox, one PostgreSQL.

Each daemon is a child process (tests/_daemon_harness.DaemonProcess) with its own folder,
audit file and OAuth client (so the sandbox's journal tells whose PATCH it was), contending
for one lease on the test's PostgreSQL server (tests/_postgres.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import orjson

from _daemon_harness import (FLAGGED_RULE, SALES, DaemonProcess, credentials_env, read_jsonl,
                             sandbox_queue, wait_until, write_config)
from _postgres import PostgresServer
from daemon.sandbox import Sandbox
from daemon.sandbox.world import Conversation, Party

TAKEOVER = 2.0  # seconds: ha.takeover_after in these tests
_leases = itertools.count()


def new_lease() -> str:
    return f"ha-test-{time.time_ns()}-{next(_leases)}"


def ha_daemon(sb: Sandbox, pg: PostgresServer, folder: Path, node: str, lease: str, *,
              takeover: float = TAKEOVER, dsn: str | None = None) -> DaemonProcess:
    """A daemon (not started) for node `node` in `folder`, with its own OAuth client
    `client-<node>`, enforcing the flagged-party rule on the Sales queue."""
    sandbox_queue(sb)
    client_id = f"client-{node}"
    if client_id not in sb.world.clients:
        sb.world.add_client(client_id, f"secret-{node}")
    cfg = write_config(folder, sb.base_url, rules=FLAGGED_RULE, extra_top=(
        f"ha:\n  backend: postgres\n  dsn: {dsn or pg.dsn}\n  lease: {lease}\n"
        f"  takeover_after: {takeover:g}s\n  node: {node}\n"))
    cfg.write_text(cfg.read_text().replace("max_disconnects_per_minute: 30",
                                           "max_disconnects_per_minute: 1000"))
    env = credentials_env(sb, GENESYSCLOUD_OAUTHCLIENT_ID=client_id,
                          GENESYSCLOUD_OAUTHCLIENT_SECRET=f"secret-{node}")
    return DaemonProcess(cfg, env, folder)


async def healthz(d: DaemonProcess) -> dict[str, Any] | None:
    """The /healthz body, or None when the daemon does not answer."""
    try:
        status, body = await d.get("/healthz")
    except Exception:  # noqa: BLE001 - not listening (yet), frozen, or gone
        return None
    if status != 200:
        return None
    out: dict[str, Any] = orjson.loads(body)
    return out


async def wait_ops(d: DaemonProcess, timeout: float = 30.0) -> None:
    rec = await d.wait_event("ops_listening", timeout)
    d.ops_port = int(rec["port"])


async def wait_role(d: DaemonProcess, role: str, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: dict[str, Any] | None = None
    while loop.time() < deadline:
        d._alive_check()
        last = await asyncio.wait_for(healthz(d), 5)
        if last is not None and last.get("role") == role:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{d.folder.name} not {role} within {timeout} s (last {last})\n{d.text()[-3000:]}")


def audit(d: DaemonProcess) -> list[dict[str, Any]]:
    return read_jsonl(d.folder / "audit" / "audit.jsonl")


def flagged_call(sb: Sandbox, agent_id: str) -> tuple[Conversation, Party]:
    """A Sales call with an agent and a customer (not yet flagged)."""
    sandbox_queue(sb)
    w = sb.world
    conv = w.start_call(SALES)
    w.connect_agent(conv.id, agent_id)
    cust = next(p for p in conv.participants if p.purpose == "customer")
    return conv, cust


def flag(sb: Sandbox, conv: Conversation, party: Party) -> float:
    """Flag the party (the rule's trigger); returns time.time() of the flag."""
    at = time.time()
    sb.world.set_attributes(conv.id, party.id, {"complianceFlag": "true"})
    return at


def ok_patches(sb: Sandbox, conv: Conversation, party: Party) -> list[Any]:
    return [r for r in sb.journal.patches(conv.id)
            if r.path.endswith(f"/participants/{party.id}") and 200 <= r.status < 300]


__all__ = ["TAKEOVER", "new_lease", "ha_daemon", "healthz", "wait_ops", "wait_role", "audit",
           "flagged_call", "flag", "ok_patches", "wait_until"]
