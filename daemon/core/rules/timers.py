"""Rule timers: when `hold_for` is served or a time condition (`connected_seconds`) may
change, with no event needed.

Each (rule, party) of a call has at most one `Pending` (kept in the call's `pending` dict,
so a call's timers go with it); one heap orders all of them by wake time. Entries are
never removed from the heap: an entry whose `seq` no longer matches its (rule, party)'s
`Pending` is stale and skipped (lazy deletion); the heap is rebuilt when stale entries
outnumber live ones four to one. Times are epoch seconds.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from daemon.core.ids import ConversationId, ParticipantId, RuleName

Key = tuple[RuleName, ParticipantId]
PendingMap = dict[Key, "Pending"]


@dataclass(slots=True)
class Pending:
    hold_deadline: float | None  # when hold_for is satisfied (None: not holding yet)
    wake: float  # when due() must look again
    seq: int


class TimerHeap:
    """The wake-up order of every call's pending timers. `calls()` yields each call's id
    and `pending` dict (for rebuilding); `live` counts pending timers."""

    def __init__(self, calls: Callable[[], Iterable[tuple[ConversationId, PendingMap]]]) -> None:
        self._calls = calls
        self._heap: list[tuple[float, int, ConversationId, RuleName, ParticipantId]] = []
        self._seq = 0
        self.live = 0

    def schedule(self, pending: PendingMap, cid: ConversationId, key: Key,
                 hold_deadline: float | None, wake: float) -> None:
        """Set (or move) the timer of `key` on call `cid`."""
        pend = pending.get(key)
        if pend is not None and pend.wake == wake and pend.hold_deadline == hold_deadline:
            return
        self._seq += 1
        if pend is None:
            self.live += 1
        pending[key] = Pending(hold_deadline, wake, self._seq)
        heapq.heappush(self._heap, (wake, self._seq, cid, key[0], key[1]))
        if len(self._heap) > 1024 and len(self._heap) > 4 * self.live:
            self._compact()

    def cancel(self, pending: PendingMap, key: Key) -> bool:
        """Drop the timer of `key`; False when there was none."""
        if pending.pop(key, None) is None:
            return False
        self.live -= 1
        return True

    def cancel_party(self, pending: PendingMap, pid: ParticipantId) -> None:
        for key in [k for k in pending if k[1] == pid]:
            del pending[key]
            self.live -= 1

    def cancel_rules_except(self, pending: PendingMap, keep: frozenset[RuleName] | set[RuleName]) -> None:
        for key in [k for k in pending if k[0] not in keep]:
            del pending[key]
            self.live -= 1

    def forget(self, pending: PendingMap) -> None:
        """A call's timers are gone with it (its heap entries expire lazily)."""
        self.live -= len(pending)

    def pop_due(self, now: float, lookup: Callable[[ConversationId], PendingMap | None]
                ) -> Iterator[tuple[ConversationId, RuleName, ParticipantId, int]]:
        """The live timers whose wake time is at or before `now`, earliest first, as (call,
        rule, party, seq); each is popped from the heap before it is yielded (the caller may
        schedule more while iterating)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, cid, name, pid = heapq.heappop(heap)
            pending = lookup(cid)
            pend = pending.get((name, pid)) if pending is not None else None
            if pend is None or pend.seq != seq:
                continue  # superseded or cancelled: lazy deletion
            yield cid, name, pid, seq

    def next_deadline(self, lookup: Callable[[ConversationId], PendingMap | None]) -> float | None:
        """Earliest live wake time (epoch s), or None."""
        heap = self._heap
        while heap:
            wake, seq, cid, name, pid = heap[0]
            pending = lookup(cid)
            pend = pending.get((name, pid)) if pending is not None else None
            if pend is not None and pend.seq == seq:
                return wake
            heapq.heappop(heap)
        return None

    def _compact(self) -> None:
        self._heap = [(p.wake, p.seq, cid, k[0], k[1])
                      for cid, pending in self._calls() for k, p in pending.items()]
        heapq.heapify(self._heap)
