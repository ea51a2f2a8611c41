"""The Genesys Cloud REST client: one shared httpx.AsyncClient, one request budget, one token.

Every request:
1. waits for a `RequestLimiter` slot at its priority (enforcement PATCHes go first; see
   `daemon.genesys.ratelimit` for the budget model) and, once answered, hands the answer's
   headers to the limiter (legacy `inin-ratelimit-*` ones refine its books if a server
   still sends them; Genesys stopped in 2021);
2. carries `Authorization: Bearer <token>` from the `TokenManager`;
3. reports `(method, route template, status, seconds)` to `on_response` (status 0 when no
   HTTP answer came), for metrics;
4. is logged at debug level with route and status (never the token or the URL query).
5. has its path built from a route template whose every id passed `core.ids.is_path_id`
   (letters, digits, `_`, `-`: no `.`/`..`, `/` or `%` that httpx would resolve or a server
   decode into another path); any other value raises `InvalidIdError` and nothing is sent.

Failure handling (bounded; `settings.max_retries` retries at most), decided by the one
retry policy of `daemon.genesys.retry` (`process_exception`, `RetryPolicy.backoff()`):
- 401: `tokens.invalidate(token)` and exactly one retry with a fresh token; a second 401
  raises `UnauthorizedError` ("the credentials were refused").
- 429: a body `limit` object for the token budget (`TOKEN_LIMIT_KEYS`, or namespace
  `platform.api`) teaches the limiter the allowance (`limit.value`); then wait `Retry-After` seconds (capped at `retry_after_cap`, default 60 s) by pausing the
  shared limiter for this request's priority and every lower one (a 429 earned by resync
  pauses resync; removals go on as far as the window allows); then retry. Without a
  Retry-After, the wait is the next back-off delay.
- 5xx and transport errors (connect refused, reset, timeout, TLS): `self.retry`'s jittered
  exponential back-off (default 0.5 s doubling, capped at 8 s), then retry.
- 409 is not retried, except by methods that say so (`disconnect_participant` retries a
  conflict `retry_conflict` times with `self.conflict_retry`'s short back-off: 0.2 s
  doubling, capped at 2 s).
- Everything else (400, 403, 404, ...) raises at once.
Errors are `daemon.errors.ApiError` subclasses carrying the ErrorBody `message`, `code`,
`details`/`errors` messages and the correlation id (`inin-correlation-id` header, else
ErrorBody `contextId`). httpx exceptions are translated into `TransportError` here.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import orjson
import structlog

from daemon.genesys.auth import TokenManager
from daemon.config import Credentials, GenesysSettings
from daemon.errors import (ApiError, ConflictError, ForbiddenError, InvalidIdError, NotFoundError,
                           NotSentError,
                           RateLimitedError, TransportError, UnauthorizedError,
                           api_error_for_status)
from daemon.core.ids import is_path_id
from daemon.core.ids import ChannelId, ConversationId, ParticipantId, QueueId, UserId
from daemon.genesys.ratelimit import Priority, RequestLimiter
from daemon.genesys.retry import RetryPolicy, process_exception
from daemon.genesys.transport import default_transport
from daemon.core.logs import debug_enabled
from daemon.core.timefmt import format_time, parse_time

log = structlog.get_logger(__name__)

OnResponse = Callable[[str, str, int, float], None]

ROUTE_CALL = "/api/v2/conversations/calls/{conversationId}"
ROUTE_PARTICIPANT = "/api/v2/conversations/calls/{conversationId}/participants/{participantId}"
ROUTE_ATTRIBUTES = ROUTE_PARTICIPANT + "/attributes"
ROUTE_CHANNELS = "/api/v2/notifications/channels"
ROUTE_CHANNEL = "/api/v2/notifications/channels/{channelId}"
ROUTE_SUBSCRIPTIONS = "/api/v2/notifications/channels/{channelId}/subscriptions"
ROUTE_QUEUES = "/api/v2/routing/queues"
ROUTE_ANALYTICS = "/api/v2/analytics/conversations/details/query"
ROUTE_LIMITS = "/api/v2/organizations/limits/namespaces/{namespaceName}"
LIMITS_NAMESPACE = "platform.api"
TOKEN_LIMIT_KEYS = frozenset({"client.credentials.token.rate.per.minute"})
"""`limit.key`s that name the per-token request budget (the limiter's allowance); other keys
(a service's org-wide limit, e.g. `user.rate.per.minute` in `directory`) are not it."""
ROUTE_TOKEN_ME = "/api/v2/tokens/me"
ROUTE_ROLE = "/api/v2/authorization/roles/{roleId}"

ANALYTICS_PAGE_SIZE = 100
# Ids per analytics query (one segment-filter predicate each); keeps request bodies small.
ANALYTICS_IDS_PER_QUERY = 50
MAX_PAGES = 1000  # a bound on every paging loop, far beyond any real listing

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # httpx sends `Content-Length: 0` without one

CONFLICT_RETRY = RetryPolicy(initial=0.2, factor=2.0, cap=2.0, jitter=0.5)
"""The 409 back-off: a conflicting operation (a transfer, another removal) is usually over
within a second. `max_attempts` is set per call from `retry_conflict`."""


@dataclass(frozen=True)
class Channel:
    """A notification channel. `expires` is epoch seconds."""

    id: ChannelId
    connect_uri: str
    expires: float


@dataclass(frozen=True)
class TopicState:
    """One subscription as the API reports it (SDK `ChannelTopic`)."""

    id: str
    state: str  # "Permitted" | "Rejected"
    rejection_reason: str | None
    missing_permissions: tuple[str, ...]


class GenesysClient:
    """Async Genesys Cloud REST client. Use as `async with GenesysClient(settings, creds) as c:`.

    `transport` replaces the network (httpx.MockTransport in tests); by default requests go
    out through confguard's HTTP/1.1 transport (`daemon.genesys.transport`) under the same
    httpx API. `limiter` may be shared
    with other clients of the same OAuth client; by default one is made from
    `settings.requests_per_minute`. `retry_base_delay`/`retry_max_delay` shape the
    jittered exponential back-off (seconds) of `self.retry` (a `RetryPolicy` with
    `settings.max_retries + 1` attempts); `retry`, when given, replaces it whole.
    `conflict_retry` is the 409 back-off (its attempts are set per call from
    `retry_conflict`). `retry_after_cap` bounds a server's Retry-After. `rng` draws the
    jitter (tests pass a seeded `random.Random`).
    """

    def __init__(self, settings: GenesysSettings, credentials: Credentials, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 limiter: RequestLimiter | None = None,
                 on_response: OnResponse | None = None,
                 retry_base_delay: float = 0.5,
                 retry_max_delay: float = 8.0,
                 retry_after_cap: float = 60.0,
                 retry: RetryPolicy | None = None,
                 conflict_retry: RetryPolicy | None = None,
                 rng: random.Random | None = None,
                 token_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                                write=settings.read_timeout, pool=settings.connect_timeout)
        self._transport = transport if transport is not None else default_transport()
        self._http = httpx.AsyncClient(
            transport=self._transport, timeout=timeout, follow_redirects=False,
            headers={"User-Agent": "confguard/0.1", "Accept": "application/json"})
        self.api_origin = settings.api_origin.rstrip("/")
        # What `AsyncClient.build_request` would add to each API request, worked out once
        # (see `_build`): Host, the client's default headers as bytes, the timeouts.
        self._raw_headers = [(b"Host", httpx.URL(self.api_origin).netloc),
                             *self._http.headers.raw]
        self._extensions = {"timeout": timeout.as_dict()}
        self.tokens = TokenManager(self._http, settings.login_origin, credentials,
                                   refresh_margin=settings.token_refresh_margin,
                                   clock=token_clock)
        self.limiter = limiter or RequestLimiter(settings.requests_per_minute,
                                                 enforce_reserve=settings.enforce_reserve)
        self.on_response = on_response
        self.retry = retry or RetryPolicy(initial=retry_base_delay, factor=2.0,
                                          cap=retry_max_delay, jitter=0.5,
                                          max_attempts=settings.max_retries + 1)
        self.conflict_retry = conflict_retry or CONFLICT_RETRY
        self.retry_after_cap = retry_after_cap
        self._rng = rng

    def __repr__(self) -> str:
        return f"GenesysClient(api_origin={self.api_origin!r})"

    async def __aenter__(self) -> GenesysClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ conversations

    async def get_call(self, conversation_id: ConversationId | str, *,
                       priority: Priority = Priority.RESYNC) -> dict[str, Any]:
        """GET /api/v2/conversations/calls/{id} -> the CallConversation as a dict."""
        resp = await self._request("GET", ROUTE_CALL, {"conversationId": conversation_id},
                                   priority=priority)
        return self._json_object(resp, "GET", ROUTE_CALL)

    async def disconnect_participant(self, conversation_id: ConversationId | str,
                                     participant_id: ParticipantId | str, *,
                                     retry_conflict: int = 3,
                                     priority: Priority = Priority.ENFORCE,
                                     on_send: Callable[[], None] | None = None,
                                     send_budget: Callable[[], float | None] | None = None) -> int:
        """PATCH .../calls/{cid}/participants/{pid} {"state": "disconnected"}: remove one
        party, leaving the rest of the call up. Success is a 2xx with an empty body; returns
        that status. A 409 is retried `retry_conflict` times with a short back-off.
        `on_send` is called just before each attempt is written (after the limiter slot and
        the token), so callers can measure event-to-request including any limiter wait.

        `send_budget` (HA: the lease's remaining validity, margin taken off): seconds within
        which each attempt's body must be fully written, asked at the start of the attempt
        and again right before the body goes out (None: no limit). An attempt whose body is
        not written in time (pool wait, connect, TLS, headers, a slow write) is cut and
        raises `NotSentError`: with a Content-Length body that never arrived whole, Genesys
        cannot act on it. This holds for any httpx transport, since the body is handed over
        as a stream whose end the transport reaches only after writing it."""
        resp = await self._request("PATCH", ROUTE_PARTICIPANT,
                                   {"conversationId": conversation_id, "participantId": participant_id},
                                   priority=priority, json={"state": "disconnected"},
                                   retry_conflict=retry_conflict, on_send=on_send,
                                   send_budget=send_budget)
        return resp.status_code

    async def set_participant_attributes(self, conversation_id: ConversationId | str,
                                         participant_id: ParticipantId | str,
                                         attributes: Mapping[str, str], *,
                                         priority: Priority = Priority.NORMAL) -> None:
        """PATCH .../participants/{pid}/attributes {"attributes": {...}} (string to string)."""
        await self._request("PATCH", ROUTE_ATTRIBUTES,
                            {"conversationId": conversation_id, "participantId": participant_id},
                            priority=priority, json={"attributes": dict(attributes)})

    # ------------------------------------------------------------------ notifications

    async def create_channel(self) -> Channel:
        """POST /api/v2/notifications/channels -> Channel (expires as epoch seconds)."""
        resp = await self._request("POST", ROUTE_CHANNELS, {}, priority=Priority.NORMAL)
        body = self._json_object(resp, "POST", ROUTE_CHANNELS)
        cid, uri = body.get("id"), body.get("connectUri")
        if not isinstance(cid, str) or not cid or not isinstance(uri, str) or not uri:
            raise ApiError("channel reply lacks id or connectUri", status=resp.status_code,
                           method="POST", path=ROUTE_CHANNELS,
                           correlation_id=resp.headers.get("inin-correlation-id"))
        expires = parse_time(body.get("expires"))
        if expires is None:
            # The service documents a 24-hour channel lifetime.
            expires = time.time() + 86400.0
        return Channel(id=ChannelId(cid), connect_uri=uri, expires=expires)

    async def channel_exists(self, channel_id: ChannelId | str) -> bool:
        """HEAD /api/v2/notifications/channels/{id}: True on 2xx, False on 404."""
        try:
            await self._request("HEAD", ROUTE_CHANNEL, {"channelId": channel_id},
                                priority=Priority.NORMAL)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list_channels(self) -> list[dict[str, Any]]:
        """GET /api/v2/notifications/channels -> the `entities` list."""
        resp = await self._request("GET", ROUTE_CHANNELS, {}, priority=Priority.NORMAL)
        return _entities(self._json_object(resp, "GET", ROUTE_CHANNELS))

    async def put_subscriptions(self, channel_id: ChannelId | str, topics: Iterable[str], *,
                                ignore_errors: bool = False) -> list[TopicState]:
        """PUT .../subscriptions [{"id": topic}, ...]: replace the channel's topic set."""
        return await self._subscribe("PUT", channel_id, topics, ignore_errors)

    async def add_subscriptions(self, channel_id: ChannelId | str, topics: Iterable[str], *,
                                ignore_errors: bool = False) -> list[TopicState]:
        """POST .../subscriptions [{"id": topic}, ...]: add topics to the channel."""
        return await self._subscribe("POST", channel_id, topics, ignore_errors)

    async def get_subscriptions(self, channel_id: ChannelId | str) -> list[TopicState]:
        """GET .../subscriptions -> the topics and their states."""
        resp = await self._request("GET", ROUTE_SUBSCRIPTIONS, {"channelId": channel_id},
                                   priority=Priority.NORMAL)
        return _topic_states(self._json_object(resp, "GET", ROUTE_SUBSCRIPTIONS))

    async def delete_subscriptions(self, channel_id: ChannelId | str) -> None:
        """DELETE .../subscriptions: remove every topic from the channel."""
        await self._request("DELETE", ROUTE_SUBSCRIPTIONS, {"channelId": channel_id},
                            priority=Priority.NORMAL)

    async def _subscribe(self, method: str, channel_id: ChannelId | str, topics: Iterable[str],
                         ignore_errors: bool) -> list[TopicState]:
        body = [{"id": t} for t in topics]
        query = {"ignoreErrors": "true"} if ignore_errors else None
        resp = await self._request(method, ROUTE_SUBSCRIPTIONS, {"channelId": channel_id},
                                   priority=Priority.NORMAL, json=body, query=query)
        return _topic_states(self._json_object(resp, method, ROUTE_SUBSCRIPTIONS))

    # ------------------------------------------------------------------ token, roles

    async def token_info(self) -> dict[str, Any]:
        """GET /api/v2/tokens/me -> TokenInfo (`OAuthClient.roleDivisions` lists the client's
        roles); needs no permission."""
        resp = await self._request("GET", ROUTE_TOKEN_ME, {}, priority=Priority.NORMAL)
        return self._json_object(resp, "GET", ROUTE_TOKEN_ME)

    async def get_role(self, role_id: str) -> dict[str, Any]:
        """GET /api/v2/authorization/roles/{roleId} -> DomainOrganizationRole (`permissions`,
        `permissionPolicies`); needs authorization:role:view."""
        resp = await self._request("GET", ROUTE_ROLE, {"roleId": role_id}, priority=Priority.NORMAL)
        return self._json_object(resp, "GET", ROUTE_ROLE)

    # ------------------------------------------------------------------ routing, analytics

    async def find_queues_by_name(self, name: str) -> list[dict[str, Any]]:
        """GET /api/v2/routing/queues?name=... following pageNumber/pageCount.

        Genesys matches `name` loosely (leading/trailing `*` are wildcards); without a `*`,
        only queues whose name equals `name` case-insensitively are returned."""
        out: list[dict[str, Any]] = []
        page = 1
        while page <= MAX_PAGES:
            resp = await self._request("GET", ROUTE_QUEUES, {}, priority=Priority.NORMAL,
                                       query={"name": name, "pageSize": "100",
                                              "pageNumber": str(page)})
            body = self._json_object(resp, "GET", ROUTE_QUEUES)
            out.extend(_entities(body))
            count = body.get("pageCount")
            if not isinstance(count, int) or isinstance(count, bool) or page >= count:
                break
            page += 1
        if "*" not in name:
            wanted = name.strip().casefold()
            out = [q for q in out if isinstance(q.get("name"), str)
                   and q["name"].strip().casefold() == wanted]
        return out

    async def active_conversations(self, *, queue_ids: Sequence[QueueId | str] = (),
                                   user_ids: Sequence[UserId | str] = (),
                                   since: float, until: float) -> list[dict[str, Any]]:
        """Conversations not yet ended that touched any of the queues or users in
        [since, until] (epoch seconds), from POST /api/v2/analytics/conversations/details/query.

        Ids are batched (ANALYTICS_IDS_PER_QUERY per query), each batch paged with pageSize
        100 until all pages are read. Returns the `conversations` list, de-duplicated by
        `conversationId` (first seen kept). Analytics lags real time by seconds."""
        ids = [("queueId", str(q)) for q in queue_ids] + [("userId", str(u)) for u in user_ids]
        if not ids:
            return []
        interval = f"{format_time(since)}/{format_time(max(until, since + 1.0))}"
        seen: set[str] = set()
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), ANALYTICS_IDS_PER_QUERY):
            batch = ids[start:start + ANALYTICS_IDS_PER_QUERY]
            for conv in await self._analytics_pages(interval, batch):
                cid = conv.get("conversationId")
                key = cid if isinstance(cid, str) else None
                if key is not None and key in seen:
                    continue
                if key is not None:
                    seen.add(key)
                out.append(conv)
        return out

    async def _analytics_pages(self, interval: str,
                               batch: list[tuple[str, str]]) -> list[dict[str, Any]]:
        query: dict[str, Any] = {
            "interval": interval,
            "order": "asc",
            "orderBy": "conversationStart",
            "conversationFilters": [{"type": "and", "predicates": [
                {"type": "dimension", "dimension": "conversationEnd", "operator": "notExists"}]}],
            "segmentFilters": [{"type": "or", "predicates": [
                {"type": "dimension", "dimension": dim, "operator": "matches", "value": value}
                for dim, value in batch]}],
        }
        out: list[dict[str, Any]] = []
        page = 1
        while page <= MAX_PAGES:
            query["paging"] = {"pageSize": ANALYTICS_PAGE_SIZE, "pageNumber": page}
            resp = await self._request("POST", ROUTE_ANALYTICS, {}, priority=Priority.RESYNC,
                                       json=query)
            body = self._json_object(resp, "POST", ROUTE_ANALYTICS)
            convs = body.get("conversations") or []
            if not isinstance(convs, list):
                raise ApiError("analytics reply has a non-list 'conversations'",
                               status=resp.status_code, method="POST", path=ROUTE_ANALYTICS)
            out.extend(c for c in convs if isinstance(c, dict))
            total = body.get("totalHits")
            if len(convs) < ANALYTICS_PAGE_SIZE:
                break
            if isinstance(total, int) and not isinstance(total, bool) and page * ANALYTICS_PAGE_SIZE >= total:
                break
            page += 1
        return out

    # ------------------------------------------------------------------ the request loop

    async def _request(self, method: str, route: str, path_args: Mapping[str, str], *,
                       priority: Priority, json: Any = None,
                       query: Mapping[str, str] | None = None,
                       retry_conflict: int = 0,
                       on_send: Callable[[], None] | None = None,
                       send_budget: Callable[[], float | None] | None = None) -> httpx.Response:
        """Send one logical request with the retry policy of the module docstring."""
        path = build_path(method, route, path_args)
        body = None if json is None else orjson.dumps(json)  # once for every attempt
        # One budget of retries for 5xx, transport errors and 429s together; its own for 409.
        delays = self.retry.backoff(self._rng)
        conflict_delays: Iterator[float] | None = None  # made at the first 409 (rare)
        reauthed = False
        while True:
            token = await self.tokens.token()
            self.limiter.note_token(hash(token))  # a new token has a new budget window
            err: ApiError
            async with self.limiter.slot(priority):
                if on_send is not None:
                    on_send()
                resp, seconds = await self._send(method, route, path, token, body=body,
                                                 query=query, send_budget=send_budget)
            if isinstance(resp, TransportError):
                err = resp
            else:
                status = resp.status_code
                self._report(method, route, status, seconds)
                _debug_line(method, route, status, seconds)
                if status < 400:
                    return resp
                err = self._error(resp, method, path)
                if status == 401:
                    await self.tokens.invalidate(token)
                    if reauthed:
                        raise UnauthorizedError(
                            f"the credentials were refused: a freshly issued token was rejected "
                            f"({err.message}); check that the OAuth client still exists and has a role",
                            code=err.code, correlation_id=err.correlation_id, method=method,
                            path=path, details=err.details) from None
                    reauthed = True
                    continue
            if process_exception(err, conflicts=True) is not None:
                raise err from None
            if isinstance(err, ConflictError):
                if conflict_delays is None:
                    conflict_delays = self.conflict_retry.replace(
                        max_attempts=retry_conflict + 1).backoff(self._rng)
                wait = next(conflict_delays, None)
                if wait is None:
                    raise err
                await asyncio.sleep(wait)
                continue
            wait = next(delays, None)
            if wait is None:
                if isinstance(err, RateLimitedError):  # counted even when not retried
                    self._learn_from_429(err)
                    self.limiter.rate_limited(priority, err.retry_after or 0.0)
                raise err from None
            if isinstance(err, RateLimitedError):
                self._learn_from_429(err)
                if err.retry_after is not None:
                    wait = err.retry_after
                log.warning("api_rate_limited", route=route, retry_after=round(wait, 2),
                            limit=err.limit)
                self.limiter.rate_limited(priority, wait)
                continue
            await asyncio.sleep(wait)

    async def _send(self, method: str, route: str, path: str, token: str, *,
                    body: bytes | None, query: Mapping[str, str] | None,
                    send_budget: Callable[[], float | None] | None = None,
                    ) -> tuple[httpx.Response | TransportError, float]:
        """One HTTP exchange (the caller holds the limiter slot): the answer (its headers
        handed to the limiter) or, when none came, a reported and logged TransportError;
        and the seconds it took. With `send_budget`: `_send_within`."""
        if send_budget is not None:
            return await self._send_within(method, route, path, token, body, send_budget)
        started = time.monotonic()
        try:
            resp = await self._exchange(self._build(method, path, token, body, query))
        except httpx.HTTPError as exc:
            return self._no_answer(exc, method, route, path, token, started)
        self.limiter.observe(resp.headers)
        return resp, time.monotonic() - started

    def _build(self, method: str, path: str, token: str, body: bytes | None,
               query: Mapping[str, str] | None = None,
               stream: httpx.AsyncByteStream | None = None) -> httpx.Request:
        """The request `AsyncClient.build_request` would make (the same headers, in the
        same order: Host, the client's defaults, Authorization, Content-Length and
        Content-Type), from parts worked out once (`__init__`) or once per logical
        request (the JSON body): per attempt only the URL is parsed. `stream` (default:
        `body` whole) is what the transport writes after the head."""
        headers = [*self._raw_headers, (b"Authorization", b"Bearer " + token.encode())]
        if body is not None:
            headers += ((b"Content-Length", b"%d" % len(body)),
                        (b"Content-Type", b"application/json"))
        elif method in _BODY_METHODS:
            headers.append((b"Content-Length", b"0"))
        url = (httpx.URL(self.api_origin + path) if not query
               else httpx.URL(self.api_origin + path, params=query))
        return httpx.Request(method, url, headers=headers,
                             stream=stream if stream is not None else httpx.ByteStream(body or b""),
                             extensions=self._extensions)

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        """One HTTP exchange, the request handed straight to the transport and the answer
        read whole: what `AsyncClient.send` does for this client, without the machinery
        it does not use (no auth flow, redirects, cookies or event hooks) and without
        merging URL and headers per request (`__init__` did that once). Same transport
        seam (`MockTransport` in tests), same `httpx` request, response and exceptions;
        a PATCH round trip p50 0.43-0.62 -> 0.35-0.48 ms (bench/RESULTS.md, issue 22)."""
        resp = await self._transport.handle_async_request(request)
        resp.request = request
        try:
            await resp.aread()
        except BaseException:
            await resp.aclose()
            raise
        return resp

    def _no_answer(self, exc: httpx.HTTPError, method: str, route: str, path: str, token: str,
                   started: float) -> tuple[TransportError, float]:
        """Count and describe a request that got no HTTP answer (the token never quoted);
        with the seconds it took."""
        seconds = time.monotonic() - started
        self._report(method, route, 0, seconds)
        _debug_line(method, route, 0, seconds, exc.__class__.__name__)
        return TransportError(
            f"no answer from the Genesys API at {self.api_origin} "
            f"({exc.__class__.__name__}{_safe_detail(exc, token)})",
            method=method, path=path), seconds

    async def _send_within(self, method: str, route: str, path: str, token: str,
                           body: bytes | None, budget: Callable[[], float | None],
                           ) -> tuple[httpx.Response | TransportError, float]:
        """`_send` with a deadline on the write (see `disconnect_participant`)."""
        left = budget()
        if left is not None and left <= 0:
            raise NotSentError("the lease deadline had passed before the PATCH could be "
                               "written; nothing sent", method=method, path=path)
        guard = _WriteGuard(body or b"", budget)
        started = time.monotonic()
        # The exchange runs in the caller's own task (no task of its own: the PATCH is
        # written in this step); at the deadline `guard.expire` cancels this task if the
        # body is not written yet, and that cancellation is taken back below, as
        # `asyncio.timeout` does (a cancellation from our own caller is not).
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        timer = (asyncio.get_running_loop().call_later(left, guard.expire, task)
                 if left is not None else None)
        try:
            resp = await self._exchange(self._build(method, path, token, body, stream=guard))
        except (asyncio.CancelledError, _Abandoned) as exc:
            if guard.state != "abandoned":
                raise  # our own caller was cancelled
            if isinstance(exc, asyncio.CancelledError) and task.uncancel() > cancelling:
                raise  # cancelled by the deadline and by our caller: the caller's wins
            seconds = time.monotonic() - started
            self._report(method, route, 0, seconds)
            log.warning("api_request_abandoned", method=method, route=route,
                        seconds=round(seconds, 3), stage=guard.stage,
                        detail="not written before the lease deadline; nothing sent")
            raise NotSentError(f"not written before the lease deadline ({guard.stage}); "
                               f"abandoned, nothing sent", method=method, path=path) from None
        except httpx.HTTPError as exc:
            return self._no_answer(exc, method, route, path, token, started)
        finally:
            if timer is not None:
                timer.cancel()
        self.limiter.observe(resp.headers)
        return resp, time.monotonic() - started

    def _learn_from_429(self, err: RateLimitedError) -> None:
        """A 429 body's `limit` for the token budget sets the limiter's allowance."""
        limit = err.limit
        if limit is None:
            return
        if limit.get("key") in TOKEN_LIMIT_KEYS or limit.get("namespace") == LIMITS_NAMESPACE:
            self.limiter.learn_allowance(limit.get("value"), "429")

    async def read_budget_limit(self) -> int | None:
        """The org's per-token request budget from the limits API
        (`GET /api/v2/organizations/limits/namespaces/platform.api`, `LimitsEntityListing`:
        `{"entities": [{"key", "namespace", "value"}]}`), handed to the limiter. None when
        unknown: the OAuth client may lack the permission (403), or the entry is missing.
        Raises ApiError other than 403/404 (the caller logs it; never fatal)."""
        try:
            resp = await self._request("GET", ROUTE_LIMITS, {"namespaceName": LIMITS_NAMESPACE},
                                       priority=Priority.NORMAL)
        except (ForbiddenError, NotFoundError) as exc:
            log.info("budget_limits_unknown", status=exc.status, error=str(exc)[:200])
            return None
        body = self._json_object(resp, "GET", ROUTE_LIMITS)
        for item in _entities(body):
            if item.get("key") in TOKEN_LIMIT_KEYS:
                value = item.get("value")
                return value if self.limiter.learn_allowance(value, "limits_api") else None
        log.info("budget_limits_unknown", status=resp.status_code,
                 error="no client.credentials.token.rate.per.minute entry")
        return None

    def _report(self, method: str, route: str, status: int, seconds: float) -> None:
        if self.on_response is None:
            return
        try:
            self.on_response(method, route, status, seconds)
        except Exception as exc:  # a metrics hook must never break a request
            log.warning("on_response_hook_failed", error=f"{exc.__class__.__name__}: {exc}")

    def _error(self, resp: httpx.Response, method: str, path: str) -> ApiError:
        """The ApiError for an HTTP error reply, with ErrorBody fields and correlation id."""
        status = resp.status_code
        try:
            body: Any = resp.json() if resp.content else None
        except ValueError:
            body = None
        message = ""
        code: str | None = None
        details: list[str] = []
        correlation = resp.headers.get("inin-correlation-id")
        if isinstance(body, dict):
            if isinstance(body.get("message"), str):
                message = body["message"].strip()
            if isinstance(body.get("code"), str):
                code = body["code"]
            if not correlation and isinstance(body.get("contextId"), str):
                correlation = body["contextId"]
            for d in body.get("details") or []:
                if isinstance(d, dict):
                    parts = [str(d[k]) for k in ("errorCode", "fieldName", "entityName")
                             if isinstance(d.get(k), str) and d.get(k)]
                    if parts:
                        details.append(" ".join(parts))
            for e in body.get("errors") or []:
                if isinstance(e, dict) and isinstance(e.get("message"), str) and e["message"]:
                    details.append(e["message"].strip())
        if not message:
            message = f"{resp.reason_phrase or 'error'}"
        extra = [d for d in details if d and d not in message]
        if extra:
            message = f"{message} [{'; '.join(extra)[:500]}]"
        cls = api_error_for_status(status)
        kw: dict[str, Any] = dict(status=status, code=code, correlation_id=correlation,
                                  method=method, path=path, details=details)
        if cls is RateLimitedError:
            limit = body.get("limit") if isinstance(body, dict) else None
            return RateLimitedError(message, retry_after=self._retry_after(resp),
                                    limit=limit if isinstance(limit, dict) else None, **kw)
        return cls(message, **kw)

    def _retry_after(self, resp: httpx.Response) -> float | None:
        raw = resp.headers.get("retry-after")
        if raw is None:
            return None
        seconds: float | None
        try:
            seconds = float(raw.strip())
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
                seconds = when.timestamp() - time.time()
            except (TypeError, ValueError, IndexError):
                seconds = None
        if seconds is None or seconds != seconds:  # unparseable or NaN
            return None
        return min(self.retry_after_cap, max(0.0, seconds))

    @staticmethod
    def _json_object(resp: httpx.Response, method: str, route: str) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiError("the API sent a reply that is not a JSON object",
                           status=resp.status_code, method=method, path=route,
                           correlation_id=resp.headers.get("inin-correlation-id"))
        return body


# ---------------------------------------------------------------- helpers


class _Abandoned(Exception):
    """Raised from inside the body stream: the deadline passed before the body went out."""


class _WriteGuard(httpx.AsyncByteStream):
    """A one-chunk request body that knows whether it has been written.

    The transport iterates it: the first step hands over the bytes (after checking the
    budget once more: past it, `_Abandoned` and nothing of the body is written); the
    transport asks for the next chunk only once it has written that one, so the step after
    it marks the body `written`. `expire(task)`, at the deadline, cancels the request if
    the body is not written by then (`stage` says how far it got)."""

    def __init__(self, data: bytes, budget: Callable[[], float | None]) -> None:
        self.data = data
        self.budget = budget
        self.state = "waiting"  # waiting | handed_over | written | abandoned
        self.stage = "before the body"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.state != "waiting":
            return
        left = self.budget()
        if left is not None and left <= 0:
            self.state = "abandoned"
            self.stage = "the deadline passed before the body was written"
            raise _Abandoned()
        self.state = "handed_over"
        yield self.data
        self.state = "written"

    def expire(self, task: asyncio.Task[Any]) -> None:
        if self.state in ("waiting", "handed_over"):
            self.stage = ("pool wait, connect or headers" if self.state == "waiting"
                          else "the body was being written (incomplete: cannot be acted on)")
            self.state = "abandoned"
            task.cancel()


def _debug_line(method: str, route: str, status: int, seconds: float,
                error: str | None = None) -> None:
    """The `api_request` line (debug): built only when debug lines are emitted."""
    if not debug_enabled():
        return
    if error is None:
        log.debug("api_request", method=method, route=route, status=status,
                  seconds=round(seconds, 3))
    else:
        log.debug("api_request", method=method, route=route, status=status,
                  seconds=round(seconds, 3), error=error)


def build_path(method: str, route: str, path_args: Mapping[str, str]) -> str:
    """`route` with its `{name}` placeholders filled. Every value must pass
    `core.ids.is_path_id`, so none can change the path (`..`, `.`, `/`, `%2e`); else
    `InvalidIdError` (nothing is sent)."""
    for name, value in path_args.items():
        if not is_path_id(value):
            raise InvalidIdError(f"{name} {str(value)[:60]!r} is not a valid id; nothing was sent",
                                 code="invalid_id", method=method, path=route)
    # No quoting: a path id's characters ([A-Za-z0-9_.-]) are all unreserved (RFC 3986
    # 2.3), which `quote` leaves as they are.
    return route.format_map(path_args)


def _entities(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    ents = body.get("entities") or []
    if not isinstance(ents, list):
        return []
    return [e for e in ents if isinstance(e, dict)]


def _topic_states(body: Mapping[str, Any]) -> list[TopicState]:
    out = []
    for e in _entities(body):
        tid = e.get("id")
        if not isinstance(tid, str):
            continue
        missing = e.get("missingPermissions") or []
        out.append(TopicState(
            id=tid,
            state=str(e.get("state") or "Permitted"),
            rejection_reason=e["rejectionReason"] if isinstance(e.get("rejectionReason"), str) else None,
            missing_permissions=tuple(str(m) for m in missing) if isinstance(missing, list) else ()))
    return out


def _safe_detail(exc: Exception, token: str) -> str:
    text = str(exc).strip()
    if not text:
        return ""
    if token:
        text = text.replace(token, "***")
    return f": {text[:200]}"
