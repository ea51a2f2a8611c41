"""`confguard eject --control URL --token-file FILE ...`: the removal goes through a running
daemon's control API (`POST /v1/ejections`, then `GET /v1/ejections/{id}` until a final
state) instead of this process talking to Genesys: one token, one request budget, one audit
trail, the daemon's safety valve. The exit codes are those of `eject`:

    0  disconnected, already_gone, or the party had already left (404 party_gone)
    1  several live parties match (409); nothing was done
    2  bad arguments or token file, or the daemon refused the request body (400/413/422)
    3  no such call or party (404)
    4  the daemon refused the token (401), or Genesys refused the PATCH with 403
    5  failed, suppressed (safety valve), observed (observe mode: nothing sent), standby,
       unknown; 429/502/503 from the daemon; the daemon unreachable; no outcome in time
    6  unconfirmed: the PATCH was accepted but the party was not seen gone
"""

from __future__ import annotations

import json
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx

from daemon.core.ids import is_path_id

from daemon.errors import ConfigError

EXIT_DONE, EXIT_AMBIGUOUS, EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_PERMISSION, EXIT_API, \
    EXIT_UNCONFIRMED = 0, 1, 2, 3, 4, 5, 6

#: Seconds to wait for a final state: the enforcer confirms within ~5 s and retries an
#: unconfirmed PATCH once, and a 409/429 back-off can add a few seconds more.
WAIT_SECONDS = 60.0
#: Polls of GET /v1/ejections/{id}: 0.05 s, doubling up to 1 s (well inside the default
#: 120 requests a minute per caller); a 429 waits its Retry-After.
POLL_FIRST = 0.05
POLL_INTERVAL = 1.0

_FIELD = {"participant": "participantId", "user": "userId",
          "external_contact": "externalContactId", "address": "address", "name": "name"}

_STATE_EXIT = {"disconnected": EXIT_DONE, "already_gone": EXIT_DONE,
               "unconfirmed": EXIT_UNCONFIRMED}
_STATE_TEXT = {
    "disconnected": "removed {pid} (confirmed gone)",
    "already_gone": "{pid} had already left the call; nothing more to do",
    "unconfirmed": "the removal of {pid} was accepted, but the party was not seen gone",
    "failed": "the removal of {pid} failed",
    "suppressed": "the daemon's safety valve held the removal of {pid} back; nothing was sent",
    "observed": "the daemon is in observe mode: the decision was audited, nothing was sent",
    "standby": "the daemon was not the leader when it decided: nothing was sent",
    "unknown": "the outcome of the removal of {pid} is unknown",
}


def read_token(path: str) -> str:
    """The token in `path` (surrounding whitespace ignored); ConfigError if unusable. The
    token never appears in a message."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"--token-file {path}: cannot read it: {reason}") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"--token-file {path}: expected one token (no spaces)")
    return token


def request_body(conversation: str, kind: str, value: str, reason: str | None) -> dict[str, str]:
    body = {"conversationId": conversation, _FIELD[kind]: value}
    if reason:
        body["reason"] = reason
    return body


async def eject_via_control(url: str, token: str, body: dict[str, str], *, dry_run: bool = False,
                            out: IO[str] | None = None, wait_seconds: float = WAIT_SECONDS,
                            transport: httpx.AsyncBaseTransport | None = None) -> int:
    """POST the removal to the daemon at `url` and wait for its outcome; the exit code."""
    stream = out if out is not None else sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    def fail(text: str, code: int) -> int:
        print(f"confguard: {text}", file=sys.stderr, flush=True)
        return code

    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return fail(f"--control {url!r}: expected a URL such as http://127.0.0.1:9465", EXIT_CONFIG)
    if dry_run:
        say("dry run: would send")
        say(f"  POST {base}/v1/ejections")
        say("  Authorization: Bearer ***")
        say(f"  {json.dumps(body)}")
        return EXIT_DONE
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0),
                                     transport=transport) as http:
            r = await http.post(f"{base}/v1/ejections", json=body, headers=headers)
            answer = _json(r)
            if r.status_code != 202:
                return _refused(r.status_code, answer, say, fail)
            eid, pid = str(answer.get("id")), str(answer.get("participantId"))
            if not is_path_id(eid):  # it goes into the polling URL: no `..` or `/` from a reply
                return fail(f"the daemon answered 202 with an unusable ejection id {eid[:60]!r}",
                            EXIT_API)
            say(f"removing {pid} of conversation {body['conversationId']} through the daemon "
                f"(ejection {eid}) ...")
            state, final = str(answer.get("state")), answer
            deadline = time.monotonic() + wait_seconds
            pause = POLL_FIRST
            while state == "pending" and time.monotonic() < deadline:
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(POLL_INTERVAL, pause * 2)
                g = await http.get(f"{base}/v1/ejections/{eid}", headers=headers)
                if g.status_code == 429:  # the caller's own limit: wait as told, keep waiting
                    pause = max(pause, _retry_after(g))
                    continue
                final = _json(g)
                if g.status_code != 200:
                    return _refused(g.status_code, final, say, fail)
                state = str(final.get("state"))
    except httpx.HTTPError as exc:
        return fail(f"cannot reach the daemon at {base}: {type(exc).__name__}: {exc}", EXIT_API)
    if state == "pending":
        return fail(f"no outcome for {pid} within {wait_seconds:.0f} s; "
                    f"GET {base}/v1/ejections/{eid} tells later", EXIT_API)
    text = _STATE_TEXT.get(state, "outcome {state} for {pid}").format(pid=pid, state=state)
    status = final.get("httpStatus")
    detail = f" (HTTP {status}, {final.get('attempts')} attempt(s))" if status else ""
    code = _STATE_EXIT.get(state, EXIT_API)
    if state == "failed" and status == 403:
        code = EXIT_PERMISSION
    if code == EXIT_DONE:
        say(text + detail)
        return code
    error = final.get("error")
    return fail(text + detail + (f": {error}" if error else ""), code)


def _retry_after(r: httpx.Response) -> float:
    try:
        return min(10.0, max(0.1, float(r.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


def _json(r: httpx.Response) -> dict[str, Any]:
    try:
        data = r.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _refused(status: int, err: dict[str, Any], say: Callable[[str], None],
             fail: Callable[[str, int], int]) -> int:
    code, message = str(err.get("code", "")), str(err.get("message", f"HTTP {status}"))
    if status == 404 and code == "party_gone":
        say(message)
        return EXIT_DONE
    if status == 409:
        for c in err.get("candidates") or []:
            if isinstance(c, dict):
                bits = ", ".join(str(x) for x in (c.get("purpose"), c.get("name")) if x)
                say(f"  {c.get('participantId')}" + (f" ({bits})" if bits else ""))
        return fail(f"{message}; use --participant ID", EXIT_AMBIGUOUS)
    exit_code = {400: EXIT_CONFIG, 413: EXIT_CONFIG, 422: EXIT_CONFIG, 404: EXIT_NOT_FOUND,
                 401: EXIT_PERMISSION}.get(status, EXIT_API)
    leader = err.get("leader")
    extra = f" (leader: {leader})" if leader else ""
    return fail(f"the daemon answered {status} {code}: {message}{extra}", exit_code)
