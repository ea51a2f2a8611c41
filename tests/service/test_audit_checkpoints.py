"""Signed checkpoints (issue 20): keygen, signing, and `audit verify --public-key
--checkpoints` over real files catching each tamper an auditor would try."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.commands.audit import main as audit_main
from daemon.errors import AuditError
from daemon.service.audit import AuditLog, checkpoint_state_path
from daemon.service.audit_check import check, checkpoints_in_log
from daemon.service.checkpoint import (
    Checkpointer,
    check_signature,
    checkpoint_hash,
    generate_keypair,
    load_private_key,
    load_public_key,
)

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`confguard audit ARGS` in this process (the subprocess form is tested once below)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = audit_main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_cli_subprocess_keygen_and_verify(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    done = subprocess.run([sys.executable, "-m", "daemon", "audit", "keygen", str(priv), str(pub)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    path, journal = _trail(tmp_path, priv, n=4)
    done = subprocess.run([sys.executable, "-m", "daemon", "audit", "verify", str(path),
                           "--public-key", str(pub), "--checkpoints", str(journal)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def _keys(tmp: Path, name: str = "key") -> tuple[Path, Path]:
    priv, pub = tmp / f"{name}.pem", tmp / f"{name}.pub.pem"
    generate_keypair(priv, pub)
    return priv, pub


def _trail(tmp: Path, priv: Path, *, n: int = 12, every: int = 4) -> tuple[Path, Path]:
    """A trail of `n` data records with a checkpoint after every `every` of them, and a
    'journal' file holding each checkpoint as the daemon logs it (plus unrelated lines)."""
    path = tmp / "audit" / "audit.jsonl"
    journal = tmp / "journal.log"
    cpr = Checkpointer(lambda hook: AuditLog(path, max_bytes=1 << 20, rotation=hook), load_private_key(priv), node="host-a")
    log = cpr.audit
    log.open()
    cpr.resume()
    lines = [b'{"event":"daemon_starting","level":"info"}', b"not json at all"]
    for i in range(1, n + 1):
        log.write({"type": "decision", "rule": "r", "i": i})
        if i % every == 0:
            cp = cpr.checkpoint_now()
            assert cp is not None
            lines.append(orjson.dumps({"event": "audit_checkpoint", "level": "info", "checkpoint": cp}))
    log.close()
    journal.write_bytes(b"\n".join(lines) + b"\n")
    return path, journal


def _records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def _rechain(records: list[dict[str, Any]], *, renumber: bool = False) -> bytes:
    """What a forger does with the documented rule: SHA-256 of the sorted-key JSON without
    `hash`, chained by `prev_hash`."""
    prev = "0" * 64
    out = []
    for n, r in enumerate(records, start=1):
        r = {k: v for k, v in r.items() if k != "hash"}
        if renumber:
            r["seq"] = n
        r["prev_hash"] = prev
        body = orjson.dumps(r, option=orjson.OPT_SORT_KEYS)
        r["hash"] = hashlib.sha256(body).hexdigest()
        prev = r["hash"]
        out.append(orjson.dumps(r, option=orjson.OPT_SORT_KEYS))
    return b"\n".join(out) + b"\n"


def test_keygen_writes_pem_pair_private_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    done = _cli("keygen", str(priv), str(pub))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    load_private_key(priv), load_public_key(pub)
    again = _cli("keygen", str(priv), str(tmp_path / "other.pub"))
    assert again.returncode == 2 and "not overwriting" in again.stderr


def test_bad_key_files_are_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(AuditError, match="not an unencrypted PEM private key"):
        load_private_key(junk)
    with pytest.raises(AuditError, match="not a PEM public key"):
        load_public_key(junk)
    with pytest.raises(AuditError, match="cannot read"):
        load_private_key(tmp_path / "missing.pem")


def test_signature_covers_every_field(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, _ = _trail(tmp_path, priv, n=4)
    cp = [r for r in _records(path) if r["type"] == "checkpoint"][0]["checkpoint"]
    public = load_public_key(pub)
    assert check_signature(public, cp) is None
    assert set(cp) == {"node", "epoch", "file", "seq", "head_hash", "records", "time",
                       "previous_checkpoint_hash", "signature"}
    for field, value in (("seq", 99), ("head_hash", "0" * 64), ("node", "x"), ("records", 1)):
        assert "does not verify" in (check_signature(public, {**cp, field: value}) or "")


def test_untouched_trail_verifies_exit_0(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, journal = _trail(tmp_path, priv)
    assert len(checkpoints_in_log(journal)) == 3
    done = _cli("verify", str(path.parent), "--public-key", str(pub), "--checkpoints", str(journal))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "covered: the trail holds every record up to seq 15" in done.stdout


def test_deleted_tail_is_reported_naming_the_checkpoint(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, journal = _trail(tmp_path, priv)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # the last record (the last checkpoint's own)
    plain = _cli("verify", str(path))
    assert plain.returncode == 0  # the chain alone cannot tell
    done = _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", str(journal))
    assert done.returncode == 1, done.stdout
    assert "checkpoint seq 15" in done.stdout and "were deleted" in done.stdout
    assert str(journal) in done.stdout


def test_rewritten_record_with_chain_recomputed_is_reported(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, journal = _trail(tmp_path, priv)
    recs = _records(path)
    recs[2]["rule"] = "innocent"
    path.write_bytes(_rechain(recs))
    assert _cli("verify", str(path)).returncode == 0  # the forged chain is self-consistent
    done = _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", str(journal))
    assert done.returncode == 1, done.stdout
    assert "contradicted: checkpoint seq 5" in done.stdout and "rewritten or renumbered" in done.stdout


def test_deleted_and_renumbered_record_is_reported(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, journal = _trail(tmp_path, priv)
    recs = _records(path)
    del recs[6]  # a decision between the 2nd and 3rd checkpoint
    # The forger also drops the trail's own later checkpoint records, which they cannot sign.
    recs = [r for r in recs if not (r["type"] == "checkpoint" and r["seq"] > 6)]
    path.write_bytes(_rechain(recs, renumber=True))
    assert _cli("verify", str(path)).returncode == 0
    done = _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", str(journal))
    assert done.returncode == 1, done.stdout
    assert "checkpoint seq 10" in done.stdout


def test_trail_cut_and_writer_restarted_is_reported(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, journal = _trail(tmp_path, priv)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:8]))
    # The writer starts again: the checkpoint state says seq 15 was written -> a gap record
    # with seq 16, never seq 9 again.
    log = AuditLog(path, max_bytes=1 << 20)
    log.open()
    log.write({"type": "decision", "rule": "r", "i": 99})
    log.close()
    recs = _records(path)
    assert [r["seq"] for r in recs[8:]] == [16, 17] and recs[8]["type"] == "gap"
    assert recs[8]["skipped"] == [9, 15]
    plain = _cli("verify", str(path))
    assert plain.returncode == 1 and "declared missing" in plain.stdout
    done = _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", str(journal))
    assert done.returncode == 1, done.stdout
    assert "checkpoint seq 10" in done.stdout and "seq 9 to 15" in done.stdout


def test_trail_cut_and_state_file_deleted_is_still_reported(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, journal = _trail(tmp_path, priv)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:8]))
    checkpoint_state_path(path).unlink()
    log = AuditLog(path, max_bytes=1 << 20)
    log.open()
    for i in range(8):
        log.write({"type": "decision", "rule": "r", "i": 100 + i})  # seq 9.. again
    log.close()
    assert _cli("verify", str(path)).returncode == 0
    done = _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", str(journal))
    assert done.returncode == 1, done.stdout
    assert "checkpoint seq 10" in done.stdout


def test_checkpoint_signed_by_another_key_fails(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    other_priv, other_pub = _keys(tmp_path, "other")
    path, journal = _trail(tmp_path, other_priv)  # signed by a key the auditor does not trust
    done = _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", str(journal))
    assert done.returncode == 1, done.stdout
    assert "does not verify with public key" in done.stdout
    assert _cli("verify", str(path), "--public-key", str(other_pub), "--checkpoints",
                str(journal)).returncode == 0


def test_forged_checkpoint_line_in_the_journal_fails(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, journal = _trail(tmp_path, priv)
    cp = checkpoints_in_log(journal)[-1].checkpoint
    forged = {**cp, "seq": cp["seq"] - 1}
    with open(journal, "ab") as f:
        f.write(orjson.dumps({"event": "audit_checkpoint", "checkpoint": forged}) + b"\n")
    done = _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", str(journal))
    assert done.returncode == 1 and "does not verify" in done.stdout


def test_journalctl_json_and_syslog_prefixed_lines_are_read(tmp_path: Path) -> None:
    priv, _ = _keys(tmp_path)
    _, journal = _trail(tmp_path, priv, n=8)
    cps = [orjson.loads(x) for x in journal.read_bytes().splitlines() if x.startswith(b"{")]
    cps = [c for c in cps if c.get("event") == "audit_checkpoint"]
    exported = tmp_path / "export.log"
    exported.write_text(
        orjson.dumps({"MESSAGE": orjson.dumps(cps[0]).decode(), "_PID": "1"}).decode() + "\n"
        + "Dec 07 10:00:00 host confguard[1]: " + orjson.dumps(cps[1]).decode() + "\n")
    got = checkpoints_in_log(exported)
    assert [c.checkpoint["seq"] for c in got] == [5, 10]


def test_records_after_the_last_checkpoint_are_said_to_be_unchecked(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, journal = _trail(tmp_path, priv, n=10, every=4)  # 2 data records after seq 10
    result = check([path], load_public_key(pub), checkpoints_in_log(journal))
    assert result.status == 0 and result.covered_to == 10
    assert any("2 record(s) after the last checkpoint (seq 11 to 12)" in n for n in result.notes)


def test_checkpoint_chain_links_and_state_resumes_across_restarts(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, _ = _trail(tmp_path, priv, n=4)
    cpr = Checkpointer(lambda hook: AuditLog(path, max_bytes=1 << 20, rotation=hook), load_private_key(priv), node="host-a")
    log = cpr.audit
    log.open()
    cpr.resume()
    assert cpr.checkpoint_now() is None  # nothing new since the last one
    log.write({"type": "decision"})
    cp = cpr.checkpoint_now()
    log.close()
    first = [r for r in _records(path) if r["type"] == "checkpoint"][0]
    assert cp is not None and cp["previous_checkpoint_hash"] == checkpoint_hash(first["checkpoint"])
    assert cp["records"] == 2 and cp["head_hash"] == _records(path)[-2]["hash"]


def test_rotation_closes_each_file_with_a_checkpoint(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path = tmp_path / "audit.jsonl"
    cpr = Checkpointer(lambda hook: AuditLog(path, max_bytes=4096, rotation=hook), load_private_key(priv), node="host-a")
    log = cpr.audit
    log.open()
    for i in range(60):
        log.write({"type": "decision", "pad": "x" * 100, "i": i})
    log.close()
    rotated = sorted(p for p in tmp_path.iterdir() if p.name.startswith("audit.2"))
    assert len(rotated) >= 2 and log.rotations == len(rotated)
    for f in rotated:
        assert _records(f)[-1]["type"] == "checkpoint"
    assert cpr.written == len(rotated)
    assert check([tmp_path], load_public_key(pub), []).status == 0


def test_verify_without_public_key_rejects_checkpoints(tmp_path: Path) -> None:
    priv, _ = _keys(tmp_path)
    path, journal = _trail(tmp_path, priv, n=4)
    done = _cli("verify", str(path), "--checkpoints", str(journal))
    assert done.returncode == 2 and "--public-key" in done.stderr


def test_unreadable_checkpoint_source_is_exit_2(tmp_path: Path) -> None:
    priv, pub = _keys(tmp_path)
    path, _ = _trail(tmp_path, priv, n=4)
    done = _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", str(tmp_path / "nope.log"))
    assert done.returncode == 2 and "cannot read checkpoints file" in done.stderr
    assert os.path.exists(path)


def test_signing_key_from_file_setting_or_systemd_credential(tmp_path: Path) -> None:
    from daemon.config.models import AuditSettings
    from daemon.config.secrets import resolve_signing_key_file

    creds = tmp_path / "creds"
    creds.mkdir()
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert resolve_signing_key_file(AuditSettings(), env) is None  # no key: no checkpoints
    generate_keypair(creds / "audit_signing_key", tmp_path / "pub.pem")
    assert resolve_signing_key_file(AuditSettings(), env) == creds / "audit_signing_key"
    chosen = AuditSettings(signing_key_file="keys/k.pem", checkpoint_interval="1s")  # type: ignore[arg-type]
    assert chosen.checkpoint_interval == 1.0
    assert resolve_signing_key_file(chosen, env, base_dir=tmp_path) == tmp_path / "keys" / "k.pem"
    with pytest.raises(ValueError, match="duration"):
        AuditSettings(checkpoint_interval="soon")  # type: ignore[arg-type]


def test_a_key_rotation_verifies_with_both_public_keys(tmp_path: Path) -> None:
    old_priv, old_pub = _keys(tmp_path, "old")
    new_priv, new_pub = _keys(tmp_path, "new")
    path, journal = _trail(tmp_path, old_priv, n=4)
    cpr = Checkpointer(lambda hook: AuditLog(path, max_bytes=1 << 20, rotation=hook), load_private_key(new_priv), node="host-a")
    log = cpr.audit
    log.open()
    cpr.resume()
    log.write({"type": "decision"})
    cp = cpr.checkpoint_now()
    log.close()
    with open(journal, "ab") as f:
        f.write(orjson.dumps({"event": "audit_checkpoint", "checkpoint": cp}) + b"\n")
    assert _cli("verify", str(path), "--public-key", str(old_pub), "--checkpoints", str(journal)).returncode == 1
    done = _cli("verify", str(path), "--public-key", str(old_pub), "--public-key", str(new_pub),
                "--checkpoints", str(journal))
    assert done.returncode == 0, done.stdout
    assert "2 with a valid signature" in done.stdout
