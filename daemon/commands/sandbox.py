"""`confguard sandbox` / `python -m daemon.sandbox`: run the fake Genesys Cloud until
SIGINT/SIGTERM, printing its base URL, client credentials and the ids it created.

`--seed-from config.yaml` also creates what that configuration names: every queue of
`subscriptions.queues` (a name becomes a queue of that name, an id a queue with that id),
every user of `subscriptions.users`, and the queue and user ids the rules compare
`queue_id`/`user_id` with (inline or through a list). It then prints the two lines to set
under `genesys:` and the credentials to export, so the config runs against the sandbox
with nothing else changed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from daemon.config import Config, load_config
from daemon.errors import ConfigError
from daemon.genesys.scope import looks_like_uuid
from daemon.sandbox.world import World
from daemon.service.aws import region_from_queue_url
from daemon.sandbox.scenario import SCENARIOS, load_scenario, ops_reference
from daemon.sandbox.server import Sandbox


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    p.add_argument("--scenario", default="default", choices=SCENARIOS,
                   help="starting world (default: default = 3 queues, 4 users)")
    p.add_argument("--heartbeat", type=float, default=30.0, metavar="S",
                   help="seconds between WebSocket heartbeats (default 30)")
    p.add_argument("--token-lifetime", type=float, default=86400.0, metavar="S",
                   help="access token lifetime in seconds (default 86400)")
    p.add_argument("--budget", type=int, default=300, metavar="N",
                   help="requests per token per sliding 60 s window, then 429 with "
                        "Retry-After and the limit object; 0 = unlimited (default 300, as Genesys)")
    p.add_argument("--legacy-ratelimit-headers", action="store_true",
                   help="count the budget in a fixed 60 s window from the token's first "
                        "request and send inin-ratelimit-* headers on every answer, as Genesys "
                        "did before June 2021 (default: off, as Genesys today)")
    p.add_argument("--eventbridge-queue-url", default=None, metavar="URL", action="append",
                   help="also publish conversation detail events for every change into this SQS "
                        "queue, as Genesys' Amazon EventBridge integration with a rule to SQS "
                        "(AWS credentials: the standard AWS chain); repeat it for a rule with "
                        "several targets (one queue per HA node)")
    p.add_argument("--eventbridge-endpoint-url", default=None, metavar="URL",
                   help="the SQS endpoint (a local one such as moto; default: AWS)")
    p.add_argument("--seed-from", default=None, metavar="CONFIG",
                   help="create the queues (by name, or with the given ids) and users that this "
                        "config.yaml names, and print the api_base_url/login_base_url lines and "
                        "credentials that make it run against the sandbox")
    p.add_argument("--client-id", default=None, help="fixed client id (default: random)")
    p.add_argument("--client-secret", default=None, help="fixed client secret (default: random)")


EPILOG = f"""driver: JSON over HTTP, no authentication (it is the test harness, not Genesys)
  POST {{base}}/sandbox/OPERATION with a JSON object of its fields (? = optional); the
  answer is {{"result": ...}}. GET {{base}}/sandbox/ops describes each, with an example.
  curl -sS -X POST http://127.0.0.1:8080/sandbox/start_call \\
       -H 'Content-Type: application/json' -d '{{"queueId": "<queue id>"}}'

operations:
{ops_reference()}

also: GET /sandbox/state, GET /sandbox/calls/ID, GET|DELETE /sandbox/journal,
GET|POST /sandbox/faults, POST /sandbox/faults/ACTION (reset, drop_sockets,
socket_closing, expire_channel, expire_tokens, revoke_tokens, send_raw).
Reference: docs/sandbox.md
"""


_ID_FIELDS = ("queue_id", "user_id")


def _rule_ids(node: Any, lists: dict[str, list[str]], found: dict[str, set[str]],
              field: str | None = None) -> None:
    """Collect the ids compared with `queue_id`/`user_id` anywhere in a rule's conditions
    (bare values, `equals`, `in`, `in_list`/`not_in_list` through `lists`)."""
    if isinstance(node, dict):
        for key, value in node.items():
            key = str(key)
            if field is not None and key in ("in_list", "not_in_list") and isinstance(value, str):
                found[field].update(lists.get(value, []))
            elif key in _ID_FIELDS:
                _rule_ids(value, lists, found, key)
            else:
                _rule_ids(value, lists, found, field)
    elif isinstance(node, list):
        for item in node:
            _rule_ids(item, lists, found, field)
    elif field is not None and isinstance(node, str) and looks_like_uuid(node):
        found[field].add(node)


def _list_values(config: Config) -> dict[str, list[str]]:
    """The values of each list of the config (inline or from its file; a file that cannot
    be read counts as empty here: `check` reports it)."""
    out: dict[str, list[str]] = {}
    base = Path(config.source.base_dir) if config.source is not None else Path()
    for name, spec in config.lists.items():
        if spec.values is not None:
            out[name] = [str(v) for v in spec.values]
        elif spec.file is not None:
            try:
                text = (base / spec.file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                text = ""
            out[name] = [v for line in text.splitlines() if (v := line.split("#", 1)[0].strip())]
    return out


def seed_world(world: World, config: Config) -> dict[str, list[tuple[str, str]]]:
    """Create in `world` the queues and users `config` names; returns what was created or
    found as {"queues": [(id, name)], "users": [(id, name)]}."""
    out: dict[str, list[tuple[str, str]]] = {"queues": [], "users": []}
    by_name = {q.name.casefold(): q for q in world.queues.values()}
    wanted: dict[str, set[str]] = {"queue_id": set(), "user_id": set()}
    lists = _list_values(config)
    for rule in config.rules:
        _rule_ids(rule.when, lists, wanted)
        _rule_ids(rule.call, lists, wanted)
    queue_ids: list[str] = []
    for raw in config.subscriptions.queues:
        entry = str(raw).strip()
        if not entry:
            continue
        if looks_like_uuid(entry):
            queue_ids.append(entry)
            continue
        q = by_name.get(entry.casefold()) or world.create_queue(entry)
        by_name[q.name.casefold()] = q
        out["queues"].append((q.id, q.name))
    for qid in [*queue_ids, *sorted(wanted["queue_id"] - set(queue_ids))]:
        q = world.queues.get(qid) or world.create_queue(f"Queue {qid[:8]}", qid)
        out["queues"].append((q.id, q.name))
    users = [str(u).strip() for u in config.subscriptions.users]
    for uid in [*users, *sorted(wanted["user_id"] - set(users))]:
        if not looks_like_uuid(uid):
            continue  # check and run refuse it with a clear message; nothing to create
        u = world.users.get(uid) or world.create_user(f"User {uid[:8]}", uid)
        out["users"].append((u.id, u.name))
    return out


def register(subparsers: Any) -> None:
    """Add the `sandbox` subcommand to confguard's argparse subparsers."""
    p = subparsers.add_parser("sandbox", help="run a local fake Genesys Cloud for testing",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


async def serve(args: argparse.Namespace, out: TextIO = sys.stdout,
                stop: asyncio.Event | None = None) -> int:
    if args.heartbeat <= 0 or args.token_lifetime <= 0 or args.budget < 0:
        print("confguard sandbox: --heartbeat and --token-lifetime must be > 0, --budget >= 0",
              file=sys.stderr)
        return 2
    sb = Sandbox(args.host, args.port, heartbeat_interval=args.heartbeat,
                 token_lifetime=args.token_lifetime, request_budget=args.budget or None,
                 client_id=args.client_id, client_secret=args.client_secret,
                 eventbridge_queue_url=args.eventbridge_queue_url,
                 eventbridge_endpoint_url=args.eventbridge_endpoint_url,
                 eventbridge_region=region_from_queue_url((args.eventbridge_queue_url or [""])[0]),
                 legacy_ratelimit_headers=args.legacy_ratelimit_headers)
    summary = load_scenario(sb.world, args.scenario)
    seeded: dict[str, list[tuple[str, str]]] | None = None
    if getattr(args, "seed_from", None):
        try:
            seeded = seed_world(sb.world, load_config(args.seed_from))
        except ConfigError as e:
            print(f"confguard sandbox: --seed-from: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    try:
        await sb.start()
    except OSError as e:
        print(f"confguard sandbox: cannot listen on {args.host}:{args.port}: {e.strerror}",
              file=sys.stderr)
        return 1
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    print(f"api:        {sb.base_url}/api/v2", file=out)
    print(f"login:      {sb.base_url}/oauth/token", file=out)
    print(f"streaming:  {sb.ws_base}/channels/<channelId>", file=out)
    print(f"driver:     {sb.base_url}/sandbox/state", file=out)
    print(f"client id:  {sb.client_id}", file=out)
    print(f"secret:     {sb.client_secret}", file=out)
    for name, qid in summary["queues"].items():
        print(f"queue:      {qid}  {name}", file=out)
    for name, uid in summary["users"].items():
        print(f"user:       {uid}  {name}", file=out)
    for cid in summary["calls"]:
        print(f"call:       {cid}", file=out)
    if sb.eventbridge is not None:
        for url in sb.eventbridge.queue_urls:
            print(f"eventbridge: {url}", file=out)
    if seeded is not None:
        for qid, name in seeded["queues"]:
            print(f"seeded queue: {qid}  {name}", file=out)
        for uid, name in seeded["users"]:
            print(f"seeded user: {uid}  {name}", file=out)
    print("to use it, set under genesys: in config.yaml", file=out)
    print(f"  api_base_url: {sb.base_url}", file=out)
    print(f"  login_base_url: {sb.base_url}", file=out)
    print("and export", file=out)
    print(f"  GENESYSCLOUD_OAUTHCLIENT_ID={sb.client_id}", file=out)
    print(f"  GENESYSCLOUD_OAUTHCLIENT_SECRET={sb.client_secret}", file=out)
    out.flush()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await sb.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.sandbox", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
