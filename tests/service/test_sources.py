"""The source protocol (`daemon.service.sources`): a source that is not the WebSocket drives
the real daemon end to end. The fake source below delivers the sandbox's call changes as
frames in the WebSocket shape and asks for re-reads; REST (scope, resync, the re-read's GET,
the PATCH) is the sandbox over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog.testing

from _daemon_harness import SALES, audit_records, sandbox_queue, wait_until, write_config
from daemon.config import load_config
from daemon.core.events import CallEvent, Heartbeat
from daemon.core.topics import queue_topic
from daemon.genesys.scope import Scope
from daemon.sandbox import Sandbox
from daemon.sandbox.world import Conversation
from daemon.service.assembly import SourceContext
from daemon.service.lifecycle import Daemon, State
from daemon.service.sources import SourceHealth

AGENT = "a11ce000-0000-4000-8000-00000000000a"


class FakeSource:
    """Delivers every change of the sandbox's calls as a frame, unless `muted`."""

    name = "fake"
    required = True

    def __init__(self, ctx: SourceContext, sandbox: Sandbox) -> None:
        self.sink = ctx.sink
        self.clock = ctx.clock
        self.scopes: list[Scope] = [ctx.scope]
        self.resyncs: list[float | None] = []
        self.messages: list[Any] = []
        self.muted = False
        self.state: Any = "starting"
        self._stop = asyncio.Event()
        self._sandbox = sandbox

    def _on_change(self, conv: Conversation) -> None:
        if self.muted:
            return
        frame = orjson.dumps({"topicName": queue_topic(SALES), "eventBody": conv.event_body()})
        self.messages.append(self.sink.frame(frame, self.clock(), source=self.name))

    async def start(self) -> None:
        self._sandbox.world.listeners.append(self._on_change)
        self.state = "up"

    async def run(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self._sandbox.world.listeners.remove(self._on_change)
        self.state = "stopped"
        self._stop.set()

    async def apply_scope(self, scope: Scope) -> None:
        self.scopes.append(scope)

    def resynced(self, started_at: float | None) -> None:
        self.resyncs.append(started_at)

    def health(self) -> SourceHealth:
        return SourceHealth(self.state, self.state == "up", {"messages": len(self.messages)})


@contextlib.asynccontextmanager
async def daemon_with_fake_source(sb: Sandbox, folder: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Daemon, FakeSource]]:
    sandbox_queue(sb)
    if AGENT not in sb.world.users:
        sb.world.create_user("Alice Agent", AGENT)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sb.client_id)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sb.client_secret)
    path = write_config(folder, sb.base_url, ops=False)
    made: list[FakeSource] = []

    def fake(ctx: SourceContext) -> FakeSource:
        made.append(FakeSource(ctx, sb))
        return made[-1]

    daemon = Daemon(load_config(path), config_path=path, drain_timeout=1.0, sources=(fake,))
    await asyncio.wait_for(daemon.start(), 20)
    try:
        (source,) = made
        yield daemon, source
    finally:
        await asyncio.wait_for(daemon.stop(), 20)


async def test_a_fake_source_drives_the_daemon_end_to_end(sandbox: Sandbox, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async with daemon_with_fake_source(sandbox, tmp_path, monkeypatch) as (daemon, source):
        assert daemon.state is State.RUNNING
        assert source.resyncs == [None]  # told when the start-up resync completed
        assert [s.queue_ids for s in source.scopes] == [(SALES,)]
        health = daemon.health()
        assert health.ready and health.sources == {"fake": {"state": "up", "ready": True, "messages": 0}}
        assert daemon.stream is None  # no WebSocket at all: the fake source is the only input

        # (a) frames: a flagged external party is removed by one PATCH
        w = sandbox.world
        conv = w.start_call(SALES)
        w.connect_agent(conv.id, AGENT)
        ext = w.add_external(conv.id, "tel:+14155550123", name="Partner")
        w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
        await wait_until(lambda: conv.party(ext.id).state == "disconnected", 10, "the removal")
        patches = [r for r in sandbox.journal.patches(conv.id) if r.path.endswith(ext.id)]
        assert len(patches) == 1 and patches[0].body == {"state": "disconnected"}
        assert all(isinstance(m, CallEvent) for m in source.messages)  # parsed once, handed back
        await wait_until(lambda: [r for r in audit_records(tmp_path)
                                  if r["type"] == "outcome" and r["participant_id"] == ext.id], 10,
                         "the outcome record")
        (outcome,) = [r for r in audit_records(tmp_path)
                      if r["type"] == "outcome" and r["participant_id"] == ext.id]
        assert outcome["outcome"] == "disconnected"

        # (b) "re-read this call now": a change the source never delivered as a frame
        source.muted = True
        conv2 = w.start_call(SALES)
        w.connect_agent(conv2.id, AGENT)
        ext2 = w.add_external(conv2.id, "tel:+14155550124", name="Other")
        w.set_attributes(conv2.id, ext2.id, {"complianceFlag": "true"})
        source.muted = False
        assert daemon.engine.store.get(conv2.id) is None
        gets = len(sandbox.journal.find("GET", f"/api/v2/conversations/calls/{conv2.id}"))
        results = await asyncio.gather(source.sink.reread(conv2.id, source="fake"),
                                       source.sink.reread(conv2.id, source="fake"))
        assert results == [True, True]
        # coalesced: the two requests shared one GET
        assert len(sandbox.journal.find("GET", f"/api/v2/conversations/calls/{conv2.id}")) == gets + 1
        await wait_until(lambda: conv2.party(ext2.id).state == "disconnected", 10, "the second removal")

        # malformed input is counted by source: a frame refused whole, and a message that
        # never became a frame
        with structlog.testing.capture_logs() as logs:
            msg = source.sink.frame(b"{not json", 0.0, source="fake")
            source.sink.reject(source="fake", reason="not_an_envelope", excerpt="<xml/>")
        assert type(msg).__name__ == "Rejected"
        assert [(e["source"], e["reason"]) for e in logs if e["event"] == "event_rejected"] == [
            ("fake", "not_json"), ("fake", "not_an_envelope")]
        rejected = daemon.metrics.events_rejected
        assert rejected.labels(source="fake", reason="not_json")._value.get() == 1
        assert rejected.labels(source="fake", reason="not_an_envelope")._value.get() == 1

        # a control frame comes back parsed, for the source to act on
        beat = b'{"topicName":"channel.metadata","eventBody":{"message":"WebSocket Heartbeat"}}'
        assert isinstance(source.sink.frame(beat, 0.0, source="fake"), Heartbeat)

        # a gap reported by the source: degraded until the resync completes, then told
        source.sink.gap("fake_gap", source="fake")
        assert daemon.state is State.DEGRADED and not daemon.health().ready
        await wait_until(lambda: daemon.state is State.RUNNING and len(source.resyncs) == 2, 10,
                         "the resync after the gap")
        assert source.resyncs[1] is not None

        # a source not ready makes a required one's daemon not ready, with its state shown
        source.state = "degraded"
        assert not daemon.health().ready
        assert daemon.health().sources["fake"]["state"] == "degraded"
        source.state = "up"
    assert source.state == "stopped"
