"""A sandbox + an in-process `Daemon` with the control API on 127.0.0.1:0, and an aiohttp
client for it. Shared by tests/service/test_control*.py, tests/commands (eject --control)
and bench/control.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from _wait import wait_until
from daemon.config import parse_config
from daemon.sandbox import Sandbox
from daemon.service.lifecycle import Daemon

TOKEN = "orchestrator-token-0123456789abcdef"
OTHER_TOKEN = "other-caller-token-fedcba9876543210"


def control_config(tmp: Path, sb: Sandbox, queue_id: str, *, per_minute: int = 10_000,
                   max_disconnects: int = 1000, mode: str = "enforce", rules: str = "[]",
                   extra: str = "", requests_per_minute: int = 300) -> Any:
    (tmp / "orchestrator.token").write_text(TOKEN + "\n")
    (tmp / "other.token").write_text("  " + OTHER_TOKEN + "  \n")
    for name in ("orchestrator.token", "other.token"):
        os.chmod(tmp / name, 0o600)
    text = f"""
genesys: {{api_base_url: "{sb.base_url}", login_base_url: "{sb.base_url}", max_retries: 2,
          requests_per_minute: {requests_per_minute}}}
subscriptions: {{queues: ["{queue_id}"]}}
mode: {mode}
safety: {{max_disconnects_per_minute: {max_disconnects}}}
rules: {rules}
audit: {{path: audit.jsonl, fsync_interval: 0.2}}
ops: {{listen: "127.0.0.1:0"}}
control:
  listen: 127.0.0.1:0
  max_requests_per_minute: {per_minute}
  callers:
    orchestrator: {{token_file: orchestrator.token}}
    other: {{token_file: other.token}}
{extra}"""
    return parse_config(text, file=str(tmp / "config.yaml"), base_dir=tmp)


class ControlClient:
    """Requests to the control API; returns (status, parsed JSON or None, headers)."""

    def __init__(self, session: aiohttp.ClientSession, port: int, token: str | None = TOKEN) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def _headers(self, token: str | None, extra: dict[str, str] | None) -> dict[str, str]:
        h: dict[str, str] = {}
        tok = self.token if token is None else token
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        h.update(extra or {})
        return h

    async def request(self, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                      token: str | None = None, headers: dict[str, str] | None = None
                      ) -> tuple[int, Any, Any]:
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        h = self._headers(token, headers)
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=h) as r:
            payload = await r.read()
            try:
                parsed = orjson.loads(payload) if payload else None
            except orjson.JSONDecodeError:
                parsed = payload
            return r.status, parsed, r.headers

    async def eject(self, body: Any, **kw: Any) -> tuple[int, Any, Any]:
        return await self.request("POST", "/v1/ejections", body=body, **kw)

    async def wait_final(self, ejection_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """Poll GET /v1/ejections/{id} until its state is not pending (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        while loop.time() < deadline:
            st, body, _ = await self.request("GET", f"/v1/ejections/{ejection_id}")
            assert st == 200, body
            last = body
            if body["state"] != "pending":
                return dict(body)
            await asyncio.sleep(0.05)
        raise AssertionError(f"ejection {ejection_id} still pending after {timeout} s: {last}")


@asynccontextmanager
async def control_stack(tmp: Path, **cfg_kw: Any) -> AsyncIterator[tuple[Sandbox, Daemon, ControlClient, str]]:
    """(sandbox, started daemon, client for caller orchestrator, queue id); all stopped after."""
    sb = Sandbox(heartbeat_interval=1.0, closing_grace=0.5, seed=7)
    await sb.start()
    saved = {k: os.environ.get(k) for k in ("GENESYSCLOUD_OAUTHCLIENT_ID", "GENESYSCLOUD_OAUTHCLIENT_SECRET")}
    os.environ["GENESYSCLOUD_OAUTHCLIENT_ID"] = sb.client_id
    os.environ["GENESYSCLOUD_OAUTHCLIENT_SECRET"] = sb.client_secret
    daemon: Daemon | None = None
    try:
        q = sb.world.create_queue("Sales").id
        daemon = Daemon(control_config(tmp, sb, q, **cfg_kw), drain_timeout=2.0)
        await asyncio.wait_for(daemon.start(), 30)
        assert daemon.control is not None and daemon.control.port
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            yield sb, daemon, ControlClient(s, daemon.control.port), q
    finally:
        if daemon is not None:
            await asyncio.wait_for(daemon.stop(), 30)
        await sb.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def wait_tracked(daemon: Daemon, conversation_id: str, participant_id: str,
                       timeout: float = 10.0) -> None:
    """Until the daemon holds the participant in memory (bounded)."""
    def held() -> bool:
        call = daemon.engine.store.get(conversation_id)
        return call is not None and participant_id in call.participants
    await wait_until(held, timeout, f"{conversation_id}/{participant_id} in the daemon's memory")
