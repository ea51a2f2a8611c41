"""Logging: JSON output, level filtering, stdlib routing and secret redaction."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import given, settings, strategies as st
from structlog.testing import capture_logs

from daemon.service.logs import REDACTED, configure_logging, redact_secrets
from _logging_state import preserved_logging

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjb25mZ3VhcmQifQ.c2lnbmF0dXJlLXNlY3JldA"
OPAQUE = "Zx9_qP3-longOpaqueTokenValue0123456789"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave structlog and the root logger as we found them for other tests."""
    with preserved_logging():
        yield


def _entries(buf: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_output_fields() -> None:
    buf = io.StringIO()
    configure_logging("info", "auto", stream=buf)  # StringIO is not a TTY -> JSON
    structlog.contextvars.bind_contextvars(conversation_id="c1")
    try:
        structlog.get_logger("daemon.test").info("decision", rule="r1", latency_ms=1.5)
    finally:
        structlog.contextvars.clear_contextvars()
    [entry] = _entries(buf)
    assert entry["event"] == "decision" and entry["level"] == "info"
    assert entry["rule"] == "r1" and entry["latency_ms"] == 1.5
    assert entry["conversation_id"] == "c1"
    assert entry["timestamp"].endswith("Z") and "T" in entry["timestamp"]


def test_level_filtering() -> None:
    buf = io.StringIO()
    configure_logging("warning", "json", stream=buf)
    log = structlog.get_logger("daemon.test")
    log.info("hidden")
    log.debug("hidden")
    log.warning("shown")
    log.error("shown too")
    assert [e["event"] for e in _entries(buf)] == ["shown", "shown too"]


def test_redaction_in_json_output() -> None:
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    log = structlog.get_logger("daemon.test")
    log.info("token_refreshed", access_token=TOKEN, token_age=12.5, token_type="bearer",
             client_secret="s3cr3t-value", password="hunter2hunter2",
             headers={"Authorization": f"Bearer {OPAQUE}", "Accept": "application/json"},
             url=f"https://login.example/oauth/token?access_token={OPAQUE}&x=1",
             note=f"sent Authorization: Bearer {OPAQUE} to the API",
             items=[{"refresh_token": OPAQUE}], jwt_in_text=f"got {TOKEN} back")
    text = buf.getvalue()
    for secret in (TOKEN, OPAQUE, "s3cr3t-value", "hunter2hunter2"):
        assert secret not in text
    [e] = _entries(buf)
    assert e["access_token"] == REDACTED and e["client_secret"] == REDACTED
    assert e["password"] == REDACTED
    assert e["token_age"] == 12.5 and e["token_type"] == "bearer"  # facts about a token stay
    assert e["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    assert e["url"] == f"https://login.example/oauth/token?access_token={REDACTED}&x=1"
    assert e["note"] == f"sent Authorization: Bearer {REDACTED} to the API"
    assert e["items"] == [{"refresh_token": REDACTED}]
    assert e["jwt_in_text"] == f"got {REDACTED} back"


def test_exception_text_is_redacted() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    try:
        raise RuntimeError(f"server echoed Bearer {OPAQUE}")
    except RuntimeError:
        structlog.get_logger("daemon.test").exception("request_failed")
    [e] = _entries(buf)
    assert "RuntimeError" in e["exception"] and OPAQUE not in buf.getvalue()
    assert f"Bearer {REDACTED}" in e["exception"]


def test_stdlib_routed_at_warning() -> None:
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    logging.getLogger("aiohttp.access").info("GET /metrics 200")  # below WARNING: dropped
    logging.getLogger("httpx").warning("retrying %s with Bearer %s", "/api/v2/x", OPAQUE)
    entries = _entries(buf)
    assert len(entries) == 1
    [e] = entries
    assert e["level"] == "warning" and e["event"] == f"retrying /api/v2/x with Bearer {REDACTED}"
    assert e["timestamp"].endswith("Z")
    assert OPAQUE not in buf.getvalue()


def test_reconfigure_does_not_stack_handlers() -> None:
    buf1, buf2 = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=buf1)
    configure_logging("info", "json", stream=buf2)
    logging.getLogger("websockets.client").error("closed")
    assert buf1.getvalue() == ""
    assert len(_entries(buf2)) == 1


def test_console_format() -> None:
    buf = io.StringIO()
    configure_logging("info", "console", stream=buf)
    structlog.get_logger("daemon.test").info("hello", client_secret="abcdefgh123")
    out = buf.getvalue()
    assert "hello" in out and "abcdefgh123" not in out and REDACTED in out
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(out)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", "json", stream=io.StringIO())
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("info", "xml", stream=io.StringIO())


def test_capture_logs_sees_redacted_via_processor() -> None:
    """Other tests use capture_logs; our processor is a plain function they can chain."""
    with capture_logs() as logs:
        structlog.get_logger("daemon.test").warning("auth", authorization=f"Bearer {OPAQUE}")
    assert logs == [{"event": "auth", "log_level": "warning", "authorization": f"Bearer {OPAQUE}"}]
    cleaned = redact_secrets(None, "warning", dict(logs[0]))
    assert cleaned["authorization"] == REDACTED
    assert redact_secrets(None, "info", {"event": f"Bearer {OPAQUE}"}) == {"event": f"Bearer {REDACTED}"}


# ---------------------------------------------------------------------- event names


def test_every_event_name_is_a_stable_snake_case_identifier() -> None:
    """Operators alert on event names: no English sentences, no dotted or dynamic names."""
    import _log_events

    events = _log_events.inventory()
    assert len(events) > 100  # the scan sees the code (guards against it going blind)
    assert _log_events.bad_names(events) == []


def test_readme_lists_every_event() -> None:
    """docs/log-events.md's event table is the one the code implies (names, levels, fields). After
    adding or changing a log line: `.venv/bin/python tests/_log_events.py --write`."""
    import _log_events

    listed = _log_events.readme_table(_log_events.DOC.read_text())
    assert listed is not None, "docs/log-events.md lost its log-events markers"
    assert listed == _log_events.table(_log_events.inventory()), (
        "docs/log-events.md's log event table is stale: run .venv/bin/python tests/_log_events.py --write")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aAbBeEirRsScCtTokKnNyYjJpPwWdD=_. -+/x0")),
               max_size=40)
       | st.builds(lambda a, w, b: a + w + b, st.text(max_size=8),
                   st.sampled_from(["Bearer abcdefgh", "BASIC xyz123==", "eyJa.eyJb.c",
                                    "token=abc", "client_secret=s3", "password=pw",
                                    "bearer", "basic", "eyj", "="]),
                   st.text(max_size=8)))
def test_redaction_prefilter_never_skips_a_string_a_pattern_would_change(s: str) -> None:
    """`_scrub_str` skips the three regular expressions for strings `_maybe_secret` rules
    out; any string they would change must not be ruled out."""
    from daemon.service import logs

    full = logs._PARAM.sub(lambda m: f"{m.group(1)}=***",
                           logs._JWT.sub("***", logs._BEARER.sub(lambda m: f"{m.group(1)} ***", s)))
    if full != s:
        assert logs._maybe_secret(s)
    assert logs._scrub_str(s) == (full if len(s) >= 8 else s)
