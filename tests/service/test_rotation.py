"""Credential rotation without a restart: new `genesys.client_id_file`/`client_secret_file`
contents plus SIGHUP -> a token of the new client at once, the stream moved to a channel of
the new client make-before-break (no gap), every later request made with the new client, and
no removal missed meanwhile. A confguard daemon subprocess against the sandbox, over real
sockets; the old client's tokens are revoked afterwards to prove nothing still uses them."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from _daemon_harness import SALES, DaemonProcess, credentials_env, sandbox_queue, wait_until, write_config
from daemon.sandbox import Sandbox


def _write_files(folder: Path, client_id: str, secret: str) -> None:
    (folder / "client_id").write_text(client_id + "\n")
    (folder / "client_secret").write_text(secret + "\n")


def _with_credential_files(cfg: Path, folder: Path, client_id: str, secret: str) -> None:
    _write_files(folder, client_id, secret)
    text = cfg.read_text()
    cfg.write_text(text.replace("genesys:\n", "genesys:\n  client_id_file: client_id\n"
                                              "  client_secret_file: client_secret\n", 1))


def _flagged_call(sb: Sandbox) -> tuple[str, str]:
    w = sb.world
    conv = w.start_call(SALES)
    ext = w.add_external(conv.id)
    w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
    return conv.id, ext.id


async def test_rotated_credentials_are_used_after_reload_with_no_gap(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox_queue(sandbox)
    old = sandbox.world.clients[sandbox.client_id]
    new = sandbox.world.add_client()
    cfg = write_config(tmp_path, sandbox.base_url, queues=[SALES])
    _with_credential_files(cfg, tmp_path, old.id, old.secret)
    env = credentials_env(sandbox)
    for key in ("GENESYSCLOUD_OAUTHCLIENT_ID", "GENESYSCLOUD_OAUTHCLIENT_SECRET"):
        env.pop(key)  # the files are the only source
    daemon = await DaemonProcess(cfg, env, tmp_path).start()
    try:
        await daemon.wait_ready(30)
        gaps_before = len(daemon.events("stream_gap"))
        calls: list[tuple[str, str]] = []
        stop = asyncio.Event()

        async def keep_calling() -> None:  # flagged calls all through the rotation, bounded
            for _ in range(60):
                calls.append(_flagged_call(sandbox))
                try:
                    await asyncio.wait_for(stop.wait(), 0.2)
                    return
                except (TimeoutError, asyncio.TimeoutError):
                    pass

        driver = asyncio.create_task(keep_calling())
        await asyncio.sleep(0.5)
        _write_files(tmp_path, new.id, new.secret)  # config.yaml itself unchanged
        daemon.send(signal.SIGHUP)
        rotated = await daemon.wait_event("credentials_rotated")
        assert rotated["client_changed"] is True and rotated["client_id"] == new.id
        assert new.secret not in daemon.text() and old.secret not in daemon.text()
        await daemon.wait_event("stream_handover_done", reason="credentials_rotated")
        await daemon.wait_event("reloaded")
        await asyncio.sleep(0.5)
        stop.set()
        await driver
        # The old client is revoked: everything must already run on the new one.
        sandbox.world.revoke_tokens(old.id)
        last = _flagged_call(sandbox)
        calls.append(last)

        def removed() -> bool:
            return all(sandbox.world.get_call(c).party(p).state == "disconnected" for c, p in calls)

        await wait_until(removed, 20, "every flagged party removed")
        patches = [r for r in sandbox.journal.requests if r.method == "PATCH" and "/participants/" in r.path]
        assert sorted(r.path.rsplit("/", 1)[1] for r in patches) == sorted(p for _, p in calls)  # once each
        assert all(r.status in (200, 202, 204) for r in patches)
        assert [r.client_id for r in patches if r.path.endswith(last[1])] == [new.id]
        channels = [r for r in sandbox.journal.requests
                    if r.method == "POST" and r.path == "/api/v2/notifications/channels"]
        assert [r.client_id for r in channels][-1] == new.id
        assert len(daemon.events("stream_gap")) == gaps_before  # make-before-break: no gap
        assert (await daemon.wait_http("/readyz", 200))["status"] == "ready"
    finally:
        daemon.send(signal.SIGTERM)
        await daemon.wait_exit()
        await daemon.close()


async def test_refused_new_secret_keeps_the_old_client(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox_queue(sandbox)
    old = sandbox.world.clients[sandbox.client_id]
    cfg = write_config(tmp_path, sandbox.base_url, queues=[SALES])
    _with_credential_files(cfg, tmp_path, old.id, old.secret)
    daemon = await DaemonProcess(cfg, credentials_env(sandbox), tmp_path).start()
    try:
        await daemon.wait_ready(30)
        (tmp_path / "client_secret").write_text("not-the-secret-at-all\n")
        daemon.send(signal.SIGHUP)
        rejected = await daemon.wait_event("reload_rejected")
        assert "not-the-secret-at-all" not in daemon.text()
        assert rejected["error_type"] == "AuthError"
        conv, ext = _flagged_call(sandbox)
        await wait_until(lambda: sandbox.world.get_call(conv).party(ext).state == "disconnected", 15,
                         "the removal, with the old client")
    finally:
        daemon.send(signal.SIGTERM)
        await daemon.wait_exit()
        await daemon.close()
