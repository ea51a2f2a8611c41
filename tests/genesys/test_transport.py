"""daemon.genesys.transport: `Http11Transport` (HTTP/1.1 over asyncio protocols, answers
parsed by httptools) against real servers on 127.0.0.1.

What goes out is what httpx built (request line, headers in httpx's order and case, body
whole or streamed); a header holding CR, LF or NUL is refused before anything is sent.
What comes back is an httpx.Response read whole, whatever the answer's framing
(Content-Length, chunked, ended by the close, HEAD, 204, after a 1xx interim answer). The
keep-alive pool takes the warm connection first, holds `max_connections` across origins,
bounds the wait for a connection by the `pool` timeout, and never reuses a connection idle
past `keepalive_expiry` or closed by the server. TLS, cancellation and `aclose()` are shown
on the wire too. Every failure is the httpx exception GenesysClient's retry policy already
knows, and reaches callers of GenesysClient as TransportError naming it.

Servers: aiohttp.web where a well-behaved server will do (`serve`), `asyncio.start_server`
where a test must control or record the bytes (`serve_raw`). Every wait is bounded (`WAIT`);
where a test must know what the client knows (a close it has seen, a request queued for
the pool) it polls the transport's own state with `wait_until`.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from _tls import TestCA
from _wait import wait_until
from aiohttp import web

from daemon.config import Credentials, GenesysSettings
from daemon.errors import TransportError
from daemon.genesys.api import GenesysClient
from daemon.genesys.transport import Http11Transport

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: Seconds: the bound of every wait in this file (a failing test fails, never hangs).
WAIT = 10.0
#: A complete keep-alive answer.
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# ------------------------------------------------------------------ servers and helpers


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start an aiohttp server on 127.0.0.1 (ephemeral port) answering every path with
    the given handler (over TLS with `tls=`); returns its origin. Stopped at the end of
    the test."""
    runners: list[web.AppRunner] = []

    async def start(handler: Route, *, tls: ssl.SSLContext | None = None) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        scheme = "https" if tls is not None else "http"
        return f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for r in runners:
        await r.cleanup()


@pytest.fixture
async def serve_raw() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """Start an asyncio server on 127.0.0.1 (ephemeral port) running `handler(reader,
    writer)` for each connection, which is closed when the handler returns; returns its
    origin. At the end: handlers still running are cancelled, the servers stopped."""
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[object]] = set()

    async def start(handler: RawHandler) -> str:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the client went away; what the test looks at is recorded already
            finally:
                writer.close()
                tasks.discard(task)

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for s in servers:
        s.close()
    running = list(tasks)
    for t in running:
        t.cancel()
    if running:
        await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), WAIT)
    for s in servers:
        await s.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request off the wire: its head (up to and with the blank line) and its body
    (by Content-Length, or de-chunked). IncompleteReadError when the client closes."""
    head = await reader.readuntil(b"\r\n\r\n")
    headers: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
        return head, await reader.readexactly(int(headers.get(b"content-length", b"0")))
    body = b""
    while True:  # ends at the last (empty) chunk, or IncompleteReadError at the close
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return head, body
        body += data[:-2]


@dataclass
class Seen:
    """What a raw server saw: each connection's requests (head and body), in the order
    the connections came, and how many connections have ended."""

    requests: list[list[bytes]] = field(default_factory=list)
    ended: int = 0


def answering(reply: bytes, seen: Seen, *, close: bool = False) -> RawHandler:
    """A raw keep-alive server's handler: each request on a connection gets `reply` (and
    the connection is closed after it when `close`), until the client closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine: list[bytes] = []
        seen.requests.append(mine)
        try:
            while True:  # one request after another, until the client closes
                try:
                    head, body = await read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                mine.append(head + body)
                writer.write(reply)
                await writer.drain()
                if close:
                    return
        finally:
            seen.ended += 1

    return handler


def peer_of(request: web.Request) -> object:
    """The client's address and port as the aiohttp server sees them: one per connection."""
    return request.transport.get_extra_info("peername") if request.transport else None


class Hold:
    """An aiohttp handler that answers each request with its path, except that a request
    for `path` is held (`arrived` set) until `release` is set (at most WAIT seconds).
    `events`: ("start", path) and ("answer", path) in order; `peers`: each request's."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.arrived, self.release = asyncio.Event(), asyncio.Event()
        self.events: list[tuple[str, str]] = []
        self.peers: list[object] = []

    @property
    def paths(self) -> list[str]:
        return [p for kind, p in self.events if kind == "start"]

    async def handle(self, request: web.Request) -> web.Response:
        self.peers.append(peer_of(request))
        self.events.append(("start", request.path))
        if request.path == self.path:
            self.arrived.set()
            await asyncio.wait_for(self.release.wait(), WAIT)
        self.events.append(("answer", request.path))
        return web.Response(text=request.path)


def idle_closed(t: Http11Transport) -> bool:
    """Whether the transport holds idle connections and has seen every one of them closed
    (the pool's own state: what the client knows is what a test must wait for)."""
    conns = [c for cs in t._idle.values() for c in cs]
    return bool(conns) and all(c.closed for c in conns)


def free_port() -> int:
    """A port that was free a moment ago: nobody listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------ the request and the answer


async def test_request_goes_out_as_httpx_built_it_and_the_answer_comes_back(serve) -> None:
    seen: list[tuple[str, str, dict[str, str], bytes]] = []
    peers: set[object] = set()

    async def handler(request: web.Request) -> web.Response:
        peers.add(peer_of(request))
        seen.append((request.method, request.path_qs, dict(request.headers), await request.read()))
        return web.json_response({"ok": True}, status=202, reason="Accepted",
                                 headers={"inin-correlation-id": "c-1"})

    origin = await serve(handler)
    async with httpx.AsyncClient(transport=Http11Transport(),
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
    # A GET without a body gets no Content-Type from httpx.
    assert seen[1][0] == "GET" and "Content-Type" not in seen[1][2] and seen[1][3] == b""
    assert r2.status_code == 202
    assert len(peers) == 1, "the second request reused the kept-alive connection"


async def test_head_on_the_wire_is_httpx_s_and_answer_headers_keep_their_order(serve_raw) -> None:
    """The request line carries httpx's encoded target, the headers follow in httpx's
    order and case, then the body; the answer's status, reason and headers (order, case,
    repeats) come back as sent."""
    seen = Seen()
    reply = (b"HTTP/1.1 201 Created\r\nX-B: 1\r\nX-A: 2\r\nx-b: 3\r\nContent-Length: 4\r\n"
             b"\r\ndone")
    origin = await serve_raw(answering(reply, seen))
    request = httpx.Request("PUT", origin + "/a b?q=\u00e9&r=1", content=b"body",
                            headers=[("X-Zeta", "1"), ("x-alpha", "2"), ("X-Zeta", "3")])
    t = Http11Transport()
    try:
        r = await asyncio.wait_for(t.handle_async_request(request), WAIT)
    finally:
        await t.aclose()
    expected = b"PUT /a%20b?q=%C3%A9&r=1 HTTP/1.1\r\n" + b"".join(
        name + b": " + value + b"\r\n" for name, value in request.headers.raw) + b"\r\nbody"
    assert [n for n, _ in request.headers.raw] == [b"Host", b"X-Zeta", b"x-alpha", b"X-Zeta",
                                                  b"Content-Length"]
    assert seen.requests == [[expected]]
    assert r.status_code == 201 and r.reason_phrase == "Created" and r.content == b"done"
    assert r.headers.raw == [(b"X-B", b"1"), (b"X-A", b"2"), (b"x-b", b"3"),
                             (b"Content-Length", b"4")]


async def test_compressed_answer_is_decoded_by_httpx(serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b'{"id": "c1"}'), status=200,
                            headers={"Content-Encoding": "gzip",
                                     "Content-Type": "application/json"})

    origin = await serve(handler)
    async with httpx.AsyncClient(transport=Http11Transport()) as c:
        r = await c.get(origin + "/x")
    assert r.json() == {"id": "c1"}


@pytest.mark.parametrize("name, value", [
    (b"X-A", b"a\r\nX-Injected: 1"),
    (b"X-A", b"a\nX-Injected: 1"),
    (b"X-A", b"a\rX-Injected: 1"),
    (b"X-A", b"a\0X-Injected"),
    (b"X-Injected: 1\r\nX-A", b"a"),
], ids=["crlf-in-value", "lf-in-value", "cr-in-value", "nul-in-value", "crlf-in-name"])
async def test_header_with_cr_lf_or_nul_is_refused_and_nothing_is_sent(serve_raw, name,
                                                                       value) -> None:
    """A header that would split the head (header injection) is LocalProtocolError before
    any connection is taken: the server only ever sees the good request that follows."""
    seen = Seen()
    origin = await serve_raw(answering(OK, seen))
    t = Http11Transport()
    bad = httpx.Request("GET", origin + "/bad", headers=[(name, value)])
    with pytest.raises(httpx.LocalProtocolError):
        await asyncio.wait_for(t.handle_async_request(bad), WAIT)
    assert t.connections == 0
    good = await asyncio.wait_for(t.handle_async_request(httpx.Request("GET", origin + "/good")),
                                  WAIT)
    assert good.content == b"ok"
    await t.aclose()
    await wait_until(lambda: seen.ended == len(seen.requests) == 1, WAIT,
                     "the server to see the only connection closed")
    assert len(seen.requests[0]) == 1 and seen.requests[0][0].startswith(b"GET /good ")
    assert b"Injected" not in seen.requests[0][0]


# ------------------------------------------------------------------- answer framings


async def test_chunked_answer_is_read_whole_and_the_connection_kept(serve) -> None:
    """A chunked answer (several writes, one larger than a socket read) is read to its
    last chunk; the connection then serves the next request."""
    parts = [b"first,", b"x" * 200_000, b",last"]
    peers: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.append(peer_of(request))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
        await resp.write_eof()
        return resp

    origin = await serve(handler)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        r1 = await c.get(origin + "/x")
        r2 = await c.get(origin + "/y")
    assert r1.headers["transfer-encoding"] == "chunked"
    assert r1.content == r2.content == b"".join(parts)
    assert len(peers) == 2 and len(set(peers)) == 1


async def test_answer_ended_by_the_close_is_read_whole_then_a_new_connection(serve_raw) -> None:
    """An answer without Content-Length or chunked framing ends with the connection: its
    body is read to the close, and the next request opens a new connection."""
    parts = [b"ab", b"cd" * 100_000, b"ef"]
    connections: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        connections.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for part in parts:
            writer.write(part)
            await writer.drain()
        # returning closes the connection: the end of the body

    origin = await serve_raw(handler)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        r1 = await c.get(origin + "/x")
        assert t.connections == 0
        r2 = await c.get(origin + "/y")
    assert r1.content == r2.content == b"".join(parts)
    assert [h.split(b" ")[1] for h in connections] == [b"/x", b"/y"]


@pytest.mark.parametrize("reply, headers", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     [(b"Transfer-Encoding", b"chunked")]),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nok", [(b"X-A", b"1")]),
], ids=["chunked", "ended-by-close"])
async def test_answer_headers_are_those_the_server_sent(serve_raw, reply: bytes,
                                                       headers: list[tuple[bytes, bytes]]
                                                       ) -> None:
    """An answer without a Content-Length (chunked, or ended by the close) comes back with
    the server's headers only: none added (a Content-Length next to `Transfer-Encoding:
    chunked` would contradict it)."""
    origin = await serve_raw(answering(reply, Seen(), close=True))
    t = Http11Transport()
    try:
        r = await asyncio.wait_for(t.handle_async_request(httpx.Request("GET", origin + "/x")),
                                   WAIT)
    finally:
        await t.aclose()
    assert r.content == b"ok"
    assert r.headers.raw == headers


@pytest.mark.parametrize("extra", [
    b"junk\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
], ids=["junk", "second-answer"])
async def test_bytes_after_the_answer_neither_change_it_nor_leave_its_connection_pooled(
        serve_raw, extra: bytes) -> None:
    """Bytes the server sends after a complete answer, in the same packet (nobody asked
    for them): the caller gets the answer as it was, and the connection is not reused (the
    next request goes out on a new one and succeeds)."""
    seen = Seen()
    origin = await serve_raw(answering(OK + extra, seen, close=False))
    t = Http11Transport()
    try:
        r1 = await asyncio.wait_for(t.handle_async_request(httpx.Request("GET", origin + "/1")),
                                    WAIT)
        assert (r1.status_code, r1.reason_phrase, r1.content) == (200, "OK", b"ok")
        assert r1.headers.raw == [(b"Content-Length", b"2")]
        r2 = await asyncio.wait_for(t.handle_async_request(httpx.Request("GET", origin + "/2")),
                                    WAIT)
        assert r2.status_code == 200
    finally:
        await t.aclose()
    assert [len(reqs) for reqs in seen.requests] == [1, 1], "the second on a new connection"


async def test_head_answer_completes_and_the_next_request_works(serve) -> None:
    """HEAD: the answer carries a Content-Length but no body; it completes at its headers
    (the connection is closed rather than reused) and the next request works."""
    methods: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        methods.append(request.method)
        return web.Response(body=b"hello")

    origin = await serve(handler)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        head = await asyncio.wait_for(c.head(origin + "/x"), WAIT)
        get = await asyncio.wait_for(c.get(origin + "/x"), WAIT)
        assert t.connections == 1
    assert head.status_code == 200 and head.headers["content-length"] == "5"
    assert head.content == b""
    assert get.content == b"hello" and methods == ["HEAD", "GET"]


async def test_204_without_a_body_then_the_same_connection_serves_the_next(serve) -> None:
    """A 204 has no body (none announced either): it completes and the connection is
    reused."""
    peers: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(peer_of(request))
        return web.Response(status=204) if request.path == "/none" else web.Response(text="ok")

    origin = await serve(handler)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        r1 = await asyncio.wait_for(c.delete(origin + "/none"), WAIT)
        r2 = await asyncio.wait_for(c.get(origin + "/x"), WAIT)
    assert r1.status_code == 204 and r1.content == b""
    assert r2.text == "ok"
    assert len(peers) == 2 and len(set(peers)) == 1


async def test_interim_100_continue_is_skipped(serve_raw) -> None:
    """A 100 Continue before the real answer is skipped: the caller gets the 200 (its
    headers only), and the connection serves the next request."""
    seen = Seen()
    origin = await serve_raw(answering(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-Real: yes\r\nContent-Length: 2\r\n\r\nok",
        seen))
    async with httpx.AsyncClient(transport=Http11Transport()) as c:
        r1 = await asyncio.wait_for(c.post(origin + "/x", content=b"data"), WAIT)
        r2 = await asyncio.wait_for(c.get(origin + "/y"), WAIT)
    for r in (r1, r2):
        assert r.status_code == 200 and r.reason_phrase == "OK" and r.content == b"ok"
        assert r.headers.raw == [(b"X-Real", b"yes"), (b"Content-Length", b"2")]
    assert [len(reqs) for reqs in seen.requests] == [2], "both on one connection"


# ------------------------------------------------------------------- streamed requests


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_streamed_request_body_arrives_whole(serve, length: bool) -> None:
    """A body given as an async generator goes out chunk by chunk: with a Content-Length
    as is, without one httpx asks for `Transfer-Encoding: chunked` and the server de-chunks
    the same bytes (an empty chunk is not sent: it would end the body). The connection
    serves the next request."""
    chunks = [b"alpha,", b"", b"b" * 100_000, b",omega"]
    body = b"".join(chunks)
    seen: list[tuple[str | None, str | None, bytes]] = []
    peers: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(peer_of(request))
        seen.append((request.headers.get("Transfer-Encoding"),
                     request.headers.get("Content-Length"), await request.read()))
        return web.Response(text="ok")

    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    origin = await serve(handler)
    headers = {"Content-Length": str(len(body))} if length else {}
    async with httpx.AsyncClient(transport=Http11Transport()) as c:
        r = await asyncio.wait_for(c.post(origin + "/x", content=stream(), headers=headers),
                                   WAIT)
        assert r.text == "ok"
        assert (await asyncio.wait_for(c.get(origin + "/y"), WAIT)).text == "ok"
    if length:
        assert seen[0] == (None, str(len(body)), body)
    else:
        assert seen[0] == ("chunked", None, body)
    assert len(set(peers)) == 1


async def test_streamed_body_waits_for_the_socket_and_write_timeout_bounds_it(serve_raw) -> None:
    """A streamed body is asked for chunk by chunk as the socket takes it: against a
    server that reads nothing, the generator is not drained into memory, and the `write`
    timeout ends the wait with WriteTimeout (the connection closed)."""
    release = asyncio.Event()
    chunk, total = b"z" * 256 * 1024, 256  # 64 MiB at most: far above any socket buffer
    asked = 0

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.wait_for(release.wait(), WAIT)

    async def stream() -> AsyncIterator[bytes]:
        nonlocal asked
        for _ in range(total):
            asked += 1
            yield chunk

    origin = await serve_raw(deaf)
    t = Http11Transport()
    try:
        async with httpx.AsyncClient(transport=t, timeout=httpx.Timeout(WAIT, write=0.2)) as c:
            with pytest.raises(httpx.WriteTimeout):
                await asyncio.wait_for(c.post(origin + "/x", content=stream()), WAIT)
            assert t.connections == 0
    finally:
        release.set()
    assert 0 < asked < total


# ------------------------------------------------------------------------ the pool


async def test_sequential_requests_reuse_one_kept_alive_connection(serve) -> None:
    """Keep-alive: requests in a row go over one connection (the server sees one peer),
    and `connections` counts it, once."""
    peers: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(peer_of(request))
        return web.Response(text="ok")

    origin = await serve(handler)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        assert t.connections == 0
        for _ in range(3):
            assert (await c.get(origin + "/x")).text == "ok"
            assert t.connections == 1
    assert len(peers) == 3 and len(set(peers)) == 1


async def test_most_recently_used_idle_connection_is_taken_first(serve) -> None:
    """With two connections idle, the next request takes the one released last (warm)."""
    arrived = {"/a": asyncio.Event(), "/b": asyncio.Event()}
    release = {"/a": asyncio.Event(), "/b": asyncio.Event()}
    peer_by_path: dict[str, object] = {}

    async def handler(request: web.Request) -> web.Response:
        peer_by_path[request.path] = peer_of(request)
        if request.path in arrived:
            arrived[request.path].set()
            await asyncio.wait_for(release[request.path].wait(), WAIT)
        return web.Response(text=request.path)

    origin = await serve(handler)
    t = Http11Transport(max_connections=2)
    async with httpx.AsyncClient(transport=t) as c:
        a = asyncio.create_task(c.get(origin + "/a"))
        b = asyncio.create_task(c.get(origin + "/b"))
        try:
            for event in arrived.values():
                await asyncio.wait_for(event.wait(), WAIT)
            release["/a"].set()
            assert (await asyncio.wait_for(a, WAIT)).text == "/a"
            release["/b"].set()
            assert (await asyncio.wait_for(b, WAIT)).text == "/b"
        finally:
            for event in release.values():
                event.set()
        assert t.connections == 2
        assert (await c.get(origin + "/c")).text == "/c"
    assert peer_by_path["/a"] != peer_by_path["/b"]
    assert peer_by_path["/c"] == peer_by_path["/b"]


async def test_pool_limit_spans_origins_the_idle_connection_of_another_is_closed(
        serve_raw) -> None:
    """`max_connections` counts all origins: with one allowed, a request to a second
    origin closes the idle connection to the first (its server sees the close) rather
    than waiting for it."""
    seen_a, seen_b = Seen(), Seen()
    a = await serve_raw(answering(OK, seen_a))
    b = await serve_raw(answering(OK, seen_b))
    t = Http11Transport(max_connections=1)
    async with httpx.AsyncClient(transport=t, timeout=httpx.Timeout(WAIT, pool=0.5)) as c:
        assert (await c.get(a + "/1")).content == b"ok"
        assert (await c.get(b + "/2")).content == b"ok"
        assert t.connections == 1
        await wait_until(lambda: seen_a.ended == 1, WAIT, "origin A's connection to close")
        assert (await c.get(a + "/3")).content == b"ok"
        await wait_until(lambda: seen_b.ended == 1, WAIT, "origin B's connection to close")
        assert t.connections == 1
    assert [len(r) for r in seen_a.requests] == [1, 1] and [len(r) for r in seen_b.requests] == [1]


async def test_pool_full_request_waits_and_the_pool_timeout_bounds_the_wait(serve) -> None:
    """With `max_connections=1` held by a slow answer, a second request waits for the
    connection, at most `pool` seconds: PoolTimeout, and nothing of it reached the server.
    The held request is unaffected."""
    hold = Hold("/slow")
    origin = await serve(hold.handle)
    t = Http11Transport(max_connections=1)
    async with httpx.AsyncClient(transport=t, timeout=httpx.Timeout(WAIT, pool=0.2)) as c:
        slow = asyncio.create_task(c.get(origin + "/slow"))
        try:
            await asyncio.wait_for(hold.arrived.wait(), WAIT)
            with pytest.raises(httpx.PoolTimeout):
                await asyncio.wait_for(c.get(origin + "/second"), WAIT)
            assert hold.paths == ["/slow"] and t.connections == 1
        finally:
            hold.release.set()
        assert (await asyncio.wait_for(slow, WAIT)).text == "/slow"
        assert t.connections == 1


async def test_pool_full_request_gets_the_connection_once_the_first_answer_is_in(serve) -> None:
    """Without a pool timeout, the queued request waits as long as it takes, then goes out
    on the connection the first one released: after the first answer, on the same peer."""
    hold = Hold("/slow")
    origin = await serve(hold.handle)
    t = Http11Transport(max_connections=1)
    async with httpx.AsyncClient(transport=t, timeout=httpx.Timeout(WAIT, pool=None)) as c:
        first = asyncio.create_task(c.get(origin + "/slow"))
        try:
            await asyncio.wait_for(hold.arrived.wait(), WAIT)
            second = asyncio.create_task(c.get(origin + "/next"))
            await wait_until(lambda: len(t._waiters) == 1, WAIT,
                             "the second request to queue for the connection")
            assert hold.events == [("start", "/slow")]
        finally:
            hold.release.set()
        r1, r2 = await asyncio.wait_for(asyncio.gather(first, second), WAIT)
        assert t.connections == 1
    assert (r1.text, r2.text) == ("/slow", "/next")
    assert hold.events == [("start", "/slow"), ("answer", "/slow"), ("start", "/next"),
                           ("answer", "/next")]
    assert len(set(hold.peers)) == 1


async def test_cancelled_queued_request_passes_the_free_connection_on(serve) -> None:
    """Three requests, `max_connections=1`: the first holds the connection, two queue. The
    first is cancelled, which frees the connection and wakes the first queued one; that
    one is cancelled before it could run. The free connection must go to the last one
    (not sit unused until its pool timeout)."""
    hold = Hold("/hold")
    origin = await serve(hold.handle)
    t = Http11Transport(max_connections=1)
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(transport=t, timeout=httpx.Timeout(WAIT, pool=3.0)) as c:
        try:
            held = asyncio.create_task(c.get(origin + "/hold"))
            await asyncio.wait_for(hold.arrived.wait(), WAIT)
            woken = asyncio.create_task(c.get(origin + "/woken"))
            await wait_until(lambda: len(t._waiters) == 1, WAIT, "the first to queue")
            last = asyncio.create_task(c.get(origin + "/last"))
            await wait_until(lambda: len(t._waiters) == 2, WAIT, "the second to queue")
            held.cancel()  # runs on the next loop turn: closes its connection, wakes `woken`
            loop.call_soon(woken.cancel)  # ... and this right after, before `woken` runs
            for task in (held, woken):
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, WAIT)
            r = await asyncio.wait_for(last, WAIT)
        finally:
            hold.release.set()
    assert r.text == "/last"


async def test_idle_connection_older_than_keepalive_expiry_is_not_reused(serve) -> None:
    """Idle expiry on the transport's `clock`: a connection idle for up to
    `keepalive_expiry` is reused, one idle for longer is closed and a new one opened."""
    now = [1000.0]
    peers: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(peer_of(request))
        return web.Response(text="ok")

    origin = await serve(handler)
    t = Http11Transport(keepalive_expiry=10.0, clock=lambda: now[0])
    async with httpx.AsyncClient(transport=t) as c:
        await c.get(origin + "/1")
        now[0] += 10.0  # idle exactly the expiry: still good
        await c.get(origin + "/2")
        now[0] += 10.5  # idle longer than the expiry
        await c.get(origin + "/3")
        assert t.connections == 1
    assert peers[0] == peers[1] != peers[2]


async def test_connection_closed_by_the_server_while_idle_is_never_written_to(serve_raw) -> None:
    """A server that answers (Content-Length) and then closes: once the client has seen
    the close, the idle connection is dropped and the next request succeeds on a new one."""
    seen = Seen()
    origin = await serve_raw(answering(OK, seen, close=True))
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        assert (await c.get(origin + "/1")).content == b"ok"
        await wait_until(lambda: idle_closed(t), WAIT, "the client to see the server's close")
        assert (await c.get(origin + "/2")).content == b"ok"
        assert t.connections == 1
    assert [[r.split(b" ")[1] for r in reqs] for reqs in seen.requests] == [[b"/1"], [b"/2"]]


async def test_idle_connection_the_server_spoke_on_is_dropped(serve_raw) -> None:
    """A server that sends an unasked answer on an idle connection (a load balancer's 408
    before its close) makes that connection unusable: the next request goes out on a new
    one."""
    seen = Seen()
    idle = asyncio.Event()  # set once the client has the first answer

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine: list[bytes] = []
        seen.requests.append(mine)
        head, _ = await read_request(reader)
        mine.append(head)
        writer.write(OK)
        await writer.drain()
        if len(seen.requests) == 1:  # the first connection: a 408 while idle, left open
            await asyncio.wait_for(idle.wait(), WAIT)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        assert await reader.read() == b""

    origin = await serve_raw(handler)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        r1 = await c.get(origin + "/1")
        assert (r1.status_code, r1.content) == (200, b"ok")
        idle.set()
        await wait_until(lambda: idle_closed(t), WAIT, "the client to drop the connection")
        assert (await c.get(origin + "/2")).content == b"ok"
    assert [len(reqs) for reqs in seen.requests] == [1, 1]


async def test_answer_with_connection_close_leads_to_a_new_connection(serve) -> None:
    """An answer carrying `Connection: close` closes its connection at once (not pooled):
    the next request opens a new one."""
    peers: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(peer_of(request))
        resp = web.Response(text="ok")
        resp.force_close()
        return resp

    origin = await serve(handler)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        r1 = await c.get(origin + "/1")
        assert r1.headers["connection"] == "close" and r1.text == "ok"
        assert t.connections == 0
        assert (await c.get(origin + "/2")).text == "ok"
    assert len(peers) == 2 and peers[0] != peers[1]


async def test_cancellation_mid_exchange_closes_that_connection(serve_raw) -> None:
    """A request cancelled while the server holds its answer: CancelledError propagates,
    the connection is closed (the server sees it, `connections` is back to 0) and the next
    request works on a new connection."""
    seen = Seen()
    arrived = asyncio.Event()
    keep = answering(OK, seen)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not arrived.is_set():  # the first connection: hold the answer until the close
            head, _ = await read_request(reader)
            seen.requests.append([head])
            arrived.set()
            assert await reader.read() == b""
            seen.ended += 1
            return
        await keep(reader, writer)

    origin = await serve_raw(handler)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        task = asyncio.create_task(c.get(origin + "/held"))
        await asyncio.wait_for(arrived.wait(), WAIT)
        assert t.connections == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        assert t.connections == 0
        await wait_until(lambda: seen.ended == 1, WAIT, "the server to see the close")
        assert (await asyncio.wait_for(c.get(origin + "/next"), WAIT)).content == b"ok"
        assert t.connections == 1
    assert len(seen.requests) == 2 and seen.requests[1][0].startswith(b"GET /next ")


async def test_aclose_closes_idle_connections_and_refuses_later_requests(serve_raw) -> None:
    """`aclose()` closes the idle connections (the server sees the close); a request
    afterwards is a TransportError."""
    seen = Seen()
    origin = await serve_raw(answering(OK, seen))
    t = Http11Transport()
    r = await asyncio.wait_for(t.handle_async_request(httpx.Request("GET", origin + "/x")), WAIT)
    assert r.content == b"ok" and seen.ended == 0
    await t.aclose()
    await wait_until(lambda: seen.ended == 1, WAIT, "the server to see the close")
    with pytest.raises(httpx.TransportError):
        await t.handle_async_request(httpx.Request("GET", origin + "/y"))
    assert len(seen.requests) == 1


async def test_aclose_fails_a_request_queued_for_the_pool(serve) -> None:
    """A request waiting for a connection when the transport is closed is a
    TransportError at once; the request in flight completes, and its connection is
    closed rather than pooled."""
    hold = Hold("/slow")
    origin = await serve(hold.handle)
    t = Http11Transport(max_connections=1)
    request = httpx.Request("GET", origin + "/slow", extensions={"timeout": {"pool": None}})
    slow = asyncio.create_task(t.handle_async_request(request))
    try:
        await asyncio.wait_for(hold.arrived.wait(), WAIT)
        queued = asyncio.create_task(t.handle_async_request(httpx.Request("GET", origin + "/q")))
        await wait_until(lambda: len(t._waiters) == 1, WAIT, "the second request to queue")
        await t.aclose()
        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(queued, WAIT)
    finally:
        hold.release.set()
    assert (await asyncio.wait_for(slow, WAIT)).content == b"/slow"
    assert t.connections == 0


async def test_aclose_leaves_no_connection_counted(serve_raw) -> None:
    """After `aclose()` has closed the idle connections, `connections` (open or being
    opened now) is 0."""
    seen = Seen()
    origin = await serve_raw(answering(OK, seen))
    t = Http11Transport()
    await asyncio.wait_for(t.handle_async_request(httpx.Request("GET", origin + "/x")), WAIT)
    assert t.connections == 1
    await t.aclose()
    await wait_until(lambda: seen.ended == 1, WAIT, "the server to see the close")
    assert t.connections == 0


# ---------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_server(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it): a throw-away CA's certificate for
    127.0.0.1."""
    ca = TestCA(tmp_path, "test-ca")
    cert, key = ca.issue("server", ip="127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(ca.cert_file))


async def test_https_with_a_trusted_certificate(serve, tls_server) -> None:
    """https: the transport given an `ssl_context` trusting the server's CA gets the
    answer (twice, on one kept-alive TLS connection)."""
    server_ctx, client_ctx = tls_server
    peers: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(peer_of(request))
        return web.Response(text=request.scheme)

    origin = await serve(handler, tls=server_ctx)
    assert origin.startswith("https://")
    async with httpx.AsyncClient(transport=Http11Transport(ssl_context=client_ctx)) as c:
        assert (await asyncio.wait_for(c.get(origin + "/x"), WAIT)).text == "https"
        assert (await asyncio.wait_for(c.get(origin + "/y"), WAIT)).text == "https"
    assert len(peers) == 2 and len(set(peers)) == 1


async def test_https_with_an_untrusted_certificate_is_connect_error(serve, tls_server) -> None:
    """https with httpx's default context (certifi): a self-signed CA is not trusted, the
    handshake fails: ConnectError, nothing reaches the handler."""
    server_ctx, _ = tls_server
    called: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        called.append(request.path)
        return web.Response(text="ok")

    origin = await serve(handler, tls=server_ctx)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        with pytest.raises(httpx.ConnectError):
            await asyncio.wait_for(c.get(origin + "/x"), WAIT)
        assert t.connections == 0
    assert called == []


# ------------------------------------------------------------------------ failures


async def test_connection_refused_is_connect_error() -> None:
    port = free_port()
    async with httpx.AsyncClient(transport=Http11Transport()) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{port}/x")


async def test_connect_timeout_is_connect_timeout() -> None:
    """A listener whose accept queue is full drops the SYN: the `connect` timeout ends the
    wait with ConnectTimeout, and the slot it took is given back."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):  # fill the accept queue (never accepted)
            s = socket.socket()
            fillers.append(s)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        t = Http11Transport()
        async with httpx.AsyncClient(transport=t, timeout=httpx.Timeout(WAIT, connect=0.3)) as c:
            with pytest.raises(httpx.ConnectTimeout):
                await asyncio.wait_for(c.get(f"http://127.0.0.1:{port}/x"), WAIT)
            assert t.connections == 0
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_server_closing_without_an_answer_is_remote_protocol_error() -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(transport=Http11Transport()) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(f"http://127.0.0.1:{port}/x")
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 abc\r\n\r\n",
    b"garbage, not HTTP at all\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
], ids=["bad-status", "garbage", "bad-content-length", "two-content-lengths"])
async def test_malformed_answer_is_remote_protocol_error(serve_raw, reply: bytes) -> None:
    """An answer llhttp rejects is RemoteProtocolError, and its connection is closed."""
    seen = Seen()
    origin = await serve_raw(answering(reply, seen))
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await asyncio.wait_for(c.get(origin + "/x"), WAIT)
        assert t.connections == 0
        await wait_until(lambda: seen.ended == 1, WAIT, "the server to see the close")


async def test_server_closing_mid_answer_is_remote_protocol_error(serve_raw) -> None:
    """A server that closes (cleanly) after part of a Content-Length body: the answer is
    incomplete, RemoteProtocolError (not a truncated 200)."""
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await writer.drain()

    origin = await serve_raw(short)
    async with httpx.AsyncClient(transport=Http11Transport()) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await asyncio.wait_for(c.get(origin + "/x"), WAIT)


async def test_server_resetting_mid_answer_is_read_error(serve_raw) -> None:
    """A server that resets the connection (SO_LINGER 0) after part of the headers: the
    reset reaches `connection_lost` with its error, which the transport reports as
    ReadError."""
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
        writer.transport.abort()

    origin = await serve_raw(reset)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        with pytest.raises(httpx.ReadError):
            await asyncio.wait_for(c.get(origin + "/x"), WAIT)
        assert t.connections == 0


async def test_read_timeout_is_read_timeout(serve) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 10.0)
        return web.Response(status=200)

    origin = await serve(slow)
    try:
        async with httpx.AsyncClient(transport=Http11Transport(),
                                     timeout=httpx.Timeout(5.0, read=0.2)) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get(origin + "/x")
    finally:
        release.set()


async def test_read_timeout_bounds_each_wait_not_the_whole_answer(serve_raw) -> None:
    """`read` bounds the wait for the next bytes: an answer trickling in for longer than
    the read timeout, a piece at a time well within it, is read whole."""
    pieces = 12

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % pieces)
        for _ in range(pieces):  # 12 x 0.1 s: longer than the 1 s read timeout
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"t")
        await writer.drain()
        await reader.read()

    origin = await serve_raw(trickle)
    async with httpx.AsyncClient(transport=Http11Transport(),
                                 timeout=httpx.Timeout(WAIT, read=1.0)) as c:
        r = await asyncio.wait_for(c.get(origin + "/x"), WAIT)
    assert r.content == b"t" * pieces


async def test_closed_transport_refuses_and_genesys_client_reports_transport_error(serve) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok-123456789", "expires_in": 3600})

    origin = await serve(ok)
    t = Http11Transport()
    async with httpx.AsyncClient(transport=t) as c:
        assert (await c.get(origin + "/x")).status_code == 200
    with pytest.raises(httpx.TransportError):
        await t.handle_async_request(httpx.Request("GET", origin + "/x"))

    # GenesysClient uses this transport by default; a refused connection is the
    # TransportError its callers know, naming the httpx exception.
    port = free_port()
    settings = GenesysSettings(api_base_url=f"http://127.0.0.1:{port}", login_base_url=origin,
                               max_retries=0)
    async with GenesysClient(settings, Credentials("id", "secret")) as client:
        assert isinstance(client._http._transport, Http11Transport)
        with pytest.raises(TransportError, match="ConnectError"):
            await client.get_call("c1")


async def test_many_concurrent_requests_some_cancelled_some_closed_leave_the_pool_consistent(
        serve) -> None:
    """300 requests at once through `max_connections=20`, a third of them cancelled at
    random points and every seventh answered with `Connection: close`: never more than 20
    connections open, every request not cancelled gets its own answer, and afterwards
    every open connection is idle in the pool (none leaked, none counted twice)."""
    import random

    rng = random.Random(22)
    in_flight = [0]
    most = [0]

    async def handler(request: web.Request) -> web.Response:
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            await asyncio.sleep(rng.random() * 0.01)
            n = int(request.path.rsplit("/", 1)[1])
            headers = {"Connection": "close"} if n % 7 == 0 else {}
            return web.Response(text=request.path, headers=headers)
        finally:
            in_flight[0] -= 1

    origin = await serve(handler)
    t = Http11Transport(max_connections=20)
    async with httpx.AsyncClient(transport=t, timeout=httpx.Timeout(WAIT)) as c:
        tasks = [asyncio.create_task(c.get(f"{origin}/r/{i}")) for i in range(300)]
        doomed = rng.sample(tasks, 100)
        for task in doomed:  # cancelled at different points: queued, writing, reading
            asyncio.get_running_loop().call_later(rng.random() * 0.05, task.cancel)
        done, pending = await asyncio.wait(tasks, timeout=WAIT)
        assert not pending
        for i, task in enumerate(tasks):
            if task.cancelled():
                continue
            assert task.result().text == f"/r/{i}"
        assert most[0] <= 20 and t.connections <= 20
        idle = sum(len(conns) for conns in t._idle.values())
        assert t.connections == idle
        assert not t._waiters
        # ... and the pool still serves.
        assert (await asyncio.wait_for(c.get(f"{origin}/r/1"), WAIT)).text == "/r/1"
