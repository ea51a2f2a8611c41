"""`confguard eject`: remove one party from a live call by hand, leaving the others connected.

    confguard eject [--config config.yaml] --conversation ID
                    (--participant ID | --user ID | --external-contact ID |
                     --address NUMBER | --name TEXT) [--dry-run]
                    [--control URL --token-file FILE [--reason TEXT]]

With `--control`, the removal goes through a running daemon's control API instead (see
`daemon.commands.eject_control`); the exit codes are the same.

Flow: GET the call, print its parties, resolve exactly one live target, then
`PATCH /api/v2/conversations/calls/{conversationId}/participants/{participantId}` with
`{"state": "disconnected"}` (the one call that removes a single party; there is no
"conferences" resource and no REMOVE action), then re-read the call (for up to ~5 s) until
the target shows disconnected, and report who is still connected.

Target selectors: `--participant` (participant id), `--user` (user id), `--external-contact`
(external contact id), `--address` (matches address, ani or dnis after phone normalisation,
so `tel:+44 20 7946 0000` equals `+442079460000`), `--name` (case-insensitive exact).

Exit codes:
    0  done: the party was removed and confirmed gone, or it had already left
    1  ambiguous: several live parties match; nothing was done
    2  bad configuration or arguments (including missing credentials)
    3  no such call or party
    4  permission denied (403; the message names the missing permission) or the
       credentials were refused (401 even after a fresh token)
    5  API or network failure (5xx, 429 or 409 after retries, no answer)
    6  the removal was accepted but not confirmed within ~5 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx
import structlog

from daemon.genesys.api import ROUTE_PARTICIPANT, GenesysClient
from daemon.config import Config, Credentials, load_config, resolve_credentials
from daemon.errors import (ApiError, ConfigError, ForbiddenError, NotFoundError, TargetError)
from daemon.core.ids import is_uuid
from daemon.core.parties import (Resolution, Selector, is_live, participants_of,
                                  resolve_target)
from daemon.genesys.ratelimit import Priority

log = structlog.get_logger(__name__)

EXIT_DONE = 0
EXIT_AMBIGUOUS = 1
EXIT_CONFIG = 2
EXIT_NOT_FOUND = 3
EXIT_PERMISSION = 4
EXIT_API = 5
EXIT_UNCONFIRMED = 6

CONFIRM_SECONDS = 5.0
CONFIRM_INTERVAL = 0.5
DISCONNECT_PERMISSION = "conversation:communication:disconnect"

EPILOG = """exit codes:
  0  done: removed and confirmed gone, or the party had already left
  1  ambiguous: several live parties match; nothing was done
  2  bad configuration or arguments (including missing credentials)
  3  no such call or party
  4  permission denied (403, names the missing permission) or credentials refused (401)
  5  API or network failure (5xx, 429/409 after retries, no answer)
  6  removal accepted but not confirmed within ~5 s

The request sent is PATCH /api/v2/conversations/calls/{conversationId}/participants/
{participantId} with {"state": "disconnected"}; the OAuth client's role needs
conversation:communication:disconnect.
"""

def party_table(parties: Sequence[Mapping[str, Any]]) -> str:
    """An aligned text table: participant id, purpose, name, address, user, state."""
    header = ("PARTICIPANT", "PURPOSE", "NAME", "ADDRESS", "USER", "STATE")
    rows: list[tuple[str, ...]] = [header]
    for p in parties:
        user = p.get("user")
        user_text = ""
        if isinstance(user, dict):
            user_text = _s(user.get("name")) or _s(user.get("id")) or ""
        address = _s(p.get("address")) or _s(p.get("ani")) or _s(p.get("dnis")) or ""
        rows.append(tuple(_clean(x) for x in (
            _s(p.get("id")) or "", _s(p.get("purpose")) or "", _s(p.get("name")) or "",
            address, user_text, _s(p.get("state")) or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _s(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _ref_id(v: object) -> str | None:
    return _s(v.get("id")) if isinstance(v, dict) else None


def _clean(text: str) -> str:
    # API text goes to a terminal: no control characters, bounded width.
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= 60 else text[:57] + "..."


def _label(p: Mapping[str, Any]) -> str:
    bits = [_s(p.get("id")) or "?"]
    extra = [x for x in (_s(p.get("purpose")), _s(p.get("name"))) if x]
    if extra:
        bits.append(f"({', '.join(_clean(x) for x in extra)})")
    return " ".join(bits)


# ---------------------------------------------------------------- command line


def register(subparsers: Any) -> None:
    """Add the `eject` subcommand (see the module docstring)."""
    p = subparsers.add_parser(
        "eject", help="remove one party from a live call, leaving the others connected",
        description="Remove one party from a live Genesys Cloud call (e.g. a conference), "
                    "leaving the other parties connected.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="PATH",
                   help="config file (default: ./config.yaml if it exists, else built-in "
                        "defaults with the region from GENESYSCLOUD_REGION)")
    p.add_argument("--conversation", required=True, metavar="ID", help="the call's conversation id")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--participant", metavar="ID", help="participant id")
    target.add_argument("--user", metavar="ID", help="user id of an agent/user party")
    target.add_argument("--external-contact", metavar="ID", help="external contact id")
    target.add_argument("--address", metavar="NUMBER",
                        help="phone number or address (matches address, ani, dnis; any format)")
    target.add_argument("--name", metavar="TEXT", help="party name (case-insensitive, exact)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the request that would be sent and stop")
    p.add_argument("--control", metavar="URL",
                   help="send the removal through a running daemon's control API (e.g. "
                        "http://127.0.0.1:9465) instead of to Genesys; needs --token-file")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the control API bearer token (with --control)")
    p.add_argument("--reason", metavar="TEXT",
                   help="why (with --control: written to the daemon's audit trail)")
    p.set_defaults(func=run)


def uuid_arg(flag: str, value: object) -> str:
    """`value` stripped, when it is a Genesys id (a UUID); else ConfigError (exit 2) before
    anything is sent: no value may reach a URL unchecked (`daemon.core.ids`)."""
    text = str(value).strip()
    if not text:
        raise ConfigError(f"--{flag} must not be empty")
    if not is_uuid(text):
        raise ConfigError(f"--{flag} {text[:60]!r} is not a Genesys id (a UUID such as "
                          f"3fa85f64-5717-4562-b3fc-2c963f66afa6)")
    return text


#: Selectors whose value is a Genesys id (a UUID).
ID_SELECTORS = ("participant", "user", "external_contact")


def selector_from_args(args: argparse.Namespace) -> Selector:
    for kind in ("participant", "user", "external_contact", "address", "name"):
        value = getattr(args, kind, None)
        if value is not None:
            flag = kind.replace('_', '-')
            if not str(value).strip():
                raise ConfigError(f"--{flag} must not be empty")
            if kind in ID_SELECTORS:
                return Selector(kind, uuid_arg(flag, value))
            return Selector(kind, str(value))
    raise ConfigError("name the party with one of --participant, --user, --external-contact, "
                      "--address or --name")


def load_settings(path: str | None) -> Config:
    """--config, else ./config.yaml when present, else built-in defaults."""
    if path is not None:
        return load_config(path)
    default = Path("config.yaml")
    if default.is_file():
        return load_config(default)
    return Config()


def run(args: argparse.Namespace) -> int:
    """`confguard eject`: see the module docstring for the flow and exit codes."""
    conversation = uuid_arg("conversation", args.conversation)
    selector = selector_from_args(args)
    if args.control or args.token_file:
        from daemon.commands import eject_control as ec
        if not (args.control and args.token_file):
            raise ConfigError("--control and --token-file go together")
        body = ec.request_body(conversation, selector.kind, selector.value, args.reason)
        return asyncio.run(ec.eject_via_control(args.control, ec.read_token(args.token_file),
                                                body, dry_run=bool(args.dry_run)))
    cfg = load_settings(args.config)
    creds = resolve_credentials(cfg.genesys, base_dir=cfg.base_dir)
    return asyncio.run(eject(cfg, creds, conversation, selector, dry_run=bool(args.dry_run)))


async def eject(cfg: Config, creds: Credentials, conversation: str, selector: Selector, *,
                dry_run: bool = False, out: IO[str] | None = None,
                transport: httpx.AsyncBaseTransport | None = None) -> int:
    """Resolve and remove one party. Prints progress to `out` (stdout by default); raises
    ConfguardError subclasses for failures that `cli.main` turns into one line + exit code."""
    stream = out if out is not None else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    async with GenesysClient(cfg.genesys, creds, transport=transport) as client:
        try:
            call = await client.get_call(conversation, priority=Priority.ENFORCE)
        except NotFoundError as exc:
            raise NotFoundError(
                f"conversation {conversation} was not found: the call has ended, the id is "
                f"wrong, or it is in a division this OAuth client cannot see",
                status=404, correlation_id=exc.correlation_id) from None
        except ForbiddenError as exc:
            raise _forbidden(exc, "read the call") from None

        parties = participants_of(call)
        say(f"conversation {conversation}: {len(parties)} parties")
        say(party_table(parties))
        say()

        res = resolve_target(call, selector)
        if res.outcome == "none":
            raise TargetError(f"no party of conversation {conversation} matches "
                              f"{selector.describe()}")
        if res.outcome == "ambiguous":
            say(f"{len(res.live)} live parties match {selector.describe()}; nothing done. "
                f"Pick one with --participant:")
            for p in res.live:
                say(f"  {_label(p)}")
            print(f"confguard: {len(res.live)} live parties match {selector.describe()}; "
                  f"use --participant ID", file=sys.stderr)
            return EXIT_AMBIGUOUS
        if res.outcome == "gone":
            p = res.matches[-1]
            say(f"{_label(p)} has already left the call (state {_s(p.get('state'))}); nothing to do")
            return EXIT_DONE

        target = res.target
        assert target is not None
        pid = str(target["id"])
        path = ROUTE_PARTICIPANT.format(conversationId=quote(conversation, safe=""),
                                        participantId=quote(pid, safe=""))
        if dry_run:
            say("dry run: would send")
            say(f"  PATCH {client.api_origin}{path}")
            say("  Content-Type: application/json")
            say(f"  {json.dumps({'state': 'disconnected'})}")
            return EXIT_DONE

        say(f"removing {_label(target)} ...")
        try:
            await client.disconnect_participant(conversation, pid, retry_conflict=3)
        except ForbiddenError as exc:
            raise _forbidden(exc, "remove the party") from None
        except NotFoundError as exc:
            raise NotFoundError(
                f"participant {pid} or conversation {conversation} is gone (HTTP 404): the "
                f"party or the call ended before the request arrived",
                status=404, correlation_id=exc.correlation_id) from None
        log.info("eject_sent", conversation_id=conversation, participant_id=pid)

        return await _confirm(client, conversation, pid, say)


async def _confirm(client: GenesysClient, conversation: str, pid: str,
                   say: Callable[[str], None]) -> int:
    """Re-read the call until the target shows a final state (up to CONFIRM_SECONDS)."""
    deadline = time.monotonic() + CONFIRM_SECONDS
    last: dict[str, Any] | None = None
    for _ in range(int(CONFIRM_SECONDS / CONFIRM_INTERVAL) + 2):
        try:
            last = await client.get_call(conversation, priority=Priority.ENFORCE)
        except NotFoundError:
            say(f"removed {pid}; the conversation is no longer found (the call has ended)")
            return EXIT_DONE
        except ApiError as exc:
            log.warning("eject_confirm_read_failed", error=str(exc))
            last = None
        if last is not None:
            mine = [p for p in participants_of(last) if p.get("id") == pid]
            if not mine or not is_live(mine[-1]):
                others = [p for p in participants_of(last)
                          if p.get("id") != pid and is_live(p)]
                say(f"removed {pid} (state {_s(mine[-1].get('state')) if mine else 'gone'})")
                if others:
                    say("still on the call:")
                    for p in others:
                        say(f"  {_label(p)} [{_s(p.get('state')) or '?'}]")
                else:
                    say("no other party is still on the call")
                return EXIT_DONE
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(CONFIRM_INTERVAL)
    say(f"the removal of {pid} was accepted, but the call still shows it live after "
        f"{CONFIRM_SECONDS:.0f} s")
    print(f"confguard: removal of {pid} accepted but not confirmed within "
          f"{CONFIRM_SECONDS:.0f} s; check the call", file=sys.stderr)
    return EXIT_UNCONFIRMED


def _forbidden(exc: ForbiddenError, what: str) -> ForbiddenError:
    missing = exc.missing_permissions
    if missing:
        need = f"the OAuth client's role lacks {', '.join(missing)}"
    else:
        need = f"the OAuth client's role needs {DISCONNECT_PERMISSION} (Genesys said: {exc.message})"
    return ForbiddenError(f"permission denied: cannot {what}: {need}", status=403,
                          correlation_id=exc.correlation_id, details=exc.details)


__all__ = ["Selector", "Resolution", "resolve_target", "party_table", "register", "run", "eject"]
