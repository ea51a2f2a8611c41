"""The canonical log line: one `event` line per processed frame at debug level, none above."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.config import parse_config
from daemon.service.logs import configure_logging
from daemon.service.lifecycle import Daemon
from _logging_state import preserved_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with preserved_logging():
        yield


def _config(sandbox: Any, tmp_path: Path, queue_id: str) -> Any:
    text = f"""
genesys: {{api_base_url: "{sandbox.base_url}", login_base_url: "{sandbox.base_url}"}}
subscriptions: {{queues: ["{queue_id}"]}}
rules:
  - name: flagged
    when: {{purpose: external, attributes.complianceFlag: "true"}}
    action: disconnect
audit: {{path: "{tmp_path / 'audit.jsonl'}"}}
ops: {{listen: "127.0.0.1:0"}}
"""
    return parse_config(text, file="config.yaml", base_dir=tmp_path)


def _flagged_event_line(logs: list[dict[str, Any]]) -> bool:
    return any(e.get("event") == "event" and e.get("decisions") == ["flagged"] for e in logs)


def _decision_line(logs: list[dict[str, Any]]) -> bool:
    return any(e.get("event") == "decision" for e in logs)


async def _run_one_call(sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        done: Callable[[list[dict[str, Any]]], bool] = _flagged_event_line,
                        ) -> tuple[list[dict[str, Any]], str]:
    """One flagged call through the daemon; waits (bounded, 10 s) until `done(logs)` holds:
    the flagged frame's `event` line at debug, or its `decision` line (the frame was
    processed) when `event` lines must be absent."""
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sandbox.client_id)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sandbox.client_secret)
    q = sandbox.world.create_queue("Q")
    agent = sandbox.world.create_user("A")
    daemon = Daemon(_config(sandbox, tmp_path, q.id))
    with capture_logs() as logs:
        await asyncio.wait_for(daemon.start(), 20)
        try:
            call = sandbox.world.start_call(q.id)
            sandbox.world.connect_agent(call.id, agent.id)
            ext = sandbox.world.add_external(call.id, "tel:+14155550123")
            sandbox.world.set_attributes(call.id, ext.id, {"complianceFlag": "true"})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not done(logs):
                await asyncio.sleep(0.02)
        finally:
            await daemon.stop()
    return logs, call.id


async def test_one_event_line_per_processed_frame_at_debug(sandbox: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("debug", "json", stream=sys.stderr)
    logs, call_id = await _run_one_call(sandbox, tmp_path, monkeypatch)
    lines = [e for e in logs if e.get("event") == "event" and e.get("conversation_id") == call_id]
    # start_call, connect_agent, add_external, set_attributes, then the disconnect itself.
    assert len(lines) >= 4
    flagged = [e for e in lines if e["decisions"] == ["flagged"]]
    assert len(flagged) == 1
    assert flagged[0]["kind"] == "CallEvent" and flagged[0]["topic"].startswith("v2.routing.queues.")
    assert flagged[0]["changed"] and flagged[0]["processing_us"] >= 0


async def test_no_event_lines_above_debug(sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("info", "json", stream=sys.stderr)
    # Waits for the flagged frame's decision (processed after every earlier frame of the
    # call), not for an `event` line that must never come (that waited the full 10 s).
    logs, _ = await _run_one_call(sandbox, tmp_path, monkeypatch, done=_decision_line)
    assert any(e.get("event") == "decision" for e in logs)  # the daemon did process the call
    assert not [e for e in logs if e.get("event") == "event"]
