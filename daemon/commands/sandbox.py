"""`confguard sandbox` / `python -m daemon.sandbox`: run the fake Genesys Cloud until
SIGINT/SIGTERM, printing its base URL, client credentials and the ids it created."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any, TextIO

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
                   help="requests per token per fixed 60 s window from its first request, "
                        "advertised in inin-ratelimit-* headers; 0 = unlimited, no headers "
                        "(default 300, as Genesys)")
    p.add_argument("--eventbridge-queue-url", default=None, metavar="URL",
                   help="also publish conversation detail events for every change into this SQS "
                        "queue, as Genesys' Amazon EventBridge integration with a rule to SQS "
                        "(AWS credentials: the standard AWS chain)")
    p.add_argument("--eventbridge-endpoint-url", default=None, metavar="URL",
                   help="the SQS endpoint (a local one such as moto; default: AWS)")
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
                 eventbridge_region=region_from_queue_url(args.eventbridge_queue_url or ""))
    summary = load_scenario(sb.world, args.scenario)
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
        print(f"eventbridge: {sb.eventbridge.queue_url}", file=out)
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
