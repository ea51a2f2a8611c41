"""The HTTP I/O under `GenesysClient`'s `httpx.AsyncClient`: aiohttp, behind httpx's transport seam.

`GenesysClient` keeps httpx's API (requests, responses, `httpx.HTTPError`, `MockTransport`
in tests); only the I/O underneath is aiohttp's, which writes a request about 0.2-0.5 ms
sooner than httpx's own transport (httpcore on anyio) on this project's machines
(bench/RESULTS.md, "The removal path at the speed of a minimal client"). A `transport=`
given to `GenesysClient` (a `MockTransport`, a test double) replaces this one.

`AiohttpTransport(limits=..., keepalive_expiry=...)`: one `aiohttp.ClientSession` made at
the first request (in the running loop) and closed by `aclose()`. Contract, per request:

- the httpx request is sent as built (method, URL, headers, body — a streamed body is
  streamed, each chunk asked for only once the previous one is written; httpx's own
  `User-Agent`, `Accept`, `Accept-Encoding`, `Host`, `Content-Length` go out unchanged;
  aiohttp adds none of its defaults in their place); no redirects followed, no cookies kept
  by aiohttp (httpx's client owns cookies), no proxy from the environment (httpx mounts
  its own transports for proxies it finds there), TLS verified with httpx's default
  context (certifi);
- timeouts from the request's `timeout` extension (httpx's `Timeout`, seconds): `connect`
  bounds the TCP/TLS connect, `pool` the wait for a connection including the connect,
  `read` each read of the answer. aiohttp has no write timeout: a caller that needs one
  bounds the whole request (`asyncio.timeout`), which cancels it cleanly;
- the answer's body is read whole before the `httpx.Response` is returned (GenesysClient
  reads every body anyway; nothing streams) and the connection goes back to the pool;
  `Content-Encoding` is left for httpx to decode, as with its own transport;
- every aiohttp failure is raised as the matching `httpx.TransportError` subclass, so the
  client's one retry policy sees what it saw before: `ConnectError` (refused, DNS, TLS),
  `ConnectTimeout` (the connect or the wait for a pooled connection), `ReadTimeout`, `RemoteProtocolError` (the server closed
  without an answer, a malformed answer), `ReadError` (reset while reading), and
  `TransportError` for anything else aiohttp raises. Cancellation propagates unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx

__all__ = ["AiohttpTransport", "default_transport"]

#: Connections kept per pool, as httpx's defaults (`httpx.Limits()`).
MAX_CONNECTIONS = 100
#: Seconds an idle keep-alive connection is kept: long, so that a removal after a quiet
#: spell finds a warm connection and needs no connect (HA: every PATCH must be written
#: before the lease deadline). Below the 60 s idle timeout common at load balancers.
KEEPALIVE_EXPIRY = 55.0


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends with aiohttp (see the module docstring)."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS,
                 keepalive_expiry: float = KEEPALIVE_EXPIRY) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[Any, Any, Any], aiohttp.ClientTimeout] = {}
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise httpx.TransportError("the transport is closed")
        connector = aiohttp.TCPConnector(limit=self.max_connections,
                                         keepalive_timeout=self.keepalive_expiry,
                                         ssl=httpx.create_ssl_context())
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def _timeout(self, ext: dict[str, Any]) -> aiohttp.ClientTimeout:
        key = (ext.get("connect"), ext.get("read"), ext.get("pool"))
        t = self._timeouts.get(key)
        if t is None:  # one per distinct setting (a client has one or two), not per request
            t = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, sock_connect=key[0], sock_read=key[1], connect=key[2])
        return t

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        body: bytes | AsyncIterator[bytes] | None
        try:
            body = request.content or None
        except httpx.RequestNotRead:  # a streamed body: handed over chunk by chunk, as
            body = _chunks(request.stream)  # written (a deadline on the write relies on it)
        try:
            async with session.request(
                    request.method, str(request.url), headers=request.headers.multi_items(),
                    data=body, allow_redirects=False,
                    timeout=self._timeout(request.extensions.get("timeout") or {}),
                    skip_auto_headers=_SKIP) as resp:
                content = await resp.read()
                status, headers = resp.status, resp.raw_headers
                reason = resp.reason
        except aiohttp.ClientError as exc:
            raise _translate(exc, request) from exc
        except TimeoutError as exc:  # aiohttp's own timeouts are ClientErrors; any other
            raise httpx.TimeoutException(f"timed out: {exc}", request=request) from exc
        ext: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if reason:
            ext["reason_phrase"] = reason.encode("latin-1", "replace")
        return httpx.Response(status, headers=list(headers), content=content, request=request,
                              extensions=ext)

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    """A streamed httpx body for aiohttp, which asks for the next chunk only after writing
    the previous one to the connection (with the request's own Content-Length, if any)."""
    async for chunk in stream:
        yield chunk


# aiohttp adds these when a request lacks them; httpx's request already has what it wants.
_SKIP = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


def _translate(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception a failure of aiohttp's maps to (see the module docstring)."""
    text = f"{exc.__class__.__name__}: {exc}"
    cls: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # the connect, or the pool wait
        cls = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ServerTimeoutError):
        cls = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        cls = httpx.ConnectError
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError)):
        cls = httpx.RemoteProtocolError
    elif isinstance(exc, (aiohttp.ClientOSError, aiohttp.ClientPayloadError)):
        cls = httpx.ReadError
    else:
        cls = httpx.TransportError
    return cls(text, request=request)


def default_transport() -> httpx.AsyncBaseTransport:
    """The transport `GenesysClient` uses when none is given: `AiohttpTransport()`."""
    return AiohttpTransport()
