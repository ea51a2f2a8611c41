"""The one retry policy: delays, bounds, jitter, and the retryable-or-not classifier."""

from __future__ import annotations

import itertools
import random

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.http11 import Response

from daemon.errors import (
    ApiError,
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransportError,
    UnauthorizedError,
)
from daemon.genesys.retry import Failure, RetryPolicy, classify, process_exception


def test_defaults_are_a_value_object() -> None:
    p = RetryPolicy()
    assert p == RetryPolicy(initial=0.5, factor=2.0, cap=30.0, jitter=0.5, max_attempts=None)
    assert hash(p) == hash(RetryPolicy())
    with pytest.raises(AttributeError):
        p.initial = 1.0  # type: ignore[misc]
    q = p.replace(max_attempts=3)
    assert q.max_attempts == 3 and p.max_attempts is None and q.retries == 2


@pytest.mark.parametrize("kw", [dict(initial=-1.0), dict(factor=0.5), dict(cap=-0.1),
                                dict(jitter=1.5), dict(jitter=-0.1), dict(max_attempts=0),
                                dict(initial=float("nan"))])
def test_invalid_settings_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kw)  # type: ignore[arg-type]


def test_ceilings_grow_by_factor_and_stop_at_cap() -> None:
    p = RetryPolicy(initial=0.5, factor=2.0, cap=4.0)
    assert [p.ceiling(k) for k in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert p.ceiling(10_000) == 4.0  # no overflow far out
    with pytest.raises(ValueError):
        p.ceiling(0)


def test_jitter_draws_within_bounds_and_is_deterministic_with_a_seed() -> None:
    p = RetryPolicy(initial=0.5, factor=2.0, cap=4.0, jitter=0.5)
    a = list(itertools.islice(p.backoff(random.Random(7)), 12))
    b = list(itertools.islice(p.backoff(random.Random(7)), 12))
    assert a == b
    for k, d in enumerate(a, start=1):
        c = p.ceiling(k)
        assert c / 2 <= d <= c
    assert len(set(a)) > 1  # actually jittered


def test_no_jitter_is_exact() -> None:
    p = RetryPolicy(initial=1.0, factor=2.0, cap=60.0, jitter=0.0)
    assert list(itertools.islice(p.backoff(), 8)) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_max_attempts_bounds_the_generator() -> None:
    p = RetryPolicy(initial=0.1, max_attempts=4, jitter=0.0)
    assert list(p.backoff()) == pytest.approx([0.1, 0.2, 0.4])
    assert list(RetryPolicy(max_attempts=1).backoff()) == []
    delays = RetryPolicy(max_attempts=2).backoff()
    assert next(delays, None) is not None
    assert next(delays, None) is None


def test_unbounded_keeps_going() -> None:
    gen = RetryPolicy(initial=0.01, cap=0.02).backoff(random.Random(1))
    assert len(list(itertools.islice(gen, 1000))) == 1000


def _invalid_status(code: int) -> InvalidStatus:
    return InvalidStatus(Response(code, "x", Headers()))


@pytest.mark.parametrize(("exc", "kind"), [
    (TransportError("no answer"), Failure.TRANSIENT),
    (ServerError("boom", status=503), Failure.TRANSIENT),
    (RateLimitedError("slow down", retry_after=1.0), Failure.TRANSIENT),
    (ConflictError("busy"), Failure.CONFLICT),
    (UnauthorizedError("token"), Failure.AUTH),
    (NotFoundError("gone"), Failure.GONE),
    (BadRequestError("bad"), Failure.FATAL),
    (ForbiddenError("perm"), Failure.FATAL),
    (ApiError("teapot", status=418), Failure.FATAL),
    (ConnectionRefusedError(), Failure.TRANSIENT),
    (TimeoutError(), Failure.TRANSIENT),
    (ConnectionClosedError(None, None), Failure.TRANSIENT),
    (_invalid_status(503), Failure.TRANSIENT),
    (_invalid_status(404), Failure.GONE),
    (_invalid_status(401), Failure.GONE),
    (ValueError("a bug"), Failure.FATAL),
])
def test_classify(exc: BaseException, kind: Failure) -> None:
    assert classify(exc) is kind


def test_process_exception_retries_transients_and_conflicts_only_when_asked() -> None:
    assert process_exception(TransportError("x")) is None
    assert process_exception(ServerError("x", status=502)) is None
    c = ConflictError("x")
    assert process_exception(c) is c
    assert process_exception(c, conflicts=True) is None
    for exc in (UnauthorizedError("x"), NotFoundError("x"), BadRequestError("x"), KeyError("k")):
        assert process_exception(exc) is exc
