"""The `confguard` command line: argparse subcommands registered by their own modules.

Each command module exposes `register(subparsers) -> None`, which adds its parser and sets
`func=run` with `run(args) -> int`. Adding a command is one line in `COMMAND_MODULES`.

`main` turns any `ConfguardError` into one line on stderr (`confguard: <message>`) and an
exit code, KeyboardInterrupt into 130, and never prints a traceback for bad input.

Exit codes shared by all commands (a command may document more of its own):
    0  success
    1  nothing done because the request was ambiguous (or another refusal the command names)
    2  bad configuration, credentials missing, or bad arguments
    3  no such call / party / target
    4  permission denied (HTTP 403) or credentials refused (HTTP 401 after a fresh token)
    5  API or network failure (5xx, 429 after retries, 409 after retries, no answer)
    130 interrupted (Ctrl-C)
    141 the reader of stdout went away (e.g. `| head`): output stopped quietly
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from daemon.errors import (ApiError, AuditError, AuthError, ConfguardError, ConfigError, ConfigErrors,
                           CredentialsError, ForbiddenError, NotFoundError, ReplayError,
                           TargetError, UnauthorizedError)

# One module per subcommand, in --help order. Add a command by appending its module here.
COMMAND_MODULES: tuple[str, ...] = (
    "daemon.commands.run",       # run
    "daemon.commands.check",     # check
    "daemon.commands.replay",    # replay
    "daemon.commands.demo",      # demo
    "daemon.commands.eject",     # eject
    "daemon.commands.audit",     # audit verify
    "daemon.commands.sandbox",   # sandbox
    "daemon.commands.ruletest",  # test
    "daemon.commands.explain",   # explain
)

EXIT_OK = 0
EXIT_AMBIGUOUS = 1
EXIT_CONFIG = 2
EXIT_NOT_FOUND = 3
EXIT_PERMISSION = 4
EXIT_API = 5
EXIT_INTERRUPTED = 130
#: As a shell reports a process ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141

EPILOG = """exit codes (each command's --help lists its own):
  0    success
  1    nothing done: the request was ambiguous
  2    bad configuration, missing credentials or bad arguments
  3    no such call, party or target
  4    permission denied (403) or credentials refused (401)
  5    API or network failure
  130  interrupted
"""

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def exit_code_for(err: ConfguardError) -> int:
    """The documented exit code for an error (an `exit_code` attribute wins)."""
    explicit = getattr(err, "exit_code", None)
    if isinstance(explicit, int):
        return explicit
    if isinstance(err, (ConfigError, CredentialsError, ReplayError)):
        return EXIT_CONFIG
    if isinstance(err, (TargetError, NotFoundError)):
        return EXIT_NOT_FOUND
    if isinstance(err, (ForbiddenError, UnauthorizedError)):
        return EXIT_PERMISSION
    if isinstance(err, AuthError):
        return EXIT_PERMISSION if err.status in (400, 401) else EXIT_API
    if isinstance(err, ApiError):
        return EXIT_API
    if isinstance(err, AuditError):
        return 1
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="confguard",
        description="Removes one party from a live Genesys Cloud conference when a compliance rule fires.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="log level for messages on stderr (default: warning)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise  # the module exists but one of its imports is missing: a real bug
            # A command module not (yet) in this build must not take every other command
            # down with it; tests/test_eject.py checks that every listed module imports.
            continue
        module.register(subparsers)
    return parser


def configure_cli_logging(level: str) -> None:
    """Logs go to stderr so command output on stdout stays clean."""
    from daemon.service.logs import configure_logging

    configure_logging(level, "console", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `confguard` console script and `python -m daemon`."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
        configure_cli_logging(args.log_level or "warning")
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help(sys.stderr)
            return EXIT_CONFIG
        code = func(args)
        return int(code)
    except KeyboardInterrupt:
        print("confguard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`confguard test ... | head -1`): stop quietly, as cat does.
        # Point stdout at /dev/null so the interpreter's final flush raises nothing either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConfguardError as exc:
        if isinstance(exc, ConfigErrors):
            # Every problem found in one pass, one `FILE:LINE:COL: message` line each.
            for err in exc.errors:
                line = " ".join(str(err).split())
                print(line if err.line is not None else f"confguard: {line}", file=sys.stderr)
            return exit_code_for(exc)
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        if isinstance(exc, ConfigError) and exc.line is not None:
            # Bare `FILE:LINE:COL: message`, as compilers print it, so editors and CI jump to it.
            print(message, file=sys.stderr)
        else:
            print(f"confguard: {message}", file=sys.stderr)
        return exit_code_for(exc)
