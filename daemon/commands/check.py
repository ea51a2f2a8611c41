"""`confguard check`: validate config.yaml before it goes live.

Offline (default): the whole file, every rule (fields, operators, regexes, types), every
list file, placeholders; any problem is printed as `file:line:col: message` and exits 2.

`--online` also proves the configuration against Genesys Cloud: fetches a token, resolves
queue names, creates a notification channel, subscribes every topic with
`ignoreErrors=true`, reports each Rejected topic with its reason and missing permissions,
then removes the subscriptions again (a channel cannot be deleted; unconnected, it
expires by itself and is the first one Genesys retires).

Exit codes: 0 ok, 1 online check found problems (rejected topics), 2 invalid configuration,
4 credentials refused or permission missing, 5 API or network failure.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

from daemon.genesys.api import GenesysClient
from daemon.config import Config, load_config, resolve_credentials
from daemon.errors import ConfigError
from daemon.core.rules import compile_rules
from daemon.genesys.scope import resolve_scope, shard


def summary(config: Config) -> str:
    compile_rules(config)  # raises ConfigError with file:line:col for any rule or list problem
    subs = config.subscriptions
    if not subs.queues and not subs.users:
        # `confguard run` refuses to start on this; check must not call it ok.
        message = ("nothing to subscribe: subscriptions.queues and subscriptions.users are both "
                   "empty; add the queues (ids or names) or users (ids) whose calls confguard watches")
        raise (config.source.error(("subscriptions", "queues"), message, key=True) if config.source
               else ConfigError(message))
    enabled = [r for r in config.rules if r.enabled]
    return (f"ok: {config.source.file if config.source else 'config'}: {len(enabled)} rule(s) enabled "
            f"of {len(config.rules)}, {len(config.lists)} list(s), "
            f"{len(config.subscriptions.queues)} queue(s) and {len(config.subscriptions.users)} user(s) in scope, "
            f"mode {config.mode}, max {config.safety.max_disconnects_per_minute} disconnects/min")


async def online_check(config: Config, out: TextIO) -> int:
    credentials = resolve_credentials(config.genesys)
    async with GenesysClient(config.genesys, credentials) as client:
        await client.tokens.token()
        print(f"ok: token issued by {config.genesys.login_origin}", file=out)
        scope = await resolve_scope(client, config.subscriptions)
        print(f"ok: {len(scope.queue_ids)} queue(s), {len(scope.user_ids)} user(s) -> {len(scope.topics)} topic(s)",
              file=out)
        problems = 0
        for i, topics in enumerate(shard(list(scope.topics))):
            channel = await client.create_channel()
            try:
                await client.put_subscriptions(channel.id, topics, ignore_errors=True)
                states = await client.get_subscriptions(channel.id)
                permitted = {s.id for s in states if s.state == "Permitted"}
                for s in states:
                    if s.state != "Permitted":
                        problems += 1
                        perms = ", ".join(s.missing_permissions) or "none named"
                        print(f"REJECTED: {s.id}: {s.rejection_reason or s.state}; missing permissions: {perms}",
                              file=out)
                for t in topics:
                    if t not in permitted and not any(s.id == t for s in states):
                        problems += 1
                        print(f"REJECTED: {t}: not in the channel's subscriptions after subscribing", file=out)
                print(f"ok: channel {i + 1}: {len(permitted)} of {len(topics)} topic(s) permitted", file=out)
            finally:
                await client.delete_subscriptions(channel.id)
        if problems:
            print(f"FAIL: {problems} topic(s) rejected: compliance coverage would have a gap", file=out)
            return 1
        print("ok: online check passed; subscriptions removed again", file=out)
        return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check", help="validate config.yaml (and with --online, against Genesys Cloud)",
        description="Validate config.yaml offline; --online also checks credentials, queue names and topic permissions.",
        epilog="exit codes: 0 ok, 1 topics rejected, 2 invalid config, 4 credentials or permission refused, 5 API/network failure")
    p.add_argument("--config", default="config.yaml", help="path to config.yaml (default: %(default)s)")
    p.add_argument("--online", action="store_true", help="also check against Genesys Cloud, then clean up")
    p.set_defaults(func=check_command)


def check_command(args: Any, out: TextIO = sys.stdout) -> int:
    # A ConfigError reaches daemon.cli.main, which prints it as bare FILE:LINE:COL: message.
    config = load_config(args.config)
    print(summary(config), file=out)
    if not args.online:
        return 0
    return asyncio.run(online_check(config, out))
