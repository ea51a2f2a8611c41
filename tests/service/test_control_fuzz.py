"""Fuzz the control API's request body (hypothesis) over a real socket: whatever arrives,
the answer is a 4xx with the JSON error shape, never a 5xx, a hang or a crash; and the
daemon still removes a party correctly afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _control_stack import TOKEN, control_stack, wait_tracked
from daemon.service.logs import configure_logging

FIELDS = ["conversationId", "participantId", "userId", "externalContactId", "address", "name",
          "reason"]


class Stack:
    """control_stack() entered on an event loop in a background thread."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="control-fuzz", daemon=True)
        self.tmp = tmp
        self._cm: Any = None
        self.sb: Any = None
        self.daemon: Any = None
        self.q = ""

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _enter(self) -> None:
        self._cm = control_stack(self.tmp, requests_per_minute=100_000)
        self.sb, self.daemon, _api, self.q = await self._cm.__aenter__()

    async def _exit(self) -> None:
        await self._cm.__aexit__(None, None, None)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "daemon.log", "w") as log_file:
        configure_logging("error", "json", stream=log_file)
        s = Stack(Path(tmp))
        s.thread.start()
        try:
            s.run(s._enter())
            yield s
        finally:
            try:
                s.run(s._exit())
            finally:
                s.loop.call_soon_threadsafe(s.loop.stop)
                s.thread.join(10)
                structlog.configure(**saved)
                root.handlers[:], root.level = handlers, level


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
near_valid = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10),
                             json_values | st.text(max_size=200), max_size=7)
bodies = (st.binary(max_size=600)
          | json_values.map(lambda v: json.dumps(v).encode())
          | near_valid.map(lambda v: json.dumps(v).encode()))
# Header values as HTTP allows them (no surrounding blanks); 256+ characters are refused.
keys = st.none() | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                           min_size=1, max_size=300).map(str.strip).filter(bool)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, key=keys)
def test_any_body_gets_a_4xx_json_answer(stack: Stack, body: bytes, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    port = stack.daemon.control.port
    r = httpx.post(f"http://127.0.0.1:{port}/v1/ejections", content=body, headers=headers,
                   timeout=20.0)
    assert 400 <= r.status_code < 500, (r.status_code, r.text, body)
    err = r.json()
    assert set(err) >= {"status", "code", "message"} and err["status"] == r.status_code
    assert isinstance(err["code"], str) and isinstance(err["message"], str)
    assert TOKEN not in r.text


def test_daemon_still_works_after_the_fuzz(stack: Stack) -> None:
    async def go() -> tuple[str, str]:
        w = stack.sb.world
        conv = w.start_call(stack.q)
        ext = w.add_external(conv.id, "tel:+14155550999")
        await wait_tracked(stack.daemon, conv.id, ext.id)
        return conv.id, ext.id
    cid, pid = stack.run(go())
    r = httpx.post(f"http://127.0.0.1:{stack.daemon.control.port}/v1/ejections",
                   json={"conversationId": cid, "participantId": pid},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=20.0)
    assert r.status_code == 202, r.text
    assert stack.run(stack.daemon.control.service.wait("orchestrator", r.json()["id"])) == "disconnected"
    assert stack.daemon.state.value == "running"
