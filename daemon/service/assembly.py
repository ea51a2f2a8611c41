"""The composition root: every object of a running daemon, built through its constructor
with what it needs, in an order without cycles. Nothing is wired after construction.

Three stages, because each needs what the one before made:

1. `build_core(config, ...) -> Core` (at `Daemon(...)`; no network, no secrets): metrics,
   `Status`, rules, engine, the timer alarm (`TimerWake`), the gap watch, the coverage books
   (`daemon.core.coverage.Coverage`), the router's `StepAccounts` and the `--record` file.
2. `connect(core, ...) -> Wired` (at `Daemon.start()`; reads the credentials and the HA
   DSN): request limiter, Genesys client, HA (`HaNode`, `HaGate`), audit trail (stamped by
   the gate), enforcer (asking the gate, telling it each record: `DecisionHook`), event
   router, HA `Takeover` (reading through the router, opening removals through it), timers.
3. `attach(core, wired, scope, ...) -> Inputs` (once the scope is resolved): the sources
   (`SOURCES`), the resyncer and the reconciler.

Scope: one immutable `daemon.genesys.scope.Scope`. A reload resolves a new one, hands it
to every source (`Source.apply_scope`) and the resyncer (`Resyncer.set_scope`), and the
daemon keeps it (`Daemon.scope`); nothing shares a list.

Sources: `SOURCES` lists one factory per input (`daemon.service.sources`); each gets a
`SourceContext` and returns its `Source`, or None when it is not configured. Adding an
input is one module (its `Source` class and factory) and one line in `SOURCES`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from daemon.config import Config, SubscriptionSettings, load_lists, resolve_credentials, resolve_ha_dsn
from daemon.core.coverage import Coverage
from daemon.core.engine import Engine
from daemon.core.enforcement import Mode
from daemon.core.events import Message
from daemon.core.lease import LeasePolicy
from daemon.core.rules import RuleEngine, compile_rules
from daemon.core.state import CallStore
from daemon.genesys.api import GenesysClient
from daemon.genesys.ratelimit import RequestLimiter
from daemon.genesys.reconcile import Reconciler
from daemon.genesys.resync import Resyncer
from daemon.genesys.scope import Scope
from daemon.genesys.stream import StreamManager, StreamSettings
from daemon.service.audit import AuditLog, RotationHook
from daemon.service.enforcer import Enforcer
from daemon.service.eventbridge import eventbridge_source
from daemon.service.ha import HaGate, HaNode, Takeover
from daemon.service.loops import GapWatch, Timers, TimerWake
from daemon.service.metrics import Metrics
from daemon.service.router import EventRouter, Recorder, StepAccounts
from daemon.service.sources import Source, SourceContext, SourceFactory, WebSocketSource
from daemon.service.status import Status

if TYPE_CHECKING:
    from daemon.service.checkpoint import Checkpointer  # cryptography: imported only when used

log = structlog.get_logger(__name__)


# ---------------------------------------------------------------- sources




def websocket_source(ctx: SourceContext) -> Source:
    """The notification WebSocket (always on)."""
    subs = ctx.config.subscriptions

    def make_stream(on_message: Callable[[bytes | str, float], Message],
                    on_gap: Callable[[str], None]) -> StreamManager:
        return StreamManager(ctx.client, list(ctx.scope.topics), on_message=on_message,
                             on_gap=on_gap, settings=stream_settings(subs),
                             metrics=ctx.metrics)

    return WebSocketSource(ctx.sink, make_stream)


def stream_settings(subs: SubscriptionSettings) -> StreamSettings:
    """The stream's settings from the config's `subscriptions:` (the rest are defaults)."""
    return StreamSettings(heartbeat_timeout_factor=subs.heartbeat_timeout_factor,
                          channel_refresh_before=subs.channel_refresh_before,
                          compression=subs.compression)


#: Every input of the daemon, in start order (one line per source).
SOURCES: tuple[SourceFactory, ...] = (
    websocket_source,
    eventbridge_source,  # daemon.service.eventbridge: only with an `eventbridge:` section
)


# ---------------------------------------------------------------- stage 1: core


@dataclass(frozen=True, slots=True)
class Core:
    """What exists from `Daemon(...)` on (see the module docstring)."""

    config: Config
    metrics: Metrics
    status: Status
    rules: RuleEngine
    engine: Engine
    wake: TimerWake
    gaps: GapWatch
    accounts: StepAccounts
    recorder: Recorder | None
    clock: Callable[[], float]
    coverage: Coverage


def build_core(config: Config, *, record_path: str | os.PathLike[str] | None = None,
               clock: Callable[[], float] = time.time) -> Core:
    """Stage 1. Raises ConfigError (rules, lists, the `--record` file)."""
    metrics = Metrics()
    status = Status(metrics)
    rules = RuleEngine(compile_rules(config, load_lists(config)))  # its Enforcement holds the valve
    engine = Engine(rules, CallStore())
    wake = TimerWake(engine)
    recorder = Recorder(record_path) if record_path else None
    coverage = Coverage()  # which live calls are read: resyncs list them, steps read them
    metrics.track_coverage(lambda: coverage.snapshot(clock()))
    return Core(config=config, metrics=metrics, status=status, rules=rules, engine=engine,
                wake=wake, gaps=GapWatch(status, engine, metrics, clock=clock),
                accounts=StepAccounts(engine, metrics, clock=clock, wake=wake.poke, coverage=coverage),
                recorder=recorder, clock=clock, coverage=coverage)


# ---------------------------------------------------------------- stage 2: connected


@dataclass(frozen=True, slots=True)
class Ha:
    """`ha.backend: postgres`: the lease loop, the send gate, the take-over."""

    node: HaNode
    gate: HaGate
    takeover: Takeover


@dataclass(frozen=True, slots=True)
class Wired:
    """What exists from `Daemon.start()` on (see the module docstring)."""

    client: GenesysClient
    audit: AuditLog
    enforcer: Enforcer
    router: EventRouter
    timers: Timers
    ha: Ha | None
    checkpointer: Checkpointer | None = None  # with a signing key (docs/audit.md)


def connect(core: Core, *, mode: Mode) -> Wired:
    """Stage 2: read the credentials (and the HA DSN) and build everything that talks to
    Genesys, the audit trail and the database. Opens nothing: `Daemon.start` does.
    Raises CredentialsError / ConfigError."""
    cfg, metrics, clock = core.config, core.metrics, core.clock
    credentials = resolve_credentials(cfg.genesys, base_dir=cfg.base_dir)
    limiter = RequestLimiter(cfg.genesys.requests_per_minute, enforce_reserve=cfg.genesys.enforce_reserve,
                             on_rate_limited=lambda p: metrics.rate_limited.labels(priority=p.label).inc())
    client = GenesysClient(cfg.genesys, credentials, limiter=limiter,
                           on_response=_response_counter(metrics))
    metrics.track_budget(limiter.snapshot)
    node = gate = None
    if cfg.ha.enabled:
        ha = cfg.ha
        node = HaNode(resolve_ha_dsn(ha, base_dir=cfg.base_dir), lease=ha.lease, node=ha.node_name,
                      policy=LeasePolicy(ha.takeover_after, safety_margin=ha.safety_margin),
                      metrics=metrics)
        gate = HaGate(node)
    audit, checkpointer = _audit_trail(cfg, metrics, gate=gate, node=node)
    enforcer = Enforcer(client, audit, core.engine, mode=mode, metrics=metrics, clock=clock,
                        note_step=core.accounts.note_rest, gate=gate, hook=gate,
                        sync_before_patch=cfg.audit.sync_before_patch)
    router = EventRouter(core.engine, enforcer, core.accounts, client, metrics,
                         on_gap=core.gaps.open, recorder=core.recorder, clock=clock)
    timers = Timers(core.engine, core.wake, submit=router.submit, metrics=metrics,
                    token_age=lambda: client.tokens.age, clock=clock)
    ha_parts = None
    if node is not None and gate is not None:
        takeover = Takeover(node, gate, read_call=router.read_call, write=audit.write,
                            on_open=router.act_now)
        ha_parts = Ha(node, gate, takeover)
    return Wired(client=client, audit=audit, enforcer=enforcer, router=router, timers=timers,
                 ha=ha_parts, checkpointer=checkpointer)


def _audit_trail(cfg: Config, metrics: Metrics, *, gate: HaGate | None,
                 node: HaNode | None) -> tuple[AuditLog, Checkpointer | None]:
    """The audit trail, built by its Checkpointer when a signing key is configured (the
    checkpointer is the trail's rotation hook, a constructor argument of both), else alone.
    Reads the signing key; raises AuditError / ConfigError (see `checkpointer_for`)."""
    from daemon.service.checkpoint import checkpointer_for  # cryptography: only when started

    def make_audit(rotation: RotationHook | None) -> AuditLog:
        return AuditLog(cfg.resolve_path(cfg.audit.path), max_bytes=cfg.audit.max_bytes,
                        fsync_interval=cfg.audit.fsync_interval,
                        on_record=lambda kind: metrics.child(metrics.audit_records, kind).inc(),
                        stamp=gate.stamp if gate is not None else None, rotation=rotation)

    checkpointer = checkpointer_for(
        cfg, make_audit, epoch=lambda: node.epoch if node is not None else 0,
        on_result=lambda sink, result: metrics.audit_checkpoints.labels(sink=sink, result=result).inc())
    audit = checkpointer.audit if checkpointer is not None else make_audit(None)
    metrics.audit_unsynced_seconds.set_function(audit.unsynced_seconds)
    if checkpointer is not None:
        metrics.audit_checkpoints_queued.set_function(checkpointer.pending)
    return audit, checkpointer


def _response_counter(metrics: Metrics) -> Callable[[str, str, int, float], None]:
    """The client's `on_response`: every answer counted by method, route and status."""

    def on_response(method: str, route: str, status: int, seconds: float) -> None:
        metrics.api_requests.labels(method=method, route=route, status=str(status)).inc()
        if status >= 400 or status == 0:
            metrics.api_errors.labels(status=str(status)).inc()

    return on_response


# ---------------------------------------------------------------- stage 3: inputs


@dataclass(frozen=True, slots=True)
class Inputs:
    """What exists once the scope is resolved: the sources, the resyncer and the reconciler
    (None with `reconcile_interval: 0`)."""

    sources: tuple[Source, ...]
    resyncer: Resyncer
    reconciler: Reconciler | None


def attach(core: Core, wired: Wired, scope: Scope, *,
           factories: Sequence[SourceFactory] = SOURCES) -> Inputs:
    """Stage 3: build the sources of `factories` (those that return None are off) and the
    REST readers of the scope."""
    cfg, metrics, clock = core.config, core.metrics, core.clock
    ctx = SourceContext(cfg, wired.client, wired.router, metrics, scope, clock, state=core.engine.store)
    built = (make(ctx) for make in factories)
    sources = tuple(source for source in built if source is not None)
    resyncer = Resyncer(wired.client, core.engine, scope,
                        metrics=metrics, on_step=wired.router.step, clock=clock,
                        coverage=core.coverage)
    subs = cfg.subscriptions
    reconciler = None
    if subs.reconcile_interval > 0:
        reconciler = Reconciler(resyncer, interval=subs.reconcile_interval, share=subs.reconcile_share,
                                limiter=wired.client.limiter, metrics=metrics, clock=clock)
    return Inputs(sources=sources, resyncer=resyncer, reconciler=reconciler)


__all__ = ["SOURCES", "Core", "Ha", "Inputs", "SourceContext", "SourceFactory",
           "Wired", "attach", "build_core", "connect", "websocket_source"]
