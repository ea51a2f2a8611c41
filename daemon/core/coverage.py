"""Coverage: which live calls the daemon holds current state for, and in which order to
read the others (sans-I/O: ids, classes and epoch seconds in, plain data out).

A call is *read* once its whole conversation reached the engine after it last became
stale: a REST read, or any event (every call event carries the whole conversation, so a
call's first event judges it at once, read or not). A call is *unread* from the moment a
resync lists it as needing a read (start-up: everything analytics lists; a gap: every
live call) until then. `Coverage` keeps those books for `/healthz`, the metrics and the
`STATUS=` line; `read_order` is the order resync and reconciliation read in.

Order (`read_order`): each call has a class (`CONFERENCE` 0: 3+ live parties; `OUTSIDE` 1:
a live customer or external party; `OTHER` 2) and `since`, from when it has waited
(resync: since it became unread; reconciliation orders by its last event or read the same
way, `daemon.genesys.reconcile`). Calls are read by `since + class x age_step`
ascending: conferences before outside calls before the rest when they became stale
together (a gap makes every call stale at once: strict class order), but a call that has
waited `age_step` seconds longer than one of a better class goes first, so no class waits
forever behind a stream of fresher conferences (ageing). Ties: more parties first, then
the order listed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from daemon.core.ids import ConversationId
from daemon.core.model import Call

OUTSIDE_PURPOSES = frozenset({"customer", "external"})
"""Participant purposes of a party from outside the contact centre."""

DEFAULT_AGE_STEP = 300.0
"""Seconds of waiting that make up one class of `read_order` (5 min)."""


class CallClass(IntEnum):
    """How likely a call is to break a rule, as a sort key (lower first)."""

    CONFERENCE = 0
    OUTSIDE = 1
    OTHER = 2


def call_class(call: Call) -> CallClass:
    """The class of a tracked call: a conference (3+ connected parties), a call with a live
    customer or external party, or the rest."""
    if call.connected_parties >= 3:
        return CallClass.CONFERENCE
    if any(p.is_live and p.purpose in OUTSIDE_PURPOSES for p in call.participants.values()):
        return CallClass.OUTSIDE
    return CallClass.OTHER


@dataclass(frozen=True, slots=True)
class Candidate:
    """One call to order. `since`: epoch seconds from when it has waited;
    `parties`: live parties as far as known (analytics or the store)."""

    id: ConversationId
    klass: CallClass
    since: float = 0.0
    parties: int = 0


def read_order(candidates: Sequence[Candidate], *,
               age_step: float = DEFAULT_AGE_STEP) -> list[ConversationId]:
    """The ids of `candidates` in reading order (see the module docstring). `age_step` is
    seconds (> 0). Each id is returned once (its first candidate wins)."""
    if age_step <= 0:
        raise ValueError("age_step must be positive")
    seen: set[ConversationId] = set()
    keyed: list[tuple[float, int, int, ConversationId]] = []
    for i, c in enumerate(candidates):
        if c.id in seen:
            continue
        seen.add(c.id)
        keyed.append((c.since + int(c.klass) * age_step, -c.parties, i, c.id))
    keyed.sort()
    return [cid for *_, cid in keyed]


@dataclass(frozen=True, slots=True)
class CoverageSnapshot:
    """What `/healthz` shows under `coverage` (and the metrics export).

    `calls_known`: live calls the daemon knows of (listed by a resync, or seen in an event);
    `calls_read`: of those, the ones whose current state it holds; `conferences_known` and
    `conferences_unread`: the same for conferences; `oldest_unread_seconds`: how long the
    call unread the longest has been unread (0 when every known call is read);
    `oldest_conference_unread_seconds`: the same among conferences (the alert's input)."""

    calls_known: int
    calls_read: int
    conferences_known: int
    conferences_unread: int
    oldest_unread_seconds: float
    oldest_conference_unread_seconds: float = 0.0

    @property
    def calls_unread(self) -> int:
        return self.calls_known - self.calls_read

    def as_dict(self) -> dict[str, int | float]:
        """The `/healthz` `coverage` object."""
        return {"calls_known": self.calls_known, "calls_read": self.calls_read,
                "conferences_unread": self.conferences_unread,
                "oldest_unread_seconds": round(self.oldest_unread_seconds, 1)}

    def status_line(self) -> str:
        """The systemd `STATUS=` progress text: `resync 240/1500 calls read, 300/300
        conferences`."""
        conf_read = self.conferences_known - self.conferences_unread
        return (f"resync {self.calls_read}/{self.calls_known} calls read, "
                f"{conf_read}/{self.conferences_known} conferences")


class Coverage:
    """The books of which live calls are read (see the module docstring). Times are epoch
    seconds. Never raises on unknown ids."""

    def __init__(self) -> None:
        self._read: dict[ConversationId, float] = {}  # id -> when last seen whole
        self._unread: dict[ConversationId, float] = {}  # id -> since when unread
        self._conferences: set[ConversationId] = set()

    def stale(self, calls: Iterable[tuple[ConversationId, bool]], since: float) -> None:
        """A resync listed `calls` ((id, is a conference) pairs) as needing a read because
        of something at `since` (its start). A call already unread keeps its earlier time; a
        call read (or seen in an event) after `since` stays read."""
        for cid, conference in calls:
            if conference:
                self._conferences.add(cid)
            if cid in self._unread or self._read.get(cid, -math.inf) >= since:
                continue
            self._read.pop(cid, None)
            self._unread[cid] = since

    def seen(self, cid: ConversationId, at: float, *, conference: bool | None = None,
             ended: bool = False) -> None:
        """The whole conversation `cid` reached the engine at `at` (an event or a read).
        `conference`: its current class, when known; `ended`: the call is over (it leaves
        the books)."""
        if ended:
            self.gone(cid)
            return
        if conference is True:
            self._conferences.add(cid)
        elif conference is False:
            self._conferences.discard(cid)
        since = self._unread.get(cid)
        if since is not None and at < since:
            return  # older than what made it stale
        self._unread.pop(cid, None)
        self._read[cid] = at

    def gone(self, cid: ConversationId) -> None:
        """The call ended, or REST says it no longer exists."""
        self._read.pop(cid, None)
        self._unread.pop(cid, None)
        self._conferences.discard(cid)

    def is_unread(self, cid: ConversationId) -> bool:
        return cid in self._unread

    def unread_since(self, cid: ConversationId) -> float | None:
        """Since when `cid` has been unread (epoch s), or None when it is not."""
        return self._unread.get(cid)

    def snapshot(self, now: float) -> CoverageSnapshot:
        oldest = min(self._unread.values(), default=math.inf)
        conf_since = [self._unread[c] for c in self._conferences if c in self._unread]
        oldest_conf = min(conf_since, default=math.inf)
        return CoverageSnapshot(
            calls_known=len(self._read) + len(self._unread), calls_read=len(self._read),
            conferences_known=len(self._conferences), conferences_unread=len(conf_since),
            oldest_unread_seconds=0.0 if oldest == math.inf else max(0.0, now - oldest),
            oldest_conference_unread_seconds=(0.0 if oldest_conf == math.inf
                                              else max(0.0, now - oldest_conf)))
