"""Benchmark 4: receive + parse throughput, the `genesys-notifications` PyPI client vs.
confguard's StreamManager, on the same sandbox stream.

    .venv/bin/python bench/receive.py [--messages 20000] [--rounds 3] [--json]

The sandbox runs in a SEPARATE process. It pre-builds `--messages` whole-conversation call
events (the World's own serialisation of 1,000 live 4-party calls and their updates, the
same frames as bench/ingest.py) and, on command, queues all of them at once to every open
notification socket, so the receiver, not the sender, sets the pace.

Receivers (in this process, one at a time, same frames, best of `--rounds`):
- genesys-notifications 1.3 (`genesys_notifications.Channel`): its constructor takes the
  channel's `connectUri` as is, so it is pointed at the sandbox without patching the URI.
  Its `__anext__` does not run on Python 3.11 (it passes a bare coroutine to
  `asyncio.wait`: TypeError); `py311_channel()` is that method verbatim with the one call
  wrapped in a task. Setup:
  the channel is created and subscribed over REST (POST /api/v2/notifications/channels, PUT
  .../subscriptions), then `Channel(connectUri, topics)` is awaited (it connects and sends
  its WebSocket "subscribe" message, which the sandbox also answers) and consumed with
  `async for message in channel` (its receive loop: websockets recv + ujson.loads + its
  message match). Its logger is set to WARNING so logging does not count.
- confguard: `daemon.stream.StreamManager` with a real `GenesysClient` (it creates its
  own channel), `on_message` calling `daemon.events.parse_message` on every frame.
- For context, a bare `websockets` recv loop without any parsing on a third channel: the
  ceiling the sandbox's sender and the socket allow on this machine.
Messages/s = (messages - 1) / (time of last - time of first message received).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def sandbox_process(conn: Connection, n_messages: int) -> None:
    _common.run_quietly(_sandbox_main, conn, n_messages)


async def _sandbox_main(conn: Connection, n_messages: int) -> None:
    import ingest

    from daemon.sandbox import Sandbox

    frames = [raw for raw, _ in ingest.make_stream(1000, n_messages)]
    sb = Sandbox(heartbeat_interval=30.0)
    await sb.start()
    q = sb.world.create_queue("Customer Service")
    conn.send(_common.sandbox_hello(sb, topic=f"v2.routing.queues.{q.id}.conversations.calls",
                                    avg_bytes=round(sum(map(len, frames)) / len(frames))))
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd["op"] == "blast":
            n = 0
            for f in frames:
                n = sb.send_raw(f)
            conn.send(n)
        else:
            await sb.stop()
            conn.send(True)
            return


async def _subscribed_channel(http: Any, info: dict[str, Any]) -> str:
    """Over REST with the `httpx.AsyncClient` `http`: a token (client credentials), a new
    notification channel (POST /api/v2/notifications/channels) subscribed to the queue's
    topic (PUT .../subscriptions). Returns the channel's `connectUri` (a ws:// URL)."""
    r = await http.post(info["base"] + "/oauth/token", data={"grant_type": "client_credentials"},
                        auth=(info["client_id"], info["secret"]))
    r.raise_for_status()
    h = {"Authorization": f"Bearer {r.json()['access_token']}"}
    ch = (await http.post(info["base"] + "/api/v2/notifications/channels", headers=h)).json()
    r = await http.put(info["base"] + f"/api/v2/notifications/channels/{ch['id']}/subscriptions",
                       headers=h, json=[{"id": info["topic"]}])
    r.raise_for_status()
    return str(ch["connectUri"])


def py311_channel() -> Any:
    """genesys_notifications 1.3's `Channel.__anext__` calls `asyncio.wait()` with a bare
    `recv()` coroutine, which Python 3.11 forbids (TypeError). This subclass is its
    `__anext__` verbatim except that one call, which wraps `recv()` in a task
    (`asyncio.ensure_future`), the minimal change for it to run at all; the rest of its
    receive loop (websockets recv, ujson.loads, `process()`'s message match) is the library's."""
    import ujson
    from genesys_notifications import Channel  # type: ignore[import-untyped]
    from genesys_notifications.exceptions import (  # type: ignore[import-untyped]
        REASON, ChannelExpiring, ReceiveFailure, RecoveryFailure)
    from websockets.exceptions import WebSocketException

    class Py311Channel(Channel):  # type: ignore[misc]
        async def __anext__(self) -> Any:
            notification = None
            while not notification:
                (done, _) = await asyncio.wait((self._expiretrigger, asyncio.ensure_future(self._connection.recv())),
                                               return_when=asyncio.FIRST_COMPLETED)
                if self._expiretrigger in done:
                    _.pop().cancel()
                    self._logger.warning("managed expiry triggered")
                    if self._autoextend:
                        await self.extend()
                        continue
                    raise ChannelExpiring(REASON.ChannelExpired)
                try:
                    data = done.pop().result()
                except WebSocketException as exc:
                    self._logger.error("unexpected connection failure: %s", type(exc).__name__)
                    if self._reconnect:
                        try:
                            await self.reconnect()
                        except WebSocketException as exc2:
                            raise RecoveryFailure(reason=REASON.Ambiguous, original=exc2) from exc2
                        continue
                else:
                    try:
                        message = ujson.loads(data)
                    except ValueError:
                        raise ReceiveFailure(reason=REASON.InvalidMessage) from None
                    notification = self.process(message)
            return notification

    return Py311Channel


async def run_library(remote: _common.SandboxProcess, info: dict[str, Any], n: int) -> float:
    import httpx

    Channel = py311_channel()

    logger = logging.getLogger("bench.genesys_notifications")
    logger.setLevel(logging.WARNING)
    async with httpx.AsyncClient() as http:
        uri = await _subscribed_channel(http, info)
        channel = Channel(uri, [info["topic"]], logger=logger)
        await channel
        # Its own subscribe message is answered with a "subscribed" reply it filters out;
        # give it a moment so that reply is not in the timed window.
        await asyncio.sleep(0.5)
        sockets = await remote.ask({"op": "blast"})
        assert sockets == 1, sockets
        first = last = 0.0
        count = 0
        async for _message in channel:
            last = time.perf_counter()
            if count == 0:
                first = last
            count += 1
            if count >= n:
                break
        channel._expiretrigger.cancel()
        await channel.close()
    return (count - 1) / (last - first)


async def run_baseline(remote: _common.SandboxProcess, info: dict[str, Any], n: int) -> float:
    """A bare `websockets` recv loop, no parsing: the ceiling the sender and socket allow."""
    import httpx
    import websockets

    async with httpx.AsyncClient() as http:
        uri = await _subscribed_channel(http, info)
        async with websockets.connect(uri, max_size=None) as ws:
            sockets = await remote.ask({"op": "blast"})
            assert sockets == 1, sockets
            first = time.perf_counter()
            await ws.recv()
            first = time.perf_counter()
            for _ in range(n - 1):
                await ws.recv()
            last = time.perf_counter()
    return (n - 1) / (last - first)


async def run_confguard(remote: _common.SandboxProcess, info: dict[str, Any], n: int) -> float:
    from daemon.genesys.api import GenesysClient
    from daemon.config import Credentials, GenesysSettings
    from daemon.core.events import Message, parse_message
    from daemon.genesys.stream import StreamManager

    settings = GenesysSettings(api_base_url=info["base"], login_base_url=info["base"])
    client = GenesysClient(settings, Credentials(info["client_id"], info["secret"]))
    times: list[float] = []
    done = asyncio.Event()
    count = [0]

    def on_message(raw: bytes | str, received_at: float) -> Message:
        msg = parse_message(raw)  # the consumer's one parse; the stream reads control from it
        count[0] += 1
        if count[0] == 1 or count[0] >= n:
            times.append(time.perf_counter())
            if count[0] >= n:
                done.set()
        return msg

    stream = StreamManager(client, [info["topic"]], on_message=on_message, on_gap=lambda reason: None)
    await stream.start()
    task = asyncio.create_task(stream.run())
    try:
        await asyncio.sleep(0.5)
        count[0] = 0
        times.clear()
        sockets = await remote.ask({"op": "blast"})
        assert sockets == 1, sockets
        await asyncio.wait_for(done.wait(), 300.0)
    finally:
        await stream.stop()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
    return (n - 1) / (times[-1] - times[0])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from daemon.service.logs import configure_logging

    configure_logging("warning", "json", stream=open(os.devnull, "w"))  # noqa: SIM115
    out: dict[str, Any] = {"bench": "receive", "messages": args.messages, "rounds": args.rounds}
    async with _common.SandboxProcess(sandbox_process, args.messages, start_timeout=120.0,
                                      join_timeout=10.0) as remote:
        info = remote.info
        out["avg_frame_bytes"] = info["avg_bytes"]
        lib: list[float] = []
        ours: list[float] = []
        base: list[float] = []
        loads: list[str] = []
        for _ in range(args.rounds):
            loads.append(_common.load())
            lib.append(await run_library(remote, info, args.messages))
            ours.append(await run_confguard(remote, info, args.messages))
            base.append(await run_baseline(remote, info, args.messages))
        out.update({"genesys_notifications_msgs_per_s": round(max(lib)),
                    "confguard_msgs_per_s": round(max(ours)),
                    "all_genesys_notifications": [round(x) for x in lib],
                    "all_confguard": [round(x) for x in ours],
                    "ceiling_bare_websockets_recv_msgs_per_s": round(max(base)),
                    "ratio": round(max(ours) / max(lib), 2), "load": loads})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(r))
        return
    print(f"receive + parse, {r['messages']} frames (avg {r['avg_frame_bytes']} B), best of {r['rounds']}: "
          f"genesys-notifications {r['genesys_notifications_msgs_per_s']:,} msg/s, "
          f"confguard StreamManager {r['confguard_msgs_per_s']:,} msg/s (x{r['ratio']}); "
          f"all: {r['all_genesys_notifications']} / {r['all_confguard']}; ceiling (bare websockets recv, "
          f"no parse) {r['ceiling_bare_websockets_recv_msgs_per_s']:,} msg/s; load {r['load']}")


if __name__ == "__main__":
    main()
