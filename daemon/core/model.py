"""The in-memory view of calls that rules judge: plain data, no I/O.

Only what rules, enforcement and `eject` need is kept (not whole payloads), so that 10,000
live calls fit in a few tens of MB. Times are epoch seconds (float, UTC), the same clock as
Genesys' `connectedTime`/`endTime`; the core is always handed `now` in that clock, so replay
can run it on a virtual clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from daemon.core.ids import ConversationId, ParticipantId, RuleName


FINAL_STATES = frozenset({"disconnected", "terminated"})


# Every spelling seen so far -> final or not (hot path: one dict lookup per party). States
# are a small enum; the bound only guards against a flood of invented ones.
_FINAL_OF: dict[str, bool] = {"connected": False, **dict.fromkeys(FINAL_STATES, True)}
_FINAL_OF_MAX = 4096


def is_final_state(state: object) -> bool:
    """The one final-state predicate: a participant in this state has left for good
    (disconnected, terminated; any letter case, as REST, events and operators may spell
    it) and is never revived. Not a string (None, missing, malformed): not final."""
    if not isinstance(state, str):
        return False
    hit = _FINAL_OF.get(state)
    if hit is None:
        hit = state.lower() in FINAL_STATES
        if len(_FINAL_OF) < _FINAL_OF_MAX:
            _FINAL_OF[state] = hit
    return hit


@dataclass(slots=True)
class Participant:
    """One party of a call, as last seen. Field names are the rule-format names."""

    id: ParticipantId
    name: str | None = None
    purpose: str | None = None
    state: str | None = None
    direction: str | None = None
    address: str | None = None
    ani: str | None = None
    dnis: str | None = None
    user_id: str | None = None
    queue_id: str | None = None
    team_id: str | None = None
    external_contact_id: str | None = None
    external_organization_id: str | None = None
    flagged_reason: str | None = None
    held: bool | None = None
    muted: bool | None = None
    confined: bool | None = None
    recording: bool | None = None
    provider: str | None = None
    monitored_participant_id: str | None = None
    coached_participant_id: str | None = None
    barged_participant_id: str | None = None
    disconnect_type: str | None = None
    connected_time: float | None = None  # epoch seconds
    end_time: float | None = None  # epoch seconds
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def is_final(self) -> bool:
        """Disconnected or terminated: final for this participant id, never revived."""
        s = self.state
        if s is None:
            return False
        hit = _FINAL_OF.get(s)
        return hit if hit is not None else is_final_state(s)

    @property
    def is_live(self) -> bool:
        return not self.is_final

    def connected_seconds(self, now: float) -> float | None:
        """Seconds connected so far (up to `end_time` when ended); None if never connected."""
        if self.connected_time is None:
            return None
        end = self.end_time if self.end_time is not None else now
        return max(0.0, end - self.connected_time)


@dataclass(slots=True)
class Call:
    """One call conversation. `participants` keeps first-seen order."""

    id: ConversationId
    recording_state: str | None = None
    secure_pause: bool | None = None
    participants: dict[ParticipantId, Participant] = field(default_factory=dict)
    queue_ids: set[str] = field(default_factory=set)  # every queue any party passed through
    ended_at: float | None = None  # epoch seconds when the store saw the call end
    last_update: float = 0.0  # epoch seconds of the last applied change

    @property
    def connected_parties(self) -> int:
        return sum(1 for p in self.participants.values() if p.state == "connected")

    @property
    def live_parties(self) -> list[Participant]:
        return [p for p in self.participants.values() if p.is_live]

    @property
    def is_ended(self) -> bool:
        return self.ended_at is not None


ChangeSource = Literal["event", "resync"]


@dataclass(slots=True, frozen=True)
class Change:
    """What one applied event (or resync read) changed: the call and the parties that changed.

    `received_at` is when the triggering message arrived (epoch s), for latency accounting.
    """

    call: Call
    changed: tuple[Participant, ...]
    call_changed: bool
    source: ChangeSource
    received_at: float


Action = Literal["disconnect", "observe"]
Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Who asked for a decision that no rule took (the control API): the caller's name and
    their reason (free text, recorded in the audit)."""

    caller: str
    reason: str | None = None


@dataclass(slots=True, frozen=True)
class Decision:
    """A rule matched a party. Plain data; enforcement and audit consume it.

    `matched` maps each rule field that took part to the value it had, e.g.
    `{"purpose": "external", "address": "+4420..."}`. `decided_at` and `received_at`
    are epoch seconds. `origin` is None for a rule's decision; a manual removal (see
    `daemon.core.enforcement.manual_decision`) names its caller and reason.
    """

    rule: RuleName
    action: Action
    conversation_id: ConversationId
    participant_id: ParticipantId
    purpose: str | None
    matched: dict[str, object]
    severity: Severity
    tags: tuple[str, ...]
    message: str
    decided_at: float
    received_at: float | None
    origin: Origin | None = None  # who asked, for a decision no rule took (control API)
