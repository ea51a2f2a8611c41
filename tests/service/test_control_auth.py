"""Control-API tokens and limits: where tokens come from, what is refused, what is never
shown; the per-caller token bucket on a fake clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.config import Config, parse_config
from daemon.errors import ConfigError
from daemon.service.control.auth import Authenticator, CallerLimiter, load_callers

SECRET = "s3cr3t-token-value-0123456789abcdef"


def _cfg(tmp: Path, callers: str) -> Config:
    return parse_config(f"control:\n  listen: 127.0.0.1:0\n  callers: {callers}\n",
                        file=str(tmp / "config.yaml"), base_dir=tmp)


def test_token_file_relative_to_config_and_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "a.token").write_text(f"\n  {SECRET}\n\n")
    os.chmod(tmp_path / "a.token", 0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "control_token_b").write_text("another-token-abcdefghijklmnop\n")
    cfg = _cfg(tmp_path, "{a: {token_file: a.token}, b: {}}")
    callers = load_callers(cfg, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert [c.name for c in callers] == ["a", "b"]
    assert SECRET not in repr(callers)
    auth = Authenticator(callers)
    assert auth.identify(f"Bearer {SECRET}") == ("a", None)
    assert auth.identify("bearer another-token-abcdefghijklmnop") == ("b", None)
    assert auth.identify(None) == (None, "missing")
    assert auth.identify("Basic abc") == (None, "missing")
    assert auth.identify("Bearer ") == (None, "missing")
    assert auth.identify(f"Bearer {SECRET}x") == (None, "unknown_token")
    assert auth.identify("Bearer \udcff") == (None, "unknown_token")


def test_token_problems_name_the_caller_never_the_token(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "{a: {}}")
    with pytest.raises(ConfigError, match="control_token_a"):
        load_callers(cfg, env={})
    cfg = _cfg(tmp_path, "{a: {token_file: missing.token}}")
    with pytest.raises(ConfigError, match="control.callers.a: cannot read"):
        load_callers(cfg, env={})
    (tmp_path / "empty.token").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_callers(_cfg(tmp_path, "{a: {token_file: empty.token}}"), env={})
    (tmp_path / "two.token").write_text(f"{SECRET} {SECRET}\n")
    with pytest.raises(ConfigError, match="whitespace") as info:
        load_callers(_cfg(tmp_path, "{a: {token_file: two.token}}"), env={})
    assert SECRET not in str(info.value)
    (tmp_path / "same.token").write_text(SECRET)
    with pytest.raises(ConfigError, match="same token") as info:
        load_callers(_cfg(tmp_path, "{a: {token_file: same.token}, b: {token_file: same.token}}"),
                     env={})
    assert SECRET not in str(info.value)


def test_readable_by_others_and_short_tokens_are_logged(tmp_path: Path) -> None:
    (tmp_path / "a.token").write_text("short\n")
    os.chmod(tmp_path / "a.token", 0o644)
    with capture_logs() as logs:
        load_callers(_cfg(tmp_path, "{a: {token_file: a.token}}"), env={})
    events = {e["event"] for e in logs}
    assert {"control_token_file_readable_by_others", "control_token_short"} <= events
    assert "short" not in str([{k: v for k, v in e.items() if k != "event"} for e in logs])


def test_caller_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="caller name"):
        _cfg(tmp_path, "{'bad name': {token_file: x}}")


def test_limiter_is_a_per_caller_token_bucket() -> None:
    now = [0.0]
    lim = CallerLimiter(60, clock=lambda: now[0])  # one a second, bursts of 60
    assert all(lim.check("a") == 0 for _ in range(60))
    wait = lim.check("a")
    assert 0 < wait <= 1.0 and CallerLimiter.retry_after(wait) == "1"
    assert lim.check("b") == 0  # another caller has its own bucket
    now[0] += 1.0
    assert lim.check("a") == 0 and lim.check("a") > 0
    now[0] += 3600
    assert all(lim.check("a") == 0 for _ in range(60))  # refills up to one minute's worth only
    assert lim.check("a") > 0
