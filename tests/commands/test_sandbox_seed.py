"""`confguard sandbox --seed-from config.yaml`: the shipped config.yaml, with only the lines the
sandbox prints changed (api_base_url, login_base_url; credentials in the environment), passes
`check --online` and runs; a call driven through the documented driver operations is removed.

The one other line changed is `ops.listen` (port 0): tests run in parallel on one machine and
must not contend for the fixed port 9464. Everything over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from _daemon_harness import REPO, DaemonProcess, run_cli

SHIPPED = REPO / "config.yaml"


async def start_sandbox(*args: str) -> tuple[asyncio.subprocess.Process, dict[str, list[str]], list[str]]:
    """`confguard sandbox ARGS` as a child process, read until it has printed everything:
    (process, "key: value" lines by key, the indented lines it prints to use it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "sandbox", "--port", "0", "--heartbeat", "2", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(REPO),
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    keyed: dict[str, list[str]] = {}
    settings: list[str] = []
    for _ in range(100):
        raw = await asyncio.wait_for(proc.stdout.readline(), 20)
        if not raw:
            err = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"sandbox exited: {err.decode()[-2000:]}")
        line = raw.decode().rstrip("\n")
        if line.startswith("  "):
            settings.append(line.strip())
            if line.strip().startswith("GENESYSCLOUD_OAUTHCLIENT_SECRET="):
                return proc, keyed, settings
        else:
            key, _, value = line.partition(":")
            keyed.setdefault(key.strip(), []).append(value.strip())
    raise AssertionError("the sandbox never printed its credentials")


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 15)
    except (TimeoutError, asyncio.TimeoutError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return await proc.wait()


def configured(folder: Path, settings: list[str]) -> tuple[Path, dict[str, str]]:
    """The shipped config.yaml (and its list file) in `folder` with the printed
    `api_base_url:`/`login_base_url:` lines put in place of the commented ones; the env."""
    for name in ("config.yaml", "blocked-numbers.txt"):
        shutil.copy(REPO / name, folder / name)
    text = SHIPPED.read_text(encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONUNBUFFERED"] = "1"
    for s in settings:
        if "=" in s and s.startswith("GENESYSCLOUD_"):
            key, _, value = s.partition("=")
            env[key] = value
        else:
            key = s.split(":", 1)[0]
            old = next(line for line in text.splitlines() if line.strip().startswith(f"# {key}:"))
            text = text.replace(old, f"  {s}", 1)
    text = text.replace("  listen: 127.0.0.1:9464", "  listen: 127.0.0.1:0", 1)
    path = folder / "config.yaml"
    path.write_text(text, encoding="utf-8")
    changed = [(a, b) for a, b in zip(SHIPPED.read_text().splitlines(), text.splitlines()) if a != b]
    assert len(changed) == 3 and len(text.splitlines()) == len(SHIPPED.read_text().splitlines()), changed
    return path, env


async def op(session: aiohttp.ClientSession, base: str, name: str, **body: Any) -> Any:
    async with session.post(f"{base}/sandbox/{name}", json=body) as r:
        answer = await r.json()
        assert r.status == 200, (name, answer)
        return answer["result"]


async def test_shipped_config_runs_against_a_seeded_sandbox(tmp_path: Path) -> None:
    proc, keyed, settings = await start_sandbox("--seed-from", str(SHIPPED))
    daemon: DaemonProcess | None = None
    try:
        seeded = dict(reversed(v.split("  ", 1)) for v in keyed["seeded queue"])
        assert "Customer Service" in seeded  # named in config.yaml
        assert "0d5c7a44-3f2e-4b1a-8c9d-6e7f8a9b0c1d" in seeded.values()  # given by id
        assert any(v.startswith("6f1c2a9e-0b3d-4c8e-9a57-2d1e4b7c8f01") for v in keyed["seeded user"])
        base = keyed["api"][0].removesuffix("/api/v2")
        assert f"api_base_url: {base}" in settings and f"login_base_url: {base}" in settings
        cfg, env = configured(tmp_path, settings)

        code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=env, cwd=tmp_path)
        assert code == 0, out + err
        assert "ok: online check passed" in out

        daemon = await DaemonProcess(cfg, env, tmp_path).start()
        await daemon.wait_ready(30)
        await daemon.wait_event("stream_subscribed")
        alice = next(v.split("  ", 1)[0] for v in keyed["user"] if v.endswith("Alice Agent"))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            call = await op(s, base, "start_call", queueId=seeded["Customer Service"])
            await op(s, base, "connect_agent", conversationId=call["id"], userId=alice)
            ext = await op(s, base, "add_external", conversationId=call["id"], address="tel:+14155550123")
            await op(s, base, "set_attributes", conversationId=call["id"], participantId=ext["id"],
                     attributes={"complianceFlag": "true"})

            async def external_state() -> str:
                async with s.get(f"{base}/sandbox/calls/{call['id']}") as r:
                    body = await r.json()
                return next(p["state"] for p in body["participants"] if p["id"] == ext["id"])

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while (state := await external_state()) != "disconnected":
                assert loop.time() < deadline, f"the external party is still {state}\n{daemon.text()[-3000:]}"
                await asyncio.sleep(0.1)
            async with s.get(f"{base}/sandbox/journal") as r:
                journal = await r.json()
        patches = [x for x in journal["requests"] if x["method"] == "PATCH"
                   and x["path"].endswith(f"/participants/{ext['id']}")]
        assert len(patches) == 1 and patches[0]["status"] in (200, 202, 204)
        decision = await daemon.wait_event("decision", participant_id=ext["id"])
        assert decision["rule"] == "flagged-party"
        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
    finally:
        if daemon is not None:
            await daemon.close()
        assert await stop(proc) == 0


async def test_seed_from_a_broken_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("subscriptions: {queues: [Sales]}\nmodee: observe\n", encoding="utf-8")
    code, out, err = await run_cli("sandbox", "--port", "0", "--seed-from", str(bad), timeout=30)
    assert code == 2 and "--seed-from" in err and "modee" in err
