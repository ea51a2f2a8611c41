"""Start-up at scale (issue 18), in process over the sandbox with a small budget so the
start-up reads take long: READY comes once the calls are listed, the reads go on after it,
a flag during them is acted on at once (event path), a call nobody has read yet is judged
on its first event, and `/healthz` coverage and the metrics move as reads progress.

Budget 30 a minute: 6 kept for removals, so the start-up reads stop after about 20 calls
until the sliding window frees (61 s); the test is over long before that."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from _daemon_harness import FLAGGED_RULE, sample, sandbox_queue, wait_until, write_config

from daemon.config import load_config
from daemon.core.ids import ConversationId
from daemon.sandbox import Sandbox
from daemon.service.lifecycle import Daemon

CALLS = 40
CONFERENCES = 10


async def test_reads_after_ready_flags_acted_on_at_once_coverage_moves(
        sandbox_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sb: Sandbox = await sandbox_factory(request_budget=30)
    q = sandbox_queue(sb)
    w = sb.world
    agent = w.create_user("Agent").id
    calls = []
    for i in range(CALLS):
        conv = w.start_call(q, ani=f"tel:+1415555{i:04d}")
        w.connect_agent(conv.id, agent)
        if i >= CALLS - CONFERENCES:  # listed last by analytics, read first
            w.add_external(conv.id, f"tel:+1212555{i:04d}")
        calls.append(conv)
    cfg = write_config(tmp_path, sb.base_url, rules=FLAGGED_RULE, ops=False)
    cfg.write_text(cfg.read_text().replace("level: info", "level: warning"))
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sb.client_id)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sb.client_secret)
    daemon = Daemon(load_config(cfg), drain_timeout=1.0)
    t0 = time.monotonic()
    await asyncio.wait_for(daemon.start(), 30)
    try:
        ready_after = time.monotonic() - t0
        assert ready_after < 10  # not the minutes the 40 reads take at this budget
        assert daemon.health().ready  # /readyz is true while coverage builds
        cov0 = daemon.health().details["coverage"]
        assert cov0["calls_known"] == CALLS and cov0["calls_read"] < CALLS
        # The reads go on after READY, conferences first: every conference is read soon.
        await wait_until(lambda: daemon.health().details["coverage"]["conferences_unread"] == 0,
                         15, "the conferences read")
        read_ids = [c.id for c in calls if not daemon.coverage.is_unread(ConversationId(c.id))]
        assert {c.id for c in calls[-CONFERENCES:]} <= set(read_ids)
        await wait_until(lambda: daemon.client is not None
                         and daemon.client.limiter.waiting(daemon_priority_resync()) > 0, 15,
                         "the reads to wait for the budget")
        # The oldest unread call ages (the field is rounded to 0.1 s, so on a fast machine
        # it can still read 0.0 the moment the reads start waiting).
        cov = await wait_until(lambda: (c := daemon.health().details["coverage"])
                               ["oldest_unread_seconds"] > 0 and c, 10, "the unread calls to age")
        assert CONFERENCES <= cov["calls_read"] < CALLS
        text = daemon.metrics.render().decode()
        assert sample(text, "confguard_calls_unread") == CALLS - cov["calls_read"]
        assert sample(text, "confguard_coverage_oldest_unread_seconds") is not None
        # A call not read yet: its first event (a flag) carries the whole conversation and
        # is judged on it at once; the budget's reserve lets the removal go.
        unread = next(c for c in calls if daemon.coverage.is_unread(ConversationId(c.id)))
        read = calls[-1]  # a conference, read by now
        for conv in (unread, read):
            cust = next(p for p in conv.participants if p.purpose == "customer")
            flagged = time.monotonic()
            w.set_attributes(conv.id, cust.id, {"complianceFlag": "true"})
            await wait_until(lambda c=conv, p=cust: c.party(p.id).state == "disconnected", 10,
                             f"the flagged customer of {conv.id} removed")
            assert time.monotonic() - flagged < 10
        assert not daemon.coverage.is_unread(ConversationId(unread.id))  # the event read it
        assert daemon.client is not None and daemon.client.limiter.waiting(daemon_priority_resync()) > 0
    finally:
        await asyncio.wait_for(daemon.stop(), 20)
    assert not [r for r in sb.journal.requests if r.status == 429]
    assert not [r for r in sb.journal.requests if r.method == "PATCH" and r.status >= 300]


def daemon_priority_resync() -> Any:
    from daemon.genesys.ratelimit import Priority
    return Priority.RESYNC
