"""One request budget per process, counted the conservative way.

Genesys allows about 300 requests a minute per OAuth token and does not document how the
minute is counted; it no longer says where a client stands (the `inin-ratelimit-*` headers
were removed in June 2021). Only a 429 tells: `Retry-After` seconds, the code
`too.many.requests.retry.after` and, not guaranteed, a `limit` object with the allowance
(`{"key", "namespace", "value"}`). `RequestLimiter` therefore keeps its own books:

- It counts the requests it granted for the current token in a SLIDING window: a grant
  counts for `window` x (1 + `ASSUMED_WINDOW_MARGIN`) seconds (61 s) from the moment it was
  granted, the conservative reading of an undocumented window (any fixed window Genesys
  could use never holds more than a sliding one). `note_token(key)` with a key that differs
  from the last one forgets the grants (a new token has its own budget).
- The allowance is `per_minute` (`genesys.requests_per_minute`) until something better is
  known: `learn_allowance(value, source)` takes a 429 body's `limit.value` or the limits
  API's (`GET /api/v2/organizations/limits/namespaces/platform.api`), lower or higher.
- If a server still sends `inin-ratelimit-*` headers, `observe(headers)` lets them refine
  the books (allowance as said; a count above ours is taken as other users of the token
  until the advertised reset), but nothing depends on them.
- No pacing of its own: while the window has room a request goes at once, so a burst of
  removals goes out as fast as the window allows.
- Reserve: the last `reserve` = floor(`enforce_reserve` x allowed) requests of every window
  are for `Priority.ENFORCE` only; NORMAL and RESYNC together may spend the rest.
- Shares: `slot(priority, tag=..., share=f)` also caps the requests of that tag at
  max(1, floor(f x allowed)) a window (reconciliation uses it for `reconcile_share`).
- Waiters are served by `Priority` (ENFORCE before NORMAL before RESYNC), FIFO within one
  priority. A waiter held back only by its own tag's share does not hold back the others.
- `pause(seconds, priority)` (after a 429): that priority and every lower one get no slot
  until then; a 429 earned by resync traffic therefore pauses resync, and removals go on as
  far as the window allows. Pauses only extend.

A slot is taken when granted and counted as in flight until its `async with` block ends.
A waiter cancelled before it is granted leaves the queue; one cancelled in the instant after
being granted gives its slot back. Must be used from a single event loop. Times are seconds;
`clock` is monotonic (injectable for tests).
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import structlog

log = structlog.get_logger(__name__)

WINDOW_SECONDS = 60.0
"""Genesys' budget window (per minute per token)."""
ASSUMED_WINDOW_MARGIN = 1.0 / 60.0
"""Fraction of `window` added to how long a grant counts (1 s a minute): Genesys counts a
request when it arrives, a little after we granted it, so it leaves Genesys' window a
little after it would leave ours."""

budget_share: contextvars.ContextVar[tuple[str, float] | None] = contextvars.ContextVar(
    "budget_share", default=None)
"""(tag, share) applied to every `slot()` taken in this context without an explicit tag:
the reconciliation task sets it once, so every request it makes, through any client
method, counts against its share."""

HEADER_COUNT = "inin-ratelimit-count"
HEADER_ALLOWED = "inin-ratelimit-allowed"
HEADER_RESET = "inin-ratelimit-reset"
"""Legacy headers (removed by Genesys in June 2021); used only if a server still sends them."""


class Priority(IntEnum):
    """Lower value is served first. `label` is the metric label."""

    ENFORCE = 0
    NORMAL = 1
    RESYNC = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """Where the budget stands now (what metrics and `/healthz` show).

    `allowed`: requests allowed per window; `used`: counted in the sliding window now (ours,
    plus other users of the token when legacy headers said so); `remaining`: allowed - used
    (>= 0); `reset_seconds`: until the oldest counted request leaves the window, i.e. until
    one more request frees up (0 when nothing is counted); `learnt`: whether `allowed` came
    from Genesys (a 429's `limit.value`, the limits API, legacy headers) rather than
    `per_minute`; `reserve`: the part of every window kept for removals; `in_flight`: granted,
    not yet answered; `paused_seconds`: pause left per priority label; `rate_limited`: 429s
    seen per priority label; `headers_rejected`: unusable budget values (legacy headers, a
    429's `limit.value`) that were ignored.
    """
    allowed: int
    used: int
    remaining: int
    reset_seconds: float
    learnt: bool
    reserve: int
    in_flight: int
    paused_seconds: dict[str, float] = field(default_factory=dict)
    rate_limited: dict[str, int] = field(default_factory=dict)
    headers_rejected: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "used": self.used, "remaining": self.remaining,
                "reset_seconds": round(self.reset_seconds, 1), "learnt": self.learnt,
                "reserve": self.reserve, "in_flight": self.in_flight,
                "paused_seconds": {k: round(v, 1) for k, v in self.paused_seconds.items()},
                "rate_limited": dict(self.rate_limited),
                "headers_rejected": self.headers_rejected}


@dataclass(slots=True)
class _Waiter:
    priority: Priority
    seq: int
    fut: asyncio.Future[None]
    tag: str | None
    share: float | None

    def key(self) -> tuple[int, int]:
        return (int(self.priority), self.seq)


class RequestLimiter:
    """The request budget. See the module docstring for the contract.

    `per_minute`: the allowance assumed per window until Genesys says otherwise.
    `enforce_reserve`: fraction (0..1) of every window only ENFORCE may spend.
    `window`: seconds of the sliding window (60; tests shorten it).
    `on_rate_limited(priority)`: called for each 429 reported with `rate_limited`.
    """

    def __init__(self, per_minute: int, *, enforce_reserve: float = 0.2,
                 window: float = WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 on_rate_limited: Callable[[Priority], None] | None = None) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        if not 0.0 <= enforce_reserve < 1.0:
            raise ValueError("enforce_reserve must be at least 0 and below 1")
        if window <= 0:
            raise ValueError("window must be positive")
        self.per_minute = per_minute
        self.enforce_reserve = enforce_reserve
        self.window = window
        self.on_rate_limited = on_rate_limited
        self._clock = clock
        self._allowed = per_minute
        self._learnt = False
        # Our grants in the sliding window: (when it stops counting, tag), oldest first.
        self._grants: deque[tuple[float, str | None]] = deque()
        self._tag_used: Counter[str] = Counter()  # grants in the window, by tag
        self._extra = 0  # other users of the token, as legacy headers said ...
        self._extra_until = 0.0  # ... until this (monotonic)
        self._in_flight = 0
        self._token_key: object = None
        self._paused_until = {p: 0.0 for p in Priority}
        self._queue: list[_Waiter] = []  # sorted by (priority, seq)
        self._seq = itertools.count()
        self._waiting = {p: 0 for p in Priority}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.granted: Counter[str] = Counter()  # slots granted since start, by priority label and tag
        self.rate_limited_count: Counter[str] = Counter()  # 429s by priority label
        self.headers_rejected = 0

    @property
    def _span(self) -> float:
        """Seconds one grant counts."""
        return self.window * (1.0 + ASSUMED_WINDOW_MARGIN)

    @property
    def _used(self) -> int:
        return len(self._grants) + self._extra

    # ------------------------------------------------------------------ public

    def slot(self, priority: Priority, *, tag: str | None = None,
             share: float | None = None) -> AbstractAsyncContextManager[None]:
        """`async with limiter.slot(Priority.ENFORCE): ...` waits until one request may go.

        With `tag` and `share` (or, when `tag` is None, the context's `budget_share`),
        requests of that tag are also capped at max(1, floor(share x allowed)) per window."""
        if tag is None:
            ctx = budget_share.get()
            if ctx is not None:
                tag, share = ctx
        if share is not None and not 0.0 < share <= 1.0:
            raise ValueError("share must be within (0, 1]")
        return self._slot(Priority(priority), tag, share)

    def learn_allowance(self, value: object, source: str) -> bool:
        """Take `value` as the allowance per window (lower or higher than the current one):
        a 429 body's `limit.value` (`source` "429") or the limits API's ("limits_api").
        An unusable value (not a positive integer) is logged, counted in
        `headers_rejected` and ignored. Returns whether it was taken."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.headers_rejected += 1
            log.warning("budget_limit_rejected", source=source, value=str(value)[:40])
            return False
        if value != self._allowed:
            log.info("budget_allowance_learnt", allowed=value, previous=self._allowed,
                     assumed=not self._learnt, source=source)
        self._allowed = value
        self._learnt = True
        self._dispatch()
        return True

    def observe(self, headers: Mapping[str, str]) -> None:
        """Refine the books from one answer's legacy `inin-ratelimit-*` headers, if a server
        still sends them (call it while still holding the slot, so the answer's own request
        counts as in flight). Answers without them (Genesys today) change nothing; unusable
        values are logged and counted (`headers_rejected`), never raised."""
        raw = {h: headers.get(h) for h in (HEADER_COUNT, HEADER_ALLOWED, HEADER_RESET)}
        if all(v is None for v in raw.values()):
            return
        vals: dict[str, int] = {}
        for h, v in raw.items():
            if v is None:
                continue
            try:
                n = int(str(v).strip())
            except ValueError:
                n = -1
            if n < 0 or (h == HEADER_ALLOWED and n < 1):
                self.headers_rejected += 1
                log.warning("budget_header_rejected", header=h, value=str(v)[:40])
                continue
            vals[h] = n
        now = self._clock()
        self._roll(now)
        if HEADER_ALLOWED in vals:
            if vals[HEADER_ALLOWED] != self._allowed:
                log.info("budget_allowance_learnt", allowed=vals[HEADER_ALLOWED],
                         previous=self._allowed, assumed=not self._learnt, source="headers")
            self._allowed = vals[HEADER_ALLOWED]
            self._learnt = True
        count = vals.get(HEADER_COUNT)
        if count is not None:
            # Requests sent and not yet answered may be counted there already; what the server
            # counts beyond ours is another user of the token, until its window resets.
            others = max(0, self._in_flight - 1)
            self._extra = max(0, count + others - len(self._grants))
            reset = vals.get(HEADER_RESET)
            self._extra_until = now + (reset if reset is not None else self._span)
        self._dispatch()

    def note_token(self, key: object) -> None:
        """The token about to be used (an opaque key, never the token itself). A token other
        than the last one starts with an empty window: Genesys counts per token."""
        if key == self._token_key:
            return
        first = self._token_key is None
        self._token_key = key
        if first:
            return
        self._grants.clear()
        self._tag_used.clear()
        self._extra = 0
        log.info("budget_new_token_window")
        self._dispatch()

    def rate_limited(self, priority: Priority, seconds: float) -> None:
        """A request at `priority` got a 429: count it and pause that priority and every
        lower one for `seconds` (higher priorities go on as far as the window allows)."""
        p = Priority(priority)
        self.rate_limited_count[p.label] += 1
        if self.on_rate_limited is not None:
            try:
                self.on_rate_limited(p)
            except Exception as exc:  # a metrics hook must never break a request
                log.warning("budget_hook_failed", error=f"{exc.__class__.__name__}: {exc}")
        self.pause(seconds, p)

    def pause(self, seconds: float, priority: Priority = Priority.ENFORCE) -> None:
        """`priority` and every lower one get no slot for `seconds` from now (extends, never
        shortens a pause). The default, ENFORCE, pauses everybody."""
        if seconds <= 0:
            return
        until = self._clock() + seconds
        for p in Priority:
            if p >= priority and until > self._paused_until[p]:
                self._paused_until[p] = until
        self._dispatch()

    def waiting(self, priority: Priority) -> int:
        """How many callers of this priority are queued for a slot."""
        return self._waiting[priority]

    def tag_used(self, tag: str) -> int:
        """Slots granted to `tag` in the current sliding window."""
        self._roll(self._clock())
        return self._tag_used[tag]

    def tag_cap(self, share: float) -> int:
        """Slots a tag with this share may take per window at the current allowance."""
        return max(1, math.floor(share * self._allowed))

    @property
    def paused_for(self) -> float:
        """Seconds left of the longest current pause (0 when not paused)."""
        return max(0.0, max(self._paused_until.values()) - self._clock())

    @property
    def allowed(self) -> int:
        return self._allowed

    @property
    def reserve(self) -> int:
        """Requests of every window kept for ENFORCE."""
        return math.floor(self.enforce_reserve * self._allowed)

    @property
    def available(self) -> int:
        """Requests left in the sliding window now (any priority)."""
        self._roll(self._clock())
        return max(0, self._allowed - self._used)

    def snapshot(self) -> BudgetSnapshot:
        now = self._clock()
        self._roll(now)
        nxt = self._next_free()
        reset = 0.0 if nxt == math.inf else max(0.0, nxt - now)
        return BudgetSnapshot(
            allowed=self._allowed, used=self._used, remaining=max(0, self._allowed - self._used),
            reset_seconds=reset, learnt=self._learnt, reserve=self.reserve,
            in_flight=self._in_flight,
            paused_seconds={p.label: max(0.0, self._paused_until[p] - now) for p in Priority
                            if self._paused_until[p] > now},
            rate_limited=dict(self.rate_limited_count), headers_rejected=self.headers_rejected)

    # ------------------------------------------------------------------ internals

    @asynccontextmanager
    async def _slot(self, priority: Priority, tag: str | None,
                    share: float | None) -> AsyncIterator[None]:
        await self._acquire(priority, tag, share)
        try:
            yield
        finally:
            self._in_flight -= 1

    async def _acquire(self, priority: Priority, tag: str | None, share: float | None) -> None:
        loop = asyncio.get_running_loop()
        w = _Waiter(priority, next(self._seq), loop.create_future(), tag, share)
        bisect.insort(self._queue, w, key=_Waiter.key)
        self._waiting[priority] += 1
        self._dispatch()
        try:
            await w.fut
        except asyncio.CancelledError:
            if w.fut.done() and not w.fut.cancelled():
                # Granted in the same instant we were cancelled: give the slot back.
                self._in_flight -= 1
                self._give_back(tag)
            else:
                w.fut.cancel()
                self._waiting[priority] -= 1
            self._dispatch()
            raise

    def _give_back(self, tag: str | None) -> None:
        """Forget the newest grant of `tag` (a slot granted and never used)."""
        for i in range(len(self._grants) - 1, -1, -1):
            if self._grants[i][1] == tag:
                del self._grants[i]
                if tag is not None:
                    self._tag_used[tag] = max(0, self._tag_used[tag] - 1)
                return

    def _roll(self, now: float) -> None:
        """Drop the grants that left the sliding window (and expired legacy counts)."""
        grants = self._grants
        while grants and grants[0][0] <= now:
            _, tag = grants.popleft()
            if tag is not None:
                self._tag_used[tag] -= 1
                if self._tag_used[tag] <= 0:
                    del self._tag_used[tag]
        if self._extra and now >= self._extra_until:
            self._extra = 0

    def _next_free(self, tag: str | None = None) -> float:
        """When the next counted request (of `tag`, if given) leaves the window (inf: none)."""
        at = math.inf
        if tag is not None:
            for until, t in self._grants:
                if t == tag:
                    at = until
                    break
        elif self._grants:
            at = self._grants[0][0]
        if tag is None and self._extra:
            at = min(at, self._extra_until)
        return at

    def _blocked_until(self, w: _Waiter, now: float) -> float | None:
        """None if `w` may go now, else when to look again (monotonic; inf: on an answer)."""
        if now < self._paused_until[w.priority]:
            return self._paused_until[w.priority]
        left = self._allowed - self._used
        if w.priority != Priority.ENFORCE:
            left -= self.reserve
        if left < 1:
            return self._next_free()
        if w.tag is not None and w.share is not None and \
                self.tag_cap(w.share) - self._tag_used[w.tag] < 1:
            return self._next_free(w.tag)
        return None

    def _dispatch(self) -> None:
        """Grant every queued waiter that may go, in priority order; arm a timer for the rest."""
        now = self._clock()
        self._roll(now)
        wake = math.inf
        keep: list[_Waiter] = []
        for w in self._queue:
            if w.fut.done():  # cancelled while queued; its count was already dropped
                continue
            until = self._blocked_until(w, now)
            if until is not None:
                keep.append(w)
                wake = min(wake, until)
                continue
            self._grants.append((now + self._span, w.tag))
            self._in_flight += 1
            if w.tag is not None:
                self._tag_used[w.tag] += 1
                self.granted["tag:" + w.tag] += 1
            self.granted[w.priority.label] += 1
            self._waiting[w.priority] -= 1
            w.fut.set_result(None)
        self._queue = keep
        if keep and wake < math.inf:
            self._arm(wake - now)

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, delay)
        if self._timer is not None:
            if self._timer_at <= at + 1e-6:
                return  # an earlier (or equal) wake-up is already armed
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()
