"""The send gate holds until the PATCH is written (HA): a lease lost while the PATCH waits
(the request limiter, a 429's Retry-After, a 5xx back-off of the client's own retries)
stops it unwritten. Enforcer over a real GenesysClient (httpx MockTransport) and AuditLog."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from daemon.config import Credentials, GenesysSettings, SafetySettings
from daemon.core.engine import Engine
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Decision
from daemon.core.rules import RuleEngine, RuleSet
from daemon.core.state import CallStore
from daemon.genesys.api import GenesysClient
from daemon.service.audit import AuditLog
from daemon.service.enforcer import Enforcer


class Gate:
    def __init__(self) -> None:
        self.open = True

    def may_send(self) -> bool:
        return self.open


DECISION = Decision(rule=RuleName("r"), conversation_id=ConversationId("c1"),
                    participant_id=ParticipantId("p1"), action="disconnect", decided_at=1.0,
                    received_at=None, purpose="customer", matched={}, severity="critical",
                    tags=(), message=None)


@contextlib.asynccontextmanager
async def gated_enforcer(tmp_path: Path, handle: Callable[[httpx.Request], Awaitable[httpx.Response]],
                         gate: Gate, *, settings_kw: dict[str, Any] | None = None,
                         client_kw: dict[str, Any] | None = None,
                         **enforcer_kw: Any) -> AsyncIterator[Enforcer]:
    """An enforcing Enforcer with no rules behind `gate`: a real GenesysClient over
    `handle` (httpx MockTransport; `settings_kw` for its GenesysSettings, `client_kw` for
    the client itself) and an AuditLog at tmp_path/audit.jsonl. Drained and closed
    afterwards."""
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20)
    audit.open()
    settings = GenesysSettings(api_base_url="http://api.test", login_base_url="http://login.test",
                               **(settings_kw or {}))
    client = GenesysClient(settings, Credentials("id", "secret"), transport=httpx.MockTransport(handle),
                           **(client_kw or {}))
    rs = RuleSet(rules=(), mode="enforce", lists={}, safety=SafetySettings(max_disconnects_per_minute=100))
    enforcer = Enforcer(client, audit, Engine(RuleEngine(rs), CallStore()), mode="enforce", **enforcer_kw)
    enforcer.gate = gate
    try:
        yield enforcer
    finally:
        await enforcer.drain(1.0)
        audit.close()
        await client.aclose()


async def test_a_lease_lost_during_the_clients_retry_wait_sends_no_retry(tmp_path: Path) -> None:
    gate = Gate()
    patches: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": "tok", "token_type": "bearer",
                                             "expires_in": 3600})
        if request.method == "PATCH":
            patches.append(request.url.path)
            gate.open = False  # the lease is lost while the client backs off from the 503
            return httpx.Response(503, json={"message": "busy", "status": 503})
        return httpx.Response(404, json={"message": "no", "status": 404})

    async with gated_enforcer(tmp_path, handle, gate, settings_kw={"max_retries": 3},
                              client_kw={"retry_base_delay": 0.001, "retry_max_delay": 0.01},
                              confirm_timeout=0.1) as enforcer:
        removal = enforcer.submit(DECISION)
        await removal.wait(5.0)
        assert patches == ["/api/v2/conversations/calls/c1/participants/p1"]  # no retry written
        assert removal.state == "standby" and removal.attempts == 1  # the 503 one was written
        outcomes = [orjson.loads(line) for line in (tmp_path / "audit.jsonl").read_bytes().splitlines()]
        last = [r for r in outcomes if r["type"] == "outcome"][-1]
        assert last["outcome"] == "standby" and "send gate closed" in last["error"]


async def test_a_gate_closed_at_the_first_write_sends_nothing(tmp_path: Path) -> None:
    """Open at admission and at the pre-PATCH check, closed by the time the client is about
    to write (e.g. the limiter held the request): nothing is written, attempts 0."""
    gate = Gate()
    patches: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            gate.open = False  # the token fetch is the wait here
            return httpx.Response(200, json={"access_token": "tok", "token_type": "bearer",
                                             "expires_in": 3600})
        patches.append(request.url.path)
        return httpx.Response(202)

    async with gated_enforcer(tmp_path, handle, gate) as enforcer:
        removal = enforcer.submit(DECISION)
        await removal.wait(5.0)
        assert patches == [] and removal.state == "standby" and removal.attempts == 0
