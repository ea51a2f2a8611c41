"""The one retry policy of confguard: whether a failure is worth another try, and how long
to wait before it.

Shaped like websockets' client (`websockets/asyncio/client.py`): one classifier,
`process_exception(exc)`, returns None when retrying may help and the exception to raise
otherwise; one generator, `RetryPolicy.backoff()`, yields the delays. The settings are a
frozen value object in the manner of httpx's `_config.py` (`Timeout`, `Limits`):

    RetryPolicy(initial=0.5, factor=2.0, cap=8.0, jitter=0.5, max_attempts=5)

The k-th retry (1-based) waits `min(cap, initial * factor**(k-1))` seconds scaled by a
uniform draw from `[1 - jitter, 1]` (jitter 0.5 is "between half and all of it", jitter 0
is exact). `max_attempts` counts every attempt, the first included, so `backoff()` yields
`max_attempts - 1` delays and then stops; None means unbounded (the stream's reconnects).

Who uses it (one policy each, all built from `RetryPolicy`):
- the REST client (`GenesysClient.retry`: 5xx, 429 without Retry-After, no answer;
  `GenesysClient.conflict_retry`: 409 on the calls that retry conflicts),
- the notification stream's reconnects and handover retries (`StreamManager`),
- resync's discovery attempts (`Resyncer`) and the daemon's resync-until-success loop,
- the enforcer's 409 path.

Randomness is injectable (`rng`, a `random.Random`), so tests are deterministic.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Iterator
from dataclasses import dataclass

from daemon.errors import (
    ApiError,
    ConflictError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransportError,
    UnauthorizedError,
)

__all__ = ["Failure", "RetryPolicy", "classify", "process_exception"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry. Times are seconds.

    `initial`: ceiling of the first delay; `factor`: growth per retry (>= 1); `cap`: the
    largest ceiling; `jitter`: fraction in [0, 1] taken off at random (a delay is drawn
    uniformly from `[ceiling * (1 - jitter), ceiling]`); `max_attempts`: attempts in all,
    the first included (>= 1), or None for no bound.
    """

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not self.initial >= 0.0:
            raise ValueError(f"initial must be >= 0 seconds, got {self.initial!r}")
        if not self.factor >= 1.0:
            raise ValueError(f"factor must be >= 1, got {self.factor!r}")
        if not self.cap >= 0.0:
            raise ValueError(f"cap must be >= 0 seconds, got {self.cap!r}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {self.max_attempts!r}")

    def replace(self, **changes: float | int | None) -> RetryPolicy:
        """A copy with some settings changed (validated like the original)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def retries(self) -> int | None:
        """Retries allowed after the first attempt (None: unbounded)."""
        return None if self.max_attempts is None else self.max_attempts - 1

    def ceiling(self, retry: int) -> float:
        """The undrawn delay before the `retry`-th retry (1-based), seconds."""
        if retry < 1:
            raise ValueError(f"retry is 1-based, got {retry!r}")
        try:
            grown = self.initial * self.factor ** (retry - 1)
        except OverflowError:  # factor**k past float range: long since capped
            return self.cap
        return min(self.cap, grown)

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The jittered delay before the `retry`-th retry (1-based), seconds."""
        ceiling = self.ceiling(retry)
        if self.jitter == 0.0 or ceiling == 0.0:
            return ceiling
        draw = (rng or _RNG).uniform(1.0 - self.jitter, 1.0)
        return ceiling * draw

    def backoff(self, rng: random.Random | None = None) -> Iterator[float]:
        """Delays before retry 1, 2, ...; stops when `max_attempts` would be exceeded.

        `next(delays, None)` is None exactly when the attempts are used up."""
        retry = 1
        while self.max_attempts is None or retry < self.max_attempts:
            yield self.delay(retry, rng)
            retry += 1


_RNG = random.Random()


class Failure(enum.Enum):
    """What kind of failure an exception is, for the callers that treat kinds differently
    (the REST client re-authenticates on AUTH; the stream makes a new channel on GONE)."""

    TRANSIENT = "transient"  # no answer, 5xx, 429, socket/timeout: trying again may help
    CONFLICT = "conflict"  # 409: another operation in progress; retried where a caller says so
    AUTH = "auth"  # 401: the token was refused; renew it, then try again
    GONE = "gone"  # 404: the resource does not exist (a channel gone, a party left)
    FATAL = "fatal"  # anything else: retrying the same request will not help


def classify(exc: BaseException) -> Failure:
    """The `Failure` kind of an exception raised by the REST client or a socket."""
    if isinstance(exc, (TransportError, ServerError, RateLimitedError)):
        return Failure.TRANSIENT
    if isinstance(exc, ConflictError):
        return Failure.CONFLICT
    if isinstance(exc, UnauthorizedError):
        return Failure.AUTH
    if isinstance(exc, NotFoundError):
        return Failure.GONE
    if isinstance(exc, ApiError):
        return Failure.FATAL
    if isinstance(exc, (OSError, TimeoutError, EOFError)):
        return Failure.TRANSIENT
    # websockets' protocol errors (a handshake cut short, a bad frame) are transient as well;
    # imported here so that this module stays importable without websockets.
    try:
        from websockets.exceptions import InvalidStatus, WebSocketException
    except ImportError:  # pragma: no cover - websockets is a dependency
        return Failure.FATAL
    if isinstance(exc, InvalidStatus):
        # A WebSocket handshake refused with one of these: the channel is not usable.
        if exc.response.status_code in (401, 403, 404, 410):
            return Failure.GONE
        return Failure.TRANSIENT
    if isinstance(exc, WebSocketException):
        return Failure.TRANSIENT
    return Failure.FATAL


def process_exception(exc: BaseException, *, conflicts: bool = False) -> BaseException | None:
    """None when the failed operation should be retried (after a back-off); otherwise the
    exception to raise. Transient failures are retried; 409 only when `conflicts` is True;
    401, 404 and everything else are raised (a 401 is the caller's to handle)."""
    kind = classify(exc)
    if kind is Failure.TRANSIENT or (kind is Failure.CONFLICT and conflicts):
        return None
    return exc
