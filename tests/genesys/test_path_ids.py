"""Issue 21: no id can change a REST path. `core.ids` decides; the REST client refuses a
bad path id before anything is sent (`InvalidIdError`, a 400 with code invalid_id) and the
event parser rejects a call event whose conversation id could not be a path segment."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from daemon.config import Credentials, GenesysSettings
from daemon.core.events import Rejected, parse_message
from daemon.core.ids import is_path_id, is_uuid
from daemon.errors import InvalidIdError
from daemon.genesys.api import ROUTE_PARTICIPANT, GenesysClient, build_path
from daemon.genesys.ratelimit import RequestLimiter

UUID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
BAD = ["..", ".", "...", "%2e", "%2e%2e", "a/b", "../x", "", " ", "a b", "a?b", "a#b", "x" * 129,
       "\x00", "é"]


def test_the_id_predicates() -> None:
    assert is_uuid(UUID) and is_uuid(UUID.upper())
    for bad in BAD + ["not-a-uuid", UUID + "\n", UUID[:-1], None, 5]:
        assert not is_uuid(bad), bad
    for good in (UUID, "c1", "streaming-0a1b", "platform.api", "a.b", "_x-"):
        assert is_path_id(good), good
    for bad in BAD:
        assert not is_path_id(bad), bad


def test_build_path_refuses_what_would_change_the_path() -> None:
    assert build_path("PATCH", ROUTE_PARTICIPANT, {"conversationId": UUID, "participantId": "p1"}) \
        == f"/api/v2/conversations/calls/{UUID}/participants/p1"
    for bad in BAD:
        with pytest.raises(InvalidIdError) as info:
            build_path("GET", ROUTE_PARTICIPANT, {"conversationId": UUID, "participantId": bad})
        assert info.value.status == 400 and info.value.code == "invalid_id"


async def test_the_client_sends_nothing_for_a_bad_id() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": "tok-0123456789abcdef",
                                             "token_type": "bearer", "expires_in": 86400})
        return httpx.Response(200, json={"id": "x", "participants": []})

    settings = GenesysSettings(api_base_url="http://127.0.0.1:9", login_base_url="http://127.0.0.1:9")
    async with GenesysClient(settings, Credentials("id", "secret"), limiter=RequestLimiter(60000),
                             transport=httpx.MockTransport(handler)) as client:
        calls: list[Any] = []
        for bad in ("..", ".", "%2e", "a/b"):
            calls += [client.get_call(bad), client.disconnect_participant(UUID, bad),
                      client.disconnect_participant(bad, UUID), client.channel_exists(bad)]
        for call in calls:
            with pytest.raises(InvalidIdError):
                await call
    assert [r for r in seen if r.url.path != "/oauth/token"] == []


def test_an_event_with_a_dot_segment_conversation_id_is_rejected() -> None:
    for bad in ("..", ".", "a/b", "%2e"):
        frame = orjson.dumps({"topicName": f"v2.routing.queues.{UUID}.conversations.calls",
                              "eventBody": {"id": bad, "participants": []}})
        msg = parse_message(frame)
        assert isinstance(msg, Rejected) and msg.reason == "invalid_id", (bad, msg)
