"""Unit tests of daemon.service.enforcer.Enforcer: edge cases over httpx.MockTransport, real
AuditLog, real core Engine.

The real GenesysClient is used (so status codes go through the real error translation); the
network is an httpx.MockTransport whose handler plays Genesys. Confirmation events are fed
to the engine and its `Step` handed to `Enforcer.handle`, as the daemon does, scheduled from
the handler. The core `Enforcement` (shared through the engine) is the state under test:
a failed action re-arms its rule there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from _wait import wait_until
from daemon.errors import AuditError
from daemon.genesys.api import GenesysClient
from daemon.service.audit import AuditLog, verify
from daemon.config import Credentials, GenesysSettings, SafetySettings
from daemon.core.engine import Engine, Step
from daemon.core.enforcement import ACTED, FIRED
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Decision
from daemon.core.rules import RuleEngine, RuleSet
from daemon.core.state import CallStore
from daemon.service.enforcer import Enforcer, conflict_policy
from daemon.service.metrics import Metrics

PATCH_PREFIX = "/api/v2/conversations/calls/"


def make_engine(max_per_minute: int = 100) -> Engine:
    """A real core Engine with no rules: decisions are submitted by hand."""
    rs = RuleSet(rules=(), mode="enforce", lists={},
                 safety=SafetySettings(max_disconnects_per_minute=max_per_minute))
    return Engine(RuleEngine(rs), CallStore())


class RecLog:
    """Records structlog-style calls: (level, event, kwargs), with fields from `bind`."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []
        self.bound: dict[str, Any] = {}

    def bind(self, **kw: Any) -> RecLog:
        child = RecLog()
        child.lines = self.lines  # one record for the logger and everything bound from it
        child.bound = {**self.bound, **kw}
        return child

    def __getattr__(self, level: str) -> Callable[..., None]:
        def emit(event: str, **kw: Any) -> None:
            self.lines.append((level, event, {**self.bound, **kw}))
        return emit

    def at(self, level: str) -> list[tuple[str, dict[str, Any]]]:
        return [(e, kw) for lv, e, kw in self.lines if lv == level]


class Marks:
    """Reads the shared Enforcement: which (rule, conversation, party) submitted here are
    re-armed (may act again) after their action ended."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[tuple[str, str, str]] = []

    @property
    def rearmed(self) -> list[tuple[str, str, str]]:
        enf = self.engine.enforcement
        return [k for k in dict.fromkeys(self.seen)
                if not enf.flags(RuleName(k[0]), ConversationId(k[1]), ParticipantId(k[2])) & (FIRED | ACTED)]


def decision(rule: str = "r1", cid: str = "c1", pid: str = "p1", *, action: str = "disconnect",
             received_at: float | None = None) -> Decision:
    now = time.time()
    return Decision(rule=RuleName(rule), action=action,  # type: ignore[arg-type]
                    conversation_id=ConversationId(cid), participant_id=ParticipantId(pid),
                    purpose="external", matched={"purpose": "external"}, severity="critical",
                    tags=("pci",), message=f"{rule} matched", decided_at=now,
                    received_at=now if received_at is None else received_at)


def gone_step(engine: Engine, cid: str, pid: str, state: str = "disconnected") -> Step:
    """The engine applying an event that shows the party final."""
    return engine.apply_conversation(
        {"id": cid, "participants": [{"id": pid, "state": state, "purpose": "external"}]},
        time.time(), source="event")


Handler = Callable[["Harness", httpx.Request], Awaitable[httpx.Response]]


class Harness:
    """An Enforcer wired to a real GenesysClient over MockTransport and a real AuditLog."""

    def __init__(self, tmp_path: Path, handler: Handler, *, mode: str = "enforce",
                 max_per_minute: int = 100, confirm_timeout: float = 0.2,
                 max_attempts: int = 3) -> None:
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.audit_path = tmp_path / "audit.jsonl"
        self.audit = AuditLog(self.audit_path, max_bytes=1 << 20)
        self.audit.open()
        settings = GenesysSettings(api_base_url="http://api.test", login_base_url="http://login.test",
                                   max_retries=0)
        self.client = GenesysClient(settings, Credentials("id", "secret"),
                                    transport=httpx.MockTransport(self._handle),
                                    retry_base_delay=0.001, retry_max_delay=0.01)
        self.engine = make_engine(max_per_minute)
        self.rules = Marks(self.engine)
        self.valve = self.engine.enforcement.valve
        self.metrics = Metrics()
        self.log = RecLog()
        self.enforcer = Enforcer(self.client, self.audit, self.engine, mode=mode,  # type: ignore[arg-type]
                                 metrics=self.metrics, confirm_timeout=confirm_timeout,
                                 conflict_retry=conflict_policy(initial=0.01, max_attempts=max_attempts),
                                 log=self.log)

    def submit(self, decisions: list[Decision]) -> None:
        self.rules.seen.extend((d.rule, d.conversation_id, d.participant_id) for d in decisions)
        self.enforcer.submit_all(decisions)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": "tok", "token_type": "bearer",
                                             "expires_in": 3600})
        body = json.loads(request.content) if request.content else None
        self.requests.append({"method": request.method, "path": request.url.path, "body": body,
                              "audit_at_send": self.records()})
        return await self.handler(self, request)

    def patches(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "PATCH"]

    def records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def outcomes(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["type"] == "outcome"]

    def confirm_soon(self, path: str) -> None:
        """Schedule the applied change showing the party gone, as the daemon would."""
        _, _, rest = path.partition(PATCH_PREFIX)
        cid, _, pid = rest.partition("/participants/")
        asyncio.get_running_loop().call_soon(
            lambda: self.enforcer.handle(gone_step(self.engine, cid, pid)))

    async def close(self) -> None:
        await self.client.aclose()
        self.audit.close()


def error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"message": message, "code": "x", "status": status,
                                        "contextId": "ctx-1", "details": [], "errors": []})


async def accept_and_confirm(h: Harness, req: httpx.Request) -> httpx.Response:
    if req.method == "PATCH":
        h.confirm_soon(req.url.path)
        return httpx.Response(202)
    return error(500, "unexpected")


def accept_and_confirm_after(release: asyncio.Event) -> Handler:
    """A handler that holds every request until `release` is set, then accepts it (202)
    and confirms the party gone soon after."""

    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        await release.wait()
        h.confirm_soon(req.url.path)
        return httpx.Response(202)

    return handler


@pytest.fixture
async def make(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[Harness] = []

    def factory(handler: Handler, **kw: Any) -> Harness:
        h = Harness(tmp_path, handler, **kw)
        made.append(h)
        return h

    yield factory
    for h in made:
        await h.enforcer.drain(1.0)
        await h.close()


# ------------------------------------------------------------------ the happy path


async def test_disconnect_audits_first_then_one_patch_then_confirmed(make: Any) -> None:
    h = make(accept_and_confirm)
    d = decision(received_at=time.time() - 0.25)
    h.submit([d])
    # The task is created in submit's turn; nothing has been sent yet.
    assert h.enforcer.in_flight == 1
    assert h.requests == []
    await wait_until(lambda: h.enforcer.in_flight == 0)
    [patch] = h.patches()
    assert patch["path"] == "/api/v2/conversations/calls/c1/participants/p1"
    assert patch["body"] == {"state": "disconnected"}
    # The decision record was already on disk when the PATCH reached the server.
    assert [r["type"] for r in patch["audit_at_send"]] == ["decision"]
    recs = h.records()
    assert [r["type"] for r in recs] == ["decision", "outcome"]
    dec, out = recs
    assert dec["mode"] == "enforce" and dec["rule"] == "r1" and dec["matched"] == {"purpose": "external"}
    assert out["outcome"] == "disconnected"
    assert out["attempts"] == 1
    assert out["error"] is None
    assert out["event_to_request_ms"] >= 250.0
    assert h.metrics.event_to_request_seconds.collect()[0].samples  # observed
    assert h.rules.rearmed == []
    assert verify([h.audit_path]).ok
    assert h.metrics.decisions.labels(rule="r1", action="disconnect", mode="enforce")._value.get() == 1
    assert h.metrics.outcomes.labels(rule="r1", outcome="disconnected")._value.get() == 1
    # the decision log line carries every decision field
    [(event, kw)] = [(e, kw) for e, kw in h.log.at("warning") if e == "decision"]
    for k in ("rule", "conversation_id", "participant_id", "purpose", "matched", "mode",
              "action", "severity", "tags", "message"):
        assert k in kw


async def test_decision_line_is_written_after_the_patch_goes_out(make: Any) -> None:
    """Building the `decision` line is the costliest part of a submit: it is written on the
    loop's next iteration, after the PATCH task's first step has handed the PATCH to the
    transport (the audit record, not the line, is what must exist before the PATCH)."""
    lines_at_send: list[list[str]] = []

    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if req.method == "PATCH":
            lines_at_send.append([e for e, _ in h.log.at("warning") if e == "decision"])
            h.confirm_soon(req.url.path)
        return httpx.Response(202)

    h = make(handler)
    # With the fdatasync before the PATCH (the default) the line is written while the sync
    # runs (free time: the loop waits on the disk); without it, after the PATCH went out.
    h.enforcer.sync_before_patch = False
    h.submit([decision()])
    assert [e for e, _ in h.log.at("warning") if e == "decision"] == []  # not in submit's turn
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert lines_at_send == [[]]
    assert [e for e, _ in h.log.at("warning") if e == "decision"] == ["decision"]  # once
    # A verdict that sends nothing logs the line at once, in submit's turn.
    h.enforcer.stop_accepting()
    h.submit([decision(pid="p2")])
    assert [kw["participant_id"] for e, kw in h.log.at("warning") if e == "decision"] == ["p1", "p2"]


async def test_confirmation_by_get_when_no_event_comes(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if req.method == "PATCH":
            return httpx.Response(202)
        return httpx.Response(200, json={"id": "c1", "participants": [
            {"id": "p1", "state": "disconnected"}, {"id": "p2", "state": "connected"}]})

    h = make(handler, confirm_timeout=0.05)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert [r["method"] for r in h.requests] == ["PATCH", "GET"]
    assert h.requests[1]["path"] == "/api/v2/conversations/calls/c1"
    [out] = h.outcomes()
    assert out["outcome"] == "disconnected" and out["attempts"] == 1


async def test_confirmation_get_404_counts_as_gone(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        return httpx.Response(202) if req.method == "PATCH" else error(404, "conversation not found")

    h = make(handler, confirm_timeout=0.02)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    [out] = h.outcomes()
    assert out["outcome"] == "disconnected"


# ------------------------------------------------------------------ status edge cases


async def test_404_is_already_gone_not_an_error(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        return error(404, "participant not found")

    h = make(handler)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 1
    [out] = h.outcomes()
    assert out["outcome"] == "already_gone"
    assert out["http_status"] == 404 and out["attempts"] == 1 and out["error"] is None
    assert h.rules.rearmed == []


async def test_403_fails_naming_the_missing_permission(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        return error(403, "Unable to perform the requested action. You are missing the "
                          "following permission(s): conversation:communication:disconnect")

    h = make(handler)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 1  # a 403 is not retried
    [out] = h.outcomes()
    assert out["outcome"] == "failed" and out["http_status"] == 403
    assert "conversation:communication:disconnect" in out["error"]
    crit = [kw for e, kw in h.log.at("critical") if e != "decision"]
    assert crit and crit[0]["missing_permissions"] == ["conversation:communication:disconnect"]
    assert h.rules.rearmed == [("r1", "c1", "p1")]  # a later event may fire it again


async def test_409_then_success(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if len(h.patches()) == 1:
            return error(409, "conflicting operation in progress")
        h.confirm_soon(req.url.path)
        return httpx.Response(202)

    h = make(handler)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 2
    [out] = h.outcomes()
    assert out["outcome"] == "disconnected" and out["attempts"] == 2
    assert h.rules.rearmed == []


async def test_409_forever_fails_after_max_attempts_and_rearms(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        return error(409, "conflict")

    h = make(handler, max_attempts=3)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 3
    [out] = h.outcomes()
    assert out["outcome"] == "failed" and out["http_status"] == 409 and out["attempts"] == 3
    assert h.rules.rearmed == [("r1", "c1", "p1")]


async def test_server_error_after_client_retries_fails_and_rearms(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        return error(503, "service unavailable")

    h = make(handler)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    [out] = h.outcomes()
    assert out["outcome"] == "failed" and out["http_status"] == 503
    assert "503" in out["error"]
    assert h.rules.rearmed == [("r1", "c1", "p1")]
    # failed: the same rule may act on the party again
    h.handler = accept_and_confirm
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert h.outcomes()[-1]["outcome"] == "disconnected"


async def test_unconfirmed_is_recorded_and_the_patch_retried_once(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if req.method == "PATCH":
            return httpx.Response(202)
        # GET: still connected after the first PATCH, gone after the second
        state = "connected" if len(h.patches()) < 2 else "disconnected"
        return httpx.Response(200, json={"id": "c1", "participants": [{"id": "p1", "state": state}]})

    h = make(handler, confirm_timeout=0.02)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert [r["method"] for r in h.requests] == ["PATCH", "GET", "PATCH", "GET"]
    outs = h.outcomes()
    assert [o["outcome"] for o in outs] == ["unconfirmed", "disconnected"]
    assert [o["attempts"] for o in outs] == [1, 2]
    assert h.rules.rearmed == []


async def test_unconfirmed_twice_ends_unconfirmed_after_exactly_two_patches(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if req.method == "PATCH":
            return httpx.Response(202)
        return httpx.Response(200, json={"id": "c1", "participants": [{"id": "p1", "state": "connected"}]})

    h = make(handler, confirm_timeout=0.02)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 2
    assert [o["outcome"] for o in h.outcomes()] == ["unconfirmed", "unconfirmed"]
    assert h.rules.rearmed == [("r1", "c1", "p1")]


async def test_event_arriving_during_the_confirming_get_confirms(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if req.method == "PATCH":
            return httpx.Response(202)
        h.confirm_soon(req.url.path + "/participants/p1")  # the leave event races the GET
        await asyncio.sleep(0)  # ... and is applied before the GET's reply is read
        return httpx.Response(200, json={"id": "c1", "participants": [{"id": "p1", "state": "connected"}]})

    h = make(handler, confirm_timeout=0.02)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 1
    assert [o["outcome"] for o in h.outcomes()] == ["disconnected"]


async def test_party_leaving_during_conflict_backoff_is_already_gone(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        h.confirm_soon(req.url.path)
        return error(409, "conflict")

    h = make(handler)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 1  # not retried once the party is seen gone
    [out] = h.outcomes()
    assert out["outcome"] == "already_gone" and out["http_status"] == 409
    assert h.rules.rearmed == []


@pytest.mark.parametrize("state", ["disconnected", "connected"])
async def test_400_for_a_party_that_left_is_already_gone_else_failed(make: Any, state: str) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if req.method == "PATCH":
            return error(400, "Participant is not connected")
        return httpx.Response(200, json={"id": "c1", "participants": [{"id": "p1", "state": state}]})

    h = make(handler)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert [r["method"] for r in h.requests] == ["PATCH", "GET"]
    [out] = h.outcomes()
    assert out["http_status"] == 400 and out["attempts"] == 1
    if state == "disconnected":
        assert out["outcome"] == "already_gone"
        assert h.rules.rearmed == []
    else:
        assert out["outcome"] == "failed" and "not connected" in out["error"]
        assert h.rules.rearmed == [("r1", "c1", "p1")]


async def test_404_on_the_confirm_retry_means_our_first_patch_worked(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if req.method == "GET":
            return httpx.Response(200, json={"id": "c1", "participants": [{"id": "p1", "state": "connected"}]})
        return httpx.Response(202) if len(h.patches()) == 1 else error(404, "participant not found")

    h = make(handler, confirm_timeout=0.02)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 2
    assert [(o["outcome"], o["http_status"]) for o in h.outcomes()] == [
        ("unconfirmed", 202), ("disconnected", 404)]


# ------------------------------------------------------------------ once per party / rule


async def test_single_in_flight_per_party(make: Any) -> None:
    release = asyncio.Event()
    h = make(accept_and_confirm_after(release))
    # Two rules match the same party in one event, a third decision arrives while in flight.
    h.submit([decision("rule-a"), decision("rule-b")])
    await wait_until(lambda: len(h.patches()) == 1)
    h.submit([decision("rule-c")])
    assert h.enforcer.in_flight == 1
    release.set()
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 1
    recs = h.records()
    assert [r["rule"] for r in recs if r["type"] == "decision"] == ["rule-a", "rule-b", "rule-c"]
    outs = {o["rule"]: o for o in h.outcomes()}
    assert outs["rule-a"]["outcome"] == "disconnected" and outs["rule-a"]["attempts"] == 1
    for joined in ("rule-b", "rule-c"):
        assert outs[joined]["outcome"] == "disconnected"
        assert outs[joined]["attempts"] == 0
        assert "rule-a" in outs[joined]["error"]


async def test_distinct_parties_are_acted_on_concurrently(make: Any) -> None:
    h = make(accept_and_confirm)
    h.submit([decision(pid="p1"), decision(pid="p2"), decision(cid="c2", pid="p1")])
    assert h.enforcer.in_flight == 3
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert sorted(p["path"] for p in h.patches()) == [
        "/api/v2/conversations/calls/c1/participants/p1",
        "/api/v2/conversations/calls/c1/participants/p2",
        "/api/v2/conversations/calls/c2/participants/p1",
    ]


async def test_same_rule_acts_once_per_party(make: Any) -> None:
    h = make(accept_and_confirm)
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    h.submit([decision()])
    assert h.enforcer.in_flight == 0
    assert len(h.patches()) == 1
    assert [o["outcome"] for o in h.outcomes()] == ["disconnected", "suppressed"]
    assert "already acted on" in h.outcomes()[-1]["error"]


async def test_party_already_final_in_store_is_not_sent(make: Any) -> None:
    h = make(accept_and_confirm)
    h.enforcer.handle(gone_step(h.engine, "c1", "p1"))
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert h.requests == []
    [out] = h.outcomes()
    assert out["outcome"] == "already_gone" and out["attempts"] == 0 and out["http_status"] is None


async def test_party_leaving_before_the_task_runs_is_not_sent(make: Any) -> None:
    h = make(accept_and_confirm)
    h.submit([decision()])
    # The leave event is applied in the same turn, before the PATCH task first runs.
    h.enforcer.handle(gone_step(h.engine, "c1", "p1", state="terminated"))
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert h.requests == []
    assert h.outcomes()[0]["outcome"] == "already_gone"


# ------------------------------------------------------------------ modes and the valve


async def test_observe_mode_sends_nothing_but_audits_everything(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        raise AssertionError("observe mode must not send anything")

    h = make(handler, mode="observe")
    h.submit([decision("r1", pid="p1"), decision("r2", pid="p2"),
                       decision("r3", pid="p3", action="observe")])
    assert h.enforcer.in_flight == 0
    await asyncio.sleep(0)
    assert h.requests == []
    recs = h.records()
    assert [(r["type"], r["rule"]) for r in recs] == [
        ("decision", "r1"), ("outcome", "r1"), ("decision", "r2"), ("outcome", "r2"),
        ("decision", "r3"), ("outcome", "r3")]
    assert all(r["mode"] == "observe" for r in recs if r["type"] == "decision")
    assert {r["outcome"] for r in h.outcomes()} == {"observed"}


async def test_observe_action_in_enforce_mode_sends_nothing(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        raise AssertionError("observe action must not send anything")

    h = make(handler)
    h.submit([decision(action="observe")])
    assert h.enforcer.in_flight == 0
    [out] = h.outcomes()
    assert out["outcome"] == "observed" and out["attempts"] == 0


async def test_safety_valve_trips_suppresses_and_logs_once(make: Any) -> None:
    h = make(accept_and_confirm, max_per_minute=2)
    h.submit([decision(pid=f"p{i}") for i in range(1, 5)])
    h.submit([decision(pid="p5")])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 2
    outs = {o["participant_id"]: o["outcome"] for o in h.outcomes()}
    assert outs == {"p1": "disconnected", "p2": "disconnected", "p3": "suppressed",
                    "p4": "suppressed", "p5": "suppressed"}
    trips = [kw for e, kw in h.log.at("critical") if e == "safety_valve_tripped"]
    assert len(trips) == 1
    assert "USR1" in trips[0]["resume"] and trips[0]["max_per_minute"] == 2
    assert h.metrics.safety_valve_tripped._value.get() == 1
    assert h.valve.tripped
    # Resume: the valve opens and the suppressed parties' rules are re-armed.
    assert h.enforcer.resume_valve()
    assert not h.valve.tripped
    assert sorted(h.rules.rearmed) == [("r1", "c1", "p3"), ("r1", "c1", "p4"), ("r1", "c1", "p5")]
    assert h.metrics.safety_valve_tripped._value.get() == 0
    h.submit([decision(pid="p3")])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 3


# ------------------------------------------------------------------ draining and failures


async def test_stop_accepting_audits_but_sends_nothing(make: Any) -> None:
    h = make(accept_and_confirm)
    h.enforcer.stop_accepting()
    h.submit([decision()])
    assert h.enforcer.in_flight == 0
    await asyncio.sleep(0)
    assert h.requests == []
    [out] = h.outcomes()
    assert out["outcome"] == "suppressed" and "stopping" in out["error"]


async def test_drain_waits_then_abandons_and_records(make: Any) -> None:
    never = asyncio.Event()

    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/p1"):
            h.confirm_soon(req.url.path)
            return httpx.Response(202)
        await never.wait()  # p2's PATCH hangs
        return httpx.Response(202)

    h = make(handler)
    h.submit([decision(pid="p1"), decision(pid="p2")])
    await wait_until(lambda: len(h.patches()) == 2)
    h.enforcer.stop_accepting()
    abandoned = await h.enforcer.drain(0.3)
    assert abandoned == 1
    assert h.enforcer.in_flight == 0
    outs = {o["participant_id"]: o for o in h.outcomes()}
    assert outs["p1"]["outcome"] == "disconnected"
    assert outs["p2"]["outcome"] == "unconfirmed" and "abandoned" in outs["p2"]["error"]
    assert await h.enforcer.drain(0.1) == 0


async def test_drain_during_conflict_backoff_records_failed_not_unconfirmed(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        return error(409, "conflict")

    h = make(handler)
    h.enforcer.conflict_retry = conflict_policy(initial=30.0)  # in its back-off when the drain ends
    h.submit([decision()])
    await wait_until(lambda: len(h.patches()) == 1)
    await asyncio.sleep(0)
    assert await h.enforcer.drain(0.5) == 1
    [out] = h.outcomes()
    assert out["outcome"] == "failed" and out["http_status"] == 409
    assert "no PATCH accepted" in out["error"]


async def test_no_patch_without_its_audit_record(make: Any) -> None:
    h = make(accept_and_confirm)
    h.audit.close()  # the trail cannot be written
    h.submit([decision()])  # must not raise
    assert h.enforcer.in_flight == 0
    await asyncio.sleep(0)
    assert h.requests == []
    assert any(e == "audit_write_failed" and kw["record"] == "decision"
               for e, kw in h.log.at("critical"))


async def test_submit_without_received_at_uses_decided_at(make: Any) -> None:
    h = make(accept_and_confirm)
    d = decision()
    d = Decision(**{**{f: getattr(d, f) for f in d.__dataclass_fields__}, "received_at": None})
    h.submit([d])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    [out] = h.outcomes()
    assert out["outcome"] == "disconnected"
    assert 0.0 <= out["event_to_request_ms"] < 10_000


def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.jsonl", max_bytes=1 << 20)
    with pytest.raises(ValueError):
        Enforcer(object(), audit, make_engine(1), mode="enforcing")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        conflict_policy(max_attempts=0)
    with pytest.raises(ValueError):
        Enforcer(object(), audit, make_engine(1), mode="enforce",  # type: ignore[arg-type]
                 confirm_timeout=-1)


# ------------------------------------------------------------------ the send gate (HA) and handles


class Gate:
    def __init__(self, open_: bool) -> None:
        self.open = open_
        self.asked = 0

    def may_send(self) -> bool:
        self.asked += 1
        return self.open


async def test_closed_gate_audits_standby_and_sends_nothing_then_acts_when_opened(make: Any) -> None:
    h = make(accept_and_confirm)
    gate = Gate(False)
    h.enforcer.gate = gate
    [r] = h.enforcer.submit_all([decision()])
    assert r.state == "standby" and r.attempts == 0 and r.done()
    await asyncio.sleep(0)
    assert h.requests == [] and h.enforcer.in_flight == 0
    [out] = h.outcomes()
    assert out["outcome"] == "standby" and "standby" in out["error"]
    assert h.engine.enforcement.held == 1
    # the gate opens (became leader): held decisions are released; with no rules in this
    # harness nothing re-decides, but the party may now be acted on again
    gate.open = True
    assert h.enforcer.act_now("leader") == []
    assert h.engine.enforcement.held == 0
    r2 = h.enforcer.submit(decision())
    assert r2.state == "pending"
    await r2.wait(5.0)
    assert r2.state == "disconnected" and r2.attempts == 1 and len(h.patches()) == 1


async def test_gate_closing_before_the_patch_is_standby(make: Any) -> None:
    h = make(accept_and_confirm)
    gate = Gate(True)
    h.enforcer.gate = gate
    r = h.enforcer.submit(decision())
    gate.open = False  # lost the lease between the decision and the PATCH
    await r.wait(5.0)
    assert r.state == "standby" and h.patches() == []
    assert gate.asked == 2  # at admission and immediately before the PATCH


async def test_handle_reports_state_status_attempts_and_times(make: Any) -> None:
    release = asyncio.Event()
    h = make(accept_and_confirm_after(release))
    r = h.enforcer.submit(decision())
    joined = h.enforcer.submit(decision("r2"))
    assert r.state == joined.state == "pending" and r.sent_at is None
    await wait_until(lambda: len(h.patches()) == 1)
    assert r.sent_at is not None and r.sent_at >= r.requested_at
    release.set()
    await r.wait(5.0)
    await joined.wait(5.0)
    assert r.state == "disconnected" and r.http_status == 202 and r.attempts == 1
    assert r.confirmed_at is not None and r.confirmed_at >= r.sent_at
    assert joined.state == "disconnected" and joined.joined == "r1" and joined.attempts == 0


async def test_manual_decision_takes_the_same_path_with_its_origin_audited(make: Any) -> None:
    from daemon.core.enforcement import Origin, manual_decision

    h = make(accept_and_confirm)
    h.enforcer.handle(h.engine.apply_conversation(
        {"id": "c1", "participants": [{"id": "p1", "state": "connected", "purpose": "customer"}]},
        time.time(), source="event"))
    call = h.engine.store.get(ConversationId("c1"))
    assert call is not None
    d = manual_decision(call, call.participants[ParticipantId("p1")],
                        origin=Origin("orchestrator", "consent withdrawn"), now=time.time())
    r = h.enforcer.submit(d)
    await r.wait(5.0)
    assert r.state == "disconnected" and len(h.patches()) == 1
    [dec] = [x for x in h.records() if x["type"] == "decision"]
    assert dec["rule"] == "control:orchestrator"
    assert dec["origin"] == {"caller": "orchestrator", "reason": "consent withdrawn"}
    # once per party: a second request for the same party sends nothing
    again = h.enforcer.submit(d)
    assert again.state in ("suppressed", "already_gone") and len(h.patches()) == 1
    assert verify([h.audit_path]).ok


async def test_decision_records_are_on_disk_before_their_patch_one_sync_for_a_burst(make: Any) -> None:
    """Each PATCH is sent only once the decision records written before it are fdatasync'd;
    decisions submitted together share one sync (group commit)."""
    synced_at_send: list[bool] = []
    syncs: list[int] = []

    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        if req.method == "PATCH":
            decided = sum(1 for r in h.records() if r["type"] == "decision")
            synced_at_send.append(h.audit._synced_gen >= decided)
            h.confirm_soon(req.url.path)
        return httpx.Response(202)

    h = make(handler)
    real_sync = h.audit.sync

    def counting_sync() -> None:
        syncs.append(h.audit._written_gen)
        real_sync()

    h.audit.sync = counting_sync  # type: ignore[method-assign]
    h.submit([decision(pid=f"p{i}", cid=f"c{i}") for i in range(20)])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    assert len(h.patches()) == 20 and synced_at_send == [True] * 20
    assert 1 <= len(syncs) <= 2, syncs  # one for the burst (a second only if one raced it)


async def test_a_failed_sync_sends_nothing(make: Any) -> None:
    async def handler(h: Harness, req: httpx.Request) -> httpx.Response:
        return httpx.Response(202)

    h = make(handler)
    real_sync = h.audit.sync

    def broken_sync() -> None:
        raise AuditError("cannot fsync audit trail: Input/output error")

    h.audit.sync = broken_sync  # type: ignore[method-assign]
    h.submit([decision()])
    await wait_until(lambda: h.enforcer.in_flight == 0)
    h.audit.sync = real_sync  # type: ignore[method-assign]
    assert h.patches() == []
    [out] = h.outcomes()
    assert out["outcome"] == "failed" and "could not be synced" in out["error"]
    assert [e for e, _ in h.log.at("critical")] == ["audit_sync_failed"]
