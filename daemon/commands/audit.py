"""`confguard audit verify PATH...`: check the hash chain of audit files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daemon.errors import AuditError
from daemon.service.audit import verify


def register(subparsers: Any) -> None:
    """Add `audit verify PATH...` to an argparse subparsers object. The parser's
    `func(args) -> int` gives the exit status: 0 intact, 1 broken, 2 unreadable input."""
    audit = subparsers.add_parser("audit", help="audit trail tools")
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    v = sub.add_parser("verify", help="check the hash chain of audit files",
                       description="Check that audit records are intact and linked. PATH may be "
                                   "a file or a folder (all its audit files, oldest first). "
                                   "Exit 0: intact; 1: broken (first break as file:line); "
                                   "2: unreadable input.")
    v.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    v.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    """`confguard audit verify` body; prints one line."""
    try:
        report = verify(list(args.paths))
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if report.ok:
        print(f"ok: {report.records} records in {report.files} files, chain intact")
        return 0
    print(f"broken: {report.problem}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (`python -m daemon.commands.audit verify PATH...`)."""
    parser = argparse.ArgumentParser(prog="confguard")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(["audit", *(sys.argv[1:] if argv is None else argv)])
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
