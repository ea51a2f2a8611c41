"""The control API: lets orchestration services ask the running daemon to remove one party
from a live call, and read the calls it holds in memory. Off unless `control.listen` is set.

Modules: `models` (pydantic bodies, the single source of the OpenAPI document), `openapi`,
`auth` (tokens, constant-time lookup, per-caller limit), `service` (resolution,
idempotency, ejections; no HTTP), `server`
(aiohttp listener). `start_control(cfg, ...)` builds and starts it (the daemon gives it
its enforcer's `submit`, the store, the client and an `availability` callable).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from daemon.config import Config
from daemon.errors import ConfigError
from daemon.service.control.auth import Authenticator, CallerLimiter, load_callers
from daemon.service.control.server import ControlServer
from daemon.service.control.service import (Availability, CallReader, CallSource, ControlService,
                                            SubmitManual)
from daemon.service.listener import listener_limits, tls_files
from daemon.service.metrics import Metrics

__all__ = ["Availability", "ControlServer", "ControlService", "start_control"]


async def start_control(cfg: Config, *, submit: SubmitManual, store: CallSource,
                        client: CallReader | None, metrics: Metrics,
                        availability: Callable[[], Availability],
                        clock: Callable[[], float] = time.time) -> ControlServer:
    """Build the control API from what a started daemon has (its enforcer's `submit`, the
    call store, the client, the metrics and `availability`: draining, HA role) and listen
    on `control.listen`. Raises ConfigError for a token problem or an address that cannot
    be bound."""
    callers = load_callers(cfg)
    service = ControlService(submit, store, client, availability=availability, clock=clock)
    server = ControlServer(service, Authenticator(callers),
                           CallerLimiter(cfg.control.max_requests_per_minute),
                           metrics=metrics, limits=listener_limits(cfg.control),
                           tls=tls_files(cfg, cfg.control.tls),
                           cert_callers={c.client_cert_cn: name
                                         for name, c in cfg.control.callers.items()
                                         if c.client_cert_cn is not None})
    try:
        await server.start(cfg.control.host, cfg.control.port)
    except OSError as exc:
        message = (f"control.listen {cfg.control.listen}: cannot listen: {exc.strerror or exc} "
                   f"(another process on that port? it must differ from ops.listen)")
        raise (cfg.source.error(("control", "listen"), message) if cfg.source
               else ConfigError(message)) from None
    return server
