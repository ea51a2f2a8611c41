"""Signed audit checkpoints: Ed25519 over the head of the hash chain, kept off the host.

A checkpoint is one JSON object, `{node, epoch, file, seq, head_hash, records, time,
previous_checkpoint_hash}`, plus `signature`:

- `node`: this host's name (`ha.node`, default the host name); `epoch`: the HA lease epoch
  when `ha:` is configured, else 0;
- `file`: the name of the trail's live file, which held record `seq` when it was signed
  (a rotation renames it; `seq` is what counts);
- `seq`: the seq of the checkpoint's own `type: checkpoint` record in the trail, the last
  record it covers; `head_hash`: the `hash` of the record before it (seq - 1), which is
  that record's `prev_hash`: so deleting the checkpoint record itself is seen too;
- `records`: seqs after the previous checkpoint's `seq`, up to and including `seq`;
- `time`: when it was signed, ISO-8601 UTC with milliseconds;
- `previous_checkpoint_hash`: `checkpoint_hash` of the previous checkpoint (null for the
  first one this trail ever had);
- `signature`: hex Ed25519 signature of the canonical JSON (sorted keys, compact) of the
  eight fields above.

`checkpoint_hash(cp)` is the hex SHA-256 of the canonical JSON of all nine fields.

The `Checkpointer` writes one every `audit.checkpoint_interval` seconds when records were
written since the last one, before the live file is rotated, and at shutdown. the trail is fdatasync'd up to `seq` first (a checkpoint never covers a record that is not
on disk); then it is (1) written into the chain as a `type: checkpoint` record, (2) logged
as one JSON line whose `event` is `audit_checkpoint` (field `checkpoint`) on stdout, so
the journal and whatever ships it off the host get it, (3) stored in the checkpoint state
file beside the trail (`<stem>.checkpoint.json`: the writer never reuses a seq below it),
and (4) queued for every configured sink (PostgreSQL table `confguard_audit_checkpoints`,
an S3 bucket with Object Lock). Sinks are retried with the project's retry policy; a sink
that is down never blocks the daemon (at most MAX_QUEUED checkpoints wait per sink; the
oldest are dropped with an error line: later checkpoints cover the same records).

Keys: `generate_keypair` writes PEM files (PKCS#8 private, mode 0600; SubjectPublicKeyInfo
public). The private key is read once at start from `audit.signing_key_file` or the systemd
credential `audit_signing_key`, and never logged.

This module is not part of the sans-I/O core; it may use asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from daemon.config.secrets import MAX_SECRET_BYTES, read_file
from daemon.core.timefmt import format_time
from daemon.errors import AuditError
from daemon.genesys.retry import RetryPolicy
from daemon.service.audit import AuditLog, RotationHook, checkpoint_state_path

log = structlog.get_logger(__name__)

__all__ = [
    "CHECKPOINT_FIELDS", "Checkpointer", "CheckpointSink", "PostgresCheckpointSink",
    "S3CheckpointSink", "PG_SCHEMA", "canonical", "check_signature", "checkpoint_hash",
    "generate_keypair", "key_id", "load_private_key", "load_public_key", "sign_checkpoint",
]

CHECKPOINT_FIELDS = ("node", "epoch", "file", "seq", "head_hash", "records", "time",
                     "previous_checkpoint_hash")
MAX_QUEUED = 1000
SINK_RETRY = RetryPolicy(initial=1.0, factor=2.0, cap=60.0, jitter=0.5)

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS confguard_audit_checkpoints (
    id          bigserial PRIMARY KEY,
    node        text NOT NULL,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    hash        text NOT NULL UNIQUE,
    checkpoint  text NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS confguard_audit_checkpoints_node_seq ON confguard_audit_checkpoints (node, seq);
"""


# ---------------------------------------------------------------- keys and signatures


def canonical(obj: Any) -> bytes:
    """Sorted keys, compact: the bytes that are signed and hashed."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM: the private key (PKCS#8, unencrypted: protect
    it with the file's mode 0600 and the service's credential store) and the public key.
    Refuses to overwrite an existing file. Returns the key id (`key_id`)."""
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    for path, data, mode in ((private_path, priv, 0o600), (public_path, pub, 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            raise AuditError(f"{path} exists; not overwriting a key file") from None
        except OSError as exc:
            raise AuditError(f"cannot create {path}: {exc.strerror or exc}") from None
        try:
            os.fchmod(fd, mode)  # whatever the umask
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    return key_id(key.public_key())


def key_id(public: Ed25519PublicKey) -> str:
    """The first 16 hex digits of SHA-256 of the raw public key: names a key in messages."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file `path`. AuditError (naming the file, never its
    content) when it cannot be read or is not an unencrypted Ed25519 PEM key."""
    data = read_file(Path(path), "cannot read the audit signing key {path}: {reason}",
                     max_bytes=MAX_SECRET_BYTES, error=AuditError).encode()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{path} is not an unencrypted PEM private key "
                         f"({type(exc).__name__}); make one with `confguard audit keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path} is not an Ed25519 key; make one with `confguard audit keygen`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file `path` (AuditError otherwise)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read the public key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{path} is not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"{path} is not an Ed25519 public key")
    return key


def sign_checkpoint(key: Ed25519PrivateKey, body: dict[str, Any]) -> dict[str, Any]:
    """`body` (exactly CHECKPOINT_FIELDS) plus its `signature` (hex)."""
    missing = [f for f in CHECKPOINT_FIELDS if f not in body]
    if missing or len(body) != len(CHECKPOINT_FIELDS):
        raise ValueError(f"a checkpoint has exactly the fields {CHECKPOINT_FIELDS}; missing {missing}")
    signed = {f: body[f] for f in CHECKPOINT_FIELDS}
    signed["signature"] = key.sign(canonical(signed)).hex()
    return signed


def checkpoint_hash(cp: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of the signed checkpoint (signature included)."""
    return hashlib.sha256(canonical({f: cp.get(f) for f in (*CHECKPOINT_FIELDS, "signature")})).hexdigest()


def check_signature(public: Ed25519PublicKey, cp: object) -> str | None:
    """None when `cp` is a well-formed checkpoint signed by `public`, else what is wrong."""
    if not isinstance(cp, dict):
        return "not a JSON object"
    missing = [f for f in (*CHECKPOINT_FIELDS, "signature") if f not in cp]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    seq = cp["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return "seq is not a non-negative integer"
    if not isinstance(cp["head_hash"], str) or not isinstance(cp["signature"], str):
        return "head_hash or signature is not a string"
    try:
        sig = bytes.fromhex(cp["signature"])
    except ValueError:
        return "signature is not hex"
    try:
        public.verify(sig, canonical({f: cp[f] for f in CHECKPOINT_FIELDS}))
    except InvalidSignature:
        return (f"signature does not verify with public key {key_id(public)} (signed by "
                f"another key, or the checkpoint was changed)")
    return None


# ---------------------------------------------------------------- sinks


class CheckpointSink(Protocol):
    """Somewhere off the host a checkpoint is kept. `put` raises on failure (retried)."""

    name: str

    async def put(self, cp: dict[str, Any], cp_hash: str) -> None: ...

    async def aclose(self) -> None: ...


class PostgresCheckpointSink:
    """Table `confguard_audit_checkpoints` in the HA database (created if missing). One row
    per checkpoint, `checkpoint` holding its canonical JSON; inserting one twice is a no-op."""

    name = "postgres"

    def __init__(self, dsn: str, *, timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._conn: Any = None

    async def _connection(self) -> Any:
        import asyncpg

        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout,
                                               server_settings={"application_name": "confguard:audit"})
            await self._conn.execute(PG_SCHEMA, timeout=self._timeout)
        return self._conn

    async def put(self, cp: dict[str, Any], cp_hash: str) -> None:
        try:
            conn = await asyncio.wait_for(self._connection(), self._timeout + 1.0)
            await conn.execute(
                "INSERT INTO confguard_audit_checkpoints (node, epoch, seq, hash, checkpoint) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hash) DO NOTHING",
                str(cp["node"]), int(cp["epoch"]), int(cp["seq"]), cp_hash,
                canonical(cp).decode(), timeout=self._timeout)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)


def s3_key(prefix: str, cp: dict[str, Any], cp_hash: str) -> str:
    """`<prefix>/<node>/<seq, 20 digits>-<hash, 16 hex>.json`: listing a node's objects in
    key order lists its checkpoints in seq order."""
    base = prefix.strip("/")
    return f"{base + '/' if base else ''}{cp['node']}/{int(cp['seq']):020d}-{cp_hash[:16]}.json"


class S3CheckpointSink:
    """One object per checkpoint in `bucket` under `prefix` (`s3_key`). Retention is the
    bucket's default Object Lock retention (compliance mode recommended); the first put
    logs `audit_checkpoint_s3_unlocked` (error) when the bucket has no Object Lock."""

    name = "s3"

    def __init__(self, bucket: str, prefix: str, *, region: str | None, endpoint_url: str | None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self.endpoint_url = endpoint_url
        self._lock_checked = False

    async def put(self, cp: dict[str, Any], cp_hash: str) -> None:
        import base64

        from daemon.service.aws import aws_client

        body = canonical(cp)
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        async with aws_client("s3", region=self.region, endpoint_url=self.endpoint_url) as s3:
            if not self._lock_checked:
                await self._check_lock(s3)
            await s3.put_object(Bucket=self.bucket, Key=s3_key(self.prefix, cp, cp_hash), Body=body,
                                ContentMD5=md5, ContentType="application/json")

    async def _check_lock(self, s3: Any) -> None:
        try:
            got = await s3.get_object_lock_configuration(Bucket=self.bucket)
            enabled = got.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except Exception as exc:  # noqa: BLE001 - no configuration is an error answer too
            from daemon.service.aws import describe_aws_error

            failure = describe_aws_error(exc)
            if failure.kind in ("unreachable", "credentials", "throttled"):
                raise
            enabled = False
        self._lock_checked = True
        if not enabled:
            log.error("audit_checkpoint_s3_unlocked", bucket=self.bucket,
                      detail="the bucket has no Object Lock: checkpoints there can be deleted; "
                             "create the bucket with Object Lock and a default retention")

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Writes signed checkpoints of `audit` (see the module docstring).

    `key`: the signing key. `node`: this host's name. `epoch()`: the HA epoch (0 without
    HA). `interval`: seconds between checkpoints. `sinks`: off-host stores. `clock`: epoch
    seconds. Counters for metrics and tests: `written`, and per sink name `published` /
    `failed`; `last` is the last signed checkpoint. `on_result(sink, result)` is called for
    each checkpoint written (`trail`) and each sink attempt (`ok` / `failed`).
    `make_audit(hook)` builds the trail this checkpointer signs (`AuditLog(..., rotation=hook)`):
    it is called once, here, with this checkpointer as the hook, so a checkpoint closes each
    file before it rotates; the trail is `audit`. Use from the event loop's thread.
    """

    def __init__(self, make_audit: Callable[[RotationHook], AuditLog], key: Ed25519PrivateKey, *, node: str,
                 epoch: Callable[[], int] = lambda: 0, interval: float = 60.0,
                 sinks: Sequence[CheckpointSink] = (), clock: Callable[[], float] = time.time,
                 on_result: Callable[[str, str], None] | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.audit = make_audit(self)
        self._key = key
        self.node = node
        self.epoch = epoch
        self.interval = interval
        self.sinks = list(sinks)
        self._clock = clock
        self._on_result = on_result  # (sink, "ok" | "failed"): metrics
        self.last: dict[str, Any] | None = None  # the last signed checkpoint
        self._last_hash: str | None = None
        self._last_seq = 0  # seq the last checkpoint covered
        self._last_record_seq = 0  # seq of the last checkpoint's own record
        self._queues: dict[str, deque[tuple[dict[str, Any], str]]] = {s.name: deque() for s in self.sinks}
        self._wake = asyncio.Event()
        self.written = 0
        self.published: dict[str, int] = {s.name: 0 for s in self.sinks}
        self.failed: dict[str, int] = {s.name: 0 for s in self.sinks}

    def resume(self) -> None:
        """Continue the checkpoint chain from the state file beside the trail (call after
        `audit.open()`)."""
        from daemon.service.audit import read_checkpoint_state

        state = read_checkpoint_state(self.audit.path)
        if state is None:
            return
        cp = state["checkpoint"]
        self.last = cp
        self._last_hash = checkpoint_hash(cp)
        self._last_seq = int(cp.get("seq", 0))
        self._last_record_seq = int(state["record_seq"])

    @property
    def due(self) -> bool:
        """True when records other than the last checkpoint's own were written since it."""
        return self.audit.seq > 0 and self.audit.seq != self._last_record_seq

    def checkpoint_now(self) -> dict[str, Any] | None:
        """Sign and write a checkpoint of the trail as it is now, fdatasync it with
        everything before it (blocking: used at rotation and shutdown), then publish it.
        None when nothing was written since the last one."""
        if not self.due or not self.audit.is_open:
            return None
        cp, cp_hash = self._write()
        self.audit.sync()
        self._publish_one(cp, cp_hash)
        return cp

    async def checkpoint_async(self) -> dict[str, Any] | None:
        """`checkpoint_now` without blocking the loop on the disk (group-committed sync)."""
        if not self.due or not self.audit.is_open:
            return None
        cp, cp_hash = self._write()
        await self.audit.wait_durable()
        self._publish_one(cp, cp_hash)
        return cp

    def before_rotate(self) -> None:
        """The trail's `RotationHook`: a checkpoint closes the file about to rotate."""
        self.checkpoint_now()

    def _write(self) -> tuple[dict[str, Any], str]:
        seq = self.audit.seq + 1  # the checkpoint record's own seq (written right below)
        body = {
            "node": self.node, "epoch": int(self.epoch()), "file": self.audit.path.name,
            "seq": seq, "head_hash": self.audit.last_hash,
            "records": max(0, seq - self._last_seq),
            "time": format_time(self._clock()), "previous_checkpoint_hash": self._last_hash,
        }
        cp = sign_checkpoint(self._key, body)
        cp_hash = checkpoint_hash(cp)
        rec = self.audit.write({"type": "checkpoint", "checkpoint": cp, "checkpoint_hash": cp_hash})
        if rec["seq"] != seq or rec["prev_hash"] != body["head_hash"]:  # write() is synchronous
            raise AuditError(f"checkpoint record took seq {rec['seq']}, expected {seq}")
        self.last, self._last_hash, self._last_seq = cp, cp_hash, seq
        self._last_record_seq = seq
        self.written += 1
        self._result("trail", "ok")
        return cp, cp_hash

    def _result(self, sink: str, result: str) -> None:
        if self._on_result is not None:
            self._on_result(sink, result)

    def _publish_one(self, cp: dict[str, Any], cp_hash: str) -> None:
        log.info("audit_checkpoint", checkpoint=cp, checkpoint_hash=cp_hash)
        self._save_state(cp)
        for sink in self.sinks:
            q = self._queues[sink.name]
            if len(q) >= MAX_QUEUED:
                q.popleft()
                log.error("audit_checkpoint_dropped", sink=sink.name, queued=len(q),
                          detail="the sink is not keeping up; later checkpoints cover the same records")
            q.append((cp, cp_hash))
        self._wake.set()

    def _save_state(self, cp: dict[str, Any]) -> None:
        """Atomically replace the state file (write, fsync, rename, fsync the folder)."""
        path = checkpoint_state_path(self.audit.path)
        tmp = path.with_name(path.name + ".tmp")
        data = canonical({"checkpoint": cp, "record_seq": self._last_record_seq})
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            log.error("audit_checkpoint_state_failed", path=str(path), error=exc.strerror or str(exc))

    async def run(self, stop: asyncio.Event) -> None:
        """Checkpoint every `interval` seconds (when due) and publish to the sinks until
        `stop` is set. The final checkpoint and flush are `close`'s."""
        publishers = [asyncio.create_task(self._publish(s, stop), name=f"checkpoint-{s.name}")
                      for s in self.sinks]
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
                if stop.is_set():
                    break
                try:
                    await self.checkpoint_async()
                except Exception as exc:  # noqa: BLE001 - logged; tried again next interval
                    log.error("audit_checkpoint_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._wake.set()  # the publishers see `stop` and return; what is queued is close()'s
            if publishers:
                await asyncio.wait(publishers, timeout=1.0)
            for t in publishers:
                t.cancel()

    async def _publish(self, sink: CheckpointSink, stop: asyncio.Event) -> None:
        retry = 0
        q = self._queues[sink.name]
        while not stop.is_set():
            if not q:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=5.0)
                continue
            if await self._put_one(sink):
                retry = 0
                continue
            retry += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=SINK_RETRY.delay(retry))

    async def _put_one(self, sink: CheckpointSink) -> bool:
        q = self._queues[sink.name]
        cp, cp_hash = q[0]
        try:
            await asyncio.wait_for(sink.put(cp, cp_hash), timeout=30.0)
        except Exception as exc:  # noqa: BLE001 - counted, logged, retried
            self.failed[sink.name] += 1
            self._result(sink.name, "failed")
            log.warning("audit_checkpoint_sink_failed", sink=sink.name, seq=cp.get("seq"),
                        queued=len(q), error=f"{type(exc).__name__}: {exc}")
            return False
        if q and q[0][1] == cp_hash:
            q.popleft()
        self.published[sink.name] += 1
        self._result(sink.name, "ok")
        return True

    def pending(self) -> int:
        """Checkpoints queued for the sinks, all sinks together."""
        return sum(len(q) for q in self._queues.values())

    async def close(self, timeout: float) -> None:
        """Shutdown: a last checkpoint (when due), then up to `timeout` seconds to hand what
        is queued to the sinks (each tried once per checkpoint; what is left is logged)."""
        try:
            self.checkpoint_now()
        except Exception as exc:  # noqa: BLE001
            log.error("audit_checkpoint_failed", error=f"{type(exc).__name__}: {exc}")
        deadline = time.monotonic() + max(0.0, timeout)
        for sink in self.sinks:
            q = self._queues[sink.name]
            while q and time.monotonic() < deadline:
                try:
                    ok = await asyncio.wait_for(self._put_one(sink), max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    ok = False
                if not ok:
                    break
            if q:
                log.error("audit_checkpoint_unpublished", sink=sink.name, queued=len(q))
            await sink.aclose()


def checkpointer_for(config: Any, make_audit: Callable[[RotationHook], AuditLog], *,
                     epoch: Callable[[], int], env: Any = None,
                     on_result: Callable[[str, str], None] | None = None) -> Checkpointer | None:
    """The daemon's Checkpointer from `config` (a `daemon.config.Config`), building its trail
    with `make_audit` (see `Checkpointer`), or None when no signing key is configured
    (`audit.signing_key_file`, credential `audit_signing_key`): the caller then builds the
    trail itself, without a rotation hook. The chain resumes from the state file beside it.
    Sinks: PostgreSQL when `ha:` is configured, S3 when `audit.checkpoint_s3` is. Raises
    AuditError (key unreadable) or ConfigError (no HA database named)."""
    from daemon.config.secrets import resolve_ha_dsn, resolve_signing_key_file

    key_file = resolve_signing_key_file(config.audit, env, base_dir=config.base_dir)
    if key_file is None:
        log.info("audit_checkpoints_off", detail="no audit.signing_key_file and no credential "
                                                 "audit_signing_key: the trail is hash-chained only")
        return None
    key = load_private_key(key_file)
    sinks: list[CheckpointSink] = []
    if config.ha.enabled:
        sinks.append(PostgresCheckpointSink(resolve_ha_dsn(config.ha, env, base_dir=config.base_dir)))
    s3 = config.audit.checkpoint_s3
    if s3 is not None:
        sinks.append(S3CheckpointSink(s3.bucket, s3.prefix, region=s3.region, endpoint_url=s3.endpoint_url))
    cpr = Checkpointer(make_audit, key, node=config.ha.node_name, epoch=epoch,
                       interval=config.audit.checkpoint_interval, sinks=sinks, on_result=on_result)
    cpr.resume()
    log.info("audit_checkpoints_on", key_id=key_id(key.public_key()), interval=cpr.interval,
             sinks=[s.name for s in sinks])
    return cpr
