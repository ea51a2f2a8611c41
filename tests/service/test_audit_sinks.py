"""Checkpoints off the host: a real PostgreSQL server (tests/_postgres.py) and an S3 bucket
with Object Lock on a moto server on 127.0.0.1 (tests/_moto.py). Each sink receives every
checkpoint, and `audit verify --checkpoints postgres://... | s3://bucket/prefix` reads them
back and catches a deleted tail."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import structlog.testing
from _moto import MotoServer, moto_server, unique_name  # noqa: F401
from _postgres import PostgresServer, postgres  # noqa: F401

from daemon.commands.audit import main as audit_main
from daemon.service.audit import AuditLog
from daemon.service.checkpoint import (
    Checkpointer,
    PostgresCheckpointSink,
    S3CheckpointSink,
    checkpoint_hash,
    generate_keypair,
    load_private_key,
    s3_key,
)


def _cli_sync(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = audit_main(list(args))
    return code, out.getvalue(), err.getvalue()


async def _cli(*args: str) -> tuple[int, str, str]:
    """`confguard audit ARGS` in a worker thread (it runs its own event loop)."""
    return await asyncio.to_thread(_cli_sync, *args)


async def _trail_with_sink(tmp: Path, sink: Any) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Three checkpoints of a 9-record trail handed to `sink`; (trail, public key, cps)."""
    priv, pub = tmp / "k.pem", tmp / "k.pub"
    generate_keypair(priv, pub)
    path = tmp / "audit" / "audit.jsonl"
    cpr = Checkpointer(lambda hook: AuditLog(path, max_bytes=1 << 20, rotation=hook), load_private_key(priv), node="host-a", sinks=[sink])
    log = cpr.audit
    log.open()
    cps = []
    for i in range(1, 10):
        log.write({"type": "decision", "rule": "r", "i": i})
        if i % 3 == 0:
            cp = await cpr.checkpoint_async()
            assert cp is not None
            cps.append(cp)
    await cpr.close(10.0)  # hands what is queued to the sink
    log.close()
    assert cpr.published == {sink.name: 3} and cpr.pending() == 0, cpr.failed
    return path, pub, cps


def _delete_tail(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]))


async def test_checkpoints_reach_postgres_and_verify_reads_them_back(
        postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    sink = PostgresCheckpointSink(postgres.dsn)
    path, pub, cps = await _trail_with_sink(tmp_path, sink)
    conn = await asyncpg.connect(postgres.dsn)
    try:
        rows = await conn.fetch("SELECT node, seq, hash, checkpoint FROM confguard_audit_checkpoints "
                                "WHERE node = 'host-a' ORDER BY seq")
    finally:
        await conn.close()
    assert [r["seq"] for r in rows] == [c["seq"] for c in cps]
    assert [orjson.loads(r["checkpoint"]) for r in rows] == cps
    assert [r["hash"] for r in rows] == [checkpoint_hash(c) for c in cps]
    code, out, err = await _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", postgres.dsn)
    assert code == 0, out + err
    _delete_tail(path)
    code, out, _ = await _cli("verify", str(path), "--public-key", str(pub), "--checkpoints", postgres.dsn)
    assert code == 1, out
    assert f"checkpoint seq {cps[-1]['seq']}" in out and "postgres confguard_audit_checkpoints id" in out


async def test_postgres_down_checkpoints_wait_and_are_sent_later(postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    priv, _ = tmp_path / "k.pem", tmp_path / "k.pub"
    generate_keypair(priv, tmp_path / "k.pub")
    sink = PostgresCheckpointSink(postgres.dsn.replace(str(postgres.port), "1"), timeout=1.0)  # nothing there
    results: list[tuple[str, str]] = []
    cpr = Checkpointer(lambda hook: AuditLog(tmp_path / "a.jsonl", max_bytes=1 << 20, rotation=hook),
                       load_private_key(priv), node="host-b", sinks=[sink],
                       on_result=lambda sink, result: results.append((sink, result)))
    log = cpr.audit
    log.open()
    log.write({"type": "decision"})
    with structlog.testing.capture_logs() as logs:
        await cpr.checkpoint_async()
        await cpr.close(1.0)
    log.close()
    assert cpr.failed["postgres"] >= 1 and cpr.pending() == 1
    assert {e["event"] for e in logs} >= {"audit_checkpoint_sink_failed", "audit_checkpoint_unpublished"}
    sink._dsn = postgres.dsn  # the database is back
    assert await cpr._put_one(sink) and cpr.pending() == 0
    assert results[0] == ("trail", "ok") and ("postgres", "failed") in results
    assert results[-1] == ("postgres", "ok")
    await sink.aclose()


def _locked_bucket(moto: MotoServer, *, locked: bool = True) -> str:
    s3 = moto.boto3("s3")
    bucket = unique_name("audit")
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=locked,
                     CreateBucketConfiguration={"LocationConstraint": moto.region})
    if locked:
        s3.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}}})
    return bucket


async def test_checkpoints_reach_s3_object_lock_and_verify_reads_them_back(
        moto_server: MotoServer, tmp_path: Path) -> None:  # noqa: F811
    bucket = _locked_bucket(moto_server)
    sink = S3CheckpointSink(bucket, "prod/confguard", region=moto_server.region,
                            endpoint_url=moto_server.endpoint_url)
    with structlog.testing.capture_logs() as logs:
        path, pub, cps = await _trail_with_sink(tmp_path, sink)
    assert "audit_checkpoint_s3_unlocked" not in {e["event"] for e in logs}
    s3 = moto_server.boto3("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [s3_key("prod/confguard", c, checkpoint_hash(c)) for c in cps]
    head = s3.head_object(Bucket=bucket, Key=keys[0])
    assert head["ObjectLockMode"] == "COMPLIANCE"  # the bucket's default retention applies
    assert orjson.loads(s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read()) == cps[0]
    # Compliance mode: the stored checkpoint cannot be deleted.
    with pytest.raises(Exception, match="AccessDenied|locked|retention|WORM"):
        s3.delete_object(Bucket=bucket, Key=keys[0], VersionId=head["VersionId"])
    source = f"s3://{bucket}/prod/confguard"
    args = ("--public-key", str(pub), "--checkpoints", source, "--s3-endpoint-url", moto_server.endpoint_url)
    code, out, err = await _cli("verify", str(path), *args)
    assert code == 0, out + err
    _delete_tail(path)
    code, out, _ = await _cli("verify", str(path), *args)
    assert code == 1, out
    assert f"checkpoint seq {cps[-1]['seq']}" in out and f"from {source}/host-a/" in out


async def test_s3_bucket_without_object_lock_is_reported(moto_server: MotoServer, tmp_path: Path) -> None:  # noqa: F811
    bucket = _locked_bucket(moto_server, locked=False)
    sink = S3CheckpointSink(bucket, "", region=moto_server.region, endpoint_url=moto_server.endpoint_url)
    with structlog.testing.capture_logs() as logs:
        await _trail_with_sink(tmp_path, sink)
    assert [e["bucket"] for e in logs if e["event"] == "audit_checkpoint_s3_unlocked"] == [bucket]


async def test_unreachable_s3_source_is_exit_2(moto_server: MotoServer, tmp_path: Path) -> None:  # noqa: F811
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    generate_keypair(priv, pub)
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, max_bytes=1 << 20)
    log.open()
    log.write({"type": "decision"})
    log.close()
    code, _, err = await _cli("verify", str(path), "--public-key", str(pub), "--checkpoints",
                        f"s3://{unique_name('missing')}/x", "--s3-endpoint-url", moto_server.endpoint_url)
    assert code == 2 and "cannot read checkpoints from s3://" in err and "NoSuchBucket" in err
