"""The composition root (`daemon.service.assembly`): every object built through its
constructor, nothing wired after construction, no `Any` back-reference to the daemon, and a
reload's new `Scope` reaching every user."""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path

from typing import Any

import orjson
import pytest

from _daemon_harness import SALES, SUPPORT, sandbox_queue, write_config
from daemon.config import load_config, parse_config
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Decision
from daemon.genesys.ratelimit import Priority
from daemon.sandbox import Sandbox
from daemon.service import assembly
from daemon.service.control import start_control
from daemon.service.lifecycle import Daemon, State
from test_sources import daemon_with_fake_source

DAEMON = Path(__file__).resolve().parents[2] / "daemon"

#: Attributes that used to be set on another object after it was built (the wiring the
#: composition root replaced with constructor arguments).
WIRING = {"route_step", "before_rotate", "on_rate_limited", "gate", "stamp", "observers", "on_term", "on_lost",
          "mode", "max_per_minute", "enforcer", "failover", "on_message", "on_gap", "channel",
          "sync_before_patch", "on_send", "limiter", "ha_role", "state"}

CONFIG = """
schema_version: 1
genesys: {api_base_url: "https://api.example.test", login_base_url: "https://login.example.test"}
subscriptions: {queues: [Sales]}
rules:
  - name: flagged
    when: {purpose: external, attributes.complianceFlag: "true"}
    action: disconnect
audit: {path: audit.jsonl}
ops: {enabled: false}
"""


def _config(tmp_path: Path, extra: str = "") -> object:
    return parse_config(CONFIG + extra, file=str(tmp_path / "config.yaml"), base_dir=tmp_path)


def _own(target: ast.expr) -> bool:
    """`self`, or a private record of self's (`self._handover`): the object's own state."""
    if isinstance(target, ast.Name):
        return target.id == "self"
    return (isinstance(target, ast.Attribute) and target.attr.startswith("_")
            and isinstance(target.value, ast.Name) and target.value.id == "self")


def test_no_attribute_is_wired_onto_another_object_after_construction() -> None:
    found = []
    for path in sorted(DAEMON.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in WIRING and not _own(t.value):
                    found.append(f"{path.relative_to(DAEMON)}:{node.lineno}: {ast.unparse(t)} = ...")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "append" and isinstance(node.func.value, ast.Attribute)
                    and node.func.value.attr == "observers"):
                found.append(f"{path.relative_to(DAEMON)}:{node.lineno}: observers.append(...)")
    assert found == []


def test_no_any_back_reference_and_no_type_ignore_in_the_daemon() -> None:
    sig = inspect.signature(start_control)
    assert "daemon" not in sig.parameters
    assert all("Any" not in str(p.annotation) for p in sig.parameters.values())
    for name in ("service/lifecycle.py", "service/assembly.py", "service/control/__init__.py"):
        text = (DAEMON / name).read_text()
        assert "type: ignore" not in text, name
        assert "getattr(daemon" not in text, name
    assert Daemon.mode.fget is not None
    assert inspect.get_annotations(Daemon.mode.fget, eval_str=True)["return"] is not str


def test_stages_build_one_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", "id")
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", "secret")
    cfg = _config(tmp_path)
    core = assembly.build_core(cfg)  # type: ignore[arg-type]
    wired = assembly.connect(core, mode="enforce")
    assert wired.router.enforcer is wired.enforcer and wired.router.engine is core.engine
    assert wired.enforcer.engine is core.engine and wired.ha is None
    # the limiter was built with its 429 counter (no `limiter.on_rate_limited = ...` later)
    wired.client.limiter.rate_limited(Priority.RESYNC, 0.01)
    assert core.metrics.rate_limited.labels(priority="resync")._value.get() == 1
    # a step routed by the router reaches the accounts (per-source rejection counter)
    wired.audit.open()
    try:
        wired.router.frame(b"[]", 0.0, source="websocket")
    finally:
        wired.audit.close()
    assert core.metrics.events_rejected.labels(source="websocket", reason="not_object")._value.get() == 1


def test_ha_gate_is_built_before_the_audit_and_the_enforcer(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", "id")
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", "secret")
    cfg = _config(tmp_path, "ha: {backend: postgres, dsn: 'postgresql://u@127.0.0.1:1/x', node: host-a}\n")
    core = assembly.build_core(cfg)  # type: ignore[arg-type]
    wired = assembly.connect(core, mode="enforce")
    assert wired.ha is not None
    gate = wired.ha.gate
    assert wired.enforcer.gate is gate and wired.ha.takeover.gate is gate
    assert not gate.may_send()  # no lease: closed
    wired.audit.open()
    try:
        rec = wired.audit.write({"type": "note"})
    finally:
        wired.audit.close()
    assert rec["node"] == "host-a" and rec["epoch"] == gate.node.epoch
    # the typed hook: nothing recorded while the gate is closed; a standby outcome remembered
    d = Decision(rule=RuleName("flagged"), action="disconnect", conversation_id=ConversationId("c1"),
                 participant_id=ParticipantId("p1"), purpose="external", matched={}, severity="critical",
                 tags=(), message="m", decided_at=0.0, received_at=None)
    gate.decided(d, "enforce")
    gate.ended(d, "standby")
    assert gate.recent_standby(float("-inf")) == {"c1"}


async def test_reload_hands_the_new_scope_to_every_source_and_the_resyncer(
        sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox_queue(sandbox, SUPPORT, "Support")
    async with daemon_with_fake_source(sandbox, tmp_path, monkeypatch) as (daemon, source):
        first = daemon.scope
        assert first is not None and first.queue_ids == (SALES,)
        assert daemon.resyncer is not None and daemon.resyncer.scope is first
        write_config(tmp_path, sandbox.base_url, ops=False, queues=[SALES, SUPPORT])
        assert await asyncio.wait_for(daemon.reload(), 20)
        assert daemon.state in (State.RUNNING, State.DEGRADED)
        new = daemon.scope
        assert new is not None and new is not first and set(new.queue_ids) == {SALES, SUPPORT}
        assert first.queue_ids == (SALES,)  # the old value is untouched: replaced, not mutated
        assert source.scopes[-1] is new
        assert daemon.resyncer.scope is new
        # a rejected reload keeps the scope in force
        (tmp_path / "config.yaml").write_text("rules: [")
        assert not await asyncio.wait_for(daemon.reload(), 20)
        assert daemon.scope is new and source.scopes[-1] is new


def test_the_daemon_builds_stage_one_at_construction(tmp_path: Path) -> None:
    """`Daemon(config)` builds stage 1 at once (rules compiled, no secrets read)."""
    path = write_config(tmp_path, "https://api.example.test", ops=False)
    daemon = Daemon(load_config(path))
    assert daemon.wired is None and daemon.inputs is None and daemon.scope is None
    assert daemon.state is State.STARTING and daemon.engine is daemon.core.engine
    assert daemon.health().sources == {}


def test_the_checkpointer_builds_the_trail_it_closes_at_each_rotation(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With a signing key, stage 2 builds the audit trail through its Checkpointer (the
    rotation hook is a constructor argument, not `audit.before_rotate = ...`): each rotated
    file ends with a signed checkpoint record."""
    from daemon.service.audit import rotated_files
    from daemon.service.checkpoint import generate_keypair

    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", "id")
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", "secret")
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    cfg = parse_config(CONFIG.replace("audit: {path: audit.jsonl}",
                                      "audit: {path: audit.jsonl, max_bytes: 4096, signing_key_file: k.pem}"),
                       file=str(tmp_path / "config.yaml"), base_dir=tmp_path)
    wired = assembly.connect(assembly.build_core(cfg), mode="enforce")
    assert wired.checkpointer is not None and wired.checkpointer.audit is wired.audit
    wired.audit.open()
    try:
        for i in range(60):
            wired.audit.write({"type": "note", "pad": "x" * 100, "i": i})
    finally:
        wired.audit.close()
    rotated = rotated_files(wired.audit.path)
    assert len(rotated) >= 2 and wired.checkpointer.written >= len(rotated)
    for path in rotated:
        last = orjson.loads(path.read_bytes().splitlines()[-1])
        assert last["type"] == "checkpoint", path


def test_without_a_signing_key_the_trail_has_no_checkpointer(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", "id")
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", "secret")
    wired = assembly.connect(assembly.build_core(_config(tmp_path)), mode="enforce")  # type: ignore[arg-type]
    assert wired.checkpointer is None and wired.audit.path == tmp_path / "audit.jsonl"


def test_subscriptions_compression_reaches_the_stream_and_needs_a_restart(tmp_path: Path) -> None:
    """`subscriptions.compression` (default off) is the stream's `compression`; a reload
    cannot change it on live sockets, and says so."""
    from daemon.service.lifecycle import _restart_only_changes

    def config(extra: str) -> Any:
        return parse_config(f"""
genesys: {{api_base_url: "https://api.example.test", login_base_url: "https://login.example.test"}}
subscriptions: {{queues: ["{SALES}"]{extra}}}
rules: []
audit: {{path: "{tmp_path / 'audit.jsonl'}"}}
""", file="config.yaml", base_dir=tmp_path)

    off, on = config(""), config(", compression: true")
    assert off.subscriptions.compression is False
    assert assembly.stream_settings(off.subscriptions).compression is False
    assert assembly.stream_settings(on.subscriptions).compression is True
    assert assembly.stream_settings(on.subscriptions).heartbeat_timeout_factor == \
        on.subscriptions.heartbeat_timeout_factor
    assert "subscriptions.compression" in _restart_only_changes(off, on)
