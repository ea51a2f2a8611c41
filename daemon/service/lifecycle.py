"""The daemon: lifecycle, signals, reload and the hot path from socket to decision.

Lifecycle (each transition is logged, exported as `confguard_daemon_state` and shown by
`/healthz`; modelled on uvicorn's `Server`):

    STARTING -> SUBSCRIBING -> RESYNCING -> RUNNING <-> DEGRADED (a gap: resync under way)
                                              |  ^
                                              v  |
                                           RELOADING
    any -> DRAINING -> STOPPED

- SIGTERM/SIGINT: within one deadline (`ops.shutdown_timeout`, default 15 s, under the
  unit's TimeoutStopSec=20): stop taking decisions, let in-flight disconnects finish, close
  the stream, flush and fsync the audit, exit 0. A second signal cuts the waits short;
  the audit is still fsynced, and the exit code is 1. See `Daemon.stop`.
- SIGHUP: reload config.yaml and lists. An invalid file is rejected with one clear log
  line and the old rules stay in force; changed subscriptions are applied without dropping
  the unchanged ones. A SIGHUP during a reload is queued: the files are read once more after it.
- SIGUSR1: resume enforcement after the safety valve tripped; every live party that
  matches a disconnect rule and has not been removed is acted on at once
  (`Enforcer.resume_valve`).

The hot path (`_on_message`) runs synchronously in the WebSocket reader's turn of the event
loop: parse, apply, evaluate, then `Enforcer.handle(step)`, which settles in-flight parties
the change shows final, audits each decision and starts its PATCH at once. Nothing on it
awaits. Resync and reconciliation reads take the same path (`Resyncer(on_step=...)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.service import systemd
from daemon.genesys.api import GenesysClient
from daemon.service.audit import AuditLog
from daemon.config import Config, load_config, load_lists, resolve_credentials
from daemon.core.engine import Engine
from daemon.core.enforcement import SafetyValve
from daemon.service.enforcer import Enforcer
from daemon.errors import ConfigError, ConfguardError, StreamError, SubscriptionError
from daemon.service.metrics import Metrics
from daemon.core.model import Decision
from daemon.service.listener import build_tls_context, listener_limits, tls_files
from daemon.service.ops import HealthStatus, OpsServer
from daemon.genesys.reconcile import Reconciler
from daemon.genesys.resync import Resyncer
from daemon.genesys.retry import RetryPolicy
from daemon.core.rules import RuleEngine, RuleSet, compile_rules
from daemon.genesys.scope import resolve_scope
from daemon.core.state import CallStore
from daemon.genesys.stream import StreamManager
from daemon.service.assembly import SOURCES, SourceContext, SourceFactory
from daemon.service.router import EventRouter, Recorder, StepAccounts
from daemon.service.sources import Source, WebSocketSource
from daemon.config import resolve_ha_dsn
from daemon.core.lease import LeasePolicy
from daemon.service.ha import Failover, HaNode, within
from daemon.service.recovery import Unfinished, close_unfinished, unfinished_in_audit

if TYPE_CHECKING:
    from daemon.service.checkpoint import Checkpointer
    from daemon.service.control import ControlServer

log = structlog.get_logger(__name__)
event_log = structlog.get_logger(__name__)

GAP_RESYNC_RETRY = RetryPolicy(initial=1.0, factor=2.0, cap=60.0, jitter=0.0)
"""Between failed resyncs after a gap: 1 s doubling to 60 s, unbounded (the gap stays open)."""


class State(enum.Enum):
    """Where the daemon is in its life. Values are the metric and health labels."""

    STARTING = "starting"
    SUBSCRIBING = "subscribing"
    RESYNCING = "resyncing"
    RUNNING = "running"
    DEGRADED = "degraded"
    RELOADING = "reloading"
    DRAINING = "draining"
    STOPPED = "stopped"


class Daemon:
    """One confguard process: stream in, decisions out.

    `start()` returns once subscribed and resynced (READY); `stop()` drains and closes.
    `run()` does both around signal handling and is what `confguard run` calls.
    """

    def __init__(self, config: Config, *, config_path: str | os.PathLike[str] | None = None,
                 observe: bool = False, record_path: str | os.PathLike[str] | None = None,
                 drain_timeout: float | None = None, clock: Callable[[], float] = time.time,
                 sources: Sequence[SourceFactory] = SOURCES) -> None:
        self.config = config
        self._source_factories = tuple(sources)
        self._startup_config = config  # what the client, audit, ops and stream were built from
        self.config_path = Path(config_path) if config_path else None
        self.observe_flag = observe
        self.drain_timeout = drain_timeout
        self.clock = clock
        self.metrics = Metrics()
        self.state = State.STARTING
        self.metrics.daemon_state.state(self.state.value)
        ruleset = compile_rules(config, load_lists(config))
        self.rules = RuleEngine(ruleset)  # its Enforcement holds the valve (safety.*)
        self.engine = Engine(self.rules, CallStore())
        self.audit = AuditLog(config.resolve_path(config.audit.path), max_bytes=config.audit.max_bytes,
                              fsync_interval=config.audit.fsync_interval,
                              on_record=lambda kind: self.metrics.audit_records.labels(type=kind).inc())
        self.metrics.audit_unsynced_seconds.set_function(self.audit.unsynced_seconds)
        self.client: GenesysClient | None = None
        self.enforcer: Enforcer | None = None
        self.stream: StreamManager | None = None  # the WebSocket source's stream
        self.resyncer: Resyncer | None = None
        self.reconciler: Reconciler | None = None
        self.ops: OpsServer | None = None
        self.ops_port: int | None = None
        self.control: ControlServer | None = None  # when control.listen is set
        # Set by HA: () -> (role: leader | standby | no-lease, leader node or None); the control
        # API answers 503 unless leader. None: no HA, this daemon always acts.
        self.ha_role: Callable[[], tuple[str, str | None]] | None = None
        self._recorder = Recorder(record_path) if record_path else None
        self.accounts = StepAccounts(self.engine, self.metrics, clock=clock, wake=self._maybe_reschedule)
        self.router: EventRouter | None = None
        self.sources: list[Source] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._timer_wake = asyncio.Event()
        self._gap_flag = asyncio.Event()
        self._scheduled_deadline: float | None = None
        self._gap_reason: str | None = "startup"
        self._signals = 0
        self._force = asyncio.Event()
        self.forced = False  # force_exit() was called: stop() cut short, run() returns 1
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._stop_requested = asyncio.Event()
        self._fatal: BaseException | None = None
        # HA (ha.backend: postgres): the lease, the send gate, take-over; None on one host.
        self.failover: Failover | None = None
        self._ha_stop = asyncio.Event()
        self._ha_task: asyncio.Task[None] | None = None
        self._unfinished: list[Unfinished] = []
        self.checkpointer: Checkpointer | None = None  # with a signing key (docs/audit.md)

    # ------------------------------------------------------------------ lifecycle

    @property
    def mode(self) -> str:
        return "observe" if self.observe_flag else self.config.mode

    @property
    def safety(self) -> SafetyValve:
        """The safety valve (owned by the engine's `Enforcement`)."""
        return self.engine.enforcement.valve

    def _set_state(self, new: State, **why: Any) -> None:
        if new is self.state:
            return
        log.info("daemon_state", old=self.state.value, new=new.value, **why)
        self.state = new
        self.metrics.daemon_state.state(new.value)
        systemd.status(f"{new.value}" + (f": {why.get('reason')}" if why.get("reason") else ""))

    def health(self) -> HealthStatus:
        sources = {s.name: s.health() for s in self.sources}
        forbidden = self.enforcer.forbidden if self.enforcer is not None else ()
        ready = (self.state in (State.RUNNING, State.RELOADING) and bool(sources)
                 and all(h.ready for s, h in zip(self.sources, sources.values()) if s.required)
                 and self._gap_reason is None and not forbidden)
        reason = None if ready else (self._gap_reason or self.state.value)
        details: dict[str, Any] = {
            "mode": self.mode,
            "tracked_calls": len(self.engine.store),
            "safety_valve_tripped": self.safety.tripped,
            "in_flight": self.enforcer.in_flight if self.enforcer else 0,
        }
        if forbidden and reason == self.state.value:
            # Degraded: removals are refused (403) until the permission is granted.
            reason = f"degraded: a removal was refused (403): missing permission {', '.join(forbidden)}"
        if forbidden:
            details["missing_permissions"] = list(forbidden)
        if self.client is not None:
            details["budget"] = self.client.limiter.snapshot().as_dict()
        return HealthStatus(state=self.state.value, ready=ready, reason=reason, details=details,
                            ha=self.failover.node.health() if self.failover is not None else None,
                            sources={name: h.as_dict() for name, h in sources.items()})

    async def start(self) -> None:
        """Open everything, subscribe, resync; returns when ready (READY=1 sent)."""
        cfg = self.config
        log.info("daemon_starting", mode=self.mode, rules=len(cfg.rules), api=cfg.genesys.api_origin)
        if cfg.ops.enabled:
            self.ops = OpsServer(self.metrics, self.health, limits=listener_limits(cfg.ops),
                                 tls=tls_files(cfg, cfg.ops.tls))
            try:
                self.ops_port = await self.ops.start(cfg.ops.host, cfg.ops.port)
            except OSError as exc:  # port taken, address not local: an operator error, not a crash
                self.ops = None
                message = (f"ops.listen {cfg.ops.listen}: cannot listen: {exc.strerror or exc} "
                           f"(another process on that port? choose another, or set ops.enabled: false)")
                raise (cfg.source.error(("ops", "listen"), message) if cfg.source
                       else ConfigError(message)) from None
        self.audit.open()
        from daemon.service.checkpoint import checkpointer_for  # cryptography: only when started

        self.checkpointer = checkpointer_for(
            cfg, self.audit, epoch=lambda: self.failover.node.epoch if self.failover is not None else 0,
            on_result=lambda sink, result: self.metrics.audit_checkpoints.labels(sink=sink, result=result).inc())
        if self.checkpointer is not None:
            self.metrics.audit_checkpoints_queued.set_function(self.checkpointer.pending)
        # Before any new record: decisions of an earlier run with no outcome (closed below).
        self._unfinished = unfinished_in_audit(self.audit.path)
        credentials = resolve_credentials(cfg.genesys, base_dir=cfg.base_dir)
        self.client = GenesysClient(cfg.genesys, credentials, on_response=self._on_response)
        self.client.limiter.on_rate_limited = \
            lambda p: self.metrics.rate_limited.labels(priority=p.label).inc()
        self.metrics.track_budget(self.client.limiter.snapshot)
        self._tasks.append(asyncio.create_task(self._read_budget_limit(), name="budget-limit"))
        self.enforcer = Enforcer(self.client, self.audit, self.engine, mode=self.mode,  # type: ignore[arg-type]
                                 metrics=self.metrics, clock=self.clock,
                                 note_step=self.accounts.note_rest)
        self.enforcer.sync_before_patch = cfg.audit.sync_before_patch
        self.router = EventRouter(self.engine, self.enforcer, self.accounts, self.client, self.metrics,
                                  on_gap=self._on_gap, recorder=self._recorder, clock=self.clock)
        if cfg.ha.enabled:
            self._start_ha()
        if cfg.control.enabled:
            from daemon.service.control import start_control
            self.control = await start_control(self)
        self._tasks.append(asyncio.create_task(self.audit.run_syncer(self._stop), name="audit-fsync"))
        if self.checkpointer is not None:
            self._tasks.append(asyncio.create_task(self.checkpointer.run(self._stop), name="audit-checkpoint"))
        self._tasks.append(asyncio.create_task(self._timers(), name="timers"))
        self._tasks.append(asyncio.create_task(systemd.run_watchdog(self._stop), name="watchdog"))

        if self._unfinished:
            # Before the stream and the start-up resync: what a call shows now must be read
            # before any removal of this run could change it.
            await self._close_unfinished()
        self._set_state(State.SUBSCRIBING)
        scope = await resolve_scope(self.client, cfg.subscriptions)
        client, router = self.client, self.router
        built = (make(SourceContext(cfg, client, router, self.metrics, scope, self.clock,
                                    state=self.engine.store))
                 for make in self._source_factories)
        self.sources = [source for source in built if source is not None]
        self.resyncer = Resyncer(self.client, self.engine, scope,
                                 metrics=self.metrics, on_step=router.step, clock=self.clock)
        for source in self.sources:
            if isinstance(source, WebSocketSource):
                self.stream = source.stream
            await source.start()
            task = asyncio.create_task(source.run(), name=f"source-{source.name}")
            task.add_done_callback(functools.partial(self._source_ended, source.name))
            self._tasks.append(task)

        self._set_state(State.RESYNCING)
        if cfg.subscriptions.resync_on_start:
            await self.resyncer.resync("startup")
        self._gap_reason = None
        for source in self.sources:
            source.resynced(None)
        self._tasks.append(asyncio.create_task(self._gap_watch(), name="gap-watch"))
        if cfg.subscriptions.reconcile_interval > 0:
            self._tasks.append(asyncio.create_task(self._reconcile(), name="reconcile"))
        self._set_state(State.RUNNING)
        if self.failover is not None:
            self.failover.mark_ready()
        systemd.ready(f"running: {len(scope.topics)} topics, {len(self.engine.store)} calls, mode {self.mode}")

    async def _read_budget_limit(self) -> None:
        """Once at start-up: the org's per-token budget from the limits API (optional; a
        403 or any failure is logged once and the limiter keeps `requests_per_minute`)."""
        assert self.client is not None
        try:
            await self.client.read_budget_limit()
        except ConfguardError as exc:
            log.info("budget_limits_unknown", error=str(exc)[:200])

    async def stop(self) -> None:
        """Shut down within one deadline, `ops.shutdown_timeout` seconds from the call
        (modelled on uvicorn's graceful shutdown):

        1. stop taking decisions (later ones are audited `suppressed`) and cancel a reload;
        2. let in-flight removals finish, for at most the deadline less `_close_reserve`
           (and less `drain_timeout` when given); the rest are cancelled, each with its
           outcome record;
        3. close the stream (unsubscribe), stop the background tasks;
        4. fsync and close the audit trail: always, also when the deadline has passed or a
           second signal asked for a forced exit;
        5. close the API client and the ops endpoint.

        A forced exit (`force_exit()`, the second SIGTERM/SIGINT) cuts every remaining wait
        short; step 4 still runs. Idempotent."""
        if self.state is State.STOPPED:
            return
        loop = asyncio.get_running_loop()
        timeout = self._startup_config.ops.shutdown_timeout
        started = loop.time()
        deadline = started + timeout

        def left(reserve: float = 0.0) -> float:
            return max(0.0, deadline - reserve - loop.time())

        self._set_state(State.DRAINING)
        systemd.stopping()
        log.info("shutdown_started", timeout=timeout, in_flight=self.enforcer.in_flight if self.enforcer else 0)
        if self.enforcer is not None:
            self.enforcer.stop_accepting()
        if self._reload_task is not None and not self._reload_task.done():
            # A reload must not finish during the drain and report the daemon RUNNING/READY.
            self._reload_task.cancel()
            await self._bounded(self._reload_task, min(5.0, left()), "reload")  # its roll-back is bounded too
        abandoned = 0
        if self.enforcer is not None:
            drain_for = left(_close_reserve(timeout))
            if self.drain_timeout is not None:
                drain_for = min(drain_for, self.drain_timeout)
            drain = asyncio.ensure_future(self.enforcer.drain(drain_for))
            # At `drain_for` the drain cancels what is still in flight and waits (bounded by
            # the enforcer) for those outcome records; a forced exit cuts that to now.
            if await self._bounded(drain, drain_for + 5.0, "drain", cancel=False):
                abandoned = drain.result() if not drain.cancelled() and drain.exception() is None else 0
            else:
                drain.cancel()
                abandoned = self.enforcer.in_flight
                # Cancel the actions themselves: each still writes its outcome record.
                await self._bounded(self.enforcer.drain(0.0), _FORCED_GRACE, "drain_cancel")
        if self.failover is not None:  # after the drain: in-flight removals finish under the lease
            await self._bounded(self._stop_ha(), max(0.2, left(_final_reserve(timeout))), "ha_release")
        self._stop.set()
        for source in self.sources:
            await self._bounded(source.stop(), left(_final_reserve(timeout)), f"{source.name}_close")
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(0.1, left(_final_reserve(timeout))))
        self._tasks.clear()
        if self.control is not None:  # after the drain: until then POSTs get 503 draining
            await self._bounded(self.control.stop(), max(0.2, left()), "control_close")
        if self.checkpointer is not None and self.audit.is_open:  # the last one, then the sinks
            budget = min(3.0, max(0.2, left()))
            await self._bounded(self.checkpointer.close(budget), budget + 0.5, "audit_checkpoint")
        try:
            self.audit.close()  # fsync: never skipped, whatever the deadline or the signals
            log.info("audit_closed", seq=self.audit.seq, synced=not self.audit.needs_sync)
        except Exception as exc:  # noqa: BLE001 - the rest of the shutdown still runs
            log.critical("audit_close_failed", error=str(exc), error_type=type(exc).__name__)
        if self.router is not None:
            self.router.close()
        elif self._recorder is not None:
            self._recorder.close()
        if self.client is not None:
            await self._bounded(self.client.aclose(), max(0.2, left()), "client_close")
        if self.ops is not None:
            await self._bounded(self.ops.stop(), max(0.2, left()), "ops_close")
        took = round(loop.time() - started, 3)
        if self.forced:
            # Not a graceful stop, so no `daemon_state ... stopped` line: this one ends the log.
            self.state = State.STOPPED
            self.metrics.daemon_state.state(State.STOPPED.value)
            log.warning("shutdown_forced_exit", abandoned=abandoned, seconds=took, exit_code=1)
            return
        if took > timeout:
            log.warning("shutdown_deadline_exceeded", timeout=timeout, seconds=took)
        self._set_state(State.STOPPED, abandoned=abandoned, seconds=took)

    def force_exit(self) -> None:
        """Cut the shutdown short (the second SIGTERM/SIGINT): every remaining wait of
        `stop()` ends now; the audit is still fsynced; `run()` then returns 1."""
        self.forced = True
        self._force.set()

    async def _bounded(self, aw: Awaitable[Any], seconds: float, step: str, *,
                       cancel: bool = True) -> bool:
        """Await `aw` for at most `seconds`; after `force_exit()`, for at most
        `_FORCED_GRACE` more. True when it finished (an exception it raised is logged, not
        raised). When cut short it is cancelled (unless `cancel` is False) and given
        `_FORCED_GRACE` to unwind."""
        task = asyncio.ensure_future(aw)
        if not self._force.is_set():
            forced = asyncio.ensure_future(self._force.wait())
            try:
                await asyncio.wait({task, forced}, timeout=max(0.0, seconds),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                forced.cancel()
        if not task.done() and self._force.is_set():
            await asyncio.wait({task}, timeout=min(max(0.0, seconds), _FORCED_GRACE))
        if task.done():
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                log.warning("shutdown_step_failed", step=step, error=str(exc), error_type=type(exc).__name__)
            return True
        log.warning("shutdown_step_cut_short", step=step, forced=self.forced)
        if cancel:
            task.cancel()
            await asyncio.wait({task}, timeout=_FORCED_GRACE)
        return False

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop. Returns the process exit code: 0, or 1
        after a forced exit (a second SIGTERM/SIGINT during the shutdown)."""
        loop = asyncio.get_running_loop()
        stop_requested = self._stop_requested

        def on_stop(signame: str) -> None:
            self._signals += 1
            if self._signals > 1:
                log.warning("second_signal_exit_now", signal=signame,
                            detail="waits cut short; the audit is still fsynced; exit code 1")
                self.force_exit()
                return
            log.info("stop_requested", signal=signame)
            stop_requested.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR1, self.resume_enforcement)
        try:
            start = asyncio.create_task(self.start())
            waiter = asyncio.create_task(stop_requested.wait())
            done, _ = await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if start in done:
                start.result()  # raise start-up errors (rejected topics, bad credentials...)
                await waiter
            else:
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
        if self._fatal is not None:
            raise self._fatal
        return 1 if self.forced else 0

    def _source_ended(self, name: str, task: asyncio.Task[Any]) -> None:
        """A source's task should only end when we stop it. If it fails, stop the daemon
        with an error so systemd (Restart=on-failure) starts a fresh one."""
        if task.cancelled() or self._stop.is_set():
            return
        exc = task.exception()
        log.critical("stream_failed", source=name,
                     error=str(exc) if exc else "stream ended unexpectedly",
                     error_type=type(exc).__name__ if exc else None)
        self._fatal = exc if isinstance(exc, ConfguardError) else StreamError(
            f"the {name} source stopped unexpectedly: {exc!r}")
        self._stop_requested.set()

    def resume_enforcement(self) -> None:
        """SIGUSR1: reset a tripped safety valve (`Enforcer.resume_valve`: gauge to 0, one
        `safety_valve_reset` line) and act at once on every live party that matches a
        disconnect rule and has not been removed. Nothing can trip before the enforcer
        exists, so there is nothing to do then."""
        if self.enforcer is not None:
            self.enforcer.resume_valve()
            self._maybe_reschedule()

    def _on_sighup(self) -> None:
        """A SIGHUP during a reload is not dropped: the file is read once more afterwards
        (an operator or a config tool may have changed it again in the meantime)."""
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            log.info("reload_queued", detail="a reload is under way; the files are read again when it ends")
            return
        self._reload_task = asyncio.create_task(self._reload_until_settled(), name="reload")

    async def _reload_until_settled(self) -> None:
        for _ in range(100):  # bounded: each round needs another SIGHUP during the previous one
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    async def reload(self) -> bool:
        """Re-read config.yaml and lists; keep the old rules if the new file is invalid."""
        if self.config_path is None or self.state not in (State.RUNNING, State.DEGRADED):
            log.warning("reload_ignored", state=self.state.value)
            return False
        self._set_state(State.RELOADING)
        systemd.reloading()
        try:
            new, ruleset = await load_off_loop(self.config_path)
            self._reload_tls(new)
            if self.sources and self.client is not None:
                scope = await resolve_scope(self.client, new.subscriptions)
                if not scope.topics:  # as at start-up: never drop every subscription silently
                    raise SubscriptionError(
                        "nothing to subscribe: subscriptions.queues and subscriptions.users are "
                        "both empty in the new configuration")
                for source in self.sources:
                    await source.apply_scope(scope)
                if self.resyncer is not None:
                    self.resyncer.set_scope(scope)
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave us stuck in RELOADING
            log.error("reload_rejected", error=str(exc), error_type=type(exc).__name__,
                      detail="the previous configuration stays in force")
            self.metrics.config_reloads.labels(result="rejected").inc()
            # Not `previous`: a gap may have opened or closed while the reload awaited.
            self._set_state(State.DEGRADED if self._gap_reason else State.RUNNING)
            systemd.ready(f"{self.state.value}: reload rejected")
            return False
        self.rules.swap(ruleset)
        self.safety.max_per_minute = new.safety.max_disconnects_per_minute
        unapplied = _restart_only_changes(self._startup_config, new)
        if unapplied:  # say so, rather than let the operator believe they are live
            log.warning("reload_needs_restart", settings=unapplied,
                        detail="these settings keep their old values until confguard restarts")
        self.config = new
        if self.enforcer is not None:
            self.enforcer.mode = self.mode  # type: ignore[assignment]
            self.enforcer.clear_forbidden()  # granted meanwhile, the operator says; a new 403 says otherwise
        self.metrics.config_reloads.labels(result="ok").inc()
        log.info("reloaded", rules=len(new.rules), mode=self.mode, config=str(self.config_path))
        # New or changed rules judge the live calls now, not at each call's next event.
        decisions = self.rules.reevaluate(self.clock())
        if decisions:
            self._submit(decisions)
        self._set_state(State.DEGRADED if self._gap_reason else State.RUNNING)
        systemd.ready(f"{self.state.value}: reloaded")
        return True

    def _reload_tls(self, new: Config) -> None:
        """Re-read the ops and control TLS files (a renewed certificate under the same path
        takes effect for new connections). Both are loaded before either is swapped, so a
        bad file leaves both listeners as they were (ConfigError)."""
        pairs = [(self.ops.listener if self.ops else None, tls_files(new, new.ops.tls), "ops"),
                 (self.control.listener if self.control else None,
                  tls_files(new, new.control.tls), "control")]
        for listener, files, name in pairs:
            if listener is not None and files is not None:
                build_tls_context(files, what=f"{name}.tls")  # raises before anything changes
        for listener, files, _ in pairs:
            if listener is not None and files is not None:
                listener.reload_tls(files)

    # ------------------------------------------------------------------ HA

    def _start_ha(self) -> None:
        """ha.backend: postgres: contend for the lease (docs/ha.md). The
        lease loop runs until `_stop_ha`; until this node holds the lease and finished its
        take-over, the send gate is closed and decisions are audited `standby`."""
        ha = self.config.ha
        node = HaNode(resolve_ha_dsn(ha, base_dir=self.config.base_dir), lease=ha.lease, node=ha.node_name,
                      policy=LeasePolicy(ha.takeover_after), metrics=self.metrics)
        assert self.router is not None
        self.failover = Failover(node, read_call=self.router.read_call, write=self.audit.write,
                                 on_open=self._enforcement_possible)
        self.audit.stamp = self.failover.stamp
        self.audit.observers.append(self.failover.observe)
        self.ha_role = self.failover.role_and_leader
        if self.enforcer is not None:  # the send gate: closed unless leader with the take-over done
            self.enforcer.gate = self.failover
        node.update_metrics()
        log.info("ha_starting", node=node.node, lease=ha.lease, takeover_after=ha.takeover_after)
        self._ha_task = asyncio.create_task(node.run(self._ha_stop), name="ha-lease")

    async def _stop_ha(self) -> None:
        """Hand the lease back (so the standby takes over at once) and stop the loop."""
        if self.failover is None or self._ha_task is None:
            return
        self._ha_stop.set()
        await asyncio.wait({self._ha_task}, timeout=5.0)
        await self.failover.aclose()
        with contextlib.suppress(Exception):
            await within(self.failover.node.release(), 5.0)
        self._ha_task = None

    def _enforcement_possible(self, reason: str) -> None:
        """Removals became possible again: act on every live matching party at once."""
        if self.enforcer is not None:
            self.enforcer.act_now(reason)
            self._maybe_reschedule()

    async def _close_unfinished(self) -> None:
        """Close this host's decisions of an earlier run that have no outcome record."""
        items, self._unfinished = self._unfinished, []
        assert self.router is not None
        log.warning("unfinished_decisions_found", count=len(items), audit=str(self.audit.path))
        try:
            await asyncio.wait_for(close_unfinished(items, read_call=self.router.read_call,
                                                    write=self.audit.write, closed_on="startup"),
                                   timeout=30.0)
        except asyncio.TimeoutError:  # a stuck API must not keep the daemon from starting
            log.error("unfinished_decisions_timeout", count=len(items),
                      detail="the rest are closed at the next start")

    # ------------------------------------------------------------------ input

    def _submit(self, decisions: list[Decision]) -> None:
        """Decisions with no state change behind them (timers, a reload's re-evaluation)."""
        if self.router is not None:
            self.router.submit(decisions)

    def _on_response(self, method: str, route: str, status: int, seconds: float) -> None:
        self.metrics.api_requests.labels(method=method, route=route, status=str(status)).inc()
        if status >= 400 or status == 0:
            self.metrics.api_errors.labels(status=str(status)).inc()

    # ------------------------------------------------------------------ gaps and timers

    def _on_gap(self, reason: str) -> None:
        """The stream may have missed events: resync (coalesced) and report not-ready."""
        self._gap_reason = reason
        if self.state is State.RUNNING:
            self._set_state(State.DEGRADED, reason=reason)
        self._gap_flag.set()

    async def _gap_watch(self) -> None:
        """Resync after each gap; retry with `GAP_RESYNC_RETRY`'s back-off until one succeeds."""
        flag = self._gap_flag
        if self._gap_reason:
            flag.set()
        delays = GAP_RESYNC_RETRY.backoff()
        while not self._stop.is_set():
            await flag.wait()
            flag.clear()
            reason = self._gap_reason or "gap"
            assert self.resyncer is not None
            started = self.clock()
            try:
                await self.resyncer.resync(reason)
            except ConfguardError as exc:
                delay = next(delays)
                log.error("resync_failed", reason=reason, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                flag.set()
                continue
            delays = GAP_RESYNC_RETRY.backoff()
            self.metrics.tracked_calls.set(len(self.engine.store))
            if not flag.is_set():  # no newer gap arrived while resyncing
                self._gap_reason = None
                for source in self.sources:
                    source.resynced(started)
                if self.state is State.DEGRADED:
                    self._set_state(State.RUNNING, reason="resynced")

    async def _reconcile(self) -> None:
        """Anti-entropy: Genesys never reports a lost event, so calls without an event or a
        read for `reconcile_interval` seconds are re-read, riskiest first, within
        `reconcile_share` of the budget (`daemon.genesys.reconcile.Reconciler`). The stream's
        gap state is left alone."""
        assert self.resyncer is not None and self.client is not None
        subs = self.config.subscriptions
        self.reconciler = Reconciler(self.resyncer, interval=subs.reconcile_interval,
                                     share=subs.reconcile_share, limiter=self.client.limiter,
                                     metrics=self.metrics, clock=self.clock)
        await self.reconciler.run(self._stop)

    def _maybe_reschedule(self) -> None:
        deadline = self.engine.next_deadline()
        if deadline is not None and (self._scheduled_deadline is None or deadline < self._scheduled_deadline):
            self._timer_wake.set()

    async def _timers(self) -> None:
        """hold_for and time-based rules fire here, at their deadline, with no event needed.
        Also evicts ended calls. Wakes at least once a second."""
        while not self._stop.is_set():
            now = self.clock()
            deadline = self.engine.next_deadline()
            wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now))
            self._scheduled_deadline = now + wait
            self._timer_wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), timeout=wait)
            decisions = self.engine.tick(self.clock())
            if decisions:
                self._submit(decisions)
            self.metrics.tracked_calls.set(len(self.engine.store))
            if self.client is not None and self.client.tokens.age is not None:
                self.metrics.token_age_seconds.set(self.client.tokens.age)


#: Seconds a reload may spend reading config.yaml and its list files and compiling the
#: rules (in a worker thread). Generous: a list of a million phone numbers takes seconds
#: to normalise on a busy host; the loader itself never waits on a FIFO or a device.
CONFIG_LOAD_TIMEOUT = 60.0


async def load_off_loop(path: Path, timeout: float = CONFIG_LOAD_TIMEOUT) -> tuple[Config, RuleSet]:
    """`load_config(path)`, `load_lists` and `compile_rules` in a worker thread, so a big
    list never stalls the event loop (health, the stream and removals go on; the rules are
    sans-I/O and build new objects only, so the thread shares nothing with the loop).
    Raises ConfigError when the files are invalid or it all takes more than `timeout`
    seconds (the thread is then left to finish on its own: the loader opens only regular
    files, non-blocking, with a size cap, so it cannot hang on a FIFO or a device)."""
    def work() -> tuple[Config, RuleSet]:
        cfg = load_config(path)
        return cfg, compile_rules(cfg, load_lists(cfg))

    try:
        return await asyncio.wait_for(asyncio.to_thread(work), timeout)
    except asyncio.TimeoutError:
        raise ConfigError(f"reading {path} and its list files took more than {timeout:g} s "
                          f"(a file on a stuck network mount?)") from None


#: Seconds a step still gets after a forced exit (`Daemon.force_exit`) cut its wait short.
_FORCED_GRACE = 0.2


def _final_reserve(timeout: float) -> float:
    """Seconds of the shutdown deadline kept for the last steps (audit fsync, closing the
    client and the ops endpoint) after the stream close: a tenth of it, at most 1 s."""
    return min(1.0, timeout / 10)


def _close_reserve(timeout: float) -> float:
    """Seconds of the shutdown deadline kept, after the drain, for closing the stream
    (its unsubscribe request) and the last steps: a third of it, at most 5 s."""
    return min(5.0, timeout / 3)


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Changed settings that a reload does not apply (the client, audit file, ops listener,
    logging and stream timings are built once at start-up), as dotted names."""
    changed = [name for name in ("genesys", "audit", "logging", "ha")
               if getattr(old, name) != getattr(new, name)]
    for name in ("ops", "control"):  # the TLS files are re-read on reload; turning TLS on/off is not
        before, after = getattr(old, name), getattr(new, name)
        if before.model_dump(exclude={"tls"}) != after.model_dump(exclude={"tls"}) or \
                (before.tls is None) != (after.tls is None) or \
                getattr(before.tls, "client_ca_file", None) != getattr(after.tls, "client_ca_file", None):
            changed.append(name)
    for name in type(old.subscriptions).model_fields:
        if name not in ("queues", "users") and \
                getattr(old.subscriptions, name) != getattr(new.subscriptions, name):
            changed.append(f"subscriptions.{name}")
    return changed
