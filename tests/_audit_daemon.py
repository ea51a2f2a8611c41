"""Helpers for the tests that run `confguard run` with an audit trail (test_audit_daemon*.py)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from _daemon_harness import (SALES, DaemonProcess, audit_records, credentials_env, sandbox_agent, started,
                             wait_until, write_config)

from daemon.sandbox import Sandbox

AGENT = "a11ce000-0000-4000-8000-00000000000a"


@contextlib.asynccontextmanager
async def running(sb: Sandbox, folder: Path, key: Path | None, s3: str = "") -> AsyncIterator[DaemonProcess]:
    """The daemon with a signing key (checkpoints every 1 s) when `key` is given; `s3`: more
    `audit:` YAML lines (indented two spaces)."""
    sandbox_agent(sb, AGENT, "Alice Agent")
    extra = s3
    if key is not None:
        extra += f"  signing_key_file: {key}\n  checkpoint_interval: 1s\n"
    config = write_config(folder, sb.base_url)
    config.write_text(config.read_text().replace("  fsync_interval: 0.2\n", "  fsync_interval: 0.2\n" + extra, 1))
    async with started(DaemonProcess(config, credentials_env(sb), folder), sb) as d:
        yield d


async def remove_one(sb: Sandbox, folder: Path) -> None:
    """Start a call whose external party the flagged-party rule removes; wait for its
    `disconnected` outcome record (bounded)."""
    w = sb.world
    conv = w.start_call(SALES)
    w.connect_agent(conv.id, AGENT)
    ext = w.add_external(conv.id, "tel:+14155550123", name="Partner")
    w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
    await wait_until(lambda: [r for r in audit_records(folder) if r.get("type") == "outcome"
                              and r.get("conversation_id") == conv.id
                              and r.get("outcome") == "disconnected"], 15, "a removal's outcome record")


async def stop_ok(d: DaemonProcess) -> None:
    """SIGTERM; the daemon must exit 0 within 20 s."""
    d.send(signal.SIGTERM)
    assert await d.wait_exit(20) == 0, d.text()[-3000:]
