"""Scenarios (named starting worlds) and the HTTP test driver under /sandbox/.

Driver (JSON in, JSON out, no auth: it is the test harness, not Genesys):

    GET    /sandbox/state                      queues, users, client id/secret, counts
    GET    /sandbox/ops                        every operation: fields, answer, example
    POST   /sandbox/{op}                       op in OPS below, body = keyword arguments
    GET    /sandbox/calls/{cid}                the conversation as GET /api/v2 shows it
    GET    /sandbox/journal?sinceRequest=&sinceEvent=     DELETE /sandbox/journal
    GET    /sandbox/faults                     current fault settings
    POST   /sandbox/faults                     apply a fault spec (see Faults.configure)
    POST   /sandbox/faults/{action}            reset | drop_sockets | socket_closing |
                                               expire_channel | expire_tokens | revoke_tokens |
                                               send_raw

Operations (`OPS` below: each with its fields, what it answers and an example; `confguard
sandbox --help`, `GET /sandbox/ops` and docs/sandbox.md list them; an unknown operation
answers 404 naming every one): calls (start_call, connect_agent, add_external, add_agent,
add_supervisor, conference, set_attributes, set_flag, set_party_state, set_recording,
hangup, end_call, touch, forget_call), the directory (create_queue, create_user) and the
org (set_permissions, add_client, configure), delivery faults (lose_event,
delay_eventbridge).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from daemon.sandbox.wire import SANDBOX, SandboxHost
from daemon.sandbox.world import Conversation, Party, World, WorldError

SCENARIOS = ("default", "empty", "conference")


@dataclass(frozen=True, slots=True)
class OpField:
    """One field of a driver operation's JSON body."""

    name: str
    required: bool
    meaning: str


@dataclass(frozen=True, slots=True)
class OpSpec:
    """A driver operation: `POST /sandbox/{name}` with a JSON object of `fields`; the answer
    is `{"result": ...}` as `answers` says. `example` is a body that works against the
    default scenario once the ids in angle brackets are filled in."""

    name: str
    summary: str
    fields: tuple[OpField, ...]
    answers: str
    example: dict[str, Any]


def _f(name: str, meaning: str, required: bool = False) -> OpField:
    return OpField(name, required, meaning)


_CONV = _f("conversationId", "the call's id", True)
_PART = _f("participantId", "the party's participant id", True)
_CALL_ANSWER = "the conversation as GET /api/v2/conversations/calls/{id} shows it"
_PARTY_ANSWER = "the new party (participant), as in the conversation"

#: Every driver operation, in the order an operator meets them. The docs list the same
#: (tests/test_docs.py checks docs/sandbox.md against this).
OPS: tuple[OpSpec, ...] = (
    OpSpec("start_call", "a customer calls into a queue: customer and acd parties, published on the queue's topic",
           (_f("queueId", "the queue's id", True), _f("ani", "the caller's number (default tel:+14155550100)"),
            _f("dnis", "the number dialled (default tel:+18005550199)"),
            _f("customerName", "the customer's name (default Customer)")),
           _CALL_ANSWER, {"queueId": "<queue id>", "ani": "tel:+442079460000"}),
    OpSpec("connect_agent", "an agent answers from the queue: the acd party ends, the agent connects",
           (_CONV, _f("userId", "the agent's user id", True)),
           _PARTY_ANSWER, {"conversationId": "<call id>", "userId": "<user id>"}),
    OpSpec("add_external", "conference in an outside number (purpose external)",
           (_CONV, _f("address", "the number (default tel:+14155550123)"), _f("name", "the party's name")),
           _PARTY_ANSWER, {"conversationId": "<call id>", "address": "tel:+442079460999"}),
    OpSpec("add_agent", "conference in another agent",
           (_CONV, _f("userId", "the agent's user id", True)),
           _PARTY_ANSWER, {"conversationId": "<call id>", "userId": "<user id>"}),
    OpSpec("add_supervisor", "a supervisor who monitors, coaches or barges a party",
           (_CONV, _f("userId", "the supervisor's user id", True),
            _f("targetParticipantId", "the participant id monitored, coached or barged", True),
            _f("mode", "monitor (default), coach or barge")),
           _PARTY_ANSWER,
           {"conversationId": "<call id>", "userId": "<user id>", "targetParticipantId": "<agent participant id>",
            "mode": "monitor"}),
    OpSpec("conference", "a ready three-party call in one step: customer, agent, external",
           (_f("queueId", "the queue (default: the first one)"), _f("userId", "the agent (default: the first user)"),
            _f("address", "the external number (default tel:+14155550123)")),
           _CALL_ANSWER, {"address": "tel:+442079460999"}),
    OpSpec("set_attributes", "set participant data (string to string; merged into the party's attributes)",
           (_CONV, _PART, _f("attributes", "an object of strings", True)),
           "null", {"conversationId": "<call id>", "participantId": "<participant id>",
                                      "attributes": {"complianceFlag": "true"}}),
    OpSpec("set_flag", "flag a party (flaggedReason) or clear the flag",
           (_CONV, _PART, _f("reason", "general (default), or null to clear")),
           "null", {"conversationId": "<call id>", "participantId": "<participant id>"}),
    OpSpec("set_party_state", "hold, mute, confine or record one party",
           (_CONV, _PART, _f("held", "true/false"), _f("muted", "true/false"),
            _f("confined", "true/false"), _f("recording", "true/false")),
           "null", {"conversationId": "<call id>", "participantId": "<participant id>", "held": True}),
    OpSpec("set_recording", "the call's recordingState",
           (_CONV, _f("state", "none, active or paused", True)),
           "null", {"conversationId": "<call id>", "state": "paused"}),
    OpSpec("hangup", "one party hangs up (the call ends when fewer than two stay connected)",
           (_CONV, _PART, _f("disconnectType", "endpoint (default), client, system, ...")),
           "true, or false when the party had already left",
           {"conversationId": "<call id>", "participantId": "<participant id>"}),
    OpSpec("end_call", "end the whole call (every party disconnected)",
           (_CONV,), "null", {"conversationId": "<call id>"}),
    OpSpec("touch", "publish the call again unchanged (a duplicate event)",
           (_CONV,), "null", {"conversationId": "<call id>"}),
    OpSpec("forget_call", "the call disappears at once, with no event: REST answers 404 for it from now on",
           (_CONV,), "null", {"conversationId": "<call id>"}),
    OpSpec("create_queue", "a queue (a given id, or a new one)",
           (_f("name", "the queue's name", True), _f("id", "the queue's id (default: a new UUID)")),
           "{id, name}", {"name": "Customer Service"}),
    OpSpec("create_user", "a user (agent or supervisor)",
           (_f("name", "the user's name", True), _f("id", "the user's id (default: a new UUID)")),
           "{id, name}", {"name": "Dana Agent"}),
    OpSpec("set_permissions", "grant or revoke permissions of an OAuth client's role (removals, queue lookups and topics, the analytics query and reading roles check them)",
           (_f("grant", "permissions to add"), _f("revoke", "permissions to remove"),
            _f("clientId", "the client (default: the sandbox's own)")),
           "{clientId, permissions}", {"revoke": ["conversation:communication:disconnect"]}),
    OpSpec("add_client", "another OAuth client (client credentials), with the default permissions",
           (_f("clientId", "its id (default: random)"), _f("secret", "its secret (default: random)"),
            _f("tokenLifetime", "seconds its tokens live")),
           "{clientId, clientSecret}", {"clientId": "second-client"}),
    OpSpec("configure", "change the sandbox's timings and limits while it runs",
           (_f("heartbeatInterval", "seconds between WebSocket heartbeats"),
            _f("closingGrace", "seconds from v2.system.socket_closing to the close"),
            _f("patchFinalStatus", "the HTTP status the participant PATCH answers"),
            _f("channelLifetime", "seconds a notification channel lives"),
            _f("tokenLifetime", "seconds a new token lives (for clientId, default the sandbox's client)"),
            _f("clientId", "the client tokenLifetime applies to"),
            _f("budget", "requests per token per sliding 60 s window; null: off"),
            _f("legacyRatelimitHeaders", "true: a fixed window from the token's first request and "
               "inin-ratelimit-* headers on every answer, as Genesys before 2021; false (the "
               "default): no headers, as today")),
           "the settings now in force", {"heartbeatInterval": 5}),
    OpSpec("lose_event", "lose the next change(s) on one delivery path only (the WebSocket, EventBridge, or both)",
           (_f("on", "websocket, eventbridge or both", True), _f("conversationId", "only changes of this call (default: any)"),
            _f("count", "how many changes (default 1)")),
           "the losses armed: [{on, conversationId, remaining}]", {"on": "websocket"}),
    OpSpec("delay_eventbridge", "deliver every EventBridge event this much later (needs --eventbridge-queue-url)",
           (_f("seconds", "the delay; 0: at once", True),),
           "null", {"seconds": 2}),
)


def ops_reference() -> str:
    """The operations as text, for `confguard sandbox --help` and the unknown-op answer."""
    lines = []
    for spec in OPS:
        fields = ", ".join(f.name if f.required else f"{f.name}?" for f in spec.fields)
        lines.append(f"  {spec.name} {{{fields}}}: {spec.summary}")
    return "\n".join(lines)


def load_scenario(world: World, name: str) -> dict[str, Any]:
    """Populate `world`; returns a summary (queue ids by name, user ids by name, calls)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    out: dict[str, Any] = {"queues": {}, "users": {}, "calls": []}
    if name == "empty":
        return out
    for qn in ("Sales", "Support", "Collections"):
        out["queues"][qn] = world.create_queue(qn).id
    for un in ("Alice Agent", "Bob Agent", "Carol Agent", "Sam Supervisor"):
        out["users"][un] = world.create_user(un).id
    if name == "conference":
        conv = conference(world, out["queues"]["Sales"], out["users"]["Alice Agent"])
        out["calls"].append(conv.id)
    return out


def conference(world: World, queue_id: str, user_id: str,
               address: str = "tel:+14155550123") -> Conversation:
    """A live three-party call: customer, agent (from the queue), external number."""
    conv = world.start_call(queue_id)
    world.connect_agent(conv.id, user_id)
    world.add_external(conv.id, address)
    return conv


def _party(p: Party) -> dict[str, Any]:
    return p.rest_dict()


def _req(args: dict[str, Any], key: str) -> Any:
    if key not in args:
        raise WorldError(400, "bad.request", f"missing argument: {key}")
    return args[key]


def _ops(sb: SandboxHost) -> dict[str, Callable[[dict[str, Any]], Any]]:
    w = sb.world

    def qdict(q: Any) -> dict[str, Any]:
        return {"id": q.id, "name": q.name}

    def set_permissions(a: dict[str, Any]) -> Any:
        c = w.clients.get(a.get("clientId") or sb.client_id)
        if c is None:
            raise WorldError(404, "not.found", "no such client")
        c.permissions |= set(a.get("grant") or [])
        c.permissions -= set(a.get("revoke") or [])
        return {"clientId": c.id, "permissions": sorted(c.permissions)}

    def configure(a: dict[str, Any]) -> Any:
        for key, attr, conv in (("heartbeatInterval", "heartbeat_interval", float),
                                ("closingGrace", "closing_grace", float),
                                ("patchFinalStatus", "patch_final_status", int)):
            if key in a:
                setattr(sb, attr, conv(a[key]))
        if "channelLifetime" in a:
            w.channel_lifetime = float(a["channelLifetime"])
        if "tokenLifetime" in a:
            c = w.clients.get(a.get("clientId") or sb.client_id)
            if c is None:
                raise WorldError(404, "not.found", "no such client")
            c.token_lifetime = float(a["tokenLifetime"])
        if "budget" in a:
            b = a["budget"]
            if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
                raise WorldError(400, "bad.request", "budget must be a whole number >= 1 or null")
            sb.faults.set_budget(b)
        if "legacyRatelimitHeaders" in a:
            sb.faults.set_legacy_headers(bool(a["legacyRatelimitHeaders"]))
        return {"heartbeatInterval": sb.heartbeat_interval, "closingGrace": sb.closing_grace,
                "patchFinalStatus": sb.patch_final_status,
                "channelLifetime": w.channel_lifetime, "budget": sb.faults.budget_per_minute,
                "legacyRatelimitHeaders": sb.faults.legacy_headers}

    def add_client(a: dict[str, Any]) -> Any:
        c = w.add_client(a.get("clientId"), a.get("secret"),
                         token_lifetime=a.get("tokenLifetime"))
        return {"clientId": c.id, "clientSecret": c.secret}

    return {
        "create_queue": lambda a: qdict(w.create_queue(str(_req(a, "name")), a.get("id"))),
        "create_user": lambda a: qdict(w.create_user(str(_req(a, "name")), a.get("id"))),
        "start_call": lambda a: w.start_call(
            _req(a, "queueId"), ani=a.get("ani", "tel:+14155550100"),
            dnis=a.get("dnis", "tel:+18005550199"),
            customer_name=a.get("customerName", "Customer")).rest_body(),
        "connect_agent": lambda a: _party(w.connect_agent(_req(a, "conversationId"),
                                                          _req(a, "userId"))),
        "add_external": lambda a: _party(w.add_external(
            _req(a, "conversationId"), a.get("address", "tel:+14155550123"),
            name=a.get("name"))),
        "add_agent": lambda a: _party(w.add_agent(_req(a, "conversationId"),
                                                  _req(a, "userId"))),
        "add_supervisor": lambda a: _party(w.add_supervisor(
            _req(a, "conversationId"), _req(a, "userId"), _req(a, "targetParticipantId"),
            a.get("mode", "monitor"))),
        "set_attributes": lambda a: w.set_attributes(
            _req(a, "conversationId"), _req(a, "participantId"), _req(a, "attributes")),
        "set_flag": lambda a: w.set_flag(_req(a, "conversationId"), _req(a, "participantId"),
                                         a.get("reason", "general")),
        "set_party_state": lambda a: w.set_party_state(
            _req(a, "conversationId"), _req(a, "participantId"),
            **{k: a[k] for k in ("held", "muted", "confined", "recording") if k in a}),
        "set_recording": lambda a: w.set_recording(_req(a, "conversationId"),
                                                   _req(a, "state")),
        "hangup": lambda a: w.disconnect(_req(a, "conversationId"), _req(a, "participantId"),
                                         a.get("disconnectType", "endpoint")),
        "end_call": lambda a: w.end_call(_req(a, "conversationId")),
        "touch": lambda a: w.touch(_req(a, "conversationId")),
        "forget_call": lambda a: w.forget_call(_req(a, "conversationId")),
        "set_permissions": set_permissions,
        "configure": configure,
        "add_client": add_client,
        "lose_event": lambda a: [x.as_dict() for x in sb.faults.lose_change(
            str(_req(a, "on")), a.get("conversationId"), int(a.get("count", 1)))],
        "delay_eventbridge": lambda a: sb.faults.configure({"eventbridgeDelay": _req(a, "seconds")}),
        "conference": lambda a: conference(
            w, a.get("queueId") or next(iter(w.queues)), a.get("userId") or next(iter(w.users)),
            a.get("address", "tel:+14155550123")).rest_body(),
    }


def _out(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def _args(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise WorldError(400, "bad.request", f"invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise WorldError(400, "bad.request", "body must be a JSON object")
    return data


def _host(request: web.Request) -> SandboxHost:
    return request.app[SANDBOX]

async def _state(request: web.Request) -> web.Response:
    sb = _host(request)
    w = sb.world
    return _out({"baseUrl": sb.base_url, "clientId": sb.client_id,
                 "clientSecret": sb.client_secret,
                 "queues": [{"id": q.id, "name": q.name} for q in w.queues.values()],
                 "users": [{"id": u.id, "name": u.name} for u in w.users.values()],
                 "activeCalls": len(w.active_calls()), "calls": len(w.calls),
                 "channels": len(w.channels), "sockets": len(sb.conns)})

async def _op(request: web.Request) -> web.Response:
    sb = _host(request)
    name = request.match_info["op"]
    fn = _ops(sb).get(name)
    if fn is None:
        raise WorldError(404, "not.found",
                         f"unknown sandbox op {name!r}; operations: {', '.join(s.name for s in OPS)} "
                         "(GET /sandbox/ops describes each; see docs/sandbox.md)")
    try:
        result = fn(await _args(request))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise WorldError(400, "bad.request", f"{name}: {e}") from None
    return _out({"result": result})

async def _call(request: web.Request) -> web.Response:
    return _out(_host(request).world.get_call(request.match_info["cid"]).rest_body())

async def _journal(request: web.Request) -> web.Response:
    sb = _host(request)
    if request.method == "DELETE":
        sb.journal.clear()
        return _out({"cleared": True})
    try:
        sr = int(request.query.get("sinceRequest", "0"))
        se = int(request.query.get("sinceEvent", "0"))
    except ValueError:
        raise WorldError(400, "bad.request", "sinceRequest/sinceEvent: integers") from None
    return _out(sb.journal.as_dict(sr, se))

async def _faults(request: web.Request) -> web.Response:
    sb = _host(request)
    if request.method == "POST":
        try:
            sb.faults.configure(await _args(request))
        except (TypeError, ValueError, KeyError, AttributeError, re.error) as e:
            raise WorldError(400, "bad.request", f"bad fault spec: {e}") from None
    return _out(sb.faults.as_dict())

async def _fault_action(request: web.Request) -> web.Response:
    sb = _host(request)
    a = await _args(request)
    action = request.match_info["action"]
    do = _FAULT_ACTIONS.get(action)
    if do is None:
        raise WorldError(404, "not.found", f"unknown fault action {action!r}")
    return _out({"action": action, "affected": do(sb, a)})


def _reset(sb: SandboxHost, a: dict[str, Any]) -> int:
    sb.faults.reset()
    return 0


def _expire_channel(sb: SandboxHost, a: dict[str, Any]) -> int:
    sb.expire_channel(_req(a, "channelId"))
    return 1


#: POST /sandbox/faults/{action}: what each does (with the JSON body); the count it hit.
_FAULT_ACTIONS: dict[str, Callable[[SandboxHost, dict[str, Any]], Any]] = {
    "reset": _reset,
    "drop_sockets": lambda sb, a: sb.drop_sockets(a.get("channelId")),
    "socket_closing": lambda sb, a: sb.socket_closing(a.get("channelId"), a.get("grace")),
    "expire_channel": _expire_channel,
    "expire_tokens": lambda sb, a: sb.world.expire_tokens(a.get("clientId")),
    "revoke_tokens": lambda sb, a: sb.world.revoke_tokens(a.get("clientId")),
    "send_raw": lambda sb, a: sb.send_raw(str(_req(a, "data")).encode(), a.get("channelId")),
}


async def _ops_list(request: web.Request) -> web.Response:
    return _out({"operations": [
        {"name": s.name, "path": f"/sandbox/{s.name}", "summary": s.summary, "answers": s.answers,
         "fields": [{"name": f.name, "required": f.required, "meaning": f.meaning} for f in s.fields],
         "example": s.example} for s in OPS]})


def add_driver_routes(app: web.Application) -> None:
    """The unauthenticated driver under /sandbox/ (see the module docstring)."""
    r = app.router
    r.add_get("/sandbox/ops", _ops_list)
    r.add_get("/sandbox/state", _state)
    r.add_get("/sandbox/calls/{cid}", _call)
    r.add_get("/sandbox/journal", _journal)
    r.add_delete("/sandbox/journal", _journal)
    r.add_get("/sandbox/faults", _faults)
    r.add_post("/sandbox/faults", _faults)
    r.add_post("/sandbox/faults/{action}", _fault_action)
    r.add_post("/sandbox/{op}", _op)
