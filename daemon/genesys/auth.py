"""OAuth client-credentials tokens for the Genesys Cloud API.

Contract (docs/architecture.md):
- `await tokens.token()` returns a bearer token, cached until it is due for refresh.
- Refresh is ahead of expiry: at `expires_at - margin`, where margin is `refresh_margin`
  seconds but never more than half the token's lifetime (a 5-minute token with the default
  300 s margin is refreshed after 150 s, not at once and forever).
- One refresh at a time, however many callers wait: callers queue on one asyncio.Lock and
  the first one through fetches; the rest find the fresh token.
- If a refresh fails while the old token is still valid, the old token is returned (and the
  failure logged); the next refresh is attempted after a short back-off. Only when there is
  no valid token does the error reach the caller.
- `await tokens.invalidate(token)` (a 401 came back): drops the token only if it is still
  the current one, so 50 concurrent 401s for the same token cause exactly one refresh.
- `await tokens.rotate(credentials)` (a reload read new ones): fetch a token with them at once;
  refused ones change nothing. True when the client id changed.
- Errors are `AuthError` with an operator message. The token and the client secret never
  appear in logs, reprs or exception messages.

Wire format: `POST {login_origin}/oauth/token`, HTTP Basic `client_id:client_secret`, form
body `grant_type=client_credentials`; reply `{"access_token", "token_type": "bearer",
"expires_in": <seconds>}`. There is no refresh token for this grant.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import structlog

from daemon.config import Credentials
from daemon.errors import AuthError

log = structlog.get_logger(__name__)

# After a failed refresh while the old token is still valid, wait this long before trying
# again, so a login outage does not turn every API call into a token request.
REFRESH_RETRY_AFTER = 10.0

_OAUTH_ERROR = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class TokenManager:
    """Caches and refreshes one client-credentials token. See the module docstring.

    `clock` gives epoch seconds (injectable for tests). `http` is the shared client; its
    timeouts apply to the token request too.
    """

    def __init__(self, http: httpx.AsyncClient, login_origin: str, credentials: Credentials,
                 *, refresh_margin: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._http = http
        self._origin = login_origin.rstrip("/")
        self._credentials = credentials
        self._refresh_margin = max(0.0, refresh_margin)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._issued_at: float | None = None
        self._expires_at: float | None = None
        self._refresh_at: float | None = None
        self._retry_at = 0.0
        self.requests = 0  # token requests made (tests and metrics)

    def __repr__(self) -> str:
        state = "valid" if self._token else "none"
        return f"TokenManager(login_origin={self._origin!r}, client_id={self._credentials.client_id!r}, token={state})"

    @property
    def client_id(self) -> str:
        """The OAuth client id in use (not a secret)."""
        return self._credentials.client_id

    def uses(self, credentials: Credentials) -> bool:
        """Whether `credentials` are the ones in use (compared in constant time)."""
        return (hmac.compare_digest(credentials.client_id, self._credentials.client_id)
                and hmac.compare_digest(credentials.client_secret, self._credentials.client_secret))

    async def rotate(self, credentials: Credentials) -> bool:
        """Use `credentials` from now on: a token is fetched with them at once, so new
        credentials that are refused are found now and change nothing (AuthError; the old
        client and token stay in use). Returns True when the client id changed (the
        caller moves what belongs to the old client, e.g. notification channels)."""
        async with self._lock:
            old = self._credentials
            self._credentials = credentials
            try:
                await self._fetch()
            except AuthError:
                self._credentials = old
                raise
            return old.client_id != credentials.client_id

    @property
    def age(self) -> float | None:
        """Seconds since the current token was issued; None without a token."""
        if self._issued_at is None or self._token is None:
            return None
        return self._clock() - self._issued_at

    @property
    def expires_at(self) -> float | None:
        """Epoch seconds when the current token expires; None without a token."""
        return self._expires_at if self._token is not None else None

    def _fresh(self, now: float) -> bool:
        return self._token is not None and self._refresh_at is not None and now < self._refresh_at

    def _valid(self, now: float) -> bool:
        return self._token is not None and self._expires_at is not None and now < self._expires_at

    async def token(self) -> str:
        """A bearer token, fetching a new one when none is cached or the cached one is due."""
        if self._fresh(self._clock()) and self._token is not None:
            return self._token
        async with self._lock:
            now = self._clock()
            if self._fresh(now) and self._token is not None:
                return self._token
            if self._valid(now) and now < self._retry_at and self._token is not None:
                return self._token  # a refresh just failed; keep using the old token a while
            try:
                await self._fetch()
            except AuthError as exc:
                now = self._clock()
                if self._valid(now) and self._token is not None:
                    self._retry_at = now + REFRESH_RETRY_AFTER
                    log.warning("token_refresh_failed_using_current", error=str(exc),
                                expires_in=round((self._expires_at or now) - now, 1))
                    return self._token
                raise
            assert self._token is not None
            return self._token

    async def invalidate(self, token: str) -> None:
        """A 401 came back for `token`: forget it if it is still the current one."""
        if self._token is not None and token == self._token:
            self._token = None
            self._refresh_at = None
            self._expires_at = None
            self._issued_at = None
            self._retry_at = 0.0
            log.info("token_invalidated")

    async def _fetch(self) -> None:
        url = f"{self._origin}/oauth/token"
        self.requests += 1
        started = self._clock()
        try:
            resp = await self._http.post(
                url, data={"grant_type": "client_credentials"},
                auth=httpx.BasicAuth(self._credentials.client_id, self._credentials.client_secret),
                headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise AuthError(
                f"cannot reach the Genesys login service at {self._origin} "
                f"({exc.__class__.__name__}{_detail(exc, self._credentials)}); "
                f"check the region/login_base_url and the network") from None
        if resp.status_code != 200:
            raise self._error_for(resp)
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise AuthError(f"the login service at {self._origin} sent an unusable token reply "
                            f"(not a JSON object)", status=resp.status_code)
        token = body.get("access_token")
        expires_in = body.get("expires_in")
        token_type = body.get("token_type", "bearer")
        if not isinstance(token, str) or not token.strip():
            raise AuthError(f"the login service at {self._origin} sent a token reply without "
                            f"access_token", status=resp.status_code)
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or expires_in <= 0:
            raise AuthError(f"the login service at {self._origin} sent a token reply without a "
                            f"usable expires_in", status=resp.status_code)
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise AuthError(f"the login service at {self._origin} issued a token of type "
                            f"{str(token_type)[:20]!r}, expected bearer", status=resp.status_code)
        lifetime = float(expires_in)
        margin = min(self._refresh_margin, lifetime / 2)
        self._token = token
        self._issued_at = started
        self._expires_at = started + lifetime
        self._refresh_at = started + lifetime - margin
        self._retry_at = 0.0
        log.info("token_issued", expires_in=lifetime, refresh_in=round(lifetime - margin, 1))

    def _error_for(self, resp: httpx.Response) -> AuthError:
        status = resp.status_code
        code = ""
        try:
            body: Any = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            raw = body.get("error")
            if isinstance(raw, str) and _OAUTH_ERROR.match(raw):
                code = raw
        tag = f" ({code})" if code else ""
        refused = status == 401 or (status == 400 and code in (
            "", "invalid_client", "unauthorized_client", "invalid_grant", "access_denied"))
        if refused:
            if code == "unauthorized_client":
                msg = (f"the OAuth client is not allowed the client-credentials grant{tag}: in "
                       f"Genesys Cloud Admin > OAuth, set the client's grant type to Client "
                       f"Credentials")
            else:
                msg = (f"the OAuth client id or secret was refused{tag} by {self._origin}: check "
                       f"GENESYSCLOUD_OAUTHCLIENT_ID/GENESYSCLOUD_OAUTHCLIENT_SECRET (or the "
                       f"credential files), that the client is a Client Credentials client and "
                       f"that it belongs to this region")
        elif status == 429:
            msg = f"the login service at {self._origin} is rate-limiting token requests (HTTP 429); retry later"
        elif status >= 500:
            msg = f"the login service at {self._origin} failed (HTTP {status}); retry later"
        else:
            msg = f"the login service at {self._origin} refused the token request (HTTP {status}{', ' + code if code else ''})"
        log.warning("token_request_failed", status=status, error=code or None)
        return AuthError(msg, status=status)


def _detail(exc: Exception, credentials: Credentials) -> str:
    """The exception text without the secret, plain or as the Basic-auth base64 form."""
    text = str(exc).strip()
    if not text:
        return ""
    basic = base64.b64encode(
        f"{credentials.client_id}:{credentials.client_secret}".encode()).decode()
    text = text.replace(basic, "***").replace(credentials.client_secret, "***")
    return f": {text[:200]}"
