"""TokenManager: caching, refresh ahead of expiry, one refresh under concurrency, errors."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import pytest
from structlog.testing import capture_logs

from daemon.genesys.auth import TokenManager
from daemon.config import Credentials
from daemon.errors import AuthError

SECRET = "s3cr3t-value-never-logged"
CREDS = Credentials("client-1", SECRET)
LOGIN = "https://login.example.test"


class Login:
    """A token endpoint behind httpx.MockTransport."""

    def __init__(self, *, expires_in: float = 3600, delay: float = 0.0) -> None:
        self.expires_in = expires_in
        self.delay = delay
        self.requests: list[httpx.Request] = []
        self.issued: list[str] = []
        self.reply: Callable[[httpx.Request], httpx.Response] | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.reply is not None:
            return self.reply(request)
        token = f"tok-{len(self.issued) + 1}-abcdefabcdef"
        self.issued.append(token)
        return httpx.Response(200, json={"access_token": token, "token_type": "bearer",
                                         "expires_in": self.expires_in})


def manager(login: Login, *, clock: Callable[[], float] | None = None,
            margin: float = 300.0) -> tuple[TokenManager, httpx.AsyncClient]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(login))
    kw = {"clock": clock} if clock else {}
    return TokenManager(http, LOGIN, CREDS, refresh_margin=margin, **kw), http  # type: ignore[arg-type]


async def test_wire_format_of_the_token_request() -> None:
    login = Login()
    tm, http = manager(login)
    assert await tm.token() == "tok-1-abcdefabcdef"
    req = login.requests[0]
    assert req.method == "POST"
    assert str(req.url) == f"{LOGIN}/oauth/token"
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(
        f"client-1:{SECRET}".encode()).decode()
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(req.content.decode()) == {"grant_type": ["client_credentials"]}
    await http.aclose()


async def test_fifty_concurrent_callers_cause_one_token_request() -> None:
    login = Login(delay=0.05)
    tm, http = manager(login)
    tokens = await asyncio.wait_for(asyncio.gather(*(tm.token() for _ in range(50))), 10)
    assert set(tokens) == {"tok-1-abcdefabcdef"}
    assert len(login.requests) == 1
    await http.aclose()


async def test_refresh_ahead_of_expiry_with_injected_clock() -> None:
    now = [1000.0]
    login = Login(expires_in=3600)
    tm, http = manager(login, clock=lambda: now[0], margin=300)
    assert await tm.token() == "tok-1-abcdefabcdef"
    assert tm.expires_at == 4600.0
    now[0] = 1000 + 3600 - 301
    assert await tm.token() == "tok-1-abcdefabcdef"
    assert tm.age == pytest.approx(3299)
    now[0] = 1000 + 3600 - 299  # inside the margin: refreshed although still valid
    assert await tm.token() == "tok-2-abcdefabcdef"
    assert len(login.requests) == 2
    await http.aclose()


async def test_short_lived_token_margin_is_at_most_half_the_lifetime() -> None:
    now = [0.0]
    login = Login(expires_in=300)  # 5 minutes, the shortest Genesys allows
    tm, http = manager(login, clock=lambda: now[0], margin=300)
    await tm.token()
    now[0] = 149
    assert await tm.token() == "tok-1-abcdefabcdef"
    now[0] = 151
    assert await tm.token() == "tok-2-abcdefabcdef"
    await http.aclose()


async def test_invalidate_only_drops_the_current_token() -> None:
    login = Login(delay=0.02)
    tm, http = manager(login)
    old = await tm.token()
    # 50 concurrent 401s for the same token, each followed by a new token() call.

    async def on_401() -> str:
        await tm.invalidate(old)
        return await tm.token()

    fresh = await asyncio.wait_for(asyncio.gather(*(on_401() for _ in range(50))), 10)
    assert set(fresh) == {"tok-2-abcdefabcdef"}
    assert len(login.requests) == 2
    await tm.invalidate(old)  # stale: no effect
    assert await tm.token() == "tok-2-abcdefabcdef"
    assert len(login.requests) == 2
    await http.aclose()


async def test_failed_refresh_keeps_using_the_still_valid_token() -> None:
    now = [0.0]
    login = Login(expires_in=3600)
    tm, http = manager(login, clock=lambda: now[0], margin=300)
    await tm.token()
    login.reply = lambda r: httpx.Response(503, text="down")
    now[0] = 3400  # due for refresh, not yet expired
    assert await tm.token() == "tok-1-abcdefabcdef"
    now[0] = 3700  # expired: the error reaches the caller
    with pytest.raises(AuthError, match="failed \\(HTTP 503\\)"):
        await tm.token()
    await http.aclose()


@pytest.mark.parametrize("status, body, expect", [
    (401, {"error": "invalid_client", "description": "authentication failed"},
     "the OAuth client id or secret was refused (invalid_client)"),
    (400, {"error": "invalid_client"}, "the OAuth client id or secret was refused (invalid_client)"),
    (400, {"error": "unauthorized_client"}, "not allowed the client-credentials grant"),
    (429, {}, "rate-limiting"),
    (500, None, "failed (HTTP 500)"),
])
async def test_login_errors_are_operator_messages(status: int, body: object, expect: str) -> None:
    login = Login()
    login.reply = lambda r: (httpx.Response(status, json=body) if body is not None
                             else httpx.Response(status, text="<html>oops</html>"))
    tm, http = manager(login)
    with pytest.raises(AuthError) as info:
        await tm.token()
    assert expect in str(info.value)
    assert info.value.status == status
    assert SECRET not in str(info.value)
    await http.aclose()


@pytest.mark.parametrize("body", [
    {"token_type": "bearer", "expires_in": 60},
    {"access_token": "x", "token_type": "bearer", "expires_in": "soon"},
    {"access_token": "x", "token_type": "bearer", "expires_in": -5},
    ["not", "an", "object"],
])
async def test_malformed_token_replies(body: object) -> None:
    login = Login()
    login.reply = lambda r: httpx.Response(200, content=json.dumps(body).encode())
    tm, http = manager(login)
    with pytest.raises(AuthError, match="unusable|without"):
        await tm.token()
    await http.aclose()


async def test_unreachable_login_service() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"connection refused while sending {SECRET}")

    http = httpx.AsyncClient(transport=httpx.MockTransport(boom))
    tm = TokenManager(http, LOGIN, CREDS)
    with pytest.raises(AuthError, match="cannot reach the Genesys login service") as info:
        await tm.token()
    assert SECRET not in str(info.value)
    await http.aclose()


async def test_token_and_secret_never_in_logs_reprs_or_errors() -> None:
    login = Login(expires_in=600)
    now = [0.0]
    tm, http = manager(login, clock=lambda: now[0])
    errors: list[str] = []
    with capture_logs() as logs:
        tokens = [await tm.token()]
        await tm.invalidate(tokens[0])
        tokens.append(await tm.token())
        now[0] = 500
        login.reply = lambda r: httpx.Response(401, json={"error": "invalid_client"})
        tokens.append(await tm.token())  # refresh fails, old token still valid
        now[0] = 700
        try:
            await tm.token()
        except AuthError as exc:
            errors.append(str(exc))
            errors.append(repr(exc))
    text = repr(logs) + repr(tm) + repr(CREDS) + " ".join(errors)
    assert errors, "the expired token should have raised"
    assert logs, "token events should have been logged"
    for secret in [SECRET, *login.issued]:
        assert secret not in text
    await http.aclose()


async def test_basic_auth_form_of_the_secret_is_redacted_too() -> None:
    basic = base64.b64encode(f"client-1:{SECRET}".encode()).decode()

    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError(f"bad header Authorization: Basic {basic}")

    http = httpx.AsyncClient(transport=httpx.MockTransport(boom))
    tm = TokenManager(http, LOGIN, CREDS)
    with pytest.raises(AuthError) as info:
        await tm.token()
    assert basic not in str(info.value) and SECRET not in str(info.value)
    assert "RemoteProtocolError" in str(info.value)
    await http.aclose()
