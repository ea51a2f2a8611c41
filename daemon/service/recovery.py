"""Loose ends: decisions whose removal outcome was never written, closed on start-up or
take-over (docs/ha.md, "What each failure does").

A process killed between a PATCH and its answer leaves a `decision` record (enforce mode,
action disconnect) with no `outcome` record after it: the trail cannot show whether the
PATCH was sent. On start-up (this host's own trail) and on an HA take-over (the old
leader's rows in the shared decisions table) each such decision is closed: its call is
re-read over REST at ENFORCE priority and one `outcome` record completes the trail:

- the party is final and left with `disconnectType: client` (how Genesys reports a party
  removed through the API, which is what our PATCH does) -> `disconnected`;
- the party is final for another reason, or the call is gone (404) -> `already_gone`;
- the party is still connected, or the call cannot be read -> `unknown` (a live party that
  still matches a rule is judged again by the running daemon and acted on afresh).

Every closing record says why in `error`, carries `closed_on` (`startup` or `takeover`)
and, for another node's decision, `closes: {node, epoch}`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from daemon.core.ids import ConversationId, ParticipantId, RuleName

from daemon.core.model import is_final_state
from daemon.service.audit import rotated_files

log = structlog.get_logger(__name__)

__all__ = ["Unfinished", "unfinished_in_audit", "judge_unfinished", "close_unfinished"]

SCAN_LIMIT_BYTES = 256 * 1024 * 1024  # the live file and the newest rotated one, at most
MAX_UNFINISHED = 1000


@dataclass(frozen=True, slots=True)
class Unfinished:
    """One decision without an outcome. `node`/`epoch` are set for another node's row."""

    rule: RuleName
    conversation_id: ConversationId
    participant_id: ParticipantId
    node: str | None = None
    epoch: int | None = None
    row_id: int | None = None


def _audit_files(path: Path) -> list[Path]:
    """The newest rotated file (if any) and the live file, oldest first."""
    files = rotated_files(path)[-1:]
    if path.exists():
        files.append(path)
    return files


def unfinished_in_audit(path: Path) -> list[Unfinished]:
    """Enforce-mode disconnect decisions in the audit at `path` (live file and the newest
    rotated one) that no later outcome record of the same rule and party closes. Bounded:
    at most MAX_UNFINISHED, newest kept. Unreadable lines are skipped (`audit verify`
    reports them; the daemon refuses to start on a damaged last record anyway)."""
    pending: dict[tuple[str, str, str], int] = {}
    read = 0
    for f in _audit_files(path):
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                if read + size > SCAN_LIMIT_BYTES:
                    fh.seek(max(0, size - (SCAN_LIMIT_BYTES - read)))
                    fh.readline()  # skip the partial line
                for raw in fh:
                    if b'"type":"decision"' not in raw and b'"type":"outcome"' not in raw:
                        continue
                    try:
                        rec = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        continue
                    if not isinstance(rec, dict):
                        continue
                    key = (str(rec.get("rule")), str(rec.get("conversation_id")),
                           str(rec.get("participant_id")))
                    if rec.get("type") == "decision":
                        if rec.get("action") == "disconnect" and rec.get("mode") == "enforce":
                            pending[key] = pending.get(key, 0) + 1
                    elif rec.get("type") == "outcome" and key in pending:
                        pending[key] -= 1
                        if pending[key] <= 0:
                            del pending[key]
            read += size
        except OSError as exc:
            log.warning("recovery_audit_unreadable", path=str(f), error=exc.strerror or str(exc))
    out = [Unfinished(RuleName(rule), ConversationId(cid), ParticipantId(pid))
           for (rule, cid, pid), n in pending.items() for _ in range(n)]
    return out[-MAX_UNFINISHED:]


def judge_unfinished(call: Mapping[str, Any] | None, participant_id: str) -> tuple[str, str]:
    """(outcome, reason) for an unfinished decision, from the call as re-read now (None:
    404, the call no longer exists)."""
    if call is None:
        return "already_gone", "the call no longer exists (404 on re-read)"
    parts = call.get("participants")
    if not isinstance(parts, list):
        return "unknown", "the re-read call has no participant list; cannot tell"
    for p in parts:
        if isinstance(p, Mapping) and p.get("id") == participant_id:
            state = p.get("state")
            if is_final_state(state):
                if p.get("disconnectType") == "client":
                    return "disconnected", ("the party left with disconnectType client, as a "
                                            "removal through the API does")
                return "already_gone", (f"the party left (disconnectType "
                                        f"{p.get('disconnectType')!r}), not by an API removal")
            return "unknown", (f"the party is still {state!r}: the PATCH, if sent, did not take "
                               f"effect; it is judged again now")
    return "already_gone", "the party is no longer on the call"


async def close_unfinished(items: Iterable[Unfinished], *,
                           read_call: Callable[[str], Awaitable[Mapping[str, Any] | None]],
                           write: Callable[[dict[str, Any]], Any], closed_on: str,
                           on_closed: Callable[[Unfinished, str], Awaitable[None]] | None = None) -> int:
    """Re-read each item's call (once per call) and write its closing outcome record.
    `read_call(cid)` returns the call, None for 404, and raises for any other failure (the
    item is then closed `unknown`). Returns how many were closed."""
    cache: dict[str, Mapping[str, Any] | None | BaseException] = {}
    closed = 0
    for item in items:
        if item.conversation_id not in cache:
            try:
                cache[item.conversation_id] = await read_call(item.conversation_id)
            except Exception as exc:  # noqa: BLE001 - any failure: the outcome stays unknown
                cache[item.conversation_id] = exc
        got = cache[item.conversation_id]
        if isinstance(got, BaseException):
            outcome, reason = "unknown", f"the call could not be re-read ({type(got).__name__}: {got})"
        else:
            outcome, reason = judge_unfinished(got, item.participant_id)
        whose = (f" of node {item.node} (epoch {item.epoch})" if item.node is not None else "")
        record: dict[str, Any] = {
            "type": "outcome", "rule": item.rule, "conversation_id": item.conversation_id,
            "participant_id": item.participant_id, "action": "disconnect", "outcome": outcome,
            "http_status": None, "attempts": 0, "event_to_request_ms": None,
            "error": f"closed on {closed_on}: the outcome of this decision{whose} was never "
                     f"written (the process ended between the PATCH and its answer?); {reason}",
            "closed_on": closed_on,
        }
        if item.node is not None:
            record["closes"] = {"node": item.node, "epoch": item.epoch}
        try:
            write(record)
        except Exception as exc:  # noqa: BLE001 - logged; the next start-up tries again
            log.error("recovery_close_failed", conversation_id=item.conversation_id,
                      error=f"{type(exc).__name__}: {exc}")
            continue
        closed += 1
        log.warning("unfinished_decision_closed", rule=item.rule, conversation_id=item.conversation_id,
                    participant_id=item.participant_id, outcome=outcome, closed_on=closed_on,
                    node=item.node, epoch=item.epoch)
        if on_closed is not None:
            try:
                await on_closed(item, outcome)
            except Exception as exc:  # noqa: BLE001
                log.warning("recovery_row_close_failed", error=f"{type(exc).__name__}: {exc}")
    return closed
