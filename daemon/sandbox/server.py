"""`Sandbox`: a local fake of Genesys Cloud on 127.0.0.1 (OAuth, REST, notification
WebSockets, scenario driver, fault injection), on aiohttp.

    sb = Sandbox(heartbeat_interval=1.0)
    await sb.start()                  # binds 127.0.0.1:<ephemeral>
    q = sb.world.create_queue("Sales"); conv = sb.world.start_call(q.id)
    ...
    await sb.stop()

or from synchronous code / another thread: `with Sandbox().run_in_thread() as sb: ...`
(then drive it over HTTP, or with `sb.call(fn, *args)` which runs `fn` on the sandbox loop).

Every change to a call publishes the whole conversation to its queue and user topics, to
every channel subscribed to them that has an open socket; nobody listening -> event gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import WSMsgType, web

from daemon.sandbox.app import build_app
from daemon.sandbox.eventbridge import EventBridgePublisher
from daemon.sandbox.faults import Faults
from daemon.sandbox.journal import Journal
from daemon.sandbox.wire import EXTRA_PREFIX, Conn, _Close, _message, gone_message, metadata_message
from daemon.sandbox.world import Conversation, World

log = structlog.get_logger(__name__)
T = TypeVar("T")

class Sandbox:
    """A fake Genesys Cloud org. See the module docstring.

    Args: `heartbeat_interval` seconds between channel.metadata heartbeats;
    `token_lifetime` seconds (the OAuth client's accessTokenValiditySeconds);
    `channel_lifetime` seconds (24 h); `closing_grace` seconds between
    v2.system.socket_closing and the close; `patch_final_status` what PATCH on an
    already-disconnected party answers (202: idempotent no-op, the default; or e.g. 400);
    `request_budget` requests per token per sliding 60 s window, 429 past it with today's
    body (None: unlimited; Genesys' default is 300); `legacy_ratelimit_headers` counts a
    fixed window from the token's first request instead and advertises it in
    `inin-ratelimit-*` headers on every /api/v2 answer, as Genesys did before 2021;
    `reap_interval` seconds between checks for expired channels and tokens;
    `eventbridge_queue_url` (one URL, or several: a rule with several targets; with
    `eventbridge_endpoint_url`, None: AWS itself, and
    `eventbridge_region`; `eventbridge_kinds`: only these detail kinds, as the
    integration's topic filter): also publish every change's conversation detail events into
    that SQS queue, as Genesys' EventBridge integration and a rule to SQS would
    (`daemon.sandbox.eventbridge`; `self.eventbridge` is the publisher, else None).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 heartbeat_interval: float = 30.0, token_lifetime: float = 86400.0,
                 channel_lifetime: float = 86400.0, closing_grace: float = 60.0,
                 patch_final_status: int = 202, request_budget: int | None = None,
                 client_id: str | None = None, client_secret: str | None = None,
                 reap_interval: float = 0.1, extra_field: bool = True,
                 seed: int | None = None, eventbridge_queue_url: str | Sequence[str] | None = None,
                 eventbridge_endpoint_url: str | None = None,
                 eventbridge_region: str | None = None,
                 eventbridge_kinds: Collection[str] | None = None,
                 legacy_ratelimit_headers: bool = False) -> None:
        self.host = host
        self.port = port
        self.heartbeat_interval = heartbeat_interval
        self.closing_grace = closing_grace
        self.patch_final_status = patch_final_status
        self.reap_interval = reap_interval
        self.world = World(token_lifetime=token_lifetime, channel_lifetime=channel_lifetime)
        self.faults = Faults(seed=seed, budget_per_minute=request_budget,
                             extra_field=extra_field, legacy_headers=legacy_ratelimit_headers)
        self.journal = Journal()
        client = self.world.add_client(client_id, client_secret)
        self.client_id = client.id
        self.client_secret = client.secret
        self.conns: dict[str, Conn] = {}
        self.world.listeners.append(self.publish)
        self.world.channel_listeners.append(self._channel_removed)
        self.eventbridge: EventBridgePublisher | None = None
        if eventbridge_queue_url:
            self.eventbridge = EventBridgePublisher(
                eventbridge_queue_url, endpoint_url=eventbridge_endpoint_url,
                region=eventbridge_region, faults=self.faults, kinds=eventbridge_kinds)
            self.world.listeners.append(self.eventbridge.listener)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_drop = 0.0
        self._extra_n = 0

    # ---------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT: /oauth/token, /api/v2, /channels (WS) and /sandbox."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        app = build_app(self)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])
        self._tasks = [asyncio.create_task(self._heartbeat_loop(), name="sandbox-heartbeat"),
                       asyncio.create_task(self._reap_loop(), name="sandbox-reaper")]
        if self.eventbridge is not None:
            self.eventbridge.start()
        log.info("sandbox_started", base_url=self.base_url, client_id=self.client_id)

    async def stop(self) -> None:
        if self.eventbridge is not None:
            await self.eventbridge.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        for conn in list(self.conns.values()):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"sandbox stopping")
        self.conns.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("sandbox_stopped")

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[Sandbox]:
        """Run the sandbox on its own event loop in a daemon thread (for benchmarks and
        synchronous callers). Use `call()` to touch `world`/`faults` from outside."""
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:  # reported to the caller below
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        th = threading.Thread(target=run, name="sandbox", daemon=True)
        th.start()
        if not ready.wait(10.0):
            raise RuntimeError("sandbox did not start within 10 s")
        if errors:
            raise RuntimeError(f"sandbox failed to start: {errors[0]!r}")
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            th.join(10.0)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the sandbox's loop and return its result
        (thread-safe; for use with `run_in_thread`)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("sandbox not started")

        async def go() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(go(), loop).result(30.0)

    # ---------------------------------------------------------------- publishing
    def publish(self, conv: Conversation) -> None:
        """Send the whole conversation to every subscribed open socket (world listener)."""
        at, perf = time.time(), time.perf_counter_ns()
        corr = str(uuid.uuid4())
        body = conv.event_body()
        if self.faults.extra_field:
            self._extra_n += 1
            body[f"{EXTRA_PREFIX}{self._extra_n % 7}"] = {"note": "unknown field",
                                                         "n": self._extra_n}
            if body["participants"]:
                body["participants"][0][f"{EXTRA_PREFIX}Flag"] = bool(self._extra_n % 2)
        raw: bytes | None = None
        sockets = 0
        topics = conv.topics()
        if self.faults.losses and self.faults.take_loss("websocket", conv.id):
            self.journal.event(conv.id, corr, tuple(topics), 0, at, perf)
            return
        clean = self.faults.events_clean
        for topic in topics:
            chans = self.world.topic_index.get(topic)
            if not chans:
                continue
            msg: bytes | None = None
            for cid in chans:
                conn = self.conns.get(cid)
                if conn is None:
                    continue
                if msg is None:
                    if raw is None:
                        raw = orjson.dumps(body)
                    msg = _message(topic, raw, corr)
                if clean:
                    conn.outbox.append(msg)
                    conn.wake.set()
                else:
                    self._deliver_faulty(conn, msg)
                sockets += 1
        self.journal.event(conv.id, corr, tuple(topics), sockets, at, perf)

    def _deliver_faulty(self, conn: Conn, msg: bytes) -> None:
        d = self.faults.delivery()
        if d.lose:
            return
        if d.malformed:
            conn.push(msg[: len(msg) // 2])
        if d.reorder and conn.held is None:
            conn.held = msg
            return
        conn.push(msg)
        if d.duplicate:
            conn.push(msg)
        if conn.held is not None:
            conn.push(conn.held)
            conn.held = None

    def send_raw(self, data: bytes, channel_id: str | None = None) -> int:
        """Queue an arbitrary frame (e.g. malformed JSON) to one or every open socket."""
        conns = self._pick(channel_id)
        for c in conns:
            c.push(data)
        return len(conns)

    def _pick(self, channel_id: str | None) -> list[Conn]:
        if channel_id is None:
            return list(self.conns.values())
        c = self.conns.get(channel_id)
        return [c] if c else []

    # ---------------------------------------------------------------- socket faults
    def drop_sockets(self, channel_id: str | None = None) -> int:
        """Abort open sockets (no close frame), like a network failure. Returns how many."""
        conns = self._pick(channel_id)
        for c in conns:
            c.abort()
        return len(conns)

    def socket_closing(self, channel_id: str | None = None,
                       grace: float | None = None) -> int:
        """Send v2.system.socket_closing, then close after `grace` s (default closing_grace)."""
        conns = self._pick(channel_id)
        wait = self.closing_grace if grace is None else grace
        for c in conns:
            c.push(metadata_message("Socket is closing for maintenance",
                                    "v2.system.socket_closing"))
            asyncio.get_running_loop().call_later(
                wait, c.push, _Close(1001, b"socket closing"))
        return len(conns)

    def expire_channel(self, channel_id: str) -> None:
        """Make a channel expire now (the reaper sends the 404 message and closes)."""
        self.world.expire_channel(channel_id)

    def _channel_removed(self, channel_id: str, reason: str) -> None:
        conn = self.conns.get(channel_id)
        if conn is not None:
            conn.push(gone_message(f"Channel {channel_id} not found: {reason}"))
            conn.push(_Close(1000, b"channel gone"))

    # ---------------------------------------------------------------- loops
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if not self.conns:
                continue
            hb = metadata_message("WebSocket Heartbeat")
            for c in list(self.conns.values()):
                c.push(hb)
                if c.held is not None:  # a reordered event comes after the heartbeat
                    c.push(c.held)
                    c.held = None

    async def _reap_loop(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                self.world.reap_channels()
                n += 1
                if n % 50 == 0:
                    self.world.evict_ended()
                every = self.faults.drop_every
                now = time.monotonic()
                if every is not None and now - self._last_drop >= every:
                    self._last_drop = now
                    self.drop_sockets()
            except Exception:  # the reaper must survive anything; logged for the tests
                log.exception("sandbox_reaper_failed")

    async def writer(self, conn: Conn) -> None:
        """Drain one socket's outbox in order (events, heartbeats, close)."""
        ws = conn.ws
        while True:
            await conn.wake.wait()
            conn.wake.clear()
            while conn.outbox:
                item = conn.outbox.popleft()
                if isinstance(item, _Close):
                    await ws.close(code=item.code, message=item.message)
                    return
                if self.faults.event_latency:
                    await asyncio.sleep(self.faults.event_latency)
                if ws.closed:
                    return
                await ws.send_frame(item, WSMsgType.TEXT)
                conn.sent += 1
