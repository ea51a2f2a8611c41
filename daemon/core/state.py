"""The call store: folds conversation snapshots into `Call`s and reports what changed (sans-I/O).

Input is one conversation dict, either a notification `eventBody` (call topics) or a REST
`CallConversation`; both carry the same camelCase participant fields. Only what
`daemon.core.model.Participant` keeps is extracted, as the table `KEPT` names it (attribute,
payload key, kind: str, bool, time, or a nested reference's id; whether it is interned),
and type-checked field by field: a value of the wrong type is ignored (stored as None,
counted in `stats["fields_ignored"]`), a participant that is not an object or has no string
id is skipped (counted in `stats["participants_dropped"]`). Each such snapshot also reports
what was wrong in `CallStore.problems` (`PROBLEMS` tokens, for the `events_rejected` metric
and one log line per frame). Unknown fields are ignored. A wrong-typed value that compares
equal to the stored one (JSON 0/1 where false/true is stored) is not a change.

Ordering rules (notifications are neither ordered nor de-duplicated):

- A participant in a final state (`model.is_final_state`: disconnected, terminated) is frozen: later events never
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import compress
from operator import ne
from typing import Any, Final, Literal, cast

from daemon.core.logs import get_logger

from daemon.core.ids import ConversationId, ParticipantId
from daemon.core.model import Call, Change, ChangeSource, Participant, is_final_state
from daemon.core.timefmt import MAX_TIME_LEN as _MAX_TIME_LEN
from daemon.core.timefmt import parse_time

log = get_logger(__name__)

_MAX_ATTR_INTERN_LEN: Final = 32
_MAX_INTERN_LEN: Final = 64
_INTERN_CAP: Final = 65_536


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


# ---------------------------------------------------------------- the kept fields, by name

Kind = Literal["str", "bool", "time", "ref"]


@dataclass(frozen=True, slots=True)
class Kept:
    """One participant field the store keeps: `attr` is the `Participant` attribute, `key`
    the camelCase key in the payload (for `ref`, the nested object whose `id` is kept),
    `kind` how it is type-checked (`str`; `bool`; `time`: an ISO-8601 string, parsed into
    epoch seconds; `ref`: a non-empty string id), `shared` whether the value repeats across
    calls and is interned."""

    attr: str
    key: str
    kind: Kind
    shared: bool = False


#: Every kept participant field (besides `id` and `attributes`). References come last: the
#: signature of a participant is the raw value of each field in this order.
KEPT: Final[tuple[Kept, ...]] = (
    Kept("name", "name", "str", shared=True),
    Kept("purpose", "purpose", "str", shared=True),
    Kept("state", "state", "str", shared=True),
    Kept("direction", "direction", "str", shared=True),
    Kept("address", "address", "str"),
    Kept("ani", "ani", "str"),
    Kept("dnis", "dnis", "str", shared=True),
    Kept("flagged_reason", "flaggedReason", "str", shared=True),
    Kept("provider", "provider", "str", shared=True),
    Kept("monitored_participant_id", "monitoredParticipantId", "str"),
    Kept("coached_participant_id", "coachedParticipantId", "str"),
    Kept("barged_participant_id", "bargedParticipantId", "str"),
    Kept("disconnect_type", "disconnectType", "str", shared=True),
    Kept("held", "held", "bool"),
    Kept("muted", "muted", "bool"),
    Kept("confined", "confined", "bool"),
    Kept("recording", "recording", "bool"),
    Kept("connected_time", "connectedTime", "time"),
    Kept("end_time", "endTime", "time"),
    Kept("user_id", "user", "ref", shared=True),
    Kept("queue_id", "queue", "ref", shared=True),
    Kept("team_id", "team", "ref", shared=True),
    Kept("external_contact_id", "externalContact", "ref"),
    Kept("external_organization_id", "externalOrganization", "ref"),
)
assert all(f.kind == "ref" for f in KEPT[KEPT.index(next(f for f in KEPT if f.kind == "ref")):])

_ATTRS: Final = tuple(f.attr for f in KEPT)
_SLOT: Final = {f.attr: i for i, f in enumerate(KEPT)}  # attribute -> place in a signature
_TIMES: Final = tuple(_SLOT[f.attr] for f in KEPT if f.kind == "time")
_SIG_RANGE: Final = range(len(KEPT))

Sig = tuple[object, ...]


def _check_str(v: object) -> tuple[object, int]:
    return (v, 0) if v.__class__ is str else (None, 1)


def _check_shared(v: object) -> tuple[object, int]:
    return (_intern(v), 0) if isinstance(v, str) else (None, 1)


def _check_bool(v: object) -> tuple[object, int]:
    return (v, 0) if v is True or v is False else (None, 1)


def _check_time(v: object) -> tuple[object, int]:
    return (v, 0) if isinstance(v, str) and len(v) <= _MAX_TIME_LEN else (None, 1)


def _check_ref(v: object) -> tuple[object, int]:
    return (v, 0) if isinstance(v, str) and v else (None, 1)


def _check_shared_ref(v: object) -> tuple[object, int]:
    return (_intern(v), 0) if isinstance(v, str) and v else (None, 1)


def _checker(f: Kept) -> Callable[[object], tuple[object, int]]:
    if f.kind == "str":
        return _check_shared if f.shared else _check_str
    if f.kind == "bool":
        return _check_bool
    if f.kind == "time":
        return _check_time
    return _check_shared_ref if f.shared else _check_ref


#: Per field of KEPT: (value or None, 1 if the value was of the wrong type and is ignored).
_CHECKS: Final = tuple(_checker(f) for f in KEPT)


def _signature_function() -> Callable[[Callable[[str], object]], Sig]:
    """`_signature(get)`: the raw kept values of one participant, in KEPT order (nested
    references by their `id`), generated from KEPT as one expression (hot path: no loop, no
    call per field). The source holds only KEPT's key names."""
    items = [f"get({f.key!r})" if f.kind != "ref" else
             f"(r.get('id') if (r := get({f.key!r})).__class__ is dict else None)" for f in KEPT]
    src = "def _signature(get):\n    return (" + ", ".join(items) + ",)\n"
    scope: dict[str, Any] = {}
    exec(compile(src, "<state.KEPT>", "exec"), {"__builtins__": {"dict": dict}}, scope)  # noqa: S102
    fn: Callable[[Callable[[str], object]], Sig] = scope["_signature"]
    return fn


_signature: Final = _signature_function()


def _normalize(sig: Sig) -> tuple[Sig, int]:
    """Type-checked signature (wrong types -> None, shared strings interned) and the count
    of ignored fields."""
    out: list[object] = []
    bad = 0
    for check, v in zip(_CHECKS, sig):
        if v is None:
            out.append(None)
            continue
        value, b = check(v)
        out.append(value)
        bad += b
    return tuple(out), bad


def _normalize_from(sig: Sig, old: Sig) -> tuple[Sig, int]:
    """Like `_normalize`, checking only the values that differ from the stored (already
    normalized) signature `old`: usually one or two of them."""
    out = list(old)
    bad = 0
    for i in compress(_SIG_RANGE, map(ne, sig, old)):
        v = sig[i]
        if v is None:
            out[i] = None
            continue
        out[i], b = _CHECKS[i](v)
        bad += b
    return tuple(out), bad


def _clean_attributes(a: object) -> tuple[dict[str, str], int]:
    """Only str -> str entries; the count of dropped entries (a non-object counts as one)."""
    if a is None:
        return {}, 0
    if not isinstance(a, dict):
        return {}, 1
    intern = _intern
    clean = {k: intern(v) if len(v) <= _MAX_ATTR_INTERN_LEN else v
             for k, v in a.items() if v.__class__ is str}
    return clean, len(a) - len(clean)


def _participant_function() -> Callable[..., Participant]:
    """`_participant(pid, n, attributes, times)`: the Participant of normalized signature
    `n`, every field passed by name (`name=n[0], purpose=n[1], ...` generated from KEPT, so
    no field is placed by hand and no keyword dict is built per party); `times` are the
    parsed values of KEPT's time fields, in order."""
    args = []
    t = 0
    for i, f in enumerate(KEPT):
        if f.kind == "time":
            args.append(f"{f.attr}=times[{t}]")
            t += 1
        else:
            args.append(f"{f.attr}=n[{i}]")
    src = ("def _participant(pid, n, attributes, times):\n"
           "    return Participant(id=pid, attributes=attributes, " + ", ".join(args) + ")\n")
    scope: dict[str, Any] = {}
    exec(compile(src, "<state.KEPT>", "exec"), {"__builtins__": {}, "Participant": Participant}, scope)  # noqa: S102
    fn: Callable[..., Participant] = scope["_participant"]
    return fn


_participant: Final = _participant_function()


def _build(pid: ParticipantId, n: Sig, attributes: dict[str, str],
           old: Participant | None, old_sig: Sig | None) -> Participant:
    """The Participant of normalized signature `n`; times are parsed only when their text
    changed."""
    times: list[object] = []
    for i in _TIMES:
        if old is not None and old_sig is not None and n[i] == old_sig[i]:
            times.append(getattr(old, _ATTRS[i]))
        else:
            raw = n[i]
            times.append(parse_time(raw) if isinstance(raw, str) else None)
    return _participant(pid, n, attributes, times)


def _has_live_party(parts: list[object]) -> tuple[bool, int]:
    """Whether a snapshot lists a live party with an id; and how many participants it lists
    without a usable id."""
    live = False
    missing = 0
    for p in parts:
        if p.__class__ is dict:
            pid = p.get("id")
            state = p.get("state")
            if not (pid.__class__ is str and pid):
                missing += 1
            # A raw value may be unhashable: type-check before the set lookup.
            elif state.__class__ is not str or not is_final_state(state):
                live = True
        else:
            missing += 1
    return live, missing


def _note_queues(call: Call, p: Participant, raw: dict[str, Any]) -> bool:
    """Add the queue `p` names to `call.queue_ids` (an ACD party may name it only in its
    routing data, `conversationRoutingData.queue.id`); whether the set grew."""
    grew = False
    qid = p.queue_id
    if qid and qid not in call.queue_ids:
        call.queue_ids.add(qid)
        grew = True
    if p.purpose == "acd":
        crd = raw.get("conversationRoutingData")
        cq = crd.get("queue") if crd.__class__ is dict else None
        rq = cq.get("id") if cq.__class__ is dict else None
        if rq.__class__ is str and rq and rq not in call.queue_ids:
            call.queue_ids.add(_intern(rq))
            grew = True
    return grew


class _Entry:
    __slots__ = ("call", "sigs")

    def __init__(self, call: Call) -> None:
        self.call = call
        # Normalized signatures of the live participants only: final ones are frozen. So a
        # known participant without a signature is final, and the call is live iff any has one.
        self.sigs: dict[ParticipantId, Sig] = {}


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

#: Why a snapshot was (partly) unusable, as `CallStore.problems` reports it (metric labels).
PROBLEMS: Final = (
    "bad_conversation",  # no string id, or participants not a list: nothing applied
    "bad_participant",  # a participant that is not an object: skipped
    "participant_missing_id",  # a participant without a string id: skipped
    "bad_field",  # a kept field (or an attribute) of the wrong type: ignored, the rest applied
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
        #: What was wrong with the last snapshot `apply` saw (`PROBLEMS` tokens, each once).
        self.problems: tuple[str, ...] = ()

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
        which is counted in `stats`). `received_at` defaults to `now`. What was wrong with the
        snapshot, if anything, is in `problems` until the next `apply` (`PROBLEMS` tokens,
        each once, in the order met).

        The steps: find (or open) the call's entry; fold each participant
        (`_fold_participant`); note the queues it names; fold the call-level fields; end or
        revive the call; report the change."""
        self.problems = ()
        cid = conv.get("id")
        parts = conv.get("participants")
        if cid.__class__ is not str or not cid or parts.__class__ is not list:
            self.stats["conversations_rejected"] += 1
            self._problem("bad_conversation")
            return None
        entry = self._calls.get(cid)
        new_call = entry is None
        if entry is None:
            entry = self._open(cid, parts, now)
            if entry is None:
                return None
        call = entry.call
        changed, queues_changed = self._fold_participants(entry, parts)
        call_changed = self._fold_call_fields(conv, call) or queues_changed or new_call
        if (changed or new_call) and self._update_end(entry, cid, now):
            call_changed = True
        if new_call:
            self._calls[cid] = entry
        elif not changed and not call_changed:
            self.stats["duplicates"] += 1
            return None
        call.last_update = now
        if len(changed) > 1 and len({p.id for p in changed}) < len(changed):
            # The same id listed twice in one snapshot: report its last version once.
            parties = call.participants
            changed = list({p.id: parties[p.id] for p in changed}.values())
        return Change(call, tuple(changed), call_changed, source,
                      received_at if received_at is not None else now)

    def _open(self, cid: str, parts: list[object], now: float) -> _Entry | None:
        """A new entry for an untracked call (not stored yet), or None when the call was
        evicted and the snapshot names no live party (a late event: counted, dropped)."""
        if cid in self._evicted:
            live, missing = _has_live_party(parts)
            if missing:
                self._problem("participant_missing_id")
            if not live:
                self.stats["late_after_evict"] += 1
                return None
            del self._evicted[cid]
            self.stats["retracked_after_evict"] += 1
        return _Entry(Call(ConversationId(cid), last_update=now))

    def _fold_participants(self, entry: _Entry, parts: list[object]) -> tuple[list[Participant], bool]:
        """Fold every listed participant into `entry`: the participants that changed, in
        snapshot order, and whether the call's queue set grew. Unusable participants are
        counted and skipped."""
        call = entry.call
        # Keys are ParticipantIds (NewType of str); plain str views avoid a cast() per party.
        parties: dict[str, Participant] = call.participants  # type: ignore[assignment]
        sigs: dict[str, Sig] = entry.sigs  # type: ignore[assignment]
        changed: list[Participant] = []
        queues_changed = False
        fold = self._fold_participant
        for p in parts:
            if p.__class__ is not dict:
                self.stats["participants_dropped"] += 1
                self._problem("bad_participant")
                continue
            pid = p.get("id")
            if pid.__class__ is not str or not pid:
                self.stats["participants_dropped"] += 1
                self._problem("participant_missing_id")
                continue
            newp = fold(p, pid, parties, sigs)
            if newp is None:
                continue
            changed.append(newp)
            if _note_queues(call, newp, p):
                queues_changed = True
        return changed, queues_changed

    def _fold_participant(self, p: dict[str, Any], pid: str, parties: dict[str, Participant],
                          sigs: dict[str, Sig]) -> Participant | None:
        """Fold one participant object (with a usable id) into `parties`/`sigs`; the new
        `Participant`, or None when nothing of what is kept changed (a duplicate, a value of
        the wrong type only, or a frozen final participant)."""
        get = p.get
        old = parties.get(pid)
        # Only live participants keep a signature: known and without one means final.
        old_sig = sigs.get(pid) if old is not None else None
        if old is not None and old_sig is None:
            state = get("state")
            if state.__class__ is str and not is_final_state(state):
                self.stats["revival_blocked"] += 1
            return None
        sig = _signature(get)
        a = get("attributes")
        if old is None:
            same_attrs = False
        else:
            same_attrs = a == old.attributes if a is not None else not old.attributes
            if same_attrs and sig == old_sig:
                return None
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
            self.stats["fields_ignored"] += bad
            self._problem("bad_field")
        if same_attrs and norm == old_sig:
            return None  # differed only by ignored (wrong-typed) values
        newp = _build(cast(ParticipantId, pid) if old is None else old.id, norm, attrs, old, old_sig)
        parties[newp.id] = newp
        if newp.is_final:
            sigs.pop(newp.id, None)
        else:
            sigs[newp.id] = norm
        return newp

    def _fold_call_fields(self, conv: Mapping[str, Any], call: Call) -> bool:
        """Fold the call-level fields (`recordingState`, `securePause`; a wrong type is
        ignored and counted); whether they changed."""
        rs = conv.get("recordingState")
        if rs is not None and rs.__class__ is not str:
            self.stats["fields_ignored"] += 1
            self._problem("bad_field")
            rs = None
        sp = conv.get("securePause")
        if sp is not None and sp is not True and sp is not False:
            self.stats["fields_ignored"] += 1
            self._problem("bad_field")
            sp = None
        if rs == call.recording_state and sp == call.secure_pause:
            return False
        call.recording_state = _intern(rs) if rs is not None else None
        call.secure_pause = sp
        return True

    def _update_end(self, entry: _Entry, cid: str, now: float) -> bool:
        """End the call when no party is live, revive it when one is; whether `ended_at`
        changed. Only live parties keep a signature, so `entry.sigs` says which."""
        call = entry.call
        if entry.sigs:
            if call.ended_at is None:
                return False
            call.ended_at = None
            return True
        if call.ended_at is not None:
            return False
        call.ended_at = now
        self._ended.append((now, cid))
        return True

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
            if not p.is_final:
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

    def _problem(self, reason: str) -> None:
        if reason not in self.problems:
            self.problems += (reason,)

    def _remember(self, cid: str) -> None:
        if self.remember_evicted <= 0:
            return
        evicted = self._evicted
        evicted[cid] = None
        while len(evicted) > self.remember_evicted:
            evicted.popitem(last=False)
