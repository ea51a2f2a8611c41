"""daemon.genesys.scope: queue/user resolution (names over the sandbox's REST API) and sharding."""

from __future__ import annotations

import pytest

from _stream_helpers import client_for
from daemon.config import SubscriptionSettings
from daemon.errors import SubscriptionError
from daemon.core.ids import Topic
from daemon.sandbox import Sandbox
from daemon.genesys.scope import Scope, ids_from_topics, looks_like_uuid, resolve_scope, shard

UID = "6f1c2a9e-0b3d-4c8e-9a57-2d1e4b7c8f01"


async def test_ids_as_is_and_names_exact_case_insensitive(sandbox: Sandbox) -> None:
    sales = sandbox.world.create_queue("Customer Service")
    sandbox.world.create_queue("Customer Service Overflow")  # a prefix match must not count
    raw_id = "0D5C7A44-3F2E-4B1A-8C9D-6E7F8A9B0C1D"
    subs = SubscriptionSettings(queues=["customer service", raw_id, sales.id], users=[UID])
    async with client_for(sandbox) as client:
        scope = await resolve_scope(client, subs)
    assert scope.queue_ids == (sales.id, raw_id)  # de-duplicated, order kept, id as written
    assert scope.user_ids == (UID,)
    assert scope.queue_names == {"customer service": sales.id}
    assert scope.topics == [
        f"v2.routing.queues.{sales.id}.conversations.calls",
        f"v2.routing.queues.{raw_id}.conversations.calls",
        f"v2.users.{UID}.conversations.calls",
    ]
    # The id was not looked up; the name was, through GET /api/v2/routing/queues.
    lookups = sandbox.journal.find("GET", "/api/v2/routing/queues")
    assert len(lookups) == 1 and lookups[0].query.get("name") == "customer service"


async def test_unknown_queue_name_is_an_error_naming_it(sandbox: Sandbox) -> None:
    sandbox.world.create_queue("Sales")
    async with client_for(sandbox) as client:
        with pytest.raises(SubscriptionError, match="'Billing' not found"):
            await resolve_scope(client, SubscriptionSettings(queues=["Billing"]))


async def test_ambiguous_queue_name_is_an_error_listing_ids(sandbox: Sandbox) -> None:
    a = sandbox.world.create_queue("Sales")
    b = sandbox.world.create_queue("SALES")
    async with client_for(sandbox) as client:
        with pytest.raises(SubscriptionError) as err:
            await resolve_scope(client, SubscriptionSettings(queues=["sales"]))
    msg = str(err.value)
    assert "'sales' is ambiguous" in msg and a.id in msg and b.id in msg


async def test_lookup_failure_names_the_queue(sandbox: Sandbox) -> None:
    sandbox.faults.add_burst("GET", "/routing/queues", 503, 50)
    async with client_for(sandbox, max_retries=0) as client:
        with pytest.raises(SubscriptionError, match="could not look up queue 'Sales'"):
            await resolve_scope(client, SubscriptionSettings(queues=["Sales"]))


class NoLookups:
    async def find_queues_by_name(self, name: str) -> list[dict[str, object]]:
        raise AssertionError("ids must not be looked up")


async def test_users_must_be_ids() -> None:
    with pytest.raises(SubscriptionError, match="'jane' is not a user id"):
        await resolve_scope(NoLookups(), SubscriptionSettings(users=["jane"]))
    with pytest.raises(SubscriptionError, match="empty entry"):
        await resolve_scope(NoLookups(), SubscriptionSettings(queues=["  "]))


def test_shard_splits_at_1000() -> None:
    topics = [Topic(f"v2.users.{i}.conversations.calls") for i in range(2500)]
    groups = shard(topics + topics[:10])  # duplicates dropped
    assert [len(g) for g in groups] == [1000, 1000, 500]
    assert [t for g in groups for t in g] == topics
    assert shard([]) == []


def test_shard_over_20_channels_is_a_clear_error() -> None:
    topics = [Topic(f"v2.users.{i}.conversations.calls") for i in range(20_001)]
    assert len(shard(topics[:20_000])) == 20
    with pytest.raises(SubscriptionError) as err:
        shard(topics)
    msg = str(err.value)
    assert "20001 topics" in msg and "21" in msg and "1000 topics per channel" in msg
    assert "20 channels" in msg and "20000 topics" in msg and "second confguard instance" in msg


def test_helpers() -> None:
    assert looks_like_uuid(UID) and not looks_like_uuid("Sales")
    q, u = ids_from_topics([f"v2.routing.queues.{UID}.conversations.calls",
                            f"v2.users.{UID}.conversations.calls", "channel.metadata"])
    assert q == [UID] and u == [UID]
    assert Scope().topics == []
