"""GenesysClient over httpx.MockTransport: wire formats, retries, error mapping, secrets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from daemon.genesys.api import GenesysClient, TopicState
from daemon.core.timefmt import parse_time
from daemon.config import Credentials, GenesysSettings
from daemon.errors import (InvalidIdError, ApiError, BadRequestError, ConflictError, ForbiddenError,
                           NotFoundError, RateLimitedError, ServerError, TransportError,
                           UnauthorizedError)
from daemon.genesys.ratelimit import Priority, RequestLimiter

SECRET = "api-test-secret-xyz"
CREDS = Credentials("client-9", SECRET)
API = "https://api.example.test"
LOGIN = "https://login.example.test"

Handler = Callable[[httpx.Request], Awaitable[httpx.Response] | httpx.Response]


def settings(**kw: Any) -> GenesysSettings:
    return GenesysSettings(api_base_url=API, login_base_url=LOGIN, **kw)


def error(status: int, message: str, code: str = "some.code", *, corr: str | None = "corr-123",
          context_id: str = "ctx-456", headers: dict[str, str] | None = None,
          **extra: Any) -> httpx.Response:
    h = dict(headers or {})
    if corr:
        h["inin-correlation-id"] = corr
    body = {"message": message, "code": code, "status": status, "contextId": context_id,
            "details": [], "errors": [], **extra}
    return httpx.Response(status, json=body, headers=h)


class Genesys:
    """Token endpoint plus an API handler, recording every request."""

    def __init__(self, api: Handler, *, token_delay: float = 0.0) -> None:
        self.api = api
        self.token_delay = token_delay
        self.tokens: list[str] = []
        self.api_requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            tok = f"bearer-token-{len(self.tokens) + 1}-0123456789"
            self.tokens.append(tok)
            return httpx.Response(200, json={"access_token": tok, "token_type": "bearer",
                                             "expires_in": 86400})
        self.api_requests.append(request)
        reply = self.api(request)
        if asyncio.iscoroutine(reply):
            return await reply
        assert isinstance(reply, httpx.Response)
        return reply


def client(g: Genesys, **kw: Any) -> GenesysClient:
    s = settings(max_retries=kw.pop("max_retries", 3))
    kw.setdefault("retry_base_delay", 0.01)
    kw.setdefault("limiter", RequestLimiter(60000))
    return GenesysClient(s, CREDS, transport=httpx.MockTransport(g), **kw)


CALL = {"id": "c1", "participants": [{"id": "p1", "purpose": "customer", "state": "connected"}]}


async def test_disconnect_participant_wire_format() -> None:
    g = Genesys(lambda r: httpx.Response(202))
    seen: list[tuple[str, str, int]] = []
    async with client(g, on_response=lambda m, r, s, sec: seen.append((m, r, s))) as c:
        with pytest.raises(InvalidIdError):  # issue 21: a value that would change the path
            await c.disconnect_participant("conv/1 x", "part-2")
        assert g.api_requests == []  # ... is refused before anything is sent
        await c.disconnect_participant("conv-1.x", "part-2")
    (req,) = g.api_requests
    assert req.method == "PATCH"
    assert req.url.raw_path == b"/api/v2/conversations/calls/conv-1.x/participants/part-2"
    assert json.loads(req.content) == {"state": "disconnected"}
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Authorization"] == f"Bearer {g.tokens[0]}"
    assert seen == [("PATCH", "/api/v2/conversations/calls/{conversationId}/participants/{participantId}", 202)]


async def test_requests_carry_what_asyncclient_build_request_would_give_them() -> None:
    """`GenesysClient._build` makes each request from parts worked out once; what goes out
    is what `httpx.AsyncClient.build_request` would have built from the same call:
    method, URL (query included), every header in the same order, body."""
    def api(r: httpx.Request) -> httpx.Response:
        if r.method == "GET":
            return httpx.Response(200, json={"entities": [], "pageCount": 1})
        if r.method == "HEAD":
            return httpx.Response(200)
        if r.method == "POST":
            return httpx.Response(200, json={"entities": []})
        return httpx.Response(202)

    g = Genesys(api)
    async with client(g) as c:
        await c.disconnect_participant("conv-1", "part-2")
        await c.find_queues_by_name("Sales")
        await c.channel_exists("ch-1")
        await c.add_subscriptions("ch-1", ["v2.routing.queues.q1.conversations"],
                                  ignore_errors=True)
        ref = c._http
        token = g.tokens[0]
        expected = [
            ref.build_request("PATCH", API + "/api/v2/conversations/calls/conv-1/participants/part-2",
                              json={"state": "disconnected"},
                              headers={"Authorization": f"Bearer {token}"}),
            ref.build_request("GET", API + "/api/v2/routing/queues",
                              params={"name": "Sales", "pageSize": "100", "pageNumber": "1"},
                              headers={"Authorization": f"Bearer {token}"}),
            ref.build_request("HEAD", API + "/api/v2/notifications/channels/ch-1",
                              headers={"Authorization": f"Bearer {token}"}),
            ref.build_request("POST", API + "/api/v2/notifications/channels/ch-1/subscriptions",
                              params={"ignoreErrors": "true"},
                              json=[{"id": "v2.routing.queues.q1.conversations"}],
                              headers={"Authorization": f"Bearer {token}"}),
        ]
    assert len(g.api_requests) == len(expected)
    for got, want in zip(g.api_requests, expected):
        assert (got.method, got.url) == (want.method, want.url)
        assert got.headers.raw == want.headers.raw, got.method
        assert json.loads(got.content or b"null") == json.loads(want.content or b"null")
        assert got.extensions["timeout"] == want.extensions["timeout"]


async def test_get_call_and_attributes() -> None:
    def api(r: httpx.Request) -> httpx.Response:
        if r.method == "GET":
            return httpx.Response(200, json=CALL)
        return httpx.Response(202)

    g = Genesys(api)
    async with client(g) as c:
        assert await c.get_call("c1") == CALL
        await c.set_participant_attributes("c1", "p1", {"flag": "yes"})
    assert g.api_requests[0].url.path == "/api/v2/conversations/calls/c1"
    patch = g.api_requests[1]
    assert patch.url.path == "/api/v2/conversations/calls/c1/participants/p1/attributes"
    assert json.loads(patch.content) == {"attributes": {"flag": "yes"}}


async def test_401_refreshes_once_and_retries_once() -> None:
    def api(r: httpx.Request) -> httpx.Response:
        if r.headers["Authorization"].endswith(g.tokens[0]):
            return error(401, "Invalid login credentials.", "bad.credentials")
        return httpx.Response(200, json=CALL)

    g = Genesys(api)
    async with client(g) as c:
        assert await c.get_call("c1") == CALL
    assert len(g.tokens) == 2
    assert len(g.api_requests) == 2


async def test_fifty_concurrent_401s_cause_one_refresh() -> None:
    async def api(r: httpx.Request) -> httpx.Response:
        if r.headers["Authorization"].endswith(g.tokens[0]):
            # Answer slowly, so that all 50 requests are in flight with the old token.
            await asyncio.sleep(0.05)
            return error(401, "Invalid login credentials.", "bad.credentials")
        return httpx.Response(200, json=CALL)

    g = Genesys(api, token_delay=0.02)
    async with client(g) as c:
        await c.tokens.token()
        results = await asyncio.wait_for(
            asyncio.gather(*(c.get_call("c1") for _ in range(50))), 20)
    assert all(r == CALL for r in results)
    assert len(g.tokens) == 2
    assert len(g.api_requests) == 100


async def test_persistent_401_says_credentials_refused() -> None:
    g = Genesys(lambda r: error(401, "Invalid login credentials.", "bad.credentials"))
    async with client(g) as c:
        with pytest.raises(UnauthorizedError, match="credentials were refused") as info:
            await c.get_call("c1")
    assert len(g.api_requests) == 2
    assert info.value.status == 401
    assert info.value.correlation_id == "corr-123"


@pytest.mark.parametrize("status, cls", [
    (400, BadRequestError), (403, ForbiddenError), (404, NotFoundError),
    (409, ConflictError), (429, RateLimitedError), (500, ServerError), (503, ServerError),
    (418, ApiError),
])
async def test_error_mapping_carries_errorbody_and_correlation(status: int, cls: type) -> None:
    g = Genesys(lambda r: error(status, f"message for {status}", "the.code",
                                errors=[{"message": "nested problem"}],
                                details=[{"errorCode": "field.invalid", "fieldName": "state"}]))
    async with client(g, max_retries=0) as c:
        with pytest.raises(cls) as info:
            await c.set_participant_attributes("c1", "p1", {"a": "b"})
    err = info.value
    assert type(err) is cls
    assert err.status == status
    assert err.code == "the.code"
    assert err.correlation_id == "corr-123"
    assert "message for" in err.message
    assert "nested problem" in err.details
    assert "field.invalid state" in err.details
    assert f"HTTP {status}" in str(err)
    assert "corr-123" in str(err)
    assert len(g.api_requests) == 1


async def test_correlation_id_falls_back_to_context_id() -> None:
    g = Genesys(lambda r: error(404, "The requested conversation was not found.", "not.found",
                                corr=None, context_id="ctx-only"))
    async with client(g) as c:
        with pytest.raises(NotFoundError) as info:
            await c.get_call("gone")
    assert info.value.correlation_id == "ctx-only"
    assert "not found" in str(info.value)


async def test_403_names_the_missing_permission() -> None:
    msg = ("Unable to perform the requested action. You are missing the following "
           "permission(s): [conversation:communication:disconnect]")
    g = Genesys(lambda r: error(403, msg, "missing.any.permissions"))
    async with client(g) as c:
        with pytest.raises(ForbiddenError) as info:
            await c.disconnect_participant("c1", "p1")
    assert info.value.missing_permissions == ["conversation:communication:disconnect"]
    assert len(g.api_requests) == 1


async def test_non_json_error_body_still_maps() -> None:
    g = Genesys(lambda r: httpx.Response(502, text="<html>Bad Gateway</html>"))
    async with client(g, max_retries=1) as c:
        with pytest.raises(ServerError, match="HTTP 502: Bad Gateway"):
            await c.get_call("c1")
    assert len(g.api_requests) == 2


async def test_429_retry_after_is_honoured_via_the_shared_limiter() -> None:
    def api(r: httpx.Request) -> httpx.Response:
        if len(g.api_requests) == 1:
            return error(429, "Rate limit exceeded the maximum", "too.many.requests",
                         headers={"Retry-After": "1"})
        return httpx.Response(200, json=CALL)

    g = Genesys(api)
    async with client(g) as c:
        t0 = time.monotonic()
        assert await c.get_call("c1") == CALL
        waited = time.monotonic() - t0
    assert waited >= 0.9
    assert waited < 10
    assert len(g.api_requests) == 2


async def test_429_retry_after_is_capped_and_retries_bounded() -> None:
    g = Genesys(lambda r: error(429, "Rate limit exceeded", "too.many.requests",
                                headers={"Retry-After": "3600"}))
    async with client(g, max_retries=2, retry_after_cap=0.05) as c:
        t0 = time.monotonic()
        with pytest.raises(RateLimitedError) as info:
            await c.get_call("c1")
        assert time.monotonic() - t0 < 10
    assert info.value.retry_after == 0.05
    assert len(g.api_requests) == 3


async def test_5xx_retries_are_bounded_then_succeed_or_raise() -> None:
    calls = {"n": 0}

    def flaky(r: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return error(503, "Service unavailable") if calls["n"] <= 2 else httpx.Response(200, json=CALL)

    g = Genesys(flaky)
    async with client(g, max_retries=3) as c:
        assert await c.get_call("c1") == CALL
    assert len(g.api_requests) == 3

    g2 = Genesys(lambda r: error(503, "Service unavailable"))
    async with client(g2, max_retries=2) as c:
        with pytest.raises(ServerError):
            await c.get_call("c1")
    assert len(g2.api_requests) == 3


async def test_transport_errors_become_transport_error_without_secrets() -> None:
    def api(r: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused; {r.headers['Authorization']}")

    g = Genesys(api)
    with capture_logs() as logs:
        async with client(g, max_retries=2) as c:
            with pytest.raises(TransportError) as info:
                await c.get_call("c1")
    err = info.value
    assert err.status == 0
    assert "ConnectError" in str(err)
    assert len(g.api_requests) == 3
    for secret in [SECRET, *g.tokens]:
        assert secret not in str(err)
        assert secret not in repr(err)
        assert secret not in repr(logs)


async def test_timeout_is_a_transport_error() -> None:
    async def slow(r: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out")

    g = Genesys(slow)
    async with client(g, max_retries=0) as c:
        with pytest.raises(TransportError, match="ReadTimeout"):
            await c.get_call("c1")


async def test_409_is_retried_only_where_asked() -> None:
    state = {"n": 0}

    def api(r: httpx.Request) -> httpx.Response:
        state["n"] += 1
        return error(409, "conflict") if state["n"] <= 2 else httpx.Response(202)

    g = Genesys(api)
    async with client(g) as c:
        await c.disconnect_participant("c1", "p1", retry_conflict=3)
    assert len(g.api_requests) == 3

    g2 = Genesys(lambda r: error(409, "conflict"))
    async with client(g2) as c:
        with pytest.raises(ConflictError):
            await c.set_participant_attributes("c1", "p1", {"a": "b"})
        assert len(g2.api_requests) == 1
        with pytest.raises(ConflictError):
            await c.disconnect_participant("c1", "p1", retry_conflict=2)
    assert len(g2.api_requests) == 4


async def test_channels_and_subscriptions() -> None:
    def api(r: httpx.Request) -> httpx.Response:
        p = r.url.path
        if r.method == "POST" and p == "/api/v2/notifications/channels":
            return httpx.Response(200, json={
                "id": "streaming-abc", "connectUri": "wss://streaming.example.test/channels/streaming-abc",
                "expires": "2026-11-22T09:15:02.345Z"})
        if r.method == "HEAD":
            return httpx.Response(200) if p.endswith("streaming-abc") else error(404, "gone")
        if r.method == "GET" and p == "/api/v2/notifications/channels":
            return httpx.Response(200, json={"entities": [{"id": "streaming-abc"}]})
        if p.endswith("/subscriptions") and r.method in ("PUT", "POST", "GET"):
            return httpx.Response(200, json={"entities": [
                {"id": "v2.users.u1.conversations.calls", "state": "Permitted"},
                {"id": "v2.routing.queues.q1.conversations.calls", "state": "Rejected",
                 "rejectionReason": "Missing permissions",
                 "missingPermissions": ["routing:queue:view"]}]})
        if p.endswith("/subscriptions") and r.method == "DELETE":
            return httpx.Response(200)
        return error(404, "no route")

    g = Genesys(api)
    async with client(g) as c:
        ch = await c.create_channel()
        assert ch.id == "streaming-abc"
        assert ch.connect_uri.startswith("wss://")
        assert ch.expires == parse_time("2026-11-22T09:15:02.345Z")
        assert await c.channel_exists("streaming-abc") is True
        assert await c.channel_exists("streaming-old") is False
        assert await c.list_channels() == [{"id": "streaming-abc"}]
        topics = ["v2.users.u1.conversations.calls", "v2.routing.queues.q1.conversations.calls"]
        states = await c.put_subscriptions("streaming-abc", topics, ignore_errors=True)
        assert states[1] == TopicState("v2.routing.queues.q1.conversations.calls", "Rejected",
                                       "Missing permissions", ("routing:queue:view",))
        await c.add_subscriptions("streaming-abc", topics[:1])
        assert len(await c.get_subscriptions("streaming-abc")) == 2
        await c.delete_subscriptions("streaming-abc")
    put = next(r for r in g.api_requests if r.method == "PUT")
    assert put.url.params["ignoreErrors"] == "true"
    assert json.loads(put.content) == [{"id": t} for t in topics]
    post = [r for r in g.api_requests if r.method == "POST"][-1]
    assert "ignoreErrors" not in post.url.params
    assert post.url.path == "/api/v2/notifications/channels/streaming-abc/subscriptions"


async def test_find_queues_by_name_follows_paging() -> None:
    def api(r: httpx.Request) -> httpx.Response:
        page = int(r.url.params["pageNumber"])
        ents = [{"id": f"q{page}", "name": "Sales" if page == 2 else "Sales EMEA"}]
        return httpx.Response(200, json={"entities": ents, "pageSize": 100, "pageNumber": page,
                                         "total": 3, "pageCount": 3})

    g = Genesys(api)
    async with client(g) as c:
        found = await c.find_queues_by_name("sales")
    assert found == [{"id": "q2", "name": "Sales"}]
    assert [r.url.params["pageNumber"] for r in g.api_requests] == ["1", "2", "3"]
    assert all(r.url.params["name"] == "sales" for r in g.api_requests)


async def test_active_conversations_query_batches_and_pages() -> None:
    bodies: list[dict[str, Any]] = []

    def api(r: httpx.Request) -> httpx.Response:
        body = json.loads(r.content)
        bodies.append(body)
        page = body["paging"]["pageNumber"]
        first = body["segmentFilters"][0]["predicates"][0]["value"]
        n = 100 if page == 1 else 7
        convs = [{"conversationId": f"{first}-{page}-{i}", "conversationStart": "2026-11-21T09:00:00.000Z",
                  "participants": []} for i in range(n)]
        convs.append({"conversationId": "shared"})  # in every page: de-duplicated
        return httpx.Response(200, json={"conversations": convs[:100] if page == 1 else convs,
                                         "totalHits": 107})

    g = Genesys(api)
    queues = [f"queue-{i}" for i in range(60)]
    async with client(g) as c:
        convs = await c.active_conversations(queue_ids=queues, user_ids=["user-1"],
                                             since=1_700_000_000.0, until=1_700_003_600.0)
    # 61 ids -> 2 batches of at most 50, 2 pages each.
    assert len(bodies) == 4
    b = bodies[0]
    assert b["interval"] == "2023-11-14T22:13:20.000Z/2023-11-14T23:13:20.000Z"
    assert b["conversationFilters"] == [{"type": "and", "predicates": [
        {"type": "dimension", "dimension": "conversationEnd", "operator": "notExists"}]}]
    preds = b["segmentFilters"][0]["predicates"]
    assert b["segmentFilters"][0]["type"] == "or"
    assert len(preds) == 50
    assert preds[0] == {"type": "dimension", "dimension": "queueId", "operator": "matches",
                        "value": "queue-0"}
    last_batch = bodies[2]["segmentFilters"][0]["predicates"]
    assert {"type": "dimension", "dimension": "userId", "operator": "matches",
            "value": "user-1"} in last_batch
    assert b["paging"] == {"pageSize": 100, "pageNumber": 1}
    ids = [c["conversationId"] for c in convs]
    assert len(ids) == len(set(ids))
    assert ids.count("shared") == 1
    assert all(r.headers["Authorization"].startswith("Bearer ") for r in g.api_requests)


async def test_requests_use_their_priority_slot() -> None:
    lim = RequestLimiter(1, enforce_reserve=0.0, window=1.0)  # one request a 1 s window
    g = Genesys(lambda r: httpx.Response(202) if r.method == "PATCH" else httpx.Response(200, json=CALL))
    async with client(g, limiter=lim) as c:
        await c.tokens.token()
        await c.get_call("warm")  # spends the window
        lim.pause(0.2)
        resync = asyncio.create_task(c.get_call("c-resync"))
        for _ in range(200):
            if lim.waiting(Priority.RESYNC):
                break
            await asyncio.sleep(0.005)
        enforce = asyncio.create_task(c.disconnect_participant("c-enf", "p1"))
        await asyncio.wait_for(asyncio.gather(resync, enforce), 10)
    assert [r.method for r in g.api_requests] == ["GET", "PATCH", "GET"]


async def test_malformed_success_reply_is_an_api_error() -> None:
    g = Genesys(lambda r: httpx.Response(200, text="not json"))
    async with client(g) as c:
        with pytest.raises(ApiError, match="not a JSON object"):
            await c.get_call("c1")


async def test_debug_logs_name_route_and_status_never_the_token() -> None:
    g = Genesys(lambda r: httpx.Response(200, json=CALL))
    with capture_logs() as logs:
        async with client(g) as c:
            await c.get_call("c1")
    entries = [e for e in logs if e.get("event") == "api_request"]
    assert entries and entries[0]["route"] == "/api/v2/conversations/calls/{conversationId}"
    assert entries[0]["status"] == 200
    for secret in [SECRET, *g.tokens]:
        assert secret not in repr(logs)


async def test_one_shared_client_with_explicit_timeouts() -> None:
    s = settings(connect_timeout=2.5, read_timeout=7.0)
    async with GenesysClient(s, CREDS, transport=httpx.MockTransport(Genesys(lambda r: httpx.Response(200)))) as c:
        t = c._http.timeout
        assert (t.connect, t.read, t.write, t.pool) == (2.5, 7.0, 7.0, 2.5)
        assert c.tokens._http is c._http  # the token requests share the one client
        assert c.limiter.per_minute == 300


async def test_an_injected_retry_policy_governs_attempts_and_delays() -> None:
    """One `RetryPolicy` decides: 2 attempts in all, waits drawn from its own seeded rng."""
    import random

    from daemon.genesys.retry import RetryPolicy

    g = Genesys(lambda r: error(503, "Service unavailable"))
    policy = RetryPolicy(initial=0.05, factor=2.0, cap=0.05, jitter=0.0, max_attempts=2)
    async with client(g, max_retries=10, retry=policy, rng=random.Random(3)) as c:
        assert c.retry is policy
        started = time.monotonic()
        with pytest.raises(ServerError):
            await c.get_call("c1")
        assert time.monotonic() - started >= 0.05  # the one back-off was waited
    assert len(g.api_requests) == 2  # max_retries is the default's, not this policy's

    conflicts = Genesys(lambda r: error(409, "conflict"))
    async with client(conflicts, conflict_retry=RetryPolicy(initial=0.001, cap=0.001)) as c:
        with pytest.raises(ConflictError):
            await c.disconnect_participant("c1", "p1", retry_conflict=4)
    assert len(conflicts.api_requests) == 5


async def test_api_request_debug_line_only_when_debug_lines_are_emitted() -> None:
    """`api_request` (debug) is built only when debug lines go out: at `warning` nothing of
    it is made; at `debug` it carries route and status."""
    import io

    from _logging_state import preserved_logging

    from daemon.core.logs import debug_enabled
    from daemon.service.logs import configure_logging

    g = Genesys(lambda r: httpx.Response(202))
    async with client(g) as c:
        with preserved_logging():
            out = io.StringIO()
            configure_logging("debug", "json", stream=out)
            assert debug_enabled()
            with capture_logs() as logs:
                await c.disconnect_participant("c1", "p1")
            [line] = [x for x in logs if x["event"] == "api_request"]
            assert line["status"] == 202 and line["method"] == "PATCH"
            assert "/participants/" in line["route"]
            configure_logging("warning", "json", stream=out)
            assert not debug_enabled()
            await c.disconnect_participant("c1", "p2")
            assert "api_request" not in out.getvalue()
            configure_logging("debug", "json", stream=out)
            await c.disconnect_participant("c1", "p3")
            assert "api_request" in out.getvalue()
