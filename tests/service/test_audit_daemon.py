"""The running daemon and its audit trail (docs/audit.md): signed checkpoints in its JSON
log output that `audit verify --checkpoints` reads back, a torn last line that no longer
stops it, a cut trail that it does not paper over. `python -m daemon run` is a real child
process against the sandbox on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from _daemon_harness import (SALES, DaemonProcess, audit_records, credentials_env, run_cli, sample, sandbox_queue,
                             wait_until, write_config)

from _moto import MotoServer, moto_server, unique_name  # noqa: F401

from daemon.sandbox import Sandbox
from daemon.service.checkpoint import generate_keypair

AGENT = "a11ce000-0000-4000-8000-00000000000a"


@contextlib.asynccontextmanager
async def running(sb: Sandbox, folder: Path, key: Path | None, s3: str = "") -> AsyncIterator[DaemonProcess]:
    """The daemon with a signing key (checkpoints every 1 s) when `key` is given; `s3`: more
    `audit:` YAML lines (indented two spaces)."""
    sandbox_queue(sb)
    if AGENT not in sb.world.users:
        sb.world.create_user("Alice Agent", AGENT)
    extra = s3
    if key is not None:
        extra += f"  signing_key_file: {key}\n  checkpoint_interval: 1s\n"
    config = write_config(folder, sb.base_url)
    config.write_text(config.read_text().replace("  fsync_interval: 0.2\n", "  fsync_interval: 0.2\n" + extra, 1))
    d = DaemonProcess(config, credentials_env(sb), folder)
    await d.start()
    try:
        yield d
    finally:
        sb.faults.reset()
        await d.close()


async def _remove_one(sb: Sandbox, folder: Path) -> None:
    w = sb.world
    conv = w.start_call(SALES)
    w.connect_agent(conv.id, AGENT)
    ext = w.add_external(conv.id, "tel:+14155550123", name="Partner")
    w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
    await wait_until(lambda: [r for r in audit_records(folder) if r.get("type") == "outcome"
                              and r.get("conversation_id") == conv.id
                              and r.get("outcome") == "disconnected"], 15, "a removal's outcome record")


async def _stop(d: DaemonProcess) -> None:
    d.send(signal.SIGTERM)
    assert await d.wait_exit(20) == 0, d.text()[-3000:]


async def test_checkpoints_reach_the_log_and_verify_reads_them(sandbox: Sandbox, tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    generate_keypair(priv, pub)
    async with running(sandbox, tmp_path, priv) as d:
        await d.wait_ready()
        await d.wait_event("audit_checkpoints_on")
        await _remove_one(sandbox, tmp_path)
        first = await d.wait_event("audit_checkpoint", timeout=15)
        assert first["level"] == "info" and first["checkpoint"]["node"]
        await d.wait_metrics(lambda t: (sample(t, "confguard_audit_checkpoints_total", sink="trail",
                                               result="ok") or 0) >= 1)
        await _stop(d)
    journal = tmp_path / "journal.log"
    shutil.copy(d.stdout_path, journal)
    trail = tmp_path / "audit"
    code, out, err = await run_cli("audit", "verify", str(trail), "--public-key", str(pub),
                                   "--checkpoints", str(journal))
    assert code == 0, out + err
    recs = audit_records(tmp_path)
    assert recs[-1]["type"] == "checkpoint"  # the shutdown checkpoint closes the trail
    assert f"up to seq {recs[-1]['seq']}" in out
    # Deleting the last record (the shutdown checkpoint's own) is now seen.
    live = trail / "audit.jsonl"
    lines = live.read_bytes().splitlines(keepends=True)
    live.write_bytes(b"".join(lines[:-1]))
    code, out, _ = await run_cli("audit", "verify", str(trail), "--public-key", str(pub),
                                 "--checkpoints", str(journal))
    assert code == 1 and f"checkpoint seq {recs[-1]['seq']}" in out and "deleted" in out


async def test_torn_last_line_is_quarantined_and_the_daemon_starts(sandbox: Sandbox, tmp_path: Path) -> None:
    async with running(sandbox, tmp_path, None) as d:
        await d.wait_ready()
        await _remove_one(sandbox, tmp_path)
        await _stop(d)
    live = tmp_path / "audit" / "audit.jsonl"
    before = audit_records(tmp_path)
    torn = b'{"action":"disconnect","conversation_id":"c-1","matched":{'
    with open(live, "ab") as f:
        f.write(torn)  # a write cut short by a power loss
    async with running(sandbox, tmp_path, None) as d:
        await d.wait_ready()
        quarantined = await d.wait_event("audit_tail_quarantined")
        await _remove_one(sandbox, tmp_path)  # enforcement works: the trail continues
        await _stop(d)
    recs = audit_records(tmp_path)
    truncated = recs[len(before)]
    assert truncated["type"] == "truncated" and truncated["seq"] == before[-1]["seq"] + 1
    assert truncated["bytes"] == len(torn) and quarantined["quarantine"] == truncated["quarantine"]
    assert (live.parent / truncated["quarantine"]).read_bytes() == torn
    code, out, _ = await run_cli("audit", "verify", str(live.parent))
    assert code == 3, out
    assert f"{len(torn)} byte(s) of a torn record" in out


async def test_trail_cut_and_daemon_restarted_is_reported(sandbox: Sandbox, tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    generate_keypair(priv, pub)
    async with running(sandbox, tmp_path, priv) as d:
        await d.wait_ready()
        await _remove_one(sandbox, tmp_path)
        await d.wait_event("audit_checkpoint", timeout=15)
        await _stop(d)
    journal = tmp_path / "journal.log"
    shutil.copy(d.stdout_path, journal)
    live = tmp_path / "audit" / "audit.jsonl"
    lines = live.read_bytes().splitlines(keepends=True)
    keep = 2  # the first decision and its outcome; the checkpoint after them is cut
    assert len(lines) > keep
    live.write_bytes(b"".join(lines[:keep]))
    async with running(sandbox, tmp_path, priv) as d:
        await d.wait_ready()
        cut = await d.wait_event("audit_trail_cut")
        assert cut["trail_seq"] == keep
        await _stop(d)
    recs = audit_records(tmp_path)
    assert recs[keep]["type"] == "gap" and recs[keep]["seq"] > len(lines)  # no seq reused
    code, out, _ = await run_cli("audit", "verify", str(live.parent), "--public-key", str(pub),
                                 "--checkpoints", str(journal))
    assert code == 1, out
    assert "contradicted: checkpoint seq" in out and str(journal) in out


async def test_daemon_stores_checkpoints_in_s3_object_lock(sandbox: Sandbox, tmp_path: Path,
                                                          moto_server: MotoServer) -> None:  # noqa: F811
    s3 = moto_server.boto3("s3")
    bucket = unique_name("audit")
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True,
                     CreateBucketConfiguration={"LocationConstraint": moto_server.region})
    s3.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}}})
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    generate_keypair(priv, pub)
    sink = (f"  checkpoint_s3:\n    bucket: {bucket}\n    prefix: site-1\n"
            f"    region: {moto_server.region}\n    endpoint_url: {moto_server.endpoint_url}\n")
    async with running(sandbox, tmp_path, priv, sink) as d:
        await d.wait_ready()
        await d.wait_event("audit_checkpoints_on", sinks=["s3"])
        await _remove_one(sandbox, tmp_path)
        await d.wait_metrics(lambda t: (sample(t, "confguard_audit_checkpoints_total", sink="s3",
                                               result="ok") or 0) >= 1, timeout=15)
        await _stop(d)
    assert not d.events("audit_checkpoint_sink_failed") and not d.events("audit_checkpoint_s3_unlocked")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys and all(k.startswith("site-1/") for k in keys)
    trail = tmp_path / "audit"
    # verify finds the endpoint through the standard AWS chain as well as --s3-endpoint-url
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    code, out, err = await run_cli("audit", "verify", str(trail), "--public-key", str(pub),
                                   "--checkpoints", f"s3://{bucket}/site-1", env=env)
    assert code == 0, out + err
    assert f"{len(keys)} read from 1 outside source(s)" in out
