"""The daemon's hot path says something about every malformed frame: one `event_rejected`
line with its reason and one count in `confguard_events_rejected{reason}` per frame, for a
frame refused whole (2 MB) and for one applied in part (a participant without an id, a
string where a boolean belongs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import structlog

from daemon.config import Credentials, load_lists, parse_config
from daemon.core.engine import Engine
from daemon.core.rules import RuleEngine, compile_rules
from daemon.core.state import CallStore
from daemon.genesys.api import GenesysClient
from daemon.service.audit import AuditLog
from daemon.service.enforcer import Enforcer
from daemon.service.metrics import Metrics
from daemon.service.router import EventRouter, StepAccounts

TOPIC = "v2.routing.queues.1b6a4d2e-7c3f-4e8a-9b1d-2f3e4a5b6c7d.conversations.calls"
T0 = 1_795_000_000.0


def _router(tmp_path: Path) -> EventRouter:
    """The daemon's event router over a real engine, enforcer and audit (an observe rule:
    the client is never asked anything)."""
    text = ("subscriptions: {queues: [Sales]}\n"
            "rules:\n  - name: r\n    when: {purpose: external}\n    action: observe\n"
            "audit: {path: audit.jsonl}\nops: {enabled: false}\n")
    cfg = parse_config(text, file=str(tmp_path / "config.yaml"), base_dir=tmp_path)
    engine = Engine(RuleEngine(compile_rules(cfg, load_lists(cfg))), CallStore())
    metrics = Metrics()
    client = GenesysClient(cfg.genesys, Credentials("id", "secret"))
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20)
    audit.open()
    accounts = StepAccounts(engine, metrics)
    enforcer = Enforcer(client, audit, engine, mode="enforce", metrics=metrics,
                        note_step=accounts.note_rest)
    return EventRouter(engine, enforcer, accounts, client, metrics, on_gap=lambda reason: None)


def _frame(*parties: dict[str, Any], cid: str = "c1") -> bytes:
    return orjson.dumps({"topicName": TOPIC, "eventBody": {"id": cid, "participants": list(parties)}})


def _count(d: EventRouter, reason: str) -> float:
    return d._metrics.events_rejected.labels(source="websocket", reason=reason)._value.get()


def test_each_malformed_frame_is_counted_and_logged_once(tmp_path: Path) -> None:
    d = _router(tmp_path)
    ok = {"id": "a", "purpose": "customer", "state": "connected"}
    cases = [
        ("participant_missing_id", _frame(ok, {"purpose": "external", "state": "connected"})),
        ("bad_field", _frame({**ok, "held": "yes"}, cid="c2")),
        ("too_large", _frame({**ok, "attributes": {"blob": "x" * (2 << 20)}}, cid="c3")),
    ]
    for reason, raw in cases:
        with structlog.testing.capture_logs() as logs:
            d.frame(raw, T0, source="websocket")
        lines = [e for e in logs if e["event"] == "event_rejected"]
        assert len(lines) == 1, (reason, logs)
        assert lines[0]["reason"] == reason and lines[0]["reasons"] == [reason]
        assert lines[0]["log_level"] == "warning" and lines[0]["excerpt"]
        assert lines[0]["applied"] is (reason != "too_large")
        assert _count(d, reason) == 1
    # applied in part: the good parts are in the state; the oversized frame is not
    assert d.engine.store.get("c1") is not None and d.engine.store.get("c2") is not None
    assert d.engine.store.get("c3") is None
    # a clean frame says nothing
    with structlog.testing.capture_logs() as logs:
        d.frame(_frame(ok, cid="c4"), T0 + 1, source="websocket")
    assert not [e for e in logs if e["event"] == "event_rejected"]
