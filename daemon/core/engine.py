"""The sans-I/O core loop: raw frame -> message -> call state change -> rule decisions.

`Engine` owns a `CallStore` and drives a rule evaluator (`daemon.core.rules.RuleEngine`,
typed here by the `RuleEvaluator` protocol) and its `Enforcement` (the one owner of
enforcement state). It does no I/O and reads no clock: every entry point takes `now`
(epoch seconds), so the asyncio shell, the replay tool and the benchmarks drive it alike.

Every way state changes takes one path and gives one result type, `Step`: a frame
(`feed`), a conversation read over REST (`apply_conversation`: resync, reconciliation,
the enforcer's own confirming reads) and a 404 (`mark_gone`). Each applied change is shown
to the `Enforcement` (in-flight parties now final are `Step.settled`) and judged by the
rules. The store is the one eviction owner: `tick` evicts ended calls and the rules and
the enforcement forget them.

Counters for the metrics layer (plain dicts, only ever incremented):
- `messages[kind]`: kind is one of `MESSAGE_KINDS`;
- `rejected[reason]`: malformed input by reason, all of `events.REJECT_REASONS` present
  from the start (so metric labels exist at zero): a frame's `Rejected.reason`, or what the
  store skipped or ignored in an applied snapshot (`state.PROBLEMS`), once per input;
- `call_events[topic_kind]`: call events by `events.topic_kind` (queue / user);
- `counters`: `changes`, `duplicates` (call snapshots that changed nothing, or unusable
  ones: see `store.stats`), `decisions`, `evicted`, `rule_errors`, `state_errors` (a bug
  in the store, logged), `gone`.
State-level counters are in `engine.store.stats`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from daemon.core.logs import get_logger

from daemon.core.events import (
    CallEvent,
    ChannelGone,
    Heartbeat,
    Message,
    REJECT_REASONS,
    OtherMessage,
    Pong,
    Rejected,
    SocketClosing,
    parse_message,
    topic_kind,
)
from daemon.core.enforcement import Enforcement, PartyKey
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Change, ChangeSource, Decision
from daemon.core.state import CallStore

log = get_logger(__name__)

MESSAGE_KINDS: Final = (
    "heartbeat", "pong", "socket_closing", "channel_gone", "call_event", "other", "rejected",
)

_KIND_OF: Final[dict[type, str]] = {
    Heartbeat: "heartbeat",
    Pong: "pong",
    SocketClosing: "socket_closing",
    ChannelGone: "channel_gone",
    CallEvent: "call_event",
    OtherMessage: "other",
    Rejected: "rejected",
}


class RuleEvaluator(Protocol):
    """What the engine needs from `daemon.core.rules.RuleEngine`."""

    @property
    def enforcement(self) -> Enforcement: ...

    def on_change(self, change: Change, now: float, /) -> list[Decision]: ...

    def rejudge(self, released: Sequence[tuple[RuleName, ConversationId, ParticipantId]],
                now: float, /) -> list[Decision]: ...

    def due(self, now: float, /) -> list[Decision]: ...

    def next_deadline(self) -> float | None: ...

    def forget_call(self, conversation_id: ConversationId, /) -> None: ...


#: `_apply`'s problems when the store raised: a sentinel compared by identity, never exposed
#: (the Step carries no reasons for it; the failure is counted as `state_errors`).
_APPLY_FAILED: tuple[str, ...] = ("state_apply_failed",)


@dataclass(slots=True)
class Step:
    """What one input did: the parsed message (None for REST input), the state change (None
    when nothing changed or the input was unusable), the decisions the rules took, and
    `settled`: parties with an action in flight that the change shows final (the enforcer
    resolves their confirmations)."""

    message: Message | None
    change: Change | None
    decisions: list[Decision]
    settled: tuple[PartyKey, ...] = ()
    #: What was malformed in the input (`events.REJECT_REASONS` tokens, each once): the
    #: frame's `Rejected.reason`, or what the store skipped or ignored in an applied snapshot
    #: (`state.PROBLEMS`: the rest of it was applied). Counted in `Engine.rejected`.
    rejected: tuple[str, ...] = ()


def message_kind(message: Message) -> str:
    """The `MESSAGE_KINDS` label of a message."""
    return _KIND_OF[type(message)]


class Engine:
    """Glue between parsing, the call store and the rules. Never raises on bad input.

    A rule evaluator that raises is logged and counted (`counters["rule_errors"]`); the
    frame's decisions are then empty, and the engine keeps going.
    """

    def __init__(self, rules: RuleEvaluator, store: CallStore | None = None) -> None:
        self.rules = rules
        self.enforcement: Enforcement = rules.enforcement
        self.store = store if store is not None else CallStore()
        self.messages: dict[str, int] = dict.fromkeys(MESSAGE_KINDS, 0)
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.call_events: dict[str, int] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("changes", "duplicates", "decisions", "evicted", "rule_errors", "state_errors", "gone"), 0)

    def feed(self, raw: bytes | str, now: float) -> Step:
        """Handle one WebSocket frame received at `now`."""
        message = parse_message(raw)
        kind = _KIND_OF[type(message)]
        self.messages[kind] += 1
        if isinstance(message, CallEvent):
            tk = topic_kind(message.topic)
            self.call_events[tk] = self.call_events.get(tk, 0) + 1
            change, problems = self._apply(message.body, now, "event")
            if change is None:
                if problems is _APPLY_FAILED:  # counted as state_errors, not a duplicate
                    return Step(message, None, [])
                self.counters["duplicates"] += 1
                return Step(message, None, [], (), problems)
            return self._judge(message, change, now, problems)
        if isinstance(message, Rejected):
            self.rejected[message.reason] = self.rejected.get(message.reason, 0) + 1
            return Step(message, None, [], (), (message.reason,))
        return Step(message, None, [])

    def apply_conversation(self, conv: Mapping[str, object], now: float, *,
                           source: ChangeSource = "resync") -> Step:
        """Fold in a conversation read from REST (or any snapshot) and judge the change,
        exactly as a frame's."""
        change, problems = self._apply(conv, now, source)
        if change is None:
            if problems is _APPLY_FAILED:  # counted as state_errors, not a duplicate
                return Step(None, None, [])
            self.counters["duplicates"] += 1
            return Step(None, None, [], (), problems)
        return self._judge(None, change, now, problems)

    def mark_gone(self, conversation_id: str, now: float) -> Step:
        """REST said 404: every party of the call is final and the call ended."""
        change = self.store.mark_gone(conversation_id, now)
        if change is None:
            return Step(None, None, [])
        self.counters["gone"] += 1
        return self._judge(None, change, now)

    def enforce_now(self, now: float) -> list[Decision]:
        """Removals became possible again (valve resumed, send gate opened): release every
        held decision and judge every live party from the state in memory; the decisions
        for parties that match a rule and have not been acted on are returned at once."""
        try:
            return self.rules.rejudge(self.enforcement.release_held(), now)
        except Exception:
            self.counters["rule_errors"] += 1
            log.exception("rules_rejudge_failed")
            return []

    def party_final(self, conversation_id: ConversationId, participant_id: ParticipantId) -> bool:
        """The state in memory shows the party final (unknown parties: False)."""
        call = self.store.get(conversation_id)
        p = call.participants.get(participant_id) if call is not None else None
        return p is not None and p.is_final

    def tick(self, now: float) -> list[Decision]:
        """Fire due timers, then evict ended calls (the rules forget them)."""
        try:
            decisions = self.rules.due(now)
        except Exception:
            self.counters["rule_errors"] += 1
            log.exception("rules_due_failed")
            decisions = []
        self.counters["decisions"] += len(decisions)
        evicted = self.store.evict(now)
        if evicted:
            self.counters["evicted"] += len(evicted)
            for cid in evicted:
                self.enforcement.forget_call(cid)
                try:
                    self.rules.forget_call(cid)
                except Exception:
                    self.counters["rule_errors"] += 1
                    log.exception("rules_forget_failed", conversation_id=cid)
        return decisions

    def next_deadline(self) -> float | None:
        """The earliest rule timer (epoch s), or None."""
        return self.rules.next_deadline()

    def _apply(self, conv: Mapping[str, object], now: float,
               source: ChangeSource) -> tuple[Change | None, tuple[str, ...]]:
        try:
            change = self.store.apply(conv, now, received_at=now, source=source)
        except Exception:
            # A store bug must not take the stream down; the next resync re-reads the call.
            self.counters["state_errors"] += 1
            log.exception("state_apply_failed", source=source)
            return None, _APPLY_FAILED
        problems = self.store.problems
        for reason in problems:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return change, problems

    def _judge(self, message: Message | None, change: Change, now: float,
               problems: tuple[str, ...] = ()) -> Step:
        self.counters["changes"] += 1
        settled = self.enforcement.observe(change)
        try:
            decisions = self.rules.on_change(change, now)
        except Exception:
            self.counters["rule_errors"] += 1
            log.exception("rules_on_change_failed", conversation_id=change.call.id)
            return Step(message, change, [], settled, problems)
        if decisions:
            self.counters["decisions"] += len(decisions)
        return Step(message, change, decisions, settled, problems)
