"""The PATCH write deadline (`GenesysClient.disconnect_participant(send_budget=...)`, HA's
lease validity minus its margin) over real sockets against the sandbox, with both
transports (confguard's `Http11Transport`, the default, and httpx's own): a PATCH whose body is not written
within the budget (here: waiting for the pool's only connection) is abandoned and raises
NotSentError, and nothing reaches the sandbox even after the path clears; a PATCH with
room is sent; a spent budget sends nothing at all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from daemon.config import Credentials, GenesysSettings
from daemon.errors import NotSentError
from daemon.genesys.api import GenesysClient
from daemon.genesys.ratelimit import RequestLimiter
from daemon.genesys.transport import Http11Transport
from daemon.sandbox import Sandbox

TRANSPORTS: dict[str, Callable[[], httpx.AsyncBaseTransport]] = {
    "http11": lambda: Http11Transport(max_connections=1),
    "httpx": lambda: httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1)),
}


def _client(sb: Sandbox, transport: httpx.AsyncBaseTransport) -> GenesysClient:
    settings = GenesysSettings(api_base_url=sb.base_url, login_base_url=sb.base_url,
                               max_retries=0, connect_timeout=10, read_timeout=10)
    return GenesysClient(settings, Credentials(sb.client_id, sb.client_secret),
                         transport=transport, limiter=RequestLimiter(60000))


def _budget(seconds: float) -> Callable[[], float]:
    deadline = time.monotonic() + seconds
    return lambda: deadline - time.monotonic()


@pytest.mark.parametrize("kind", list(TRANSPORTS))
async def test_an_unwritten_patch_is_abandoned_at_the_deadline_and_never_arrives(
        sandbox: Sandbox, kind: str) -> None:
    w = sandbox.world
    q = w.create_queue("Sales").id
    conv = w.start_call(q)
    ext = w.add_external(conv.id, "tel:+14155550123")
    async with _client(sandbox, TRANSPORTS[kind]()) as client:
        await client.get_call(conv.id)  # token and a pooled connection
        sandbox.faults.latency = 2.0  # the pool's only connection is now busy for 2 s
        busy = asyncio.create_task(client.get_call(conv.id))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(NotSentError, match="abandoned, nothing sent"):
            await client.disconnect_participant(conv.id, ext.id, send_budget=_budget(0.5))
        took = time.monotonic() - started
        assert took < 1.5, took  # cut at the deadline, not after the pool wait
        sandbox.faults.latency = 0.0
        await busy
        await asyncio.sleep(1.0)  # anything still on its way would have arrived by now
        assert sandbox.journal.patches(conv.id) == []
        assert conv.party(ext.id).state != "disconnected"

        # A spent budget: refused before any request exists.
        with pytest.raises(NotSentError, match="deadline had passed"):
            await client.disconnect_participant(conv.id, ext.id, send_budget=lambda: 0.0)
        assert sandbox.journal.patches(conv.id) == []

        # Room enough: sent as usual, over the warm connection.
        status = await client.disconnect_participant(conv.id, ext.id, send_budget=_budget(5.0))
        assert 200 <= status < 300
        (patch,) = sandbox.journal.patches(conv.id)
        assert patch.body == {"state": "disconnected"}
        assert conv.party(ext.id).state == "disconnected"


@pytest.mark.parametrize("kind", list(TRANSPORTS))
async def test_a_caller_cancelling_a_patch_with_a_budget_gets_its_cancellation(
        sandbox: Sandbox, kind: str) -> None:
    """The deadline cancels the caller's own task and takes that back; a cancellation from
    the caller itself (daemon stopping) is not taken back: it propagates as it is, the
    task stays cancelled, and the client serves the next request."""
    w = sandbox.world
    q = w.create_queue("Sales").id
    conv = w.start_call(q)
    ext = w.add_external(conv.id, "tel:+14155550123")
    async with _client(sandbox, TRANSPORTS[kind]()) as client:
        await client.get_call(conv.id)
        sandbox.faults.latency = 2.0
        busy = asyncio.create_task(client.get_call(conv.id))  # holds the only connection
        await asyncio.sleep(0.2)
        patch = asyncio.create_task(
            client.disconnect_participant(conv.id, ext.id, send_budget=_budget(5.0)))
        await asyncio.sleep(0.2)  # waiting for the pool, well within its budget
        patch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(patch, 10.0)
        assert patch.cancelled()
        sandbox.faults.latency = 0.0
        await busy
        assert sandbox.journal.patches(conv.id) == []
        status = await client.disconnect_participant(conv.id, ext.id, send_budget=_budget(5.0))
        assert 200 <= status < 300
