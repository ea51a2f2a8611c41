"""The running daemon's checkpoints off the host: an S3 bucket with Object Lock (moto server
on 127.0.0.1) and, with `ha:`, the PostgreSQL database (a real server); `audit verify`
reads them back from both."""

from __future__ import annotations

import os
from pathlib import Path

from _audit_daemon import AGENT, remove_one, running, stop_ok
from _daemon_harness import audit_records, run_cli, sample
from _ha_harness import ha_daemon, new_lease
from _moto import MotoServer, moto_server, unique_name  # noqa: F401
from _postgres import PostgresServer, postgres  # noqa: F401

from daemon.sandbox import Sandbox
from daemon.service.checkpoint import generate_keypair


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
        await remove_one(sandbox, tmp_path)
        await d.wait_metrics(lambda t: (sample(t, "confguard_audit_checkpoints_total", sink="s3",
                                               result="ok") or 0) >= 1, timeout=15)
        await stop_ok(d)
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


async def test_ha_daemon_stores_checkpoints_in_postgres(sandbox: Sandbox, tmp_path: Path,
                                                        postgres: PostgresServer) -> None:  # noqa: F811
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    generate_keypair(priv, pub)
    d = ha_daemon(sandbox, postgres, tmp_path, "node-a", new_lease())
    d.config.write_text(d.config.read_text().replace(
        "  fsync_interval: 0.2\n", f"  fsync_interval: 0.2\n  signing_key_file: {priv}\n  checkpoint_interval: 1s\n", 1))
    await d.start()
    try:
        await d.wait_ready()
        await d.wait_event("audit_checkpoints_on", sinks=["postgres"])
        if AGENT not in sandbox.world.users:
            sandbox.world.create_user("Alice Agent", AGENT)
        await remove_one(sandbox, tmp_path)
        await d.wait_metrics(lambda t: (sample(t, "confguard_audit_checkpoints_total", sink="postgres",
                                               result="ok") or 0) >= 1, timeout=15)
        await stop_ok(d)
    finally:
        await d.close()
    code, out, err = await run_cli("audit", "verify", str(tmp_path / "audit"), "--public-key", str(pub),
                                   "--checkpoints", postgres.dsn)
    assert code == 0, out + err
    recs = audit_records(tmp_path)
    cps = [r["checkpoint"] for r in recs if r["type"] == "checkpoint"]
    assert cps and {c["node"] for c in cps} == {"node-a"} and cps[-1]["epoch"] >= 1  # the lease epoch
