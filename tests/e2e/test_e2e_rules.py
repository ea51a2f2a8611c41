"""End to end: the real Daemon against the Genesys sandbox over real sockets on 127.0.0.1.

The daemon is configured with the six example rules of the rule format (config.yaml), with
shorter times for tests: `hold_for: 2s` instead of 10 s and `connected_seconds: {gt: 3}`
instead of 600. The test drives the sandbox's world (calls, parties, attributes); every
change goes out as a notification over the daemon's WebSocket, and the daemon's PATCHes come
back over HTTP. What was sent is read from the sandbox's request journal; what was decided
from the daemon's real audit file.

Waits are bounded polls on conditions. The only timing assertion is the one the issue asks
for: a hold_for rule fires no earlier than the hold after the triggering event's publish time
and within one second after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from _rules_helpers import shipped_rule
from _wait import wait_until
from daemon.service.audit import verify
from daemon.config import Config, parse_config
from daemon.sandbox import Sandbox
from daemon.sandbox.world import Conversation, Party, World
from daemon.service.lifecycle import Daemon, State

SALES = "1b6a4d2e-7c3f-4e8a-9b1d-2f3e4a5b6c7d"
PAYMENTS = "0d5c7a44-3f2e-4b1a-8c9d-6e7f8a9b0c1d"
ALICE = "a11ce000-0000-4000-8000-000000000001"
BOB = "b0b00000-0000-4000-8000-000000000002"
SAM = "5a500000-0000-4000-8000-000000000003"  # supervisor, not trusted
TINA = "71a00000-0000-4000-8000-000000000004"  # supervisor, trusted
BLOCKED = "tel:+14155550999"
BLOCKED_LISTED = "+1 (415) 555-0999"  # as an operator writes it in the list file
HARMLESS = "tel:+14155550123"
HOLD = 2.0  # seconds, hold_for of third-party-needs-recording in these tests
MONITOR_LIMIT = 3  # seconds, supervisor-monitor-time-limit threshold in these tests
PATCH_BODY = {"state": "disconnected"}

RULES_YAML = "\nrules:\n" + "\n".join([
    shipped_rule("flagged-party", "severity: critical", "tags: [PCI-DSS-3.2.1]",
                 'message: "{party.purpose} {party.name} flagged by an upstream system on call {call.id}"'),
    shipped_rule("blocked-number-in-conference", "severity: critical"),
    shipped_rule("third-party-needs-recording", hold_for=f"{HOLD:g}s"),
    shipped_rule("supervisor-monitor-time-limit", monitor_limit=MONITOR_LIMIT),
    shipped_rule("no-outside-party-on-payments", "severity: critical", payments=PAYMENTS),
    shipped_rule("flagged-interaction", "severity: info"),
])


def make_config(tmp_path: Path, base_url: str, *, mode: str = "enforce",
                max_per_minute: int = 30) -> Config:
    (tmp_path / "blocked-numbers.txt").write_text(
        f"# numbers that must never join a conference\n{BLOCKED_LISTED}\n+442079460000\n")
    text = f"""
schema_version: 1
genesys:
  api_base_url: {base_url}
  login_base_url: {base_url}
  max_retries: 6
subscriptions:
  queues: [Sales, {PAYMENTS}]
  users: []
mode: {mode}
safety:
  max_disconnects_per_minute: {max_per_minute}
lists:
  blocked_numbers: {{file: blocked-numbers.txt}}
  trusted_supervisors: {{values: [{TINA}]}}
{RULES_YAML}
audit:
  path: audit/confguard-audit.jsonl
  fsync_interval: 0.2
ops:
  enabled: false
logging:
  level: info
"""
    return parse_config(text, file=str(tmp_path / "config.yaml"), base_dir=tmp_path)


# ------------------------------------------------------------------ harness


@dataclass
class Env:
    sb: Sandbox
    daemon: Daemon
    audit_path: Path

    @property
    def world(self) -> World:
        return self.sb.world

    def patches(self) -> list[Any]:
        return self.sb.journal.patches()

    def records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def outcomes(self, rule: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records()
                if r["type"] == "outcome" and (rule is None or r["rule"] == rule)]

    def decisions(self, rule: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records()
                if r["type"] == "decision" and (rule is None or r["rule"] == rule)]


def _world_sig(conv: Conversation) -> tuple[Any, ...]:
    return (conv.recording_state, tuple(sorted(
        (p.id, p.state, tuple(sorted(p.attributes.items())), p.flagged_reason)
        for p in conv.participants)))


def _store_sig(env: Env, cid: str) -> tuple[Any, ...] | None:
    call = env.daemon.engine.store.get(cid)  # type: ignore[arg-type]
    if call is None:
        return None
    return (call.recording_state, tuple(sorted(
        (p.id, p.state, tuple(sorted(p.attributes.items())), p.flagged_reason)
        for p in call.participants.values())))


async def synced(env: Env, convs: list[Conversation], timeout: float = 10.0) -> None:
    """Wait until the daemon's store shows every call exactly as the sandbox has it: every
    event published so far was received and judged (decisions are made in the receive turn)."""
    await wait_until(lambda: all(_store_sig(env, c.id) == _world_sig(c) for c in convs),
                what="the daemon's call store to catch up with the sandbox", timeout=timeout)


async def quiet(env: Env, seconds: float = 0.5) -> None:
    """No further PATCH arrives for `seconds` (a bounded check for 'nobody else')."""
    before = len(env.patches())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert len(env.patches()) == before, "an unexpected PATCH arrived"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(sb: Sandbox, cfg: Config, *, observe: bool = False) -> AsyncIterator[Daemon]:
    daemon = Daemon(cfg, observe=observe, drain_timeout=2.0)
    try:
        await asyncio.wait_for(daemon.start(), timeout=20.0)
        assert daemon.state is State.RUNNING
        yield daemon
    finally:
        await asyncio.wait_for(daemon.stop(), timeout=20.0)


@pytest.fixture
def populated(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """The sandbox with the queues and users of these tests, and the daemon's credentials
    in the environment (where confguard reads them)."""
    w = sandbox.world
    w.create_queue("Sales", SALES)
    w.create_queue("Payments", PAYMENTS)
    w.create_queue("Collections")  # out of scope
    for name, uid in (("Alice Agent", ALICE), ("Bob Agent", BOB), ("Sam Supervisor", SAM),
                      ("Tina Supervisor", TINA)):
        w.create_user(name, uid)
    for name in ("GENESYS_CLOUD_CLIENT_ID", "GENESYS_CLOUD_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sandbox.client_id)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sandbox.client_secret)
    return sandbox


@contextlib.asynccontextmanager
async def env_for(sb: Sandbox, tmp_path: Path, **cfg_kw: Any) -> AsyncIterator[Env]:
    observe = cfg_kw.pop("observe", False)
    cfg = make_config(tmp_path, sb.base_url, **cfg_kw)
    async with running(sb, cfg, observe=observe) as daemon:
        yield Env(sb, daemon, tmp_path / "audit" / "confguard-audit.jsonl")


# ------------------------------------------------------------------ world helpers


def new_call(w: World, queue: str = SALES, agent: str | None = ALICE, *,
             recorded: bool = False) -> Conversation:
    """Customer in `queue`, answered by `agent`; recording switched on when `recorded`."""
    conv = w.start_call(queue)
    if agent is not None:
        w.connect_agent(conv.id, agent)
    if recorded:
        w.set_recording(conv.id, "active")
    return conv


async def harmless_call(env: Env) -> Conversation:
    """A recorded Sales call with a harmless external added (no rule breaks yet), once the
    daemon's store has it."""
    conv = new_call(env.world, recorded=True)
    env.world.add_external(conv.id, HARMLESS)
    await synced(env, [conv])
    return conv


def party(conv: Conversation, purpose: str, nth: int = 0) -> Party:
    return [p for p in conv.participants if p.purpose == purpose][nth]


def quietly_leave(conv: Conversation, p: Party) -> None:
    """Mark a party gone in the sandbox without publishing (the next event carries it):
    the only way to build a two-party call around an external with the sandbox's ops."""
    p.state, p.disconnect_type, p.end_time = "disconnected", "transfer", time.time()


@dataclass
class Scenario:
    """Calls built for one rule: who must be removed (or observed) and who must stay."""

    calls: list[Conversation] = field(default_factory=list)
    targets: list[tuple[str, str]] = field(default_factory=list)  # (conversation, participant)

    def add(self, conv: Conversation) -> Conversation:
        self.calls.append(conv)
        return conv

    def bystanders(self) -> list[tuple[str, str]]:
        return [(c.id, p.id) for c in self.calls for p in c.participants
                if p.live and (c.id, p.id) not in self.targets]


def flagged_party(w: World) -> Scenario:
    s = Scenario()
    a = s.add(new_call(w, recorded=True))
    w.add_external(a.id, HARMLESS, name="Partner")
    w.set_attributes(a.id, party(a, "customer").id, {"complianceFlag": "true"})
    s.targets.append((a.id, party(a, "customer").id))
    # almost: the flag is "false"; the flagged party is an agent
    b = s.add(new_call(w, agent=BOB, recorded=True))
    w.add_external(b.id, HARMLESS)
    w.set_attributes(b.id, party(b, "customer").id, {"complianceFlag": "false"})
    w.set_attributes(b.id, party(b, "agent").id, {"complianceFlag": "true"})
    return s


def blocked_number(w: World) -> Scenario:
    s = Scenario()
    a = s.add(new_call(w, recorded=True))
    ext = w.add_external(a.id, BLOCKED, name="Blocked")
    s.targets.append((a.id, ext.id))
    # almost: the blocked number with only two connected parties (agent and external)
    b = s.add(new_call(w, agent=BOB, recorded=True))
    quietly_leave(b, party(b, "customer"))
    w.add_external(b.id, BLOCKED)
    # almost: a three-party conference with a number not on the list
    c = s.add(new_call(w, recorded=True))
    w.add_external(c.id, HARMLESS)
    return s


def third_party_recording(w: World) -> Scenario:
    s = Scenario()
    a = s.add(new_call(w))  # not recorded
    ext = w.add_external(a.id, HARMLESS)
    s.targets.append((a.id, ext.id))
    # almost: an external on a recorded call
    b = s.add(new_call(w, agent=BOB, recorded=True))
    w.add_external(b.id, HARMLESS)
    return s


def supervisor_limit(w: World) -> Scenario:
    s = Scenario()
    # almost: a trusted supervisor monitoring; an untrusted one coaching (no monitor id)
    b = s.add(new_call(w, agent=BOB))
    w.add_supervisor(b.id, TINA, party(b, "agent").id, "monitor")
    c = s.add(new_call(w, agent=BOB))
    w.add_supervisor(c.id, SAM, party(c, "agent").id, "coach")
    a = s.add(new_call(w))
    sup = w.add_supervisor(a.id, SAM, party(a, "agent").id, "monitor")
    s.targets.append((a.id, sup.id))
    return s


def payments(w: World) -> Scenario:
    s = Scenario()
    a = s.add(new_call(w, PAYMENTS, recorded=True))
    ext = w.add_external(a.id, HARMLESS)
    s.targets.append((a.id, ext.id))
    # almost: an external on a Sales call; a Payments call without an outside party
    b = s.add(new_call(w, SALES, agent=BOB, recorded=True))
    w.add_external(b.id, HARMLESS)
    c = s.add(new_call(w, PAYMENTS, agent=BOB, recorded=True))
    w.add_agent(c.id, ALICE)
    return s


def flagged_interaction(w: World) -> Scenario:
    s = Scenario()
    a = s.add(new_call(w, recorded=True))
    w.set_flag(a.id, party(a, "customer").id, "general")
    b = s.add(new_call(w, agent=BOB, recorded=True))
    w.set_attributes(b.id, party(b, "customer").id, {"riskScore": "85"})
    s.targets += [(a.id, party(a, "customer").id), (b.id, party(b, "customer").id)]
    # almost: a risk score of 79; a flagged agent
    c = s.add(new_call(w, recorded=True))
    w.set_attributes(c.id, party(c, "customer").id, {"riskScore": "79"})
    w.set_flag(c.id, party(c, "agent").id, "general")
    return s


SCENARIOS: dict[str, Callable[[World], Scenario]] = {
    "flagged-party": flagged_party,
    "blocked-number-in-conference": blocked_number,
    "third-party-needs-recording": third_party_recording,
    "supervisor-monitor-time-limit": supervisor_limit,
    "no-outside-party-on-payments": payments,
    "flagged-interaction": flagged_interaction,
}
DISCONNECT_RULES = [r for r in SCENARIOS if r != "flagged-interaction"]


def patch_path(cid: str, pid: str) -> str:
    return f"/api/v2/conversations/calls/{cid}/participants/{pid}"


def live_in_world(w: World, cid: str, pid: str) -> bool:
    return w.get_call(cid).party(pid).live


# ------------------------------------------------------------------ every example rule


@pytest.mark.parametrize("rule", DISCONNECT_RULES)
async def test_example_rule_removes_exactly_the_intended_party(
        populated: Sandbox, tmp_path: Path, rule: str) -> None:
    async with env_for(populated, tmp_path) as env:
        s = SCENARIOS[rule](env.world)
        [(cid, pid)] = s.targets
        await wait_until(lambda: any(o["outcome"] == "disconnected" for o in env.outcomes(rule)),
                    what=f"{rule}: outcome 'disconnected' in the audit", timeout=15.0)
        await synced(env, s.calls)
        await quiet(env)

        # exactly one PATCH in the whole journal, for the intended party, with the right body
        [patch] = env.patches()
        assert patch.path == patch_path(cid, pid)
        assert patch.body == PATCH_BODY
        assert 200 <= patch.status < 300
        assert not live_in_world(env.world, cid, pid)
        # nobody else touched: every other party is still connected
        for ocid, opid in s.bystanders():
            assert env.world.get_call(ocid).party(opid).state == "connected", (ocid, opid)
        # nothing else was even decided (the almost-matching parties did not match)
        assert [(d["rule"], d["conversation_id"], d["participant_id"]) for d in env.decisions()] \
            == [(rule, cid, pid)]
        [dec] = env.decisions()
        assert dec["mode"] == "enforce" and dec["action"] == "disconnect" and dec["matched"]
        [out] = env.outcomes()
        assert out["outcome"] == "disconnected" and out["attempts"] == 1 and out["error"] is None
        assert out["event_to_request_ms"] is not None and out["event_to_request_ms"] >= 0


async def test_observe_rule_audits_and_sends_nothing(populated: Sandbox, tmp_path: Path) -> None:
    rule = "flagged-interaction"
    async with env_for(populated, tmp_path) as env:
        s = SCENARIOS[rule](env.world)
        await wait_until(lambda: len(env.outcomes(rule)) == 2, what=f"{rule}: two outcome records")
        await synced(env, s.calls)
        await quiet(env)
        assert env.patches() == []
        assert sorted((d["conversation_id"], d["participant_id"]) for d in env.decisions()) \
            == sorted(s.targets)
        assert {d["rule"] for d in env.decisions()} == {rule}
        assert all(d["action"] == "observe" and d["mode"] == "enforce" for d in env.decisions())
        assert {o["outcome"] for o in env.outcomes()} == {"observed"}
        for c in s.calls:
            assert all(p.live for p in c.participants if p.purpose != "acd")


# ------------------------------------------------------------------ observe mode


@pytest.mark.parametrize("how", ["--observe", "mode: observe"])
async def test_observe_mode_sends_nothing_and_audits_everything(
        populated: Sandbox, tmp_path: Path, how: str) -> None:
    kw: dict[str, Any] = {"observe": True} if how == "--observe" else {"mode": "observe"}
    async with env_for(populated, tmp_path, **kw) as env:
        assert env.daemon.mode == "observe"
        scenarios = {rule: make(env.world) for rule, make in SCENARIOS.items()}
        expected = {(rule, cid, pid) for rule, s in scenarios.items() for cid, pid in s.targets}
        await wait_until(lambda: {(o["rule"], o["conversation_id"], o["participant_id"])
                             for o in env.outcomes()} >= expected,
                    what="an 'observed' outcome for every intended party", timeout=15.0)
        await synced(env, [c for s in scenarios.values() for c in s.calls])
        await quiet(env)
        assert env.patches() == []
        assert not [r for r in env.sb.journal.requests if r.method in ("PATCH", "POST", "DELETE")
                    and "/conversations/" in r.path and "analytics" not in r.path]
        got = {(d["rule"], d["conversation_id"], d["participant_id"]) for d in env.decisions()}
        assert got == expected
        assert all(d["mode"] == "observe" for d in env.decisions())
        assert {o["outcome"] for o in env.outcomes()} == {"observed"}
        for s in scenarios.values():
            for cid, pid in s.targets:
                assert live_in_world(env.world, cid, pid)


# ------------------------------------------------------------------ hold_for timing


async def test_hold_for_never_fires_early_and_fires_within_a_second_after(
        populated: Sandbox, tmp_path: Path) -> None:
    rule = "third-party-needs-recording"
    async with env_for(populated, tmp_path) as env:
        w = env.world
        conv = new_call(w)
        w.set_recording(conv.id, "active")
        ext = w.add_external(conv.id, HARMLESS)
        await synced(env, [conv])
        # Recording stops: the condition starts holding with this event.
        w.set_recording(conv.id, "none")
        first = env.sb.journal.events[-1]
        assert first.conversation_id == conv.id and first.sockets == 1
        # Interrupt the hold half-way: recording resumes, then stops again.
        await asyncio.sleep(HOLD / 4)
        assert env.patches() == [], "fired before the hold elapsed"
        w.set_recording(conv.id, "active")
        await synced(env, [conv])
        await asyncio.sleep(0.2)
        w.set_recording(conv.id, "none")
        trigger = env.sb.journal.events[-1]
        assert trigger.conversation_id == conv.id
        await wait_until(lambda: len(env.patches()) == 1, what="the hold_for PATCH", timeout=HOLD + 5)
        [patch] = env.patches()
        assert patch.path == patch_path(conv.id, ext.id) and patch.body == PATCH_BODY
        waited = patch.time - trigger.time
        assert waited >= HOLD, f"fired {waited:.3f} s after the triggering event (< {HOLD} s)"
        assert waited <= HOLD + 1.0, f"fired {waited:.3f} s after the triggering event"
        # the first, interrupted hold did not fire
        assert patch.time - first.time >= HOLD + HOLD / 4 + 0.2
        await wait_until(lambda: len(env.outcomes(rule)) == 1, what="the outcome record")
        assert env.outcomes(rule)[0]["outcome"] == "disconnected"


# ------------------------------------------------------------------ safety valve


async def flag_four(env: Env, rule: str) -> None:
    """Four recorded calls with a harmless external each, then each customer flagged (a
    `rule` breaker); returns once the four outcomes are audited, nothing is in flight and
    the store has caught up with the sandbox."""
    w = env.world
    calls = []
    for _ in range(4):
        c = new_call(w, recorded=True)
        w.add_external(c.id, HARMLESS)
        calls.append(c)
    for c in calls:
        w.set_attributes(c.id, party(c, "customer").id, {"complianceFlag": "true"})
    await wait_until(lambda: len(env.outcomes(rule)) == 4, what="four outcome records")
    await wait_until(lambda: env.daemon.enforcer is not None and env.daemon.enforcer.in_flight == 0,
                what="in-flight disconnects to finish")
    await synced(env, calls)


async def test_safety_valve_trips_after_max_and_suppresses_the_rest(
        populated: Sandbox, tmp_path: Path) -> None:
    rule = "flagged-party"
    async with env_for(populated, tmp_path, max_per_minute=2) as env:
        await flag_four(env, rule)
        await quiet(env)
        assert len(env.patches()) == 2
        outcomes = sorted(o["outcome"] for o in env.outcomes(rule))
        assert outcomes == ["disconnected", "disconnected", "suppressed", "suppressed"]
        sent = {p.path for p in env.patches()}
        for o in env.outcomes(rule):
            path = patch_path(o["conversation_id"], o["participant_id"])
            assert (path in sent) == (o["outcome"] == "disconnected")
            if o["outcome"] == "suppressed":
                assert "safety valve" in o["error"]
                assert live_in_world(env.world, o["conversation_id"], o["participant_id"])
        assert env.daemon.safety.tripped
        assert env.daemon.metrics.safety_valve_tripped._value.get() == 1


async def test_resuming_the_valve_acts_at_once_on_quiet_calls(
        populated: Sandbox, tmp_path: Path) -> None:
    """SIGUSR1 (the daemon's handler) resets the valve and the parties it held back are
    removed at once from the state in memory: their calls have no further event."""
    rule = "flagged-party"
    async with env_for(populated, tmp_path, max_per_minute=2) as env:
        await flag_four(env, rule)
        held = [(o["conversation_id"], o["participant_id"]) for o in env.outcomes(rule)
                if o["outcome"] == "suppressed"]
        assert len(held) == 2 and len(env.patches()) == 2
        env.daemon.resume_enforcement()  # what SIGUSR1 calls
        assert not env.daemon.safety.tripped
        assert env.daemon.metrics.safety_valve_tripped._value.get() == 0
        # acted on in the same turn: both PATCH tasks exist before any event could arrive
        assert env.daemon.enforcer is not None and env.daemon.enforcer.in_flight == 2
        await wait_until(lambda: len(env.patches()) == 4, what="the held parties' PATCHes")
        sent = {p.path for p in env.patches()}
        for cid, pid in held:
            assert patch_path(cid, pid) in sent
            await wait_until(lambda c=cid, p=pid: not live_in_world(env.world, c, p), what="the held party to leave")
        await wait_until(lambda: sum(o["outcome"] == "disconnected" for o in env.outcomes(rule)) == 4,
                    what="four disconnected outcomes")
        await quiet(env)
        assert len(env.patches()) == 4
        assert verify([env.audit_path]).ok


# ------------------------------------------------------------------ 429 and 5xx bursts


async def test_disconnect_lands_exactly_once_through_429_and_5xx_bursts(
        populated: Sandbox, tmp_path: Path) -> None:
    rule = "flagged-party"
    async with env_for(populated, tmp_path) as env:
        w = env.world
        conv = await harmless_call(env)
        target = party(conv, "customer")
        path = patch_path(conv.id, target.id)
        pattern = r"/participants/[^/]+$"
        env.sb.faults.add_burst("PATCH", pattern, 503, 2)
        env.sb.faults.add_burst("PATCH", pattern, 429, 2, retry_after=1)
        w.set_attributes(conv.id, target.id, {"complianceFlag": "true"})
        await wait_until(lambda: len(env.outcomes(rule)) == 1, what="the outcome record", timeout=20.0)
        await synced(env, [conv])
        await quiet(env)
        statuses = [p.status for p in env.patches()]
        # the bursts were answered in order, the client retried through them, one 2xx
        assert statuses[:4] == [503, 503, 429, 429], statuses
        assert all(p.path == path and p.body == PATCH_BODY for p in env.patches())
        ok = [p for p in env.patches() if 200 <= p.status < 300]
        assert len(ok) == 1, statuses
        [out] = env.outcomes(rule)
        assert out["outcome"] == "disconnected" and out["attempts"] == 1
        assert not live_in_world(w, conv.id, target.id)
        assert all(p.live for p in conv.participants if p.id != target.id and p.purpose != "acd")


def _count(histogram: Any) -> float:
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return float(sample.value)
    return 0.0


async def test_party_leaving_while_the_patch_is_in_flight_is_already_gone(
        populated: Sandbox, tmp_path: Path) -> None:
    rule = "flagged-party"
    async with env_for(populated, tmp_path) as env:
        w, sb = env.world, env.sb
        conv = await harmless_call(env)
        target = party(conv, "customer")
        # Genesys refusing a PATCH for a party that is no longer connected; every API
        # request held 1 s before it is handled.
        sb.patch_final_status = 400
        sb.faults.latency = 1.0
        w.set_attributes(conv.id, target.id, {"complianceFlag": "true"})
        await wait_until(lambda: _count(env.daemon.metrics.event_to_request_seconds) == 1,
                    what="the PATCH to be handed to the client")
        w.disconnect(conv.id, target.id, "endpoint")  # the customer hangs up meanwhile
        await wait_until(lambda: len(env.outcomes(rule)) == 1, what="the outcome record", timeout=15.0)
        sb.faults.latency = 0.0
        await quiet(env)
        [patch] = env.patches()
        assert patch.status == 400 and patch.path == patch_path(conv.id, target.id)
        [out] = env.outcomes(rule)
        assert out["outcome"] == "already_gone", out
        assert out["http_status"] == 400 and out["attempts"] == 1
        assert all(p.live for p in conv.participants if p.id != target.id and p.purpose != "acd")


async def test_missing_permission_fails_loudly_then_rearmed_rule_acts_on_next_event(
        populated: Sandbox, tmp_path: Path) -> None:
    rule = "flagged-party"
    perm = "conversation:communication:disconnect"
    async with env_for(populated, tmp_path) as env:
        w, sb = env.world, env.sb
        conv = await harmless_call(env)
        target = party(conv, "customer")
        w.clients[sb.client_id].permissions.discard(perm)
        w.set_attributes(conv.id, target.id, {"complianceFlag": "true"})
        await wait_until(lambda: len(env.outcomes(rule)) == 1, what="the failed outcome")
        [failed] = env.outcomes(rule)
        assert failed["outcome"] == "failed" and failed["http_status"] == 403
        assert perm in failed["error"]
        assert [p.status for p in env.patches()] == [403]
        assert target.live
        # The permission is granted; the failed rule was re-armed, so the next change to the
        # call acts (an unchanged republish is a duplicate and changes nothing).
        w.clients[sb.client_id].permissions.add(perm)
        w.set_attributes(conv.id, party(conv, "agent").id, {"wrapupHint": "none"})
        await wait_until(lambda: len(env.outcomes(rule)) == 2, what="the second outcome")
        assert env.outcomes(rule)[1]["outcome"] == "disconnected"
        assert [p.status for p in env.patches()] == [403, 202]
        assert not target.live
        assert len(env.decisions(rule)) == 2


async def test_stop_drains_in_flight_disconnects_within_the_bound(
        populated: Sandbox, tmp_path: Path) -> None:
    rule = "flagged-party"
    cfg = make_config(tmp_path, populated.base_url)
    audit_path = tmp_path / "audit" / "confguard-audit.jsonl"
    w, sb = populated.world, populated
    daemon = Daemon(cfg, drain_timeout=1.0)
    await asyncio.wait_for(daemon.start(), timeout=20.0)
    try:
        env = Env(sb, daemon, audit_path)
        conv = await harmless_call(env)
        sb.faults.latency = 30.0  # the PATCH will not be answered before the drain bound
        w.set_attributes(conv.id, party(conv, "customer").id, {"complianceFlag": "true"})
        await wait_until(lambda: _count(daemon.metrics.event_to_request_seconds) == 1,
                    what="the PATCH to be handed to the client")
        assert daemon.enforcer is not None and daemon.enforcer.in_flight == 1
    finally:
        started = time.monotonic()
        await asyncio.wait_for(daemon.stop(), timeout=20.0)
        sb.faults.latency = 0.0
    assert time.monotonic() - started < 15.0  # drain bound 1 s + the stream's own 5 s bound
    assert daemon.state is State.STOPPED
    [out] = [r for r in env.records() if r["type"] == "outcome" and r["rule"] == rule]
    assert out["outcome"] == "unconfirmed" and "abandoned" in out["error"]
    assert verify([audit_path]).ok


# ------------------------------------------------------------------ audit verify


async def test_audit_verify_passes_on_a_real_run_and_catches_tampering(
        populated: Sandbox, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    async with env_for(populated, run_dir) as env:
        s = flagged_party(env.world)
        s2 = flagged_interaction(env.world)
        await wait_until(lambda: len(env.outcomes()) >= 3, what="the run's outcome records")
        await synced(env, s.calls + s2.calls)
        audit_path = env.audit_path
    # the daemon has stopped: the trail is closed and fsynced
    report = verify([audit_path])
    assert report.ok, report.problem
    assert report.records >= 6
    lines = audit_path.read_bytes().splitlines(keepends=True)
    assert any(b'"outcome":"disconnected"' in line for line in lines)

    changed = tmp_path / "changed.jsonl"
    data = audit_path.read_bytes()
    at = data.index(b'"outcome":"disconnected"') + len(b'"outcome":"disconnecte')
    changed.write_bytes(data[:at] + b"r" + data[at + 1:])  # one byte: disconnected -> disconnecter
    assert len(changed.read_bytes()) == len(data)
    bad = verify([changed])
    assert not bad.ok and bad.problem is not None and "changed" in bad.problem

    deleted = tmp_path / "deleted.jsonl"
    deleted.write_bytes(b"".join(lines[:2] + lines[3:]))
    bad = verify([deleted])
    assert not bad.ok and bad.problem is not None and ":3:" in bad.problem

    intact = tmp_path / "intact.jsonl"
    shutil.copyfile(audit_path, intact)
    assert verify([intact]).ok
