"""The daemon's lifecycle: start, the one shutdown deadline, signals and reload. The
objects it starts and stops are built by the composition root (`daemon.service.assembly`);
every input reaches the rules and the enforcer through the event router
(`daemon.service.router`); the background loops are `daemon.service.loops`.

Lifecycle (each transition is logged, exported as `confguard_daemon_state` and shown by
`/healthz`; modelled on uvicorn's `Server`; the state is `daemon.service.status.Status`):

    STARTING -> SUBSCRIBING -> RESYNCING -> RUNNING <-> DEGRADED (a gap: resync under way)
                                              |  ^
                                              v  |
                                           RELOADING
    any -> DRAINING -> STOPPED

- SIGTERM/SIGINT: within one deadline (`ops.shutdown_timeout`, default 15 s, under the
  unit's TimeoutStopSec=20): stop taking decisions, let in-flight disconnects finish, close
  the sources, flush and fsync the audit, exit 0. A second signal cuts the waits short;
  the audit is still fsynced, and the exit code is 1. See `Daemon.stop`.
- SIGHUP: reload config.yaml and lists. An invalid file is rejected with one clear log
  line and the old rules stay in force; changed subscriptions are applied without dropping
  the unchanged ones (a new `Scope`, handed to every source and the resyncer). A SIGHUP
  during a reload is queued: the files are read once more after it.
- SIGUSR1: resume enforcement after the safety valve tripped; every live party that
  matches a disconnect rule and has not been removed is acted on at once
  (`Enforcer.resume_valve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon.config import Config, load_config, load_lists, resolve_credentials
from daemon.core.enforcement import Mode, SafetyValve
from daemon.core.coverage import Coverage
from daemon.core.engine import Engine
from daemon.core.rules import RuleEngine, RuleSet, compile_rules
from daemon.errors import ConfigError, ConfguardError, StreamError, SubscriptionError
from daemon.genesys.api import GenesysClient
from daemon.genesys.reconcile import Reconciler
from daemon.genesys.resync import Resyncer
from daemon.genesys.scope import Scope, resolve_scope
from daemon.genesys.stream import StreamManager
from daemon.service import systemd
from daemon.service.assembly import (SOURCES, Core, Inputs, SourceFactory, Wired, attach,
                                     build_core, connect)
from daemon.service.audit import AuditLog
from daemon.service.control.service import Availability
from daemon.service.enforcer import Enforcer
from daemon.service.ha import within
from daemon.service.listener import build_tls_context, listener_limits, tls_files
from daemon.service.metrics import Metrics
from daemon.service.ops import HealthStatus, OpsServer
from daemon.service.recovery import Unfinished, close_unfinished, unfinished_in_audit
from daemon.service.router import EventRouter
from daemon.service.sources import Source, WebSocketSource
from daemon.service.status import State

if TYPE_CHECKING:
    from daemon.service.checkpoint import Checkpointer
    from daemon.service.control import ControlServer

__all__ = ["Daemon", "State"]

log = structlog.get_logger(__name__)


class Daemon:
    """One confguard process: sources in, decisions out.

    `start()` returns once subscribed and the live calls are listed (READY; the start-up
    reads go on after it, conferences first); `stop()` drains and closes.
    `run()` does both around signal handling and is what `confguard run` calls.
    `sources`: the input factories (default `assembly.SOURCES`).
    """

    def __init__(self, config: Config, *, config_path: str | os.PathLike[str] | None = None,
                 observe: bool = False, record_path: str | os.PathLike[str] | None = None,
                 drain_timeout: float | None = None, clock: Callable[[], float] = time.time,
                 sources: Sequence[SourceFactory] = SOURCES) -> None:
        self.config = config
        self._startup_config = config  # what the client, audit, ops and sources were built from
        self.config_path = Path(config_path) if config_path else None
        self.observe_flag = observe
        self.drain_timeout = drain_timeout
        self.clock = clock
        self._source_factories = tuple(sources)
        self.core: Core = build_core(config, record_path=record_path, clock=clock)
        self.wired: Wired | None = None  # from start(): client, audit, enforcer, router, HA
        self.inputs: Inputs | None = None  # once the scope is resolved: sources, resyncer
        self.scope: Scope | None = None  # the scope in force (a reload replaces it)
        self.ops: OpsServer | None = None
        self.ops_port: int | None = None
        self.control: ControlServer | None = None  # when control.listen is set
        # () -> (role: leader | standby | no-lease, leader node or None); the control API
        # answers 503 unless leader. None: no HA, this daemon always acts.
        self.ha_role: Callable[[], tuple[str, str | None]] | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._signals = 0
        self._force = asyncio.Event()
        self.forced = False  # force_exit() was called: stop() cut short, run() returns 1
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._stop_requested = asyncio.Event()
        self._fatal: BaseException | None = None
        self._ha_stop = asyncio.Event()
        self._ha_task: asyncio.Task[None] | None = None
        self._unfinished: list[Unfinished] = []
        self._ready_sent = False  # READY=1 sent (start-up), for EXTEND_TIMEOUT_USEC
        self.checkpointer: Checkpointer | None = None  # with a signing key (docs/audit.md)

    # ------------------------------------------------------------------ what it is made of

    @property
    def metrics(self) -> Metrics:
        return self.core.metrics

    @property
    def rules(self) -> RuleEngine:
        return self.core.rules

    @property
    def engine(self) -> Engine:
        return self.core.engine

    @property
    def coverage(self) -> Coverage:
        """Which live calls the daemon holds current state for (`/healthz` coverage)."""
        return self.core.coverage

    @property
    def state(self) -> State:
        return self.core.status.state

    @property
    def _gap_reason(self) -> str | None:
        return self.core.status.gap_reason

    @property
    def client(self) -> GenesysClient | None:
        return self.wired.client if self.wired is not None else None

    @property
    def audit(self) -> AuditLog | None:
        return self.wired.audit if self.wired is not None else None

    @property
    def enforcer(self) -> Enforcer | None:
        return self.wired.enforcer if self.wired is not None else None

    @property
    def router(self) -> EventRouter | None:
        return self.wired.router if self.wired is not None else None

    @property
    def sources(self) -> tuple[Source, ...]:
        return self.inputs.sources if self.inputs is not None else ()

    @property
    def stream(self) -> StreamManager | None:
        """The WebSocket source's stream (None before it exists, or without one)."""
        for source in self.sources:
            if isinstance(source, WebSocketSource):
                return source.stream
        return None

    @property
    def resyncer(self) -> Resyncer | None:
        return self.inputs.resyncer if self.inputs is not None else None

    @property
    def reconciler(self) -> Reconciler | None:
        return self.inputs.reconciler if self.inputs is not None else None

    @property
    def mode(self) -> Mode:
        return "observe" if self.observe_flag else self.config.mode

    @property
    def safety(self) -> SafetyValve:
        """The safety valve (owned by the engine's `Enforcement`)."""
        return self.engine.enforcement.valve

    def _set_state(self, new: State, **why: Any) -> None:
        self.core.status.set(new, **why)

    def health(self) -> HealthStatus:
        status = self.core.status
        sources = {s.name: s.health() for s in self.sources}
        enforcer = self.enforcer
        forbidden = enforcer.forbidden if enforcer is not None else ()
        ready = (self.state in (State.RUNNING, State.RELOADING) and bool(sources)
                 and all(h.ready for s, h in zip(self.sources, sources.values()) if s.required)
                 and status.gap_reason is None and not forbidden)
        reason = None if ready else (status.gap_reason or self.state.value)
        details: dict[str, Any] = {
            "mode": self.mode,
            "tracked_calls": len(self.engine.store),
            "safety_valve_tripped": self.safety.tripped,
            "in_flight": enforcer.in_flight if enforcer is not None else 0,
        }
        if forbidden and reason == self.state.value:
            # Degraded: removals are refused (403) until the permission is granted.
            reason = f"degraded: a removal was refused (403): missing permission {', '.join(forbidden)}"
        if forbidden:
            details["missing_permissions"] = list(forbidden)
        if self.client is not None:
            details["budget"] = self.client.limiter.snapshot().as_dict()
        details["coverage"] = self.coverage.snapshot(self.clock()).as_dict()
        ha = self.wired.ha if self.wired is not None else None
        return HealthStatus(state=self.state.value, ready=ready, reason=reason, details=details,
                            ha=ha.node.health() if ha is not None else None,
                            sources={name: h.as_dict() for name, h in sources.items()})

    def _availability(self) -> Availability:
        """For the control API: draining (or stopped) first; then the HA role (`ha_role`)."""
        enforcer = self.enforcer
        if self.state in (State.DRAINING, State.STOPPED) or (enforcer is not None and not enforcer.accepting):
            return Availability(False, "draining", "the daemon is shutting down; send the request "
                                                   "to another instance or retry after it restarts")
        if self.ha_role is not None:
            role, leader = self.ha_role()
            if role != "leader":
                code = "no_lease" if role == "no-lease" else "not_leader"
                where = f"; the leader is {leader}" if leader else "; the leader is not known"
                return Availability(False, code, f"this daemon is {role}: only the leader acts{where}",
                                    leader)
        return Availability(True)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open everything, subscribe, list the live calls; returns when ready (READY=1 sent;
        the start-up reads go on after it)."""
        cfg = self.config
        core = self.core
        log.info("daemon_starting", mode=self.mode, rules=len(cfg.rules), api=cfg.genesys.api_origin)
        # STATUS= progress, and EXTEND_TIMEOUT_USEC while READY is pending after 60 s.
        self._tasks.append(asyncio.create_task(systemd.run_progress(
            self._stop, lambda: self._ready_sent, self._progress_text), name="sd-progress"))
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
        wired = self.wired = connect(core, mode=self.mode)
        self._tasks.append(asyncio.create_task(self._read_budget_limit(), name="budget-limit"))
        wired.audit.open()
        self.checkpointer = wired.checkpointer
        # Before any new record: decisions of an earlier run with no outcome (closed below).
        self._unfinished = unfinished_in_audit(wired.audit.path)
        if wired.ha is not None:
            self._prepare_ha()
        if cfg.control.enabled:
            from daemon.service.control import start_control
            self.control = await start_control(cfg, submit=wired.enforcer.submit, store=self.engine.store,
                                               client=wired.client, metrics=self.metrics,
                                               availability=self._availability, clock=self.clock)
        self._tasks.append(asyncio.create_task(wired.audit.run_syncer(self._stop), name="audit-fsync"))
        if self.checkpointer is not None:
            self._tasks.append(asyncio.create_task(self.checkpointer.run(self._stop), name="audit-checkpoint"))
        self._tasks.append(asyncio.create_task(wired.timers.run(self._stop), name="timers"))
        self._tasks.append(asyncio.create_task(systemd.run_watchdog(self._stop), name="watchdog"))

        if self._unfinished:
            # Before the sources and the start-up resync: what a call shows now must be read
            # before any removal of this run could change it.
            await self._close_unfinished()
        self._set_state(State.SUBSCRIBING)
        scope = self.scope = await resolve_scope(wired.client, cfg.subscriptions)
        inputs = self.inputs = attach(core, wired, scope, factories=self._source_factories)
        for source in inputs.sources:
            await source.start()
            task = asyncio.create_task(source.run(), name=f"source-{source.name}")
            task.add_done_callback(functools.partial(self._source_ended, source.name))
            self._tasks.append(task)

        self._set_state(State.RESYNCING)
        if cfg.subscriptions.resync_on_start:
            await self._start_reads(inputs.resyncer)
        # Enforcing from here: every event judges its call (a call's first event carries the
        # whole conversation), and the start-up reads go on after READY, conferences first.
        core.status.close_gap()
        for source in inputs.sources:
            source.resynced(None)
        self._tasks.append(asyncio.create_task(
            core.gaps.run(self._stop, inputs.resyncer, inputs.sources), name="gap-watch"))
        if inputs.reconciler is not None:
            # Anti-entropy: calls without an event or a read for `reconcile_interval` seconds
            # are re-read, riskiest first, within `reconcile_share` of the budget.
            self._tasks.append(asyncio.create_task(inputs.reconciler.run(self._stop), name="reconcile"))
        self._set_state(State.RUNNING)
        if wired.ha is not None:
            # Only a node that can enforce contends for the lease (docs/ha.md).
            wired.ha.takeover.mark_ready()
            self._start_ha()
        self._ready_sent = True
        cov = self.coverage.snapshot(self.clock())
        systemd.ready(f"running: {len(scope.topics)} topics, mode {self.mode}; {cov.status_line()}")

    async def _start_reads(self, resyncer: Resyncer) -> None:
        """Start the start-up resync and return once analytics listed the live calls (its
        reads go on in the background, `daemon.core.coverage.read_order`); raises what the
        discovery raised when it failed on every attempt."""
        listed = asyncio.Event()
        resyncer.on_listed = lambda report: listed.set()
        reads = resyncer.request("startup")
        waiter: asyncio.Future[Any] = asyncio.ensure_future(listed.wait())
        both: set[asyncio.Future[Any]] = {reads, waiter}
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            resyncer.on_listed = None
        if not listed.is_set():
            reads.result()  # the discovery failed: raise it (start-up fails as before)
        reads.add_done_callback(self._start_reads_done)

    def _start_reads_done(self, reads: asyncio.Future[Any]) -> None:
        if reads.cancelled() or reads.exception() is not None:
            return
        report = reads.result()
        log.info("startup_reads_done", calls=report.calls, updated=report.updated,
                 fresh=report.fresh, conferences=report.conferences, seconds=round(report.seconds, 1))

    def _progress_text(self) -> str | None:
        """The STATUS= progress line while calls are known (None before discovery)."""
        cov = self.coverage.snapshot(self.clock())
        return cov.status_line() if cov.calls_known else None

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
        abandoned = await self._drain(left(_close_reserve(timeout)))
        if self._ha_task is not None:  # after the drain: in-flight removals finish under the lease
            await self._bounded(self._stop_ha(), max(0.2, left(_final_reserve(timeout))), "ha_release")
        self._stop.set()
        for source in self.sources:
            await self._bounded(source.stop(), left(_final_reserve(timeout)), f"{source.name}_close")
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(0.1, left(_final_reserve(timeout))))
        self._tasks.clear()
        if self.resyncer is not None:  # start-up reads (or a gap's) may still be going on
            await self._bounded(self.resyncer.aclose(), max(0.1, left(_final_reserve(timeout))),
                                "resync_close")
        if self.control is not None:  # after the drain: until then POSTs get 503 draining
            await self._bounded(self.control.stop(), max(0.2, left()), "control_close")
        await self._close_outputs(left)
        took = round(loop.time() - started, 3)
        if self.forced:
            # Not a graceful stop, so no `daemon_state ... stopped` line: this one ends the log.
            self.core.status.stopped_quietly()
            log.warning("shutdown_forced_exit", abandoned=abandoned, seconds=took, exit_code=1)
            return
        if took > timeout:
            log.warning("shutdown_deadline_exceeded", timeout=timeout, seconds=took)
        self._set_state(State.STOPPED, abandoned=abandoned, seconds=took)

    async def _drain(self, drain_for: float) -> int:
        """Let in-flight removals finish for at most `drain_for` seconds (and `drain_timeout`
        when given); cancel the rest, each with its outcome record. Returns how many were
        abandoned."""
        enforcer = self.enforcer
        if enforcer is None:
            return 0
        if self.drain_timeout is not None:
            drain_for = min(drain_for, self.drain_timeout)
        drain = asyncio.ensure_future(enforcer.drain(drain_for))
        # At `drain_for` the drain cancels what is still in flight and waits (bounded by
        # the enforcer) for those outcome records; a forced exit cuts that to now.
        if await self._bounded(drain, drain_for + 5.0, "drain", cancel=False):
            return drain.result() if not drain.cancelled() and drain.exception() is None else 0
        drain.cancel()
        abandoned = enforcer.in_flight
        # Cancel the actions themselves: each still writes its outcome record.
        await self._bounded(enforcer.drain(0.0), _FORCED_GRACE, "drain_cancel")
        return abandoned

    async def _close_outputs(self, left: Callable[[], float]) -> None:
        """The last steps of `stop`: fsync and close the audit (always), the `--record`
        file, the client and the ops listener."""
        audit = self.audit
        if self.checkpointer is not None and audit is not None and audit.is_open:  # the last one, then the sinks
            budget = min(3.0, max(0.2, left()))
            await self._bounded(self.checkpointer.close(budget), budget + 0.5, "audit_checkpoint")
        if audit is not None:
            try:
                audit.close()  # fsync: never skipped, whatever the deadline or the signals
                log.info("audit_closed", seq=audit.seq, synced=not audit.needs_sync)
            except Exception as exc:  # noqa: BLE001 - the rest of the shutdown still runs
                log.critical("audit_close_failed", error=str(exc), error_type=type(exc).__name__)
        if self.core.recorder is not None:
            self.core.recorder.close()
        if self.client is not None:
            await self._bounded(self.client.aclose(), max(0.2, left()), "client_close")
        if self.ops is not None:
            await self._bounded(self.ops.stop(), max(0.2, left()), "ops_close")

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
            self.core.wake.poke()

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

    async def _reload_credentials(self, new: Config) -> None:
        """Read the OAuth credentials again (the files `genesys.client_id_file`/
        `client_secret_file` name, the environment, `$CREDENTIALS_DIRECTORY`). Changed ones
        get a token at once (refused ones raise and change nothing); a changed client also
        moves every source's channels to ones created with the new token, make-before-break.
        Never logs a secret."""
        if self.client is None:
            return
        credentials = resolve_credentials(new.genesys, base_dir=new.base_dir)
        tokens = self.client.tokens
        if tokens.uses(credentials):
            return
        old_client = tokens.client_id
        client_changed = await tokens.rotate(credentials)
        log.warning("credentials_rotated", client_changed=client_changed, old_client_id=old_client,
                    client_id=tokens.client_id,
                    detail="new OAuth credentials in use" + (
                        "; moving the stream to channels of the new client" if client_changed else ""))
        if client_changed:
            for source in self.sources:
                rotate = getattr(source, "credentials_rotated", None)
                if callable(rotate):
                    rotate()

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
            await self._reload_credentials(new)
            if self.inputs is not None and self.client is not None:
                scope = await resolve_scope(self.client, new.subscriptions)
                if not scope.topics:  # as at start-up: never drop every subscription silently
                    raise SubscriptionError(
                        "nothing to subscribe: subscriptions.queues and subscriptions.users are "
                        "both empty in the new configuration")
                for source in self.inputs.sources:
                    await source.apply_scope(scope)
                self.inputs.resyncer.set_scope(scope)
                self.scope = scope
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave us stuck in RELOADING
            log.error("reload_rejected", error=str(exc), error_type=type(exc).__name__,
                      detail="the previous configuration stays in force")
            self.metrics.config_reloads.labels(result="rejected").inc()
            # Not `previous`: a gap may have opened or closed while the reload awaited.
            self._set_state(self.core.status.settled())
            systemd.ready(f"{self.state.value}: reload rejected")
            return False
        self.rules.swap(ruleset)
        self.safety.set_limit(new.safety.max_disconnects_per_minute)
        unapplied = _restart_only_changes(self._startup_config, new)
        if unapplied:  # say so, rather than let the operator believe they are live
            log.warning("reload_needs_restart", settings=unapplied,
                        detail="these settings keep their old values until confguard restarts")
        self.config = new
        if self.enforcer is not None:
            self.enforcer.set_mode(self.mode)
            self.enforcer.clear_forbidden()  # granted meanwhile, the operator says; a new 403 says otherwise
        self.metrics.config_reloads.labels(result="ok").inc()
        log.info("reloaded", rules=len(new.rules), mode=self.mode, config=str(self.config_path))
        # New or changed rules judge the live calls now, not at each call's next event.
        decisions = self.rules.reevaluate(self.clock())
        if decisions and self.router is not None:
            self.router.submit(decisions)
        self._set_state(self.core.status.settled())
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

    def _prepare_ha(self) -> None:
        """ha.backend: postgres, before the lease loop: the role for the control API and the
        HA metrics (the send gate stays closed: decisions are audited `standby`)."""
        assert self.wired is not None and self.wired.ha is not None
        ha = self.wired.ha
        self.ha_role = ha.gate.role_and_leader
        ha.node.update_metrics()

    def _start_ha(self) -> None:
        """Contend for the lease (docs/ha.md), once this node can enforce: subscribed, the
        live calls listed. The lease loop runs until `_stop_ha`; until this node holds the
        lease and finished its take-over, the send gate is closed and decisions are
        audited `standby`."""
        assert self.wired is not None and self.wired.ha is not None
        ha, settings = self.wired.ha, self.config.ha
        log.info("ha_starting", node=ha.node.node, lease=settings.lease, takeover_after=settings.takeover_after)
        self._ha_task = asyncio.create_task(
            ha.node.run(self._ha_stop, on_term=ha.takeover.on_term, on_lost=ha.gate.close), name="ha-lease")

    async def _stop_ha(self) -> None:
        """Hand the lease back (so the standby takes over at once) and stop the loop."""
        ha = self.wired.ha if self.wired is not None else None
        if ha is None or self._ha_task is None:
            return
        self._ha_stop.set()
        await asyncio.wait({self._ha_task}, timeout=5.0)
        await ha.takeover.aclose()
        with contextlib.suppress(Exception):
            await within(ha.node.release(), 5.0)
        self._ha_task = None

    async def _close_unfinished(self) -> None:
        """Close this host's decisions of an earlier run that have no outcome record."""
        items, self._unfinished = self._unfinished, []
        assert self.wired is not None
        log.warning("unfinished_decisions_found", count=len(items), audit=str(self.wired.audit.path))
        try:
            await asyncio.wait_for(close_unfinished(items, read_call=self.wired.router.read_call,
                                                    write=self.wired.audit.write, closed_on="startup"),
                                   timeout=30.0)
        except asyncio.TimeoutError:  # a stuck API must not keep the daemon from starting
            log.error("unfinished_decisions_timeout", count=len(items),
                      detail="the rest are closed at the next start")


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
    """Changed settings that a reload does not apply (the client's origins, timeouts and
    budget, the audit file, ops listener, logging and stream timings are built once at
    start-up), as dotted names. The credentials are not among them: a reload reads them again."""
    changed = [name for name in ("audit", "logging", "ha")
               if getattr(old, name) != getattr(new, name)]
    # The credentials (and the files that hold them) are read again on every reload.
    changed += [f"genesys.{name}" for name in type(old.genesys).model_fields
                if name not in ("client_id_file", "client_secret_file")
                and getattr(old.genesys, name) != getattr(new.genesys, name)]
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
