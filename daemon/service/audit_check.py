"""`audit verify` against signed checkpoints: does the local trail hold everything up to
the last checkpoint that was kept off the host?

Sources of checkpoints (`load_checkpoints(spec)`):

- a file of the daemon's log output (`journalctl -u confguard -o cat`, `-o json`, or with
  a syslog prefix): every line whose JSON has `event: audit_checkpoint` (directly or
  inside the journal's `MESSAGE`) gives its `checkpoint`; all other lines are ignored;
- `postgres://...` / `postgresql://...`: the `confguard_audit_checkpoints` table;
- `s3://bucket/prefix`: every `*.json` object under the prefix (the standard AWS chain
  gives credentials and region; `endpoint_url` for a local endpoint);
- and always the `checkpoint` records inside the trail itself.

`check(paths, public_key, external)` verifies every checkpoint's signature, the chain of
checkpoints (`previous_checkpoint_hash`), and that the trail's record at each checkpoint's A checkpoint the trail contradicts (its seq is
missing: a deleted tail or cut trail; its record has another hash: a rewritten or
renumbered chain) is a problem naming that checkpoint. What cannot be checked is said
plainly: records after the last checkpoint, and checkpoints past a break in the chain.

Exit status (`CheckResult.status`): 0 everything checked holds; 1 a problem (broken chain,
a contradicted or badly signed checkpoint, records declared missing by a `gap` record);
3 the chain is intact and no checkpoint is contradicted, but the trail declares a
quarantined torn line (`truncated` record: the bytes of one incomplete write were set
aside at start-up). 2 (unreadable input) is raised as AuditError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.errors import AuditError
from daemon.service.audit import VerifyReport, verify
from daemon.service.checkpoint import check_signature, checkpoint_hash, key_id

__all__ = ["CheckResult", "Located", "check", "describe", "load_checkpoints"]


@dataclass(frozen=True, slots=True)
class Located:
    """A checkpoint and where it was read (`journal FILE:line`, `postgres row id`, `s3://...`,
    `trail FILE:line`)."""

    checkpoint: dict[str, Any]
    origin: str


def describe(cp: dict[str, Any], origin: str) -> str:
    """How a checkpoint is named in messages."""
    try:
        h = checkpoint_hash(cp)[:16]
    except (TypeError, ValueError):
        h = "?"
    return (f"checkpoint seq {cp.get('seq')} (node {cp.get('node')}, signed {cp.get('time')}, "
            f"hash {h}, from {origin})")


# ---------------------------------------------------------------- sources


def _json_in_line(line: str) -> Any:
    start = line.find("{")
    if start < 0:
        return None
    try:
        return orjson.loads(line[start:])
    except orjson.JSONDecodeError:
        return None


def checkpoints_in_log(path: Path) -> list[Located]:
    """The `audit_checkpoint` lines of a log export (module docstring). AuditError when the
    file cannot be read."""
    out: list[Located] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                if "audit_checkpoint" not in line:
                    continue
                obj = _json_in_line(line)
                if isinstance(obj, dict) and isinstance(obj.get("MESSAGE"), str):
                    obj = _json_in_line(obj["MESSAGE"])  # journalctl -o json
                if (isinstance(obj, dict) and obj.get("event") == "audit_checkpoint"
                        and isinstance(obj.get("checkpoint"), dict)):
                    out.append(Located(obj["checkpoint"], f"{path}:{n}"))
    except OSError as exc:
        raise AuditError(f"cannot read checkpoints file {path}: {exc.strerror or exc}") from None
    return out


async def checkpoints_in_postgres(dsn: str, *, timeout: float = 10.0) -> list[Located]:
    import asyncpg

    from daemon.service.ha import mask_dsn

    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise AuditError(f"cannot connect to {mask_dsn(dsn)}: {type(exc).__name__}: {exc}") from None
    try:
        rows = await conn.fetch("SELECT id, checkpoint FROM confguard_audit_checkpoints ORDER BY id",
                                timeout=timeout)
    except asyncpg.UndefinedTableError:
        raise AuditError(f"{mask_dsn(dsn)}: no table confguard_audit_checkpoints (no checkpoint "
                         f"was ever stored there)") from None
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
        raise AuditError(f"cannot read checkpoints from {mask_dsn(dsn)}: {type(exc).__name__}: {exc}") from None
    finally:
        await conn.close()
    out: list[Located] = []
    for r in rows:
        try:
            cp = orjson.loads(r["checkpoint"])
        except orjson.JSONDecodeError:
            cp = None
        out.append(Located(cp if isinstance(cp, dict) else {"_malformed": True},
                           f"postgres confguard_audit_checkpoints id {r['id']}"))
    return out


async def checkpoints_in_s3(url: str, *, region: str | None, endpoint_url: str | None) -> list[Located]:
    from daemon.service.aws import aws_client, describe_aws_error

    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.lstrip("/")
    if not bucket:
        raise AuditError(f"{url}: expected s3://bucket/prefix")
    out: list[Located] = []
    try:
        async with aws_client("s3", region=region, endpoint_url=endpoint_url) as s3:
            token: str | None = None
            for _ in range(100_000):  # bounded: 1000 keys a page
                kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
                if token:
                    kw["ContinuationToken"] = token
                page = await s3.list_objects_v2(**kw)
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if not key.endswith(".json"):
                        continue
                    got = await s3.get_object(Bucket=bucket, Key=key)
                    async with got["Body"] as body:
                        data = await body.read()
                    try:
                        cp = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        cp = None
                    out.append(Located(cp if isinstance(cp, dict) else {"_malformed": True},
                                       f"s3://{bucket}/{key}"))
                if not page.get("IsTruncated"):
                    break
                token = page.get("NextContinuationToken")
    except AuditError:
        raise
    except Exception as exc:  # noqa: BLE001 - any AWS failure: unreadable input
        failure = describe_aws_error(exc)
        raise AuditError(f"cannot read checkpoints from {url}: {failure.kind}: {failure.code}: "
                         f"{failure.message}") from None
    return out


def load_checkpoints(spec: str, *, region: str | None = None,
                     endpoint_url: str | None = None) -> list[Located]:
    """Checkpoints from one `--checkpoints` argument (module docstring)."""
    scheme = urlsplit(spec).scheme
    if scheme in ("postgres", "postgresql"):
        return asyncio.run(checkpoints_in_postgres(spec))
    if scheme == "s3":
        return asyncio.run(checkpoints_in_s3(spec, region=region, endpoint_url=endpoint_url))
    return checkpoints_in_log(Path(spec))


# ---------------------------------------------------------------- the check


@dataclass(slots=True)
class CheckResult:
    """What `check` found. `lines`: the report, one fact a line; `problems`: the subset
    that makes it fail; `status`: the exit status (module docstring)."""

    report: VerifyReport
    checkpoints: int = 0
    covered_to: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    last: Located | None = None
    good: list[Located] = field(default_factory=list)  # the validly signed ones, by seq

    @property
    def status(self) -> int:
        if self.problems or not self.report.ok or self.report.skipped:
            return 1
        if self.report.truncated:
            return 3
        return 0


def _dedupe(items: Iterable[Located]) -> list[Located]:
    seen: dict[str, Located] = {}
    bad: list[Located] = []
    for item in items:
        try:
            h = checkpoint_hash(item.checkpoint)
        except (TypeError, ValueError):
            bad.append(item)
            continue
        seen.setdefault(h, item)
    return bad + list(seen.values())


def check(paths: Sequence[Path], public_key: Ed25519PublicKey | Sequence[Ed25519PublicKey],
          external: Sequence[Located], *, node: str | None = None) -> CheckResult:
    """Verify the trail at `paths` and every checkpoint (external ones and the trail's own)
    with `public_key` (or any of several: a key rotated within the period); see the module
    docstring. `node`: only external checkpoints of this
    node count (default: the node named by the trail's own checkpoints, if any)."""
    keys = [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)
    if not keys:
        raise ValueError("at least one public key is needed")
    seqs = {cp.checkpoint.get("seq") for cp in external}
    first = verify(paths, want={s for s in seqs if isinstance(s, int)})
    own = [Located(cp, f"trail {where}") for cp, where in first.checkpoints]
    nodes = {cp.checkpoint.get("node") for cp in own}
    if node is None and len(nodes) == 1:
        node = str(next(iter(nodes)))
    ext = [c for c in external if node is None or c.checkpoint.get("node") == node]
    # The trail's own checkpoints name seqs too: collect those heads in a second pass only
    # when some are missing (they are in `first.heads` when an external one shares the seq).
    want = {c.checkpoint.get("seq") for c in (*ext, *own)}
    report = first if want <= set(first.heads) else verify(
        paths, want={s for s in want if isinstance(s, int)})
    result = CheckResult(report)
    if node is None and len({c.checkpoint.get("node") for c in external}) > 1:
        result.notes.append("checkpoints of several nodes were given and the trail names none "
                            "of its own: all were compared; pass --node to choose")
    everything = _dedupe([*own, *ext])
    good: list[Located] = []
    for item in everything:
        problem = _signed_by_any(keys, item.checkpoint)
        if problem is not None:
            result.problems.append(f"{describe(item.checkpoint, item.origin)}: {problem}")
        else:
            good.append(item)
    good.sort(key=lambda c: (int(c.checkpoint["seq"]), str(c.checkpoint["time"])))
    result.checkpoints = len(good)
    result.good = good
    _check_checkpoint_chain(good, result)
    for item in good:
        _compare(item, report, result)
    if good:
        result.last = good[-1]
        result.covered_to = int(good[-1].checkpoint["seq"])
    if report.ok:
        after = report.last_seq - result.covered_to
        if not good:
            result.notes.append(f"no checkpoint signed by key {', '.join(key_id(k) for k in keys)} was found: "
                                f"nothing proves the trail's {report.records} record(s) complete")
        elif after > 0:
            result.notes.append(f"not checked: {after} record(s) after the last checkpoint "
                                f"(seq {result.covered_to + 1} to {report.last_seq}); they could "
                                f"have been removed or changed without trace")
    else:
        result.notes.append(f"not checked: everything after the break ({report.problem})")
    return result


def _signed_by_any(keys: Sequence[Ed25519PublicKey], cp: dict[str, Any]) -> str | None:
    """None when one of `keys` verifies `cp`, else the first key's complaint."""
    problems = [check_signature(k, cp) for k in keys]
    return None if None in problems else problems[0]


def _check_checkpoint_chain(good: list[Located], result: CheckResult) -> None:
    """Consecutive checkpoints (by seq) must link by `previous_checkpoint_hash`."""
    by_hash = {checkpoint_hash(c.checkpoint): c for c in good}
    for prev, cur in zip(good, good[1:]):
        link = cur.checkpoint.get("previous_checkpoint_hash")
        if link == checkpoint_hash(prev.checkpoint):
            continue
        if link in by_hash:
            continue  # links to an earlier known one (e.g. another node's are interleaved)
        if int(cur.checkpoint["seq"]) == int(prev.checkpoint["seq"]):
            result.problems.append(
                f"{describe(cur.checkpoint, cur.origin)} and {describe(prev.checkpoint, prev.origin)} "
                f"cover the same seq with different contents: the chain was rewritten and "
                f"signed again (two histories)")
        else:
            result.notes.append(f"{describe(cur.checkpoint, cur.origin)} follows a checkpoint "
                                f"not among those given (previous_checkpoint_hash "
                                f"{str(link)[:16]})")


def _compare(item: Located, report: VerifyReport, result: CheckResult) -> None:
    cp = item.checkpoint
    seq = int(cp["seq"])
    name = describe(cp, item.origin)
    for first, last in report.skipped:
        if first <= seq <= last:
            result.problems.append(f"{name}: the trail no longer holds records seq {first} to "
                                   f"{last} (a gap record declares them missing); this "
                                   f"checkpoint covered seq {seq}")
            return
    if seq in report.heads:
        _, prev_hash, where, embedded = report.heads[seq]
        if prev_hash != cp["head_hash"]:
            result.problems.append(f"{name}: record seq {seq - 1} has hash {prev_hash} (as record "
                                   f"seq {seq}, {where}, links it) but the checkpoint signed "
                                   f"{cp['head_hash']}: the trail was rewritten or renumbered "
                                   f"after this checkpoint")
        elif embedded != checkpoint_hash(cp):
            result.problems.append(f"{name}: record seq {seq} ({where}) is not this checkpoint's "
                                   f"own record: the trail was rewritten or renumbered")
        return
    if not report.ok:
        return  # past the break: said once in the notes
    result.problems.append(f"{name}: the trail ends at seq {report.last_seq} but this checkpoint "
                           f"covers records up to seq {seq} (its own record): records seq "
                           f"{report.last_seq + 1} to {seq} were deleted")
