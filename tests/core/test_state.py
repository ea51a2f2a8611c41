"""daemon.core.state.CallStore: extraction, ordering, end and eviction, bounded memory."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _core_payloads import conversation, party
from daemon.core.state import CallStore
from daemon.core.timefmt import parse_time

T0 = 1_795_000_000.0


def conv3(state_b: str = "connected", **extra: Any) -> dict[str, Any]:
    return conversation("c1", [party("a", purpose="customer"), party("b", purpose="agent", state=state_b),
                               party("x", purpose="external", address="tel:+442071234567")], **extra)


def test_parse_time_fast_and_fallback() -> None:
    assert parse_time("1970-01-01T00:00:00.000Z") == 0.0
    assert parse_time("2026-11-21T09:15:02.345Z") == pytest.approx(1_795_252_502.345)
    assert parse_time("2024-02-29T12:00:00.500Z") == pytest.approx(1_709_208_000.5)
    # Fallback shapes go through datetime.
    assert parse_time("2026-11-21T09:15:02Z") == pytest.approx(1_795_252_502.0)
    assert parse_time("2026-11-21T10:15:02.345+01:00") == pytest.approx(1_795_252_502.345)
    for bad in ("2025-02-29T00:00:00.000Z", "2026-13-01T00:00:00.000Z", "2026-11-21T24:00:00.000Z",
                "2026-11-21T09:15:0x.345Z", "yesterday", "", "x" * 10_000, "２026-11-21T09:15:02.345Z"):
        assert parse_time(bad) is None, bad


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=__import__("datetime").datetime(1, 1, 2),
                    max_value=__import__("datetime").datetime(9999, 12, 30)))
def test_parse_time_matches_datetime(dt: Any) -> None:
    from datetime import timezone
    dt = dt.replace(microsecond=(dt.microsecond // 1000) * 1000, tzinfo=timezone.utc)
    s = dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    if len(s) == 24:
        assert parse_time(s) == pytest.approx(dt.timestamp(), abs=1e-3)


def test_extracts_kept_fields_event_shape() -> None:
    store = CallStore()
    body = conv3(recordingState="active", securePause=True)
    body["participants"][1].update(
        team={"id": "team-1", "name": "T"}, externalContact={"id": "ec-1"},
        externalOrganization={"id": "eo-1"}, flaggedReason="general", monitoredParticipantId="a",
        coachedParticipantId="a", bargedParticipantId="a", disconnectType="client", muted=True,
        endTime="2026-11-21T09:20:02.345Z")
    change = store.apply(body, T0)
    assert change is not None and change.source == "event" and change.received_at == T0
    assert change.call_changed
    assert [p.id for p in change.changed] == ["a", "b", "x"]
    call = store.get("c1")
    assert call is change.call and call is not None
    assert call.recording_state == "active" and call.secure_pause is True
    b = call.participants["b"]  # type: ignore[index]
    assert (b.name, b.purpose, b.state, b.direction) == ("name b", "agent", "connected", "inbound")
    assert (b.address, b.ani, b.dnis) == ("tel:+14155550100", "tel:+14155550100", "tel:+18005550199")
    assert (b.user_id, b.queue_id, b.team_id) == ("user-b", "queue-1", "team-1")
    assert (b.external_contact_id, b.external_organization_id) == ("ec-1", "eo-1")
    assert (b.flagged_reason, b.provider, b.disconnect_type) == ("general", "Edge", "client")
    assert (b.monitored_participant_id, b.coached_participant_id, b.barged_participant_id) == ("a", "a", "a")
    assert (b.held, b.muted, b.confined, b.recording) == (False, True, False, False)
    assert b.connected_time == pytest.approx(1_795_252_502.345)
    assert b.end_time == pytest.approx(1_795_252_802.345)
    assert b.attributes == {"flow": "main"}
    assert call.queue_ids == {"queue-1"}
    assert call.ended_at is None and len(store) == 1


def test_rest_shape_and_event_shape_agree() -> None:
    ev, rest = CallStore(), CallStore()
    parties_ev = [party("a"), party("b", purpose="agent")]
    parties_rest = [party("a", rest=True), party("b", purpose="agent", rest=True)]
    # REST CallConversation: no name/address at the top, selfUri, other extras.
    rest_body = {"id": "c1", "participants": parties_rest, "recordingState": "none",
                 "securePause": False, "maxParticipants": 6, "selfUri": "/api/v2/conversations/calls/c1",
                 "recentTransfers": []}
    a = ev.apply(conversation("c1", parties_ev), T0)
    b = rest.apply(rest_body, T0, source="resync")
    assert a is not None and b is not None and b.source == "resync"
    assert a.changed == b.changed
    # The same conversation read back from REST after the event changes nothing.
    assert ev.apply(rest_body, T0 + 1, source="resync") is None


def test_duplicates_return_none() -> None:
    store = CallStore()
    body = conv3()
    assert store.apply(body, T0) is not None
    assert store.apply(copy.deepcopy(body), T0 + 1) is None
    assert store.apply(orjson.loads(orjson.dumps(body)), T0 + 2) is None
    assert store.stats["duplicates"] == 2
    # Unknown fields changing do not count as a change.
    body2 = copy.deepcopy(body)
    body2["participants"][0]["startHoldTime"] = "2026-11-21T09:16:00.000Z"
    body2["maxParticipants"] = 10
    assert store.apply(body2, T0 + 3) is None


def test_one_changed_party_reported() -> None:
    store = CallStore()
    store.apply(conv3(), T0)
    body = conv3()
    body["participants"][2]["held"] = True
    change = store.apply(body, T0 + 1, received_at=T0 + 0.5)
    assert change is not None
    assert [p.id for p in change.changed] == ["x"] and change.changed[0].held is True
    assert not change.call_changed and change.received_at == T0 + 0.5
    assert change.call.last_update == T0 + 1
    # Attribute change alone is a change; unchanged connectedTime keeps its parsed value.
    body["participants"][2]["attributes"] = {"flow": "main", "flag": "pci"}
    change = store.apply(body, T0 + 2)
    assert change is not None and change.changed[0].attributes == {"flow": "main", "flag": "pci"}
    assert change.changed[0].connected_time == pytest.approx(1_795_252_502.345)
    # Removing attributes entirely is a change too.
    del body["participants"][2]["attributes"]
    change = store.apply(body, T0 + 3)
    assert change is not None and change.changed[0].attributes == {}
    assert store.apply(body, T0 + 4) is None


def test_earlier_participant_objects_are_not_mutated() -> None:
    store = CallStore()
    first = store.apply(conv3(), T0)
    assert first is not None
    body = conv3()
    body["participants"][0]["muted"] = True
    store.apply(body, T0 + 1)
    assert first.changed[0].muted is False


def test_wrong_types_ignored_field_by_field() -> None:
    store = CallStore()
    body = conversation("c1", [
        party("a", name=5, held="yes", connectedTime=123, user="not-a-ref", queue={"id": 7},
              attributes={"ok": "v", "bad": 3}),
        {"name": "no id"}, {"id": 42}, {"id": ""}, "not an object", None,
    ], recordingState=["x"], securePause="no")
    change = store.apply(body, T0)
    assert change is not None
    a = change.call.participants["a"]  # type: ignore[index]
    assert a.name is None and a.held is None and a.connected_time is None
    assert a.user_id is None and a.queue_id is None
    assert a.attributes == {"ok": "v"}
    assert a.state == "connected" and a.purpose == "customer"
    assert change.call.recording_state is None and change.call.secure_pause is None
    assert list(change.call.participants) == ["a"]
    assert store.stats["participants_dropped"] == 5
    assert store.stats["fields_ignored"] >= 7
    # The same malformed snapshot again is a duplicate, not a change.
    assert store.apply(copy.deepcopy(body), T0 + 1) is None


@pytest.mark.parametrize("body", [
    {}, {"id": "c"}, {"participants": []}, {"id": 3, "participants": []}, {"id": "", "participants": []},
    {"id": "c", "participants": "x"}, {"id": "c", "participants": {"a": 1}},
])
def test_unusable_conversation_rejected(body: dict[str, Any]) -> None:
    store = CallStore()
    assert store.apply(body, T0) is None
    assert store.stats["conversations_rejected"] == 1 and len(store) == 0


def test_final_party_never_revives() -> None:
    store = CallStore()
    store.apply(conv3(), T0)
    gone = conv3("disconnected", )
    gone["participants"][1]["endTime"] = "2026-11-21T09:20:00.000Z"
    gone["participants"][1]["disconnectType"] = "client"
    change = store.apply(gone, T0 + 1)
    assert change is not None and [p.id for p in change.changed] == ["b"]
    assert change.changed[0].is_final
    late = conv3("connected")  # delayed event from before the disconnect
    late["participants"][1]["muted"] = True
    assert store.apply(late, T0 + 2) is None
    b = store.get("c1").participants["b"]  # type: ignore[union-attr,index]
    assert b.state == "disconnected" and b.disconnect_type == "client" and b.muted is False
    assert store.stats["revival_blocked"] == 1
    # Even a different final snapshot does not change the frozen fields.
    other_final = conv3("terminated")
    assert store.apply(other_final, T0 + 3) is None


def test_reordered_disconnect_before_first_connect() -> None:
    store = CallStore()
    store.apply(conversation("c1", [party("a"), party("b", state="disconnected")]), T0)
    assert store.apply(conversation("c1", [party("a"), party("b", state="connected")]), T0 + 1) is None
    assert store.get("c1").participants["b"].state == "disconnected"  # type: ignore[union-attr,index]


def test_call_end_and_eviction_after_grace() -> None:
    store = CallStore(ended_grace=30.0)
    store.apply(conv3(), T0)
    body = conv3()
    for p in body["participants"]:
        p["state"] = "disconnected"
    change = store.apply(body, T0 + 10)
    assert change is not None and change.call_changed and change.call.ended_at == T0 + 10
    assert change.call.is_ended
    assert store.evict(T0 + 39.9) == [] and len(store) == 1
    assert store.evict(T0 + 40) == ["c1"]
    assert len(store) == 0 and store.get("c1") is None and store.was_evicted("c1")
    assert store.evict(T0 + 100) == []
    assert store.stats["evicted"] == 1


def test_late_event_after_eviction_does_not_resurrect() -> None:
    store = CallStore(ended_grace=5.0)
    store.apply(conversation("c1", [party("a"), party("b")]), T0)
    final = conversation("c1", [party("a", state="disconnected"), party("b", state="terminated")])
    store.apply(final, T0 + 1)
    assert store.evict(T0 + 10) == ["c1"]
    assert store.apply(final, T0 + 11) is None
    assert store.apply(conversation("c1", [party("a", state="disconnected")]), T0 + 12) is None
    assert len(store) == 0 and store.stats["late_after_evict"] == 2
    # A snapshot with a live party does re-track it (missing a live call is worse).
    change = store.apply(conversation("c1", [party("a", state="disconnected"), party("z")]), T0 + 13)
    assert change is not None and len(store) == 1 and not store.was_evicted("c1")
    assert store.stats["retracked_after_evict"] == 1


def test_new_party_revives_ended_call_within_grace() -> None:
    store = CallStore(ended_grace=30.0)
    store.apply(conversation("c1", [party("a", state="disconnected")]), T0)
    assert store.get("c1").ended_at == T0  # type: ignore[union-attr]
    change = store.apply(conversation("c1", [party("a", state="disconnected"), party("n")]), T0 + 5)
    assert change is not None and change.call_changed and change.call.ended_at is None
    assert store.evict(T0 + 100) == [] and len(store) == 1  # the stale end entry is skipped
    store.apply(conversation("c1", [party("a", state="disconnected"), party("n", state="disconnected")]),
                T0 + 200)
    assert store.evict(T0 + 229) == [] and store.evict(T0 + 230) == ["c1"]


def test_call_without_parties_is_ended() -> None:
    store = CallStore(ended_grace=1.0)
    change = store.apply(conversation("c1", []), T0)
    assert change is not None and change.call.ended_at == T0
    assert store.evict(T0 + 1) == ["c1"]


def test_queue_ids_accumulate() -> None:
    store = CallStore()
    acd = party("q1", purpose="acd", state="disconnected", queue={"id": "queue-A"})
    store.apply(conversation("c1", [party("a"), acd]), T0)
    acd2 = party("q2", purpose="acd", queue={"id": "queue-B"})
    change = store.apply(conversation("c1", [party("a"), acd, acd2]), T0 + 1)
    assert change is not None and change.call_changed
    agent = party("g", purpose="agent", queue={"id": "queue-C"})
    change = store.apply(conversation("c1", [party("a"), acd, party("q2", purpose="acd", state="disconnected",
                                                                    queue={"id": "queue-B"}), agent]), T0 + 2)
    assert change is not None
    assert change.call.queue_ids == {"queue-A", "queue-B", "queue-C"}
    # Parties later showing no queue do not remove accumulated queues.
    store.apply(conversation("c1", [party("a", held=True)]), T0 + 3)
    assert store.get("c1").queue_ids == {"queue-A", "queue-B", "queue-C"}  # type: ignore[union-attr]


def test_call_level_fields_change() -> None:
    store = CallStore()
    store.apply(conv3(), T0)
    change = store.apply(conv3(recordingState="paused", securePause=True), T0 + 1)
    assert change is not None and change.call_changed and change.changed == ()
    assert change.call.recording_state == "paused" and change.call.secure_pause is True


def test_mark_gone() -> None:
    store = CallStore(ended_grace=30.0)
    body = conv3()
    body["participants"][0]["state"] = "disconnected"
    body["participants"][0]["endTime"] = "2026-11-21T09:16:00.000Z"
    store.apply(body, T0)
    change = store.mark_gone("c1", T0 + 5)
    assert change is not None and change.source == "resync" and change.call_changed
    assert [p.id for p in change.changed] == ["b", "x"]
    assert all(p.state == "disconnected" and p.end_time == T0 + 5 for p in change.changed)
    call = change.call
    assert call.ended_at == T0 + 5 and not call.live_parties
    assert call.participants["a"].end_time == pytest.approx(1_795_252_560.0)  # type: ignore[index]
    assert store.mark_gone("c1", T0 + 6) is None
    assert store.mark_gone("unknown", T0) is None
    assert store.apply(conv3(), T0 + 7) is None  # late live snapshot: parties stay final
    assert store.evict(T0 + 35) == ["c1"]


def test_idle_calls_evicted() -> None:
    store = CallStore(idle_timeout=600.0)
    store.apply(conversation("old", [party("a")]), T0)
    store.evict(T0)  # arms the idle scan
    store.apply(conversation("fresh", [party("a")]), T0 + 550)
    assert store.evict(T0 + 700) == ["old"]
    assert store.tracked_ids() == ["fresh"] and store.stats["evicted_idle"] == 1


def test_memory_stays_bounded_over_many_calls() -> None:
    store = CallStore(ended_grace=10.0, remember_evicted=25_000)
    now = T0
    live = [party(f"p{i}", purpose=pp) for i, pp in enumerate(("customer", "agent", "external", "acd"))]
    final = [dict(p, state="disconnected") for p in live]
    sizes = []
    for round_ in range(4):  # 4 x 10,000 calls started and ended
        base = round_ * 10_000
        for i in range(10_000):
            store.apply({"id": f"c{base + i}", "participants": live}, now)
        assert len(store) == 10_000
        for i in range(10_000):
            store.apply({"id": f"c{base + i}", "participants": final}, now + 1)
        now += 20
        evicted = store.evict(now)
        assert len(evicted) == 10_000
        assert len(store) == 0 and store.pending_ended == 0
        sizes.append(store.remembered_evicted)
    assert sizes == [10_000, 20_000, 25_000, 25_000]
    assert store.was_evicted("c39999") and not store.was_evicted("c0")


class _Shapes:
    party = st.fixed_dictionaries({}, optional={
        "id": st.sampled_from(["a", "b", "", None, 3]),
        "state": st.sampled_from(["connected", "disconnected", "terminated", "alerting", 5, None, [], {}]),
        "purpose": st.sampled_from(["customer", "agent", "acd", None, []]),
        "conversationRoutingData": st.sampled_from([{"queue": {"id": "r"}}, {"queue": []}, [], None]),
        "user": st.sampled_from([{"id": "u"}, {"id": []}, [], None]),
        "held": st.sampled_from([True, False, None, "x", 1]),
        "connectedTime": st.sampled_from(["2026-11-21T09:15:02.345Z", "bad", 17, None]),
        "queue": st.sampled_from([{"id": "q"}, {"id": 3}, "q", None]),
        "attributes": st.sampled_from([{"a": "b"}, {"a": 1}, [], None]),
    }) | st.none() | st.integers()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_Shapes.party, max_size=4), min_size=1, max_size=6))
def test_fuzz_apply_never_raises_and_finals_stay_final(snapshots: list[list[Any]]) -> None:
    store = CallStore(ended_grace=1.0)
    finals: dict[str, str] = {}
    for step, parts in enumerate(snapshots):
        store.apply({"id": "c", "participants": json.loads(json.dumps(parts))}, T0 + step)
        call = store.get("c")
        if call is None:
            continue
        for pid, state in finals.items():
            assert call.participants[pid].state == state  # type: ignore[index]
        for p in call.participants.values():
            if p.is_final:
                finals.setdefault(p.id, p.state)  # type: ignore[arg-type]
        assert (call.ended_at is not None) == (not call.live_parties)
        if store.evict(T0 + step + 1):
            finals.clear()  # evicted: a later live snapshot legitimately re-tracks it afresh


def test_acd_queue_from_routing_data() -> None:
    store = CallStore()
    acd = party("q1", purpose="acd", conversationRoutingData={"queue": {"id": "queue-R"}, "priority": 0})
    del acd["queue"]
    change = store.apply(conversation("c1", [party("a"), acd]), T0)
    assert change is not None and change.call.queue_ids == {"queue-R"}
    assert change.call.participants["q1"].queue_id is None  # type: ignore[index]
    # Routing data on a non-ACD party is not a queue the call passed through.
    other = party("z", conversationRoutingData={"queue": {"id": "queue-X"}})
    store.apply(conversation("c1", [party("a"), acd, other]), T0 + 1)
    assert store.get("c1").queue_ids == {"queue-R"}  # type: ignore[union-attr]


def test_same_id_twice_in_one_snapshot_reported_once() -> None:
    store = CallStore()
    change = store.apply(conversation("c1", [party("a"), party("a", held=True)]), T0)
    assert change is not None and len(change.changed) == 1
    assert change.changed[0].held is True and change.call.participants["a"] is change.changed[0]  # type: ignore[index]


def test_unhashable_state_values_do_not_raise() -> None:
    store = CallStore(ended_grace=1.0)
    store.apply(conversation("c1", [party("a", state="disconnected")]), T0)
    assert store.apply(conversation("c1", [party("a", state=["connected"])]), T0 + 1) is None
    assert store.evict(T0 + 2) == ["c1"]
    # Evicted id, unhashable state: treated as not final (re-tracked, state ignored).
    change = store.apply(conversation("c1", [party("b", state={"x": 1})]), T0 + 3)
    assert change is not None and change.changed[0].state is None


_raw_values = st.sampled_from([None, "", "a", "connected", True, False, 0, 1, 2.5, [], {}, "x" * 80,
                               "2026-11-21T09:15:02.345Z"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_raw_values, min_size=24, max_size=24), st.lists(_raw_values, min_size=24, max_size=24))
def test_incremental_normalize_equals_full(old_raw: list[Any], new_raw: list[Any]) -> None:
    from daemon.core.state import _normalize, _normalize_from

    old_norm, _ = _normalize(tuple(old_raw))
    full, _ = _normalize(tuple(new_raw))
    incremental, _ = _normalize_from(tuple(new_raw), old_norm)
    # Documented quirk: a raw value *equal* to the stored one (0/1 vs False/True) leaves the
    # stored value as it is, on the fast path as here; everything else matches a full check.
    expected = tuple(o if n == o else f for n, o, f in zip(new_raw, old_norm, full))
    assert incremental == expected
    assert [type(v) for v in incremental] == [type(v) for v in expected]
