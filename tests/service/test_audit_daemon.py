"""The running daemon and its audit trail (docs/audit.md): signed checkpoints in its JSON
log output that `audit verify --checkpoints` reads back, a torn last line that no longer
stops it, a cut trail that it does not paper over. `python -m daemon run` is a real child
process against the sandbox on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import shutil
from pathlib import Path

from _audit_daemon import remove_one, running, stop_ok
from _daemon_harness import audit_records, run_cli, sample

from daemon.sandbox import Sandbox
from daemon.service.checkpoint import generate_keypair


async def test_checkpoints_reach_the_log_and_verify_reads_them(sandbox: Sandbox, tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    generate_keypair(priv, pub)
    async with running(sandbox, tmp_path, priv) as d:
        await d.wait_ready()
        await d.wait_event("audit_checkpoints_on")
        await remove_one(sandbox, tmp_path)
        first = await d.wait_event("audit_checkpoint", timeout=15)
        assert first["level"] == "info" and first["checkpoint"]["node"]
        await d.wait_metrics(lambda t: (sample(t, "confguard_audit_checkpoints_total", sink="trail",
                                               result="ok") or 0) >= 1)
        await stop_ok(d)
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
        await remove_one(sandbox, tmp_path)
        await stop_ok(d)
    live = tmp_path / "audit" / "audit.jsonl"
    before = audit_records(tmp_path)
    torn = b'{"action":"disconnect","conversation_id":"c-1","matched":{'
    with open(live, "ab") as f:
        f.write(torn)  # a write cut short by a power loss
    async with running(sandbox, tmp_path, None) as d:
        await d.wait_ready()
        quarantined = await d.wait_event("audit_tail_quarantined")
        await remove_one(sandbox, tmp_path)  # enforcement works: the trail continues
        await stop_ok(d)
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
        await remove_one(sandbox, tmp_path)
        await d.wait_event("audit_checkpoint", timeout=15)
        await stop_ok(d)
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
        await stop_ok(d)
    recs = audit_records(tmp_path)
    assert recs[keep]["type"] == "gap" and recs[keep]["seq"] > len(lines)  # no seq reused
    code, out, _ = await run_cli("audit", "verify", str(live.parent), "--public-key", str(pub),
                                 "--checkpoints", str(journal))
    assert code == 1, out
    assert "contradicted: checkpoint seq" in out and str(journal) in out
