"""What the control API does, without HTTP: resolve a party, hand the enforcer a manual
decision, remember ejections and idempotency keys, and show calls from memory.

Every method returns an `Answer` (status, pydantic body, headers); `server.py` only turns it
into an HTTP response. Resolution reuses `confguard eject`'s own matching
(`daemon.core.parties.resolve_target`, so phone numbers compare exactly as `eject
--address` does): first against the call as held in memory, and when the call or a
matching party is not there, against the call read over REST at ENFORCE priority (the read
is not folded into memory: the call may be outside the daemon's subscriptions).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pydantic import BaseModel

from daemon.core.parties import Selector, SelectorKind, resolve_target
from daemon.core.model import Origin
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Call, Decision, Participant
from daemon.core.timefmt import format_time
from daemon.errors import ApiError, NotFoundError
from daemon.genesys.ratelimit import Priority
from daemon.service.control.models import (FINAL_EJECTION_STATES, AmbiguousBody, CallView,
                                           Candidate, Ejection, EjectionAccepted,
                                           EjectionRequest, ErrorBody, Party, UnavailableBody)

log = structlog.get_logger(__name__)

IDEMPOTENCY_TTL = 24 * 3600.0  # seconds an Idempotency-Key is remembered, per caller
MAX_IDEMPOTENCY_KEYS = 100_000  # bound on remembered keys (oldest dropped first)
MAX_EJECTIONS = 100_000  # bound on ejections kept for GET /v1/ejections/{id}
EJECTION_TTL = 24 * 3600.0
MAX_KEY_LENGTH = 255

_SELECTOR_KIND: dict[str, SelectorKind] = {"participantId": "participant", "userId": "user",
                  "externalContactId": "external_contact", "address": "address", "name": "name"}


# ---------------------------------------------------------------- seams


class RemovalHandle(Protocol):
    """What the enforcer gives back for a manual decision: its state moves from `pending`
    to a final outcome. Times are epoch seconds."""

    @property
    def state(self) -> str: ...

    @property
    def http_status(self) -> int | None: ...

    @property
    def attempts(self) -> int: ...

    @property
    def sent_at(self) -> float | None: ...

    @property
    def confirmed_at(self) -> float | None: ...

    @property
    def error(self) -> str | None: ...

    async def wait(self) -> str: ...


class SubmitManual(Protocol):
    """`Enforcer.submit`: audits `decision` (its `origin` names the caller and the reason)
    before returning, then acts on it like a rule's decision; never raises."""

    def __call__(self, decision: Decision) -> RemovalHandle: ...


class CallSource(Protocol):
    """The in-memory calls (`daemon.core.state.CallStore`)."""

    def get(self, conversation_id: str) -> Call | None: ...


class CallReader(Protocol):
    """A REST read of one call (`GenesysClient.get_call`)."""

    async def get_call(self, conversation_id: ConversationId | str, *,
                       priority: Priority = ...) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether this daemon acts now. `acting` False: POST answers 503 with `code`
    (`not_leader`, `no_lease`, `draining`), `message` and the leader's node when known."""

    acting: bool
    code: str = "ok"
    message: str = ""
    leader: str | None = None


ALWAYS = Availability(True)


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer in the making: status, JSON body, extra headers."""

    status: int
    body: BaseModel
    headers: Mapping[str, str] = field(default_factory=dict)


def error(status: int, code: str, message: str, **headers: str) -> Answer:
    return Answer(status, ErrorBody(status=status, code=code, message=message), headers)


# ---------------------------------------------------------------- bookkeeping


@dataclass(eq=False, slots=True)
class _Ejection:
    id: str
    caller: str
    reason: str | None
    conversation_id: str
    participant_id: str
    requested_at: float
    handle: RemovalHandle


@dataclass(eq=False, slots=True)
class _KeyEntry:
    fingerprint: str
    expires: float
    answer: asyncio.Future[Answer]


def participant_dict(p: Participant) -> dict[str, Any]:
    """A stored participant in Genesys' JSON shape, for `eject`'s matching helpers."""
    out: dict[str, Any] = {"id": p.id, "name": p.name, "purpose": p.purpose, "state": p.state,
                           "address": p.address, "ani": p.ani, "dnis": p.dnis}
    if p.user_id:
        out["user"] = {"id": p.user_id}
    if p.external_contact_id:
        out["externalContact"] = {"id": p.external_contact_id}
    return out


def call_view(call: Call) -> CallView:
    def t(v: float | None) -> str | None:
        return format_time(v) if v is not None else None
    return CallView(
        conversationId=call.id, recordingState=call.recording_state,
        securePause=call.secure_pause, ended=call.is_ended,
        lastUpdate=t(call.last_update) if call.last_update else None,
        parties=[Party(id=p.id, name=p.name, purpose=p.purpose, state=p.state,
                       direction=p.direction, address=p.address, ani=p.ani, dnis=p.dnis,
                       userId=p.user_id, queueId=p.queue_id,
                       externalContactId=p.external_contact_id, attributes=dict(p.attributes),
                       connectedTime=t(p.connected_time), endTime=t(p.end_time))
                 for p in call.participants.values()])


class ControlService:
    """The control API's behaviour. `submit`: the enforcer's manual-decision entry.
    `store`: the in-memory calls. `reader`: the Genesys client (REST reads at ENFORCE
    priority). `availability`: called per POST (HA role, draining). `clock`: epoch s.
    `monotonic`: for TTLs. Must be used from one event loop."""

    def __init__(self, submit: SubmitManual, store: CallSource, reader: CallReader | None, *,
                 availability: Callable[[], Availability] = lambda: ALWAYS,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.submit = submit
        self.store = store
        self.reader = reader
        self.availability = availability
        self._clock = clock
        self._mono = monotonic
        self._ejections: OrderedDict[str, _Ejection] = OrderedDict()
        self._keys: OrderedDict[tuple[str, str], _KeyEntry] = OrderedDict()

    # ------------------------------------------------------------------ POST /v1/ejections

    async def eject(self, caller: str, request: EjectionRequest,
                    idempotency_key: str | None = None) -> Answer:
        """Resolve one live party and submit its removal. See docs/control-api.md for the answers."""
        if idempotency_key is None:
            return await self._eject(caller, request)
        key = idempotency_key.strip()
        if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
            return error(400, "bad_idempotency_key",
                         f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters")
        fingerprint = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        now = self._mono()
        self._expire_keys(now)
        entry = self._keys.get((caller, key))
        if entry is not None:
            if entry.fingerprint != fingerprint:
                return error(422, "idempotency_key_reused",
                             "this Idempotency-Key was used with a different request body in "
                             "the last 24 h; use a new key for a new request")
            # A concurrent first request with this key is still being answered: share it.
            return await asyncio.shield(entry.answer)
        entry = _KeyEntry(fingerprint, now + IDEMPOTENCY_TTL,
                          asyncio.get_running_loop().create_future())
        self._keys[(caller, key)] = entry
        while len(self._keys) > MAX_IDEMPOTENCY_KEYS:
            self._keys.popitem(last=False)
        try:
            answer = await self._eject(caller, request)
        except BaseException:
            self._keys.pop((caller, key), None)
            entry.answer.set_result(error(
                503, "retry", "the first request with this Idempotency-Key did not finish; "
                "send it again", **{"Retry-After": "1"}))
            raise
        entry.answer.set_result(answer)
        if answer.status != 202:
            # Nothing was done: a retry with the same key may be judged afresh.
            self._keys.pop((caller, key), None)
        return answer

    def _expire_keys(self, now: float) -> None:
        while self._keys:
            k, e = next(iter(self._keys.items()))
            if e.expires > now:
                break
            del self._keys[k]

    def _unavailable(self) -> Answer | None:
        av = self.availability()
        if av.acting:
            return None
        return Answer(503, UnavailableBody(status=503, code=av.code, message=av.message,
                                           leader=av.leader), {"Retry-After": "1"})

    async def _eject(self, caller: str, request: EjectionRequest) -> Answer:
        down = self._unavailable()
        if down is not None:
            return down
        cid = request.conversationId
        field_name, value = request.selector
        selector = Selector(_SELECTOR_KIND[field_name], value)
        res = None
        call = self.store.get(cid)
        if call is not None:
            res = resolve_target({"participants": [participant_dict(p) for p in
                                                   call.participants.values()]}, selector)
        if res is None or res.outcome == "none":
            fetched = await self._read(cid)
            if isinstance(fetched, Answer):
                return fetched
            res = resolve_target(fetched, selector)
            source = "rest"
        else:
            source = "memory"
        what = f"{field_name} {value!r}"
        if res.outcome == "none":
            return error(404, "no_such_party", f"no party of conversation {cid} matches {what}")
        if res.outcome == "gone":
            p = res.matches[-1]
            return error(404, "party_gone", f"participant {p.get('id')} ({what}) has already "
                         f"left conversation {cid} (state {p.get('state')}); nothing to do")
        if res.outcome == "ambiguous":
            cands = [Candidate(participantId=str(p.get("id")), name=_str(p.get("name")),
                               purpose=_str(p.get("purpose"))) for p in res.live]
            return Answer(409, AmbiguousBody(
                status=409, code="ambiguous",
                message=f"{len(cands)} live parties of conversation {cid} match {what}; "
                        f"nothing was done: name one by participantId",
                candidates=cands))
        assert res.target is not None
        # The REST read awaited: the role or the drain may have changed meanwhile.
        down = self._unavailable()
        if down is not None:
            return down
        pid = ParticipantId(str(res.target["id"]))
        now = self._clock()
        decision = Decision(
            rule=RuleName(f"control:{caller}"), action="disconnect",
            conversation_id=ConversationId(cid), participant_id=pid,
            purpose=_str(res.target.get("purpose")),
            matched={field_name: value}, severity="warning", tags=("control",),
            message=f"removal requested over the control API by {caller}"
                    + (f": {request.reason}" if request.reason else ""),
            decided_at=now, received_at=now, origin=Origin(caller, request.reason))
        handle = self.submit(decision)
        ej = _Ejection(id=str(uuid.uuid4()), caller=caller, reason=request.reason,
                       conversation_id=cid, participant_id=pid, requested_at=now, handle=handle)
        self._remember(ej)
        log.info("control_ejection", caller=caller, ejection_id=ej.id, conversation_id=cid,
                 participant_id=pid, selector=field_name, source=source, state=handle.state,
                 reason=request.reason)
        return Answer(202, EjectionAccepted(id=ej.id, state=_state(handle.state),
                                            conversationId=cid, participantId=pid))

    async def _read(self, cid: str) -> dict[str, Any] | Answer:
        if self.reader is None:
            return error(404, "no_such_call", f"conversation {cid} is not tracked")
        try:
            return await self.reader.get_call(cid, priority=Priority.ENFORCE)
        except NotFoundError:
            return error(404, "no_such_call", f"conversation {cid} was not found: the call has "
                         f"ended, the id is wrong, or it is in a division confguard cannot see")
        except ApiError as exc:
            log.warning("control_call_read_failed", conversation_id=cid, status=exc.status,
                        error=str(exc))
            return error(502, "genesys_error", f"reading conversation {cid} from Genesys "
                         f"failed (HTTP {exc.status or 'none'}); try again")

    def _remember(self, ej: _Ejection) -> None:
        self._ejections[ej.id] = ej
        cutoff = self._clock() - EJECTION_TTL
        while self._ejections:
            first = next(iter(self._ejections.values()))
            if len(self._ejections) <= MAX_EJECTIONS and first.requested_at >= cutoff:
                break
            self._ejections.popitem(last=False)

    # ------------------------------------------------------------------ GETs

    def ejection(self, caller: str, ejection_id: str) -> Answer:
        """`GET /v1/ejections/{id}`: only the caller that made it sees it."""
        ej = self._ejections.get(ejection_id)
        if ej is None or ej.caller != caller:
            return error(404, "no_such_ejection", f"no ejection {ejection_id} of caller {caller}")
        return Answer(200, ejection_body(ej))

    async def wait(self, caller: str, ejection_id: str) -> str | None:
        """The final state of an ejection (awaits it); None when unknown. For tests/bench."""
        ej = self._ejections.get(ejection_id)
        if ej is None or ej.caller != caller:
            return None
        return await ej.handle.wait()

    def call(self, conversation_id: str) -> Answer:
        """`GET /v1/calls/{conversationId}`: from memory only."""
        call = self.store.get(conversation_id)
        if call is None:
            return error(404, "no_such_call", f"conversation {conversation_id} is not tracked "
                         f"by confguard (out of scope, ended, or never seen)")
        return Answer(200, call_view(call))


def ejection_body(ej: _Ejection) -> Ejection:
    h = ej.handle
    return Ejection(id=ej.id, state=_state(h.state), conversationId=ej.conversation_id,
                    participantId=ej.participant_id, caller=ej.caller, reason=ej.reason,
                    httpStatus=h.http_status, attempts=h.attempts,
                    requestedAt=format_time(ej.requested_at),
                    sentAt=format_time(h.sent_at) if h.sent_at is not None else None,
                    confirmedAt=format_time(h.confirmed_at) if h.confirmed_at is not None else None,
                    error=h.error)


def _state(s: str) -> Any:
    # The enforcer's outcome names are the API's states; anything new reads as `unknown`.
    return s if s == "pending" or s in FINAL_EJECTION_STATES else "unknown"


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None
