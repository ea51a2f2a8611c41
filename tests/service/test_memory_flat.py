"""Memory stays flat: 10,000 calls start and end through the running daemon, over the
sandbox's real sockets, and what the daemon keeps afterwards is a small, bounded residue
(the ids of recently ended calls), not the calls themselves."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import daemon
from daemon.config import parse_config
from daemon.service.lifecycle import Daemon

CALLS = 10_000
BATCH = 250
DAEMON_DIR = str(Path(daemon.__file__).parent)


def daemon_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated by the daemon's own modules (the in-process sandbox excluded)."""
    traces = snapshot.filter_traces([tracemalloc.Filter(True, DAEMON_DIR + "/*"),
                                     tracemalloc.Filter(False, DAEMON_DIR + "/sandbox/*")])
    return sum(s.size for s in traces.statistics("filename"))


async def play(sandbox: Any, d: Daemon, queue_id: str, n: int) -> None:
    """Start and end `n` calls, in batches; wait (bounded) until the daemon has seen every
    published event, then let ended calls pass their grace period and be evicted."""
    w = sandbox.world

    def published() -> int:
        return sum(1 for e in sandbox.journal.events if e.sockets)

    # Both counted from here: the daemon's count goes on across plays while the sandbox's
    # journal is cleared between them, so a wait on the totals passed early by the
    # warm-up's events and the last batch could still be in flight at the eviction.
    seen0, published0 = sum(d.engine.call_events.values()), published()
    for start in range(0, n, BATCH):
        for _ in range(min(BATCH, n - start)):
            w.end_call(w.start_call(queue_id).id)
        target = published() - published0
        deadline = time.monotonic() + 30
        while sum(d.engine.call_events.values()) - seen0 < target:
            assert time.monotonic() < deadline, "daemon fell behind the sandbox"
            await asyncio.sleep(0.01)
    # Past the ended-call grace: evict. Repeated, bounded (30 s), in case a call's last event
    # is still on its way (seen once on a loaded machine: one call left).
    deadline = time.monotonic() + 30
    while True:
        d.engine.tick(time.time() + 3600)
        if len(d.engine.store) == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(d.engine.store) == 0
    assert d.rules.tracked_calls == 0


@pytest.mark.slow
async def test_memory_flat_after_10000_calls_start_and_end(sandbox: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sandbox.client_id)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sandbox.client_secret)
    sandbox.faults.extra_field = False
    q = sandbox.world.create_queue("Q").id
    text = f"""
genesys: {{api_base_url: "{sandbox.base_url}", login_base_url: "{sandbox.base_url}"}}
subscriptions: {{queues: ["{q}"], reconcile_interval: 0}}
rules:
  - name: flagged
    when: {{purpose: external, attributes.complianceFlag: "true"}}
    action: disconnect
audit: {{path: "{tmp_path / 'audit.jsonl'}"}}
ops: {{enabled: false}}
logging: {{level: warning}}
"""
    d = Daemon(parse_config(text, file="config.yaml", base_dir=tmp_path))
    await asyncio.wait_for(d.start(), 20)
    try:
        await play(sandbox, d, q, 500)  # warm-up: caches, interned strings, first allocations
        sandbox.journal.clear()
        tracemalloc.start()
        try:
            before = daemon_bytes(tracemalloc.take_snapshot())
            await play(sandbox, d, q, CALLS)
            after = daemon_bytes(tracemalloc.take_snapshot())
        finally:
            tracemalloc.stop()
    finally:
        await d.stop()
    residue = (after - before) / CALLS
    print(f"daemon residue after {CALLS} calls started and ended: {residue:.0f} B/call")
    # A live call costs about 5 KB; keeping ended calls would show as thousands of bytes per
    # call. What may remain is the bounded memory of recently evicted ids (~200 B each).
    assert residue < 400, f"{residue:.0f} bytes per ended call retained"
