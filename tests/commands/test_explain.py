"""`confguard explain`: condition by condition, why each rule does or does not fire on one
call; offline from a saved CallConversation and over REST against the sandbox."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _logging_state import preserved_logging
from daemon.commands.cli import main
from daemon.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config.yaml"
CALL = ROOT / "tests" / "fixtures" / "explain" / "conference.json"
AT = "2026-11-21T09:10:00Z"
EXTERNAL = "e0000000-0000-4000-8000-000000000003"
SUPERVISOR = "50000000-0000-4000-8000-000000000005"
ACD = "d0000000-0000-4000-8000-000000000004"
CUSTOMER = "c0000000-0000-4000-8000-000000000001"

@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main` configures logging on the captured stderr; later tests must not log there."""
    with preserved_logging():
        yield



def _json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["explain", "--config", str(CONFIG), "--call", str(CALL), "--at", AT,
                 "--json", *args]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def _rule(data: dict[str, Any], party: str, rule: str) -> dict[str, Any]:
    p = next(p for p in data["parties"] if p["participant_id"] == party)
    r: dict[str, Any] = next(r for r in p["rules"] if r["rule"] == rule)
    return r


def test_table_shows_every_condition_value_verdict_timer_and_result(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--config", str(CONFIG), "--call", str(CALL), "--at", AT,
                 "--party", EXTERNAL]) == 0
    out = capsys.readouterr().out
    assert out.startswith("call 9a7b6c5d-1111-4222-8333-444455556666 judged at "
                          "2026-11-21T09:10:00.000Z: 5 parties, 4 connected, recording_state paused")
    assert f"party {EXTERNAL} (external, connected, 'Third Party', tel:+442079460999)" in out
    lines = [ln.split() for ln in out.splitlines()]
    assert ["party", "address", "in_list", '"blocked_numbers"', "saw", "address=tel:+442079460999",
            "(compared", "as", "+442079460999)", "yes"] in lines  # as written, and as compared
    assert ["call", "call.connected_parties", "gte", "3", "saw", "call.connected_parties=4",
            "yes"] in lines
    assert ["party", "attributes.complianceFlag", "equals", '"true"', "saw",
            "attributes.complianceFlag=(absent)", "NO"] in lines
    assert "timer  hold_for 10s: holding; elapsed 0s, remaining 10s (counted from this snapshot)" in out
    assert "result FIRES in 10s if nothing changes (hold_for)" in out
    assert out.count("result FIRES now") == 2  # blocked number, outside party on payments
    assert "result no: 1 condition(s) false" in out
    assert SUPERVISOR not in out  # --party: only that one


def test_json_every_rule_for_every_party(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(capsys)
    assert data["conversation_id"] == "9a7b6c5d-1111-4222-8333-444455556666"
    assert len(data["parties"]) == 5
    for p in data["parties"]:
        assert [r["rule"] for r in p["rules"]] == [
            "flagged-party", "blocked-number-in-conference", "third-party-needs-recording",
            "supervisor-monitor-time-limit", "no-outside-party-on-payments", "flagged-interaction"]
    hold = _rule(data, EXTERNAL, "third-party-needs-recording")
    assert hold["result"] == "fires_later" and hold["hold"] == {"elapsed_seconds": 0.0,
                                                               "remaining_seconds": 10.0}
    assert [c["scope"] for c in hold["conditions"]] == ["party", "party", "call"]
    sup = _rule(data, SUPERVISOR, "supervisor-monitor-time-limit")
    assert sup["result"] == "fires_later" and sup["fires_at"] == "2026-11-21T09:12:00.001Z"
    assert sup["conditions"][2] == {"scope": "party", "condition": "connected_seconds gt 600",
                                    "values": {"connected_seconds": 480.0}, "holds": False}
    observe = _rule(data, CUSTOMER, "flagged-interaction")
    assert observe["action"] == "observe" and observe["result"] == "fires_now"
    assert observe["conditions"][0]["values"] == {"flagged_reason": None,
                                                  "attributes.riskScore": "85"}
    gone = next(p for p in data["parties"] if p["participant_id"] == ACD)
    assert gone["judged"] is False and {r["result"] for r in gone["rules"]} == {"not_judged"}


def test_at_changes_time_conditions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--config", str(CONFIG), "--call", str(CALL), "--party", SUPERVISOR,
                 "--at", "2026-11-21T09:13:00Z", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert _rule(data, SUPERVISOR, "supervisor-monitor-time-limit")["result"] == "fires_now"


@pytest.mark.parametrize("args, code, message", [
    (["--call", str(CALL), "--party", "nobody"], 3, "has no participant nobody"),
    (["--call", "missing.json"], 2, "cannot read call file"),
    (["--call", str(CALL), "--at", "yesterday"], 2, "--at: expected an ISO-8601 time"),
    ([], 2, ""),                                           # --conversation or --call is required
    (["--call", str(CALL), "--conversation", "x"], 2, ""),  # not both
])
def test_bad_arguments(capsys: pytest.CaptureFixture[str], args: list[str], code: int,
                       message: str) -> None:
    assert main(["explain", "--config", str(CONFIG), *args]) == code
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"), ("[1, 2]", "expected a CallConversation object"),
    ('{"id": "c1"}', "not a CallConversation"),
])
def test_unusable_call_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                            message: str) -> None:
    f = tmp_path / "call.json"
    f.write_text(content, encoding="utf-8")
    assert main(["explain", "--config", str(CONFIG), "--call", str(f)]) == 2
    assert message in capsys.readouterr().err


def _sandbox_config(tmp_path: Path, sb: Sandbox) -> Path:
    text = CONFIG.read_text(encoding="utf-8").replace(
        "\ngenesys:\n", f"\ngenesys:\n  api_base_url: {sb.base_url}\n  login_base_url: {sb.base_url}\n", 1)
    (tmp_path / "blocked-numbers.txt").write_text(
        (ROOT / "blocked-numbers.txt").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text, encoding="utf-8")
    return cfg


async def _explain(sb: Sandbox, cfg: Path, *args: str) -> tuple[int, str, str]:
    env = dict(os.environ, GENESYSCLOUD_OAUTHCLIENT_ID=sb.client_id,
               GENESYSCLOUD_OAUTHCLIENT_SECRET=sb.client_secret)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "explain", "--config", str(cfg), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_conversation_over_rest_against_the_sandbox(sandbox: Sandbox, tmp_path: Path) -> None:
    w = sandbox.world
    q = w.create_queue("Customer Service")
    agent_user = w.create_user("Alex Agent")
    conv = w.start_call(q.id)
    w.connect_agent(conv.id, agent_user.id)
    ext = w.add_external(conv.id, "tel:+44 20 7946 0999")  # on blocked-numbers.txt
    w.set_recording(conv.id, "paused")
    cfg = _sandbox_config(tmp_path, sandbox)

    code, out, err = await _explain(sandbox, cfg, "--conversation", conv.id)
    assert code == 0, err
    assert out.startswith(f"call {conv.id} judged at ")
    assert f"party {ext.id} (external, connected" in out
    block = out[out.index(f"party {ext.id}"):]
    block = block[:block.index("rule third-party-needs-recording")]
    assert "call   call.connected_parties gte 3" in block and "result FIRES now" in block
    assert sandbox.client_secret not in out + err

    code, out, err = await _explain(sandbox, cfg, "--conversation", conv.id, "--party", ext.id,
                                    "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [p["participant_id"] for p in data["parties"]] == [ext.id]
    assert _rule(data, ext.id, "blocked-number-in-conference")["result"] == "fires_now"
    assert _rule(data, ext.id, "third-party-needs-recording")["hold"]["remaining_seconds"] == 10.0

    code, out, err = await _explain(sandbox, cfg, "--conversation", "00000000-0000-4000-8000-000000006000")
    assert code == 3 and "no call 00000000-0000-4000-8000-000000006000" in err, err
    for bad in ("no-such-call", "..", "%2e", "a/b"):  # issue 21: exit 2, no request
        requests = len(sandbox.journal.requests)
        code, out, err = await _explain(sandbox, cfg, "--conversation", bad)
        assert code == 2 and "not a Genesys id" in err, err
        assert len(sandbox.journal.requests) == requests


def test_disabled_rules_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("subscriptions: {queues: [q]}\nrules:\n"
                   "  - {name: r-on, when: {purpose: external}, action: observe}\n"
                   "  - {name: r-off, when: {purpose: agent}, action: disconnect, enabled: false}\n",
                   encoding="utf-8")
    assert main(["explain", "--config", str(cfg), "--call", str(CALL), "--at", AT]) == 0
    out = capsys.readouterr().out
    assert "1 rule(s) enabled; disabled (not judged): r-off" in out
    assert "rule r-off" not in out and out.count("rule r-on  (observe, warning)") == 5


def test_rule_filter_sip_as_written_and_false_not_absent(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`--rule NAME` (repeatable) shows only those rules; a SIP address is shown as the call
    has it; a `has_party` that matches no one is `none` (false), not `(absent)`."""
    call = json.loads(CALL.read_text())
    sip = "sip:a122ab8b-9c1d-4e2f-8a3b-4c5d6e7f8a90@localhost"
    for party in call["participants"]:
        if party["id"] == EXTERNAL:
            party["address"] = sip
        if party["id"] == ACD:
            party["queue"] = {"id": "11111111-2222-4333-8444-555555555555"}  # not Payments
    path = tmp_path / "call.json"
    path.write_text(json.dumps(call))
    assert main(["explain", "--config", str(CONFIG), "--call", str(path), "--at", AT,
                 "--party", EXTERNAL, "--rule", "blocked-number-in-conference",
                 "--rule", "no-outside-party-on-payments"]) == 0
    out = capsys.readouterr().out
    rules = [ln.split()[1] for ln in out.splitlines() if ln.startswith("  rule ")]
    assert rules == ["blocked-number-in-conference", "no-outside-party-on-payments"]
    assert f"saw address={sip} (compared as " in out
    has_party = next(ln for ln in out.splitlines() if "call.has_party(" in ln)
    assert has_party.split()[-2:] == ["call.has_party=none", "NO"] and "(absent)" not in has_party
    assert main(["explain", "--config", str(CONFIG), "--call", str(path), "--rule", "no-such-rule"]) == 2
    assert "--rule: no rule 'no-such-rule'" in capsys.readouterr().err
