"""The call store: folds conversation snapshots into `Call`s and reports what changed (sans-I/O).

Input is one conversation dict, either a notification `eventBody` (call topics) or a REST
`CallConversation`; both carry the same camelCase participant fields. Only what
`daemon.model.Participant` keeps is extracted and type-checked, field by field: a value of
the wrong type is ignored (stored as None, counted in `stats["fields_ignored"]`), a
participant that is not an object or has no string id is skipped (counted in
`stats["participants_dropped"]`). Unknown fields are ignored. A wrong-typed value that
compares equal to the stored one (JSON 0/1 where false/true is stored) is not a change.

Ordering rules (notifications are neither ordered nor de-duplicated):

- A participant in a final state (disconnected, terminated) is frozen: later events never
  bring it back to life nor change its fields.
- A snapshot that changes nothing returns None (duplicates are cheap: the kept fields are
  compared as one tuple against the stored one).
- A call is ended (`ended_at = now`) when every participant it has is final (a call with
  no parties at all counts as ended). A new live participant revives an ended call that
  has not been evicted yet.
- Ended calls are dropped by `evict(now)` once `ended_grace` seconds have passed; their ids
  are remembered (bounded, the last `remember_evicted`) so that a late snapshot with no
  live party does not re-create them. A snapshot with a live party does re-track the call
  (missing a live call is worse than tracking a stale one).
- Calls without any update for `idle_timeout` seconds (lost end events; delivery has no
  durability) are evicted too, so memory stays bounded even when ends are missed.

Times are epoch seconds (float). Memory: participants are slots dataclasses, repeated
short strings (states, purposes, queue ids...) are shared through a bounded intern table.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from collections.abc import Mapping
from itertools import compress
from operator import ne
from typing import Any, Final, cast

from daemon.core.logs import get_logger

from daemon.core.ids import ConversationId, ParticipantId
from daemon.core.model import FINAL_STATES, Call, Change, ChangeSource, Participant
from daemon.core.timefmt import MAX_TIME_LEN as _MAX_TIME_LEN
from daemon.core.timefmt import parse_time

log = get_logger(__name__)

# Keys read straight off a participant, in the order of the signature tuple.
_KEYS: Final = (
    "name", "purpose", "state", "direction", "address", "ani", "dnis", "flaggedReason",
    "provider", "monitoredParticipantId", "coachedParticipantId", "bargedParticipantId",
    "disconnectType",  # 0..12: strings
    "held", "muted", "confined", "recording",  # 13..16: booleans
    "connectedTime", "endTime",  # 17, 18: ISO-8601 strings (kept raw in the signature)
)
# 19..23 are the ids of the nested references user, queue, team, externalContact,
# externalOrganization.
_N_STR: Final = 13
_BOOL_IDX: Final = (13, 14, 15, 16)
_CT: Final = 17
_ET: Final = 18
_REF_IDX: Final = (19, 20, 21, 22, 23)
# Shared: names, enum-like fields, dnis, and user/queue/team ids repeat across many calls.
_INTERNED_IDX: Final = (0, 1, 2, 3, 6, 7, 8, 12, 19, 20, 21)
_MAX_ATTR_INTERN_LEN: Final = 32

_MAX_INTERN_LEN: Final = 64
_INTERN_CAP: Final = 65_536

_FINAL: Final = FINAL_STATES


class _Intern:
    """A bounded string-sharing table (sys.intern would grow without bound)."""

    __slots__ = ("_table", "cap")

    def __init__(self, cap: int) -> None:
        self._table: dict[str, str] = {}
        self.cap = cap

    def __call__(self, s: str) -> str:
        table = self._table
        got = table.get(s)
        if got is not None:
            return got
        if len(s) > _MAX_INTERN_LEN:
            return s
        if len(table) >= self.cap:
            # Dropping the table only loses sharing, never correctness.
            table.clear()
        table[s] = s
        return s

    def __len__(self) -> int:
        return len(self._table)


_intern: Final = _Intern(_INTERN_CAP)

def _normalize(sig: tuple[Any, ...]) -> tuple[tuple[Any, ...], int]:
    """Type-checked signature (wrong types -> None, shared strings) and the count of ignored fields."""
    out = list(sig)
    bad = 0
    for i in range(_N_STR):
        v = out[i]
        if v is not None and v.__class__ is not str:
            out[i] = None
            bad += 1
    for i in _BOOL_IDX:
        v = out[i]
        if v is not None and v is not True and v is not False:
            out[i] = None
            bad += 1
    for i in (_CT, _ET):
        v = out[i]
        if v is not None and (v.__class__ is not str or len(v) > _MAX_TIME_LEN):
            out[i] = None
            bad += 1
    for i in _REF_IDX:
        v = out[i]
        if v is not None and (v.__class__ is not str or not v):
            out[i] = None
            bad += 1
    for i in _INTERNED_IDX:
        v = out[i]
        if v is not None:
            out[i] = _intern(v)
    return tuple(out), bad


_SIG_LEN: Final = len(_KEYS) + len(_REF_IDX)
_SIG_RANGE: Final = range(_SIG_LEN)
_INTERNED: Final = frozenset(_INTERNED_IDX)


def _valid(i: int, v: Any) -> tuple[Any, int]:
    """One raw signature value at index `i`, type-checked: (value or None, 1 if ignored)."""
    if v is None:
        return None, 0
    if i < _N_STR or i >= len(_KEYS):  # strings and reference ids
        if v.__class__ is not str or (not v and i >= len(_KEYS)):
            return None, 1
    elif i < _CT:  # booleans
        return (v, 0) if v is True or v is False else (None, 1)
    elif v.__class__ is not str or len(v) > _MAX_TIME_LEN:  # times
        return None, 1
    return (_intern(v) if i in _INTERNED else v), 0


def _normalize_from(sig: tuple[Any, ...], old: tuple[Any, ...]) -> tuple[tuple[Any, ...], int]:
    """Like `_normalize`, checking only the values that differ from the stored (already
    normalized) signature `old`: usually one or two of them."""
    out = list(old)
    bad = 0
    for i in compress(_SIG_RANGE, map(ne, sig, old)):
        out[i], b = _valid(i, sig[i])
        bad += b
    return tuple(out), bad


def _clean_attributes(a: object) -> tuple[dict[str, str], int]:
    """Only str -> str entries; the count of dropped entries (a non-object counts as one)."""
    if a is None:
        return {}, 0
    if a.__class__ is not dict:
        return {}, 1
    items: dict[str, Any] = a
    intern = _intern
    clean = {k: intern(v) if len(v) <= _MAX_ATTR_INTERN_LEN else v
             for k, v in items.items() if v.__class__ is str}
    return clean, len(items) - len(clean)


def _build(pid: ParticipantId, n: tuple[Any, ...], attributes: dict[str, str],
           old: Participant | None, old_sig: tuple[Any, ...] | None) -> Participant:
    if old is not None and old_sig is not None and n[_CT] == old_sig[_CT]:
        ct = old.connected_time
    else:
        ct = parse_time(n[_CT]) if n[_CT] is not None else None
    if old is not None and old_sig is not None and n[_ET] == old_sig[_ET]:
        et = old.end_time
    else:
        et = parse_time(n[_ET]) if n[_ET] is not None else None
    return Participant(
        pid, n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[19], n[20], n[21], n[22], n[23],
        n[7], n[13], n[14], n[15], n[16], n[8], n[9], n[10], n[11], n[12], ct, et, attributes,
    )


def _has_live_party(parts: list[Any]) -> bool:
    for p in parts:
        if p.__class__ is dict:
            pid = p.get("id")
            state = p.get("state")
            # A raw value may be unhashable: type-check before the set lookup.
            if pid.__class__ is str and pid and (state.__class__ is not str or state not in _FINAL):
                return True
    return False


class _Entry:
    __slots__ = ("call", "sigs")

    def __init__(self, call: Call) -> None:
        self.call = call
        # Normalized signatures of the live participants only: final ones are frozen.
        self.sigs: dict[ParticipantId, tuple[Any, ...]] = {}


STAT_KEYS: Final = (
    "conversations_rejected",  # no string id, or participants not a list
    "participants_dropped",  # participant not an object, or without a string id
    "fields_ignored",  # a kept field of the wrong type (per field, per change)
    "duplicates",  # snapshots that changed nothing
    "revival_blocked",  # a non-final state for a participant already final
    "late_after_evict",  # snapshots for an evicted call with no live party
    "retracked_after_evict",  # snapshots for an evicted call with a live party
    "evicted",  # ended calls dropped after the grace
    "evicted_idle",  # calls dropped after idle_timeout without updates
)


class CallStore:
    """Calls by conversation id, as last seen. See the module docstring for the rules.

    `ended_grace` (s): how long an ended call stays readable before `evict` drops it.
    `remember_evicted`: how many evicted ids are remembered against late events.
    `idle_timeout` (s, or None to disable): evict calls not updated for that long.
    `stats`: counters (keys in `STAT_KEYS`) for the metrics layer.
    """

    def __init__(self, *, ended_grace: float = 30.0, remember_evicted: int = 100_000,
                 idle_timeout: float | None = 86_400.0) -> None:
        self.ended_grace = ended_grace
        self.remember_evicted = max(0, remember_evicted)
        self.idle_timeout = idle_timeout
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._calls: dict[str, _Entry] = {}
        # (ended_at, id) in end order; stale pairs (revived / re-ended calls) are skipped lazily.
        self._ended: deque[tuple[float, str]] = deque()
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._next_idle_scan: float | None = None

    # -- reading ---------------------------------------------------------------------------

    def get(self, conversation_id: str) -> Call | None:
        entry = self._calls.get(conversation_id)
        return entry.call if entry is not None else None

    def tracked_ids(self) -> list[ConversationId]:
        return [ConversationId(c) for c in self._calls]

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._calls

    def was_evicted(self, conversation_id: str) -> bool:
        """The id is among the remembered evicted calls."""
        return conversation_id in self._evicted

    @property
    def remembered_evicted(self) -> int:
        """How many evicted ids are remembered (at most `remember_evicted`)."""
        return len(self._evicted)

    @property
    def pending_ended(self) -> int:
        """Entries waiting in the end-order queue (ended calls within the grace, plus stale ones)."""
        return len(self._ended)

    # -- writing ---------------------------------------------------------------------------

    def apply(self, conv: Mapping[str, Any], now: float, *, received_at: float | None = None,
              source: ChangeSource = "event") -> Change | None:
        """Fold one conversation snapshot in. None: nothing changed (or the input is unusable,
        which is counted in `stats`). `received_at` defaults to `now`."""
        stats = self.stats
        cid = conv.get("id")
        parts = conv.get("participants")
        if cid.__class__ is not str or not cid or parts.__class__ is not list:
            stats["conversations_rejected"] += 1
            return None
        entry = self._calls.get(cid)
        new_call = entry is None
        if entry is None:
            if cid in self._evicted:
                if not _has_live_party(parts):
                    stats["late_after_evict"] += 1
                    return None
                del self._evicted[cid]
                stats["retracked_after_evict"] += 1
            entry = _Entry(Call(ConversationId(cid), last_update=now))
        call = entry.call
        # Keys are ParticipantIds (NewType of str); plain str views avoid a cast() per party.
        parties: dict[str, Participant] = call.participants  # type: ignore[assignment]
        sigs: dict[str, tuple[Any, ...]] = entry.sigs  # type: ignore[assignment]
        changed: list[Participant] = []
        call_changed = new_call
        final = _FINAL
        keys = _KEYS
        dict_ = dict
        for p in parts:
            if p.__class__ is not dict_:
                stats["participants_dropped"] += 1
                continue
            get = p.get
            pid = get("id")
            if pid.__class__ is not str or not pid:
                stats["participants_dropped"] += 1
                continue
            old = parties.get(pid)
            if old is not None and old.state in final:
                state = get("state")
                if state.__class__ is str and state not in final:
                    stats["revival_blocked"] += 1
                continue
            # The signature, inlined (hot path): raw kept fields plus nested reference ids.
            u = get("user")
            q = get("queue")
            t = get("team")
            ec = get("externalContact")
            eo = get("externalOrganization")
            sig = tuple(map(get, keys)) + (
                u.get("id") if u.__class__ is dict_ else None,
                q.get("id") if q.__class__ is dict_ else None,
                t.get("id") if t.__class__ is dict_ else None,
                ec.get("id") if ec.__class__ is dict_ else None,
                eo.get("id") if eo.__class__ is dict_ else None,
            )
            a = get("attributes")
            if old is not None:
                old_sig = sigs.get(pid)
                same_attrs = a == old.attributes if a is not None else not old.attributes
                if same_attrs and sig == old_sig:
                    continue
            else:
                old_sig = None
                same_attrs = False
            norm, bad = _normalize(sig) if old_sig is None else _normalize_from(sig, old_sig)
            if same_attrs:
                attrs = old.attributes  # type: ignore[union-attr]
            else:
                attrs, bad_attrs = _clean_attributes(a)
                bad += bad_attrs
                if old is not None and attrs == old.attributes:
                    attrs = old.attributes
                    same_attrs = True
            if bad:
                stats["fields_ignored"] += bad
            if same_attrs and norm == old_sig:
                continue  # differed only by ignored (wrong-typed) values
            newp = _build(cast(ParticipantId, pid) if old is None else old.id,
                          norm, attrs, old, old_sig)
            parties[newp.id] = newp
            if newp.state in final:
                sigs.pop(newp.id, None)
            else:
                sigs[newp.id] = norm
            changed.append(newp)
            qid = newp.queue_id
            if qid and qid not in call.queue_ids:
                call.queue_ids.add(qid)
                call_changed = True
            if newp.purpose == "acd":
                # An ACD party may name its queue only in its routing data.
                crd = get("conversationRoutingData")
                cq = crd.get("queue") if crd.__class__ is dict_ else None
                rq = cq.get("id") if cq.__class__ is dict_ else None
                if rq.__class__ is str and rq and rq not in call.queue_ids:
                    call.queue_ids.add(_intern(rq))
                    call_changed = True

        rs = conv.get("recordingState")
        if rs is not None and rs.__class__ is not str:
            stats["fields_ignored"] += 1
            rs = None
        sp = conv.get("securePause")
        if sp is not None and sp is not True and sp is not False:
            stats["fields_ignored"] += 1
            sp = None
        if rs != call.recording_state or sp != call.secure_pause:
            call.recording_state = _intern(rs) if rs is not None else None
            call.secure_pause = sp
            call_changed = True

        if changed or new_call:
            live = False
            for party in parties.values():
                if party.state not in _FINAL:
                    live = True
                    break
            if live:
                if call.ended_at is not None:
                    call.ended_at = None
                    call_changed = True
            elif call.ended_at is None:
                call.ended_at = now
                self._ended.append((now, cid))
                call_changed = True

        if new_call:
            self._calls[cid] = entry
        elif not changed and not call_changed:
            stats["duplicates"] += 1
            return None
        call.last_update = now
        if len(changed) > 1 and len({p.id for p in changed}) < len(changed):
            # The same id listed twice in one snapshot: report its last version once.
            changed = list({p.id: parties[p.id] for p in changed}.values())
        return Change(call, tuple(changed), call_changed, source,
                      received_at if received_at is not None else now)

    def mark_gone(self, conversation_id: str, now: float) -> Change | None:
        """REST answered 404 for this call: every live party becomes final ("disconnected",
        `end_time` = now when unknown) and the call ends. None when the call is not tracked
        or was already entirely final and ended."""
        entry = self._calls.get(conversation_id)
        if entry is None:
            return None
        call = entry.call
        parties = call.participants
        changed: list[Participant] = []
        for pid, p in list(parties.items()):
            if p.state not in _FINAL:
                gone = dataclasses.replace(
                    p, state="disconnected",
                    end_time=p.end_time if p.end_time is not None else now)
                parties[pid] = gone
                changed.append(gone)
        entry.sigs.clear()
        call_changed = False
        if call.ended_at is None:
            call.ended_at = now
            self._ended.append((now, conversation_id))
            call_changed = True
        if not changed and not call_changed:
            return None
        call.last_update = now
        return Change(call, tuple(changed), call_changed, "resync", now)

    def evict(self, now: float) -> list[ConversationId]:
        """Drop ended calls older than the grace (and idle ones); return their ids.

        O(1) when nothing is due: ended calls wait in end order; the idle scan runs at
        most every `idle_timeout / 10` seconds (at least 60 s apart)."""
        out: list[ConversationId] = []
        ended = self._ended
        if ended:
            limit = now - self.ended_grace
            calls = self._calls
            while ended and ended[0][0] <= limit:
                t, cid = ended.popleft()
                entry = calls.get(cid)
                if entry is None or entry.call.ended_at != t:
                    continue  # revived, re-ended later, or already gone
                del calls[cid]
                self._remember(cid)
                out.append(ConversationId(cid))
            self.stats["evicted"] += len(out)
        idle = self.idle_timeout
        if idle is not None:
            if self._next_idle_scan is None:
                self._next_idle_scan = now + max(60.0, idle / 10)
            elif now >= self._next_idle_scan:
                self._next_idle_scan = now + max(60.0, idle / 10)
                limit = now - idle
                stale = [cid for cid, e in self._calls.items()
                         if e.call.last_update <= limit and e.call.ended_at is None]
                for cid in stale:
                    del self._calls[cid]
                    self._remember(cid)
                    out.append(ConversationId(cid))
                if stale:
                    self.stats["evicted_idle"] += len(stale)
                    log.warning("calls_evicted_idle", count=len(stale), idle_seconds=idle)
        return out

    def _remember(self, cid: str) -> None:
        if self.remember_evicted <= 0:
            return
        evicted = self._evicted
        evicted[cid] = None
        while len(evicted) > self.remember_evicted:
            evicted.popitem(last=False)
