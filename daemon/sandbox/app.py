"""aiohttp routes of the sandbox: /oauth/token, /api/v2/..., /channels/{id} (WebSocket) and
the unauthenticated test driver under /sandbox/.

Every error is a Genesys ErrorBody {message, code, status, contextId, details, errors} with an
`inin-correlation-id` header; OAuth errors are {error, description}. Every request except
/sandbox/ ones is journalled (method, path, query, JSON body, status).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson
import structlog
from aiohttp import WSMsgType, web

from daemon.sandbox.scenario import add_driver_routes
from daemon.sandbox.wire import SANDBOX, Conn, SandboxHost, gone_message, metadata_message
from daemon.sandbox.world import (ANALYTICS_PERMISSION, DISCONNECT_PERMISSION, PARTICIPANT_PATCH_PERMISSIONS,
                                  QUEUE_VIEW_PERMISSION, Token, WorldError, iso)

log = structlog.get_logger(__name__)
TOKEN: web.RequestKey[Token] = web.RequestKey("token", Token)
BODY: web.RequestKey[object] = web.RequestKey("json", object)
FORM_GRANT: web.RequestKey[str] = web.RequestKey("grant_type", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_NO_BODY = object()

_STATUS_CODES = {400: "bad.request", 401: "bad.credentials", 403: "missing.permissions",
                 404: "not.found", 405: "method.not.allowed", 409: "conflict",
                 429: "too.many.requests", 500: "internal.server.error",
                 502: "bad.gateway", 503: "service.unavailable", 504: "gateway.timeout"}


def error_response(status: int, message: str, code: str | None = None, *,
                   headers: dict[str, str] | None = None,
                   extra: dict[str, Any] | None = None) -> web.Response:
    corr = str(uuid.uuid4())
    body = {"message": message, "code": code or _STATUS_CODES.get(status, "error"),
            "status": status, "contextId": corr, "details": [], "errors": [], **(extra or {})}
    h = {"inin-correlation-id": corr, **(headers or {})}
    return web.Response(status=status, body=orjson.dumps(body), headers=h,
                        content_type="application/json")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json",
                        headers={"inin-correlation-id": str(uuid.uuid4())})


def _sb(request: web.Request) -> SandboxHost:
    return request.app[SANDBOX]


def _json(request: web.Request) -> Any:
    body = request.get(BODY, _NO_BODY)
    if body is _NO_BODY:
        raise WorldError(400, "bad.request", "A JSON request body is required")
    return body


def _token(request: web.Request) -> Token:
    return request[TOKEN]


# ------------------------------------------------------------------------ middleware
@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    sb = _sb(request)
    path = request.path
    if path.startswith("/channels/"):
        return await handler(request)
    at, perf = time.time(), time.perf_counter_ns()
    raw = await request.read() if request.can_read_body else b""
    body: Any = None
    if raw:
        try:
            body = orjson.loads(raw)
            request[BODY] = body
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
    if not path.startswith("/sandbox/"):
        # No await from here to the injected latency's sleep: a request seen here already
        # waits the latency in force now, whatever a test sets next.
        sb.journal.arrivals.append((request.method, path))
    resp: web.StreamResponse
    try:
        if path.startswith("/api/v2/"):
            await _api_gate(sb, request, path)
        resp = await handler(request)
    except _Reply as r:
        resp = r.response
    except WorldError as e:
        msg = e.message
        resp = error_response(e.status, msg, e.code)
    except web.HTTPException as e:
        if e.status in (404, 405) and path.startswith("/api/v2/"):
            resp = error_response(e.status, f"{request.method} {path}: {e.reason}")
        else:
            raise
    except Exception:  # a sandbox bug must still answer like Genesys, and be visible
        log.exception("sandbox_handler_failed", method=request.method, path=path)
        resp = error_response(500, "The sandbox failed to handle this request")
    tok = request.get(TOKEN)
    client_id = tok.client_id if tok is not None else None
    counted = tok.value if tok is not None else None  # the token whose window counted it
    if counted is not None:
        # Legacy mode only: the budget on every answer, errors included (as before 2021).
        resp.headers.update(sb.faults.budget_headers(counted))
    if path == "/oauth/token":
        # never journal credentials a client may put in the form body
        body = {"grant_type": request[FORM_GRANT]} if FORM_GRANT in request else None
    if not path.startswith("/sandbox/"):
        sb.journal.request(request.method, path, dict(request.query), body, resp.status,
                           client_id, at=at, perf_ns=perf,
                           content_type=request.content_type if raw else None)
    return resp


async def _api_gate(sb: SandboxHost, request: web.Request, path: str) -> None:
    """What every /api/v2 request passes first: the injected latency and bursts, the bearer
    token (`request[TOKEN]` once valid: it is then counted in its budget window), the
    budget. Raises `_Reply` (a fault or a 429) or WorldError (401)."""
    if sb.faults.latency:
        await asyncio.sleep(sb.faults.latency)
    burst = sb.faults.take_burst(request.method, path)
    if burst is not None:
        hdr = ({"Retry-After": str(int(burst.retry_after))}
               if burst.retry_after is not None else {})
        raise _Reply(error_response(burst.status, f"Injected fault: HTTP {burst.status}",
                                    headers=hdr))
    auth = request.headers.get("Authorization", "")
    value = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    tok = sb.world.check_token(value)
    request[TOKEN] = tok
    retry = sb.faults.spend(tok.value)
    if retry is not None:
        raise _Reply(error_response(
            429, "Rate limit exceeded the maximum. Retry the request in "
            f"[{int(retry)}] seconds", "too.many.requests.retry.after",
            headers={"Retry-After": str(int(retry))},
            extra=None if sb.faults.legacy_headers else {"limit": sb.faults.limit()}))


class _Reply(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response
        super().__init__(response.status)


# ------------------------------------------------------------------------ OAuth
async def oauth_token(request: web.Request) -> web.Response:
    sb = _sb(request)

    def refuse(status: int, error: str, desc: str) -> web.Response:
        return web.Response(status=status, content_type="application/json",
                            body=orjson.dumps({"error": error, "description": desc,
                                               "error_description": desc}))

    auth = request.headers.get("Authorization", "")
    if not auth.lower().startswith("basic "):
        return refuse(401, "invalid_client", "client authentication is required (HTTP Basic)")
    try:
        cid, _, secret = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return refuse(401, "invalid_client", "malformed HTTP Basic credentials")
    form = await request.post()
    request[FORM_GRANT] = str(form.get("grant_type"))
    if form.get("grant_type") != "client_credentials":
        return refuse(400, "unsupported_grant_type", "grant_type must be client_credentials")
    try:
        tok = sb.world.issue_token(cid, secret)
    except WorldError:
        return refuse(401, "invalid_client", "client authentication failed")
    return json_response({"access_token": tok.value, "token_type": "bearer",
                          "expires_in": int(round(tok.expires_at - tok.issued_at))})


# ------------------------------------------------------------------------ notifications
def _channel_json(sb: SandboxHost, ch_id: str) -> dict[str, Any]:
    ch = sb.world.channels[ch_id]
    return {"connectUri": f"{sb.ws_base}/channels/{ch.id}", "id": ch.id,
            "expires": iso(ch.expires_at)}


async def create_channel(request: web.Request) -> web.Response:
    sb = _sb(request)
    ch = sb.world.create_channel(_token(request), sb.ws_base)
    return json_response(_channel_json(sb, ch.id))


async def list_channels(request: web.Request) -> web.Response:
    sb = _sb(request)
    cid = _token(request).client_id
    ents = [_channel_json(sb, c.id) for c in sb.world.channels.values() if c.client_id == cid]
    return json_response({"entities": ents})


async def head_channel(request: web.Request) -> web.Response:
    sb = _sb(request)
    ch = sb.world.channels.get(request.match_info["channel_id"])
    if ch is None or ch.client_id != _token(request).client_id:
        return web.Response(status=404)
    return web.Response(status=200)


def _topics_body(request: web.Request) -> list[str]:
    body = _json(request)
    if not isinstance(body, list) or not all(
            isinstance(t, dict) and isinstance(t.get("id"), str) for t in body):
        raise WorldError(400, "bad.request", 'Body must be a list of {"id": "<topic>"}')
    return [t["id"] for t in body]


async def subscriptions(request: web.Request) -> web.Response:
    sb = _sb(request)
    ch_id = request.match_info["channel_id"]
    cid = _token(request).client_id
    ignore = request.query.get("ignoreErrors", "false").lower() == "true"
    if request.method == "GET":
        ch = sb.world.channel(ch_id, cid)
        ents = list(ch.topics.values())
    elif request.method == "DELETE":
        sb.world.unsubscribe_all(ch_id, cid)
        return web.Response(status=200)
    else:
        ents = sb.world.subscribe(ch_id, cid, _topics_body(request),
                                  replace=request.method == "PUT", ignore_errors=ignore)
    return json_response({"entities": [t.as_dict() for t in ents]})


async def websocket(request: web.Request) -> web.StreamResponse:
    sb = _sb(request)
    ch_id = request.match_info["channel_id"]
    ws = web.WebSocketResponse(autoping=True, max_msg_size=1 << 20)
    await ws.prepare(request)
    ch = sb.world.channels.get(ch_id)
    if ch is None:
        await ws.send_str(gone_message(f"Channel {ch_id} not found").decode())
        await ws.close()
        return ws
    old = sb.conns.pop(ch_id, None)
    if old is not None:
        # One connection per channel: the newer one wins.
        await old.ws.close(code=1000, message=b"superseded by a new connection")
    conn = Conn(ch_id, ws, request)
    sb.conns[ch_id] = conn
    ch.connected = True
    ch.last_used = time.time()
    writer = asyncio.create_task(sb.writer(conn), name=f"sandbox-ws-{ch_id}")
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                data = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(data, dict):
                continue
            if data.get("message") == "ping":
                conn.push(metadata_message("pong"))
            elif data.get("message") == "subscribe":
                topics = data.get("topics")
                corr = data.get("correlationId")
                try:
                    if not isinstance(topics, list) or not all(isinstance(t, str)
                                                               for t in topics):
                        raise WorldError(400, "bad.request", "topics must be a list of strings")
                    states = sb.world.subscribe(ch_id, ch.client_id, topics, replace=False,
                                                ignore_errors=True)
                    rejected = [s.id for s in states if s.state == "Rejected"
                                and s.id in topics]
                    reply: dict[str, Any] = {"result": "200", "correlationId": corr,
                                             "message": "subscribed"}
                    if rejected:
                        reply["rejectedTopics"] = rejected
                except WorldError as e:
                    reply = {"result": str(e.status), "correlationId": corr,
                             "message": e.message}
                conn.push(orjson.dumps(reply))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        if sb.conns.get(ch_id) is conn:
            del sb.conns[ch_id]
            live = sb.world.channels.get(ch_id)
            if live is not None:
                live.connected = False
    return ws


# ------------------------------------------------------------------------ tokens, roles
async def token_me(request: web.Request) -> web.Response:
    """GET /api/v2/tokens/me: the token's organisation and OAuth client with its roles (no
    permission needed)."""
    sb = _sb(request)
    return json_response(sb.world.clients[_token(request).client_id].token_info())


async def get_role(request: web.Request) -> web.Response:
    """GET /api/v2/authorization/roles/{roleId} (needs authorization:role:view)."""
    sb = _sb(request)
    return json_response(sb.world.role(_token(request), request.match_info["role_id"]))


# ------------------------------------------------------------------------ conversations
async def get_call(request: web.Request) -> web.Response:
    conv = _sb(request).world.get_call(request.match_info["cid"])
    return json_response(conv.rest_body())


_MPR_BOOLS = ("held", "muted", "confined", "recording")


async def patch_participant(request: web.Request) -> web.Response:
    """PATCH .../participants/{pid} (MediaParticipantRequest). `{"state": "disconnected"}`
    ends that party (disconnectType client) -> 202, empty body."""
    sb = _sb(request)
    body = _json(request)
    if not isinstance(body, dict):
        raise WorldError(400, "bad.request", "Body must be a MediaParticipantRequest object")
    cid, pid = request.match_info["cid"], request.match_info["pid"]
    conv = sb.world.get_call(cid)
    party = conv.party(pid)
    state = body.get("state")
    if state is not None and state != "disconnected":
        raise WorldError(400, "bad.request", f"Unsupported participant state change: {state!r}")
    for k in _MPR_BOOLS:
        if k in body and not isinstance(body[k], bool):
            raise WorldError(400, "bad.request", f"{k} must be a boolean")
    if state == "disconnected":
        hold = sb.faults.hold_disconnects
        if hold is not None:
            await hold.wait()
        sb.world.require_any(_token(request), PARTICIPANT_PATCH_PERMISSIONS)
        if not party.live:
            if sb.patch_final_status >= 400:
                raise WorldError(sb.patch_final_status, "conversation.participant.not.connected",
                                 f"Participant {pid} is already disconnected")
            return web.Response(status=sb.patch_final_status)
        if not sb.faults.ignore_disconnects:
            sb.world.disconnect(cid, pid, "client")
        return web.Response(status=202)
    changes = {k: body[k] for k in _MPR_BOOLS if k in body}
    if changes and party.live:
        sb.world.set_party_state(cid, pid, **changes)
    return web.Response(status=202)


async def patch_attributes(request: web.Request) -> web.Response:
    body = _json(request)
    attrs = body.get("attributes") if isinstance(body, dict) else None
    if not isinstance(attrs, dict):
        raise WorldError(400, "bad.request", 'Body must be {"attributes": {...}}')
    _sb(request).world.set_attributes(request.match_info["cid"], request.match_info["pid"],
                                      attrs)
    return web.Response(status=202)


async def flagged_reason(request: web.Request) -> web.Response:
    reason = "general" if request.method == "PUT" else None
    _sb(request).world.set_flag(request.match_info["cid"], request.match_info["pid"], reason)
    return web.Response(status=204)


async def patch_call(request: web.Request) -> web.Response:
    """PATCH /api/v2/conversations/calls/{cid} {"state":"disconnected"}: every party leaves
    (exists in Genesys; the wrong tool for removing one party)."""
    sb = _sb(request)
    body = _json(request)
    if not isinstance(body, dict) or body.get("state") != "disconnected":
        raise WorldError(400, "bad.request", "Only {\"state\": \"disconnected\"} is supported")
    sb.world.require(_token(request), DISCONNECT_PERMISSION)
    conv = sb.world.get_call(request.match_info["cid"])
    if conv.end is None:
        sb.world.end_call(conv.id, "client")
    return json_response(conv.rest_body())


async def disconnect_conversation(request: web.Request) -> web.Response:
    """POST /api/v2/conversations/{cid}/disconnect: ends the whole conversation."""
    sb = _sb(request)
    sb.world.require(_token(request), DISCONNECT_PERMISSION)
    conv = sb.world.get_call(request.match_info["cid"])
    if conv.end is None:
        sb.world.end_call(conv.id, "client")
    return web.Response(status=202)


async def conferences(request: web.Request) -> web.Response:
    if request.method == "DELETE":
        return error_response(405, "HTTP 405 Method Not Allowed: there is no conference "
                              "resource; use PATCH /api/v2/conversations/calls/{id}/"
                              "participants/{participantId} {\"state\":\"disconnected\"}")
    return error_response(404, f"No route for {request.method} {request.path}")


async def post_participant(request: web.Request) -> web.Response:
    return error_response(400, "Invalid request: participant actions such as REMOVE do not "
                          "exist; use PATCH with {\"state\":\"disconnected\"}", "bad.request")


async def queues(request: web.Request) -> web.Response:
    sb = _sb(request)
    sb.world.require(_token(request), QUEUE_VIEW_PERMISSION)
    try:
        size = int(request.query.get("pageSize", "25"))
        number = int(request.query.get("pageNumber", "1"))
    except ValueError:
        raise WorldError(400, "bad.request", "pageSize and pageNumber must be integers") from None
    if not 1 <= size <= 500 or number < 1:
        raise WorldError(400, "bad.request", "pageSize must be 1..500, pageNumber >= 1")
    name = request.query.get("name")
    found = sb.world.find_queues(name)
    total = len(found)
    pages = max(1, -(-total // size))
    page = found[(number - 1) * size: number * size]
    q = f"&name={name}" if name else ""

    def uri(n: int) -> str:
        return f"/api/v2/routing/queues?pageSize={size}&pageNumber={n}{q}"

    out: dict[str, Any] = {
        "entities": [{"id": x.id, "name": x.name, "dateCreated": iso(x.created),
                      "memberCount": 0, "selfUri": f"/api/v2/routing/queues/{x.id}"}
                     for x in page],
        "pageSize": size, "pageNumber": number, "total": total, "pageCount": pages,
        "firstUri": uri(1), "selfUri": uri(number), "lastUri": uri(pages),
    }
    if number < pages:
        out["nextUri"] = uri(number + 1)
    if number > 1:
        out["previousUri"] = uri(number - 1)
    return json_response(out)


def _predicates(filters: Any) -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = []
    if not isinstance(filters, list):
        return out
    for f in filters:
        for p in (f.get("predicates") or []) if isinstance(f, dict) else []:
            if isinstance(p, dict):
                out.append((str(p.get("dimension")), str(p.get("operator", "matches")),
                            p.get("value")))
    return out


async def analytics_query(request: web.Request) -> web.Response:
    """Conversation details query over the sandbox's calls: those that started within
    `interval`; conversationEnd notExists (active only); segment predicates queueId/userId
    (OR'd); paging. Genesys omits `conversations` when nothing matches."""
    sb = _sb(request)
    sb.world.require(_token(request), ANALYTICS_PERMISSION)
    body = _json(request)
    if not isinstance(body, dict) or not isinstance(body.get("interval"), str) \
            or "/" not in body["interval"]:
        raise WorldError(400, "bad.request", "interval (ISO-8601 start/end) is required")
    try:
        lo, hi = (datetime.fromisoformat(x).timestamp() for x in body["interval"].split("/", 1))
    except ValueError:
        raise WorldError(400, "bad.request", "interval must be <ISO-8601>/<ISO-8601>") from None
    paging = body.get("paging") or {}
    try:
        size, number = int(paging.get("pageSize", 25)), int(paging.get("pageNumber", 1))
    except (AttributeError, TypeError, ValueError):
        raise WorldError(400, "bad.request", "paging must be {pageSize, pageNumber}") from None
    if not 1 <= size <= 100 or number < 1:
        raise WorldError(400, "bad.request", "paging.pageSize must be 1..100, pageNumber >= 1")
    active_only = any(d == "conversationEnd" and op == "notExists"
                      for d, op, _ in _predicates(body.get("conversationFilters")))
    seg = [(d, v) for d, op, v in _predicates(body.get("segmentFilters"))
           if d in ("queueId", "userId")]
    calls = sb.world.active_calls() if active_only else list(sb.world.calls.values())
    # Genesys matches conversations that started within the interval
    calls = [c for c in calls if lo <= c.start < hi]
    if seg:
        def hit(c: Any) -> bool:
            qs, us = set(c.queue_ids()), set(c.user_ids())
            return any((d == "queueId" and v in qs) or (d == "userId" and v in us)
                       for d, v in seg)
        calls = [c for c in calls if hit(c)]
    calls.sort(key=lambda c: c.start)
    page = calls[(number - 1) * size: number * size]
    out: dict[str, Any] = {"totalHits": len(calls)}
    if page:  # Genesys omits "conversations" when nothing matches
        out["conversations"] = [c.analytics_body() for c in page]
    return json_response(out)


async def org_limits(request: web.Request) -> web.Response:
    """GET /api/v2/organizations/limits/namespaces/{namespaceName}: `LimitsEntityListing`
    `{"entities": [{"key", "namespace", "value"}]}`; the per-token budget (when on) in
    `platform.api`, nothing elsewhere. (A 403 for a client without the permission: a burst.)"""
    faults = _sb(request).faults
    entities = ([faults.limit()] if request.match_info["namespace"] == "platform.api"
                and faults.budget_per_minute is not None else [])
    return json_response({"entities": entities})


async def api_not_found(request: web.Request) -> web.Response:
    return error_response(404, f"No resource at {request.method} {request.path}")


# ------------------------------------------------------------------------ build
def build_app(sb: SandboxHost) -> web.Application:
    app = web.Application(middlewares=[middleware], client_max_size=8 << 20)
    app[SANDBOX] = sb
    r = app.router
    r.add_post("/oauth/token", oauth_token)
    base = "/api/v2/notifications/channels"
    r.add_post(base, create_channel)
    r.add_get(base, list_channels, allow_head=False)
    r.add_route("HEAD", base + "/{channel_id}", head_channel)
    for m in ("GET", "PUT", "POST", "DELETE"):
        r.add_route(m, base + "/{channel_id}/subscriptions", subscriptions)
    r.add_get("/channels/{channel_id}", websocket)
    calls = "/api/v2/conversations/calls/{cid}"
    r.add_get(calls, get_call)
    r.add_patch(calls, patch_call)
    r.add_patch(calls + "/participants/{pid}", patch_participant)
    r.add_post(calls + "/participants/{pid}", post_participant)
    r.add_patch(calls + "/participants/{pid}/attributes", patch_attributes)
    r.add_patch("/api/v2/conversations/{cid}/participants/{pid}", patch_participant)
    r.add_patch("/api/v2/conversations/{cid}/participants/{pid}/attributes", patch_attributes)
    r.add_put("/api/v2/conversations/{cid}/participants/{pid}/flaggedreason", flagged_reason)
    r.add_delete("/api/v2/conversations/{cid}/participants/{pid}/flaggedreason", flagged_reason)
    r.add_post("/api/v2/conversations/{cid}/disconnect", disconnect_conversation)
    r.add_route("*", "/api/v2/conversations/conferences{tail:.*}", conferences)
    r.add_get("/api/v2/routing/queues", queues)
    r.add_get("/api/v2/tokens/me", token_me)
    r.add_get("/api/v2/authorization/roles/{role_id}", get_role)
    r.add_post("/api/v2/analytics/conversations/details/query", analytics_query)
    r.add_get("/api/v2/organizations/limits/namespaces/{namespace}", org_limits)
    add_driver_routes(app)
    r.add_route("*", "/api/v2/{tail:.*}", api_not_found)
    return app
