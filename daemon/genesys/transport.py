"""The HTTP/1.1 I/O under `GenesysClient`'s httpx API: asyncio protocols and httptools.

`GenesysClient` keeps httpx's API (requests, responses, `httpx.HTTPError`, `MockTransport`
in tests); this module is the I/O underneath. It exists for one reason: the time from a
removal's decision to its PATCH on the wire. A request whose connection is idle in the
pool is serialised and handed to the socket in the caller's own step, without a loop turn,
a lock or a task (httpx's own transport, httpcore on anyio, takes several loop turns;
aiohttp one more for its body writer on Python 3.11): bench/RESULTS.md, "The removal path
at the speed of a minimal client". Answers are parsed by httptools (llhttp, the parser
of Node.js and uvicorn), not here.

`Http11Transport(max_connections=..., keepalive_expiry=...)`. Contract, per request:

- the httpx request is sent as built: method, target (path and query as httpx encoded
  them), headers in httpx's order and case (httpx adds `Host`, `Content-Length` /
  `Transfer-Encoding`), body. A header name or value holding CR, LF or NUL is refused
  (`httpx.LocalProtocolError`) and nothing is written. A body given whole goes out in the
  same write as the head; a streamed body is written chunk by chunk, the head with its
  first chunk (chunked framing when the request says `Transfer-Encoding: chunked`), each
  chunk asked for only once the previous one was handed to the socket and the socket's
  buffer is below its high-water mark;
- one keep-alive pool per transport, `max_connections` open at most across origins; the
  most recently used idle connection is taken first (warm), one idle for longer than
  `keepalive_expiry` seconds or closed by the server is dropped, never written to. TLS for
  `https` with httpx's default context (certifi; hostname checked). No proxy, redirect or
  cookie handling: httpx's client owns those;
- timeouts from the request's `timeout` extension (httpx's `Timeout`, seconds; None: no
  limit): `pool` bounds the wait for a free connection, `connect` the TCP connect and TLS
  handshake, `write` each wait for the socket's buffer to drain, `read` each wait for the
  next bytes of the answer;
- the answer is read whole (status, reason, headers in order, body) before the
  `httpx.Response` is returned; `Content-Encoding` is left to httpx to decode. A 1xx
  interim answer is skipped. The connection goes back to the pool when the answer allows
  keep-alive and was read to its end; otherwise (HEAD: llhttp cannot be told to expect no
  body; `Connection: close`, an answer ended by the close, a cancelled or failed request)
  it is closed;
- failures are the httpx exceptions GenesysClient's one retry policy knows: `PoolTimeout`,
  `ConnectTimeout`, `ConnectError` (refused, DNS, TLS), `WriteTimeout`, `WriteError`,
  `ReadTimeout`, `ReadError` (reset while reading), `RemoteProtocolError` (closed without an
  answer or mid-answer, an answer llhttp rejects). Cancellation propagates unchanged and
  closes the connection it interrupted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import AsyncIterable, Callable

import httptools
import httpx

__all__ = ["Http11Transport", "KEEPALIVE_EXPIRY", "MAX_CONNECTIONS", "default_transport"]

#: Connections open at most, across origins, as httpx's defaults (`httpx.Limits()`).
MAX_CONNECTIONS = 100
#: Seconds an idle keep-alive connection is kept: long, so that a removal after a quiet
#: spell finds a warm connection and needs no connect (HA: every PATCH must be written
#: before the lease deadline). Below the 60 s idle timeout common at load balancers.
KEEPALIVE_EXPIRY = 55.0

_Origin = tuple[bytes, str, int]  # scheme, host, port
_CRLF = b"\r\n"


class Http11Transport(httpx.AsyncBaseTransport):
    """An httpx transport speaking HTTP/1.1 over asyncio (see the module docstring).

    `clock` (monotonic seconds) decides idle expiry; tests pass their own."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS,
                 keepalive_expiry: float = KEEPALIVE_EXPIRY,
                 ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._ssl = ssl_context
        self._clock = clock
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def connections(self) -> int:
        """Connections open or being opened now."""
        return self._open

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout") or {}
        origin = _origin(request.url)
        head = _head(request)  # refused before a connection is taken
        conn = self._take_idle(origin)
        if conn is None:
            conn = await self._connect(origin, request, timeouts)
        try:
            return await conn.exchange(request, head, timeouts)
        finally:
            self._release(origin, conn)

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
                self._forget()
        self._idle.clear()
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)

    # -------------------------------------------------------------- the pool

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        """The most recently used live idle connection to `origin`, or None (no await:
        the common case writes in the caller's own step)."""
        if self._closed:
            raise httpx.TransportError("the transport is closed")
        idle = self._idle.get(origin)
        now = self._clock()
        while idle:
            conn = idle.pop()
            if conn.reusable and now - conn.idle_since <= self.keepalive_expiry:
                return conn
            conn.close()  # expired, or closed by the server while idle
            self._forget()
        return None

    async def _connect(self, origin: _Origin, request: httpx.Request,
                       timeouts: dict[str, float | None]) -> _Connection:
        """A new connection once there is room (waiting at most `pool` seconds for it),
        connected within `connect` seconds."""
        loop = asyncio.get_running_loop()
        deadline = _deadline(loop, timeouts.get("pool"))
        while self._open >= self.max_connections:
            if self._evict_idle():
                break
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, but leaving (cancelled, timed out): pass it on
                if isinstance(exc, TimeoutError):
                    raise httpx.PoolTimeout("no connection free within the pool timeout",
                                            request=request) from None
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            conn = self._take_idle(origin)
            if conn is not None:
                return conn
        self._open += 1
        try:
            return await self._open_connection(loop, origin, request, timeouts.get("connect"))
        except BaseException:
            self._forget()
            raise

    async def _open_connection(self, loop: asyncio.AbstractEventLoop, origin: _Origin,
                               request: httpx.Request, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        tls: ssl.SSLContext | None = None
        if scheme == b"https":
            tls = self._ssl = self._ssl or httpx.create_ssl_context()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._clock), host, port, ssl=tls,
                    server_hostname=host if tls is not None else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within "
                                       f"{timeout} s", request=request) from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise httpx.ConnectError(f"{exc.__class__.__name__}: {exc}",
                                     request=request) from exc
        return conn

    def _release(self, origin: _Origin, conn: _Connection) -> None:
        if conn.reusable and not self._closed:
            conn.idle_since = self._clock()
            self._idle.setdefault(origin, []).append(conn)
        else:
            conn.close()
            self._forget()
        self._wake()

    def _evict_idle(self) -> bool:
        """Close the least recently used idle connection (to any origin) to make room for
        a new one; False if none is idle."""
        oldest: _Connection | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is None:
            return False
        for conns in self._idle.values():
            if conns and conns[0] is oldest:
                del conns[0]
        oldest.close()
        self._forget()
        return True

    def _forget(self) -> None:
        self._open -= 1

    def _wake(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: writes requests, parses answers with httptools' llhttp.

    One exchange at a time (the pool hands it to one request); `reusable` says whether it
    can take the next one."""

    # The answer being read (`_reset_answer` starts each one).
    _status: int
    _reason: bytes
    _headers: list[tuple[bytes, bytes]]
    _body: list[bytes]
    _framed: bool  # Content-Length or chunked: the body's end is known
    _keep: bool  # the answer allows the connection's reuse
    _complete: bool

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.idle_since = clock()
        self.closed = False
        self.reusable = False  # True while idle and alive: between two exchanges
        self._answer: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self._is_head = False  # the request being answered is a HEAD
        self._read_timeout = 0.0
        self._read_timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._started = False  # some bytes of the answer came (an interim one included)
        self._reset_answer()

    def _reset_answer(self) -> None:
        self._status = 0
        self._reason = b""
        self._headers = []
        self._body = []
        self._framed = False
        self._keep = True
        self._complete = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.reusable = True

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._last_rx = self._loop.time()
        self._started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            if self._complete:  # bytes after the answer (or a HEAD answer's "body"): the
                self._keep = False  # answer stands, the connection cannot be trusted
            else:
                self._fail(httpx.RemoteProtocolError(f"malformed answer: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: HTTP/1.1 has no use for half-open connections

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._answer is not None and not self._answer.done():
            if self._status >= 200 and not self._framed:
                self._keep = False
                self._finish()  # an answer whose body ends with the connection (RFC 9112 6.3)
            elif exc is not None:
                self._fail(httpx.ReadError(f"{exc.__class__.__name__}: {exc}"))
            elif not self._started:
                self._fail(httpx.RemoteProtocolError(
                    "the server closed the connection without sending an answer"))
            else:
                self._fail(httpx.RemoteProtocolError(
                    "the server closed the connection in the middle of the answer"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(httpx.WriteError("the connection was closed"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:  # a second message after the answer: nobody asked for it
            raise httpx.RemoteProtocolError("bytes after the end of the answer")

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        for name, _ in self._headers:
            lname = name.lower()
            if lname == b"content-length" or lname == b"transfer-encoding":
                self._framed = True
        if self._status in (204, 304):
            self._framed = True  # never a body (RFC 9110 15.3.5, 15.4.5)
        if self._is_head and self._status >= 200:
            self._keep = False  # llhttp would wait for the body a HEAD answer never has
            self._framed = True
            self._finish()

    def on_body(self, body: bytes) -> None:
        if not self._complete:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:  # an interim answer (100 Continue): the real one follows
            self._reset_answer()
            return
        if not self._parser.should_keep_alive():
            self._keep = False
        self._framed = True
        self._finish()

    # -- the exchange

    def _finish(self) -> None:
        self._complete = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.close()

    async def exchange(self, request: httpx.Request, head: bytes,
                       timeouts: dict[str, float | None]) -> httpx.Response:
        """Write `head` and `request`'s body; read the answer whole. `reusable` is False
        until the answer is complete and allows reuse; on any failure or cancellation the
        connection is closed."""
        transport = self._transport
        if transport is None or self.closed:
            raise httpx.RemoteProtocolError("the connection was closed", request=request)
        self.reusable = False
        self._reset_answer()
        self._started = False
        self._is_head = request.method == "HEAD"
        self._answer = answer = self._loop.create_future()
        try:
            try:
                body: bytes | None = request.content
            except httpx.RequestNotRead:  # built with `stream=`: a whole body is read here
                body = request.read() if isinstance(request.stream, httpx.ByteStream) else None
            if body is not None:
                transport.write(head + body if body else head)
            else:
                await self._write_stream(request, head, timeouts.get("write"))
            await self._read(answer, timeouts.get("read"))
        except httpx.TransportError as exc:
            self.close()
            _attach(exc, request)
            raise
        except BaseException:
            self.close()  # cancelled or failed mid-exchange: the stream's state is unknown
            raise
        finally:
            self._answer = None
        self.reusable = self._keep and not self.closed
        # stream=, not content=: the headers stay as the server sent them (content= would
        # add a Content-Length); read() decodes any Content-Encoding, as httpx's own does.
        response = httpx.Response(self._status, headers=self._headers,
                                  stream=httpx.ByteStream(b"".join(self._body)),
                                  request=request,
                                  extensions={"http_version": b"HTTP/1.1",
                                              "reason_phrase": self._reason})
        response.read()
        return response

    async def _write_stream(self, request: httpx.Request, head: bytes,
                            timeout: float | None) -> None:
        """`head`, then the body of a streamed request chunk by chunk (see the module
        docstring). The head goes out with the first chunk, in one write: a body whose
        stream fails before its first chunk (a PATCH past its deadline) leaves nothing of
        the request on the wire."""
        transport = self._transport
        assert transport is not None
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        stream = request.stream
        assert isinstance(stream, AsyncIterable)
        pending = head
        async for chunk in stream:
            if self.closed:
                raise httpx.WriteError("the connection was closed while writing")
            if chunked:
                chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunk else b""
            if pending or chunk:
                transport.write(pending + chunk)
                pending = b""
            await self._drain(timeout)
        end = pending + b"0\r\n\r\n" if chunked else pending
        if end:
            transport.write(end)

    async def _drain(self, timeout: float | None) -> None:
        if not self._paused:
            return
        self._drained = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._drained
        except TimeoutError:
            raise httpx.WriteTimeout(f"the request was not written within {timeout} s") from None
        finally:
            self._drained = None

    async def _read(self, answer: asyncio.Future[None], timeout: float | None) -> None:
        """Wait for the whole answer, at most `timeout` seconds between two arrivals (one
        timer per answer, re-armed only when it fires early, not per arrival)."""
        if timeout is None:
            await answer
            return
        self._read_timeout = timeout
        self._last_rx = now = self._loop.time()
        self._read_timer = self._loop.call_at(now + timeout, self._read_check)
        try:
            await answer
        finally:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_check(self) -> None:
        due = self._last_rx + self._read_timeout
        if due > self._loop.time():
            self._read_timer = self._loop.call_at(due, self._read_check)
            return
        self._fail(httpx.ReadTimeout(f"no answer within {self._read_timeout} s"))


def _attach(exc: httpx.TransportError, request: httpx.Request) -> None:
    """Give an exception raised below the request (a protocol callback) its request."""
    try:
        exc.request  # noqa: B018 - the property raises when none is set
    except RuntimeError:
        exc.request = request


def _head(request: httpx.Request) -> bytes:
    """The request line and headers, as bytes. httpx has encoded the target and the
    headers; a CR, LF or NUL anywhere in them would split the head (header injection),
    so their count is checked on the whole."""
    url = request.url
    target = url.raw_path
    lines = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        lines += (name, b": ", value, _CRLF)
    lines.append(_CRLF)
    head = b"".join(lines)
    expected = len(request.headers.raw) + 2
    if head.count(b"\n") != expected or head.count(b"\r") != expected or b"\0" in head:
        raise httpx.LocalProtocolError("a CR, LF or NUL in the request line or a header; "
                                       "nothing sent", request=request)
    return head


def _origin(url: httpx.URL) -> _Origin:
    scheme = url.raw_scheme
    if scheme not in (b"http", b"https"):
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
    port = url.port or (443 if scheme == b"https" else 80)
    return scheme, url.host, port


def _deadline(loop: asyncio.AbstractEventLoop, timeout: float | None) -> float | None:
    return None if timeout is None else loop.time() + timeout


def default_transport() -> httpx.AsyncBaseTransport:
    """The transport `GenesysClient` uses when none is given: `Http11Transport()`."""
    return Http11Transport()
