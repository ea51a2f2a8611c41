"""The sandbox's request budget. By default as Genesys today: a sliding 60 s window per
access token, no `inin-ratelimit-*` header on any answer, 429 + Retry-After +
`too.many.requests.retry.after` + the `limit` object past the allowance, and the limits API.
With the legacy flag (`--legacy-ratelimit-headers`, `configure {legacyRatelimitHeaders}`):
a fixed 60 s window per token from its first request and the headers on every /api/v2
answer (errors included), as before 2021."""

from __future__ import annotations


import aiohttp

from daemon.sandbox import Sandbox
from daemon.sandbox.faults import Faults
from sandbox_fixtures import SandboxClient


def _budget(r: aiohttp.ClientResponse) -> tuple[int, int, int]:
    h = r.headers
    return (int(h["inin-ratelimit-count"]), int(h["inin-ratelimit-allowed"]),
            int(h["inin-ratelimit-reset"]))


async def test_headers_on_every_answer_and_429_past_the_limit(sandbox: Sandbox,
                                                              sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    sandbox.world.create_queue("Q")
    st, _, r = await c.request("GET", "/api/v2/routing/queues")
    assert st == 200 and "inin-ratelimit-count" not in r.headers  # budget off: no headers
    st, body, _ = await c.request("POST", "/sandbox/configure",
                                  {"budget": 4, "legacyRatelimitHeaders": True})
    assert st == 200 and body["result"]["budget"] == 4
    assert body["result"]["legacyRatelimitHeaders"] is True
    st, _, r = await c.request("GET", "/api/v2/routing/queues")
    assert st == 200
    count, allowed, reset = _budget(r)
    assert (count, allowed) == (1, 4) and 59 <= reset <= 60  # the window starts here
    # Errors count and carry the headers too.
    st, _, r = await c.request("GET", "/api/v2/conversations/calls/nope")
    assert st == 404 and _budget(r)[:2] == (2, 4)
    for n in (3, 4):
        st, _, r = await c.request("GET", "/api/v2/routing/queues")
        assert st == 200 and _budget(r)[0] == n
    st, body, r = await c.request("GET", "/api/v2/routing/queues")
    assert st == 429 and body["code"] == "too.many.requests.retry.after"
    assert "limit" not in body  # the legacy body: before June 2023
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert int(r.headers["Retry-After"]) == _budget(r)[2]
    assert _budget(r)[:2] == (4, 4)  # a refused request is not counted
    # A new token starts a new window.
    await c.login()
    st, _, r = await c.request("GET", "/api/v2/routing/queues")
    assert st == 200 and _budget(r)[:2] == (1, 4)
    # An unauthenticated request is not counted against anybody and has no budget headers.
    st, _, r = await c.request("GET", "/api/v2/routing/queues", token="bogus")
    assert st == 401 and "inin-ratelimit-count" not in r.headers
    st, body, _ = await c.request("POST", "/sandbox/configure", {"budget": 0})
    assert st == 400
    st, body, _ = await c.request("POST", "/sandbox/configure", {"budget": None})
    assert st == 200 and body["result"]["budget"] is None


def test_fixed_window_from_first_request() -> None:
    f = Faults(budget_per_minute=2, legacy_headers=True)
    assert f.spend("t", now=100.0) is None
    assert f.budget_headers("t", now=100.0) == {
        "inin-ratelimit-count": "1", "inin-ratelimit-allowed": "2", "inin-ratelimit-reset": "60"}
    assert f.spend("t", now=130.0) is None
    assert f.spend("t", now=159.5) == 1.0  # 0.5 s left, rounded up
    assert f.budget_headers("t", now=140.2)["inin-ratelimit-reset"] == "20"
    # The window is fixed, not sliding: at 160 a new one starts with the next request.
    assert f.spend("t", now=160.0) is None
    assert f.budget_headers("t", now=160.0)["inin-ratelimit-count"] == "1"
    assert f.spend("u", now=161.0) is None  # per token
    assert f.budget_headers("u", now=161.0)["inin-ratelimit-count"] == "1"
    f.set_budget(None)
    assert f.spend("t", now=162.0) is None and f.budget_headers("t") == {}


async def test_default_no_headers_sliding_window_and_todays_429(
        sandbox: Sandbox, sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    sandbox.world.create_queue("Q")
    st, body, _ = await c.request("POST", "/sandbox/configure", {"budget": 3})
    assert st == 200 and body["result"]["legacyRatelimitHeaders"] is False
    answers = [await c.request("GET", "/api/v2/routing/queues"),
               await c.request("GET", "/api/v2/conversations/calls/nope"),  # errors count too
               await c.request("GET", "/api/v2/routing/queues")]
    assert [st for st, _, _ in answers] == [200, 404, 200]
    st, body, r = await c.request("GET", "/api/v2/routing/queues")
    assert st == 429
    for _, _, resp in [*answers, (st, body, r)]:
        assert not [h for h in resp.headers if h.lower().startswith("inin-ratelimit")]
    assert body["code"] == "too.many.requests.retry.after" and body["status"] == 429
    assert body["limit"] == {"key": "client.credentials.token.rate.per.minute",
                             "namespace": "platform.api", "value": 3}
    assert {"message", "contextId", "details", "errors"} <= body.keys()
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    # The limits API lists the same allowance (and is itself counted: 429 now).
    await c.login()
    st, body, r = await c.request("GET", "/api/v2/organizations/limits/namespaces/platform.api")
    assert st == 200 and body == {"entities": [{"key": "client.credentials.token.rate.per.minute",
                                                "namespace": "platform.api", "value": 3}]}
    st, body, _ = await c.request("GET", "/api/v2/organizations/limits/namespaces/analytics")
    assert st == 200 and body == {"entities": []}


def test_sliding_window_counts_the_last_60_seconds() -> None:
    f = Faults(budget_per_minute=2)
    assert f.spend("t", now=100.0) is None
    assert f.spend("t", now=130.0) is None
    assert f.budget_headers("t", now=130.0) == {}  # today: no headers
    assert f.spend("t", now=159.5) == 1.0  # the request of 100.0 leaves at 160.0
    # A fixed window from 100 would reset at 160 and allow two; the sliding one allows one.
    assert f.spend("t", now=160.0) is None
    assert f.spend("t", now=160.5) == 30.0  # the one of 130.0 leaves at 190.0
    assert f.spend("t", now=190.0) is None
    assert f.spend("u", now=190.0) is None  # per token
    f.set_legacy_headers(True)
    assert f.spend("t", now=191.0) is None and f.budget_headers("t", now=191.0)[
        "inin-ratelimit-count"] == "1"
