"""Control-API callers: their bearer tokens, constant-time lookup, and per-caller limits.

Tokens come from `control.callers.<name>.token_file` (relative to config.yaml) or, without
one, the systemd credential `control_token_<name>` (`$CREDENTIALS_DIRECTORY`). Surrounding
whitespace and a final newline are ignored. A token is never logged, echoed or put in an
exception message; `Caller.__repr__` hides it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.config import Config, read_secret, systemd_credential
from daemon.errors import ConfigError

log = structlog.get_logger(__name__)

CREDENTIAL_PREFIX = "control_token_"
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True, slots=True)
class Caller:
    """A configured caller: its name and the SHA-256 of its token (the token itself is not
    kept, so no repr, dump or traceback can show it)."""

    name: str
    digest: bytes = field(repr=False)


def _read_token(path: Path, name: str) -> str:
    token = read_secret(path, f"control.callers.{name}")
    if any(c.isspace() for c in token):
        raise ConfigError(f"control.callers.{name}: the token in {path} contains whitespace; "
                          f"a bearer token cannot (e.g. use `openssl rand -hex 32`)")
    if len(token) < MIN_TOKEN_LENGTH:
        log.warning("control_token_short", caller=name, path=str(path), length=len(token),
                    detail=f"use at least {MIN_TOKEN_LENGTH} random characters, e.g. `openssl rand -hex 32`")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Not fatal (a group-readable secret is an operator's call), but said out loud.
        log.warning("control_token_file_readable_by_others", caller=name, path=str(path),
                    mode=oct(mode & 0o777), detail="chmod 600 it, or use LoadCredential=")
    return token


def load_callers(cfg: Config, env: Mapping[str, str] | None = None) -> list[Caller]:
    """Every configured caller with its token digest (a caller with `client_cert_cn` and no
    token is left out: only its certificate names it). Raises ConfigError naming the caller
    (never the token) when a token cannot be found or read, or two callers share one."""
    callers: list[Caller] = []
    for name, spec in cfg.control.callers.items():
        if spec.token_file:
            path = cfg.resolve_path(spec.token_file)
        elif (credential := systemd_credential(f"{CREDENTIAL_PREFIX}{name}", env)) is not None:
            path = credential
        elif spec.client_cert_cn is not None:
            continue  # named by its client certificate only
        else:
            raise ConfigError(f"control.callers.{name}: no token: set token_file, or give the "
                              f"service the systemd credential {CREDENTIAL_PREFIX}{name} "
                              f"(LoadCredential={CREDENTIAL_PREFIX}{name}:/path/to/file)")
        digest = hashlib.sha256(_read_token(path, name).encode()).digest()
        for other in callers:
            if hmac.compare_digest(other.digest, digest):
                raise ConfigError(f"control.callers.{name} and control.callers.{other.name} "
                                  f"use the same token: give each caller its own")
        callers.append(Caller(name, digest))
    return callers


class Authenticator:
    """Maps an `Authorization` header to a caller name.

    Constant time: the presented token is hashed and compared with EVERY caller's digest
    with `hmac.compare_digest` (no early exit, and equal-length digests, so neither the
    token's length nor which caller it is close to shows in the timing)."""

    def __init__(self, callers: list[Caller]) -> None:
        self._callers = list(callers)

    def identify(self, header: str | None) -> tuple[str | None, str | None]:
        """(caller name, None) or (None, failure reason: `missing` | `unknown_token`)."""
        if not header:
            return None, "missing"
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, "missing"
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for caller in self._callers:
            if hmac.compare_digest(caller.digest, digest) and found is None:
                found = caller.name
        return (found, None) if found is not None else (None, "unknown_token")


class CallerLimiter:
    """`per_minute` requests a minute per caller, as a token bucket: a full minute's
    allowance may come as a burst, then it refills evenly. `check` returns 0 when the
    request may go ahead, else the seconds to wait (for `Retry-After`). Memory: one bucket
    per configured caller (names are authenticated first)."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens a second
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def check(self, caller: str) -> float:
        now = self._clock()
        tokens, at = self._buckets.get(caller, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[caller] = (tokens - 1.0, now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(seconds: float) -> str:
        """Whole seconds for the `Retry-After` header (at least 1)."""
        return str(max(1, math.ceil(seconds)))
