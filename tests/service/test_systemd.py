"""sd_notify over real AF_UNIX datagram sockets, and the unit file checked by systemd-analyze."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.service import systemd

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "confguard.service"


def _recv(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    return sock.recv(4096)


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    # AF_UNIX paths are limited to ~108 bytes; tmp_path can be long, so fall back to /tmp.
    p = tmp_path / "n.sock"
    if len(str(p)) > 100:
        p = Path("/tmp") / f"cg-notify-{uuid.uuid4().hex[:12]}.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(p))
    monkeypatch.setenv("NOTIFY_SOCKET", str(p))
    yield s
    s.close()
    p.unlink(missing_ok=True)


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"confguard-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield s
    s.close()


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False
    assert systemd.watchdog_ping() is False


def test_unreachable_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


def test_ready_one_datagram_path_socket(path_socket: socket.socket) -> None:
    assert systemd.ready("running: 12 topics") is True
    assert _recv(path_socket) == b"READY=1\nSTATUS=running: 12 topics"


def test_ready_abstract_socket(abstract_socket: socket.socket) -> None:
    assert systemd.ready() is True
    assert _recv(abstract_socket) == b"READY=1"


def test_status_newlines_flattened(abstract_socket: socket.socket) -> None:
    assert systemd.status("a\nREADY=1") is True
    assert _recv(abstract_socket) == b"STATUS=a READY=1"


def test_reloading_has_monotonic_usec(path_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = _recv(path_socket).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_stopping_and_watchdog(path_socket: socket.socket) -> None:
    assert systemd.stopping("draining") is True
    assert _recv(path_socket) == b"STOPPING=1\nSTATUS=draining"
    assert systemd.watchdog_ping() is True
    assert _recv(path_socket) == b"WATCHDOG=1"


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert systemd.watchdog_interval() is None


async def test_run_watchdog_pings_and_stops(path_socket: socket.socket,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s -> a ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    path_socket.setblocking(False)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.create_task(systemd.run_watchdog(stop))
    got = []
    for _ in range(3):
        got.append(await asyncio.wait_for(loop.sock_recv(path_socket, 4096), timeout=5))
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert got == [b"WATCHDOG=1"] * 3


async def test_run_watchdog_off_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(systemd.run_watchdog(asyncio.Event()), timeout=5)


async def test_blocked_loop_stops_pings(path_socket: socket.socket) -> None:
    """The pings come from the loop: while the loop is blocked, no datagram arrives."""
    path_socket.setblocking(False)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.create_task(systemd.run_watchdog(stop, interval=0.1))
    assert await asyncio.wait_for(loop.sock_recv(path_socket, 4096), timeout=5) == b"WATCHDOG=1"
    time.sleep(0.3)  # deliberately block the event loop (what a wedged loop looks like)
    # Whatever was sent before blocking was at most one ping (sent before the sleep began)...
    pending = []
    while True:
        try:
            pending.append(path_socket.recv(4096))
        except BlockingIOError:
            break
    assert len(pending) <= 1
    stop.set()
    await asyncio.wait_for(task, timeout=5)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
def test_unit_file_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit. The ExecStart binary does not exist here,
    so we verify a copy whose ExecStart points at an existing executable."""
    text = UNIT.read_text()
    assert "/opt/confguard/.venv/bin/confguard run" in text
    copy = tmp_path / "confguard.service"
    copy.write_text(text.replace("/opt/confguard/.venv/bin/confguard", "/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60)
    # Lines about the host's own units (when not booted with systemd) are not ours.
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "confguard.service" in line]
    assert proc.returncode == 0 or not ours, proc.stdout + proc.stderr
    assert not ours, "\n".join(ours)


def test_shutdown_deadline_is_below_the_units_stop_timeout() -> None:
    """The daemon's own bound (`ops.shutdown_timeout`) must end before systemd's SIGKILL at
    `TimeoutStopSec`, or a slow shutdown could lose the final audit fsync."""
    from daemon.config import OpsSettings

    stop = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith("TimeoutStopSec=")]
    assert stop == ["20"]
    assert OpsSettings().shutdown_timeout == 15.0
    assert OpsSettings().shutdown_timeout < float(stop[0])


def test_extend_timeout_datagram(path_socket: socket.socket) -> None:
    assert systemd.extend_timeout(90)
    assert _recv(path_socket) == b"EXTEND_TIMEOUT_USEC=90000000"


async def _arecv(sock: socket.socket, timeout: float = 5.0) -> bytes | None:
    """The next datagram without blocking the event loop; None when none came in time."""
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return sock.recv(4096)
        except BlockingIOError:
            await asyncio.sleep(0.005)
    return None


async def test_run_progress_status_on_change_and_extend_while_not_ready(
        path_socket: socket.socket) -> None:
    """STATUS= only when the text changes; EXTEND_TIMEOUT_USEC from `extend_after` on, every
    `extend_every`, while not ready; none once ready. A fake monotonic clock, real socket."""
    now = [0.0]
    ready = [False]
    text = ["resync 0/10 calls read, 0/2 conferences"]
    stop = asyncio.Event()
    task = asyncio.create_task(systemd.run_progress(
        stop, lambda: ready[0], lambda: text[0], extend_after=60, extend_every=30,
        extend_by=90, interval=0.01, clock=lambda: now[0]))
    assert await _arecv(path_socket) == b"STATUS=resync 0/10 calls read, 0/2 conferences"
    now[0] = 59.0
    assert await _arecv(path_socket, 0.2) is None  # same text, not 60 s yet
    now[0] = 60.0
    assert await _arecv(path_socket) == b"EXTEND_TIMEOUT_USEC=90000000"
    assert await _arecv(path_socket, 0.2) is None  # the next one is due 30 s later
    now[0] = 75.0
    text[0] = "resync 5/10 calls read, 2/2 conferences"
    assert await _arecv(path_socket) == b"STATUS=resync 5/10 calls read, 2/2 conferences"
    now[0] = 90.0
    assert await _arecv(path_socket) == b"EXTEND_TIMEOUT_USEC=90000000"
    ready[0] = True
    now[0] = 200.0
    assert await _arecv(path_socket, 0.2) is None  # ready: no more extensions
    stop.set()
    await asyncio.wait_for(task, 5)


def test_unit_sets_timeout_start_sec_with_a_comment() -> None:
    lines = UNIT.read_text().splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("TimeoutStartSec="))
    assert lines[i] == "TimeoutStartSec=90" and lines[i - 1].startswith("#")
    assert "EXTEND_TIMEOUT_USEC" in "\n".join(lines[i - 6:i])
