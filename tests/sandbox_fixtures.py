"""Pytest fixtures for the Genesys Cloud sandbox (daemon.sandbox), for every engineer's tests.

Registered from tests/conftest.py via `pytest_plugins = ["tests.sandbox_fixtures"]`.

    async def test_x(sandbox):            # a started Sandbox on 127.0.0.1:<ephemeral>
        q = sandbox.world.create_queue("Sales")          # heartbeat every 1 s
        ...
    async def test_y(sandbox, sandbox_client):          # + an authenticated aiohttp helper
        ch = await sandbox_client.channel([f"v2.routing.queues.{q.id}.conversations.calls"])
        msg = await ch.next_event()
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from daemon.sandbox import Sandbox


class Socket:
    """A notification WebSocket with bounded waits."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, channel_id: str) -> None:
        self.ws = ws
        self.channel_id = channel_id

    async def recv(self, timeout: float = 5.0) -> Any:
        """The next message parsed as JSON (raw str if malformed); None when closed."""
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            return None
        try:
            return orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return msg.data

    async def wait_for(self, pred: Callable[[Any], bool], timeout: float = 5.0,
                       max_messages: int = 10_000) -> Any:
        """The first message satisfying `pred`; TimeoutError / AssertionError if none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(max_messages):
            left = deadline - loop.time()
            if left <= 0:
                break
            m = await self.recv(left)
            if m is None:
                raise AssertionError("socket closed before the expected message")
            if pred(m):
                return m
        raise TimeoutError("expected message did not arrive")

    async def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next call event (skips heartbeats and other metadata)."""
        m: dict[str, Any] = await self.wait_for(
            lambda m: isinstance(m, dict) and str(m.get("topicName", "")).endswith(
                ".conversations.calls"), timeout)
        return m

    async def send(self, data: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(data).decode())

    async def close(self) -> None:
        await self.ws.close()


class SandboxClient:
    """A thin authenticated client for the sandbox (tests only)."""

    def __init__(self, sb: Sandbox, session: aiohttp.ClientSession) -> None:
        self.sb = sb
        self.session = session
        self.token = ""

    async def login(self, client_id: str | None = None, secret: str | None = None) -> str:
        cred = f"{client_id or self.sb.client_id}:{secret or self.sb.client_secret}"
        async with self.session.post(
                self.sb.base_url + "/oauth/token", data={"grant_type": "client_credentials"},
                headers={"Authorization": "Basic " + base64.b64encode(cred.encode()).decode()},
        ) as r:
            assert r.status == 200, await r.text()
            self.token = str((await r.json())["access_token"])
        return self.token

    async def request(self, method: str, path: str, json: Any = None,
                      token: str | None = None) -> tuple[int, Any, aiohttp.ClientResponse]:
        """(status, parsed JSON body or None, response) for an /api/v2 call."""
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        async with self.session.request(method, self.sb.base_url + path, json=json,
                                        headers=headers) as r:
            raw = await r.read()
            body = orjson.loads(raw) if raw else None
            return r.status, body, r

    async def connect(self, connect_uri: str, channel_id: str) -> Socket:
        ws = await self.session.ws_connect(connect_uri, autoping=True, heartbeat=None)
        return Socket(ws, channel_id)

    async def channel(self, topics: list[str]) -> Socket:
        """Create a channel, PUT `topics` on it and open its socket."""
        if not self.token:
            await self.login()
        st, ch, _ = await self.request("POST", "/api/v2/notifications/channels")
        assert st == 200, ch
        st, body, _ = await self.request(
            "PUT", f"/api/v2/notifications/channels/{ch['id']}/subscriptions",
            [{"id": t} for t in topics])
        assert st == 200, body
        return await self.connect(ch["connectUri"], ch["id"])


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A started Sandbox (127.0.0.1, ephemeral port, 1 s heartbeat); stopped afterwards."""
    sb = Sandbox(heartbeat_interval=1.0, closing_grace=0.5, seed=1234)
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
async def sandbox_factory() -> AsyncIterator[Callable[..., Awaitable[Sandbox]]]:
    """`await sandbox_factory(**Sandbox kwargs)` -> a started Sandbox; all stopped afterwards."""
    started: list[Sandbox] = []

    async def make(**kw: Any) -> Sandbox:
        kw.setdefault("heartbeat_interval", 1.0)
        kw.setdefault("closing_grace", 0.5)
        sb = Sandbox(**kw)
        await sb.start()
        started.append(sb)
        return sb

    try:
        yield make
    finally:
        for sb in started:
            await sb.stop()


@pytest.fixture
async def sandbox_client(sandbox: Sandbox) -> AsyncIterator[SandboxClient]:
    """A logged-in `SandboxClient` for the `sandbox` fixture."""
    async with aiohttp.ClientSession() as s:
        c = SandboxClient(sandbox, s)
        await c.login()
        yield c
