"""Logging setup: structlog for our code, stdlib logging (aiohttp, websockets, httpx) routed
to the same stream and format, and secrets redacted before anything is rendered.

Output is one JSON object per line (orjson) when `fmt="json"`, or `fmt="auto"` and the
stream is not a terminal (journald, files, pipes); a coloured console layout on a terminal.
Every entry has `timestamp` (ISO-8601 UTC), `level`, `event` and the key-value pairs given,
plus anything bound with `structlog.contextvars.bind_contextvars`.

Redaction (`redact_secrets`) runs last before rendering, over nested dicts/lists too:
- the value of any key whose name says token/secret/password/authorization/cookie/api key
  (`access_token`, `client_secret`, `Authorization`, ...) becomes `***`; keys that only
  describe a token (`token_age`, `token_expires_at`, `token_type`, ...) are kept;
- inside any string: `Bearer <token>` becomes `Bearer ***`, JWT-shaped strings and
  `access_token=...`/`client_secret=...` query or form parameters become `***`.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["configure_logging", "redact_secrets", "shared_processors", "REDACTED"]

REDACTED = "***"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}
#: Third-party loggers routed to our output, at WARNING and above.
THIRD_PARTY = ("aiohttp", "websockets", "httpx", "httpcore", "asyncio")

_SECRET_WORDS = ("token", "secret", "password", "passwd", "passphrase", "authorization",
                 "cookie", "apikey", "api_key", "credential", "credentials", "private_key")
_SECRET_KEY = re.compile(r"(?:^|[_\-.])(?:" + "|".join(map(re.escape, _SECRET_WORDS)) + r")(?:$|[_\-.])")
# Keys that name a fact ABOUT a secret, not the secret itself.
_HARMLESS_SUFFIX = re.compile(
    r"[_\-.](?:age|age_seconds|seconds|expires|expires_at|expires_in|expiry|type|count|len|"
    r"length|file|path|source|refreshes|refreshed_at|issued_at|present|set)$")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]+=*")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
_PARAM = re.compile(r"(?i)\b(access_token|refresh_token|id_token|client_secret|password|token)=([^&\s\"']+)")




def _maybe_secret(s: str) -> bool:
    """False when none of the three patterns above can change `s`: each needs `bearer` or
    `basic` (any case), `eyJ`, or an `=`. Plain substring tests, far cheaper than the
    regular expressions on the strings of a log line (ids, names, messages)."""
    if "=" in s or "eyJ" in s:
        return True
    low = s.lower()
    return "bearer" in low or "basic" in low


@functools.lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    """Does `key` name a secret? Cached: log lines reuse a small set of field names."""
    k = key.lower()
    return bool(_SECRET_KEY.search(k)) and not _HARMLESS_SUFFIX.search(k)


def _scrub_str(s: str) -> str:
    if len(s) < 8 or not _maybe_secret(s):
        return s
    s = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", s)
    s = _JWT.sub(REDACTED, s)
    return _PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", s)


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 8:  # bounded: logs never carry deeper structures worth walking
        return value
    if isinstance(value, str):
        return _scrub_str(value)
    if isinstance(value, Mapping):
        return {k: (REDACTED if isinstance(k, str) and _secret_key(k) and v is not None
                    else _scrub(v, depth + 1))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hide secrets by key name and by shape (see module docstring)."""
    out: EventDict = {}
    for key, value in event_dict.items():
        if _secret_key(key) and value is not None:
            out[key] = REDACTED
        else:
            out[key] = _scrub(value)
    return out


def shared_processors() -> list[Processor]:
    """The processors every entry goes through (ours and stdlib's), before rendering."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        # Render exceptions to text here so their text is redacted like everything else.
        structlog.processors.format_exc_info,
        redact_secrets,
    ]


def _json_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=repr).decode()


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler we installed, so reconfiguring replaces it instead of stacking."""


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging. Safe to call again (e.g. on reload).

    `level`: debug/info/warning/error/critical (filters our loggers; third-party loggers
    stay at WARNING unless `level` is stricter). `fmt`: auto/json/console. `stream`:
    default `sys.stdout` (journald captures it under systemd).
    """
    out = sys.stdout if stream is None else stream
    lvl = LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected auto, json or console")
    use_json = fmt == "json" or (fmt == "auto" and not _isatty(out))
    renderer: Processor = (structlog.processors.JSONRenderer(serializer=_json_dumps) if use_json
                           else structlog.dev.ConsoleRenderer(colors=_isatty(out)))

    structlog.configure(
        processors=[*shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        context_class=dict,
        # Not cached: tests (structlog.testing.capture_logs) and reloads reconfigure.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared_processors()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _OurHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _OurHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(max(lvl, logging.WARNING))
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(max(lvl, logging.WARNING))


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
