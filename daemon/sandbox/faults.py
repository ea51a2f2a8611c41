"""Fault injection state for the sandbox, switchable at run time. Pure data and decisions:
the server asks `Faults` what to do with each request and each event delivery.

REST faults: `latency` seconds added to every /api/v2 request; `ignore_disconnects`
answers a participant PATCH 202 and leaves the party connected; `hold_disconnects` (an
`asyncio.Event` of the sandbox's loop, in-process tests only) keeps every participant PATCH
{"state": "disconnected"} waiting until it is set, so a test holds a removal in flight for
as long as it needs, with no timing race; `bursts` answer the next N
requests matching a method and a path regex with a chosen status (429 with Retry-After, 5xx);
`budget_per_minute` is a per-token request budget. By default it is counted in a sliding
60 s window (Genesys does not document its window; sliding is the strictest reading), no
answer says where the token stands, and past the allowance the answer is today's 429:
`Retry-After` (whole seconds until the oldest counted request leaves the window), code
`too.many.requests.retry.after` and the `limit` object (`LIMIT_KEY`, `LIMIT_NAMESPACE`,
the allowance). `legacy_headers` brings back the pre-2021 behaviour for tests of that path
(see `Window`): a fixed 60 s window from the token's first request and
`inin-ratelimit-count`, `-allowed` and `-reset` headers on every /api/v2 answer.

Event faults (decided per delivery to one socket): duplicate, lose (drop silently),
reorder (hold an event back and send it after the next), malformed (an extra broken frame
before the event), each as a probability and/or "the next N"; `event_latency` seconds
before each frame is written; `drop_every` seconds closes every socket periodically.

Per-change losses (`lose_change`, the `lose_event` driver op): the next `count` changes
(of one conversation, or of any) are lost on the WebSocket only (every socket and topic),
on EventBridge only (every detail event of the change), or on both; `eventbridge_delay`
seconds delay every EventBridge delivery (`delay_eventbridge`).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Burst:
    method: str
    pattern: re.Pattern[str]
    status: int
    remaining: int
    retry_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.pattern.pattern, "status": self.status,
                "remaining": self.remaining, "retryAfter": self.retry_after}


WINDOW_SECONDS = 60.0
"""Length of one per-token budget window (Genesys: per minute)."""
LIMIT_KEY = "client.credentials.token.rate.per.minute"
LIMIT_NAMESPACE = "platform.api"
"""The `limit` a 429 names, and the limits API lists, for the per-token budget."""


@dataclass(slots=True)
class Window:
    """(legacy mode) One token's current fixed budget window: `count` requests accepted since `started`
    (monotonic seconds); it ends at `started + WINDOW_SECONDS`, and the token's next request
    after that starts a new one. Requests refused with 429 are not counted."""

    started: float
    count: int = 0

    def reset_in(self, now: float) -> int:
        """Whole seconds until the window resets, rounded up (at least 1), as Genesys'
        `inin-ratelimit-reset` and `Retry-After`."""
        return max(1, math.ceil(self.started + WINDOW_SECONDS - now))


@dataclass(slots=True)
class EventFault:
    """A probability (0..1) and a count of next deliveries that get the fault for sure."""

    probability: float = 0.0
    next: int = 0

    def fire(self, rng: random.Random) -> bool:
        if self.next > 0:
            self.next -= 1
            return True
        return self.probability > 0 and rng.random() < self.probability

    def as_dict(self) -> dict[str, Any]:
        return {"probability": self.probability, "next": self.next}


@dataclass(slots=True)
class Delivery:
    """What to do with one event for one socket."""

    lose: bool = False
    duplicate: bool = False
    reorder: bool = False
    malformed: bool = False


LOSS_CHANNELS = ("websocket", "eventbridge", "both")


@dataclass(slots=True)
class ChangeLoss:
    """Lose the next `remaining` changes of `conversation_id` (None: of any call) on `on`."""

    on: str
    conversation_id: str | None
    remaining: int

    def as_dict(self) -> dict[str, Any]:
        return {"on": self.on, "conversationId": self.conversation_id, "remaining": self.remaining}


@dataclass
class Faults:
    latency: float = 0.0
    event_latency: float = 0.0
    budget_per_minute: int | None = None
    legacy_headers: bool = False
    drop_every: float | None = None
    extra_field: bool = True
    bursts: list[Burst] = field(default_factory=list)
    duplicate: EventFault = field(default_factory=EventFault)
    lose: EventFault = field(default_factory=EventFault)
    reorder: EventFault = field(default_factory=EventFault)
    malformed: EventFault = field(default_factory=EventFault)
    seed: int | None = None
    eventbridge_delay: float = 0.0
    losses: list[ChangeLoss] = field(default_factory=list)
    #: A participant PATCH {"state": "disconnected"} is answered 202 and not carried out
    #: (the party stays connected): a removal Genesys accepted and never made.
    ignore_disconnects: bool = False
    #: While an unset Event: a participant PATCH {"state": "disconnected"} waits (after
    #: `latency`, before it is carried out) until the test sets it. None: no hold.
    hold_disconnects: asyncio.Event | None = None
    _windows: dict[str, Window] = field(default_factory=dict)  # legacy: fixed windows
    _sliding: dict[str, deque[float]] = field(default_factory=dict)  # accepted request times

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def reset(self) -> None:
        """Back to no faults (extra_field back on). The request budget is not a fault but the
        org's allowance (`--budget N`): it and its windows under way stay, as on Genesys."""
        self.latency = self.event_latency = 0.0
        self.drop_every = None
        self.ignore_disconnects = False
        if self.hold_disconnects is not None:
            self.hold_disconnects.set()  # nothing stays held once the faults are off
        self.hold_disconnects = None
        self.extra_field = True
        self.bursts.clear()
        self.duplicate, self.lose = EventFault(), EventFault()
        self.reorder, self.malformed = EventFault(), EventFault()
        self.eventbridge_delay = 0.0
        self.losses.clear()

    def lose_change(self, on: str, conversation_id: str | None = None, count: int = 1) -> list[ChangeLoss]:
        """Lose the next `count` changes (of one call, or any) on `on` (`LOSS_CHANNELS`;
        `both` is one loss on each)."""
        if on not in LOSS_CHANNELS:
            raise ValueError(f"on must be one of {', '.join(LOSS_CHANNELS)}: {on!r}")
        if count < 1:
            raise ValueError("count must be at least 1")
        made = [ChangeLoss(ch, conversation_id, int(count))
                for ch in (("websocket", "eventbridge") if on == "both" else (on,))]
        self.losses.extend(made)
        return made

    def take_loss(self, channel: str, conversation_id: str) -> bool:
        """Whether this change of `conversation_id` is lost on `channel` (websocket |
        eventbridge); counts it against the first matching loss."""
        for loss in self.losses:
            if loss.on == channel and loss.conversation_id in (None, conversation_id):
                loss.remaining -= 1
                if loss.remaining <= 0:
                    self.losses.remove(loss)
                return True
        return False

    def add_burst(self, method: str, path: str, status: int, count: int,
                  retry_after: float | None = None) -> Burst:
        """The next `count` requests with `method` (or "*") whose path matches the regex
        `path` (re.search) are answered with `status`."""
        b = Burst(method.upper(), re.compile(path), int(status), int(count), retry_after)
        self.bursts.append(b)
        return b

    def take_burst(self, method: str, path: str) -> Burst | None:
        for b in self.bursts:
            if b.remaining > 0 and b.method in ("*", method) and b.pattern.search(path):
                b.remaining -= 1
                if b.remaining == 0:
                    self.bursts.remove(b)
                return b
        return None

    def spend(self, token: str, now: float | None = None) -> float | None:
        """Count one request against the token's budget. None if allowed, else the
        Retry-After seconds (whole seconds, at least 1: until the oldest counted request
        leaves the sliding window; legacy: to the fixed window's reset)."""
        if self.budget_per_minute is None:
            return None
        now = time.monotonic() if now is None else now
        if not self.legacy_headers:
            times = self._sliding.setdefault(token, deque())
            while times and times[0] <= now - WINDOW_SECONDS:
                times.popleft()
            if len(times) >= self.budget_per_minute:
                return float(max(1, math.ceil(times[0] + WINDOW_SECONDS - now)))
            times.append(now)
            return None
        win = self._windows.get(token)
        if win is None or now >= win.started + WINDOW_SECONDS:
            win = self._windows[token] = Window(started=now)
        if win.count >= self.budget_per_minute:
            return float(win.reset_in(now))
        win.count += 1
        return None

    def budget_headers(self, token: str | None, now: float | None = None) -> dict[str, str]:
        """(legacy mode only) The `inin-ratelimit-*` headers for an answer to `token` (after
        `spend`); empty by default, when the budget is off or the token made no counted
        request yet."""
        if self.budget_per_minute is None or token is None or not self.legacy_headers:
            return {}
        now = time.monotonic() if now is None else now
        win = self._windows.get(token)
        if win is None or now >= win.started + WINDOW_SECONDS:
            # The window is over (or never started): nothing is counted until the next request.
            return {"inin-ratelimit-count": "0",
                    "inin-ratelimit-allowed": str(self.budget_per_minute),
                    "inin-ratelimit-reset": str(int(WINDOW_SECONDS))}
        return {"inin-ratelimit-count": str(win.count),
                "inin-ratelimit-allowed": str(self.budget_per_minute),
                "inin-ratelimit-reset": str(win.reset_in(now))}

    def limit(self) -> dict[str, Any]:
        """The `limit` object of a 429 body (and the limits API's entry) for the budget."""
        return {"key": LIMIT_KEY, "namespace": LIMIT_NAMESPACE, "value": self.budget_per_minute}

    def set_legacy_headers(self, on: bool) -> None:
        """Switch between today's budget (sliding window, no headers) and the legacy one
        (fixed window, `inin-ratelimit-*` headers). Counts under way are forgotten."""
        self.legacy_headers = bool(on)
        self._windows.clear()
        self._sliding.clear()

    def set_budget(self, per_minute: int | None) -> None:
        """Change the allowance (None: off). Windows under way keep their count and end."""
        if per_minute is not None and per_minute < 1:
            raise ValueError("budgetPerMinute must be at least 1 (or null for off)")
        self.budget_per_minute = per_minute

    def delivery(self) -> Delivery:
        return Delivery(lose=self.lose.fire(self.rng), duplicate=self.duplicate.fire(self.rng),
                        reorder=self.reorder.fire(self.rng),
                        malformed=self.malformed.fire(self.rng))

    @property
    def events_clean(self) -> bool:
        """True when no event fault can fire (the fast path skips per-delivery decisions)."""
        return not any(f.next or f.probability for f in
                       (self.duplicate, self.lose, self.reorder, self.malformed))

    def configure(self, spec: dict[str, Any]) -> None:
        """Apply a JSON fault spec (the /sandbox/faults body). Unknown keys raise ValueError.

        Keys: latency, eventLatency, budgetPerMinute (null = off), legacyRatelimitHeaders,
        dropEvery (null = off),
        extraField, seed, burst {method, path, status, count, retryAfter},
        duplicate/lose/reorder/malformed {probability, next}, eventbridgeDelay (seconds),
        ignoreDisconnects (participant PATCHes answered 202 and not carried out)."""
        for k, v in spec.items():
            if k == "latency":
                self.latency = float(v)
            elif k == "eventLatency":
                self.event_latency = float(v)
            elif k == "budgetPerMinute":
                self.set_budget(None if v is None else int(v))
            elif k == "legacyRatelimitHeaders":
                self.set_legacy_headers(bool(v))
            elif k == "dropEvery":
                self.drop_every = None if v is None else float(v)
            elif k == "extraField":
                self.extra_field = bool(v)
            elif k == "seed":
                self.rng.seed(v)
            elif k == "burst":
                self.add_burst(str(v.get("method", "*")), str(v.get("path", ".*")),
                               int(v["status"]), int(v.get("count", 1)), v.get("retryAfter"))
            elif k == "ignoreDisconnects":
                self.ignore_disconnects = bool(v)
            elif k == "eventbridgeDelay":
                if float(v) < 0:
                    raise ValueError("eventbridgeDelay must be >= 0 seconds")
                self.eventbridge_delay = float(v)
            elif k in ("duplicate", "lose", "reorder", "malformed"):
                setattr(self, k, EventFault(float(v.get("probability", 0.0)),
                                            int(v.get("next", 0))))
            else:
                raise ValueError(f"unknown fault: {k}")

    def as_dict(self) -> dict[str, Any]:
        return {"latency": self.latency, "eventLatency": self.event_latency,
                "budgetPerMinute": self.budget_per_minute,
                "legacyRatelimitHeaders": self.legacy_headers, "dropEvery": self.drop_every,
                "extraField": self.extra_field, "bursts": [b.as_dict() for b in self.bursts],
                "duplicate": self.duplicate.as_dict(), "lose": self.lose.as_dict(),
                "reorder": self.reorder.as_dict(), "malformed": self.malformed.as_dict(),
                "eventbridgeDelay": self.eventbridge_delay, "losses": [x.as_dict() for x in self.losses],
                "ignoreDisconnects": self.ignore_disconnects}
