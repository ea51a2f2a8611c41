"""Rule semantics and the RuleEngine: operators, combinators, example rules, timers, edges."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.enforcement import SafetyValve
from daemon.core.rules import RuleEngine, parse_duration
try:
    from tests._rules_helpers import (
        QUEUE, TRUSTED, change, example, fired, holds, load, make_call, one_rule, party,
    )
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ on sys.path
    from _rules_helpers import (  # type: ignore[no-redef]
        QUEUE, TRUSTED, change, example, fired, holds, load, make_call, one_rule, party,
    )

T0 = 1_700_000_000.0  # a realistic epoch, so float rounding near 1.7e9 is exercised


# ---------------------------------------------------------------- operators


def _holds_when(tmp_path: Path, when: dict[str, Any], lists: dict[str, Any] | None = None,
                **pkw: Any) -> bool:
    rs = one_rule(tmp_path, when=when, lists=lists)
    return holds(rs, make_call(party("a", **pkw)), "a")


@pytest.mark.parametrize("when, pkw, expected", [
    # bare value / equals / not_equals
    ({"purpose": "external"}, {"purpose": "external"}, True),
    ({"purpose": "external"}, {"purpose": "customer"}, False),
    ({"purpose": {"equals": "external"}}, {"purpose": "external"}, True),
    ({"purpose": {"not_equals": "agent"}}, {"purpose": "external"}, True),
    ({"purpose": {"not_equals": "agent"}}, {"purpose": "agent"}, False),
    # in / not_in
    ({"purpose": {"in": ["customer", "external"]}}, {"purpose": "customer"}, True),
    ({"purpose": {"in": ["customer", "external"]}}, {"purpose": "agent"}, False),
    ({"purpose": {"not_in": ["agent", "acd"]}}, {"purpose": "customer"}, True),
    ({"purpose": {"not_in": ["agent", "acd"]}}, {"purpose": "acd"}, False),
    # matches is a whole-value match
    ({"name": {"matches": "Fraud.*"}}, {"name": "Fraud Desk"}, True),
    ({"name": {"matches": "Fraud"}}, {"name": "Fraud Desk"}, False),
    ({"name": {"matches": "Fraud"}}, {"name": "Anti Fraud"}, False),
    # contains / starts_with
    ({"name": {"contains": "Desk"}}, {"name": "Fraud Desk"}, True),
    ({"name": {"contains": "desk"}}, {"name": "Fraud Desk"}, False),
    ({"name": {"starts_with": "Fraud"}}, {"name": "Fraud Desk"}, True),
    ({"name": {"starts_with": "Desk"}}, {"name": "Fraud Desk"}, False),
    # exists
    ({"flagged_reason": {"exists": True}}, {"flagged_reason": "general"}, True),
    ({"flagged_reason": {"exists": True}}, {}, False),
    ({"flagged_reason": {"exists": False}}, {}, True),
    ({"flagged_reason": {"exists": False}}, {"flagged_reason": "general"}, False),
    # numeric on connected_seconds (now = 1000)
    ({"connected_seconds": {"gt": 600}}, {"connected_time": 399.0}, True),
    ({"connected_seconds": {"gt": 600}}, {"connected_time": 400.0}, False),
    ({"connected_seconds": {"gte": 600}}, {"connected_time": 400.0}, True),
    ({"connected_seconds": {"lt": 10}}, {"connected_time": 995.0}, True),
    ({"connected_seconds": {"lt": 10}}, {"connected_time": 990.0}, False),
    ({"connected_seconds": {"lte": 10}}, {"connected_time": 990.0}, True),
    ({"connected_seconds": {"gte": 10, "lt": 20}}, {"connected_time": 985.0}, True),
    ({"connected_seconds": {"gte": 10, "lt": 20}}, {"connected_time": 970.0}, False),
    # booleans compare with YAML booleans
    ({"held": True}, {"held": True}, True),
    ({"held": True}, {"held": False}, False),
    ({"held": {"not_equals": True}}, {"held": False}, True),
    ({"muted": {"in": [True]}}, {"muted": True}, True),
])
def test_party_operators(tmp_path: Path, when: dict[str, Any], pkw: dict[str, Any],
                         expected: bool) -> None:
    assert _holds_when(tmp_path, when, **pkw) is expected


def test_in_list_and_not_in_list(tmp_path: Path) -> None:
    lists = {"vip": {"values": ["u1", "u2"]}}
    assert _holds_when(tmp_path, {"user_id": {"in_list": "vip"}}, lists, user_id="u1")
    assert not _holds_when(tmp_path, {"user_id": {"in_list": "vip"}}, lists, user_id="u3")
    assert _holds_when(tmp_path, {"user_id": {"not_in_list": "vip"}}, lists, user_id="u3")
    assert not _holds_when(tmp_path, {"user_id": {"not_in_list": "vip"}}, lists, user_id="u2")


def test_list_file_relative_to_config_with_comments(tmp_path: Path) -> None:
    (tmp_path / "people.txt").write_text("# trusted\nu1   # Ann\n\n  u2\n")
    text = ("lists:\n  t: {file: people.txt}\n"
            "rules:\n  - name: r\n    when: {user_id: {in_list: t}}\n    action: observe\n")
    rs = load(text, tmp_path)
    assert rs.lists["t"] == frozenset({"u1", "u2"})
    call = make_call(party("a", user_id="u2"), party("b", user_id="u9"))
    assert holds(rs, call, "a") and not holds(rs, call, "b")


@pytest.mark.parametrize("when, pkw, expected", [
    ({"any": [{"purpose": "agent"}, {"purpose": "customer"}]}, {"purpose": "customer"}, True),
    ({"any": [{"purpose": "agent"}, {"purpose": "customer"}]}, {"purpose": "external"}, False),
    ({"all": [{"purpose": "agent"}, {"held": True}]}, {"purpose": "agent", "held": True}, True),
    ({"all": [{"purpose": "agent"}, {"held": True}]}, {"purpose": "agent", "held": False}, False),
    ({"not": {"purpose": "agent"}}, {"purpose": "customer"}, True),
    ({"not": {"purpose": "agent"}}, {"purpose": "agent"}, False),
    # nested: not(any(...)), any with a multi-condition mapping
    ({"not": {"any": [{"purpose": "agent"}, {"purpose": "acd"}]}}, {"purpose": "acd"}, False),
    ({"not": {"any": [{"purpose": "agent"}, {"purpose": "acd"}]}}, {"purpose": "ivr"}, True),
    ({"any": [{"purpose": "agent", "held": True}, {"muted": True}]}, {"purpose": "agent"}, False),
    ({"any": [{"purpose": "agent", "held": True}, {"muted": True}]}, {"muted": True}, True),
])
def test_combinators(tmp_path: Path, when: dict[str, Any], pkw: dict[str, Any],
                     expected: bool) -> None:
    assert _holds_when(tmp_path, when, **pkw) is expected


def test_combinators_in_call_block(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"purpose": "external"},
                  call={"any": [{"recording_state": "paused"}, {"not": {"secure_pause": False}}]})
    ext = party("x", purpose="external")
    assert holds(rs, make_call(ext, recording_state="paused"), "x")
    assert holds(rs, make_call(ext, recording_state="active", secure_pause=True), "x")
    assert not holds(rs, make_call(ext, recording_state="active", secure_pause=False), "x")


def test_call_prefixed_fields_inside_when(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"any": [{"purpose": "external"},
                                          {"call.connected_parties": {"gte": 3}}]})
    two = make_call(party("a", purpose="customer"), party("b", purpose="agent"))
    three = make_call(party("a", purpose="customer"), party("b", purpose="agent"),
                      party("c", purpose="agent"))
    assert not holds(rs, two, "a")
    assert holds(rs, three, "a")


# ---------------------------------------------------------------- missing values


@pytest.mark.parametrize("op, arg, expected", [
    ("equals", "x", False), ("in", ["x"], False), ("matches", ".*", False),
    ("contains", "", False), ("starts_with", "", False), ("exists", True, False),
    ("in_list", "l", False),
    ("exists", False, True), ("not_equals", "x", True), ("not_in", ["x"], True),
    ("not_in_list", "l", True),
])
def test_missing_value_semantics(tmp_path: Path, op: str, arg: Any, expected: bool) -> None:
    lists = {"l": {"values": ["x"]}}
    assert _holds_when(tmp_path, {"user_id": {op: arg}}, lists) is expected  # user_id is None


@pytest.mark.parametrize("op", ["gt", "gte", "lt", "lte"])
def test_missing_numeric_is_false(tmp_path: Path, op: str) -> None:
    assert not _holds_when(tmp_path, {"connected_seconds": {op: 0}})  # never connected
    assert not _holds_when(tmp_path, {"attributes.score": {op: 0}})


def test_missing_bool_field(tmp_path: Path) -> None:
    assert not _holds_when(tmp_path, {"held": True})
    assert not _holds_when(tmp_path, {"held": False})
    assert _holds_when(tmp_path, {"held": {"not_equals": True}})
    assert _holds_when(tmp_path, {"held": {"exists": False}})


# ---------------------------------------------------------------- attributes


@pytest.mark.parametrize("when, attrs, expected", [
    ({"attributes.riskScore": {"gte": 80}}, {"riskScore": "85"}, True),
    ({"attributes.riskScore": {"gte": 80}}, {"riskScore": "80"}, True),
    ({"attributes.riskScore": {"gte": 80}}, {"riskScore": "79.5"}, False),
    ({"attributes.riskScore": {"gte": 80}}, {"riskScore": " 95 "}, True),
    ({"attributes.riskScore": {"gte": 80}}, {"riskScore": "high"}, False),
    ({"attributes.riskScore": {"gte": 80}}, {"riskScore": "nan"}, False),
    ({"attributes.riskScore": {"gte": 80}}, {"riskScore": ""}, False),
    ({"attributes.riskScore": {"lt": 10}}, {"riskScore": "-3"}, True),
    ({"attributes.riskScore": 80}, {"riskScore": "80.0"}, True),
    ({"attributes.riskScore": 80}, {"riskScore": "eighty"}, False),
    ({"attributes.riskScore": {"in": [1, 2, "x"]}}, {"riskScore": "2"}, True),
    ({"attributes.riskScore": {"in": [1, 2, "x"]}}, {"riskScore": "x"}, True),
    ({"attributes.riskScore": {"in": [1, 2, "x"]}}, {"riskScore": "3"}, False),
    ({"attributes.riskScore": {"not_equals": 80}}, {"riskScore": "abc"}, True),
    ({"attributes.complianceFlag": "true"}, {"complianceFlag": "true"}, True),
    ({"attributes.complianceFlag": "true"}, {"complianceFlag": "True"}, False),
    ({"attributes.complianceFlag": True}, {"complianceFlag": "true"}, True),
    ({"attributes.complianceFlag": {"exists": True}}, {"complianceFlag": ""}, True),
    ({"attributes.complianceFlag": {"exists": True}}, {"other": "1"}, False),
    ({"attributes.tier": {"matches": "gold|platinum"}}, {"tier": "gold"}, True),
    ({"attributes.tier": {"matches": "gold|platinum"}}, {"tier": "golden"}, False),
])
def test_attributes(tmp_path: Path, when: dict[str, Any], attrs: dict[str, str],
                    expected: bool) -> None:
    assert _holds_when(tmp_path, when, attributes=attrs) is expected


# ---------------------------------------------------------------- phone numbers


@pytest.mark.parametrize("address", [
    "tel:+442079460000", "+44 20 7946 0000", "sip:+442079460000@sbc.example.com;user=phone",
    "TEL:+44-20-7946-0000", "+44 (20) 7946.0000",
])
def test_phone_forms_equal(tmp_path: Path, address: str) -> None:
    for want in ("+442079460000", "tel:+44 20 7946 0000"):
        assert _holds_when(tmp_path, {"address": want}, address=address)
        assert _holds_when(tmp_path, {"address": {"in": [want, "+15550000000"]}}, address=address)
    assert not _holds_when(tmp_path, {"address": "+442079460001"}, address=address)


def test_phone_lists_ani_dnis_prefix_and_contains(tmp_path: Path) -> None:
    lists = {"bad": {"values": ["tel:+44 20 7946 0000", 15550109999]}}
    assert _holds_when(tmp_path, {"ani": {"in_list": "bad"}}, lists, ani="+442079460000")
    assert _holds_when(tmp_path, {"dnis": {"in_list": "bad"}}, lists, dnis="tel:15550109999")
    assert _holds_when(tmp_path, {"dnis": {"not_in_list": "bad"}}, lists, dnis="+15550109998")
    assert _holds_when(tmp_path, {"address": {"starts_with": "+44 20"}}, address="tel:+442079460000")
    assert not _holds_when(tmp_path, {"address": {"starts_with": "+44 21"}}, address="+442079460000")
    assert _holds_when(tmp_path, {"address": {"contains": "7946 00"}}, address="tel:+442079460000")


def test_phone_list_file_normalised(tmp_path: Path) -> None:
    (tmp_path / "blocked.txt").write_text("+44 20 7946 0000 # ring\n")
    text = ("lists:\n  b: {file: blocked.txt}\n"
            "rules:\n  - name: r\n    when: {address: {in_list: b}}\n    action: disconnect\n")
    rs = load(text, tmp_path)
    call = make_call(party("a", address="sip:+442079460000@host"), party("b", address="+4420"))
    assert holds(rs, call, "a") and not holds(rs, call, "b")


def test_phone_matches_raw_or_normalised(tmp_path: Path) -> None:
    assert _holds_when(tmp_path, {"address": {"matches": r"\+4420\d+"}}, address="tel:+44 20 7946 0000")
    assert _holds_when(tmp_path, {"address": {"matches": r"sip:.*@evil\.example"}},
                       address="sip:+15550001111@evil.example")
    assert not _holds_when(tmp_path, {"address": {"matches": r"\+1\d+"}}, address="tel:+442079460000")


# ---------------------------------------------------------------- call fields


def test_queue_ids_set_semantics(tmp_path: Path) -> None:
    lists = {"pay": {"values": ["q-pay", "q-card"]}}

    def q(call_when: dict[str, Any], queues: set[str]) -> bool:
        rs = one_rule(tmp_path, call=call_when, lists=lists)
        return holds(rs, make_call(party("a"), queue_ids=queues), "a")

    assert q({"queue_ids": "q-pay"}, {"q-sales", "q-pay"})
    assert not q({"queue_ids": "q-pay"}, {"q-sales"})
    assert q({"queue_ids": {"contains": "q-pay"}}, {"q-pay"})
    assert q({"queue_ids": {"in": ["q-pay", "q-x"]}}, {"q-sales", "q-pay"})
    assert not q({"queue_ids": {"in": ["q-x"]}}, {"q-sales", "q-pay"})
    assert q({"queue_ids": {"not_in": ["q-x"]}}, {"q-sales"})
    assert not q({"queue_ids": {"not_in": ["q-pay"]}}, {"q-sales", "q-pay"})
    assert q({"queue_ids": {"in_list": "pay"}}, {"q-card"})
    assert q({"queue_ids": {"not_in_list": "pay"}}, set())
    assert q({"queue_ids": {"not_equals": "q-pay"}}, {"q-sales"})
    assert q({"queue_ids": {"exists": False}}, set())
    assert not q({"queue_ids": {"exists": True}}, set())
    assert q({"queue_ids": {"matches": "q-p.*"}}, {"q-pay"})
    assert q({"queue_ids": {"starts_with": "q-c"}}, {"q-card"})


def test_call_scalar_fields(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, call={"id": "c9", "recording_state": {"not_in": ["active"]},
                                  "secure_pause": True, "connected_parties": {"lt": 3}})
    a = party("a")
    assert holds(rs, make_call(a, cid="c9", recording_state="paused", secure_pause=True), "a")
    assert holds(rs, make_call(a, cid="c9", secure_pause=True), "a")  # missing state: not_in holds
    assert not holds(rs, make_call(a, cid="c8", recording_state="paused", secure_pause=True), "a")
    assert not holds(rs, make_call(a, cid="c9", recording_state="active", secure_pause=True), "a")
    assert not holds(rs, make_call(a, party("b"), party("c"), cid="c9", secure_pause=True), "a")


def test_has_party_excludes_self_and_includes_ended(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"purpose": {"in": ["acd", "external"]}},
                  call={"has_party": {"purpose": "acd", "queue_id": QUEUE}})
    acd = party("q", purpose="acd", queue_id=QUEUE)
    # the acd party alone: it must not count itself
    assert not holds(rs, make_call(acd, party("x", purpose="customer")), "q")
    ended_acd = party("q", purpose="acd", queue_id=QUEUE, state="disconnected")
    assert holds(rs, make_call(ended_acd, party("x", purpose="external")), "x")
    assert not holds(rs, make_call(party("q", purpose="acd", queue_id="other"),
                                   party("x", purpose="external")), "x")


def test_has_party_with_live_state_condition(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"purpose": "external"},
                  call={"has_party": {"purpose": "agent", "state": "connected"}})
    ext = party("x", purpose="external")
    assert holds(rs, make_call(ext, party("g", purpose="agent")), "x")
    assert not holds(rs, make_call(ext, party("g", purpose="agent", state="disconnected")), "x")


def test_not_has_party(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"purpose": "external"},
                  call={"not": {"has_party": {"purpose": "agent"}}})
    ext = party("x", purpose="external")
    assert holds(rs, make_call(ext, party("c", purpose="customer")), "x")
    assert not holds(rs, make_call(ext, party("g", purpose="agent")), "x")


# ---------------------------------------------------------------- the example rules


def _ev(tmp_path: Path) -> RuleEngine:
    return RuleEngine(example(tmp_path))


def test_example_flagged_party(tmp_path: Path) -> None:
    eng = _ev(tmp_path)
    cust = party("cust", purpose="customer", attributes={"complianceFlag": "true"})
    agent = party("ag", purpose="agent", attributes={"complianceFlag": "true"})  # near miss
    ext = party("ext", purpose="external", attributes={"complianceFlag": "false"})  # near miss
    call = make_call(cust, agent, ext, recording_state="active")
    got = eng.on_change(change(call, T0), T0)
    assert [(d.rule, d.participant_id) for d in got] == [("flagged-party", "cust")]
    d = got[0]
    assert d.matched == {"purpose": "customer", "attributes.complianceFlag": "true"}
    assert d.action == "disconnect" and d.decided_at == T0 and d.received_at == T0
    assert d.conversation_id == "c1" and d.purpose == "customer"


def test_example_blocked_number_in_conference(tmp_path: Path) -> None:
    eng = _ev(tmp_path)
    ext = party("ext", purpose="external", address="tel:+44 20 7946 0000")
    two = make_call(ext, party("ag", purpose="agent"), recording_state="active")
    assert fired(eng, two, T0) == set()  # near miss: only two connected parties
    two.participants[ParticipantId("cu")] = party("cu", purpose="customer")
    got = eng.on_change(change(two, T0 + 1), T0 + 1)
    assert [(d.rule, d.participant_id) for d in got] == [("blocked-number-in-conference", "ext")]
    assert got[0].matched == {"purpose": "external", "address": "+442079460000",
                              "call.connected_parties": 3}
    # near miss: an unlisted number in a conference
    other = make_call(party("e2", purpose="external", address="+442079460001"),
                      party("a"), party("b"), cid="c2", recording_state="active")
    assert fired(eng, other, T0) == set()


def test_example_third_party_needs_recording_hold(tmp_path: Path) -> None:
    eng = _ev(tmp_path)
    ext = party("ext", purpose="external")
    call = make_call(ext, party("ag", purpose="agent"), recording_state="paused")
    assert fired(eng, call, T0) == set()
    assert eng.next_deadline() == pytest.approx(T0 + 10)
    assert eng.due(T0 + 9.999) == []  # never early
    got = eng.due(T0 + 10)
    assert [(d.rule, d.participant_id) for d in got] == [("third-party-needs-recording", "ext")]
    assert got[0].decided_at == T0 + 10 and got[0].received_at is None
    assert got[0].matched == {"purpose": "external", "state": "connected",
                              "call.recording_state": "paused"}
    # near miss: recording active
    call2 = make_call(party("e2", purpose="external"), cid="c2", recording_state="active")
    assert fired(eng, call2, T0) == set()
    assert eng.due(T0 + 100) == []


def test_example_supervisor_time_limit(tmp_path: Path) -> None:
    eng = _ev(tmp_path)
    sup = party("sup", purpose="agent", user_id="u-sup", monitored_participant_id="ag",
                connected_time=T0)
    trusted = party("tr", purpose="agent", user_id=TRUSTED, monitored_participant_id="ag",
                    connected_time=T0)  # near miss: trusted
    plain = party("ag", purpose="agent", user_id="u-ag", connected_time=T0)  # not monitoring
    call = make_call(sup, trusted, plain, party("cu", purpose="customer"), recording_state="active")
    assert fired(eng, call, T0 + 1) == set()
    deadline = eng.next_deadline()
    assert deadline is not None and T0 + 600 < deadline <= T0 + 601
    assert eng.due(T0 + 599) == []
    got = eng.due(deadline)  # no event arrives: the timer alone catches it
    assert [(d.rule, d.participant_id) for d in got] == [("supervisor-monitor-time-limit", "sup")]
    assert got[0].matched["connected_seconds"] == pytest.approx(600, abs=0.01)
    assert got[0].matched["user_id"] == "u-sup"
    assert eng.next_deadline() is None


def test_example_no_outside_party_on_payments(tmp_path: Path) -> None:
    eng = _ev(tmp_path)
    acd = party("q", purpose="acd", queue_id=QUEUE, state="disconnected")
    ext = party("ext", purpose="external")
    cust = party("cu", purpose="customer")  # near miss: not external
    call = make_call(cust, acd, ext, recording_state="active")
    got = eng.on_change(change(call, T0), T0)
    assert [(d.rule, d.participant_id) for d in got] == [("no-outside-party-on-payments", "ext")]
    assert got[0].matched == {"purpose": "external", "call.has_party": "q"}
    other = make_call(party("q", purpose="acd", queue_id="another-queue"),
                      party("ext", purpose="external"), cid="c2", recording_state="active")
    assert fired(eng, other, T0) == set()


def test_example_flagged_interaction(tmp_path: Path) -> None:
    eng = _ev(tmp_path)
    call = make_call(
        party("cu", purpose="customer", flagged_reason="general"),
        party("ext", purpose="external", attributes={"riskScore": "85"}),
        party("ag", purpose="agent", flagged_reason="general"),  # near miss: agent
        party("ivr", purpose="ivr", attributes={"riskScore": "79"}),  # near miss: 79
        recording_state="active")
    got = {(d.rule, d.participant_id, d.action) for d in eng.on_change(change(call, T0), T0)}
    assert got == {("flagged-interaction", "cu", "observe"), ("flagged-interaction", "ext", "observe")}


def test_ruleset_carries_mode_safety_lists(tmp_path: Path) -> None:
    rs = example(tmp_path)
    assert rs.mode == "enforce" and rs.safety.max_disconnects_per_minute == 30
    assert rs.lists["trusted_supervisors"] == frozenset({TRUSTED})
    assert "+44 20 7946 0000" in rs.lists["blocked_numbers"]
    assert [r.name for r in rs.rules][:2] == ["flagged-party", "blocked-number-in-conference"]


# ---------------------------------------------------------------- engine behaviour


def test_only_live_parties_are_judged(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"}))
    call = make_call(party("x", purpose="external", state="disconnected"),
                     party("y", purpose="external", state="terminated"))
    assert fired(eng, call, T0) == set()


def test_call_level_change_fires_for_unchanged_party(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"},
                              call={"connected_parties": {"gte": 3}}))
    ext = party("x", purpose="external")
    call = make_call(ext, party("a", purpose="agent"))
    assert fired(eng, call, T0) == set()
    newcomer = party("c", purpose="customer")
    call.participants[newcomer.id] = newcomer
    # only the newcomer changed, but the external party is the one that now breaks the rule
    got = eng.on_change(change(call, T0 + 1, newcomer), T0 + 1)
    assert [(d.rule, d.participant_id) for d in got] == [("r", "x")]


def test_edge_triggered_and_rearm(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"}))
    call = make_call(party("x", purpose="external"))
    assert fired(eng, call, T0) == {("r", "x")}
    assert fired(eng, call, T0 + 1) == set()  # still true: fires once
    call.participants[ParticipantId("x")].purpose = "customer"
    assert fired(eng, call, T0 + 2) == set()
    call.participants[ParticipantId("x")].purpose = "external"
    assert fired(eng, call, T0 + 3) == set()  # true again, but no rearm: no second decision
    assert eng.has_fired(RuleName("r"), ConversationId("c1"), ParticipantId("x"))
    eng.rearm(RuleName("r"), ConversationId("c1"), ParticipantId("x"))
    assert fired(eng, call, T0 + 4) == {("r", "x")}
    # the same rule, another party and another call are independent
    call.participants[ParticipantId("y")] = party("y", purpose="external")
    assert fired(eng, call, T0 + 5) == {("r", "y")}
    assert fired(eng, make_call(party("x", purpose="external"), cid="c2"), T0 + 5) == {("r", "x")}


def test_rearm_at_rejudges_without_event(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"}))
    call = make_call(party("x", purpose="external"))
    assert fired(eng, call, T0) == {("r", "x")}
    eng.rearm(RuleName("r"), ConversationId("c1"), ParticipantId("x"), at=T0 + 5)
    assert eng.next_deadline() == T0 + 5
    assert eng.due(T0 + 4) == []
    assert [d.participant_id for d in eng.due(T0 + 5)] == ["x"]
    assert eng.next_deadline() is None


def test_hold_for_cancels_when_condition_stops(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"},
                              call={"recording_state": {"not_equals": "active"}}, hold_for="10s"))
    call = make_call(party("x", purpose="external"), recording_state="paused")
    assert fired(eng, call, T0) == set()
    call.recording_state = "active"
    assert fired(eng, call, T0 + 5) == set()
    assert eng.next_deadline() is None and eng.pending_timers == 0
    assert eng.due(T0 + 60) == []
    # starts again from scratch: the new deadline counts from when it became true again
    call.recording_state = "paused"
    assert fired(eng, call, T0 + 20) == set()
    assert eng.next_deadline() == pytest.approx(T0 + 30)
    assert fired(eng, call, T0 + 25) == set()  # still holding: the timer is not restarted
    assert eng.next_deadline() == pytest.approx(T0 + 30)
    assert eng.due(T0 + 29.9) == []
    assert [d.participant_id for d in eng.due(T0 + 30.5)] == ["x"]


def test_hold_for_change_after_deadline_fires_on_change(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"}, hold_for=2))
    call = make_call(party("x", purpose="external"))
    assert fired(eng, call, T0) == set()
    got = eng.on_change(change(call, T0 + 3), T0 + 3)  # the engine ticked late; an event came
    assert [(d.rule, d.received_at) for d in got] == [("r", T0 + 3)]
    assert eng.due(T0 + 10) == []  # fired once only


def test_hold_for_rejudges_against_current_state_at_deadline(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"},
                              call={"recording_state": "paused"}, hold_for="500ms"))
    call = make_call(party("x", purpose="external"), recording_state="paused")
    assert fired(eng, call, T0) == set()
    call.recording_state = "active"  # the store mutated the call; no change passed to rules yet
    assert eng.due(T0 + 1) == []


def test_hold_for_party_leaves(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"}, hold_for="1m"))
    x = party("x", purpose="external")
    call = make_call(x, party("a", purpose="agent"))
    assert fired(eng, call, T0) == set()
    x.state = "disconnected"
    assert eng.on_change(change(call, T0 + 1, x), T0 + 1) == []
    assert eng.pending_timers == 0
    assert eng.due(T0 + 120) == []


def test_connected_seconds_with_hold_for(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"connected_seconds": {"gte": 60}}, hold_for="30s"))
    call = make_call(party("x", connected_time=T0))
    assert fired(eng, call, T0 + 1) == set()
    t1 = eng.next_deadline()
    assert t1 is not None and T0 + 60 <= t1 < T0 + 61
    assert eng.due(t1) == []  # now true: the hold starts
    t2 = eng.next_deadline()
    assert t2 == pytest.approx(t1 + 30)
    assert eng.due(t2 - 0.01) == []
    assert [d.participant_id for d in eng.due(t2)] == ["x"]


def test_connected_seconds_in_has_party_timer(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "customer"},
                              call={"has_party": {"purpose": "agent", "connected_seconds": {"gt": 30}}}))
    call = make_call(party("cu", purpose="customer"), party("ag", purpose="agent", connected_time=T0))
    assert fired(eng, call, T0 + 1) == set()
    t = eng.next_deadline()
    assert t is not None and T0 + 30 < t < T0 + 31
    assert [d.participant_id for d in eng.due(t)] == ["cu"]


def test_connected_seconds_no_timer_when_other_conditions_fail(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "agent", "held": True,
                                              "connected_seconds": {"gt": 30}}))
    call = make_call(party("ag", purpose="agent", held=False, connected_time=T0))
    assert fired(eng, call, T0) == set()
    assert eng.next_deadline() is None
    call.participants[ParticipantId("ag")].held = True
    assert fired(eng, call, T0 + 1) == set()
    assert eng.next_deadline() is not None
    call.participants[ParticipantId("ag")].held = False  # released before the limit
    assert fired(eng, call, T0 + 2) == set()
    assert eng.next_deadline() is None


def test_forget_call(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"}, hold_for="10s"))
    call = make_call(party("x", purpose="external"))
    assert fired(eng, call, T0) == set()
    assert eng.tracked_calls == 1 and eng.next_deadline() is not None
    eng.forget_call(ConversationId("c1"))
    assert eng.tracked_calls == 0 and eng.next_deadline() is None and eng.pending_timers == 0
    assert eng.due(T0 + 60) == []
    eng.forget_call(ConversationId("nope"))  # unknown: no error


def test_swap_keeps_state_of_unchanged_rules_only(tmp_path: Path) -> None:
    base = ("rules:\n"
            "  - name: same\n    when: {purpose: external}\n    action: disconnect\n"
            "  - name: changed\n    when: {purpose: external}\n    action: observe\n"
            "  - name: timed\n    when: {purpose: external}\n    hold_for: 10s\n    action: observe\n")
    eng = RuleEngine(load(base, tmp_path))
    call = make_call(party("x", purpose="external"))
    assert fired(eng, call, T0) == {("same", "x"), ("changed", "x")}
    assert eng.next_deadline() == pytest.approx(T0 + 10)
    new = base.replace("    when: {purpose: external}\n    action: observe\n",
                       "    when: {purpose: {in: [external]}}\n    action: observe\n", 1)
    new = new.replace("action: disconnect\n", "action: disconnect\n    message: reworded\n", 1)
    eng.swap(load(new, tmp_path))
    # 'same' (only its message changed) keeps its edge; 'changed' fires again; timer kept
    assert fired(eng, call, T0 + 1) == {("changed", "x")}
    assert eng.next_deadline() == pytest.approx(T0 + 10)
    assert [d.rule for d in eng.due(T0 + 10)] == ["timed"]


def test_swap_drops_removed_rule_timers_and_reevaluate(tmp_path: Path) -> None:
    eng = RuleEngine(one_rule(tmp_path, when={"purpose": "external"}, hold_for="10s"))
    call = make_call(party("x", purpose="external"))
    assert fired(eng, call, T0) == set()
    eng.swap(one_rule(tmp_path, when={"purpose": "customer"}))
    assert eng.next_deadline() is None and eng.due(T0 + 20) == []
    eng.swap(one_rule(tmp_path, when={"purpose": "external"}))
    assert [d.participant_id for d in eng.reevaluate(T0 + 21)] == ["x"]


def test_swap_list_content_change_resets_state(tmp_path: Path) -> None:
    def rs(values: list[str]) -> Any:
        return one_rule(tmp_path, when={"user_id": {"in_list": "l"}}, lists={"l": {"values": values}})
    eng = RuleEngine(rs(["u1"]))
    call = make_call(party("a", user_id="u1"))
    assert fired(eng, call, T0) == {("r", "a")}
    eng.swap(rs(["u1"]))
    assert fired(eng, call, T0) == set()
    eng.swap(rs(["u1", "u2"]))
    assert fired(eng, call, T0) == {("r", "a")}


def test_disabled_rule_not_run(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"purpose": "external"}, enabled=False)
    assert rs.rules == () and rs.disabled == ("r",)
    assert fired(RuleEngine(rs), make_call(party("x", purpose="external")), T0) == set()


def test_evaluate_party_and_explain_are_stateless(tmp_path: Path) -> None:
    eng = RuleEngine(example(tmp_path))
    ext = party("ext", purpose="external", address="+442079460000")
    call = make_call(ext, party("a", purpose="agent"), recording_state="paused")
    names = {d.rule for d in eng.evaluate_party(call, ext, T0)}
    assert names == {"third-party-needs-recording"}  # hold_for ignored, nothing recorded
    assert eng.tracked_calls == 0 and eng.next_deadline() is None
    verdicts = {v.rule: v for v in eng.explain(call, ext, T0)}
    assert verdicts["third-party-needs-recording"].holds
    blocked = verdicts["blocked-number-in-conference"]
    assert not blocked.holds and blocked.failed == ("call.connected_parties gte 3",)
    assert verdicts["flagged-party"].failed == ('attributes.complianceFlag equals "true"',)


def test_purpose_prefilter_cache_bounded(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"purpose": {"not_in": ["agent"]}})
    eng = RuleEngine(rs)
    for i in range(600):  # purposes come from outside; the cache must not grow without bound
        call = make_call(party("p", purpose=f"weird-{i}"), cid=f"c{i}")
        assert fired(eng, call, T0) == {("r", "p")}
    assert len(rs._plans) <= 512


# ---------------------------------------------------------------- messages


def test_message_placeholders(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"purpose": "external"}, severity="critical", tags=["pci"],
                  message="{rule.name}/{rule.severity}: removed {party.name} ({party.address}) "
                          "from {call.id} score={party.attributes.riskScore} "
                          "held={party.held} n={call.connected_parties} {{literal}}")
    call = make_call(party("x", purpose="external", name="Bob", address="tel:+44 20 7946 0000",
                           attributes={"riskScore": "90"}, held=False), cid="conv-1")
    (d,) = RuleEngine(rs).on_change(change(call, T0), T0)
    assert d.message == ("r/critical: removed Bob (tel:+44 20 7946 0000) from conv-1 score=90 "
                         "held=false n=1 {literal}")
    assert d.severity == "critical" and d.tags == ("pci",)


def test_message_missing_values_and_default(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"purpose": "external"},
                  message="{party.name} {party.attributes.nope} {party.connected_seconds}")
    (d,) = RuleEngine(rs).on_change(change(make_call(party("x", purpose="external")), T0), T0)
    assert d.message == "- - -"
    rs = one_rule(tmp_path, when={"purpose": "external"})
    (d,) = RuleEngine(rs).on_change(change(make_call(party("x", purpose="external")), T0), T0)
    assert d.message == "r: external party x on call c1"


def test_message_long_values_truncated(tmp_path: Path) -> None:
    rs = one_rule(tmp_path, when={"purpose": "external"}, message="{party.attributes.x}")
    call = make_call(party("x", purpose="external", attributes={"x": "y" * 10_000}))
    (d,) = RuleEngine(rs).on_change(change(call, T0), T0)
    assert len(d.message) <= 2000 and d.message.endswith("...")


# ---------------------------------------------------------------- hold_for parsing, valve


@pytest.mark.parametrize("value, seconds", [
    ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), ("500ms", 0.5), (10, 10.0), (1.5, 1.5),
    ("10", 10.0), (" 3 s ", 3.0), (0, 0.0),
])
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["banana", "10 minutes", "-1s", -5, True, None, "1e3s", float("inf")])
def test_parse_duration_rejects(value: Any) -> None:
    assert parse_duration(value) is None


def test_safety_valve_sliding_window_and_trip() -> None:
    v = SafetyValve(3)
    assert [v.allow(t) for t in (0.0, 10.0, 20.0)] == [True, True, True]
    assert not v.tripped
    assert v.allow(30.0) is False and v.tripped and v.tripped_at == 30.0
    assert v.allow(500.0) is False  # stays tripped until resume, even after the window
    v.resume()
    assert not v.tripped and v.tripped_at is None
    assert [v.allow(t) for t in (600.0, 601.0, 602.0)] == [True, True, True]
    assert v.count(602.0) == 3 and v.count(660.5) == 2  # 600.0 left the window


def test_safety_valve_window_slides_without_tripping() -> None:
    v = SafetyValve(2)
    for i in range(20):  # 2 a minute, evenly spread, never trips
        assert v.allow(i * 30.0 + 0.5)  # binary-exact times
    assert not v.tripped


def test_safety_valve_zero_allows_nothing() -> None:
    v = SafetyValve(0)
    assert v.allow(0.0) is False and v.tripped
    with pytest.raises(ValueError):
        SafetyValve(-1)


# (sans-I/O: tests/core/test_sans_io.py checks the whole of daemon/core/)


# ---------------------------------------------------------------- generated code vs a reference

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from daemon.core.phone import normalize_phone  # noqa: E402

_WORDS = ["customer", "external", "agent", "Fraud Desk", "x", ""]
_PHONES = ["tel:+442079460000", "+44 20 7946 0000", "+15550001111", "sip:bob@host", "Anonymous"]
_NUMS = ["85", "80", "80.0", "-3", "high", "", " 7 "]
_QUEUES = ["q1", "q2", "q3"]
_LIST = {"l": ["x", "agent", "+442079460000", "q2", "80"]}


def _ref_value(field: str, call: Any, p: Any, now: float) -> Any:
    if field.startswith("call."):
        return {"call.queue_ids": call.queue_ids,
                "call.connected_parties": call.connected_parties}[field]
    if field.startswith("attributes."):
        return p.attributes.get(field[len("attributes."):])
    if field == "connected_seconds":
        return p.connected_seconds(now)
    return getattr(p, field)


def _ref_num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if x != x else x


def _ref_op(field: str, op: str, arg: Any, v: Any) -> bool:
    """The documented semantics, written plainly."""
    phone = field in ("address", "ani", "dnis")
    norm = normalize_phone if phone else (lambda s: s)
    if op.startswith("not_"):
        return not _ref_op(field, op[4:] if op != "not_equals" else "equals", arg, v)
    if op == "exists":
        present = bool(v) if field == "call.queue_ids" else v is not None
        return present is arg
    if field == "call.queue_ids":
        return _ref_set_op(op, arg, set(v))
    if v is None:
        return False
    if op in ("gt", "gte", "lt", "lte"):
        x = _ref_num(v)
        if x is None:
            return False
        return {"gt": x > arg, "gte": x >= arg, "lt": x < arg, "lte": x <= arg}[op]
    if op in ("equals", "in"):
        return any(_ref_equal(field, v, w, norm) for w in ([arg] if op == "equals" else arg))
    if op == "in_list":
        return norm(v) in {norm(x) for x in _LIST[arg]}
    if op == "matches":
        return bool(re.fullmatch(arg, v) or (phone and re.fullmatch(arg, normalize_phone(v))))
    if op == "contains":
        return norm(arg) in norm(v)
    if op == "starts_with":
        return norm(v).startswith(norm(arg))
    raise AssertionError(op)


def _ref_set_op(op: str, arg: Any, items: set[str]) -> bool:
    """An operator on a set-valued field (call.queue_ids): true when any item satisfies it."""
    if op in ("equals", "contains"):
        return arg in items
    if op == "in":
        return bool(items & set(arg))
    if op == "in_list":
        return bool(items & set(_LIST[arg]))
    if op == "matches":
        return any(re.fullmatch(arg, x) for x in items)
    if op == "starts_with":
        return any(x.startswith(arg) for x in items)
    raise AssertionError(op)


def _ref_equal(field: str, v: Any, w: Any, norm: Callable[[str], str]) -> bool:
    """`equals` for one wanted value `w`: booleans by identity (attributes: "true"/"false"),
    numbers by value (text parsed), text after `norm` (phone normalisation)."""
    if isinstance(v, bool) or isinstance(w, bool):
        if field.startswith("attributes.") and isinstance(w, bool):
            return bool(v == ("true" if w else "false"))
        return v is w
    if isinstance(w, (int, float)) and isinstance(v, str):
        return _ref_num(v) == w
    if isinstance(w, (int, float)):
        return bool(v == w)
    return bool(norm(v) == norm(w))


def _ref_group(cond: dict[str, Any], call: Any, p: Any, now: float) -> bool:
    for key, val in cond.items():
        if key == "any":
            ok = any(_ref_group(c, call, p, now) for c in val)
        elif key == "all":
            ok = all(_ref_group(c, call, p, now) for c in val)
        elif key == "not":
            ok = not _ref_group(val, call, p, now)
        else:
            v = _ref_value(key, call, p, now)
            ops = val if isinstance(val, dict) else {"equals": val}
            ok = all(_ref_op(key, op, arg, v) for op, arg in ops.items())
        if not ok:
            return False
    return True


_TEXT_OPS = st.sampled_from(["equals", "not_equals", "contains", "starts_with", "matches"])


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    text = st.one_of(
        st.tuples(st.sampled_from(["purpose", "name"]), _TEXT_OPS, st.sampled_from(["agent", "x", "Fraud.*", "F"])),
        st.tuples(st.sampled_from(["purpose", "name"]), st.sampled_from(["in", "not_in"]),
                  st.lists(st.sampled_from(_WORDS), max_size=3)),
        st.tuples(st.just("address"), st.sampled_from(["equals", "not_equals", "contains", "starts_with"]),
                  st.sampled_from(["+44 20 7946 0000", "+1555", "sip:bob", "bob", "7946"])),
        st.tuples(st.just("address"), st.just("matches"),
                  st.sampled_from([r"\+4420.*", "sip:.*", "bob", "anonymous", "tel:.*"])),
        st.tuples(st.just("address"), st.sampled_from(["in_list", "not_in_list"]), st.just("l")),
        st.tuples(st.sampled_from(["name", "attributes.s", "call.queue_ids"]),
                  st.sampled_from(["in_list", "not_in_list"]), st.just("l")),
        st.tuples(st.just("held"), st.sampled_from(["equals", "not_equals"]), st.booleans()),
        st.tuples(st.sampled_from(["name", "held", "attributes.s", "address", "call.queue_ids"]),
                  st.just("exists"), st.booleans()),
        st.tuples(st.sampled_from(["attributes.s", "connected_seconds", "call.connected_parties"]),
                  st.sampled_from(["gt", "gte", "lt", "lte"]), st.sampled_from([0, 2, 80, 79.5])),
        st.tuples(st.just("attributes.s"), st.sampled_from(["equals", "not_equals"]),
                  st.sampled_from([80, "80", "high", True])),
        st.tuples(st.just("attributes.s"), st.sampled_from(["in", "not_in"]),
                  st.lists(st.sampled_from([80, "high", -3, "x"]), max_size=3)),
        st.tuples(st.just("call.queue_ids"), st.sampled_from(["equals", "not_equals", "contains", "starts_with"]),
                  st.sampled_from(_QUEUES + ["q"])),
        st.tuples(st.just("call.queue_ids"), st.sampled_from(["in", "not_in"]),
                  st.lists(st.sampled_from(_QUEUES), max_size=2)),
    )
    return text.map(lambda t: {t[0]: {t[1]: t[2]}})


_conds = st.recursive(
    st.lists(_leaf(), min_size=1, max_size=3).map(lambda ls: {k: v for d in ls for k, v in d.items()}),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"any": xs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"all": xs}),
        inner.map(lambda x: {"not": x}),
        st.tuples(inner, inner).map(lambda ab: {**ab[0], **{k: v for k, v in ab[1].items() if k not in ab[0]}}),
    ),
    max_leaves=6,
)

_parties = st.builds(
    lambda purpose, name, held, address, s, ct: party(
        "p", purpose=purpose, name=name, held=held, address=address,
        attributes={} if s is None else {"s": s}, connected_time=ct),
    st.sampled_from(_WORDS + [None]), st.sampled_from(_WORDS + [None]), st.sampled_from([True, False, None]),
    st.sampled_from(_PHONES + [None]), st.sampled_from(_NUMS + [None]), st.sampled_from([None, 990.0, 900.0]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cond=_conds, p=_parties, queues=st.sets(st.sampled_from(_QUEUES), max_size=3),
       others=st.integers(0, 3))
def test_compiled_rules_agree_with_reference(tmp_path: Path, cond: dict[str, Any], p: Any,
                                             queues: set[str], others: int) -> None:
    rs = one_rule(tmp_path, when=cond, lists={"l": {"values": _LIST["l"]}})
    call = make_call(p, *(party(f"o{i}") for i in range(others)), queue_ids=queues)
    now = 1000.0
    expected = _ref_group(cond, call, p, now)
    assert holds(rs, call, "p", now) is expected
    # the fused per-purpose path gives the same answer as the per-rule path
    plan = rs.plan_for(p.purpose)
    if plan.plain:
        hit = bool(plan.fused(call, p, now))
    elif plan.timed:  # connected_seconds makes the rule timed: judged by its own test
        hit = plan.timed[0][1](call, p, now)
    else:  # the purpose prefilter rejected the party
        hit = False
    assert hit is expected


def test_bad_data_fails_one_rule_not_the_others(tmp_path: Path) -> None:
    text = ("rules:\n"
            "  - name: picky\n    when: {attributes.x: {contains: a}}\n    action: observe\n"
            "  - name: timed\n    when: {attributes.x: {starts_with: a}}\n    hold_for: 1s\n"
            "    action: observe\n"
            "  - name: plain\n    when: {purpose: external}\n    action: disconnect\n")
    eng = RuleEngine(load(text, tmp_path))
    # attributes are str -> str by contract; a value of another type must not stop the others
    bad = party("x", purpose="external", attributes={"x": 5})
    got = eng.on_change(change(make_call(bad), T0), T0)
    assert [d.rule for d in got] == ["plain"]
    assert eng.evaluation_errors == 2
    # An explanation of the same bad data judges those conditions false and records nothing.
    verdicts = {v.rule: v for v in eng.explain(make_call(bad), bad, T0)}
    assert not verdicts["picky"].holds and verdicts["plain"].holds
    assert eng.evaluation_errors == 2


def test_fused_plan_with_shared_subexpressions_matches_per_rule(tmp_path: Path) -> None:
    conds = [
        {"address": {"matches": r"\+4420\d+"}}, {"address": {"starts_with": "+44"}},
        {"address": {"in_list": "l"}}, {"attributes.s": {"gte": 80}},
        {"attributes.s": {"lt": 0}}, {"attributes.s": "high"}, {"attributes.s": {"in": [85, "x"]}},
        {"call.connected_parties": {"gte": 2}}, {"not": {"call.connected_parties": 1}},
        {"any": [{"address": {"contains": "7946"}}, {"attributes.s": {"exists": False}}]},
    ]
    rules = "".join(f"  - name: r{i}\n    when: {c!r}\n    action: observe\n".replace("'", '"')
                    for i, c in enumerate(conds))
    rs = load("lists:\n  l: {values: ['+44 20 7946 0000']}\nrules:\n" + rules, tmp_path)
    plan = rs.plan_for("customer")
    assert len(plan.plain) == len(conds)
    for address in _PHONES + [None]:
        for s in _NUMS + [None]:
            for others in range(3):
                p = party("p", purpose="customer", address=address,
                          attributes={} if s is None else {"s": s})
                call = make_call(p, *(party(f"o{i}") for i in range(others)))
                want = tuple(i for i, r in enumerate(plan.plain) if r.test(call, p, 1000.0))
                assert plan.fused(call, p, 1000.0) == want, (address, s, others)
