"""core.timefmt: Genesys time stamps to and from epoch seconds."""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.timefmt import format_time, parse_time


def _plain(epoch: float) -> str:
    """format_time's contract, without the per-second memo."""
    dt = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def test_format_time_shape() -> None:
    assert format_time(1_763_716_502.345) == "2025-11-21T09:15:02.345Z"
    assert format_time(0.0) == "1970-01-01T00:00:00.000Z"


@settings(max_examples=2000)
@given(st.lists(st.floats(min_value=-86_400.0 * 365, max_value=4_102_444_800.0,
                          allow_nan=False), min_size=1, max_size=8))
def test_format_time_memo_gives_what_the_plain_formatting_gives(epochs: list[float]) -> None:
    """Whatever came before (the memo holds the last second), the text is the plain one:
    near second boundaries too (rounding up into the next second), and for negative
    epochs (int() truncates towards zero)."""
    for e in epochs + [e + d for e in epochs for d in (0.0000004, 0.9999996, -0.0000006, 1.0)]:
        assert format_time(e) == _plain(e), e


def test_format_time_round_trips_through_parse_time() -> None:
    for epoch in (1_763_716_502.345, 1_763_716_503.0, 1_763_716_503.999):
        assert parse_time(format_time(epoch)) == epoch
