"""Scenarios (named starting worlds) and the HTTP test driver under /sandbox/.

Driver (JSON in, JSON out, no auth: it is the test harness, not Genesys):

    GET    /sandbox/state                      queues, users, client id/secret, counts
    POST   /sandbox/{op}                       op in OPS below, body = keyword arguments
    GET    /sandbox/calls/{cid}                the conversation as GET /api/v2 shows it
    GET    /sandbox/journal?sinceRequest=&sinceEvent=     DELETE /sandbox/journal
    GET    /sandbox/faults                     current fault settings
    POST   /sandbox/faults                     apply a fault spec (see Faults.configure)
    POST   /sandbox/faults/{action}            reset | drop_sockets | socket_closing |
                                               expire_channel | expire_tokens | revoke_tokens |
                                               send_raw

OPS: create_queue {name}, create_user {name}, start_call {queueId, ani?, dnis?,
customerName?}, connect_agent {conversationId, userId}, add_external {conversationId,
address?, name?}, add_agent {conversationId, userId}, add_supervisor {conversationId, userId,
targetParticipantId, mode: monitor|coach|barge}, set_attributes {conversationId,
participantId, attributes}, set_flag {conversationId, participantId, reason|null},
set_party_state {conversationId, participantId, held?, muted?, confined?, recording?},
set_recording {conversationId, state}, hangup {conversationId, participantId,
disconnectType?}, end_call {conversationId}, touch {conversationId} (republish unchanged),
forget_call {conversationId} (gone: REST answers 404),
set_permissions {grant?, revoke?, clientId?}, configure {heartbeatInterval?, closingGrace?,
patchFinalStatus?, channelLifetime?, tokenLifetime? (+ clientId?), budget? (requests per
token per 60 s window, null = off)}, add_client {clientId?, secret?, tokenLifetime?},
conference {queueId?, userId?, address?}: a ready three-party call,
lose_event {on: websocket|eventbridge|both, conversationId?, count? (1)}: lose the next
change(s) on that path only, delay_eventbridge {seconds}: EventBridge deliveries that much
later (0: at once); both need `--eventbridge-queue-url` to matter for EventBridge.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from daemon.sandbox.world import Conversation, Party, World, WorldError

if TYPE_CHECKING:
    from daemon.sandbox.server import Sandbox

SCENARIOS = ("default", "empty", "conference")


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


def _ops(sb: Sandbox) -> dict[str, Callable[[dict[str, Any]], Any]]:
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
        return {"heartbeatInterval": sb.heartbeat_interval, "closingGrace": sb.closing_grace,
                "patchFinalStatus": sb.patch_final_status,
                "channelLifetime": w.channel_lifetime, "budget": sb.faults.budget_per_minute}

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


def add_driver_routes(app: web.Application) -> None:
    from daemon.sandbox.app import SANDBOX

    def sb_of(request: web.Request) -> Sandbox:
        return request.app[SANDBOX]

    async def state(request: web.Request) -> web.Response:
        sb = sb_of(request)
        w = sb.world
        return _out({"baseUrl": sb.base_url, "clientId": sb.client_id,
                     "clientSecret": sb.client_secret,
                     "queues": [{"id": q.id, "name": q.name} for q in w.queues.values()],
                     "users": [{"id": u.id, "name": u.name} for u in w.users.values()],
                     "activeCalls": len(w.active_calls()), "calls": len(w.calls),
                     "channels": len(w.channels), "sockets": len(sb.conns)})

    async def op(request: web.Request) -> web.Response:
        sb = sb_of(request)
        name = request.match_info["op"]
        fn = _ops(sb).get(name)
        if fn is None:
            raise WorldError(404, "not.found", f"unknown sandbox op {name!r}")
        try:
            result = fn(await _args(request))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise WorldError(400, "bad.request", f"{name}: {e}") from None
        return _out({"result": result})

    async def call(request: web.Request) -> web.Response:
        return _out(sb_of(request).world.get_call(request.match_info["cid"]).rest_body())

    async def journal(request: web.Request) -> web.Response:
        sb = sb_of(request)
        if request.method == "DELETE":
            sb.journal.clear()
            return _out({"cleared": True})
        try:
            sr = int(request.query.get("sinceRequest", "0"))
            se = int(request.query.get("sinceEvent", "0"))
        except ValueError:
            raise WorldError(400, "bad.request", "sinceRequest/sinceEvent: integers") from None
        return _out(sb.journal.as_dict(sr, se))

    async def faults(request: web.Request) -> web.Response:
        sb = sb_of(request)
        if request.method == "POST":
            try:
                sb.faults.configure(await _args(request))
            except (TypeError, ValueError, KeyError, AttributeError, re.error) as e:
                raise WorldError(400, "bad.request", f"bad fault spec: {e}") from None
        return _out(sb.faults.as_dict())

    async def fault_action(request: web.Request) -> web.Response:
        sb = sb_of(request)
        a = await _args(request)
        action = request.match_info["action"]
        ch = a.get("channelId")
        n: Any
        if action == "reset":
            sb.faults.reset()
            n = 0
        elif action == "drop_sockets":
            n = sb.drop_sockets(ch)
        elif action == "socket_closing":
            n = sb.socket_closing(ch, a.get("grace"))
        elif action == "expire_channel":
            sb.expire_channel(_req(a, "channelId"))
            n = 1
        elif action == "expire_tokens":
            n = sb.world.expire_tokens(a.get("clientId"))
        elif action == "revoke_tokens":
            n = sb.world.revoke_tokens(a.get("clientId"))
        elif action == "send_raw":
            n = sb.send_raw(str(_req(a, "data")).encode(), ch)
        else:
            raise WorldError(404, "not.found", f"unknown fault action {action!r}")
        return _out({"action": action, "affected": n})

    r = app.router
    r.add_get("/sandbox/state", state)
    r.add_get("/sandbox/calls/{cid}", call)
    r.add_get("/sandbox/journal", journal)
    r.add_delete("/sandbox/journal", journal)
    r.add_get("/sandbox/faults", faults)
    r.add_post("/sandbox/faults", faults)
    r.add_post("/sandbox/faults/{action}", fault_action)
    r.add_post("/sandbox/{op}", op)
