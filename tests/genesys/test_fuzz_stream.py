"""Fuzzing the notification path with hypothesis: malformed frames never crash anything,
are always counted, and the stream keeps delivering valid events afterwards.

1. Directly into `Engine.feed` (bytes or text, anything at all): never raises, each frame is
   counted exactly once in `engine.messages`, a `Rejected` one also in `engine.rejected`,
   and a valid event fed afterwards still updates the store.
2. Over a REAL WebSocket on 127.0.0.1: the sandbox's `send_raw` fault writes each frame to
   the daemon's socket (the real Daemon, StreamManager and Engine, on a loop in a thread);
   the frame must be counted under the kind `parse_message` gives it (rejections also in
   the `confguard_events_rejected` metric), and a valid event published right after it must
   reach the daemon's call store within a bounded time (the stream is not stuck).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import load_lists, parse_config
from daemon.core.engine import Engine, message_kind
from daemon.core.events import Rejected, parse_message
from daemon.service.logs import configure_logging
from daemon.core.rules import RuleEngine, compile_rules
from daemon.sandbox import Sandbox
from daemon.service.lifecycle import Daemon, State
from daemon.core.state import CallStore

QUEUE_TOPIC = "v2.routing.queues.{q}.conversations.calls"

# ------------------------------------------------------------------ strategies

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=12)


def _dumps(value: Any) -> str:
    # stdlib json: also writes integers beyond 64 bits, which the daemon must survive
    return json.dumps(value, separators=(",", ":"))


def _valid_envelope(topic: str, body: Any) -> str:
    return _dumps({"topicName": topic, "version": "2", "eventBody": body,
                   "metadata": {"CorrelationId": "c"}})


VALID_BODY = {"id": "9d5e7c1a-0000-4000-8000-000000000001", "participants": [
    {"id": "p1", "purpose": "customer", "state": "connected", "address": "tel:+14155550100",
     "attributes": {"a": "b"}}]}


@st.composite
def bad_frames(draw: st.DrawFn) -> str:
    """Valid UTF-8 text frames that are wrong in the ways a broken or hostile peer is."""
    topic = QUEUE_TOPIC.format(q=draw(st.sampled_from(["q1", "", "a.b", "x y"])))
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=200))
    if kind == 1:  # a real event cut short
        full = _valid_envelope(topic, VALID_BODY)
        return full[: draw(st.integers(0, len(full) - 1))]
    if kind == 2:  # JSON that is not an object
        return _dumps(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    if kind == 3:  # topicName of the wrong type, or missing
        d = draw(st.dictionaries(st.sampled_from(["topicName", "eventBody", "version", "message"]),
                                 json_values, max_size=4))
        return _dumps(d)
    if kind == 4:  # call topic, eventBody of the wrong shape
        return _valid_envelope(topic, draw(json_values.filter(lambda v: not isinstance(v, dict))))
    if kind == 5:  # call topic, id missing or not a string
        body = {"participants": [], **({"id": draw(json_values)} if draw(st.booleans()) else {})}
        if isinstance(body.get("id"), str) and body["id"]:
            body["id"] = 1
        return _valid_envelope(topic, body)
    if kind == 6:  # call topic, participants not a list
        return _valid_envelope(topic, {"id": "c-1", "participants": draw(
            json_values.filter(lambda v: not isinstance(v, list)))})
    if kind == 7:  # call topic, participants full of junk (kept call, dropped parties)
        return _valid_envelope(topic, {"id": "c-junk", "participants": draw(st.lists(json_values, max_size=5))})
    if kind == 8:  # nesting beyond any parser's limit
        depth = draw(st.integers(500, 5000))
        return '{"topicName":' + "[" * depth + "]" * depth + "}"
    # random bytes of a valid event replaced by random text
    full = _valid_envelope(topic, VALID_BODY)
    i = draw(st.integers(0, len(full) - 1))
    return full[:i] + draw(st.text(min_size=1, max_size=5)) + full[i + 1:]


any_frames = st.binary(max_size=300) | st.text(max_size=300) | bad_frames()

RULES = """
schema_version: 1
genesys: {api_base_url: "http://127.0.0.1:9", login_base_url: "http://127.0.0.1:9"}
subscriptions: {queues: [Sales], reconcile_interval: 0}
safety: {max_disconnects_per_minute: 1000}
rules:
  - name: flagged-party
    when: {purpose: {in: [customer, external]}, attributes.complianceFlag: "true"}
    action: disconnect
audit: {path: audit.jsonl}
ops: {enabled: false}
"""


# ------------------------------------------------------------------ 1. Engine.feed


def _engine() -> Engine:
    cfg = parse_config(RULES, "fuzz.yaml")
    return Engine(RuleEngine(compile_rules(cfg, load_lists(cfg))), CallStore())


_ENGINE = _engine()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=any_frames)
def test_engine_feed_counts_every_malformed_frame_and_keeps_working(frame: bytes | str) -> None:
    engine = _ENGINE
    before = sum(engine.messages.values())
    rejected_before = sum(engine.rejected.values())
    fed = engine.feed(frame, 1_795_000_000.0)  # must not raise
    assert sum(engine.messages.values()) == before + 1
    if isinstance(fed.message, Rejected):
        assert sum(engine.rejected.values()) == rejected_before + 1
        assert fed.change is None and fed.decisions == []
    n = before + 1
    body = {"id": "valid-after", "participants": [
        {"id": "p", "purpose": "agent", "state": "connected", "attributes": {"n": str(n)}}]}
    engine.feed(_valid_envelope(QUEUE_TOPIC.format(q="q1"), body), 1_795_000_001.0)
    call = engine.store.get("valid-after")
    assert call is not None and call.participants["p"].attributes["n"] == str(n)  # type: ignore[index]


# ------------------------------------------------------------------ 2. over a real socket


class Stack:
    """Sandbox + Daemon on one event loop in a background thread."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-stack", daemon=True)
        self.sb = Sandbox(heartbeat_interval=30.0)
        self.daemon: Daemon | None = None
        self.cid = ""
        self.pid = ""
        self.n = 0

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        await self.sb.start()
        w = self.sb.world
        q = w.create_queue("Sales").id
        u = w.create_user("Agent").id
        text = RULES.replace("http://127.0.0.1:9", self.sb.base_url)
        cfg = parse_config(text, str(self.tmp / "config.yaml"), base_dir=self.tmp)
        self.daemon = Daemon(cfg, drain_timeout=1.0)
        await asyncio.wait_for(self.daemon.start(), 20.0)
        conv = w.start_call(q)
        agent = w.connect_agent(conv.id, u)
        self.cid, self.pid = conv.id, agent.id

    async def _stop(self) -> None:
        if self.daemon is not None:
            await asyncio.wait_for(self.daemon.stop(), 20.0)
        await self.sb.stop()

    async def probe(self, frame: str) -> tuple[int, float, str]:
        """Send `frame` raw, then a valid event; wait (bounded) until the daemon has it.
        Returns (frames counted under the expected kind, rejections counted by the metric,
        expected kind) as increases."""
        assert self.daemon is not None
        d = self.daemon
        kind = message_kind(parse_message(frame))
        before = d.engine.messages[kind]
        rej_before = _rejected_total(d)
        assert self.sb.send_raw(frame.encode()) >= 1, "no open socket"
        self.n += 1
        marker = str(self.n)
        self.sb.world.set_attributes(self.cid, self.pid, {"fuzz": marker})
        for _ in range(400):  # bounded: 400 x 25 ms = 10 s
            call = d.engine.store.get(self.cid)
            if call is not None and call.participants[self.pid].attributes.get("fuzz") == marker:  # type: ignore[index]
                break
            await asyncio.sleep(0.025)
        else:
            raise AssertionError(f"valid event after {frame[:80]!r} never reached the daemon "
                                 f"(state {d.state.value})")
        return d.engine.messages[kind] - before, _rejected_total(d) - rej_before, kind


def _rejected_total(d: Daemon) -> float:
    return sum(s.value for fam in d.metrics.events_rejected.collect() for s in fam.samples
               if s.name.endswith("_total"))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    env = {k: os.environ.get(k) for k in ("GENESYSCLOUD_OAUTHCLIENT_ID", "GENESYSCLOUD_OAUTHCLIENT_SECRET",
                                          "GENESYS_CLOUD_CLIENT_ID", "GENESYS_CLOUD_CLIENT_SECRET")}
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "daemon.log", "w") as log_file:
        configure_logging("error", "json", stream=log_file)
        s = Stack(Path(tmp))
        for k in ("GENESYS_CLOUD_CLIENT_ID", "GENESYS_CLOUD_CLIENT_SECRET"):
            os.environ.pop(k, None)
        os.environ["GENESYSCLOUD_OAUTHCLIENT_ID"] = s.sb.client_id
        os.environ["GENESYSCLOUD_OAUTHCLIENT_SECRET"] = s.sb.client_secret
        s.thread.start()
        try:
            s.run(s._start())
            yield s
        finally:
            try:
                s.run(s._stop())
            finally:
                s.loop.call_soon_threadsafe(s.loop.stop)
                s.thread.join(10.0)
                for k, v in env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                structlog.configure(**saved)
                for h in list(root.handlers):
                    if h not in handlers:
                        root.removeHandler(h)
                root.setLevel(level)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(frame=bad_frames() | st.text(max_size=300))
def test_malformed_frames_over_a_real_socket_are_counted_and_the_stream_keeps_going(
        stack: Stack, frame: str) -> None:
    counted, rejected, kind = stack.run(stack.probe(frame))
    assert counted >= 1, f"{frame[:80]!r} ({kind}) was not counted"
    if kind == "rejected":
        assert rejected >= 1, f"{frame[:80]!r} rejected but not in confguard_events_rejected"
    assert stack.daemon is not None and stack.daemon.state in (State.RUNNING, State.DEGRADED)
