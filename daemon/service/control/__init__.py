"""The control API: lets orchestration services ask the running daemon to remove one party
from a live call, and read the calls it holds in memory. Off unless `control.listen` is set.

Modules: `models` (pydantic bodies, the single source of the OpenAPI document), `openapi`,
`auth` (tokens, constant-time lookup, per-caller limit), `service` (resolution,
idempotency, ejections; no HTTP), `server`
(aiohttp listener). `start_control(daemon)` builds and starts it for a `Daemon`.
"""

from __future__ import annotations

from typing import Any

from daemon.errors import ConfigError
from daemon.service.control.auth import Authenticator, CallerLimiter, load_callers
from daemon.service.control.server import ControlServer
from daemon.service.control.service import Availability, ControlService
from daemon.service.listener import listener_limits, tls_files

__all__ = ["Availability", "ControlServer", "ControlService", "start_control"]


def _availability(daemon: Any) -> Availability:
    """Draining (or stopped) first; then the HA role, when the daemon has one: `ha_role`
    is a callable giving (role: leader | standby | no-lease, the leader's node or None)."""
    state = getattr(getattr(daemon, "state", None), "value", None)
    enforcer = getattr(daemon, "enforcer", None)
    if state in ("draining", "stopped") or (enforcer is not None and not enforcer.accepting):
        return Availability(False, "draining", "the daemon is shutting down; send the request "
                                               "to another instance or retry after it restarts")
    ha_role = getattr(daemon, "ha_role", None)
    if callable(ha_role):
        role, leader = ha_role()
        if role != "leader":
            code = "no_lease" if role == "no-lease" else "not_leader"
            where = f"; the leader is {leader}" if leader else "; the leader is not known"
            return Availability(False, code, f"this daemon is {role}: only the leader acts{where}",
                                leader)
    return Availability(True)


async def start_control(daemon: Any) -> ControlServer:
    """Build the control API for a started `Daemon` (its enforcer, store, client, metrics)
    and listen on `control.listen`. Raises ConfigError for a token problem or an address
    that cannot be bound."""
    cfg = daemon.config
    callers = load_callers(cfg)
    service = ControlService(daemon.enforcer.submit, daemon.engine.store, daemon.client,
                             availability=lambda: _availability(daemon), clock=daemon.clock)
    server = ControlServer(service, Authenticator(callers),
                           CallerLimiter(cfg.control.max_requests_per_minute),
                           metrics=daemon.metrics, limits=listener_limits(cfg.control),
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
