"""Conformance of everything the sandbox emits with the official SDK models.

Every key of every event and REST reply (recursively; except the deliberate unknown
`sandboxExtra*` fields) must be a JSON name in the matching model's `attribute_map`, nested
values are checked against `swagger_types`, and every enum value must be one of the model
setter's `allowed_values` (parsed from the SDK source, matched exactly, because the SDK
setters silently accept unknown values as "outdated_sdk_version").
"""

from __future__ import annotations

import ast
import inspect
import re
from functools import cache
from typing import Any

import pytest
from sandbox_fixtures import SandboxClient, Socket

from daemon.sandbox import Sandbox
from daemon.sandbox.wire import EXTRA_PREFIX

models = pytest.importorskip("PureCloudPlatformClientV2.models")

_DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_PRIMITIVE: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "float": (float, int), "object": (object,),
    "datetime": (str,), "date": (str,),
}


@cache
def _model(name: str) -> Any:
    return getattr(models, name)


@cache
def _maps(name: str) -> tuple[dict[str, str], dict[str, str]]:
    """(JSON name -> python name, python name -> swagger type) of an SDK model."""
    inst = _model(name)()  # the maps are set per instance in __init__
    return {j: py for py, j in inst.attribute_map.items()}, dict(inst.swagger_types)


@cache
def allowed_values(model: str, attr: str) -> list[str] | None:
    prop = getattr(_model(model), attr, None)
    if not isinstance(prop, property) or prop.fset is None:
        return None
    m = re.search(r"allowed_values = (\[.*?\])", inspect.getsource(prop.fset), re.S)
    return list(ast.literal_eval(m.group(1))) if m else None


class Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.seen: set[tuple[str, str]] = set()

    def check(self, value: Any, typ: str, where: str) -> None:
        if value is None:
            return
        m = re.fullmatch(r"list\[(.+)\]", typ)
        if m:
            if not isinstance(value, list):
                self.problems.append(f"{where}: expected list, got {value!r}")
                return
            for i, v in enumerate(value):
                self.check(v, m.group(1), f"{where}[{i}]")
            return
        m = re.fullmatch(r"dict\(str, (.+)\)", typ)
        if m:
            if not isinstance(value, dict):
                self.problems.append(f"{where}: expected object, got {value!r}")
                return
            for k, v in value.items():
                self.check(v, m.group(1), f"{where}.{k}")
            return
        if typ in _PRIMITIVE:
            if not isinstance(value, _PRIMITIVE[typ]) or (typ == "int" and
                                                          isinstance(value, bool)):
                self.problems.append(f"{where}: expected {typ}, got {value!r}")
            elif typ == "datetime" and not _DATETIME.match(value):
                self.problems.append(f"{where}: bad datetime {value!r}")
            return
        self.model(value, typ, where)

    def model(self, value: Any, name: str, where: str) -> None:
        if not isinstance(value, dict):
            self.problems.append(f"{where}: expected {name} object, got {value!r}")
            return
        by_json, types = _maps(name)
        for key, v in value.items():
            if key.startswith(EXTRA_PREFIX):
                continue
            py = by_json.get(key)
            if py is None:
                self.problems.append(f"{where}.{key}: not in {name}.attribute_map")
                continue
            self.seen.add((name, key))
            allowed = allowed_values(name, py)
            if allowed is not None and v not in allowed:
                self.problems.append(f"{where}.{key}: {v!r} not in {name} allowed values")
            self.check(v, types[py], f"{where}.{key}")


def conforms(value: Any, model: str) -> Checker:
    c = Checker()
    c.model(value, model, model)
    assert not c.problems, "\n".join(c.problems)
    return c


def test_checker_catches_unknown_fields_and_bad_enums() -> None:
    c = Checker()
    c.model({"id": "x", "participants": [{"state": "bogus", "noSuchField": 1,
                                          "startTime": "yesterday"}]},
            "CallConversation", "CallConversation")
    text = "\n".join(c.problems)
    assert "noSuchField" in text and "'bogus'" in text and "bad datetime" in text


def rich_call(sb: Sandbox, q: Any = None, users: list[Any] | None = None) -> tuple[Any, Any, Any]:
    """A call touching every participant field the sandbox can emit."""
    w = sb.world
    q = q or w.create_queue("Sales")
    agent_u, sup_u, other_u = users or [w.create_user(n) for n in ("Ann", "Sue", "Bo")]
    conv = w.start_call(q.id)
    agent = w.connect_agent(conv.id, agent_u.id)
    ext = w.add_external(conv.id, "tel:+15550001111", name="Ext")
    for mode in ("monitor", "coach", "barge"):
        w.add_supervisor(conv.id, sup_u.id, agent.id, mode)
    other = w.add_agent(conv.id, other_u.id)
    other.consult_participant_id = agent.id
    ext.team_id = "8f8f8f8f-0000-4000-8000-000000000001"
    ext.external_contact_id = "8f8f8f8f-0000-4000-8000-000000000002"
    ext.external_organization_id = "8f8f8f8f-0000-4000-8000-000000000003"
    ext.wrapup = {"code": "8f8f8f8f-0000-4000-8000-000000000004", "notes": "n"}
    ext.error_info = {"message": "m", "code": "c"}
    w.set_attributes(conv.id, ext.id, {"k": "v"})
    w.set_flag(conv.id, ext.id, "general")
    w.set_party_state(conv.id, agent.id, held=True, muted=True, confined=True, recording=True)
    w.set_recording(conv.id, "paused")
    w.disconnect(conv.id, other.id)
    return q, agent_u, conv


async def test_events_conform(sandbox: Sandbox, sandbox_client: SandboxClient) -> None:
    w = sandbox.world
    q0 = w.create_queue("Warmup")
    u0 = w.create_user("Warm")
    # subscribe before the call exists: topics for its queue and users
    q = w.create_queue("Sales")
    users = [w.create_user(n) for n in ("Ann", "Sue", "Bo")]
    sock: Socket = await sandbox_client.channel(
        [f"v2.routing.queues.{q.id}.conversations.calls"]
        + [f"v2.users.{u.id}.conversations.calls" for u in users + [u0]]
        + [f"v2.routing.queues.{q0.id}.conversations.calls"])
    _, _, conv = rich_call(sandbox, q, users)
    w.end_call(conv.id)
    seen: set[tuple[str, str]] = set()
    topics: set[str] = set()
    events = 0
    for _ in range(2000):
        m = await sock.recv(timeout=5)
        assert isinstance(m, dict)
        assert set(m) == {"topicName", "version", "eventBody", "metadata"}
        assert m["version"] == "2" and set(m["metadata"]) == {"CorrelationId"}
        if m["topicName"] == "channel.metadata":
            continue
        topics.add(m["topicName"])
        model = ("QueueConversationCallEventTopicCallConversation"
                 if m["topicName"].startswith("v2.routing.queues.")
                 else "ConversationCallEventTopicCallConversation")
        seen |= conforms(m["eventBody"], model).seen
        events += 1
        if m["eventBody"]["participants"][0]["state"] == "disconnected" and len(topics) == 4:
            break
    assert events > 10 and len(topics) == 4
    # the walk really covered the fields rules rely on
    part = "QueueConversationCallEventTopicCallMediaParticipant"
    for key in ("initialState", "disconnectType", "monitoredParticipantId",
                "coachedParticipantId", "bargedParticipantId", "consultParticipantId",
                "flaggedReason", "attributes", "wrapup", "errorInfo", "externalContact",
                "externalOrganization", "team", "user", "queue", "recordingState", "peer"):
        assert (part, key) in seen, key
    await sock.close()


async def test_rest_replies_conform(sandbox: Sandbox, sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    q, u, conv = rich_call(sandbox)
    live = sandbox.world.start_call(q.id)
    st, body, _ = await c.request("GET", f"/api/v2/conversations/calls/{conv.id}")
    assert st == 200
    seen = conforms(body, "CallConversation").seen
    assert ("CallMediaParticipant", "monitoredParticipantId") in seen
    st, ch, _ = await c.request("POST", "/api/v2/notifications/channels")
    conforms(ch, "Channel")
    st, body, _ = await c.request("GET", "/api/v2/notifications/channels")
    conforms(body, "ChannelEntityListing")
    subs = f"/api/v2/notifications/channels/{ch['id']}/subscriptions?ignoreErrors=true"
    st, body, _ = await c.request("PUT", subs, [
        {"id": f"v2.routing.queues.{q.id}.conversations.calls"},
        {"id": "v2.routing.queues.nope.conversations.calls"}])
    assert {e["state"] for e in body["entities"]} == {"Permitted", "Rejected"}
    conforms(body, "ChannelTopicEntityListing")
    st, body, _ = await c.request("GET", "/api/v2/routing/queues?pageSize=1")
    conforms(body, "QueueEntityListing")
    st, body, _ = await c.request("POST", "/api/v2/analytics/conversations/details/query", {
        "interval": "2020-01-01T00:00:00.000Z/2100-01-01T00:00:00.000Z",
        "paging": {"pageSize": 100, "pageNumber": 1}})
    assert body["totalHits"] == 2
    seen = conforms(body, "AnalyticsConversationQueryResponse").seen
    assert ("AnalyticsConversationSegment", "queueId") in seen
    assert live.id in {x["conversationId"] for x in body["conversations"]}
    for status, (method, path, payload) in {
        404: ("GET", "/api/v2/conversations/calls/nope", None),
        400: ("PATCH", f"/api/v2/conversations/calls/{conv.id}/participants/x", []),
        405: ("DELETE", "/api/v2/conversations/conferences/x", None),
    }.items():
        st, body, _ = await c.request(method, path, payload)
        assert st == status
        conforms(body, "ErrorBody")
    sandbox.world.clients[sandbox.client_id].permissions.clear()
    st, body, _ = await c.request(
        "PATCH", f"/api/v2/conversations/calls/{live.id}/participants/"
                 f"{live.participants[0].id}", {"state": "disconnected"})
    assert st == 403
    conforms(body, "ErrorBody")


async def test_token_and_role_replies_conform(sandbox: Sandbox, sandbox_client: SandboxClient) -> None:
    """GET /api/v2/tokens/me (TokenInfo) and GET /api/v2/authorization/roles/{id}
    (DomainOrganizationRole), as `check --online` reads them to learn its permissions."""
    c = sandbox_client
    await c.login()
    st, info, _ = await c.request("GET", "/api/v2/tokens/me")
    assert st == 200
    conforms(info, "TokenInfo")
    role_id = info["OAuthClient"]["roleDivisions"][0]["roleId"]
    st, role, _ = await c.request("GET", f"/api/v2/authorization/roles/{role_id}")
    assert st == 200 and role["permissionPolicies"]
    conforms(role, "DomainOrganizationRole")
