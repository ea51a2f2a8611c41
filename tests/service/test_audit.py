"""Audit trail: hash chain, rotation, resume, fsync, verify and the `audit verify` command."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.service.audit import (
    OUTCOMES,
    INLINE_SYNC_MAX,
    ZERO_HASH,
    AuditLog,
    decision_record,
    outcome_record,
    verify,
)
from daemon.commands.audit import register
from daemon.errors import AuditError
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Decision

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, t: float = 1_763_780_000.123) -> None:
        self.t = t

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def _decision(**kw: Any) -> Decision:
    base: dict[str, Any] = dict(
        rule=RuleName("no-external-recording"), action="disconnect",
        conversation_id=ConversationId("c1"), participant_id=ParticipantId("p1"),
        purpose="external", matched={"purpose": "external", "address": "+442071234567"},
        severity="critical", tags=("pci",), message="external party on a secure call",
        decided_at=1_763_780_000.5, received_at=1_763_780_000.25)
    base.update(kw)
    return Decision(**base)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _write_n(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.write({"type": "test", "i": i, "pad": "x" * 50})


def test_chain_fields_and_format(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "audit.jsonl"
    log = AuditLog(path, max_bytes=1 << 20, clock=Clock())
    log.open()
    r1 = log.write({"type": "decision", "b": 2, "a": (1, 2), "seq": 999, "hash": "forged"})
    r2 = log.write({"type": "outcome"})
    log.close()
    raw = path.read_bytes().splitlines(keepends=True)
    assert len(raw) == 2
    assert raw[0] == orjson.dumps(r1, option=orjson.OPT_SORT_KEYS) + b"\n"  # sorted, compact
    assert r1["seq"] == 1 and r2["seq"] == 2  # caller cannot forge seq/hash
    assert r1["a"] == [1, 2]
    assert r1["prev_hash"] == ZERO_HASH
    assert r2["prev_hash"] == r1["hash"]
    body = {k: v for k, v in r1.items() if k != "hash"}
    assert r1["hash"] == hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert r1["time"].endswith("Z") and len(r1["time"]) == len("2025-11-22T02:53:20.124Z")
    assert stat.S_IMODE(path.stat().st_mode) & 0o137 == 0  # at most 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o027 == 0  # at most 0o750


def test_write_reaches_os_before_return(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1 << 20)
    log.open()
    rec = log.write({"type": "decision"})
    # Another reader sees the whole line without any flush/close.
    assert _lines(path) == [rec]
    log.close()


def test_write_when_closed_raises(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", max_bytes=1 << 20)
    with pytest.raises(AuditError, match="not open"):
        log.write({"type": "x"})


def test_rotation_chain_continues_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    types: list[str] = []
    log = AuditLog(path, max_bytes=4096, clock=Clock(), on_record=types.append)
    log.open()
    _write_n(log, 200)
    log.close()
    rotated = sorted(p for p in tmp_path.iterdir() if p != path)
    assert len(rotated) >= 3 and log.rotations == len(rotated)
    for p in [*rotated, path]:
        assert p.stat().st_size <= 4096
        assert p.name.startswith("audit.") and p.name.endswith(".jsonl")
    # First record of each file links to the last one of the previous file.
    files = [*rotated, path]
    for prev, nxt in zip(files, files[1:]):
        assert _lines(nxt)[0]["prev_hash"] == _lines(prev)[-1]["hash"]
        assert _lines(nxt)[0]["seq"] == _lines(prev)[-1]["seq"] + 1
    seqs = [r["seq"] for p in files for r in _lines(p)]
    assert seqs == list(range(1, 201))
    assert types == ["test"] * 200
    report = verify([tmp_path])
    assert report.ok, report.problem
    assert report.records == 200 and report.files == len(files)


def test_resume_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1 << 20)
    log.open()
    _write_n(log, 3)
    last = log.last_hash
    log.close()
    log2 = AuditLog(path, max_bytes=1 << 20)
    log2.open()
    assert log2.seq == 3
    r = log2.write({"type": "test"})
    log2.close()
    assert r["seq"] == 4 and r["prev_hash"] == last
    assert verify([path]).ok


def test_resume_from_rotated_file_when_live_missing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=4096)
    log.open()
    _write_n(log, 100)
    seq, last = log.seq, log.last_hash
    log.close()
    # Simulate a crash right after rotation: the live file was not created yet.
    live = path.read_bytes()
    path.unlink()
    rotated_last = sorted(p for p in tmp_path.iterdir())[-1]
    rotated_last.write_bytes(rotated_last.read_bytes() + live)  # keep every record
    log2 = AuditLog(path, max_bytes=1 << 20)
    log2.open()
    assert (log2.seq, log2.last_hash) == (seq, last)
    log2.write({"type": "test"})
    log2.close()
    assert verify([tmp_path]).ok


def test_open_quarantines_torn_last_line_and_refuses_a_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1 << 20)
    log.open()
    _write_n(log, 3)
    log.close()
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # crash mid-write: quarantined, the chain goes on (issue 20)
    log = AuditLog(path, max_bytes=1 << 20)
    log.open()
    log.close()
    recs = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[2]["type"] == "truncated" and recs[2]["bytes"] == len(data.splitlines(True)[2]) - 10
    quarantined = tmp_path / recs[2]["quarantine"]
    assert quarantined.read_bytes() == data.splitlines(True)[2][:-10]
    path.write_bytes(data.replace(b'"i":2', b'"i":7'))
    with pytest.raises(AuditError, match=rf"{path}:3: last audit record is unusable"):
        AuditLog(path, max_bytes=1 << 20).open()


def _good_trail(tmp_path: Path, n: int = 10) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1 << 20)
    log.open()
    _write_n(log, n)
    log.close()
    return path


def test_verify_catches_one_changed_byte(tmp_path: Path) -> None:
    path = _good_trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    assert verify([path]) .ok
    # Change one byte of a value in line 6 (seq 6): "i":5 -> "i":6.
    lines[5] = lines[5].replace(b'"i":5', b'"i":6')
    path.write_bytes(b"".join(lines))
    report = verify([path])
    assert not report.ok
    assert report.problem is not None
    assert report.problem.startswith(f"{path}:6: record seq 6 has hash ")
    assert "the record was changed" in report.problem
    assert report.records == 5


def test_verify_catches_changed_byte_anywhere(tmp_path: Path) -> None:
    """Flip each byte position of one line in turn: every change is caught at that line."""
    path = _good_trail(tmp_path, 4)
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    start = len(lines[0]) + len(lines[1])
    for pos in range(start, start + len(lines[2]) - 1):  # not the newline itself
        data = bytearray(original)
        data[pos] = ord("A") if data[pos] != ord("A") else ord("B")
        path.write_bytes(bytes(data))
        report = verify([path])
        assert not report.ok, pos
        assert report.problem is not None and report.problem.startswith(f"{path}:3: "), report.problem


def test_verify_catches_one_deleted_line(tmp_path: Path) -> None:
    path = _good_trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[3]  # seq 4
    path.write_bytes(b"".join(lines))
    report = verify([path])
    assert not report.ok and report.problem is not None
    assert report.problem.startswith(f"{path}:4: record seq 5 follows seq 3 (1 record(s) missing)")
    assert "a record was deleted or changed" in report.problem
    assert report.records == 3


def test_verify_catches_deleted_first_line_and_missing_file(tmp_path: Path) -> None:
    path = _good_trail(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[1:]))
    report = verify([path])
    assert not report.ok and report.problem is not None
    assert report.problem.startswith(f"{path}:1: record seq 2 ")
    assert "earlier records or files are missing" in report.problem


def test_verify_catches_deleted_rotated_file(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=4096)
    log.open()
    _write_n(log, 200)
    log.close()
    rotated = sorted(p for p in tmp_path.iterdir() if p.name != "audit.jsonl")
    middle = rotated[1]
    middle.unlink()
    report = verify([tmp_path])
    assert not report.ok and report.problem is not None
    assert report.problem.startswith(f"{rotated[2]}:1: record seq ")
    assert "record(s) missing" in report.problem


def test_verify_truncated_and_garbage(tmp_path: Path) -> None:
    path = _good_trail(tmp_path, 3)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    report = verify([path])
    assert not report.ok and report.problem is not None
    assert report.problem.startswith(f"{path}:3: record is incomplete")
    path.write_bytes(data + b"not json\n")
    report = verify([path])
    assert report.problem is not None and report.problem.startswith(f"{path}:4: not valid JSON")
    path.write_bytes(data + b"\n")
    report = verify([path])
    assert report.problem is not None and report.problem.startswith(f"{path}:4: empty line")


def test_verify_unreadable_input_raises(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no such file"):
        verify([tmp_path / "missing.jsonl"])
    with pytest.raises(AuditError, match="no audit files"):
        verify([tmp_path])


def test_fsync_explicit_and_needs_sync(tmp_path: Path) -> None:
    clock = Clock()
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20, clock=clock)
    log.open()
    assert not log.needs_sync and log.last_sync is None
    log.write({"type": "x"})
    assert log.needs_sync
    log.sync()
    assert not log.needs_sync and log.last_sync is not None
    first = log.last_sync
    log.write({"type": "x"})
    log.close()
    assert not log.needs_sync and log.last_sync is not None and log.last_sync > first


async def test_run_syncer_syncs_within_interval(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20, fsync_interval=0.05)
    log.open()
    stop = asyncio.Event()
    task = asyncio.create_task(log.run_syncer(stop))
    for round_ in range(3):
        before = log.last_sync
        log.write({"type": "x", "round": round_})
        assert log.needs_sync
        for _ in range(500):  # bounded: up to 5 s
            if not log.needs_sync:
                break
            await asyncio.sleep(0.01)
        assert not log.needs_sync
        assert log.last_sync is not None and log.last_sync != before
    log.write({"type": "x", "round": "final"})
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert not log.needs_sync  # final sync on stop
    log.close()


class _Disk:
    """`os.fdatasync` as the audit module calls it, timed as a disk of `delay` seconds would
    be (the real fdatasync still runs), noting the thread each sync ran on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        import threading
        import time

        self.delay = delay
        self.threads: list[int] = []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            self.threads.append(threading.get_ident())
            real(fd)
            time.sleep(self.delay)

        import daemon.service.audit as audit_mod
        monkeypatch.setattr(audit_mod.os, "fdatasync", fdatasync)


async def test_wait_durable_syncs_on_the_loop_while_the_disk_is_fast(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    disk = _Disk(monkeypatch, 0.0)
    # Any real disk is "fast" at 10 s: what is tested is the choice, not this disk's speed.
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20, inline_sync_max=10.0)
    log.open()
    for n in range(3):
        log.write({"type": "decision", "n": n})
        log.sync_soon()  # a fast disk: nothing started in a thread
        await log.wait_durable()
        assert not log.needs_sync
    assert disk.threads == [threading.get_ident()] * 3
    assert log.last_sync_seconds < log.inline_sync_max
    log.close()
    assert AuditLog(tmp_path / "b.jsonl", max_bytes=1).inline_sync_max == INLINE_SYNC_MAX


async def test_a_slow_disk_is_synced_in_a_worker_thread_and_back_when_fast(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    loop_thread = threading.get_ident()
    # Slow: 0.6 s a sync against a limit of 0.3 s; fast: the real disk (well under 0.3 s).
    disk = _Disk(monkeypatch, 0.6)
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20, inline_sync_max=0.3)
    log.open()
    log.write({"type": "decision", "n": 0})
    await log.wait_durable()  # nothing known of the disk yet: on the loop, and slow
    assert disk.threads == [loop_thread] and log.last_sync_seconds >= log.inline_sync_max
    # Slow: the next syncs go to a worker thread, shared by the waiters of one turn.
    for n in (1, 2):
        log.write({"type": "decision", "n": n})
        log.sync_soon()
    await asyncio.wait_for(asyncio.gather(log.wait_durable(), log.wait_durable()), 10)
    assert not log.needs_sync
    # One or two syncs (the worker may have begun before the second record was written).
    slow = disk.threads[1:]
    assert 1 <= len(slow) <= 2 and loop_thread not in slow
    # The disk is fast again: the next sync (still in a thread) shows it, then the loop.
    disk.delay = 0.0
    log.write({"type": "decision", "n": 3})
    await asyncio.wait_for(log.wait_durable(), 10)
    log.write({"type": "decision", "n": 4})
    await asyncio.wait_for(log.wait_durable(), 10)
    assert disk.threads[-2] != loop_thread and disk.threads[-1] == loop_thread
    assert [r["n"] for r in _lines(tmp_path / "audit.jsonl")] == [0, 1, 2, 3, 4]
    log.close()


def test_builders() -> None:
    d = _decision()
    rec = decision_record(d, mode="enforce")
    assert rec == {
        "type": "decision", "rule": "no-external-recording", "conversation_id": "c1",
        "participant_id": "p1", "purpose": "external",
        "matched": {"purpose": "external", "address": "+442071234567"}, "mode": "enforce",
        "action": "disconnect", "severity": "critical", "tags": ["pci"],
        "message": "external party on a secure call", "decided_at": 1_763_780_000.5,
        "received_at": 1_763_780_000.25}
    out = outcome_record(d, outcome="disconnected", http_status=202, attempts=1,
                         event_to_request_ms=3.5, error=None)
    assert out["type"] == "outcome" and out["outcome"] == "disconnected"
    assert out["http_status"] == 202 and out["attempts"] == 1 and out["event_to_request_ms"] == 3.5
    assert {"disconnected", "already_gone", "failed", "unconfirmed", "observed",
            "suppressed", "standby", "unknown"} == OUTCOMES
    with pytest.raises(ValueError, match="unknown outcome"):
        outcome_record(d, outcome="gone", http_status=None, attempts=0,
                       event_to_request_ms=None, error=None)


def test_builder_records_roundtrip_through_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20)
    log.open()
    d = _decision(matched={"held": True, "connected_seconds": 12.5, "odd": object()})
    log.write(decision_record(d, mode="observe"))
    log.write(outcome_record(d, outcome="observed", http_status=None, attempts=0,
                             event_to_request_ms=None, error=None))
    log.close()
    assert verify([tmp_path / "audit.jsonl"]).ok


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from daemon.commands.audit import main; sys.exit(main())",
         "verify", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_verify_subprocess(tmp_path: Path) -> None:
    path = _good_trail(tmp_path, 5)
    ok = _cli(str(path))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "ok: 5 records in 1 files, chain intact"
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[1]
    path.write_bytes(b"".join(lines))
    broken = _cli(str(tmp_path))
    assert broken.returncode == 1
    assert broken.stdout.startswith(f"broken: {path}:2: record seq 3 follows seq 1")
    missing = _cli(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert "no such file" in missing.stderr


def test_register_into_parent_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _good_trail(tmp_path, 2)
    parser = argparse.ArgumentParser(prog="confguard")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", "verify", str(path)])
    assert args.func(args) == 0
    assert "ok: 2 records in 1 files" in capsys.readouterr().out


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.dictionaries(st.text(max_size=8), _json_values, max_size=5),
                        min_size=1, max_size=6))
def test_any_json_content_roundtrips_and_verifies(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    """Whatever JSON the caller logs (unicode, floats, nesting), the hash a reader
    recomputes equals the one written, across a reopen."""
    folder = tmp_path / os.urandom(6).hex()
    path = folder / "audit.jsonl"
    for rec in records:
        log = AuditLog(path, max_bytes=1 << 20)
        log.open()
        log.write(rec)
        log.close()
    report = verify([folder])
    assert report.ok, report.problem
    assert report.records == len(records)
