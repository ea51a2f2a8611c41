"""The control API in `confguard run` as a child process: the token from a systemd
credential, a removal through it, and a token problem stopping the start-up with one line."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp

from _daemon_harness import (DaemonProcess, audit_records, credentials_env, run_cli,
                             sandbox_queue, write_config)
from daemon.sandbox import Sandbox

TOKEN = "credential-token-0123456789abcdef0123"

CONTROL = """control:
  listen: 127.0.0.1:0
  callers:
    orchestrator: {}
"""


async def test_token_from_systemd_credential_and_a_removal(sandbox: Sandbox, tmp_path: Path) -> None:
    q = sandbox_queue(sandbox)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "control_token_orchestrator").write_text(TOKEN + "\n")
    cfg = write_config(tmp_path, sandbox.base_url, queues=[q], extra_top=CONTROL)
    d = DaemonProcess(cfg, credentials_env(sandbox, CREDENTIALS_DIRECTORY=str(creds)), tmp_path)
    await d.start()
    try:
        await d.wait_ready()
        port = int((await d.wait_event("control_listening"))["port"])
        w = sandbox.world
        conv = w.start_call(q)
        ext = w.add_external(conv.id, "tel:+14155550321")
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{port}/v1/ejections"
            body = {"conversationId": conv.id, "address": "+14155550321", "reason": "test"}
            async with s.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 202, await r.text()
                eid = (await r.json())["id"]
            await d.wait_event("enforce_outcome", participant_id=ext.id, outcome="disconnected")
            async with s.get(f"http://127.0.0.1:{port}/v1/ejections/{eid}",
                             headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert (await r.json())["state"] == "disconnected"
        assert [p.path.rsplit("/", 1)[1] for p in sandbox.journal.patches(conv.id)] == [ext.id]
        d.send(signal.SIGTERM)
        assert await d.wait_exit() == 0
        recs = [r for r in audit_records(tmp_path) if r.get("participant_id") == ext.id]
        assert recs[0]["origin"] == {"caller": "orchestrator", "reason": "test"}
        assert TOKEN not in d.text()
    finally:
        await d.close()


async def test_missing_token_stops_the_start_up_with_one_line(sandbox: Sandbox, tmp_path: Path) -> None:
    q = sandbox_queue(sandbox)
    cfg = write_config(tmp_path, sandbox.base_url, queues=[q], extra_top=CONTROL)
    code, out, err = await run_cli("run", "--config", str(cfg), env=credentials_env(sandbox),
                                   timeout=60)
    assert code == 2, (out, err)
    assert "control.callers.orchestrator" in out + err and "control_token_orchestrator" in out + err
    assert "Traceback" not in out + err
