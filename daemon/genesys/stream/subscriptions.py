"""The stream's channels and subscriptions: creating channels (one at a time: Genesys
throttles parallel creation), subscribing a shard's topics (`PUT ...?ignoreErrors=true`,
then a `GET` read-back: anything Rejected or missing is refused), re-subscribing after a
reconnect (a refusal is loud but not fatal: `rejected`), deleting subscriptions, channel
ages, and a reload's topic update with roll-back (`update`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from daemon.core.ids import ChannelId, Topic
from daemon.errors import ApiError, ConfguardError, SubscriptionError
from daemon.genesys.stream.pump import Shard
from daemon.genesys.stream.supervisor import ChannelLike, Event, TopicPlan, TopicsChanged

if TYPE_CHECKING:  # for annotations only: the genesys layer does not import the service
    from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)


class TopicStateLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def rejection_reason(self) -> str | None: ...
    @property
    def missing_permissions(self) -> tuple[str, ...]: ...


class TokensLike(Protocol):
    async def token(self) -> str: ...
    async def invalidate(self, token: str) -> None: ...
    @property
    def expires_at(self) -> float | None: ...


class StreamClient(Protocol):
    """The part of `daemon.genesys.api.GenesysClient` the stream uses."""

    @property
    def tokens(self) -> TokensLike: ...
    async def create_channel(self) -> ChannelLike: ...
    async def channel_exists(self, channel_id: ChannelId) -> bool: ...
    async def put_subscriptions(self, channel_id: ChannelId, topics: Sequence[str], *,
                                ignore_errors: bool = False) -> Sequence[TopicStateLike]: ...
    async def add_subscriptions(self, channel_id: ChannelId, topics: Sequence[str], *,
                                ignore_errors: bool = False) -> Sequence[TopicStateLike]: ...
    async def get_subscriptions(self, channel_id: ChannelId) -> Sequence[TopicStateLike]: ...
    async def delete_subscriptions(self, channel_id: ChannelId) -> None: ...


@dataclass(frozen=True)
class _Missing:
    """A topic absent from the GET read-back (neither Permitted nor Rejected)."""

    id: str
    state: str = "Missing"
    rejection_reason: str | None = "not listed by GET subscriptions after PUT"
    missing_permissions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """What `Subscriptions.update` did: `created` shards with their new channels (subscribed,
    not yet connected), `emptied` shards (to be closed)."""

    created: list[tuple[Shard, ChannelLike]]
    emptied: list[Shard]


class Subscriptions:
    """See the module docstring. `stop_timeout`: seconds per unsubscribe request."""

    def __init__(self, client: StreamClient, *, stop_timeout: float = 5.0,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._stop_timeout = stop_timeout
        self._metrics = metrics
        self._clock = clock
        self._create_lock = asyncio.Lock()  # channel creation is sequential
        self._created: dict[str, float] = {}  # channel id -> creation time (stream clock)
        self._rejected: dict[str, str] = {}  # topic -> why, for topics refused after start

    def token_expires_at(self) -> float | None:
        """When the client's token expires (None: unknown), for the supervisor's decisions."""
        with contextlib.suppress(Exception):
            return self._client.tokens.expires_at
        return None

    @property
    def rejected(self) -> dict[str, str]:
        """Topics refused on a re-subscription after start (topic -> reason)."""
        return dict(self._rejected)

    async def create_channel(self, shard_index: int) -> ChannelLike:
        async with self._create_lock:
            ch = await self._client.create_channel()
        self._created[ch.id] = self._clock()
        log.info("stream_channel_created", shard=shard_index, channel=ch.id,
                 expires_in=round(ch.expires - self._clock(), 1))
        return ch

    async def subscribe(self, ch: ChannelLike, topics: Sequence[Topic]) -> list[TopicStateLike]:
        """PUT the topics (ignoreErrors) then GET them back; returns the refused ones."""
        states = await self._client.put_subscriptions(ch.id, list(topics), ignore_errors=True)
        bad = await self.check(ch, topics, states)
        log.info("stream_subscribed", channel=ch.id, topics=len(topics), rejected=len(bad))
        return bad

    async def check(self, ch: ChannelLike, topics: Sequence[Topic],
                    states: Sequence[TopicStateLike]) -> list[TopicStateLike]:
        """Read the channel's subscriptions back; the refused or missing ones of `topics`."""
        listed = await self._client.get_subscriptions(ch.id)
        # Matched without regard to case: the service may echo ids in its own spelling.
        bad: dict[str, TopicStateLike] = {}
        permitted: set[str] = set()
        for st in (*states, *listed):
            if st.state.lower() == "rejected":
                bad.setdefault(st.id.casefold(), st)
        for st in listed:
            if st.state.lower() != "rejected":
                permitted.add(st.id.casefold())
        for t in topics:
            key = t.casefold()
            if key not in permitted and key not in bad:
                bad[key] = _Missing(t)
        for st in bad.values():
            log.error("stream_topic_rejected", channel=ch.id, topic=st.id,
                      reason=st.rejection_reason, missing_permissions=list(st.missing_permissions))
        return list(bad.values())

    async def resubscribe(self, s: Shard, ch: ChannelLike) -> None:
        """Subscribe a shard's topics (as they are now) after start. A refusal is not fatal
        (dropping every topic would be worse than missing the refused ones) but it is loud:
        logged as an error, listed in `rejected`, and the stream is not ready while it lasts."""
        topics = s.topics
        bad = await self.subscribe(ch, topics)
        for t in topics:
            self._rejected.pop(t, None)
        for b in bad:
            self._rejected[b.id] = b.rejection_reason or b.state
        if bad:
            log.error("stream_coverage_incomplete", shard=s.index, channel=ch.id,
                      error=str(rejection_error(bad)))

    def forget(self, channel_id: str) -> None:
        """The channel is no longer used: its age is no longer reported."""
        self._created.pop(channel_id, None)
        if self._metrics is not None:
            with contextlib.suppress(KeyError):  # never had a sample
                self._metrics.channel_age_seconds.remove(channel_id)

    def set_age(self, ch: ChannelLike) -> None:
        created = self._created.get(ch.id)
        if created is not None and self._metrics is not None:
            self._metrics.channel_age_seconds.labels(channel=str(ch.id)).set(
                max(0.0, self._clock() - created))

    async def cleanup(self, channels: Sequence[ChannelLike]) -> None:
        """Delete the channels' subscriptions (best effort, `stop_timeout` each)."""
        for ch in channels:
            try:
                await asyncio.wait_for(self._client.delete_subscriptions(ch.id), timeout=self._stop_timeout)
            except (ConfguardError, TimeoutError, asyncio.TimeoutError, OSError) as exc:
                log.info("stream_unsubscribe_failed", channel=ch.id, error=str(exc) or type(exc).__name__)

    async def update(self, shards: Sequence[Shard], plan: TopicPlan, *,
                     tell: Callable[[Shard, Event], None],
                     new_shard: Callable[[int, Sequence[Topic]], Shard]) -> UpdateResult:
        """Apply a reload's `plan` (`supervisor.plan_topics`): shards that only gain topics
        get a POST (add); shards that lose some get a PUT of their new set; unchanged shards
        are not touched; topics that fit nowhere get new shards (a channel each, subscribed;
        the caller connects them). A shard whose socket is down only records its new set
        (`tell(shard, TopicsChanged(..., subscribed=False))`); its supervisor subscribes it
        when reconnecting. All or nothing: a refused topic or a failed request puts every
        touched shard back (`roll_back`), deletes the new channels and raises
        SubscriptionError."""
        by_index = {s.index: s for s in shards}
        before = {s.index: s.topics for s in shards}
        touched: list[Shard] = []
        created: list[tuple[Shard, ChannelLike]] = []
        emptied: list[Shard] = []
        rejected: list[TopicStateLike] = []
        try:
            for change in plan.changes:
                s = by_index[change.index]
                if change.closes:
                    emptied.append(s)
                    continue
                new_set = list(change.new_topics)
                async with s.lock:
                    touched.append(s)
                    ch = s.channel
                    if ch is None or not s.live:
                        tell(s, TopicsChanged(change.new_topics, subscribed=False))
                        continue
                    if change.lost:
                        states = await self._client.put_subscriptions(ch.id, new_set, ignore_errors=True)
                    else:
                        states = await self._client.add_subscriptions(
                            ch.id, list(change.gained), ignore_errors=True)
                    tell(s, TopicsChanged(change.new_topics, subscribed=True))
                    rejected += await self.check(ch, new_set, states)
                    log.info("stream_subscriptions_updated", shard=s.index, channel=ch.id,
                             added=len(change.gained), removed=len(change.lost),
                             topics=len(new_set))
            for group in plan.new_shards:
                index = max((x.index for x in [*shards, *(c[0] for c in created)]), default=-1) + 1
                ns = new_shard(index, group)
                ch = await self.create_channel(ns.index)
                created.append((ns, ch))  # the channel is the shard's once connected (Begin)
                rejected += await self.subscribe(ch, ns.topics)
            if rejected:
                raise rejection_error(rejected)
        except BaseException as exc:
            await self.roll_back(touched, before, created, tell=tell)
            if isinstance(exc, ApiError):
                raise SubscriptionError(f"subscription update failed, nothing changed: {exc}") from exc
            raise
        return UpdateResult(created, emptied)

    async def roll_back(self, touched: Sequence[Shard], before: dict[int, tuple[Topic, ...]],
                        created: Sequence[tuple[Shard, ChannelLike]], *,
                        tell: Callable[[Shard, Event], None]) -> None:
        """Put shards back to their topic sets before a failed update (best effort)."""
        for s in touched:
            old = before[s.index]
            ok = False
            ch = s.channel
            if ch is not None and s.live:
                try:
                    await self._client.put_subscriptions(ch.id, list(old), ignore_errors=True)
                    ok = True
                except ConfguardError as exc:
                    log.error("stream_rollback_failed", shard=s.index, error=str(exc))
            tell(s, TopicsChanged(old, subscribed=ok))
        await self.cleanup([ch for _, ch in created])
        for _, ch in created:
            self.forget(ch.id)


def rejection_error(rejected: Sequence[TopicStateLike]) -> SubscriptionError:
    """One SubscriptionError naming every refused topic, its reason and missing permissions."""
    parts = []
    for st in rejected[:50]:
        perms = ", ".join(st.missing_permissions) or "none named"
        parts.append(f"{st.id} (reason: {st.rejection_reason or 'not given'}; "
                     f"missing permissions: {perms})")
    more = f"; and {len(rejected) - 50} more" if len(rejected) > 50 else ""
    return SubscriptionError(
        f"{len(rejected)} notification topic(s) refused, so their calls would not be watched: "
        + "; ".join(parts) + more
        + ". Fix the queue/user ids in subscriptions or grant the OAuth client's role the "
          "missing permissions.")
