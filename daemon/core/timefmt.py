"""Genesys time stamps: ISO-8601 UTC with milliseconds and a `Z`, e.g.
`2026-11-21T09:15:02.345Z`, to and from epoch seconds (float). Pure functions, no I/O.

`parse_time` is on the event hot path (two times per participant per event), so the
Genesys shape is sliced by hand; anything else goes through `datetime.fromisoformat`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Final

MAX_TIME_LEN: Final = 64
"""Longer strings are not times (and are not parsed: bounded work per field)."""


def format_time(epoch: float) -> str:
    """Epoch seconds as `2026-11-21T09:15:02.345Z` (UTC, milliseconds, `Z`)."""
    global _second
    dt = datetime.fromtimestamp(epoch, tz=timezone.utc)
    # The text up to the second is kept for the next call within the same second (a
    # burst's records): `strftime` is most of the cost. (int(epoch), dt.second) names one
    # second: dt's own second is int(epoch) - 1, + 0 or + 1 (truncation of a negative
    # epoch, rounding up to the next second), and its value modulo 60 tells which.
    key = (int(epoch), dt.second)
    if _second[0] != key:
        _second = (key, dt.strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{_second[1]}{dt.microsecond // 1000:03d}Z"


_second: tuple[tuple[int, int], str] = ((0, -1), "")


_DAYS_BEFORE_MONTH: Final = (0, 0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334)
_DAYS_IN_MONTH: Final = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def parse_time(s: object) -> float | None:
    """ISO-8601 to epoch seconds; None when absent or unparseable.

    The Genesys shape `2026-11-21T09:15:02.345Z` is sliced by hand; anything else (other
    fraction lengths, offsets) goes through `datetime.fromisoformat`. Naive times are UTC,
    never the machine's local zone.
    """
    if not isinstance(s, str):
        return None
    if (len(s) == 24 and s[23] == "Z" and s[4] == "-" and s[7] == "-" and s[10] == "T"
            and s[13] == ":" and s[16] == ":" and s[19] == "."):
        digits = s[0:4] + s[5:7] + s[8:10] + s[11:13] + s[14:16] + s[17:19] + s[20:23]
        if digits.isascii() and digits.isdigit():
            y = int(s[0:4])
            mo = int(s[5:7])
            d = int(s[8:10])
            h = int(s[11:13])
            mi = int(s[14:16])
            sec = int(s[17:19])
            if (1 <= mo <= 12 and 1 <= d <= _DAYS_IN_MONTH[mo] and h < 24 and mi < 60 and sec < 60
                    and y >= 1 and (mo != 2 or d < 29 or (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)))):
                leap = mo > 2 and y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
                yd = y - 1
                # Days since 0001-01-01, then shifted to the Unix epoch (719162 days).
                days = (yd * 365 + yd // 4 - yd // 100 + yd // 400 + _DAYS_BEFORE_MONTH[mo]
                        + leap + d - 1 - 719_162)
                return days * 86_400 + h * 3600 + mi * 60 + sec + int(s[20:23]) / 1000.0
            return None
    return _parse_time_slow(s)


def _parse_time_slow(s: str) -> float | None:
    if len(s) > MAX_TIME_LEN:
        return None
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        return dt.timestamp()
    except (OverflowError, ValueError, OSError):
        return None
