"""The control API over real sockets: a sandbox, an in-process daemon, aiohttp requests.

Every status of the contract (202, 400, 401, 404, 409, 413, 429, 503), the GETs,
idempotency, the audit naming the caller and the reason, and the one-PATCH guarantees
under concurrency."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from _control_stack import OTHER_TOKEN, TOKEN, control_stack, wait_tracked
from _daemon_harness import read_jsonl
from daemon.service.control.openapi import build_document

ERROR_KEYS = {"status", "code", "message"}


def _counter(daemon: Any, attr: str, **labels: str) -> float:
    total = 0.0
    for fam in getattr(daemon.metrics, attr).collect():
        for s in fam.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _conference(sb: Any, q: str, address: str = "tel:+14155550123") -> tuple[str, str, str]:
    """A call with customer, agent and an external party: (conversation, agent, external)."""
    w = sb.world
    conv = w.start_call(q)
    agent = w.connect_agent(conv.id, w.create_user("Agent").id)
    ext = w.add_external(conv.id, address, name="Outside Line")
    return conv.id, agent.id, ext.id


def _patched(sb: Any, cid: str) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in sb.journal.patches(cid)]


async def test_remove_by_address_202_then_disconnected(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        cid, _, ext = _conference(sb, q)
        await wait_tracked(daemon, cid, ext)
        st, body, _ = await api.eject({"conversationId": cid, "address": "+1 (415) 555-0123",
                                       "reason": "consent withdrawn"})
        assert st == 202, body
        assert set(body) == {"id", "state", "conversationId", "participantId"}
        assert body["participantId"] == ext and body["conversationId"] == cid
        assert body["state"] == "pending"
        final = await api.wait_final(body["id"])
        assert final["state"] == "disconnected", final
        assert final["httpStatus"] == 202 and final["attempts"] == 1
        assert final["caller"] == "orchestrator" and final["reason"] == "consent withdrawn"
        assert final["requestedAt"] and final["sentAt"] and final["confirmedAt"]
        assert _patched(sb, cid) == [ext]
        # The other parties stay: the call is up, the external party is gone.
        st, call, _ = await api.request("GET", f"/v1/calls/{cid}")
        assert st == 200
        states = {p["id"]: p["state"] for p in call["parties"]}
        assert states[ext] in ("disconnected", "terminated")
        assert any(p["purpose"] == "agent" and p["state"] == "connected" for p in call["parties"])
        # The audit trail names the caller and the reason, decision before outcome.
        recs = [r for r in read_jsonl(tmp_path / "audit.jsonl") if r.get("participant_id") == ext]
        kinds = [r["type"] for r in recs]
        assert kinds[0] == "decision" and "outcome" in kinds
        decision = recs[0]
        assert decision["rule"] == "control:orchestrator"
        assert decision["origin"] == {"caller": "orchestrator", "reason": "consent withdrawn"}
        assert decision["matched"] == {"address": "+1 (415) 555-0123"}
        assert decision["message"].endswith("by orchestrator: consent withdrawn")
        assert recs[-1]["outcome"] == "disconnected"
        # The second caller cannot see the first caller's ejection.
        st, err, _ = await api.request("GET", f"/v1/ejections/{body['id']}", token=OTHER_TOKEN)
        assert st == 404 and set(err) == ERROR_KEYS
        assert _counter(daemon, "control_requests", caller="orchestrator",
                        route="/v1/ejections", status="202") == 1


async def test_each_selector_and_in_memory_call_view(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        w = sb.world
        conv = w.start_call(q)
        user = w.create_user("Ann")
        agent = w.connect_agent(conv.id, user.id)
        ext = w.add_external(conv.id, "tel:+442079460000", name="Partner Desk")
        w.set_attributes(conv.id, ext.id, {"case": "42"})
        await wait_tracked(daemon, conv.id, ext.id)
        for _ in range(200):
            c = daemon.engine.store.get(conv.id)
            if c is not None and c.participants[ext.id].attributes.get("case") == "42":  # type: ignore[index]
                break
            await asyncio.sleep(0.02)
        st, call, _ = await api.request("GET", f"/v1/calls/{conv.id}")
        assert st == 200
        party = {p["id"]: p for p in call["parties"]}[ext.id]
        assert party["attributes"] == {"case": "42"} and party["name"] == "Partner Desk"
        assert party["purpose"] == "external" and party["connectedTime"].endswith("Z")
        assert {p["id"]: p for p in call["parties"]}[agent.id]["userId"] == user.id
        before = len(sb.journal.requests)
        for _ in range(3):
            assert (await api.request("GET", f"/v1/calls/{conv.id}"))[0] == 200
        assert len(sb.journal.requests) == before  # memory only: no Genesys request
        st, err, _ = await api.request("GET", "/v1/calls/00000000-0000-4000-8000-000000006000")
        assert st == 404 and err["code"] == "no_such_call" and set(err) == ERROR_KEYS
        st, err, _ = await api.request("GET", "/v1/calls/not-a-tracked-call")
        assert st == 400 and err["code"] == "invalid_id" and set(err) == ERROR_KEYS
        # name (case-insensitive) and userId selectors resolve the right party.
        st, body, _ = await api.eject({"conversationId": conv.id, "name": "partner desk"})
        assert st == 202 and body["participantId"] == ext.id
        st, body, _ = await api.eject({"conversationId": conv.id, "userId": user.id})
        assert st == 202 and body["participantId"] == agent.id


async def test_party_not_in_memory_is_read_over_rest(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        w = sb.world
        other_q = w.create_queue("Elsewhere").id  # not subscribed: the daemon never sees it
        conv = w.start_call(other_q)
        ext = w.add_external(conv.id, "tel:+14155550777")
        assert daemon.engine.store.get(conv.id) is None
        st, body, _ = await api.eject({"conversationId": conv.id, "participantId": ext.id})
        assert st == 202, body
        assert sb.journal.find("GET", f"/api/v2/conversations/calls/{conv.id}")
        # While the removal waits for its confirmation (the call sends the daemon no events),
        # the ejection already shows the status Genesys gave the PATCH and the attempts.
        snapshots: list[dict[str, Any]] = []
        for _ in range(400):  # bounded: 20 s
            st, snap, _ = await api.request("GET", f"/v1/ejections/{body['id']}")
            assert st == 200
            snapshots.append(snap)
            if snap["state"] != "pending" or snap["httpStatus"] is not None:
                break
            await asyncio.sleep(0.05)
        answered = snapshots[-1]
        assert answered["state"] == "pending", snapshots  # the confirmation takes seconds here
        assert answered["httpStatus"] == 202 and answered["attempts"] == 1 and answered["sentAt"]
        final = await api.wait_final(body["id"])
        assert final["state"] == "disconnected"
        assert _patched(sb, conv.id) == [ext.id]


async def test_errors_400_401_404_409_413(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        cid, agent, ext = _conference(sb, q)
        w = sb.world
        twin = w.add_external(cid, "tel:+14155550123")  # same number twice: ambiguous
        await wait_tracked(daemon, cid, twin.id)
        with capture_logs() as logs:
            st, err, h = await api.eject({"conversationId": cid, "participantId": ext}, token="")
            assert st == 401 and err["code"] == "unauthorized" and "Bearer" in h["WWW-Authenticate"]
            st, err, _ = await api.eject({"conversationId": cid, "participantId": ext},
                                         token="not-the-token-" + TOKEN[:8])
            assert st == 401 and set(err) == ERROR_KEYS
            st, _, _ = await api.request("GET", "/v1/openapi.json", token="wrong-token-xyz")
            assert st == 401
            st, _, _ = await api.request("GET", "/v1/nothing-here", token="wrong-token-xyz")
            assert st == 401  # unknown paths are not revealed to the unauthenticated
        assert _counter(daemon, "control_auth_failures", reason="missing") == 1
        assert _counter(daemon, "control_auth_failures", reason="unknown_token") == 3
        failed = [e for e in logs if e["event"] == "control_auth_failed"]
        # One line per remote and reason per 10 s: missing once, unknown_token once.
        assert sorted(e["reason"] for e in failed) == ["missing", "unknown_token"]
        assert TOKEN[:8] not in json.dumps(logs, default=str)
        cases: list[tuple[Any, str]] = [
            (b"{not json", "bad_json"),
            (b"[1, 2]", "invalid_request"),
            ({"conversationId": cid}, "invalid_request"),
            ({"conversationId": cid, "participantId": ext, "name": "x"}, "invalid_request"),
            ({"conversationId": cid, "participantId": ext, "colour": "red"}, "unknown_field"),
            ({"conversationId": cid, "participantId": 5}, "invalid_request"),
            ({"conversationId": "", "participantId": ext}, "invalid_id"),
        ]
        # Issue 21: no id from outside reaches a URL unless it is a UUID.
        for bad in ("..", ".", "%2e", "%2e%2e", "a/b", "../calls", "not-a-uuid", cid + "/x", " "):
            cases += [({"conversationId": bad, "participantId": ext}, "invalid_id"),
                      ({"conversationId": cid, "participantId": bad}, "invalid_id"),
                      ({"conversationId": cid, "userId": bad}, "invalid_id"),
                      ({"conversationId": cid, "externalContactId": bad}, "invalid_id")]
        requests_before = len(sb.journal.requests)
        for body, code in cases:
            if isinstance(body, bytes):
                st, err, _ = await api.request("POST", "/v1/ejections", raw=body)
            else:
                st, err, _ = await api.eject(body)
            assert st == 400, (body, err)
            assert set(err) == ERROR_KEYS and err["status"] == 400 and err["code"] == code, err
        for path in ("/v1/calls/..", "/v1/calls/.", "/v1/calls/%2e%2e", "/v1/calls/%2E",
                     "/v1/calls/a%2Fb", "/v1/calls/not-a-uuid", "/v1/ejections/%2e%2e",
                     "/v1/ejections/not-a-uuid"):
            st, err, _ = await api.request("GET", path)
            assert st in (400, 404), (path, st, err)  # aiohttp resolves a literal ".." itself
            assert err["code"] in ("invalid_id", "not_found"), (path, err)
        assert len(sb.journal.requests) == requests_before  # not one Genesys request
        st, err, _ = await api.eject({"conversationId": "00000000-0000-4000-8000-000000006000", "participantId": ext})
        assert st == 404 and err["code"] == "no_such_call"
        st, err, _ = await api.eject({"conversationId": cid, "participantId": "00000000-0000-4000-8000-00000000beef"})
        assert st == 404 and err["code"] == "no_such_party"
        st, err, _ = await api.eject({"conversationId": cid, "address": "tel:+14155550123"})
        assert st == 409 and err["code"] == "ambiguous"
        assert {c["participantId"] for c in err["candidates"]} == {ext, twin.id}
        assert all(set(c) == {"participantId", "name", "purpose"} for c in err["candidates"])
        st, err, _ = await api.request("POST", "/v1/ejections", raw=b" " * (64 * 1024 + 1))
        assert st == 413 and err["code"] == "body_too_large" and set(err) == ERROR_KEYS
        st, err, _ = await api.request("GET", "/v1/nothing-here")
        assert st == 404 and set(err) == ERROR_KEYS
        st, err, _ = await api.request("DELETE", "/v1/ejections")
        assert st == 405 and set(err) == ERROR_KEYS
        # A party that has already left: nothing to do, said plainly.
        w.disconnect(cid, agent)
        for _ in range(200):
            c = daemon.engine.store.get(cid)
            if c is not None and c.participants[agent].is_final:  # type: ignore[index]
                break
            await asyncio.sleep(0.02)
        st, err, _ = await api.eject({"conversationId": cid, "participantId": agent})
        assert st == 404 and err["code"] == "party_gone"
        assert sb.journal.patches(cid) == []  # none of the refusals sent anything


async def test_openapi_served_and_committed_copy_current(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (_sb, _daemon, api, _q):
        st, doc, _ = await api.request("GET", "/v1/openapi.json")
        assert st == 200 and doc == build_document()
    committed = Path(__file__).resolve().parents[2] / "docs" / "control-api.json"
    assert json.loads(committed.read_text()) == build_document(), \
        "docs/control-api.json is stale: python -m daemon.service.control > docs/control-api.json"
    assert set(build_document()["paths"]) == {"/v1/ejections", "/v1/ejections/{id}",
                                              "/v1/calls/{conversationId}", "/v1/openapi.json"}


async def test_idempotency_key_returns_first_answer_and_sends_once(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        cid, _, ext = _conference(sb, q)
        await wait_tracked(daemon, cid, ext)
        body = {"conversationId": cid, "participantId": ext, "reason": "fraud score"}
        key = {"Idempotency-Key": "order-1234"}
        first = await api.eject(body, headers=key)
        assert first[0] == 202
        await api.wait_final(first[1]["id"])
        again = await asyncio.gather(*(api.eject(body, headers=key) for _ in range(5)))
        assert all(st == 202 and b == first[1] for st, b, _ in again)
        assert _patched(sb, cid) == [ext]
        st, err, _ = await api.eject({**body, "reason": "another"}, headers=key)
        assert st == 422 and err["code"] == "idempotency_key_reused"
        # Per caller: another caller's identical key is its own request (here: party gone).
        st, err, _ = await api.eject(body, headers=key, token=OTHER_TOKEN)
        assert st == 404 and err["code"] == "party_gone"
        decisions = [r for r in read_jsonl(tmp_path / "audit.jsonl")
                     if r["type"] == "decision" and r["participant_id"] == ext]
        assert len(decisions) == 1


async def test_twenty_identical_requests_one_patch(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        cid, _, ext = _conference(sb, q)
        await wait_tracked(daemon, cid, ext)
        answers = await asyncio.gather(*(api.eject({"conversationId": cid, "address": "+1 415 555 0123"})
                                         for _ in range(20)))
        assert all(st in (202, 404) for st, _, _ in answers), answers
        accepted = [b for st, b, _ in answers if st == 202]
        assert accepted
        finals = [await api.wait_final(b["id"]) for b in accepted]
        assert {f["state"] for f in finals} <= {"disconnected", "already_gone", "suppressed"}
        assert any(f["state"] == "disconnected" for f in finals)
        await asyncio.sleep(0.3)
        assert _patched(sb, cid) == [ext]


async def test_fifty_parties_concurrently_with_live_events(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        w = sb.world
        user = w.create_user("Agent").id
        calls = []
        for i in range(50):
            conv = w.start_call(q, ani=f"tel:+1415556{i:04d}")
            w.connect_agent(conv.id, user)
            ext = w.add_external(conv.id, f"tel:+1212555{i:04d}")
            calls.append((conv.id, ext.id))
        for cid, pid in calls:
            await wait_tracked(daemon, cid, pid)

        stop = asyncio.Event()

        async def chatter() -> int:  # a live event stream on the same calls meanwhile
            n = 0
            while not stop.is_set() and n < 2000:
                cid, pid = calls[n % len(calls)]
                try:
                    w.set_attributes(cid, pid, {"tick": str(n)})
                except Exception:
                    pass  # the party may have just been removed
                n += 1
                await asyncio.sleep(0.002)
            return n

        noise = asyncio.create_task(chatter())
        answers = await asyncio.gather(*(api.eject({"conversationId": cid, "participantId": pid,
                                                    "reason": f"batch {i}"})
                                         for i, (cid, pid) in enumerate(calls)))
        assert [st for st, _, _ in answers] == [202] * 50, [a[1] for a in answers if a[0] != 202]
        finals = await asyncio.gather(*(api.wait_final(b["id"], timeout=30) for _, b, _ in answers))
        stop.set()
        assert await noise > 0
        assert [f["state"] for f in finals] == ["disconnected"] * 50, finals
        patches = [(r.path.split("/calls/")[1].split("/")[0], r.path.rsplit("/", 1)[1])
                   for r in sb.journal.patches()]
        assert sorted(patches) == sorted(calls)  # 50 PATCHes, none twice


async def test_standby_and_draining_answer_503(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        cid, _, ext = _conference(sb, q)
        await wait_tracked(daemon, cid, ext)
        daemon.ha_role = lambda: ("standby", "node-b")
        st, err, h = await api.eject({"conversationId": cid, "participantId": ext})
        assert st == 503 and err["code"] == "not_leader" and err["leader"] == "node-b"
        assert h["Retry-After"] == "1"
        daemon.ha_role = lambda: ("no-lease", None)
        st, err, _ = await api.eject({"conversationId": cid, "participantId": ext})
        assert st == 503 and err["code"] == "no_lease" and err["leader"] is None
        st, _, _ = await api.request("GET", f"/v1/calls/{cid}")
        assert st == 200  # reads still answer on a standby
        daemon.ha_role = None
        assert daemon.enforcer is not None

        class ClosedGate:  # the lease lost between the API's check and the enforcer's
            def may_send(self) -> bool:
                return False
        gate = daemon.enforcer.gate
        daemon.enforcer.gate = ClosedGate()
        st, body, _ = await api.eject({"conversationId": cid, "participantId": ext})
        assert st == 202 and body["state"] == "standby", body
        daemon.enforcer.gate = gate
        daemon.enforcer.stop_accepting()  # what stop() does first
        st, err, _ = await api.eject({"conversationId": cid, "participantId": ext})
        assert st == 503 and err["code"] == "draining"
        assert sb.journal.patches(cid) == []


async def test_per_caller_limit_429_with_retry_after(tmp_path: Path) -> None:
    async with control_stack(tmp_path, per_minute=5) as (_sb, daemon, api, _q):
        codes = [(await api.request("GET", "/v1/calls/00000000-0000-4000-8000-000000006000"))[0] for _ in range(5)]
        assert codes == [404] * 5
        st, err, h = await api.request("GET", "/v1/calls/00000000-0000-4000-8000-000000006000")
        assert st == 429 and err["code"] == "rate_limited" and int(h["Retry-After"]) >= 1
        st, _, _ = await api.request("GET", "/v1/calls/00000000-0000-4000-8000-000000006000", token=OTHER_TOKEN)
        assert st == 404  # the limit is per caller
        assert _counter(daemon, "control_rate_limited", caller="orchestrator") == 1


async def test_observe_mode_audits_and_sends_nothing(tmp_path: Path) -> None:
    async with control_stack(tmp_path, mode="observe") as (sb, daemon, api, q):
        cid, _, ext = _conference(sb, q)
        await wait_tracked(daemon, cid, ext)
        st, body, _ = await api.eject({"conversationId": cid, "participantId": ext})
        assert st == 202
        final = await api.wait_final(body["id"])
        assert final["state"] == "observed" and final["attempts"] == 0
        assert final["httpStatus"] is None and final["sentAt"] is None
        assert sb.journal.patches(cid) == []


async def test_safety_valve_suppresses_api_removals(tmp_path: Path) -> None:
    async with control_stack(tmp_path, max_disconnects=1) as (sb, daemon, api, q):
        (c1, _, e1), (c2, _, e2) = _conference(sb, q), _conference(sb, q, "tel:+14155550124")
        await wait_tracked(daemon, c1, e1)
        await wait_tracked(daemon, c2, e2)
        st, b1, _ = await api.eject({"conversationId": c1, "participantId": e1})
        st2, b2, _ = await api.eject({"conversationId": c2, "participantId": e2})
        assert st == st2 == 202
        assert (await api.wait_final(b1["id"]))["state"] == "disconnected"
        assert (await api.wait_final(b2["id"]))["state"] == "suppressed"
        assert sb.journal.patches(c2) == []


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:99999"])
def test_config_listen_must_be_host_port(listen: str, tmp_path: Path) -> None:
    from daemon.config import parse_config
    from daemon.errors import ConfigError
    with pytest.raises(ConfigError, match="control.listen"):
        parse_config(f"control: {{listen: '{listen}', callers: {{a: {{token_file: t}}}}}}\n",
                     file="config.yaml", base_dir=tmp_path)


def test_config_listen_without_callers_is_an_error(tmp_path: Path) -> None:
    from daemon.config import parse_config
    from daemon.errors import ConfigError
    with pytest.raises(ConfigError, match="names no caller"):
        parse_config("control: {listen: '127.0.0.1:9465'}\n", file="config.yaml", base_dir=tmp_path)
    cfg = parse_config("ops: {enabled: false}\n", file="config.yaml", base_dir=tmp_path)
    assert cfg.control.listen is None and cfg.control.max_requests_per_minute == 120


async def test_a_malformed_confirming_read_is_counted(tmp_path: Path) -> None:
    """The enforcer's own re-read of a call (its confirmation) takes the daemon's one path
    for engine results: a wrong-typed field in that reply is counted and logged, as in a
    frame. The call is not subscribed, so no frame can count it instead."""
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        w = sb.world
        conv = w.start_call(w.create_queue("Elsewhere").id)
        ext = w.add_external(conv.id, "tel:+14155550778")
        agent = w.connect_agent(conv.id, w.create_user("Agent").id)
        agent.held = "yes"  # type: ignore[assignment]  # Genesys sends a boolean
        before = _counter(daemon, "events_rejected", reason="bad_field")
        with capture_logs() as logs:
            st, body, _ = await api.eject({"conversationId": conv.id, "participantId": ext.id})
            assert st == 202, body
            final = await api.wait_final(body["id"])
        assert final["state"] == "disconnected"
        assert _counter(daemon, "events_rejected", reason="bad_field") > before
        assert any(e["event"] == "event_rejected" and e.get("source") == "rest" for e in logs)
