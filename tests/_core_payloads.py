"""Builders for Genesys-shaped call conversation payloads (event and REST shapes), for the
events/state/engine tests. Field names follow the SDK models
QueueConversationCallEventTopicCallMediaParticipant and CallMediaParticipant."""

from __future__ import annotations

from typing import Any

import orjson


def party(pid: str, *, purpose: str = "customer", state: str = "connected", rest: bool = False,
          **extra: Any) -> dict[str, Any]:
    """One participant; `rest=True` gives REST-style refs (DomainEntityRef with selfUri)."""
    ref_extra: dict[str, Any] = {"selfUri": "/api/v2/x"} if rest else {"name": "n"}
    p: dict[str, Any] = {
        "id": pid,
        "name": f"name {pid}",
        "address": "tel:+14155550100",
        "ani": "tel:+14155550100",
        "dnis": "tel:+18005550199",
        "startTime": "2026-11-21T09:15:00.000Z",
        "connectedTime": "2026-11-21T09:15:02.345Z",
        "purpose": purpose,
        "state": state,
        "initialState": "alerting",
        "direction": "inbound",
        "held": False,
        "muted": False,
        "confined": False,
        "recording": False,
        "provider": "Edge",
        "wrapupRequired": False,
        "mediaRoles": ["full"],
        "attributes": {"flow": "main"},
        "unknownNewField": {"nested": [1, 2, 3]},
    }
    if purpose in ("agent", "user"):
        p["user"] = {"id": f"user-{pid}", **ref_extra}
    if purpose in ("acd", "agent"):
        p["queue"] = {"id": "queue-1", **ref_extra}
    p.update(extra)
    return p


def conversation(cid: str, parties: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": cid,
        "name": "call",
        "participants": parties,
        "recordingState": "none",
        "securePause": False,
        "maxParticipants": 6,
        "divisions": [{"division": {"id": "d1"}, "entities": [{"id": "e1"}]}],
        "otherMediaUris": [],
    }
    body.update(extra)
    return body


def frame(body: Any, topic: str = "v2.routing.queues.queue-1.conversations.calls") -> bytes:
    return orjson.dumps({"topicName": topic, "version": "2", "eventBody": body,
                         "metadata": {"CorrelationId": "c-1"}})
