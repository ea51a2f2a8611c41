"""The seam between the control API and the enforcer: `SubmitManual` implementations.

`TapSubmitter` works with `daemon.service.enforcer.Enforcer` as it is: it hands the
manual decision to `Enforcer.submit` (the same path as a rule's decision: audit record
before the PATCH, one action in flight per party, once per party, confirmation,
already_gone, retries, safety valve, observe mode) and follows its outcome by watching
the enforcer's audit writes and PATCH sends through thin wrappers around the enforcer's
`audit` and `client`. It is replaced by the enforcer's own manual-decision handle once
that exists; nothing outside this module depends on how the outcome is learnt.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from daemon.core.ids import ConversationId, ParticipantId
from daemon.core.model import Decision
from daemon.service.control.models import FINAL_EJECTION_STATES

Key = tuple[str, str, str]  # (rule, conversation id, participant id)


class TapHandle:
    """A manual decision's progress: `pending`, then the enforcer's final outcome."""

    def __init__(self) -> None:
        self.state = "pending"
        self.http_status: int | None = None
        self.attempts = 0
        self.sent_at: float | None = None
        self.confirmed_at: float | None = None
        self.error: str | None = None
        self._done = asyncio.Event()

    def _finish(self, state: str, *, http_status: int | None, attempts: int,
                error: str | None, sent_at: float | None, now: float) -> None:
        self.state = state if state in FINAL_EJECTION_STATES else "unknown"
        self.http_status = http_status
        self.attempts = attempts
        self.error = error
        self.sent_at = sent_at
        if state == "disconnected":
            self.confirmed_at = now
        self._done.set()

    async def wait(self) -> str:
        """The final state (waits for it)."""
        await self._done.wait()
        return self.state


class _AuditTap:
    def __init__(self, inner: Any, owner: TapSubmitter) -> None:
        self.inner = inner
        self.owner = owner

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            out: dict[str, Any] = self.inner.write(record)
        except Exception:
            if record.get("type") == "decision":
                self.owner._decision_lost(record)
            raise
        if record.get("type") == "outcome":
            self.owner._outcome(record)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _ClientTap:
    def __init__(self, inner: Any, owner: TapSubmitter) -> None:
        self.inner = inner
        self.owner = owner

    async def disconnect_participant(self, conversation_id: ConversationId | str,
                                     participant_id: ParticipantId | str, *,
                                     on_send: Callable[[], None] | None = None,
                                     **kw: Any) -> object:
        key = (str(conversation_id), str(participant_id))

        def sending() -> None:
            self.owner._sent.setdefault(key, self.owner._clock())
            if on_send is not None:
                on_send()
        return await self.inner.disconnect_participant(conversation_id, participant_id,
                                                       on_send=sending, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TapSubmitter:
    """`SubmitManual` over an existing `Enforcer` (see the module docstring)."""

    def __init__(self, enforcer: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.enforcer = enforcer
        self._clock = clock
        self._pending: dict[Key, deque[TapHandle]] = {}
        self._sent: dict[tuple[str, str], float] = {}
        enforcer.audit = _AuditTap(enforcer.audit, self)
        enforcer.client = _ClientTap(enforcer.client, self)

    def __call__(self, decision: Decision, *, caller: str, reason: str | None) -> TapHandle:
        handle = TapHandle()
        key = (decision.rule, decision.conversation_id, decision.participant_id)
        self._pending.setdefault(key, deque()).append(handle)
        self.enforcer.submit(decision)
        return handle

    def _pop(self, key: Key) -> TapHandle | None:
        q = self._pending.get(key)
        if not q:
            return None
        handle = q.popleft()
        if not q:
            del self._pending[key]
        return handle

    def _outcome(self, record: dict[str, Any]) -> None:
        key = (str(record.get("rule")), str(record.get("conversation_id")),
               str(record.get("participant_id")))
        if key not in self._pending:
            return
        error = record.get("error")
        outcome = str(record.get("outcome"))
        if outcome == "unconfirmed" and isinstance(error, str) and "once more" in error:
            return  # the enforcer retries the PATCH once: not final yet
        handle = self._pop(key)
        if handle is None:
            return
        sent = self._sent.get((key[1], key[2]))
        if not self._pending.get(key):
            self._sent.pop((key[1], key[2]), None)
        attempts = record.get("attempts")
        status = record.get("http_status")
        handle._finish(outcome, http_status=status if isinstance(status, int) else None,
                       attempts=attempts if isinstance(attempts, int) else 0,
                       error=error if isinstance(error, str) else None,
                       sent_at=sent, now=self._clock())

    def _decision_lost(self, record: dict[str, Any]) -> None:
        key = (str(record.get("rule")), str(record.get("conversation_id")),
               str(record.get("participant_id")))
        handle = self._pop(key)
        if handle is not None:
            handle._finish("failed", http_status=None, attempts=0, sent_at=None,
                           error="the audit record could not be written; nothing was sent",
                           now=self._clock())
