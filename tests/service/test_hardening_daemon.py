"""Issue 21 against the real daemon (`python -m daemon run` as a child process, the sandbox
in the test's loop, everything over 127.0.0.1):

- a flood of idle connections to the (unauthenticated) ops port, with the process's file
  descriptors limited to 128: past `ops.max_connections` new connections are refused, the
  stream still reconnects and a flagged party is still removed within a second;
- config and list files an operator (or an attacker with write access to a list) can get
  wrong: a YAML alias bomb, /dev/zero, a FIFO, a huge list and a NUL byte each give a
  `config.yaml:LINE:COL` error within seconds, no traceback, from `check` and `run`; on
  SIGHUP the old config stays, one `reload_rejected` line, and /healthz keeps answering
  while a big list is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from _daemon_harness import (SALES, DaemonProcess, credentials_env, run_cli, sample,
                             sandbox_agent, sandbox_queue, wait_until, write_config)
from daemon.config.loader import MAX_LIST_VALUES
from daemon.sandbox import Sandbox
from daemon.sandbox.world import Conversation, Party

AGENT = "a11ce000-0000-4000-8000-00000000000b"

BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@contextlib.contextmanager
def fd_limit(soft: int) -> Iterator[None]:
    """RLIMIT_NOFILE's soft limit lowered to `soft` for children spawned inside."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


@contextlib.asynccontextmanager
async def running(sb: Sandbox, folder: Path, *, ops_extra: str = "", fd_soft: int | None = None,
                  **cfg: Any) -> AsyncIterator[DaemonProcess]:
    sandbox_agent(sb, AGENT, "Bob Agent")
    config = write_config(folder, sb.base_url, **cfg)
    if ops_extra:
        config.write_text(config.read_text().replace("\nops:\n", f"\nops:\n{ops_extra}", 1))
    d = DaemonProcess(config, credentials_env(sb), folder)
    with fd_limit(fd_soft) if fd_soft else contextlib.nullcontext():
        await d.start()
    try:
        await d.wait_ready()
        yield d
    finally:
        sb.faults.reset()
        await d.close()


def flagged_call(sb: Sandbox) -> tuple[Conversation, Party]:
    w = sb.world
    conv = w.start_call(SALES)
    w.connect_agent(conv.id, AGENT)
    ext = w.add_external(conv.id, "tel:+14155550123", name="Partner")
    w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
    return conv, ext


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]


# ---------------------------------------------------------------- the connection cap


async def test_idle_connection_flood_on_the_ops_port_leaves_the_stream_and_removals_working(
        sandbox: Sandbox, tmp_path: Path) -> None:
    async with running(sandbox, tmp_path, fd_soft=128,
                       ops_extra="  max_connections: 16\n  header_timeout: 30s\n") as d:
        assert d.ops_port is not None
        held: list[asyncio.StreamWriter] = []
        refused = 0
        try:
            for _ in range(150):  # more than the process has file descriptors
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", d.ops_port)
                except OSError:
                    refused += 1
                    continue
                held.append(writer)
            await asyncio.sleep(0.5)  # let the daemon accept (or refuse) them all
            text = await wait_until(lambda: d.text().count("over_capacity"), 10, "a refusal line")
            assert text

            # The stream reconnects (new sockets, new file descriptors) despite the flood ...
            conns_before = set(sandbox.conns.values())
            sandbox.drop_sockets()
            await wait_until(lambda: sandbox.conns and not set(sandbox.conns.values()) & conns_before,
                             15, "the stream to reconnect")
            # ... and a flagged party is removed within a second.
            conv, ext = flagged_call(sandbox)
            started = time.monotonic()
            await wait_until(lambda: conv.party(ext.id).state == "disconnected", 10,
                             "the flagged party to be removed")
            assert time.monotonic() - started < 1.0
        finally:
            for w in held:
                w.close()
        # The refusals are counted, and logged a bounded number of times.
        metrics = await wait_until_metrics(d)
        assert (sample(metrics, "confguard_listener_rejections_total", listener="ops",
                       reason="over_capacity") or 0) >= 100
        lines = d.events("listener_rejected", reason="over_capacity")
        assert 1 <= len(lines) <= 3, lines
        assert not d.events("loop_error") or len(d.events("loop_error")) <= 3
        assert "Too many open files" not in d.text() or len(d.events("loop_error")) <= 3
        _no_traceback(d.text())


async def wait_until_metrics(d: DaemonProcess) -> str:
    """/metrics once the held connections are gone (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            return await d.metrics()
        if loop.time() > deadline:
            raise AssertionError("no /metrics answer")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- config and lists


def _config_with_list(folder: Path, base_url: str, list_file: str) -> Path:
    config = write_config(folder, base_url)
    config.write_text(config.read_text().replace("blocked_numbers: {file: blocked.txt}",
                                                 f"blocked_numbers: {{file: {list_file}}}"))
    return config


@pytest.fixture
def bad_inputs(tmp_path: Path, sandbox: Sandbox) -> dict[str, tuple[Path, str]]:
    """name -> (config file, a phrase its error must contain)."""
    out: dict[str, tuple[Path, str]] = {}
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    (bomb / "config.yaml").write_text(BOMB)
    out["alias bomb"] = (bomb / "config.yaml", "aliases")
    zero = tmp_path / "zero"
    out["/dev/zero"] = (_config_with_list(zero, sandbox.base_url, "/dev/zero"), "a device")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "list.fifo")
    out["FIFO"] = (_config_with_list(fifo, sandbox.base_url, "list.fifo"), "a FIFO")
    huge = tmp_path / "huge"
    huge.mkdir()
    with (huge / "huge.txt").open("w") as fh:
        for i in range(MAX_LIST_VALUES + 10):
            fh.write(f"+1{i:010d}\n")
    out["huge list"] = (_config_with_list(huge, sandbox.base_url, "huge.txt"), "more than")
    nul = tmp_path / "nul"
    config = write_config(nul, sandbox.base_url)
    config.write_text(config.read_text().replace("path: audit/audit.jsonl", 'path: "audit/a\\0b.jsonl"'))
    out["NUL byte"] = (config, "NUL")
    return out


async def test_bad_config_and_list_files_give_a_located_error_quickly(
        bad_inputs: dict[str, tuple[Path, str]], sandbox: Sandbox) -> None:
    env = credentials_env(sandbox)
    for name, (config, phrase) in bad_inputs.items():
        started = time.monotonic()
        code, out, err = await run_cli("check", "--config", str(config), env=env, timeout=30)
        took = time.monotonic() - started
        assert code == 2, (name, out, err)
        assert phrase in out + err, (name, out, err)
        assert f"{config}:" in out + err, (name, out, err)  # FILE:LINE:COL
        _no_traceback(out + err)
        assert took < 15, (name, took)
    # `run` refuses the NUL byte the same way (it used to crash with a traceback).
    config, _ = bad_inputs["NUL byte"]
    code, out, err = await run_cli("run", "--config", str(config), env=env, timeout=30)
    assert code == 2, (out, err)
    assert "NUL" in out + err
    _no_traceback(out + err)


async def test_a_failed_reload_keeps_the_config_and_health_answers_during_a_big_list(
        sandbox: Sandbox, tmp_path: Path) -> None:
    async with running(sandbox, tmp_path) as d:
        config = d.config
        good = config.read_text()
        # A big list: read, normalised and compiled in a worker thread while /healthz keeps
        # answering. 1,000,000 values (MAX_LIST_VALUES, the most a list may hold): at
        # 300,000 the reload had become fast enough that only 3-4 answers fitted in it on a
        # quiet 2-core machine (5 are asserted); at 1,000,000, 7 (about 1 s of reload).
        with (tmp_path / "big.txt").open("w") as fh:
            for i in range(1_000_000):
                fh.write(f"+1{i:010d}\n")
        config.write_text(good.replace("{file: blocked.txt}", "{file: big.txt}"))
        d.send(signal.SIGHUP)
        slowest = 0.0
        answers = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not d.events("reloaded") and loop.time() < deadline:
            started = loop.time()
            status, _ = await asyncio.wait_for(d.get("/healthz"), 10)
            assert status == 200
            slowest = max(slowest, loop.time() - started)
            answers += 1
            await asyncio.sleep(0.02)
        assert d.events("reloaded"), d.text()[-2000:]
        assert answers >= 5  # the reload took a while, and health answered all along
        assert slowest < 2.0, slowest  # (it stalled the loop 5 s before; a 2-core box is busy)

        # Each bad file: one reload_rejected line, the daemon keeps running the old config.
        os.mkfifo(tmp_path / "list.fifo")
        bad = [BOMB, good.replace("{file: blocked.txt}", "{file: list.fifo}"),
               good.replace("{file: blocked.txt}", "{file: /dev/zero}"),
               good.replace("path: audit/audit.jsonl", 'path: "audit/a\\0b.jsonl"')]
        for n, text in enumerate(bad, 1):
            config.write_text(text)
            d.send(signal.SIGHUP)
            await d.wait_event("reload_rejected", 15, count=n)
            assert (await d.get("/healthz"))[0] == 200
        assert len(d.events("reload_rejected")) == len(bad)
        _no_traceback(d.text())
        # Still enforcing with the last good config.
        config.write_text(good)
        conv, ext = flagged_call(sandbox)
        await wait_until(lambda: conv.party(ext.id).state == "disconnected", 10, "a removal")


async def test_ops_over_tls_from_config_and_a_renewed_certificate_on_sighup(
        sandbox: Sandbox, tmp_path: Path) -> None:
    import ssl
    import shutil

    import httpx

    from _tls import TestCA

    ca1, ca2 = TestCA(tmp_path, "ca1"), TestCA(tmp_path, "ca2")
    cert, key = ca1.issue("ops", ip="127.0.0.1")
    shutil.copy(cert, tmp_path / "ops.crt")
    shutil.copy(key, tmp_path / "ops.key")
    sandbox_queue(sandbox)
    config = write_config(tmp_path, sandbox.base_url)
    config.write_text(config.read_text().replace(
        "\nops:\n", "\nops:\n  tls: {cert_file: ops.crt, key_file: ops.key}\n", 1))
    d = DaemonProcess(config, credentials_env(sandbox), tmp_path)
    await d.start()
    try:
        port = int((await d.wait_event("ops_listening", 20))["port"])
        url = f"https://127.0.0.1:{port}/healthz"

        async def healthz(ca: TestCA) -> int:
            ctx = ssl.create_default_context(cafile=str(ca.cert_file))
            async with httpx.AsyncClient(verify=ctx, timeout=5) as client:
                return (await client.get(url)).status_code

        assert await healthz(ca1) == 200
        cert, key = ca2.issue("ops", ip="127.0.0.1")  # renewed in place, same paths
        shutil.copy(cert, tmp_path / "ops.crt")
        shutil.copy(key, tmp_path / "ops.key")
        await wait_until(lambda: d.events("daemon_state", new="running"), 20, "running")
        d.send(signal.SIGHUP)
        await d.wait_event("listener_tls_reloaded", 20)
        assert await healthz(ca2) == 200
        with pytest.raises(httpx.ConnectError):
            await healthz(ca1)
        _no_traceback(d.text())
    finally:
        await d.close()
