"""daemon.genesys.transport: httpx's API over aiohttp, against real servers on 127.0.0.1.

What goes out is what httpx built (headers, body); what comes back is an httpx.Response;
every aiohttp failure is the httpx exception GenesysClient's retry policy already knows,
and reaches callers of GenesysClient as TransportError naming it.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from aiohttp import web

from daemon.config import Credentials, GenesysSettings
from daemon.errors import TransportError
from daemon.genesys.api import GenesysClient
from daemon.genesys.transport import AiohttpTransport

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Route], Awaitable[str]]]:
    """Start an aiohttp server on 127.0.0.1 (ephemeral port) answering every path with
    the given handler; returns its origin. Stopped at the end of the test."""
    runners: list[web.AppRunner] = []

    async def start(handler: Route) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for r in runners:
        await r.cleanup()


async def test_request_goes_out_as_httpx_built_it_and_the_answer_comes_back(serve) -> None:
    seen: list[tuple[str, str, dict[str, str], bytes]] = []
    peers: set[object] = set()

    async def handler(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        seen.append((request.method, request.path_qs, dict(request.headers), await request.read()))
        return web.json_response({"ok": True}, status=202, reason="Accepted",
                                 headers={"inin-correlation-id": "c-1"})

    origin = await serve(handler)
    async with httpx.AsyncClient(transport=AiohttpTransport(),
                                 headers={"User-Agent": "confguard/0.1",
                                          "Accept": "application/json"}) as c:
        r1 = await c.patch(origin + "/api/v2/x/y?a=1", json={"state": "disconnected"},
                           headers={"Authorization": "Bearer t"})
        r2 = await c.get(origin + "/api/v2/z")
    assert r1.status_code == 202 and r1.reason_phrase == "Accepted"
    assert r1.json() == {"ok": True} and r1.headers["inin-correlation-id"] == "c-1"
    method, path, headers, body = seen[0]
    assert (method, path, body) == ("PATCH", "/api/v2/x/y?a=1", b'{"state":"disconnected"}')
    assert headers["User-Agent"] == "confguard/0.1" and headers["Accept"] == "application/json"
    assert headers["Authorization"] == "Bearer t" and headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))
    # A GET without a body gets no Content-Type from aiohttp.
    assert seen[1][0] == "GET" and "Content-Type" not in seen[1][2] and seen[1][3] == b""
    assert r2.status_code == 202
    assert len(peers) == 1, "the second request reused the kept-alive connection"


async def test_compressed_answer_is_decoded_by_httpx(serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b'{"id": "c1"}'), status=200,
                            headers={"Content-Encoding": "gzip",
                                     "Content-Type": "application/json"})

    origin = await serve(handler)
    async with httpx.AsyncClient(transport=AiohttpTransport()) as c:
        r = await c.get(origin + "/x")
    assert r.json() == {"id": "c1"}


async def test_connection_refused_is_connect_error() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with httpx.AsyncClient(transport=AiohttpTransport()) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{port}/x")


async def test_server_closing_without_an_answer_is_remote_protocol_error() -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(f"http://127.0.0.1:{port}/x")
    finally:
        server.close()
        await server.wait_closed()


async def test_read_timeout_is_read_timeout(serve) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 10.0)
        return web.Response(status=200)

    origin = await serve(slow)
    try:
        async with httpx.AsyncClient(transport=AiohttpTransport(),
                                     timeout=httpx.Timeout(5.0, read=0.2)) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get(origin + "/x")
    finally:
        release.set()


async def test_closed_transport_refuses_and_genesys_client_reports_transport_error(serve) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok-123456789", "expires_in": 3600})

    origin = await serve(ok)
    t = AiohttpTransport()
    async with httpx.AsyncClient(transport=t) as c:
        assert (await c.get(origin + "/x")).status_code == 200
    with pytest.raises(httpx.TransportError):
        await t.handle_async_request(httpx.Request("GET", origin + "/x"))

    # GenesysClient uses this transport by default; a refused connection is the
    # TransportError its callers know, naming the httpx exception.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = GenesysSettings(api_base_url=f"http://127.0.0.1:{port}", login_base_url=origin,
                               max_retries=0)
    async with GenesysClient(settings, Credentials("id", "secret")) as client:
        assert isinstance(client._http._transport, AiohttpTransport)
        with pytest.raises(TransportError, match="ConnectError"):
            await client.get_call("c1")
