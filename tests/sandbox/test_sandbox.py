"""The Genesys Cloud sandbox over real sockets: OAuth, REST, notification WebSockets,
scenario driver, journal and every fault."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from sandbox_fixtures import SandboxClient, Socket

from _wait import wait_until
from daemon.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[2]


def qtopic(qid: str) -> str:
    return f"v2.routing.queues.{qid}.conversations.calls"


def utopic(uid: str) -> str:
    return f"v2.users.{uid}.conversations.calls"


def is_error_body(body: Any, status: int) -> bool:
    return (isinstance(body, dict) and body["status"] == status and body["message"]
            and body["code"] and body["contextId"] and body["details"] == []
            and body["errors"] == [])


@pytest.fixture
def world(sandbox: Sandbox) -> Any:
    return sandbox.world


# ------------------------------------------------------------------------ OAuth and errors
async def test_oauth_token_and_wrong_secret(sandbox: Sandbox) -> None:
    async with aiohttp.ClientSession() as s:
        c = SandboxClient(sandbox, s)
        tok = await c.login()
        assert len(tok) > 20
        auth = {"Authorization": aiohttp.encode_basic_auth(sandbox.client_id, "wrong")}
        async with s.post(sandbox.base_url + "/oauth/token", headers=auth,
                          data={"grant_type": "client_credentials"}) as r:
            assert r.status == 401
            body = await r.json()
            assert body["error"] == "invalid_client" and body["description"]
        auth = {"Authorization": aiohttp.encode_basic_auth(sandbox.client_id,
                                                            sandbox.client_secret)}
        async with s.post(sandbox.base_url + "/oauth/token", headers=auth,
                          data={"grant_type": "password"}) as r:
            assert r.status == 400
        async with s.post(sandbox.base_url + "/oauth/token",
                          data={"grant_type": "client_credentials"}) as r:
            assert r.status == 401


async def test_token_lifetime_configurable() -> None:
    async with Sandbox(token_lifetime=300) as sb, aiohttp.ClientSession() as s:
        auth = {"Authorization": aiohttp.encode_basic_auth(sb.client_id, sb.client_secret)}
        async with s.post(sb.base_url + "/oauth/token", headers=auth,
                          data={"grant_type": "client_credentials"}) as r:
            body = await r.json()
        assert body["token_type"] == "bearer" and body["expires_in"] == 300


async def test_bearer_missing_expired_revoked(sandbox: Sandbox,
                                              sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    st, body, r = await c.request("GET", "/api/v2/routing/queues", token="")
    assert st == 401 and is_error_body(body, 401)
    assert r.headers["inin-correlation-id"] == body["contextId"]
    st, _, _ = await c.request("GET", "/api/v2/routing/queues")
    assert st == 200
    sandbox.world.expire_tokens()
    st, body, _ = await c.request("GET", "/api/v2/routing/queues")
    assert st == 401 and is_error_body(body, 401)
    await c.login()
    sandbox.world.revoke_tokens(sandbox.client_id)
    st, body, _ = await c.request("GET", "/api/v2/routing/queues")
    assert st == 401


async def test_unknown_api_path_is_error_body(sandbox_client: SandboxClient) -> None:
    st, body, _ = await sandbox_client.request("GET", "/api/v2/nothing/here")
    assert st == 404 and is_error_body(body, 404)


# ------------------------------------------------------------------------ calls over REST
async def test_get_call_and_patch_disconnect(sandbox: Sandbox, world: Any,
                                             sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    q = world.create_queue("Sales")
    alice = world.create_user("Alice")
    conv = world.start_call(q.id)
    world.connect_agent(conv.id, alice.id)
    ext = world.add_external(conv.id, "tel:+15550001111")
    st, body, _ = await c.request("GET", f"/api/v2/conversations/calls/{conv.id}")
    assert st == 200 and body["id"] == conv.id
    assert [p["purpose"] for p in body["participants"]] == ["customer", "acd", "agent",
                                                           "external"]
    acd = body["participants"][1]
    assert acd["state"] == "disconnected" and acd["disconnectType"] == "transfer"
    assert body["participants"][2]["user"]["id"] == alice.id
    assert body["participants"][0]["startTime"].endswith("Z")

    path = f"/api/v2/conversations/calls/{conv.id}/participants/{ext.id}"
    st, body, r = await c.request("PATCH", path, {"state": "disconnected"})
    assert st == 202 and body is None
    p = conv.party(ext.id)
    assert (p.state, p.disconnect_type) == ("disconnected", "client") and p.end_time
    assert conv.end is None  # customer and agent still talk
    st, _, _ = await c.request("PATCH", path, {"state": "disconnected"})
    assert st == 202  # already disconnected: idempotent no-op (documented choice)
    agent = [x for x in conv.participants if x.purpose == "agent"][0]
    st, _, _ = await c.request(
        "PATCH", f"/api/v2/conversations/calls/{conv.id}/participants/{agent.id}",
        {"state": "disconnected"})
    assert st == 202
    assert conv.end is not None and all(not x.live for x in conv.participants)
    st, body, _ = await c.request(
        "PATCH", "/api/v2/conversations/calls/nope/participants/x", {"state": "disconnected"})
    assert st == 404 and is_error_body(body, 404)
    st, body, _ = await c.request("GET", "/api/v2/conversations/calls/nope")
    assert st == 404
    st, body, _ = await c.request("PATCH", path, {"state": "bogus"})
    assert st == 400 and is_error_body(body, 400)
    assert [x.path for x in sandbox.journal.patches(conv.id)].count(path) == 3


async def test_patch_final_status_configurable(sandbox_factory: Any) -> None:
    sb = await sandbox_factory(patch_final_status=400)
    async with aiohttp.ClientSession() as s:
        c = SandboxClient(sb, s)
        await c.login()
        q = sb.world.create_queue("Q")
        conv = sb.world.start_call(q.id)
        cust = conv.participants[0]
        sb.world.add_external(conv.id)
        sb.world.disconnect(conv.id, cust.id)
        st, body, _ = await c.request(
            "PATCH", f"/api/v2/conversations/calls/{conv.id}/participants/{cust.id}",
            {"state": "disconnected"})
        assert st == 400 and is_error_body(body, 400)
        sb.world.forget_call(conv.id)
        st, body, _ = await c.request("GET", f"/api/v2/conversations/calls/{conv.id}")
        assert st == 404 and is_error_body(body, 404)


async def test_missing_permission_403(sandbox: Sandbox, world: Any,
                                      sandbox_client: SandboxClient) -> None:
    q = world.create_queue("Q")
    conv = world.start_call(q.id)
    world.clients[sandbox.client_id].permissions.discard(
        "conversation:communication:disconnect")
    st, body, _ = await sandbox_client.request(
        "PATCH", f"/api/v2/conversations/calls/{conv.id}/participants/{conv.participants[0].id}",
        {"state": "disconnected"})
    assert st == 403 and is_error_body(body, 403)
    assert "Missing permission: conversation:communication:disconnect" in body["message"]
    assert conv.participants[0].live


async def test_attributes_flag_and_wrong_tools(world: Any,
                                               sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    q = world.create_queue("Q")
    conv = world.start_call(q.id)
    pid = conv.participants[0].id
    base = f"/api/v2/conversations/calls/{conv.id}/participants/{pid}"
    st, _, _ = await c.request("PATCH", base + "/attributes", {"attributes": {"a": "1"}})
    assert st == 202
    st, _, _ = await c.request("PATCH", base + "/attributes", {"attributes": {"b": "2"}})
    assert conv.party(pid).attributes == {"a": "1", "b": "2"}
    st, body, _ = await c.request("PATCH", base + "/attributes", {"attributes": {"a": 1}})
    assert st == 400 and is_error_body(body, 400)
    flag = f"/api/v2/conversations/{conv.id}/participants/{pid}/flaggedreason"
    st, _, _ = await c.request("PUT", flag)
    assert st == 204 and conv.party(pid).flagged_reason == "general"
    st, _, _ = await c.request("DELETE", flag)
    assert st == 204 and conv.party(pid).flagged_reason is None
    st, body, _ = await c.request("DELETE", f"/api/v2/conversations/conferences/{conv.id}"
                                            f"/participants/{pid}")
    assert st == 405 and is_error_body(body, 405)
    st, body, _ = await c.request("POST", base, {"action": "REMOVE"})
    assert st == 400 and is_error_body(body, 400)
    assert conv.end is None


async def test_queues_paging_and_name(world: Any, sandbox_client: SandboxClient) -> None:
    for i in range(5):
        world.create_queue(f"Queue {i}")
    world.create_queue("Sales")
    st, body, _ = await sandbox_client.request("GET", "/api/v2/routing/queues?pageSize=2")
    assert st == 200 and body["total"] == 6 and body["pageCount"] == 3
    assert len(body["entities"]) == 2 and "nextUri" in body
    st, body, _ = await sandbox_client.request(
        "GET", "/api/v2/routing/queues?pageSize=2&pageNumber=3")
    assert len(body["entities"]) == 2 and "nextUri" not in body and "previousUri" in body
    st, body, _ = await sandbox_client.request("GET", "/api/v2/routing/queues?name=sales")
    assert [e["name"] for e in body["entities"]] == ["Sales"]
    st, body, _ = await sandbox_client.request("GET", "/api/v2/routing/queues?name=Queue*")
    assert body["total"] == 5
    st, body, _ = await sandbox_client.request("GET", "/api/v2/routing/queues?pageSize=x")
    assert st == 400


async def test_analytics_active_calls(world: Any, sandbox_client: SandboxClient) -> None:
    q1, q2 = world.create_queue("A"), world.create_queue("B")
    u = world.create_user("U")
    calls = [world.start_call(q1.id) for _ in range(3)]
    world.connect_agent(calls[0].id, u.id)
    other = world.start_call(q2.id)
    world.end_call(calls[2].id)

    def query(pred: list[dict[str, Any]], size: int = 100, number: int = 1) -> dict[str, Any]:
        return {"interval": "2020-01-01T00:00:00.000Z/2100-01-01T00:00:00.000Z",
                "conversationFilters": [{"type": "and", "predicates": [
                    {"type": "dimension", "dimension": "conversationEnd",
                     "operator": "notExists"}]}],
                "segmentFilters": [{"type": "or", "predicates": pred}],
                "paging": {"pageSize": size, "pageNumber": number}}

    path = "/api/v2/analytics/conversations/details/query"
    qp = [{"type": "dimension", "dimension": "queueId", "operator": "matches", "value": q1.id}]
    st, body, _ = await sandbox_client.request("POST", path, query(qp))
    assert st == 200 and body["totalHits"] == 2
    assert {x["conversationId"] for x in body["conversations"]} == {calls[0].id, calls[1].id}
    first = body["conversations"][0]
    assert first["participants"][0]["purpose"] == "customer"
    assert first["participants"][1]["sessions"][0]["segments"][0]["queueId"] == q1.id
    st, body, _ = await sandbox_client.request("POST", path, query(qp, size=1, number=2))
    assert body["totalHits"] == 2 and len(body["conversations"]) == 1
    st, body, _ = await sandbox_client.request("POST", path, query(qp, size=1, number=3))
    assert body == {"totalHits": 2}
    up = [{"type": "dimension", "dimension": "userId", "operator": "matches", "value": u.id}]
    st, body, _ = await sandbox_client.request("POST", path, query(up))
    assert [x["conversationId"] for x in body["conversations"]] == [calls[0].id]
    both = qp + [{"dimension": "queueId", "value": q2.id}]
    st, body, _ = await sandbox_client.request("POST", path, query(both))
    assert body["totalHits"] == 3 and other.id in {x["conversationId"]
                                                    for x in body["conversations"]}
    st, body, _ = await sandbox_client.request("POST", path, {"paging": {}})
    assert st == 400 and is_error_body(body, 400)
    st, body, _ = await sandbox_client.request("POST", path, {"interval": "x/y"})
    assert st == 400 and is_error_body(body, 400)
    later = {**query(qp), "interval": "2099-01-01T00:00:00.000Z/2100-01-01T00:00:00.000Z"}
    st, body, _ = await sandbox_client.request("POST", path, later)
    assert st == 200 and body == {"totalHits": 0}


# ------------------------------------------------------------------------ channels
async def test_channels_and_subscriptions(sandbox: Sandbox, world: Any,
                                          sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    q = world.create_queue("Q")
    u = world.create_user("U")
    st, ch, _ = await c.request("POST", "/api/v2/notifications/channels")
    assert st == 200 and ch["id"].startswith("streaming-")
    assert ch["connectUri"] == f"{sandbox.ws_base}/channels/{ch['id']}"
    assert ch["expires"].endswith("Z")
    st, body, _ = await c.request("GET", "/api/v2/notifications/channels")
    assert [e["id"] for e in body["entities"]] == [ch["id"]]
    subs = f"/api/v2/notifications/channels/{ch['id']}/subscriptions"
    st, body, _ = await c.request("PUT", subs, [{"id": qtopic(q.id)}])
    assert st == 200 and body["entities"] == [{"id": qtopic(q.id), "state": "Permitted"}]
    st, body, _ = await c.request("POST", subs, [{"id": utopic(u.id)}])
    assert {e["id"] for e in body["entities"]} == {qtopic(q.id), utopic(u.id)}
    st, body, _ = await c.request("GET", subs)
    assert len(body["entities"]) == 2
    bad = qtopic("no-such-queue")
    st, body, _ = await c.request("POST", subs, [{"id": bad}])
    assert st == 400 and is_error_body(body, 400) and bad in body["message"]
    st, body, _ = await c.request("POST", subs + "?ignoreErrors=true", [{"id": bad}])
    assert st == 200
    rej = [e for e in body["entities"] if e["id"] == bad][0]
    assert rej["state"] == "Rejected" and rej["rejectionReason"]
    assert rej["missingPermissions"] == []
    assert bad not in world.topic_index
    st, body, _ = await c.request("PUT", subs, [{"id": f"v2.users.{i}.presence"}
                                                for i in range(1001)])
    assert st == 400 and is_error_body(body, 400)
    st, body, _ = await c.request("PUT", subs, {"id": "x"})
    assert st == 400
    st, _, _ = await c.request("DELETE", subs)
    assert st == 200
    st, body, _ = await c.request("GET", subs)
    assert body["entities"] == []
    st, _, _ = await c.request("HEAD", f"/api/v2/notifications/channels/{ch['id']}")
    assert st == 200
    st, _, _ = await c.request("HEAD", "/api/v2/notifications/channels/streaming-nope")
    assert st == 404
    # revoked topic permission -> Rejected with missingPermissions
    world.clients[sandbox.client_id].permissions.discard("routing:queue:view")
    st, body, _ = await c.request("PUT", subs + "?ignoreErrors=true", [{"id": qtopic(q.id)}])
    assert body["entities"][0]["missingPermissions"] == ["routing:queue:view"]
    st, body, _ = await c.request("PUT", subs, [{"id": qtopic(q.id)}])
    assert st == 403 and is_error_body(body, 403)
    assert "Missing permission: routing:queue:view" in body["message"]
    assert qtopic(q.id) in body["message"]


async def test_twenty_first_channel_retires_lru_unconnected_first(
        sandbox: Sandbox, sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    ids: list[str] = []
    for _ in range(20):
        st, ch, _ = await c.request("POST", "/api/v2/notifications/channels")
        ids.append(ch["id"])
    # the oldest is connected: the oldest unconnected one goes instead
    sock = await c.connect(f"{sandbox.ws_base}/channels/{ids[0]}", ids[0])
    await wait_until(lambda: ids[0] in sandbox.conns)
    st, ch, _ = await c.request("POST", "/api/v2/notifications/channels")
    st, body, _ = await c.request("GET", "/api/v2/notifications/channels")
    live = {e["id"] for e in body["entities"]}
    assert len(live) == 20 and ids[0] in live and ids[1] not in live and ch["id"] in live
    await sock.close()


# ------------------------------------------------------------------------ WebSocket
async def test_socket_heartbeat_ping_and_events(sandbox: Sandbox, world: Any,
                                                sandbox_client: SandboxClient) -> None:
    q = world.create_queue("Q")
    u = world.create_user("U")
    sock = await sandbox_client.channel([qtopic(q.id)])
    hb = await sock.wait_for(lambda m: m.get("eventBody", {}).get("message")
                             == "WebSocket Heartbeat", timeout=5)
    assert hb["topicName"] == "channel.metadata" and hb["version"] == "2"
    assert hb["metadata"]["CorrelationId"]
    await sock.send({"message": "ping"})
    pong = await sock.wait_for(lambda m: m.get("eventBody", {}).get("message") == "pong")
    assert pong["topicName"] == "channel.metadata"
    conv = world.start_call(q.id)
    ev = await sock.next_event()
    assert ev["topicName"] == qtopic(q.id) and ev["eventBody"]["id"] == conv.id
    assert len(ev["eventBody"]["participants"]) == 2
    assert any(k.startswith("sandboxExtra") for k in ev["eventBody"])
    # subscribe over the socket to the user topic
    await sock.send({"message": "subscribe", "topics": [utopic(u.id)], "correlationId": "c1"})
    ack = await sock.wait_for(lambda m: m.get("correlationId") == "c1")
    assert ack["result"] == "200"
    assert utopic(u.id) in world.channels[sock.channel_id].topics
    world.connect_agent(conv.id, u.id)
    topics = set()
    for _ in range(2):
        topics.add((await sock.next_event())["topicName"])
    assert topics == {qtopic(q.id), utopic(u.id)}
    ev_rec = sandbox.journal.events[-1]
    assert ev_rec.conversation_id == conv.id and ev_rec.sockets == 2
    await sock.close()


async def test_events_lost_when_nobody_listens(sandbox: Sandbox, world: Any,
                                               sandbox_client: SandboxClient) -> None:
    q = world.create_queue("Q")
    sock = await sandbox_client.channel([qtopic(q.id)])
    await sock.close()
    await wait_until(lambda: not sandbox.conns)
    world.start_call(q.id)
    assert sandbox.journal.events[-1].sockets == 0
    sock2 = await sandbox_client.connect(f"{sandbox.ws_base}/channels/{sock.channel_id}",
                                         sock.channel_id)
    conv2 = world.start_call(q.id)
    ev = await sock2.next_event()
    assert ev["eventBody"]["id"] == conv2.id  # the first call's event is gone for good
    await sock2.close()


async def test_second_connection_closes_first(sandbox: Sandbox, world: Any,
                                              sandbox_client: SandboxClient) -> None:
    q = world.create_queue("Q")
    a = await sandbox_client.channel([qtopic(q.id)])
    b = await sandbox_client.connect(f"{sandbox.ws_base}/channels/{a.channel_id}",
                                     a.channel_id)
    msg = await a.ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    conv = world.start_call(q.id)
    assert (await b.next_event())["eventBody"]["id"] == conv.id
    await b.close()


async def gone_then_closed(sock: Socket) -> dict[str, Any]:
    m = await sock.wait_for(lambda m: isinstance(m, dict) and m.get("result") == "404")
    assert m["message"]
    msg = await sock.ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    return m


async def test_unknown_channel_gets_404_then_close(sandbox: Sandbox,
                                                   sandbox_client: SandboxClient) -> None:
    sock = await sandbox_client.connect(f"{sandbox.ws_base}/channels/streaming-nope", "x")
    await gone_then_closed(sock)


async def test_channel_expiry_and_token_revocation_stop_channels(
        sandbox: Sandbox, world: Any, sandbox_client: SandboxClient) -> None:
    q = world.create_queue("Q")
    a = await sandbox_client.channel([qtopic(q.id)])
    sandbox.expire_channel(a.channel_id)
    await gone_then_closed(a)
    st, _, _ = await sandbox_client.request(
        "HEAD", f"/api/v2/notifications/channels/{a.channel_id}")
    assert st == 404
    b = await sandbox_client.channel([qtopic(q.id)])
    world.revoke_tokens()
    await gone_then_closed(b)
    assert not world.channels
    await sandbox_client.login()
    c = await sandbox_client.channel([qtopic(q.id)])
    world.expire_tokens()
    await gone_then_closed(c)


async def test_resubscribe_extends_channel(sandbox: Sandbox, world: Any,
                                           sandbox_client: SandboxClient) -> None:
    q = world.create_queue("Q")
    sock = await sandbox_client.channel([qtopic(q.id)])
    ch = world.channels[sock.channel_id]
    ch.expires_at = time.time() + 100
    await sandbox_client.request(
        "PUT", f"/api/v2/notifications/channels/{sock.channel_id}/subscriptions",
        [{"id": qtopic(q.id)}])
    assert ch.expires_at > time.time() + 86000
    await sock.close()


async def test_socket_closing_then_close(sandbox: Sandbox, world: Any,
                                         sandbox_client: SandboxClient) -> None:
    q = world.create_queue("Q")
    sock = await sandbox_client.channel([qtopic(q.id)])
    await wait_until(lambda: sock.channel_id in sandbox.conns)
    assert sandbox.socket_closing(grace=0.3) == 1
    m = await sock.wait_for(lambda m: m.get("topicName") == "v2.system.socket_closing")
    assert m["version"] == "2"
    msg = await sock.ws.receive(timeout=5)
    while msg.type == aiohttp.WSMsgType.TEXT:  # heartbeats may still come first
        msg = await sock.ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert sock.channel_id in world.channels  # the channel itself lives on


# ------------------------------------------------------------------------ faults
async def test_drop_sockets_now_and_periodically(sandbox: Sandbox, world: Any,
                                                 sandbox_client: SandboxClient) -> None:
    q = world.create_queue("Q")
    sock = await sandbox_client.channel([qtopic(q.id)])
    await wait_until(lambda: sock.channel_id in sandbox.conns)
    assert sandbox.drop_sockets() == 1
    msg = await sock.ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.ERROR)
    sandbox.faults.configure({"dropEvery": 0.2})
    s2 = await sandbox_client.connect(f"{sandbox.ws_base}/channels/{sock.channel_id}",
                                      sock.channel_id)
    for _ in range(100):
        msg = await s2.ws.receive(timeout=5)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.ERROR)
    sandbox.faults.reset()


async def test_rest_bursts_latency_and_budget(sandbox: Sandbox, world: Any,
                                              sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    world.create_queue("Q")
    sandbox.faults.add_burst("GET", r"/routing/queues", 429, 2, retry_after=3)
    for _ in range(2):
        st, body, r = await c.request("GET", "/api/v2/routing/queues")
        assert st == 429 and r.headers["Retry-After"] == "3" and is_error_body(body, 429)
    st, _, _ = await c.request("GET", "/api/v2/routing/queues")
    assert st == 200
    sandbox.faults.configure({"burst": {"method": "*", "path": "queues", "status": 503,
                                        "count": 1}})
    st, body, _ = await c.request("GET", "/api/v2/routing/queues")
    assert st == 503 and is_error_body(body, 503)
    sandbox.faults.configure({"latency": 0.2})
    t0 = time.monotonic()
    st, _, _ = await c.request("GET", "/api/v2/routing/queues")
    assert st == 200 and time.monotonic() - t0 >= 0.2
    sandbox.faults.configure({"latency": 0, "budgetPerMinute": 3})
    statuses = [(await c.request("GET", "/api/v2/routing/queues"))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    st, body, r = await c.request("GET", "/api/v2/routing/queues")
    assert st == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    await c.login()  # the budget is per token
    st, _, _ = await c.request("GET", "/api/v2/routing/queues")
    assert st == 200
    assert [x.status for x in sandbox.journal.find("GET", "/routing/queues")][-3:] == \
        [429, 429, 200]
    # The budget is the org's allowance, not a fault: a fault reset keeps it and its window.
    sandbox.faults.reset()
    st, _, r = await c.request("GET", "/api/v2/routing/queues")
    assert st == 200 and "inin-ratelimit-allowed" not in r.headers  # today: no headers
    statuses = [(await c.request("GET", "/api/v2/routing/queues"))[0] for _ in range(2)]
    assert statuses == [200, 429]  # this token's window still counts after the reset
    # The legacy mode (a fault like the others) brings the headers back; a reset keeps it.
    sandbox.faults.configure({"legacyRatelimitHeaders": True})
    await c.login()
    sandbox.faults.reset()
    st, _, r = await c.request("GET", "/api/v2/routing/queues")
    assert st == 200 and r.headers["inin-ratelimit-allowed"] == "3"
    assert r.headers["inin-ratelimit-count"] == "1"


async def collect_events(sock: Socket, n: int, timeout: float = 5.0) -> list[Any]:
    """Call-event frames (parsed, or raw text if malformed) until n are in."""
    out: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(out) < n:
        m = await sock.recv(max(0.01, deadline - loop.time()))
        if isinstance(m, str) or (isinstance(m, dict) and m.get("topicName", "").endswith(
                ".calls")):
            out.append(m)
    return out


async def test_event_faults(sandbox: Sandbox, world: Any,
                            sandbox_client: SandboxClient) -> None:
    q = world.create_queue("Q")
    sock = await sandbox_client.channel([qtopic(q.id)])
    await wait_until(lambda: sock.channel_id in sandbox.conns)
    conv = world.start_call(q.id)
    await sock.next_event()
    f = sandbox.faults

    def versions(ms: list[Any]) -> list[Any]:
        return [m if isinstance(m, str) else
                m["eventBody"]["participants"][0]["attributes"].get("n") for m in ms]

    def bump(i: int) -> None:
        world.set_attributes(conv.id, conv.participants[0].id, {"n": str(i)})

    f.configure({"duplicate": {"next": 1}})
    bump(1)
    bump(2)
    assert versions(await collect_events(sock, 3)) == ["1", "1", "2"]
    f.configure({"lose": {"next": 1}})
    bump(3)
    bump(4)
    assert versions(await collect_events(sock, 1)) == ["4"]
    f.configure({"reorder": {"next": 1}})
    bump(5)
    bump(6)
    assert versions(await collect_events(sock, 2)) == ["6", "5"]
    f.configure({"malformed": {"next": 1}})
    bump(7)
    got = await collect_events(sock, 2)
    assert isinstance(got[0], str) and versions(got[1:]) == ["7"]
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(got[0])
    f.configure({"lose": {"probability": 1.0}})
    bump(8)
    f.configure({"lose": {"probability": 0.0}, "extraField": False})
    bump(9)
    ev = (await collect_events(sock, 1))[0]
    assert versions([ev]) == ["9"]
    assert not any(k.startswith("sandboxExtra") for k in ev["eventBody"])
    assert sandbox.send_raw(b"{not json") == 1
    assert await sock.recv() == "{not json"
    await sock.close()


# ------------------------------------------------------------------------ driver and journal
async def test_http_driver_journal_and_faults(sandbox: Sandbox,
                                              sandbox_client: SandboxClient) -> None:
    base = sandbox.base_url + "/sandbox"
    async with httpx.AsyncClient(base_url=base) as h:
        q = (await h.post("/create_queue", json={"name": "Sales"})).json()["result"]
        u = (await h.post("/create_user", json={"name": "Ann"})).json()["result"]
        sup = (await h.post("/create_user", json={"name": "Sue"})).json()["result"]
        sock = await sandbox_client.channel([qtopic(q["id"])])
        conv = (await h.post("/start_call", json={"queueId": q["id"]})).json()["result"]
        cid = conv["id"]
        agent = (await h.post("/connect_agent", json={"conversationId": cid,
                                                      "userId": u["id"]})).json()["result"]
        assert agent["purpose"] == "agent" and agent["state"] == "connected"
        ext = (await h.post("/add_external", json={"conversationId": cid})).json()["result"]
        assert ext["purpose"] == "external"
        s = (await h.post("/add_supervisor", json={
            "conversationId": cid, "userId": sup["id"], "targetParticipantId": agent["id"],
            "mode": "coach"})).json()["result"]
        assert s["coachedParticipantId"] == agent["id"]
        for op, args in (("set_attributes", {"participantId": ext["id"],
                                             "attributes": {"k": "v"}}),
                         ("set_flag", {"participantId": ext["id"]}),
                         ("set_party_state", {"participantId": agent["id"], "held": True,
                                              "muted": True}),
                         ("set_recording", {"state": "paused"}),
                         ("hangup", {"participantId": s["id"]})):
            r = await h.post("/" + op, json={"conversationId": cid, **args})
            assert r.status_code == 200, r.text
        call = (await h.get(f"/calls/{cid}")).json()
        byid = {p["id"]: p for p in call["participants"]}
        assert byid[ext["id"]]["attributes"] == {"k": "v"}
        assert byid[ext["id"]]["flaggedReason"] == "general"
        assert byid[agent["id"]]["held"] and byid[agent["id"]]["muted"]
        assert call["recordingState"] == "paused" and call["securePause"]
        assert byid[s["id"]]["state"] == "disconnected"
        evs = await collect_events(sock, 9)
        assert evs[-1]["eventBody"]["participants"][-1]["state"] == "disconnected"
        r = await h.post("/end_call", json={"conversationId": cid})
        assert r.status_code == 200
        assert (await h.post("/nope", json={})).status_code == 404
        assert (await h.post("/start_call", json={})).status_code == 400
        assert (await h.post("/start_call", json={"queueId": "zz"})).status_code == 404
        # faults over HTTP
        r = await h.post("/faults", json={"burst": {"method": "GET", "path": "queues",
                                                    "status": 500, "count": 1}})
        assert r.json()["bursts"][0]["status"] == 500
        st, _, _ = await sandbox_client.request("GET", "/api/v2/routing/queues")
        assert st == 500
        assert (await h.post("/faults", json={"bogus": 1})).status_code == 400
        r = await h.post("/faults/drop_sockets", json={})
        assert r.json()["affected"] == 1
        await h.post("/faults/expire_tokens", json={})
        st, _, _ = await sandbox_client.request("GET", "/api/v2/routing/queues")
        assert st == 401
        await h.post("/faults/reset", json={})
        r = await h.post("/configure", json={"heartbeatInterval": 0.5, "tokenLifetime": 120,
                                             "patchFinalStatus": 400})
        assert r.json()["result"]["heartbeatInterval"] == 0.5
        assert sandbox.patch_final_status == 400
        await sandbox_client.login()
        assert sandbox.world.tokens[sandbox_client.token].expires_at < time.time() + 121
        extra = (await h.post("/add_client", json={})).json()["result"]
        await sandbox_client.login(extra["clientId"], extra["clientSecret"])
        r = await h.post("/set_permissions", json={"clientId": extra["clientId"],
                                                   "revoke": ["routing:queue:view"]})
        assert "routing:queue:view" not in r.json()["result"]["permissions"]
        state = (await h.get("/state")).json()
        assert state["clientId"] == sandbox.client_id and state["activeCalls"] == 0
        j = (await h.get("/journal")).json()
        assert [x["status"] for x in j["requests"]
                if x["path"] == "/api/v2/routing/queues"][-1] == 401
        assert {"time", "perf_ns", "method", "path", "query", "body", "status"} <= \
            set(j["requests"][0])
        assert all(e["conversation_id"] == cid for e in j["events"])
        seqs = [e["seq"] for e in j["events"]]
        assert seqs == sorted(seqs) and len(seqs) >= 10
        since = (await h.get("/journal", params={"sinceEvent": seqs[-2]})).json()
        assert [e["seq"] for e in since["events"]] == seqs[-1:]
        await h.delete("/journal")
        assert (await h.get("/journal")).json() == {"requests": [], "events": []}
    await sock.close()


# ------------------------------------------------------------------------ thread / CLI
def test_run_in_thread() -> None:
    sb = Sandbox()
    with sb.run_in_thread() as s:
        q = s.call(s.world.create_queue, "Q")
        r = httpx.get(s.base_url + "/sandbox/state", timeout=5)
        assert r.json()["queues"] == [{"id": q.id, "name": "Q"}]
    with pytest.raises(httpx.ConnectError):
        httpx.get(sb.base_url + "/sandbox/state", timeout=2)


def test_python_m_daemon_sandbox_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.sandbox", "--heartbeat", "1",
                             "--scenario", "conference"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines: dict[str, list[str]] = {}
        assert proc.stdout is not None
        for _ in range(50):
            line = proc.stdout.readline()
            if not line:
                break
            key, _, val = line.partition(":")
            lines.setdefault(key.strip(), []).append(val.strip())
            if key == "call":
                break
        assert len(lines["queue"]) == 3 and lines["client id"] and lines["secret"]
        base = lines["api"][0].removesuffix("/api/v2")
        r = httpx.post(base + "/oauth/token", data={"grant_type": "client_credentials"},
                       auth=(lines["client id"][0], lines["secret"][0]), timeout=5)
        assert r.status_code == 200
        tok = r.json()["access_token"]
        cid = lines["call"][0]
        r = httpx.get(f"{base}/api/v2/conversations/calls/{cid}",
                      headers={"Authorization": f"Bearer {tok}"}, timeout=5)
        assert len(r.json()["participants"]) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def test_malformed_inputs_get_clean_errors(sandbox: Sandbox,
                                                 sandbox_client: SandboxClient) -> None:
    c = sandbox_client
    path = "/api/v2/analytics/conversations/details/query"
    iv = "2020-01-01T00:00:00Z/2100-01-01T00:00:00Z"
    st, body, _ = await c.request("POST", path, {"interval": iv, "paging": "x"})
    assert st == 400 and is_error_body(body, 400)
    st, body, _ = await c.request("POST", path, {"interval": iv,
                                                 "paging": {"pageSize": "many"}})
    assert st == 400
    async with aiohttp.ClientSession() as s:
        async with s.post(sandbox.base_url + "/api/v2/notifications/channels/x/subscriptions",
                          data=b"{nope", headers={"Authorization": f"Bearer {c.token}",
                                                  "Content-Type": "application/json"}) as r:
            assert r.status == 400 and is_error_body(await r.json(), 400)
        for url, payload in (("/sandbox/set_attributes", {"conversationId": "x",
                                                          "participantId": "y",
                                                          "attributes": "z"}),
                             ("/sandbox/faults", {"burst": "x"}),
                             ("/sandbox/start_call", [1])):
            async with s.post(sandbox.base_url + url, json=payload) as r:
                assert r.status in (400, 404), url
        # credentials in a token request's form body never reach the journal
        async with s.post(sandbox.base_url + "/oauth/token",
                          data={"grant_type": "client_credentials", "client_id": "a",
                                "client_secret": "TOPSECRET"}) as r:
            assert r.status == 401
    assert "TOPSECRET" not in repr(list(sandbox.journal.requests))


async def test_cli_register_and_serve_in_process() -> None:
    import argparse
    import io

    from daemon.commands import sandbox as cli

    parser = argparse.ArgumentParser(prog="confguard")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sandbox", "--heartbeat", "0.5", "--budget", "0",
                              "--client-id", "cid", "--client-secret", "sec"])
    assert args.func is cli.run and args.port == 0
    out, stop = io.StringIO(), asyncio.Event()
    task = asyncio.create_task(cli.serve(args, out, stop))
    await wait_until(lambda: "call" in out.getvalue() or "user:" in out.getvalue())
    text = out.getvalue()
    assert "client id:  cid" in text and "secret:     sec" in text
    assert text.count("queue:") == 3
    base = text.split("api:")[1].split()[0].removesuffix("/api/v2")
    async with httpx.AsyncClient() as h:
        r = await h.post(base + "/oauth/token", auth=("cid", "sec"),
                         data={"grant_type": "client_credentials"})
        assert r.status_code == 200
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    bad = parser.parse_args(["sandbox", "--heartbeat", "0"])
    assert await cli.serve(bad, io.StringIO()) == 2
