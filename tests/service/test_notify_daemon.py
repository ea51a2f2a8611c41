"""sd_notify from the real daemon: `confguard run` as a child process with `$NOTIFY_SOCKET`
pointing at an AF_UNIX datagram socket the test binds in tmp_path (standing in for systemd).

The datagrams must follow the protocol: STATUS= while starting, READY=1 only after the
subscriptions are in place and the resync is done, WATCHDOG=1 at half the `$WATCHDOG_USEC`
interval, RELOADING=1 with MONOTONIC_USEC= on SIGHUP followed by READY=1, STOPPING=1 on
SIGTERM. `$WATCHDOG_PID` naming another process turns the pings off.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from _daemon_harness import (SALES, DaemonProcess, credentials_env, sandbox_queue, wait_until,
                             write_config)
from daemon.sandbox import Sandbox


@contextlib.asynccontextmanager
async def notified_daemon(sb: Sandbox, folder: Path, **env: str) -> AsyncIterator[tuple[DaemonProcess, "NotifyListener"]]:
    sandbox_queue(sb)
    listener = NotifyListener(folder / "notify.sock")
    d = DaemonProcess(write_config(folder, sb.base_url),
                      credentials_env(sb, NOTIFY_SOCKET=str(listener.path), **env), folder)
    try:
        await d.start()
        yield d, listener
    finally:
        await d.close()
        listener.close()


class NotifyListener:
    """An AF_UNIX SOCK_DGRAM socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        for _ in range(10_000):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            fields: dict[str, str] = {}
            for line in data.decode().split("\n"):
                key, _, value = line.partition("=")
                fields[key] = value
            self.messages.append(fields)
        return self.messages

    def index(self, key: str, value: str | None = None, start: int = 0) -> int | None:
        for i, m in enumerate(self.poll()[start:], start):
            if key in m and (value is None or m[key] == value):
                return i
        return None

    async def wait(self, key: str, value: str | None = None, start: int = 0,
                   timeout: float = 15.0) -> int:
        i: int = await wait_until(lambda: (lambda x: None if x is None else x + 1)(
            self.index(key, value, start)), timeout, f"sd_notify {key}={value or '*'}")
        return i - 1

    def close(self) -> None:
        self.sock.close()


async def test_systemd_notify_protocol(sandbox: Sandbox, tmp_path: Path) -> None:
    # WATCHDOG_PID is left unset: daemon/systemd.py only rejects a PID naming another process
    # (the child's pid cannot be known before it is spawned).
    async with notified_daemon(sandbox, tmp_path, WATCHDOG_USEC="2000000") as (d, listener):
        ready = await listener.wait("READY", "1", timeout=20)
        before = listener.messages[:ready]
        statuses = [m["STATUS"] for m in before if "STATUS" in m]
        assert statuses == ["subscribing", "resyncing", "running"], statuses
        assert listener.messages[ready]["STATUS"].startswith("running: 1 topics")
        # READY came after the resyncing status; the subscription and the resync did happen
        journal_paths = [r.path for r in sandbox.journal.requests]
        assert any(p.endswith("/subscriptions") for p in journal_paths)
        assert "/api/v2/analytics/conversations/details/query" in journal_paths
        await d.wait_ready()

        # WATCHDOG=1 every half interval (1 s): at least two more after READY
        first = await listener.wait("WATCHDOG", "1", start=ready)
        await listener.wait("WATCHDOG", "1", start=first + 1, timeout=10)

        mark = len(listener.poll())
        d.send(signal.SIGHUP)
        reloading = await listener.wait("RELOADING", "1", start=mark)
        usec = listener.messages[reloading]["MONOTONIC_USEC"]
        assert usec.isdigit() and abs(int(usec) - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 60e6
        again = await listener.wait("READY", "1", start=reloading)
        assert "reloaded" in listener.messages[again].get("STATUS", "")

        mark = len(listener.poll())
        d.send(signal.SIGTERM)
        stopping = await listener.wait("STOPPING", "1", start=mark)
        assert await d.wait_exit() == 0
        assert stopping >= mark
        tail = [m["STATUS"] for m in listener.poll()[stopping:] if "STATUS" in m]
        assert tail and tail[-1].startswith("stopped"), tail


async def test_watchdog_pid_of_another_process_means_no_pings(sandbox: Sandbox, tmp_path: Path) -> None:
    async with notified_daemon(sandbox, tmp_path, WATCHDOG_USEC="400000", WATCHDOG_PID="1") as (d, listener):
        ready = await listener.wait("READY", "1", timeout=20)
        await d.wait_ready()
        # bounded absence check: with the watchdog on, 1.5 s would hold about seven pings
        await asyncio.sleep(1.5)
        assert listener.index("WATCHDOG") is None, listener.messages
        assert ready >= 1
        d.send(signal.SIGTERM)
        assert await d.wait_exit() == 0
        assert listener.index("STOPPING", "1") is not None


async def test_abstract_notify_socket(sandbox: Sandbox, tmp_path: Path) -> None:
    """`@name` is a Linux abstract socket (what systemd uses in containers)."""
    name = f"confguard-test-{tmp_path.name}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    sandbox_queue(sandbox)
    d = DaemonProcess(write_config(tmp_path, sandbox.base_url),
                      credentials_env(sandbox, NOTIFY_SOCKET="@" + name), tmp_path)
    got: list[bytes] = []

    def ready() -> bool:
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):
                got.append(sock.recv(65536))
        return any(m.startswith(b"READY=1") for m in got)

    try:
        await d.start()
        await wait_until(ready, 20, "READY=1 on the abstract socket")
        assert f"v2.routing.queues.{SALES}.conversations.calls" in sandbox.world.topic_index
    finally:
        await d.close()
        sock.close()


async def test_sigterm_during_a_reload_never_reports_ready_after_stopping(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox_queue(sandbox, "2c7b5e3f-8d4a-4f9b-8c2e-3a4b5c6d7e8f", "Support")
    async with notified_daemon(sandbox, tmp_path) as (d, listener):
        await listener.wait("READY", "1", timeout=20)
        await d.wait_ready()
        write_config(tmp_path, sandbox.base_url, queues=[SALES, "Support"])
        sandbox.faults.latency = 1.0  # the reload's queue lookup and subscription calls are slow
        d.send(signal.SIGHUP)
        await d.wait_event("daemon_state", new="reloading")
        d.send(signal.SIGTERM)
        assert await d.wait_exit(30) == 0
        sandbox.faults.latency = 0.0
        messages = listener.poll()
        stopping = listener.index("STOPPING", "1")
        assert stopping is not None
        after = messages[stopping:]
        assert not [m for m in after if "READY" in m], after
        states = [r["new"] for r in d.events("daemon_state")]
        assert states[-1] == "stopped" and "running" not in states[states.index("draining"):], states
