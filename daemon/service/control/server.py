"""The control API's HTTP listener (aiohttp, the server stack the ops port and the sandbox
already use), on its own host:port, never the unauthenticated ops port.

Every request, unknown paths included, is authenticated first (`Authorization: Bearer
<token>`, 401 otherwise), then limited per caller (429 with `Retry-After`), then routed.
Every answer that is not a 2xx has the body `{"status", "code", "message"}` (409 adds
`candidates`, 503 adds `leader`). Bodies are capped at 64 KiB (413). Each request is counted
in `confguard_control_requests{caller,route,status}` and logged as `control_request` (INFO
for POST, DEBUG for GET) with the caller's name, never its token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

import orjson
import structlog
from aiohttp import web
from pydantic import ValidationError

from daemon.core.ids import is_uuid
from daemon.service.control.auth import Authenticator, CallerLimiter
from daemon.service.control.models import EjectionRequest, ErrorBody
from daemon.service.control.openapi import document_bytes
from daemon.service.control.service import Answer, ControlService, error
from daemon.service.listener import Listener, ListenerLimits, TlsFiles, peer_common_name
from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)

MAX_BODY = 64 * 1024  # bytes
ANONYMOUS = "-"  # the caller label of requests that did not authenticate
CALLER = web.RequestKey("caller", str)  # the authenticated caller's name, on the request
AUTH_LOG_INTERVAL = 10.0  # seconds between control_auth_failed lines per remote and reason

_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          408: "body_timeout",
          413: "body_too_large", 415: "unsupported_media_type", 429: "rate_limited",
          500: "internal_error", 503: "unavailable"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _response(answer: Answer) -> web.Response:
    body = orjson.dumps(answer.body.model_dump(mode="json"))
    resp = web.Response(body=body, status=answer.status, content_type="application/json")
    resp.headers["Cache-Control"] = "no-store"
    for k, v in answer.headers.items():
        resp.headers[k] = v
    return resp


def _validation_message(exc: ValidationError) -> tuple[str, str]:
    """(code, message) for a refused body; input values are never echoed."""
    first = exc.errors(include_input=False, include_url=False)[0]
    kind = str(first.get("type", ""))
    loc = ".".join(str(x) for x in first.get("loc", ()))[:80]
    if kind == "json_invalid":
        return "bad_json", f"the body is not valid JSON: {first.get('msg', '')}"[:300]
    if kind == "extra_forbidden":
        return "unknown_field", f"unknown field {loc!r}; allowed: conversationId, participantId, " \
                                f"userId, externalContactId, address, name, reason"
    if kind == "missing":
        return "invalid_request", f"missing required field {loc!r}"
    if kind == "string_pattern_mismatch":
        return "invalid_id", f"{loc}: not a Genesys id (a UUID such as 3fa85f64-5717-4562-b3fc-2c963f66afa6)"
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return "invalid_request", f"{loc}: {msg}" if loc else msg


class LoginThrottle:
    """Failed logins per source address: `per_minute` failures a minute as a token bucket
    (a burst of `per_minute`, then refilling evenly). While an address has no allowance
    left, its requests are refused 429 before any token is looked at, so a client cannot
    go on guessing tokens. Memory: at most `max_addresses` buckets (the fullest ones, i.e.
    the least suspicious, are forgotten first when full)."""

    def __init__(self, per_minute: int = 10, *, max_addresses: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_addresses = max_addresses
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (allowance, at)

    def _allowance(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate)

    def wait(self, address: str) -> float:
        """0 when `address` may try to log in, else the seconds until it may."""
        if address not in self._buckets:
            return 0.0
        tokens = self._allowance(address, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def failed(self, address: str) -> None:
        """Count one failed login from `address`."""
        now = self._clock()
        if address not in self._buckets and len(self._buckets) >= self.max_addresses:
            fullest = max(self._buckets, key=lambda a: self._allowance(a, now))
            del self._buckets[fullest]
        self._buckets[address] = (max(0.0, self._allowance(address, now) - 1.0), now)


class ControlServer:
    """Serves the control API. `metrics`: a `Metrics` (or None). `limits`/`tls`: the
    listener's hardening (`daemon.service.listener`); with `tls.client_ca_file` every
    client must present a certificate from that CA, and `cert_callers` maps a
    certificate's subject CN to the caller it identifies (no token needed then).
    `throttle`: failed logins per source address (default 10 a minute)."""

    def __init__(self, service: ControlService, auth: Authenticator, limiter: CallerLimiter,
                 *, metrics: Metrics | None = None, limits: ListenerLimits | None = None,
                 tls: TlsFiles | None = None, cert_callers: Mapping[str, str] | None = None,
                 throttle: LoginThrottle | None = None) -> None:
        self.service = service
        self.auth = auth
        self.limiter = limiter
        self.metrics = metrics
        self.limits = limits or ListenerLimits()
        self.tls = tls
        self.cert_callers = dict(cert_callers or {})
        self.throttle = throttle or LoginThrottle()
        self.listener: Listener | None = None
        self._auth_log: dict[tuple[str, str], tuple[float, int]] = {}  # (remote, reason) -> (logged at, skipped)
        self.host: str | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        app.router.add_post("/v1/ejections", self._post_ejection)
        app.router.add_get("/v1/ejections/{id}", self._get_ejection, allow_head=False)
        app.router.add_get("/v1/calls/{conversationId}", self._get_call, allow_head=False)
        app.router.add_get("/v1/openapi.json", self._get_openapi, allow_head=False)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on exactly `host`:`port` (0: a free port). Returns the bound port; raises
        OSError when the address is taken or not local."""
        if self.listener is not None:
            raise RuntimeError("ControlServer already started")
        listener = Listener(self.app(), "control", limits=self.limits, tls=self.tls,
                            on_reject=self.metrics.note_listener_rejection if self.metrics else None)
        bound = await listener.start(host, port)
        self.listener = listener
        self.host, self.port = host, bound
        log.info("control_listening", host=host, port=bound, tls=self.tls is not None,
                 client_certificates=bool(self.tls and self.tls.client_ca_file))
        return bound

    async def stop(self) -> None:
        """Stop listening and close connections. Idempotent."""
        listener, self.listener = self.listener, None
        if listener is not None:
            await listener.close()
            log.info("control_stopped")

    # ------------------------------------------------------------------ middleware

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        resp: web.StreamResponse
        remote = request.remote or "?"
        throttled = self.throttle.wait(remote)
        if throttled > 0:
            if self.listener is not None:
                self.listener.guard.reject("login_throttled", remote=remote)
            resp = _response(error(429, "too_many_failed_logins",
                                   "too many failed logins from this address; wait and retry",
                                   **{"Retry-After": CallerLimiter.retry_after(throttled)}))
            self._account(request, None, route, resp.status, started)
            return resp
        caller, reason = self._identify(request)
        if caller is None:
            self.throttle.failed(remote)
            assert reason is not None
            if self.metrics is not None:
                self.metrics.control_auth_failures.labels(reason=reason).inc()
            self._log_auth_failure(reason, request, route)
            resp = _response(error(401, "unauthorized",
                                   "send Authorization: Bearer <token> with a configured caller's token"
                                   if reason == "missing" else "unknown token",
                                   **{"WWW-Authenticate": 'Bearer realm="confguard"'}))
        else:
            request[CALLER] = caller
            wait = self.limiter.check(caller)
            if wait > 0:
                if self.metrics is not None:
                    self.metrics.control_rate_limited.labels(caller=caller).inc()
                log.warning("control_rate_limited", caller=caller, route=route,
                            retry_after=round(wait, 3))
                resp = _response(error(
                    429, "rate_limited", f"more than {int(self.limiter.capacity)} requests a "
                    f"minute from caller {caller}", **{"Retry-After": self.limiter.retry_after(wait)}))
            else:
                resp = await self._handle(request, handler, caller, route)
        self._account(request, caller, route, resp.status, started)
        return resp

    async def _handle(self, request: web.Request, handler: Handler, caller: str,
                      route: str) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:  # routing (404/405) and body-size (413) answers
            status = exc.status
            message = exc.reason or "error"
            if status == 413:
                message = f"the body is larger than {MAX_BODY} bytes"
            elif status == 404:  # nothing of the request is quoted back
                message = "no such route; see GET /v1/openapi.json"
            resp = _response(error(status, _CODES.get(status, "http_error"), message))
            allow = exc.headers.get("Allow")
            if allow:
                resp.headers["Allow"] = allow
            return resp
        except Exception:  # a bug: one clear line, a JSON 500, and the daemon carries on
            log.exception("control_request_crashed", caller=caller, route=route)
            return _response(error(500, "internal_error", "internal error; see the daemon log"))

    def _identify(self, request: web.Request) -> tuple[str | None, str | None]:
        """The caller: the one its verified client certificate names (`cert_callers`, by
        subject CN), else the one its bearer token belongs to."""
        if self.cert_callers:
            cn = peer_common_name(request)
            if cn is not None and cn in self.cert_callers:
                return self.cert_callers[cn], None
        return self.auth.identify(request.headers.get("Authorization"))

    def _log_auth_failure(self, reason: str, request: web.Request, route: str) -> None:
        """One `control_auth_failed` line per remote address and reason every
        AUTH_LOG_INTERVAL seconds, with how many were not logged since: a client retrying
        a bad token in a loop must not flood the log (the metric counts every one)."""
        key = (request.remote or "?", reason)
        now = time.monotonic()
        last, skipped = self._auth_log.get(key, (-AUTH_LOG_INTERVAL, 0))
        if now - last < AUTH_LOG_INTERVAL:
            self._auth_log[key] = (last, skipped + 1)
            return
        if len(self._auth_log) >= 1024 and key not in self._auth_log:
            self._auth_log.clear()  # bounded: many addresses at once; start afresh
        self._auth_log[key] = (now, 0)
        log.warning("control_auth_failed", reason=reason, method=request.method, route=route,
                    remote=request.remote, not_logged_since=skipped)

    def _account(self, request: web.Request, caller: str | None, route: str, status: int,
                 started: float) -> None:
        who = caller or ANONYMOUS
        if self.metrics is not None:
            self.metrics.control_requests.labels(caller=who, route=route, status=str(status)).inc()
        level = "debug" if request.method == "GET" and status < 400 else "info"
        getattr(log, level)("control_request", caller=who, method=request.method, route=route,
                            status=status, ms=round((time.perf_counter() - started) * 1000, 3))

    # ------------------------------------------------------------------ handlers

    async def _post_ejection(self, request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
        try:  # a body trickling in is cut off like a slow header (the listener's limit)
            async with asyncio.timeout(self.limits.header_timeout):
                raw = await request.read()  # raises 413 past client_max_size (chunked bodies too)
        except TimeoutError:
            if self.listener is not None:
                self.listener.guard.reject("body_timeout", "info")
            resp = _response(error(408, "body_timeout", f"the body did not arrive within "
                                                        f"{self.limits.header_timeout:g} s"))
            resp.force_close()
            return resp
        try:
            body = EjectionRequest.model_validate_json(raw)
        except ValidationError as exc:
            code, message = _validation_message(exc)
            return _response(error(400, code, message))
        answer = await self.service.eject(request[CALLER], body,
                                          request.headers.get("Idempotency-Key"))
        return _response(answer)

    async def _get_ejection(self, request: web.Request) -> web.StreamResponse:
        ejection_id = request.match_info["id"]
        if not is_uuid(ejection_id):
            return _response(error(400, "invalid_id", "the ejection id is not a UUID (as "
                                                      "POST /v1/ejections returned it)"))
        return _response(self.service.ejection(request[CALLER], ejection_id))

    async def _get_call(self, request: web.Request) -> web.StreamResponse:
        conversation_id = request.match_info["conversationId"]
        if not is_uuid(conversation_id):
            return _response(error(400, "invalid_id", "conversationId is not a Genesys id "
                                                      "(a UUID such as 3fa85f64-5717-4562-b3fc-2c963f66afa6)"))
        return _response(self.service.call(conversation_id))

    async def _get_openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=document_bytes(), content_type="application/json")


__all__ = ["ControlServer", "ErrorBody", "LoginThrottle", "MAX_BODY"]
