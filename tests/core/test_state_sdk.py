"""CallStore reads every kept field under the names the official SDK serializes (REST
CallConversation and both call-topic event models), so no field name is guessed."""

from __future__ import annotations

import datetime
import importlib
from typing import Any

import pytest

from daemon.core.state import CallStore

pytest.importorskip("PureCloudPlatformClientV2")

MODELS = [
    ("call_conversation", "CallConversation", "call_media_participant", "CallMediaParticipant"),
    ("queue_conversation_call_event_topic_call_conversation",
     "QueueConversationCallEventTopicCallConversation",
     "queue_conversation_call_event_topic_call_media_participant",
     "QueueConversationCallEventTopicCallMediaParticipant"),
    ("conversation_call_event_topic_call_conversation", "ConversationCallEventTopicCallConversation",
     "conversation_call_event_topic_call_media_participant",
     "ConversationCallEventTopicCallMediaParticipant"),
]


def _model(mod: str, cls: str) -> Any:
    return getattr(importlib.import_module(f"PureCloudPlatformClientV2.models.{mod}"), cls)


@pytest.mark.parametrize(("conv_mod", "conv_cls", "part_mod", "part_cls"), MODELS)
def test_sdk_serialized_conversation(conv_mod: str, conv_cls: str, part_mod: str, part_cls: str) -> None:
    from PureCloudPlatformClientV2.api_client import ApiClient

    part = _model(part_mod, part_cls)()
    ref_type = part.swagger_types["user"]
    ref_mod = "".join("_" + c.lower() if c.isupper() else c for c in ref_type).lstrip("_")

    def ref(value: str) -> Any:
        r = _model(ref_mod, ref_type)()
        r.id = value
        return r

    values: dict[str, Any] = {
        "id": "p1", "name": "Pat", "address": "tel:+1", "ani": "tel:+2", "dnis": "tel:+3",
        "purpose": "external", "state": "disconnected", "direction": "outbound",
        "disconnect_type": "client", "held": True, "muted": True, "confined": False, "recording": True,
        "connected_time": datetime.datetime(2026, 11, 21, 9, 15, 2, 345000),
        "end_time": datetime.datetime(2026, 11, 21, 9, 20, 2, 345000),
        "user": ref("u1"), "queue": ref("q1"), "team": ref("t1"), "external_contact": ref("ec1"),
        "external_organization": ref("eo1"), "attributes": {"k": "v"}, "flagged_reason": "general",
        "provider": "Edge", "monitored_participant_id": "m1", "coached_participant_id": "c1",
        "barged_participant_id": "b1",
    }
    for key, value in values.items():
        setattr(part, key, value)
    conv = _model(conv_mod, conv_cls)()
    conv.id = "conv-1"
    conv.participants = [part]
    conv.recording_state = "active"
    conv.secure_pause = True
    body = ApiClient().sanitize_for_serialization(conv)

    change = CallStore().apply(body, 1.0)
    assert change is not None
    p = change.changed[0]
    assert (p.id, p.name, p.address, p.ani, p.dnis) == ("p1", "Pat", "tel:+1", "tel:+2", "tel:+3")
    assert (p.purpose, p.state, p.direction, p.disconnect_type) == ("external", "disconnected", "outbound", "client")
    assert (p.held, p.muted, p.confined, p.recording) == (True, True, False, True)
    assert p.connected_time == pytest.approx(1_795_252_502.345)
    assert p.end_time == pytest.approx(1_795_252_802.345)
    assert (p.user_id, p.queue_id, p.team_id) == ("u1", "q1", "t1")
    assert (p.external_contact_id, p.external_organization_id) == ("ec1", "eo1")
    assert p.attributes == {"k": "v"} and p.flagged_reason == "general" and p.provider == "Edge"
    assert (p.monitored_participant_id, p.coached_participant_id, p.barged_participant_id) == ("m1", "c1", "b1")
    assert change.call.recording_state == "active" and change.call.secure_pause is True
    assert change.call.queue_ids == {"q1"} and change.call.ended_at == 1.0
