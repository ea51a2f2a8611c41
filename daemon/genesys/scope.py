"""Which notification topics cover the configured scope, and how they split over channels.

Contract:
- `resolve_scope(client, subscriptions)` turns `config.subscriptions` into a `Scope`:
  queue entries that look like UUIDs are taken as ids as written; any other entry is a queue
  *name*, looked up with `client.find_queues_by_name` and matched exactly, ignoring case.
  Zero or several matches raise `SubscriptionError` naming the queue (a compliance scope
  must never silently shrink or widen). User entries are ids.
- Topics (grammar in `daemon.core.topics`): `v2.routing.queues.{id}.conversations.calls`
  per queue and `v2.users.{id}.conversations.calls` per user, de-duplicated, in
  configuration order.
- `shard(topics, per_channel=1000, max_channels=20)` splits topics into channel-sized lists
  (Genesys: at most 1000 topics per channel, 20 channels per OAuth client). Needing more
  than `max_channels` raises `SubscriptionError` saying how many topics there are, the limit
  and what to do about it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from daemon.config import SubscriptionSettings
from daemon.errors import ApiError, SubscriptionError
from daemon.core.ids import QueueId, Topic, UserId
from daemon.core.topics import QueueCalls, UserCalls, parse_call_topic, queue_topic, user_topic

log = structlog.get_logger(__name__)

MAX_TOPICS_PER_CHANNEL = 1000
MAX_CHANNELS = 20

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class QueueFinder(Protocol):
    """The one client method scope resolution needs (`GenesysClient` satisfies it)."""

    async def find_queues_by_name(self, name: str) -> list[dict[str, Any]]: ...


def looks_like_uuid(value: str) -> bool:
    return bool(_UUID.match(value.strip()))


def ids_from_topics(topics: Iterable[str]) -> tuple[list[QueueId], list[UserId]]:
    """The queue ids and user ids that a list of call topics covers (other topics ignored)."""
    queues: list[QueueId] = []
    users: list[UserId] = []
    for t in topics:
        parsed = parse_call_topic(t)
        if isinstance(parsed, QueueCalls):
            queues.append(parsed.queue_id)
        elif isinstance(parsed, UserCalls):
            users.append(parsed.user_id)
    return queues, users


@dataclass(frozen=True, slots=True)
class Scope:
    """Resolved scope: ids (for resync's analytics query) and topics (for the stream)."""

    queue_ids: tuple[QueueId, ...] = ()
    user_ids: tuple[UserId, ...] = ()
    queue_names: dict[str, QueueId] = field(default_factory=dict)  # configured name -> id

    @property
    def topics(self) -> list[Topic]:
        seen: dict[Topic, None] = {}
        for q in self.queue_ids:
            seen.setdefault(queue_topic(q), None)
        for u in self.user_ids:
            seen.setdefault(user_topic(u), None)
        return list(seen)


async def resolve_scope(client: QueueFinder, subscriptions: SubscriptionSettings) -> Scope:
    """Resolve configured queues (ids or names) and users (ids) into a `Scope`.

    Raises SubscriptionError for a name that matches no queue or several queues, and for a
    lookup that fails (the message names the queue; the cause is chained).
    """
    queue_ids: dict[QueueId, None] = {}
    names: dict[str, QueueId] = {}
    for raw in subscriptions.queues:
        entry = str(raw).strip()
        if not entry:
            raise SubscriptionError("subscriptions.queues contains an empty entry; give a queue id or name")
        if looks_like_uuid(entry):
            queue_ids.setdefault(QueueId(entry), None)
            continue
        qid = await _find_queue(client, entry)
        names[entry] = qid
        queue_ids.setdefault(qid, None)
    user_ids: dict[UserId, None] = {}
    for raw in subscriptions.users:
        entry = str(raw).strip()
        if not looks_like_uuid(entry):
            raise SubscriptionError(
                f"subscriptions.users entry {entry!r} is not a user id (UUID); users are given by id")
        user_ids.setdefault(UserId(entry), None)
    scope = Scope(tuple(queue_ids), tuple(user_ids), names)
    log.info("scope_resolved", queues=len(scope.queue_ids), users=len(scope.user_ids),
             names_resolved=len(names))
    return scope


async def _find_queue(client: QueueFinder, name: str) -> QueueId:
    try:
        found = await client.find_queues_by_name(name)
    except ApiError as exc:
        raise SubscriptionError(f"could not look up queue {name!r}: {exc}") from exc
    wanted = name.casefold()
    exact = [q for q in found
             if isinstance(q, dict) and isinstance(q.get("name"), str)
             and q["name"].casefold() == wanted and isinstance(q.get("id"), str) and q["id"]]
    if not exact:
        near = sorted({str(q.get("name")) for q in found if isinstance(q, dict)})[:5]
        hint = f" (similar: {', '.join(repr(n) for n in near)})" if near else ""
        raise SubscriptionError(
            f"queue {name!r} not found: no queue has exactly that name{hint}; "
            f"check subscriptions.queues or give the queue id")
    ids = sorted({str(q["id"]) for q in exact})
    if len(ids) > 1:
        raise SubscriptionError(
            f"queue name {name!r} is ambiguous: {len(ids)} queues have that name "
            f"({', '.join(ids)}); give the queue id in subscriptions.queues instead")
    return QueueId(ids[0])


def shard(topics: Sequence[Topic], per_channel: int = MAX_TOPICS_PER_CHANNEL,
          max_channels: int = MAX_CHANNELS) -> list[list[Topic]]:
    """Split topics (de-duplicated, order kept) into lists of at most `per_channel`.

    Raises SubscriptionError when more than `max_channels` channels would be needed.
    """
    if per_channel < 1:
        raise ValueError("per_channel must be at least 1")
    unique = list(dict.fromkeys(topics))
    shards = [unique[i:i + per_channel] for i in range(0, len(unique), per_channel)]
    if len(shards) > max_channels:
        raise SubscriptionError(
            f"{len(unique)} topics need {len(shards)} notification channels, but Genesys allows "
            f"at most {per_channel} topics per channel and {max_channels} channels per OAuth "
            f"client ({per_channel * max_channels} topics); subscribe fewer queues/users, or "
            f"run a second confguard instance with its own OAuth client for the rest")
    return shards
