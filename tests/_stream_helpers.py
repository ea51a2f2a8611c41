"""Shared helpers for the stream/resync/scope tests: a real GenesysClient pointed at the
sandbox, bounded condition waits, a real Engine with a real rule, and frame collectors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from daemon.genesys.api import GenesysClient
from daemon.config import Credentials, GenesysSettings, load_lists, parse_config
from daemon.core.engine import Engine
from daemon.core.events import Message, parse_message
from daemon.core.topics import queue_topic as queue_topic
from daemon.core.model import Decision
from daemon.core.rules import RuleEngine, compile_rules
from daemon.sandbox import Sandbox
from daemon.core.state import CallStore

RULES_YAML = """
schema_version: 1
rules:
  - name: external-in-conference
    when: {purpose: external}
    call: {connected_parties: {gte: 3}}
    action: observe
"""


def make_engine() -> Engine:
    cfg = parse_config(RULES_YAML)
    return Engine(RuleEngine(compile_rules(cfg, load_lists(cfg))), CallStore())


def settings_for(sb: Sandbox, *, rpm: int = 100_000, max_retries: int = 2) -> GenesysSettings:
    return GenesysSettings(api_base_url=sb.base_url, login_base_url=sb.base_url,
                           requests_per_minute=rpm, max_retries=max_retries,
                           connect_timeout=5, read_timeout=10)


def credentials_for(sb: Sandbox) -> Credentials:
    return Credentials(sb.client_id, sb.client_secret)


@contextlib.asynccontextmanager
async def client_for(sb: Sandbox, *, rpm: int = 100_000, max_retries: int = 2,
                     cls: type[GenesysClient] = GenesysClient) -> AsyncIterator[GenesysClient]:
    client = cls(settings_for(sb, rpm=rpm, max_retries=max_retries), credentials_for(sb),
                 retry_base_delay=0.05, retry_max_delay=0.2, retry_after_cap=1.0)
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class Collector:
    """Records every frame and gap the stream reports; optionally feeds an Engine."""

    engine: Engine | None = None
    frames: list[tuple[bytes | str, float]] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    correlation_ids: set[str] = field(default_factory=set)
    conversation_ids: set[str] = field(default_factory=set)
    decisions: list[Decision] = field(default_factory=list)

    def on_message(self, raw: bytes | str, received_at: float) -> Message:
        """Record the frame; return it parsed (the stream reads its control messages from
        what the consumer returns)."""
        self.frames.append((raw, received_at))
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            msg = None
        if isinstance(msg, dict) and str(msg.get("topicName", "")).endswith(".conversations.calls"):
            corr = (msg.get("metadata") or {}).get("CorrelationId")
            if isinstance(corr, str):
                self.correlation_ids.add(corr)
            body = msg.get("eventBody") or {}
            if isinstance(body.get("id"), str):
                self.conversation_ids.add(body["id"])
        if self.engine is not None:
            fed = self.engine.feed(raw, received_at)
            self.decisions.extend(fed.decisions)
            assert fed.message is not None
            return fed.message
        return parse_message(raw)

    def on_gap(self, reason: str) -> None:
        self.gaps.append(reason)

    def on_decisions(self, decisions: list[Decision]) -> None:
        self.decisions.extend(decisions)

    def call_events(self) -> list[dict[str, Any]]:
        out = []
        for raw, _ in self.frames:
            try:
                msg = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(msg, dict) and str(msg.get("topicName", "")).endswith(".conversations.calls"):
                out.append(msg)
        return out
