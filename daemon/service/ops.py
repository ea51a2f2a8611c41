"""The operations HTTP endpoint (aiohttp): `/metrics`, `/healthz`, `/readyz`.

- `GET /metrics`: Prometheus text format from `Metrics.render()`.
- `GET /healthz`: liveness. 200 `{"status": "ok", "state": ...}` whenever the process and
  its event loop answer (a wedged loop does not answer, which is the point); plus
  `"budget": {allowed, used, remaining, reset_seconds, learnt, reserve, in_flight,
  paused_seconds, rate_limited, headers_rejected}` once the API client exists, and
  `"coverage": {calls_known, calls_read, conferences_unread, oldest_unread_seconds}`
  (`daemon.core.coverage`: live calls known, how many read, conferences not read yet, how
  long the call unread the longest has waited, seconds). With HA,
  also `role` (leader | standby | no-lease), `epoch`, `node` and `lease_age` (seconds).
- `GET /readyz`: readiness. 200 `{"status": "ready", ...}` when `health().ready` (all
  topics subscribed, not in a gap/resync), else 503 `{"status": "not_ready", "reason": ...}`.

It binds exactly the host given (the config default is 127.0.0.1:9464, loopback only):
nothing here is authenticated, so exposing it wider is an explicit operator choice (with
`ops.tls` for TLS; a non-loopback address without it is warned about at start-up). The
listener is `daemon.service.listener.Listener`: header and idle timeouts, a connection cap,
fixed error answers, rate-limited error lines.
Access logging is off; scrapes every few seconds would drown the real log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web

from daemon.service.listener import Listener, ListenerLimits, TlsFiles
from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)

__all__ = ["HealthStatus", "OpsServer", "tcp_addresses"]


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """What `/healthz` and `/readyz` report. `state` is the daemon State name
    (`starting`, `running`, ...); `reason` says why not ready; `details` is free-form
    JSON-able data (e.g. subscribed topic count, tracked calls). `ha`: with
    `ha.backend: postgres`, the top-level `/healthz` keys `role`, `epoch`, `node` and
    `lease_age` (seconds); None on a single host. `sources`: each input's health by name
    (`daemon.service.sources.SourceHealth.as_dict`), the `/healthz` key `sources`."""

    state: str
    ready: bool
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    ha: dict[str, Any] | None = None
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)


def _json(data: dict[str, Any], status: int) -> web.Response:
    body = orjson.dumps(data, option=orjson.OPT_SORT_KEYS, default=str)
    return web.Response(body=body, status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def tcp_addresses(runner: web.AppRunner) -> list[tuple[str, int]]:
    """(host, port) of each TCP socket `runner` listens on."""
    return [(str(a[0]), int(a[1])) for a in runner.addresses
            if isinstance(a, tuple) and len(a) >= 2]


class OpsServer:
    """Serves metrics and health. `health` is called per request and must be cheap and
    non-blocking (it runs on the event loop). `limits` and `tls`: the listener's
    hardening (`daemon.service.listener`: header/idle timeouts, connection cap, TLS)."""

    def __init__(self, metrics: Metrics, health: Callable[[], HealthStatus], *,
                 limits: ListenerLimits | None = None, tls: TlsFiles | None = None) -> None:
        self._metrics = metrics
        self._health = health
        self._limits = limits
        self._tls = tls
        self.listener: Listener | None = None
        self.port: int | None = None
        self.host: str | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/healthz", self._get_healthz)
        app.router.add_get("/readyz", self._get_readyz)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 9464) -> int:
        """Listen on exactly `host`:`port` (port 0 picks a free one). Returns the bound
        port. Raises OSError when the address is taken or not local, ConfigError when the
        TLS files cannot be loaded."""
        if self.listener is not None:
            raise RuntimeError("OpsServer already started")
        listener = Listener(self._app(), "ops", limits=self._limits, tls=self._tls,
                            on_reject=self._metrics.note_listener_rejection)
        bound = await listener.start(host, port)
        self.listener = listener
        self.host, self.port = host, bound
        log.info("ops_listening", host=host, port=bound, tls=self._tls is not None)
        return bound

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket; empty when stopped."""
        return self.listener.addresses if self.listener is not None else []

    async def stop(self) -> None:
        """Stop listening and close connections. Idempotent."""
        listener, self.listener = self.listener, None
        if listener is not None:
            await listener.close()
            log.info("ops_stopped")

    # -- handlers

    async def _get_metrics(self, request: web.Request) -> web.Response:
        body = self._metrics.render()
        resp = web.Response(body=body, status=200)
        # Set the raw header: aiohttp's content_type= would split off the parameters.
        resp.headers["Content-Type"] = self._metrics.content_type
        return resp

    def _status(self) -> HealthStatus | None:
        try:
            return self._health()
        except Exception as exc:  # a broken health callback must not take the endpoint down
            log.error("health_callback_failed", error=repr(exc))
            return None

    async def _get_healthz(self, request: web.Request) -> web.Response:
        st = self._status()
        if st is None:
            return _json({"status": "error", "reason": "health check failed"}, 500)
        body: dict[str, Any] = {**(st.ha or {}), "status": "ok", "state": st.state}
        if "budget" in st.details:  # the request budget (daemon.genesys.ratelimit.BudgetSnapshot)
            body["budget"] = st.details["budget"]
        if "coverage" in st.details:  # daemon.core.coverage.CoverageSnapshot.as_dict()
            body["coverage"] = st.details["coverage"]
        if st.sources:
            body["sources"] = st.sources
        return _json(body, 200)

    async def _get_readyz(self, request: web.Request) -> web.Response:
        st = self._status()
        if st is None:
            return _json({"status": "not_ready", "reason": "health check failed"}, 503)
        body: dict[str, Any] = {"state": st.state, "details": st.details}
        if st.ready:
            body["status"] = "ready"
            return _json(body, 200)
        body["status"] = "not_ready"
        body["reason"] = st.reason or f"state is {st.state}"
        return _json(body, 503)
