"""`confguard audit verify|keygen|report`: check the trail (and its signed checkpoints),
make a signing key pair, report on the trail for compliance officers (docs/audit.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.errors import AuditError
from daemon.service.audit import verify

if TYPE_CHECKING:
    from daemon.service.audit_check import Located

VERIFY_HELP = ("Check that audit records are intact and linked. PATH may be a file or a folder "
               "(all its audit files, oldest first). With --public-key, every checkpoint "
               "(the trail's own and those given with --checkpoints) must carry a valid "
               "signature, and the trail must hold every record up to the last checkpoint. "
               "Exit 0: intact; 1: broken, a checkpoint contradicted or badly signed, or "
               "records declared missing (gap); 2: unreadable input; 3: intact, but a torn "
               "record was quarantined at start-up (a declared loss of one incomplete write).")


def register(subparsers: Any) -> None:
    """Add `audit verify|keygen|report` to an argparse subparsers object. The parser's
    `func(args) -> int` gives the exit status (each command's help says which)."""
    audit = subparsers.add_parser("audit", help="audit trail tools")
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    v = sub.add_parser("verify", help="check the hash chain and the signed checkpoints",
                       description=VERIFY_HELP)
    v.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    v.add_argument("--public-key", type=Path, action="append", metavar="FILE",
                   help="PEM Ed25519 public key (confguard audit keygen) checking the checkpoints; "
                        "repeat it for a period across a key rotation")
    v.add_argument("--checkpoints", action="append", default=[], metavar="FILE|postgres://...|s3://bucket/prefix",
                   help="checkpoints kept off the host: the daemon's exported log lines, the HA "
                        "database, or an S3 bucket/prefix (repeatable)")
    v.add_argument("--node", help="only checkpoints of this node (default: the trail's own)")
    v.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (default: AWS; the AWS "
                   "chain's AWS_ENDPOINT_URL_S3 also works)")
    v.add_argument("--s3-region", default=None, help="S3 region (default: the AWS chain's)")
    v.set_defaults(func=run_verify)
    k = sub.add_parser("keygen", help="write an Ed25519 key pair for signing checkpoints",
                       description="Write a new Ed25519 key pair as PEM: PRIVATE_KEY_FILE "
                                   "(mode 0600; give it to the daemon as audit.signing_key_file "
                                   "or the systemd credential audit_signing_key) and "
                                   "PUBLIC_KEY_FILE (for `audit verify --public-key`). Existing "
                                   "files are never overwritten. Exit 0: written; 2: error.")
    k.add_argument("private_key", type=Path, metavar="PRIVATE_KEY_FILE")
    k.add_argument("public_key", type=Path, metavar="PUBLIC_KEY_FILE")
    k.set_defaults(func=run_keygen)
    r = sub.add_parser("report", help="a report of the trail for compliance officers",
                       description="Removals per rule and per day, time from decision to confirmed "
                                   "removal, every suppressed/failed/unknown outcome, who asked "
                                   "(rule or control-API caller), and which checkpoints cover "
                                   "the period. HTML is one self-contained printable file (inline "
                                   "SVG charts, no script). Exit 0: written; 2: unreadable input "
                                   "or bad arguments.")
    r.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    r.add_argument("--since", metavar="WHEN", help="first moment (a date such as 2026-12-01 = "
                   "midnight UTC, or an ISO-8601 time); default: the first record")
    r.add_argument("--until", metavar="WHEN", help="end of the period, exclusive (same forms); "
                   "default: after the last record")
    r.add_argument("--format", required=True, choices=("html", "csv", "json"),
                   help="html (the report), csv (one row per decision), json (all of it)")
    r.add_argument("--out", type=Path, metavar="FILE", help="write here (default: stdout)")
    r.add_argument("--public-key", type=Path, action="append", metavar="FILE",
                   help="check the checkpoints' signatures (as audit verify)")
    r.add_argument("--checkpoints", action="append", default=[], metavar="SRC",
                   help="checkpoints kept off the host (as audit verify; repeatable)")
    r.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint for s3:// checkpoints")
    r.add_argument("--s3-region", default=None, help="S3 region for s3:// checkpoints")
    r.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """`confguard audit report` body."""
    from daemon.service.audit_report import build_report, coverage_from_check, parse_when, to_csv, to_html, to_json

    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except ValueError as exc:
        return _fail(str(exc))
    if since is not None and until is not None and until <= since:
        return _fail("--until must be after --since")
    if args.checkpoints and args.public_key is None:
        return _fail("--checkpoints needs --public-key")
    try:
        verification = None
        if args.public_key is not None:
            from daemon.service.audit_check import check
            from daemon.service.checkpoint import load_public_key

            external = _outside_checkpoints(args)
            result = check(list(args.paths), [load_public_key(k) for k in args.public_key], external)
            verification = coverage_from_check(result, since, until)
        report = build_report(list(args.paths), since=since, until=until, verification=verification)
    except AuditError as exc:
        return _fail(str(exc))
    data = {"html": to_html, "csv": to_csv, "json": to_json}[args.format](report)
    if args.out is None:
        sys.stdout.write(data.decode())
        return 0
    try:
        args.out.write_bytes(data)
    except OSError as exc:
        return _fail(f"cannot write {args.out}: {exc.strerror or exc}")
    print(f"wrote {args.out}: {report.decisions} decisions, {report.removals} removals")
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    from daemon.service.checkpoint import generate_keypair

    try:
        kid = generate_keypair(args.private_key, args.public_key)
    except AuditError as exc:
        return _fail(str(exc))
    print(f"wrote {args.private_key} (private, mode 0600) and {args.public_key} (public); key id {kid}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """`confguard audit verify` body; prints what was checked and what could not be."""
    if args.public_key is None:
        if args.checkpoints:
            return _fail("--checkpoints needs --public-key (checkpoints are trusted only by their "
                         "signature)")
        return _verify_chain_only(args)
    from daemon.service.audit_check import check, describe
    from daemon.service.checkpoint import key_id, load_public_key

    try:
        public = [load_public_key(k) for k in args.public_key]
        external = _outside_checkpoints(args)
        result = check(list(args.paths), public, external, node=args.node)
    except AuditError as exc:
        return _fail(str(exc))
    report = result.report
    if report.ok:
        print(f"chain: {report.records} records in {report.files} files, seq 1 to "
              f"{report.last_seq}, linked")
    else:
        print(f"broken: {report.problem}")
    for gap in report.gaps:
        print(f"gap: {gap}")
    print(f"checkpoints: {result.checkpoints} with a valid signature by key "
          f"{', '.join(key_id(k) for k in public)} "
          f"({len(external)} read from {len(args.checkpoints)} outside source(s))")
    if result.last is not None and not result.problems:
        print(f"covered: the trail holds every record up to seq {result.covered_to}, as "
              f"{describe(result.last.checkpoint, result.last.origin)} signed")
    for problem in result.problems:
        print(f"contradicted: {problem}")
    for note in result.notes:
        print(f"note: {note}")
    status = result.status
    print({0: "ok", 1: "FAILED", 3: "ok with a declared gap (quarantined torn record)"}[status])
    return status


def _verify_chain_only(args: argparse.Namespace) -> int:
    try:
        report = verify(list(args.paths))
    except AuditError as exc:
        return _fail(str(exc))
    if not report.ok:
        print(f"broken: {report.problem}")
        return 1
    for gap in report.gaps:
        print(f"gap: {gap}")
    if report.skipped:
        print(f"broken: {report.records} records in {report.files} files linked, but records "
              f"were declared missing")
        return 1
    print(f"ok: {report.records} records in {report.files} files, chain intact"
          + (" (with a quarantined torn record)" if report.truncated else ""))
    return 3 if report.truncated else 0


def _outside_checkpoints(args: argparse.Namespace) -> list[Located]:
    """The checkpoints read from every `--checkpoints` source, in the order given (s3:// ones
    with `--s3-region` and `--s3-endpoint-url`); raises AuditError for one unreadable."""
    from daemon.service.audit_check import load_checkpoints

    external: list[Located] = []
    for spec in args.checkpoints:
        external.extend(load_checkpoints(spec, region=args.s3_region, endpoint_url=args.s3_endpoint_url))
    return external


def _fail(message: str) -> int:
    """Print `error: <message>` on stderr; returns the exit status of an error, 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (`python -m daemon.commands.audit verify|keygen|report ...`)."""
    parser = argparse.ArgumentParser(prog="confguard")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(["audit", *(sys.argv[1:] if argv is None else argv)])
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
