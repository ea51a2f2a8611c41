"""Where the daemon is in its life: `State` and `Status`, the one holder of the current state
and of the open gap (if any). Built first by the composition root; the lifecycle
(`daemon.service.lifecycle.Daemon`) and the gap watch (`daemon.service.loops.GapWatch`) move
it; `/healthz`, `/readyz` and the control API read it.

Each transition is logged (`daemon_state`), exported as `confguard_daemon_state` and sent to
systemd as the STATUS line.
"""

from __future__ import annotations

import enum
from typing import Any

import structlog

from daemon.service import systemd
from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)


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


class Status:
    """The daemon's state and its open gap. `gap_reason`: why events may have been missed
    (None when no gap is open; `startup` until the start-up resync completed)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.state = State.STARTING
        self.gap_reason: str | None = "startup"
        metrics.daemon_state.state(self.state.value)

    def set(self, new: State, **why: Any) -> None:
        """Move to `new` (nothing when already there): log, metric, systemd STATUS."""
        if new is self.state:
            return
        log.info("daemon_state", old=self.state.value, new=new.value, **why)
        self.state = new
        self._metrics.daemon_state.state(new.value)
        systemd.status(f"{new.value}" + (f": {why.get('reason')}" if why.get("reason") else ""))

    def stopped_quietly(self) -> None:
        """STOPPED without the `daemon_state` line (a forced exit ends the log with its own)."""
        self.state = State.STOPPED
        self._metrics.daemon_state.state(State.STOPPED.value)

    def open_gap(self, reason: str) -> None:
        """Events may have been missed: not ready, and DEGRADED when RUNNING."""
        self.gap_reason = reason
        if self.state is State.RUNNING:
            self.set(State.DEGRADED, reason=reason)

    def close_gap(self) -> None:
        """A resync covering the gap completed: RUNNING again when DEGRADED (the start-up
        resync: no transition, the daemon is RESYNCING)."""
        self.gap_reason = None
        if self.state is State.DEGRADED:
            self.set(State.RUNNING, reason="resynced")

    def settled(self) -> State:
        """The state after a reload or start-up step: DEGRADED while a gap is open, else RUNNING."""
        return State.DEGRADED if self.gap_reason else State.RUNNING
