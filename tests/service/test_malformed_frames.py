"""The daemon's hot path says something about every malformed frame: one `event_rejected`
line with its reason and one count in `confguard_events_rejected{reason}` per frame, for a
frame refused whole (2 MB) and for one applied in part (a participant without an id, a
string where a boolean belongs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import structlog

from daemon.config import parse_config
from daemon.service.lifecycle import Daemon

TOPIC = "v2.routing.queues.1b6a4d2e-7c3f-4e8a-9b1d-2f3e4a5b6c7d.conversations.calls"
T0 = 1_795_000_000.0


def _daemon(tmp_path: Path) -> Daemon:
    text = ("subscriptions: {queues: [Sales]}\n"
            "rules:\n  - name: r\n    when: {purpose: external}\n    action: observe\n"
            "audit: {path: audit.jsonl}\nops: {enabled: false}\n")
    return Daemon(parse_config(text, file=str(tmp_path / "config.yaml"), base_dir=tmp_path))


def _frame(*parties: dict[str, Any], cid: str = "c1") -> bytes:
    return orjson.dumps({"topicName": TOPIC, "eventBody": {"id": cid, "participants": list(parties)}})


def _count(d: Daemon, reason: str) -> float:
    return d.metrics.events_rejected.labels(reason=reason)._value.get()


def test_each_malformed_frame_is_counted_and_logged_once(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    ok = {"id": "a", "purpose": "customer", "state": "connected"}
    cases = [
        ("participant_missing_id", _frame(ok, {"purpose": "external", "state": "connected"})),
        ("bad_field", _frame({**ok, "held": "yes"}, cid="c2")),
        ("too_large", _frame({**ok, "attributes": {"blob": "x" * (2 << 20)}}, cid="c3")),
    ]
    for reason, raw in cases:
        with structlog.testing.capture_logs() as logs:
            d._on_message(raw, T0)
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
        d._on_message(_frame(ok, cid="c4"), T0 + 1)
    assert not [e for e in logs if e["event"] == "event_rejected"]
