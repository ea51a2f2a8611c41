"""Decisions whose outcome was never written are closed on start-up (this host's own audit)
and on take-over (the old leader's rows in the shared decisions table), issue 12 item 4.

A process killed between a PATCH and its answer leaves a `decision` record with no
`outcome`. These tests write such a trail (or row) by hand, start a real daemon against the
sandbox, and check the closing outcome records: `disconnected` (the party left with
disconnectType client), `already_gone` (left otherwise, or the call is gone) or `unknown`
(still connected: judged again, and removed afresh when it still matches).
"""

from __future__ import annotations

import signal
from pathlib import Path

import asyncpg

from _daemon_harness import (FLAGGED_RULE, DaemonProcess, audit_records, credentials_env,
                             wait_until, write_config)
from _ha_harness import audit, flagged_call, ha_daemon, new_lease, ok_patches, wait_ops, wait_role
from _postgres import PostgresServer, postgres  # noqa: F401  (fixture)
from daemon.sandbox import Sandbox
from daemon.service.audit import AuditLog, verify
from daemon.service.ha import SCHEMA
from daemon.service.recovery import Unfinished, judge_unfinished, unfinished_in_audit


def _decision(rule: str, cid: str, pid: str) -> dict[str, object]:
    return {"type": "decision", "rule": rule, "conversation_id": cid, "participant_id": pid,
            "action": "disconnect", "mode": "enforce", "purpose": "customer", "matched": {},
            "severity": "critical", "tags": [], "message": None, "decided_at": 1.0,
            "received_at": 1.0}


def _outcome(rule: str, cid: str, pid: str, outcome: str) -> dict[str, object]:
    return {"type": "outcome", "rule": rule, "conversation_id": cid, "participant_id": pid,
            "action": "disconnect", "outcome": outcome, "http_status": 202, "attempts": 1,
            "event_to_request_ms": 1.0, "error": None}


def test_unfinished_in_audit_pairs_decisions_with_outcomes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=1 << 20) as log:
        log.write(_decision("r", "c1", "p1"))
        log.write(_outcome("r", "c1", "p1", "disconnected"))
        log.write(_decision("r", "c2", "p2"))  # never answered
        log.write({**_decision("r", "c3", "p3"), "mode": "observe"})  # nothing was to be sent
        log.write(_outcome("r", "c3", "p3", "observed"))
        log.write(_decision("r", "c4", "p4"))
        log.write(_outcome("r", "c4", "p4", "standby"))
    assert unfinished_in_audit(path) == [Unfinished("r", "c2", "p2")]
    assert unfinished_in_audit(tmp_path / "missing.jsonl") == []


def test_judge_unfinished() -> None:
    party = {"id": "p", "state": "disconnected", "disconnectType": "client"}
    assert judge_unfinished({"participants": [party]}, "p")[0] == "disconnected"
    assert judge_unfinished({"participants": [{**party, "disconnectType": "endpoint"}]}, "p")[0] == "already_gone"
    assert judge_unfinished({"participants": [{**party, "state": "connected"}]}, "p")[0] == "unknown"
    assert judge_unfinished({"participants": []}, "p")[0] == "already_gone"
    assert judge_unfinished(None, "p")[0] == "already_gone"
    assert judge_unfinished({"participants": "x"}, "p")[0] == "unknown"


async def test_start_up_closes_decisions_left_without_an_outcome(sandbox: Sandbox, tmp_path: Path) -> None:
    """ha.backend none: the daemon's own trail, read at start-up before anything is sent."""
    w = sandbox.world
    agent = w.create_user("Agent").id
    live, live_cust = flagged_call(sandbox, agent)
    w.set_attributes(live.id, live_cust.id, {"complianceFlag": "true"})  # still matches
    removed, removed_cust = flagged_call(sandbox, agent)
    w.disconnect(removed.id, removed_cust.id, "client")  # the old PATCH landed
    gone_id = "0000dead-0000-4000-8000-000000000000"  # the call no longer exists

    cfg = write_config(tmp_path, sandbox.base_url, rules=FLAGGED_RULE)
    with AuditLog(tmp_path / "audit" / "audit.jsonl", max_bytes=1 << 20) as log:
        for cid, pid in ((live.id, live_cust.id), (removed.id, removed_cust.id), (gone_id, "p-gone")):
            log.write(_decision("flagged-party", cid, pid))
    d = DaemonProcess(cfg, credentials_env(sandbox), tmp_path)
    try:
        await d.start()
        await d.wait_ready()
        await wait_until(lambda: len([r for r in audit_records(tmp_path) if r.get("closed_on") == "startup"]) == 3,
                         15, "three closing records")
        # The party still connected and still flagged is judged again and removed afresh.
        await wait_until(lambda: ok_patches(sandbox, live, live_cust), 10, "fresh removal")
        d.send(signal.SIGTERM)
        assert await d.wait_exit() == 0
    finally:
        await d.close()
    closing = {r["conversation_id"]: r for r in audit_records(tmp_path) if r.get("closed_on") == "startup"}
    assert closing[live.id]["outcome"] == "unknown" and "still 'connected'" in closing[live.id]["error"]
    assert closing[removed.id]["outcome"] == "disconnected"
    assert closing[gone_id]["outcome"] == "already_gone" and "404" in closing[gone_id]["error"]
    assert all(r["type"] == "outcome" and r["action"] == "disconnect" and r["attempts"] == 0
               for r in closing.values())
    assert ok_patches(sandbox, removed, removed_cust) == []  # nothing sent for what was done
    assert verify([tmp_path / "audit"]).ok
    # A second start finds nothing left to close.
    assert unfinished_in_audit(tmp_path / "audit" / "audit.jsonl") == []


async def test_take_over_closes_the_old_leaders_unfinished_rows(
        sandbox: Sandbox, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    """An old leader ("host-x", epoch 7) wrote a row for a PATCH and died before the answer.
    The new leader re-reads that call, closes the row and audits the closing outcome."""
    lease = new_lease()
    w = sandbox.world
    agent = w.create_user("Agent").id
    conv, cust = flagged_call(sandbox, agent)
    w.disconnect(conv.id, cust.id, "client")  # the old leader's PATCH landed
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await conn.execute(SCHEMA)
        await conn.execute("INSERT INTO confguard_lease (name, holder, epoch, expires_at) "
                           "VALUES ($1, 'host-x', 7, clock_timestamp() - interval '1 s') "
                           "ON CONFLICT (name) DO NOTHING", lease)
        await conn.execute("INSERT INTO confguard_decisions (lease, node, epoch, conversation_id, "
                           "participant_id, rule) VALUES ($1, 'host-x', 7, $2, $3, 'flagged-party')",
                           lease, conv.id, cust.id)
        # A row of this node's own earlier run: left to its own audit trail, not closed here.
        await conn.execute("INSERT INTO confguard_decisions (lease, node, epoch, conversation_id, "
                           "participant_id, rule) VALUES ($1, 'host-a', 3, 'c-own', 'p-own', 'flagged-party')",
                           lease)
        d = ha_daemon(sandbox, postgres, tmp_path / "a", "host-a", lease)
        try:
            await d.start()
            await wait_ops(d)
            body = await wait_role(d, "leader", 15)
            assert body["epoch"] == 8  # the fencing token moved on from the old leader's
            await d.wait_event("ha_takeover_done", 15)
            closing = [r for r in audit(d) if r.get("closed_on") == "takeover"]
            assert len(closing) == 1
            rec = closing[0]
            assert rec["outcome"] == "disconnected" and rec["closes"] == {"node": "host-x", "epoch": 7}
            assert rec["node"] == "host-a" and rec["epoch"] == 8
            rows = dict(await conn.fetch("SELECT node, outcome FROM confguard_decisions WHERE lease = $1", lease))
            assert rows == {"host-x": "disconnected", "host-a": None}
            assert ok_patches(sandbox, conv, cust) == []  # no second PATCH
            d.send(signal.SIGTERM)
            assert await d.wait_exit() == 0
        finally:
            await d.close()
    finally:
        await conn.close()
    assert verify([tmp_path / "a" / "audit"]).ok
