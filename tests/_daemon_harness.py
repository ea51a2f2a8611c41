"""Harness for tests that run `confguard run` as a real subprocess against the sandbox.

The sandbox runs in the test's own event loop (the `sandbox` fixture); the daemon is
`python -m daemon run --config FILE` in a child process that reaches it over 127.0.0.1.
The daemon's JSON log lines (stdout, as the README says) and stderr go to files in
tmp_path, so nothing blocks on a full pipe; tests wait on log events, ops endpoints, audit
records or the sandbox's journal, always with a bounded timeout.

The ops endpoint listens on 127.0.0.1:0; its port is read from the `ops_listening` log line,
so parallel test runs never race for a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from _wait import wait_until  # noqa: F401 - re-exported: the one polling helper (tests/_wait.py)
from daemon.sandbox import Sandbox

REPO = Path(__file__).resolve().parent.parent

SALES = "1b6a4d2e-7c3f-4e8a-9b1d-2f3e4a5b6c7d"
SUPPORT = "2c7b5e3f-8d4a-4f9b-8c2e-3a4b5c6d7e8f"

FLAGGED_RULE = """
  - name: flagged-party
    when:
      purpose: {in: [customer, external]}
      attributes.complianceFlag: "true"
    action: disconnect
    severity: critical
"""

BLOCKED_RULE = """
  - name: blocked-number
    when:
      purpose: external
      address: {in_list: blocked_numbers}
    action: disconnect
"""


def write_config(folder: Path, base_url: str, *, rules: str = FLAGGED_RULE,
                 queues: list[str] | None = None, blocked: list[str] | None = None,
                 extra_top: str = "", name: str = "config.yaml", ops: bool = True,
                 max_retries: int = 2) -> Path:
    """A config.yaml for the sandbox at `base_url` (JSON logs, ops on 127.0.0.1:0)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "blocked.txt").write_text("\n".join(blocked or ["+14155550999"]) + "\n")
    qs = ", ".join(queues or [SALES])
    text = f"""schema_version: 1
genesys:
  api_base_url: {base_url}
  login_base_url: {base_url}
  max_retries: {max_retries}
  connect_timeout: 2
  read_timeout: 10
subscriptions:
  queues: [{qs}]
mode: enforce
safety:
  max_disconnects_per_minute: 30
lists:
  blocked_numbers: {{file: blocked.txt}}
rules:
{rules}
audit:
  path: audit/audit.jsonl
  fsync_interval: 0.2
ops:
  listen: 127.0.0.1:0
  enabled: {"true" if ops else "false"}
logging:
  level: info
  format: json
{extra_top}"""
    path = folder / name
    path.write_text(text)
    return path


def credentials_env(sb: Sandbox, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["GENESYSCLOUD_OAUTHCLIENT_ID"] = sb.client_id
    env["GENESYSCLOUD_OAUTHCLIENT_SECRET"] = sb.client_secret
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of `path` (a partly written last line is left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        if line.strip():
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
    return out


class DaemonProcess:
    """`python -m daemon run` as a child process, with bounded waits on what it does."""

    def __init__(self, config: Path, env: dict[str, str], folder: Path,
                 args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.env = env
        self.folder = folder
        self.args = args
        self.stdout_path = folder / "daemon.stdout"
        self.stderr_path = folder / "daemon.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        self.ops_port: int | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> DaemonProcess:
        out = self.stdout_path.open("wb")
        err = self.stderr_path.open("wb")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon", "run", "--config", str(self.config), *self.args,
                stdout=out, stderr=err, env=self.env, cwd=str(REPO))
        finally:
            out.close()
            err.close()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    def logs(self) -> list[dict[str, Any]]:
        return read_jsonl(self.stdout_path) + read_jsonl(self.stderr_path)

    def text(self) -> str:
        parts = []
        for p in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event") == name
                and all(r.get(k) == v for k, v in match.items())]

    def _alive_check(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.text()[-4000:]}")

    async def wait_event(self, name: str, timeout: float = 15.0, count: int = 1,
                         **match: Any) -> dict[str, Any]:
        """The `count`-th log record named `name` matching `match`."""
        def found() -> dict[str, Any] | None:
            hits = self.events(name, **match)
            if len(hits) >= count:
                return hits[count - 1]
            self._alive_check()
            return None
        try:
            result: dict[str, Any] = await wait_until(found, timeout, f"log event {name} {match}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon output ---\n{self.text()[-4000:]}") from None
        return result

    async def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        rec = await self.wait_event("ops_listening", timeout)
        self.ops_port = int(rec["port"])
        return await self.wait_http("/readyz", 200, timeout)

    async def get(self, path: str) -> tuple[int, bytes]:
        assert self._session is not None and self.ops_port is not None
        async with self._session.get(f"http://127.0.0.1:{self.ops_port}{path}") as r:
            return r.status, await r.read()

    async def wait_http(self, path: str, status: int, timeout: float = 15.0) -> dict[str, Any]:
        """Poll an ops endpoint until it answers `status`; its JSON body."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        while loop.time() < deadline:
            self._alive_check()
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                st, body = await self.get(path)
                last = (st, body[:300])
                if st == status:
                    return dict(orjson.loads(body)) if body.startswith(b"{") else {"raw": body}
            await asyncio.sleep(0.05)
        raise AssertionError(f"{path} did not answer {status} within {timeout} s (last {last})\n"
                             f"{self.text()[-3000:]}")

    async def metrics(self) -> str:
        st, body = await self.get("/metrics")
        assert st == 200
        return body.decode()

    async def wait_metrics(self, pred: Callable[[str], Any], timeout: float = 10.0,
                           what: str = "metrics") -> str:
        """Poll /metrics until `pred(text)` is truthy; the text."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        text = ""
        while loop.time() < deadline:
            self._alive_check()
            text = await self.metrics()
            if pred(text):
                return text
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            raise AssertionError(f"daemon did not exit within {timeout} s\n{self.text()[-3000:]}") from None

    async def close(self) -> None:
        """Kill the child if still running (only this child, by its pid) and reap it."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 10)


def sample(metrics: str, name: str, **labels: str) -> float | None:
    """The value of the first sample `name` whose labels include `labels`, or None."""
    for line in metrics.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


async def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                  timeout: float = 60.0) -> tuple[int, str, str]:
    """`python -m daemon ARGS` as a child process: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=str(cwd or REPO))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        proc.kill()
        await proc.wait()
        raise AssertionError(f"confguard {' '.join(args)} did not finish within {timeout} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def audit_records(folder: Path) -> list[dict[str, Any]]:
    return read_jsonl(folder / "audit" / "audit.jsonl")


def sandbox_queue(sb: Sandbox, queue_id: str = SALES, name: str = "Sales") -> str:
    if queue_id not in sb.world.queues:
        sb.world.create_queue(name, queue_id)
    return queue_id


def sandbox_agent(sb: Sandbox, user_id: str, name: str) -> None:
    """The Sales queue (`sandbox_queue`) and a user `user_id` called `name` in `sb`'s world,
    each added unless it is there already."""
    sandbox_queue(sb)
    if user_id not in sb.world.users:
        sb.world.create_user(name, user_id)


@contextlib.asynccontextmanager
async def started(d: DaemonProcess, sb: Sandbox) -> AsyncIterator[DaemonProcess]:
    """`d` started (`DaemonProcess.start`) for the body of the `async with`; after it, even
    on an error, `sb`'s faults are reset and `d` closed."""
    await d.start()
    try:
        yield d
    finally:
        sb.faults.reset()
        await d.close()
