"""The sandbox's EventBridge publishing (daemon/sandbox/eventbridge.py) into a real SQS queue
(moto server on 127.0.0.1): the bodies conform to the SDK 269 detail-event models, every
change of the world is published, and the scenario faults lose an event on one path only
or delay EventBridge."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
from _moto import MotoServer, moto_server, unique_name  # noqa: F401
from sandbox_fixtures import SandboxClient
from test_conformance_sandbox import conforms, rich_call

from daemon.core.eventbridge import DetailEvent, decode
from daemon.sandbox import Sandbox
from daemon.service.aws import aws_client

pytest.importorskip("PureCloudPlatformClientV2.models")

MODELS = {
    "attributes": "AttributeDetailEventTopicAttributeUpdateEvent",
    "customer.start": "CustomerStartDetailEventTopicCustomerStartEvent",
    "customer.end": "CustomerEndDetailEventTopicCustomerEndEvent",
    "user.start": "UserStartDetailEventTopicUserStartEvent",
    "user.end": "UserEndDetailEventTopicUserEndEvent",
    "acd.start": "AcdStartDetailEventTopicAcdStartEvent",
    "acd.end": "AcdEndDetailEventTopicAcdEndEvent",
    "flow.start": "FlowStartDetailEventTopicFlowStartEvent",
    "flow.end": "FlowEndDetailEventTopicFlowEndEvent",
    "voicemail.start": "VoicemailStartDetailEventTopicVoicemailStartEvent",
    "voicemail.end": "VoicemailEndDetailEventTopicVoicemailEndEvent",
}
ENVELOPE_KEYS = {"version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"}


async def drain(moto: MotoServer, url: str, *, want: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Receive (and delete) messages until `want` arrived or `timeout` s passed."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    async with aws_client("sqs", region=moto.region, endpoint_url=moto.endpoint_url) as sqs:
        while len(out) < want and time.monotonic() < deadline:
            got = await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            msgs = got.get("Messages", [])
            for m in msgs:
                out.append(orjson.loads(m["Body"]))
            if msgs:
                await sqs.delete_message_batch(QueueUrl=url, Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])
    return out


async def eb_sandbox(moto: MotoServer) -> tuple[Sandbox, str]:
    url = moto.create_queue(unique_name("sandbox-eb"))
    sb = Sandbox(heartbeat_interval=1.0, closing_grace=0.5, seed=1,
                 eventbridge_queue_url=url, eventbridge_endpoint_url=moto.endpoint_url)
    await sb.start()
    return sb, url


async def test_detail_events_conform_to_the_sdk_models(moto_server: MotoServer) -> None:  # noqa: F811
    sb, url = await eb_sandbox(moto_server)
    try:
        _, _, conv = rich_call(sb)
        sb.world.end_call(conv.id)
        assert sb.eventbridge is not None
        emitted = sb.eventbridge.stats.emitted
        assert emitted > 10
        msgs = await drain(moto_server, url, want=emitted)
    finally:
        await sb.stop()
    assert len(msgs) == emitted
    kinds: dict[str, int] = {}
    for m in msgs:
        assert set(m) == ENVELOPE_KEYS
        d = m["detail"]
        assert set(d) == {"topicName", "version", "eventBody", "metadata", "timestamp"}
        kind = d["topicName"].split(f".{conv.id}.", 1)[1]
        assert m["detail-type"] == f"v2.detail.events.conversation.{{id}}.{kind}"
        assert m["source"].startswith("aws.partner/genesys.com/cloud/")
        conforms(d["eventBody"], MODELS[kind])
        decoded = decode(orjson.dumps(m))  # the daemon's decoder reads what the sandbox writes
        assert isinstance(decoded, DetailEvent) and decoded.kind == kind, decoded
        kinds[kind] = kinds.get(kind, 0) + 1
    # customer + external -> customer.*, agents and supervisors -> user.*, the queue -> acd.*
    assert {"customer.start", "customer.end", "user.start", "user.end", "acd.start", "acd.end",
            "attributes"} <= set(kinds)
    # one start and one end per participant
    assert kinds["customer.start"] + kinds["user.start"] + kinds["acd.start"] == len(conv.participants)
    assert kinds["customer.end"] + kinds["user.end"] + kinds["acd.end"] == len(conv.participants)


async def test_lose_on_one_path_only_and_delay(moto_server: MotoServer) -> None:  # noqa: F811
    sb, url = await eb_sandbox(moto_server)
    w = sb.world
    q = w.create_queue("Sales")
    async with aiohttp.ClientSession() as session:
        client = SandboxClient(sb, session)
        try:
            sock = await client.channel([f"v2.routing.queues.{q.id}.conversations.calls"])
            conv = w.start_call(q.id)
            cust = conv.participants[0]
            await sock.next_event()
            assert {m["detail"]["topicName"].rsplit(".", 2)[-2] + "." + m["detail"]["topicName"].rsplit(".", 1)[-1]
                    for m in await drain(moto_server, url, want=2)} == {"customer.start", "acd.start"}

            # lost on the WebSocket only: the queue still gets the attribute event
            async with session.post(f"{sb.base_url}/sandbox/lose_event",
                                    json={"on": "websocket", "conversationId": conv.id}) as r:
                assert r.status == 200, await r.text()
            w.set_attributes(conv.id, cust.id, {"complianceFlag": "true"})
            got = await drain(moto_server, url, want=1)
            assert [m["detail"]["eventBody"]["attributes"] for m in got] == [{"complianceFlag": "true"}]
            w.set_attributes(conv.id, cust.id, {"next": "1"})  # this one reaches the socket again
            ev = await sock.next_event()
            assert ev["eventBody"]["participants"][0]["attributes"]["next"] == "1"
            assert len(await drain(moto_server, url, want=1)) == 1

            # lost on EventBridge only: the socket gets it, the queue does not
            sb.faults.lose_change("eventbridge", conv.id)
            w.set_attributes(conv.id, cust.id, {"other": "x"})
            ev = await sock.next_event()
            assert ev["eventBody"]["participants"][0]["attributes"]["other"] == "x"
            assert await drain(moto_server, url, want=1, timeout=1.5) == []
            assert sb.eventbridge is not None and sb.eventbridge.stats.lost == 1

            # delayed on EventBridge by 1.5 s
            async with session.post(f"{sb.base_url}/sandbox/delay_eventbridge", json={"seconds": 1.5}) as r:
                assert r.status == 200
            t0 = time.monotonic()
            w.set_attributes(conv.id, cust.id, {"late": "y"})
            got = await drain(moto_server, url, want=1)
            assert len(got) == 1 and time.monotonic() - t0 >= 1.4
            async with session.post(f"{sb.base_url}/sandbox/lose_event", json={"on": "nowhere"}) as r:
                assert r.status == 400
            await sock.close()
        finally:
            await sb.stop()


async def test_sqs_down_keeps_the_events_until_it_is_back(moto_server: MotoServer) -> None:  # noqa: F811
    sb, url = await eb_sandbox(moto_server)
    assert sb.eventbridge is not None
    sb.eventbridge.retry_interval = 0.1
    try:
        q = sb.world.create_queue("Sales")
        moto_server.stop()
        try:
            sb.world.start_call(q.id)
            for _ in range(100):
                if sb.eventbridge.stats.send_errors:
                    break
                await asyncio.sleep(0.05)
            assert sb.eventbridge.stats.send_errors >= 1 and sb.eventbridge.stats.sent == 0
        finally:
            moto_server.start()
        assert len(await drain(moto_server, url, want=2)) == 2
    finally:
        await sb.stop()
