"""A hardened aiohttp listener, shared by the ops port (`service/ops.py`) and the control
API (`service/control/server.py`).

What it adds to aiohttp's own server, per listener:
- **Header timeout** (`ListenerLimits.header_timeout`, seconds): a connection whose request
  line and headers are not complete within it (a slow-loris client sending a byte a second)
  is closed. The clock starts when the connection is accepted (after the TLS handshake,
  which has the same limit) and again when the first byte of a later keep-alive request
  arrives.
- **Idle timeout** (`idle_timeout`, seconds): a keep-alive connection with no request is
  closed after it (aiohttp's keep-alive timer).
- **Connection cap** (`max_connections`): past it a new connection is refused at once (reset,
  no answer) rather than accepted and starved; the ones already open keep working, so a
  flood of idle connections cannot use up the process's file descriptors.
- **No request data in error answers**: a malformed request (bad request line, a raw LF
  after a header value, an over-long header) is answered `400 {"status": 400, "code":
  "bad_request", "message": "malformed HTTP request"}` and closed; aiohttp's own answer
  quotes the offending line, which may carry a bearer token.
- **Rate-limited error logging**: refusals, timeouts, malformed requests and handler
  crashes are logged at most once per kind per `LOG_INTERVAL` seconds, each line with
  `count` (occurrences since the last line of that kind), never with request data or a
  traceback; `confguard_listener_rejections_total{listener,reason}` counts every one.
- **TLS** (`TlsFiles`): cert/key (and for the control API an optional client CA, which
  makes a client certificate mandatory) loaded into a context that `reload_tls` can
  replace while listening: new connections get the new files, open ones keep theirs.

`install_loop_error_filter(loop)` rate-limits the event loop's own error lines (e.g.
`socket.accept() out of system resource` when file descriptors run out) the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from daemon.config import Config
from daemon.config.models import ListenerSettings, TlsSettings
from daemon.errors import ConfigError

log = structlog.get_logger(__name__)

__all__ = ["ErrorLogLimiter", "Listener", "ListenerLimits", "TlsFiles", "install_loop_error_filter",
           "is_loopback", "listener_limits", "peer_common_name", "tls_files"]

#: Seconds between two log lines of one kind (per listener).
LOG_INTERVAL = 10.0
#: The fixed answer to a request aiohttp could not parse.
BAD_REQUEST_BODY = b'{"code":"bad_request","message":"malformed HTTP request","status":400}'


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """Per-listener limits. Seconds for the timeouts; `max_connections` open connections
    at most (past it new ones are refused)."""

    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the server certificate chain and its key; `client_ca_file`, when set,
    makes a client certificate signed by that CA mandatory."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


def listener_limits(settings: ListenerSettings) -> ListenerLimits:
    """The limits of `ops:` or `control:` in config.yaml."""
    return ListenerLimits(header_timeout=settings.header_timeout,
                          idle_timeout=settings.idle_timeout,
                          max_connections=settings.max_connections)


def tls_files(cfg: Config, tls: TlsSettings | None) -> TlsFiles | None:
    """The TLS files of `ops.tls`/`control.tls`, relative to config.yaml's folder."""
    if tls is None:
        return None
    ca = getattr(tls, "client_ca_file", None)
    return TlsFiles(cfg.resolve_path(tls.cert_file), cfg.resolve_path(tls.key_file),
                    cfg.resolve_path(ca) if ca else None)


def build_tls_context(files: TlsFiles, *, what: str) -> ssl.SSLContext:
    """A server context (TLS 1.2+) from `files`. Raises ConfigError naming `what` (e.g.
    `control.tls`) and the file when one cannot be loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(files.cert_file), str(files.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: cannot load cert_file {files.cert_file} / key_file "
                          f"{files.key_file}: {_reason(exc)}") from None
    if files.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(files.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{what}: cannot load client_ca_file {files.client_ca_file}: "
                              f"{_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"[:200]


def is_loopback(host: str) -> bool:
    """True for a loopback address or `localhost` (what needs no TLS to stay on the host)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def peer_common_name(request: web.BaseRequest) -> str | None:
    """The subject CN of the client certificate the TLS layer verified, or None (no TLS, no
    certificate)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class ErrorLogLimiter:
    """At most one log line per kind every `interval` seconds, with the count of
    occurrences since the previous line of that kind (the first one is logged at once).
    Memory: one entry per kind (kinds are a fixed vocabulary)."""

    def __init__(self, interval: float = LOG_INTERVAL, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (logged at, not logged since)

    def note(self, kind: str) -> int | None:
        """Count one `kind`; returns the count to log now (this one included), or None when
        the line is held back."""
        now = self._clock()
        last, held = self._last.get(kind, (now - self.interval, 0))
        if now - last < self.interval:
            self._last[kind] = (last, held + 1)
            return None
        self._last[kind] = (now, 0)
        return held + 1


class _Guard:
    """The state one listener's connections share."""

    def __init__(self, name: str, limits: ListenerLimits,
                 on_reject: Callable[[str, str], None] | None) -> None:
        self.name = name
        self.limits = limits
        self.live: set[GuardedHandler] = set()
        self.logs = ErrorLogLimiter()
        self.on_reject = on_reject

    def reject(self, reason: str, level: str = "warning", **fields: Any) -> None:
        """Count one rejection (`reason`: over_capacity | header_timeout | bad_request |
        body_timeout | handler_error) and log it if this kind's interval has passed."""
        if self.on_reject is not None:
            try:
                self.on_reject(self.name, reason)
            except Exception:  # noqa: BLE001 - a metrics hook must not break the listener
                pass
        count = self.logs.note(reason)
        if count is None:
            return
        fields.update(listener=self.name, reason=reason, count=count,
                      interval=self.logs.interval, open_connections=len(self.live))
        if level == "error":
            log.error("listener_rejected", **fields)
        elif level == "info":
            log.info("listener_rejected", **fields)
        else:
            log.warning("listener_rejected", **fields)


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol with the cap, the header timeout and a fixed
    error answer (see the module docstring)."""

    def __init__(self, manager: web.Server, *, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=guard.limits.idle_timeout, **kwargs)
        self._guard = guard
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if len(guard.live) >= guard.limits.max_connections:
            self._manager = None  # never registered: connection_lost has nothing to undo
            sock = transport.get_extra_info("socket")
            if sock is not None:  # a reset, not a polite close: the client learns at once
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            cast(asyncio.Transport, transport).abort()
            guard.reject("over_capacity", max_connections=guard.limits.max_connections)
            return
        guard.live.add(self)
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.live.discard(self)
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._stop_header_timer()  # a whole request line and header block arrived
        elif data and self._header_timer is None and not self._request_in_progress \
                and self._payload_parser is None:
            self._start_header_timer()  # the first bytes of a later keep-alive request

    def _start_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._guard.limits.header_timeout,
                                                   self._header_timeout)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is None or self._request_in_progress:
            return
        self._guard.reject("header_timeout", "info", header_timeout=self._guard.limits.header_timeout)
        self.force_close()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A fixed answer: nothing of the request (it may hold a token) is quoted."""
        if status >= 500:
            self._guard.reject("handler_error", "error", error_type=type(exc).__name__)
            body = b'{"code":"internal_error","message":"internal error","status":500}'
        else:
            self._guard.reject("bad_request", "info", error_type=type(exc).__name__)
            body, status = BAD_REQUEST_BODY, 400
        resp = web.Response(status=status, body=body, content_type="application/json")
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own tracebacks (a connection error while writing, ...) become one
        counted, rate-limited line without request data."""
        exc = kw.get("exc_info")
        self._guard.reject("handler_error", "error",
                           error_type=type(exc).__name__ if isinstance(exc, BaseException) else "-")


class Listener:
    """One hardened HTTP listener for an aiohttp `app` on exactly `host:port`.

    `start()` binds (port 0 picks a free one) and returns the port; `close()` stops
    listening and closes every connection (idempotent); `reload_tls(files)` swaps the TLS
    files for new connections. `on_reject(listener, reason)` is called for every refused or
    failed connection (the metrics hook)."""

    def __init__(self, app: web.Application, name: str, *, limits: ListenerLimits | None = None,
                 tls: TlsFiles | None = None,
                 on_reject: Callable[[str, str], None] | None = None) -> None:
        self.app = app
        self.name = name
        self.guard = _Guard(name, limits or ListenerLimits(), on_reject)
        self.tls = tls
        self._current_tls: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    @property
    def open_connections(self) -> int:
        return len(self.guard.live)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each listening socket; empty when closed."""
        if self._server is None:
            return []
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self._server.sockets]

    def _front_context(self) -> ssl.SSLContext | None:
        """The context the server is created with. Its SNI callback (OpenSSL calls it for
        every ClientHello, with or without a server name) hands each new connection the
        current context, so `reload_tls` takes effect without re-binding."""
        if self.tls is None:
            return None
        self._current_tls = build_tls_context(self.tls, what=f"{self.name}.tls")
        front = build_tls_context(self.tls, what=f"{self.name}.tls")

        def pick(obj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            if self._current_tls is not None:
                obj.context = self._current_tls

        front.sni_callback = pick
        return front

    def reload_tls(self, files: TlsFiles) -> bool:
        """Load new TLS files for new connections. Raises ConfigError (the old files stay in
        use) when they cannot be loaded. Turning TLS on or off, or the client CA on or off,
        needs a restart: returns False (nothing changed) in that case."""
        if self.tls is None or (self.tls.client_ca_file is None) != (files.client_ca_file is None):
            return False
        self._current_tls = build_tls_context(files, what=f"{self.name}.tls")
        self.tls = files
        log.info("listener_tls_reloaded", listener=self.name, cert_file=str(files.cert_file))
        return True

    async def start(self, host: str, port: int) -> int:
        """Listen on exactly `host`:`port`. Returns the bound port. Raises OSError when the
        address is taken or not local, ConfigError when the TLS files cannot be loaded;
        nothing is left behind either way."""
        if self._runner is not None:
            raise RuntimeError(f"{self.name} listener already started")
        ssl_ctx = self._front_context()
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        manager = runner.server
        assert manager is not None
        loop = asyncio.get_running_loop()
        guard = self.guard

        def factory() -> GuardedHandler:
            return GuardedHandler(manager, guard=guard, loop=loop, access_log=None)

        try:
            self._server = await loop.create_server(
                factory, host=host, port=port, ssl=ssl_ctx, reuse_address=True, backlog=128,
                ssl_handshake_timeout=guard.limits.header_timeout if ssl_ctx else None)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        install_loop_error_filter(loop)
        if ssl_ctx is None and not is_loopback(host):
            log.warning("listener_without_tls", listener=self.name, host=host,
                        detail=f"{self.name}.listen is not a loopback address and {self.name}.tls "
                               f"is not set: requests (and tokens) cross the network in clear text")
        bound = self.addresses
        return bound[0][1] if bound else port

    async def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        server, self._server = self._server, None
        runner, self._runner = self._runner, None
        if server is not None:
            server.close()
        if runner is not None:
            await runner.cleanup()  # closes the open connections (aiohttp's manager)
        for handler in list(self.guard.live):  # anything the manager did not know of
            handler.force_close()
        if server is not None:
            await server.wait_closed()


def install_loop_error_filter(loop: asyncio.AbstractEventLoop) -> None:
    """Rate-limit the loop's reports about accepting connections (`socket.accept() out of
    system resource` when file descriptors run out is reported on every attempt): one
    `loop_error` line per message kind every LOG_INTERVAL seconds with a count, no
    traceback. Every other report goes to the loop's default handler unchanged. Installed
    once per loop; a handler someone else installed is kept."""
    if loop.get_exception_handler() is not None:
        return
    limiter = ErrorLogLimiter()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "")
        if "accept" not in message:
            lp.default_exception_handler(context)
            return
        exc = context.get("exception")
        count = limiter.note(message[:80])
        if count is not None:
            log.error("loop_error", message=message[:200],
                      error_type=type(exc).__name__ if exc is not None else None,
                      error=str(exc)[:200] if exc is not None else None, count=count,
                      interval=limiter.interval)

    loop.set_exception_handler(handler)
