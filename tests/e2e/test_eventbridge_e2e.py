"""Issue 19's "Done when", end to end: `confguard run` (a child process) with an `eventbridge:`
section, the sandbox publishing every change as detail events into a real SQS queue (moto's
server on 127.0.0.1) 1 s after the WebSocket, as EventBridge would; REST, WebSocket and SQS
are all real sockets. Nothing in the product is replaced."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from _daemon_harness import (SALES, DaemonProcess, credentials_env, sample, sandbox_queue, wait_until,
                             write_config)
from _moto import MotoServer, moto_server, unique_name  # noqa: F401

from daemon.core.topics import queue_topic
from daemon.sandbox import Sandbox
from daemon.sandbox.scenario import conference
from daemon.sandbox.world import Conversation, Party

AGENT = "a11ce000-0000-4000-8000-0000000000e1"
FLAG = {"complianceFlag": "true"}


def eb_config(folder: Path, sb: Sandbox, moto: MotoServer, queue_url: str) -> Path:
    cfg = write_config(folder, sb.base_url, extra_top=(
        f"eventbridge:\n  queue_url: {queue_url}\n  endpoint_url: {moto.endpoint_url}\n  wait_seconds: 2\n"))
    text = cfg.read_text().replace("subscriptions:\n", "subscriptions:\n  reconcile_interval: 0\n", 1)
    cfg.write_text(text.replace("max_disconnects_per_minute: 30", "max_disconnects_per_minute: 1000"))
    return cfg


@asynccontextmanager
async def eventbridge_stack(moto: MotoServer, tmp_path: Path, *, delay: float = 1.0
                            ) -> AsyncIterator[tuple[Sandbox, DaemonProcess, str]]:
    url = moto.create_queue(unique_name("e2e-eb"), visibility_timeout=5)
    sb = Sandbox(heartbeat_interval=1.0, closing_grace=0.5, seed=7, eventbridge_queue_url=url,
                 eventbridge_endpoint_url=moto.endpoint_url)
    sb.faults.eventbridge_delay = delay
    await sb.start()
    sandbox_queue(sb)
    if AGENT not in sb.world.users:
        sb.world.create_user("Agent E", AGENT)
    d = DaemonProcess(eb_config(tmp_path, sb, moto, url), credentials_env(sb), tmp_path)
    try:
        await d.start()
        await d.wait_ready()
        yield sb, d, url
    finally:
        await d.close()
        await sb.stop()


def external(conv: Conversation) -> Party:
    return next(p for p in conv.participants if p.purpose == "external")


def gets(sb: Sandbox, cid: str) -> int:
    return len(sb.journal.find("GET", f"/conversations/calls/{cid}"))


async def all_consumed(d: DaemonProcess, sb: Sandbox, timeout: float = 15.0) -> str:
    """/metrics once the daemon deleted every message the sandbox sent (and nothing waits)."""
    eb = sb.eventbridge
    assert eb is not None

    def done(text: str) -> bool:
        deleted = sample(text, "confguard_source_messages_total", source="eventbridge", stage="deleted") or 0
        return eb.pending == 0 and deleted >= eb.stats.sent
    return await d.wait_metrics(done, timeout, "every queue message consumed")


def envelope(kind: str, cid: str, body: dict[str, Any], *, eid: str | None = None) -> str:
    now = time.time()
    return orjson.dumps({
        "version": "0", "id": eid or str(uuid.uuid4()), "detail-type": f"v2.detail.events.conversation.{{id}}.{kind}",
        "source": "aws.partner/genesys.com/cloud/org/test", "account": "123456789012",
        "time": "2026-12-07T19:00:00Z", "region": "eu-west-1", "resources": [],
        "detail": {"topicName": f"v2.detail.events.conversation.{cid}.{kind}", "version": "2",
                   "eventBody": {"eventTime": int(now * 1000), "conversationId": cid, **body},
                   "metadata": {"CorrelationId": str(uuid.uuid4())}, "timestamp": "2026-12-07T19:00:00.123Z"},
    }).decode()


async def test_queue_delivers_what_the_websocket_lost(moto_server: MotoServer, tmp_path: Path) -> None:  # noqa: F811
    async with eventbridge_stack(moto_server, tmp_path) as (sb, d, url):
        w = sb.world
        eb = sb.eventbridge
        assert eb is not None

        # 1. A flag lost on the WebSocket, delivered on the queue 1 s later: acted on within
        #    5 s of the message's arrival (reconcile_interval: 0), exactly one PATCH.
        c1 = conference(w, SALES, AGENT)
        await all_consumed(d, sb)  # its queue messages come 1 s after its frames: the state has c1
        sb.faults.lose_change("websocket", c1.id)
        w.set_attributes(c1.id, external(c1).id, FLAG)
        assert sb.journal.events[-1].sockets == 0  # the WebSocket never got it
        await wait_until(lambda: sb.journal.patches(c1.id), 15, "the PATCH for the flag lost on the WebSocket")
        patch = sb.journal.patches(c1.id)[0]
        arrived = next(t for t, cid, kind in eb.stats.sent_log if cid == c1.id and kind == "attributes")
        assert patch.time - arrived < 5.0, f"{patch.time - arrived:.2f} s after the message arrived"
        assert patch.path.endswith(f"/participants/{external(c1).id}")

        # 2. The same event delivered on both: the WebSocket acts, the queue's copy costs no read.
        await all_consumed(d, sb)
        c2 = conference(w, SALES, AGENT)
        await all_consumed(d, sb)
        before = gets(sb, c2.id)
        w.set_attributes(c2.id, external(c2).id, FLAG)
        await wait_until(lambda: sb.journal.patches(c2.id), 10, "the PATCH for c2")
        text = await all_consumed(d, sb)
        assert gets(sb, c2.id) == before, "a detail event the state already showed cost a REST read"
        assert (sample(text, "confguard_source_skipped_total", source="eventbridge", reason="reflected") or 0) > 0

        # 3. Duplicated and reordered queue messages (the WebSocket and the sandbox's queue both
        #    lost the change; these come from the test): one PATCH.
        c3 = conference(w, SALES, AGENT)
        await all_consumed(d, sb)
        ext3 = external(c3)
        sb.faults.lose_change("both", c3.id)
        w.set_attributes(c3.id, ext3.id, FLAG)
        sqs = moto_server.boto3("sqs")
        flag = envelope("attributes", c3.id, {"participantId": ext3.id, "attributes": FLAG}, eid="dup-1")
        for body in (envelope("customer.start", c3.id, {"participantId": ext3.id, "mediaType": "VOICE"}),
                     flag, flag,
                     envelope("attributes", c3.id, {"participantId": ext3.id, "attributes": FLAG})):
            sqs.send_message(QueueUrl=url, MessageBody=body)
        await wait_until(lambda: sb.journal.patches(c3.id), 10, "the PATCH for c3")
        await d.wait_metrics(lambda t: (sample(t, "confguard_source_skipped_total", source="eventbridge",
                                               reason="duplicate") or 0) >= 1, 10, "the duplicate skipped")
        await wait_until(lambda: moto_server.queue_depth(url) == (0, 0), 10, "the queue drained")

        # 4. A call never seen on the WebSocket whose acd.start names a queue in scope: read and judged.
        hidden = str(uuid.uuid4())
        sb.faults.lose_change("websocket", hidden, count=2)
        conv = w.start_call(SALES, conversation_id=hidden)
        w.set_attributes(hidden, conv.participants[0].id, FLAG)
        await wait_until(lambda: sb.journal.patches(hidden), 15, "the PATCH for the call seen only on the queue")
        text = await d.wait_metrics(lambda t: sample(t, "confguard_source_rereads_total", source="eventbridge",
                                                     reason="unseen_call_in_scope"), 10, "the unseen-call re-read")

        # 5. Malformed messages: counted by reason, deleted, the daemon keeps running.
        for body in ("not json", orjson.dumps({"version": "0", "id": "x", "detail-type": "aws.other",
                                               "source": "s", "detail": {}}).decode(),
                     envelope("attributes", c1.id, {"participantId": 7, "attributes": FLAG})):
            sqs.send_message(QueueUrl=url, MessageBody=body)
        text = await d.wait_metrics(lambda t: all(
            sample(t, "confguard_events_rejected_total", source="eventbridge", reason=r)
            for r in ("not_json", "unknown_detail_type", "bad_event_body")), 10, "the rejections")
        await wait_until(lambda: moto_server.queue_depth(url) == (0, 0), 10, "malformed messages deleted")
        assert len(d.events("event_rejected", source="eventbridge")) == 3
        status, _ = await d.get("/readyz")
        assert status == 200

        # 6. A call-topic message (its detail is a WebSocket frame) goes through the frame
        #    path: applied and judged at once, no REST read.
        c6 = conference(w, SALES, AGENT)
        await all_consumed(d, sb)
        sb.faults.lose_change("both", c6.id)
        w.set_attributes(c6.id, external(c6).id, FLAG)
        reads = gets(sb, c6.id)
        frame = {"topicName": queue_topic(SALES), "version": "2", "eventBody": w.calls[c6.id].event_body(),
                 "metadata": {"CorrelationId": str(uuid.uuid4())}}
        sqs.send_message(QueueUrl=url, MessageBody=orjson.dumps({
            "version": "0", "id": str(uuid.uuid4()), "detail-type": "v2.routing.queues.{id}.conversations.calls",
            "source": "aws.partner/genesys.com/cloud/org/test", "account": "123456789012",
            "time": "2026-12-07T19:00:00Z", "region": "eu-west-1", "resources": [], "detail": frame}).decode())
        await wait_until(lambda: sb.journal.patches(c6.id), 10, "the PATCH from the call-topic message")
        assert gets(sb, c6.id) == reads

        # nobody was removed twice
        await all_consumed(d, sb)
        for cid in (c1.id, c2.id, c3.id, hidden, c6.id):
            assert len(sb.journal.patches(cid)) == 1, cid


async def test_queue_unreachable_degrades_and_recovers(moto_server: MotoServer, tmp_path: Path) -> None:  # noqa: F811
    async with eventbridge_stack(moto_server, tmp_path, delay=0.5) as (sb, d, _url):
        await d.wait_event("eventbridge_started")
        body = await d.wait_http("/healthz", 200)
        assert body["sources"]["eventbridge"]["state"] == "up"
        assert body["sources"]["websocket"]["state"] == "up"
        moto_server.stop()
        try:
            async def degraded() -> dict[str, Any]:
                for _ in range(400):
                    b = await d.wait_http("/healthz", 200)
                    if b["sources"]["eventbridge"]["state"] == "degraded":
                        return b
                    await asyncio.sleep(0.05)
                raise AssertionError("the eventbridge source never showed degraded")
            b = await degraded()
            assert b["sources"]["eventbridge"]["ready"] is False and b["sources"]["websocket"]["state"] == "up"
            status, _ = await d.get("/readyz")
            assert status == 200  # optional source: the daemon stays ready
            await d.wait_event("eventbridge_receive_failed", kind="unreachable")
            text = await d.metrics()
            assert sample(text, "confguard_source_up", source="eventbridge") == 0
            # the WebSocket path keeps working meanwhile
            c = conference(sb.world, SALES, AGENT)
            sb.world.set_attributes(c.id, external(c).id, FLAG)
            await wait_until(lambda: sb.journal.patches(c.id), 10, "a removal through the WebSocket")
        finally:
            moto_server.start()
        await d.wait_event("eventbridge_recovered", timeout=20)
        b = await d.wait_http("/healthz", 200)
        assert b["sources"]["eventbridge"]["state"] == "up"
        # and the queue works again: a flag lost on the WebSocket is acted on
        c2 = conference(sb.world, SALES, AGENT)
        sb.faults.lose_change("websocket", c2.id)
        sb.world.set_attributes(c2.id, external(c2).id, FLAG)
        await wait_until(lambda: sb.journal.patches(c2.id), 15, "the PATCH after recovery")
        assert len(sb.journal.patches(c.id)) == 1


async def test_without_an_eventbridge_section_no_aws_library_is_imported(tmp_path: Path) -> None:
    sb = Sandbox(heartbeat_interval=1.0, closing_grace=0.5)
    await sb.start()
    sandbox_queue(sb)
    d = DaemonProcess(write_config(tmp_path, sb.base_url), credentials_env(sb, PYTHONPROFILEIMPORTTIME="1"),
                      tmp_path)
    try:
        await d.start()
        body = await d.wait_ready()
        assert body.get("ready", True)
        health = await d.wait_http("/healthz", 200)
        assert set(health["sources"]) == {"websocket"}
        imported = d.stderr_path.read_text(errors="replace")
        assert "daemon.service.eventbridge" in imported  # the import trace works ...
        assert not any(m in imported for m in ("aiobotocore", "botocore", "boto3")), "an AWS library was imported"
    finally:
        await d.close()
        await sb.stop()


async def test_a_failed_reread_leaves_the_message_for_another_delivery(moto_server: MotoServer,  # noqa: F811
                                                                        tmp_path: Path) -> None:
    """The message is deleted only once its re-read succeeded: a re-read that fails (the
    GET answers 503 past the client's retries) leaves it in the queue; SQS offers it again
    after the visibility timeout (5 s here) and the second delivery is acted on."""
    async with eventbridge_stack(moto_server, tmp_path) as (sb, d, url):
        w = sb.world
        c = conference(w, SALES, AGENT)
        await all_consumed(d, sb)
        sb.faults.add_burst("GET", f"/conversations/calls/{c.id}$", 503, 3)  # 1 try + 2 retries
        sb.faults.lose_change("websocket", c.id)
        w.set_attributes(c.id, external(c).id, FLAG)
        await d.wait_event("reread_failed", timeout=15, conversation_id=c.id)
        assert moto_server.queue_depth(url)[1] == 1  # in flight, not deleted
        assert not sb.journal.patches(c.id)
        await wait_until(lambda: sb.journal.patches(c.id), 20, "the PATCH after the second delivery")
        await wait_until(lambda: moto_server.queue_depth(url) == (0, 0), 10, "the message deleted")
        assert len(sb.journal.patches(c.id)) == 1


async def test_access_denied_degrades_and_recovers(moto_server: MotoServer, tmp_path: Path) -> None:  # noqa: F811
    async with eventbridge_stack(moto_server, tmp_path, delay=0.5) as (sb, d, _url):
        await d.wait_event("eventbridge_started")
        with moto_server.denying():
            rec = await d.wait_event("eventbridge_receive_failed", timeout=30, kind="access_denied")
            assert "testing" not in str(rec)  # the access key's secret never shows
            body = await d.wait_http("/healthz", 200)
            assert body["sources"]["eventbridge"]["state"] == "degraded"
            assert body["sources"]["eventbridge"]["last_error"].startswith("access_denied")
            text = await d.metrics()
            assert (sample(text, "confguard_source_errors_total", source="eventbridge", kind="access_denied")
                    or 0) >= 1
        await d.wait_event("eventbridge_recovered", timeout=20)
        c = conference(sb.world, SALES, AGENT)
        await all_consumed(d, sb)
        sb.faults.lose_change("websocket", c.id)
        sb.world.set_attributes(c.id, external(c).id, FLAG)
        await wait_until(lambda: sb.journal.patches(c.id), 15, "the PATCH once access is back")
