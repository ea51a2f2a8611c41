"""A small aiohttp stand-in for the Genesys Cloud endpoints `confguard eject` uses.

Real wire formats: the token reply of the client-credentials grant, `CallConversation`
bodies with `CallMediaParticipant` fields (camelCase, `user`/`externalContact` as
`{id, name}` refs), `ErrorBody` errors with an `inin-correlation-id` header, and an empty 202
for a successful participant PATCH. Listens on 127.0.0.1 with an ephemeral port.

This is test scaffolding, independent of the full sandbox under daemon/sandbox/. It stays
(issue 17 asked to merge it into the sandbox unless a test needs what the sandbox cannot do)
because tests/commands/test_eject.py needs, today, what the sandbox does not offer:
- the request headers of each PATCH (`Authorization` carrying the issued token,
  `Content-Type: application/json`): the sandbox journal keeps method, path, body, status
  and client id only;
- a PATCH answered 202 while the party stays connected (`apply_patch=False`, the
  "removal accepted but not confirmed" exit 6);
- canned error bodies per request kind (`code`/`message` of an `ErrorBody`, e.g. a 409
  `conflict` twice then success, a sticky 503) beyond the sandbox bursts' fixed message;
- a GET held until released whose arrival is visible before it is answered (the Ctrl-C
  test waits for the GET to arrive; the sandbox journals a request once answered);
- a hand-built `CallConversation` with fixed ids and field shapes (a `sip:...;user=phone`
  address, an ended ACD leg) that the eject selectors are tested against.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PATCH_ROUTE = "/api/v2/conversations/calls/{cid}/participants/{pid}"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    content_type: str | None
    body: Any


@dataclass
class Failure:
    """A canned error reply: `status`, ErrorBody fields, extra headers."""

    status: int
    code: str = "error"
    message: str = "error"
    headers: dict[str, str] = field(default_factory=dict)


def error_body(status: int, code: str, message: str, context_id: str) -> dict[str, Any]:
    return {"message": message, "code": code, "status": status, "contextId": context_id,
            "details": [], "errors": []}


def participant(pid: str, *, purpose: str, name: str | None = None, address: str | None = None,
                ani: str | None = None, dnis: str | None = None, state: str = "connected",
                user: tuple[str, str] | None = None, external_contact: str | None = None,
                direction: str = "inbound") -> dict[str, Any]:
    """A CallMediaParticipant as GET /api/v2/conversations/calls/{id} returns it."""
    p: dict[str, Any] = {
        "id": pid, "purpose": purpose, "state": state, "direction": direction,
        "startTime": "2026-11-21T09:15:00.000Z", "connectedTime": "2026-11-21T09:15:02.345Z",
        "held": False, "muted": False, "confined": False, "recording": False,
        "recordingState": "none", "provider": "Edge", "attributes": {},
        "wrapupRequired": False,
    }
    if name is not None:
        p["name"] = name
    if address is not None:
        p["address"] = address
    if ani is not None:
        p["ani"] = ani
    if dnis is not None:
        p["dnis"] = dnis
    if user is not None:
        p["user"] = {"id": user[0], "name": user[1], "selfUri": f"/api/v2/users/{user[0]}"}
    if external_contact is not None:
        p["externalContact"] = {"id": external_contact,
                                "selfUri": f"/api/v2/externalcontacts/contacts/{external_contact}"}
    if state in ("disconnected", "terminated"):
        p["endTime"] = "2026-11-21T09:16:00.000Z"
        p["disconnectType"] = "client"
    return p


def call_conversation(cid: str, participants: list[dict[str, Any]]) -> dict[str, Any]:
    """A CallConversation body."""
    return {"id": cid, "participants": participants, "otherMediaUris": [],
            "recordingState": "none", "maxParticipants": 6, "securePause": False,
            "divisions": [], "selfUri": f"/api/v2/conversations/calls/{cid}"}


class StandIn:
    """The stand-in server. `calls` maps conversation id to a CallConversation (mutated by a
    successful PATCH). `fail[(method, kind)]` is a queue of canned failures, kind being
    "call" (GET the call) or "participant" (PATCH a participant); `sticky_fail` repeats one
    failure for every request of that key."""

    def __init__(self, *, client_id: str = "standin-client", client_secret: str = "standin-secret",
                 expires_in: int = 86400, apply_patch: bool = True) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self.apply_patch = apply_patch
        self.tokens: list[str] = []
        self.calls: dict[str, dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self.fail: dict[tuple[str, str], list[Failure]] = {}
        self.sticky_fail: dict[tuple[str, str], Failure] = {}
        self.hold_gets = False  # hold every GET of a call until stop() (or 30 s)
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.origin = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_get("/api/v2/conversations/calls/{cid}", self._get_call)
        app.router.add_patch("/api/v2/conversations/calls/{cid}/participants/{pid}", self._patch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self.origin = f"http://127.0.0.1:{port}"
        return self.origin

    async def stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def patches(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PATCH"]

    # ------------------------------------------------------------------ handlers

    def _error(self, f: Failure) -> web.Response:
        corr = str(uuid.uuid4())
        return web.json_response(error_body(f.status, f.code, f.message, corr), status=f.status,
                                 headers={"inin-correlation-id": corr, **f.headers})

    def _canned(self, key: tuple[str, str]) -> web.Response | None:
        queue = self.fail.get(key)
        if queue:
            return self._error(queue.pop(0))
        if key in self.sticky_fail:
            return self._error(self.sticky_fail[key])
        return None

    def _authorised(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[7:] in self.tokens

    async def _record(self, request: web.Request) -> Any:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
        self.requests.append(Recorded(request.method, request.path, dict(request.query),
                                      request.headers.get("Authorization"),
                                      request.headers.get("Content-Type"), body))
        return body

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests.append(Recorded("POST", request.path, {}, None,
                                      request.headers.get("Content-Type"), dict(form)))
        expected = "Basic " + base64.b64encode(
            f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": "invalid_client",
                                      "description": "client authentication failed"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = f"standin-token-{uuid.uuid4().hex}"
        self.tokens.append(token)
        return web.json_response({"access_token": token, "token_type": "bearer",
                                  "expires_in": self.expires_in})

    async def _get_call(self, request: web.Request) -> web.Response:
        await self._record(request)
        if not self._authorised(request):
            return self._error(Failure(401, "bad.credentials", "Invalid login credentials."))
        if self.hold_gets and self._release is not None:
            try:
                await asyncio.wait_for(self._release.wait(), 30)
            except asyncio.TimeoutError:
                pass
        canned = self._canned(("GET", "call"))
        if canned is not None:
            return canned
        call = self.calls.get(request.match_info["cid"])
        if call is None:
            return self._error(Failure(404, "not.found", "The requested conversation was not found."))
        return web.json_response(copy.deepcopy(call))

    async def _patch(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not self._authorised(request):
            return self._error(Failure(401, "bad.credentials", "Invalid login credentials."))
        canned = self._canned(("PATCH", "participant"))
        if canned is not None:
            return canned
        call = self.calls.get(request.match_info["cid"])
        if call is None:
            return self._error(Failure(404, "not.found", "The requested conversation was not found."))
        pid = request.match_info["pid"]
        party = next((p for p in call["participants"] if p["id"] == pid), None)
        if party is None:
            return self._error(Failure(404, "not.found", "The requested participant was not found."))
        if not isinstance(body, dict) or body.get("state") not in ("disconnected",):
            return self._error(Failure(400, "bad.request", "The request could not be understood."))
        if self.apply_patch:
            party["state"] = "disconnected"
            party["endTime"] = "2026-11-21T09:20:00.000Z"
            party["disconnectType"] = "client"
        return web.Response(status=202)
