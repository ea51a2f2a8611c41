"""The sd_notify protocol, implemented directly (no libsystemd, no dependency).

systemd passes `$NOTIFY_SOCKET` (a filesystem path, or an abstract socket name starting with
`@`) to `Type=notify` services; the service sends newline-separated `KEY=VALUE` assignments
as ONE datagram per state change. Outside systemd every function here is a harmless no-op
that returns False, so the daemon runs the same way from a terminal.

Watchdog: with `WatchdogSec=` systemd sets `$WATCHDOG_USEC` (and `$WATCHDOG_PID`); the
service must send `WATCHDOG=1` more often than that or it is killed and restarted.
`run_watchdog` pings from the event loop on purpose: a wedged loop stops the pings, which
is exactly the failure the watchdog exists to catch.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

__all__ = [
    "notify",
    "ready",
    "status",
    "reloading",
    "stopping",
    "watchdog_ping",
    "watchdog_interval",
    "run_watchdog",
    "extend_timeout",
    "run_progress",
]


def _address(raw: str) -> str | bytes | None:
    """The socket address for a `$NOTIFY_SOCKET` value; None when unusable.

    `@name` is an abstract socket: the kernel name is a NUL byte followed by `name`.
    """
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # systemd also allows vsock:CID:PORT for VMs; we do not run in a VM sandbox like that.
    return None


def notify(*lines: str) -> bool:
    """Send `lines` (each `KEY=VALUE`) as one datagram to `$NOTIFY_SOCKET`.

    Returns True when the datagram was sent, False when not under systemd (no
    `$NOTIFY_SOCKET`) or when sending failed (logged at warning; never raises, because a
    missing supervisor must not take the daemon down).
    """
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw or not lines:
        return False
    addr = _address(raw)
    if addr is None:
        log.warning("sd_notify_unsupported_socket", notify_socket=raw)
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(payload)
    except OSError as exc:
        log.warning("sd_notify_failed", notify_socket=raw, error=str(exc))
        return False
    return True


def _status_line(text: str) -> str:
    # STATUS= is one line; a newline would start a bogus assignment.
    return "STATUS=" + " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """Startup finished: `READY=1` (plus `STATUS=` when given)."""
    lines = ["READY=1"]
    if status_text:
        lines.append(_status_line(status_text))
    return notify(*lines)


def status(text: str) -> bool:
    """Free-form status shown by `systemctl status`."""
    return notify(_status_line(text))


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd expects in `MONOTONIC_USEC=`."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading(status_text: str | None = None) -> bool:
    """A reload began: `RELOADING=1` and `MONOTONIC_USEC=` (required by `Type=notify-reload`,
    systemd >= 253; harmless with `Type=notify`). Send `ready()` when the reload is done."""
    lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
    if status_text:
        lines.append(_status_line(status_text))
    return notify(*lines)


def stopping(status_text: str | None = None) -> bool:
    """Shutdown began: `STOPPING=1`."""
    lines = ["STOPPING=1"]
    if status_text:
        lines.append(_status_line(status_text))
    return notify(*lines)


def watchdog_ping() -> bool:
    """`WATCHDOG=1`: the service is alive."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds from `$WATCHDOG_USEC`, or None when the watchdog is
    off, the value is malformed, or `$WATCHDOG_PID` names another process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        if not pid.isdigit() or int(pid) != os.getpid():
            return None
    if not usec.isdigit() or int(usec) <= 0:
        log.warning("watchdog_usec_malformed", value=usec[:40])
        return None
    return int(usec) / 1_000_000


async def run_watchdog(stop_event: asyncio.Event, *, interval: float | None = None) -> None:
    """Send `WATCHDOG=1` every half watchdog interval until `stop_event` is set.

    `interval` overrides `watchdog_interval()` (tests). Returns at once when the watchdog
    is off. The pings come from this coroutine on the event loop, so a blocked loop stops
    them and systemd restarts the service.
    """
    timeout = watchdog_interval() if interval is None else interval
    if timeout is None or timeout <= 0:
        return
    period = timeout / 2
    while not stop_event.is_set():
        watchdog_ping()
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=period)
        except TimeoutError:
            pass


def extend_timeout(seconds: float) -> bool:
    """`EXTEND_TIMEOUT_USEC=`: the start-up (or shutdown) is still making progress; systemd
    lets it run until at least `seconds` from now, whatever `TimeoutStartSec=` said
    (systemd >= 236)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


async def run_progress(stop_event: asyncio.Event, ready: Callable[[], bool],
                       progress: Callable[[], str | None], *, extend_after: float = 60.0,
                       extend_every: float = 30.0, extend_by: float = 90.0,
                       interval: float = 2.0,
                       clock: Callable[[], float] = time.monotonic) -> None:
    """Until `stop_event` is set, every `interval` seconds: send `STATUS=<progress()>` when
    the text changed (None: nothing to say), and, while `ready()` is still False
    `extend_after` seconds after the call, `EXTEND_TIMEOUT_USEC=` of `extend_by` seconds
    every `extend_every` seconds, so a slow start that is making progress is not killed by
    `TimeoutStartSec=` (each extension covers the next `extend_by` s; with the defaults two
    are always pending). Times are seconds; `clock` is monotonic."""
    started = clock()
    last_text: str | None = None
    last_extend: float | None = None
    while not stop_event.is_set():
        now = clock()
        if not ready() and now - started >= extend_after and (
                last_extend is None or now - last_extend >= extend_every):
            extend_timeout(extend_by)
            last_extend = now
        try:
            text = progress()
        except Exception:  # a progress line must never take the loop down
            log.exception("sd_notify_progress_failed")
            text = None
        if text is not None and text != last_text:
            status(text)
            last_text = text
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=interval)
        except TimeoutError:
            pass
