"""Value parsers shared by the config models, the rule compiler and `confguard check --schema`.

- Durations: `parse_duration(value)` is THE duration parser ("500ms", "10s", "2m", "1h",
  "10" or a number -> seconds, else None); `DURATION_PATTERN` is its text form for JSON
  Schemas; `Duration` is the pydantic field type built on it.
- Listen addresses: `check_listen(v, example)`, `listen_host`, `listen_port` (HOST:PORT).
- AWS: `queue_region(url)`, the region an SQS queue URL names (None: not an AWS host).
Pure functions: no I/O.
"""

from __future__ import annotations

import math
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator, WithJsonSchema

#: A duration as text: a number, optionally followed by ms, s, m or h (seconds without one).
DURATION_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$"
_DURATION_RE = re.compile(DURATION_PATTERN)
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float | None:
    """Seconds from "500ms", "10s", "2m", "1h", "10" or a number; None when `value` is not a
    duration (a bool, a negative or non-finite number, any other text or type)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            return None
        x = float(m.group(1)) * _DURATION_UNIT[m.group(2)]
    else:
        return None
    return x if math.isfinite(x) and x >= 0 else None


def _seconds(value: object) -> object:
    """A config duration before pydantic's float check: text is parsed here; numbers are left
    to pydantic (so its bounds give the message); anything else is rejected with the forms."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    seconds = parse_duration(value) if isinstance(value, str) else None
    if seconds is None:
        raise ValueError(f"expected a duration such as 5s, 500ms, 2m or a number of seconds, got {value!r}")
    return seconds


#: A duration key: seconds as a number, or a string such as "15s", "500ms", "2m". (The
#: JSON schema says both forms, so editors accept "15s"; the bounds are checked on load.)
Duration = Annotated[float, BeforeValidator(_seconds), WithJsonSchema({"anyOf": [
    {"type": "number", "exclusiveMinimum": 0},
    {"type": "string", "pattern": DURATION_PATTERN}]})]


def check_http_url(v: str | None, example: str) -> str | None:
    """`v` (None passes) when it is an http(s) URL with a host, else a ValueError quoting
    `example`."""
    if v is None:
        return v
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL such as {example}")
    return v


def check_listen(v: str, example: str) -> str:
    """`v` when it is HOST:PORT (port 0-65535), else a ValueError quoting `example`."""
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as {example}, got {v!r}")
    return v


def listen_host(listen: str) -> str:
    """The host of HOST:PORT, without IPv6 brackets."""
    return listen.rpartition(":")[0].strip("[]")


def listen_port(listen: str) -> int:
    """The port of HOST:PORT."""
    return int(listen.rpartition(":")[2])


# https://sqs.eu-west-1.amazonaws.com/123456789012/name, https://sqs.us-gov-west-1.amazonaws.com/..,
# https://sqs.cn-north-1.amazonaws.com.cn/.., the legacy https://eu-west-1.queue.amazonaws.com/..
_QUEUE_HOST = re.compile(
    r"^(?:sqs[.-](?P<a>[a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?"
    r"|(?P<b>[a-z]{2}(?:-[a-z]+)+-\d+)\.queue\.amazonaws\.com(?:\.cn)?)$"
)


def queue_region(url: str) -> str | None:
    """The AWS region named by an SQS queue URL's host, or None (a local endpoint, a VPC
    endpoint, anything else: then the region must be configured or come from the AWS chain)."""
    from urllib.parse import urlsplit

    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return None
    m = _QUEUE_HOST.match(host)
    if m is None:
        return None
    return m.group("a") or m.group("b")
