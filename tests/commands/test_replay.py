"""`confguard replay`: a real run recorded against the sandbox, replayed on a virtual clock.

The live run is the real `Daemon(record_path=...)` over real sockets (breakers and near
misses, including a `hold_for` rule); the replay must make the same decisions (same rule,
same participant, same call) and fire the `hold_for` timer at the virtual time it fired
live. `--expect` is exercised both passing and failing in each documented way, and a
malformed events file is refused with `file:line`.

tests/fixtures/replay/ holds a small recorded run with its config and expectations, as an
example for operators; `test_committed_fixture_*` keeps it working.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from _daemon_harness import REPO, SALES, read_jsonl, run_cli, wait_until
from _rules_helpers import shipped_rule
from daemon.service.audit import verify
from daemon.config import load_config
from daemon.commands.replay import read_frames, replay
from daemon.core.timefmt import format_time as iso
from daemon.sandbox import Sandbox
from daemon.service.lifecycle import Daemon

FIXTURES = REPO / "tests" / "fixtures" / "replay"
HOLD = 1.0
AGENT = "a11ce000-0000-4000-8000-00000000000b"

RULES = "\nrules:\n" + "".join([
    shipped_rule("flagged-party", "severity: critical"),
    shipped_rule("blocked-number-in-conference"),
    shipped_rule("third-party-needs-recording", hold_for=f"{HOLD:g}s"),
    """\
  - name: risky-interaction
    when:
      attributes.riskScore: {gte: 80}
      not: {purpose: agent}
    action: observe
"""])


def replay_config(folder: Path, base_url: str = "http://127.0.0.1:9") -> Path:
    """The config of the recorded run (Genesys origins only matter live)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "blocked-numbers.txt").write_text("# never in a conference\n+1 415 555 0999\n")
    path = folder / "config.yaml"
    path.write_text(f"""schema_version: 1
genesys:
  api_base_url: {base_url}
  login_base_url: {base_url}
subscriptions:
  queues: [{SALES}]
lists:
  blocked_numbers: {{file: blocked-numbers.txt}}
{RULES}
audit:
  path: audit/audit.jsonl
  fsync_interval: 0.2
ops:
  enabled: false
logging:
  level: warning
""")
    return path


@dataclass
class Recorded:
    config: Path
    events: Path
    audit: Path
    parties: dict[str, tuple[str, str]]  # label -> (conversation id, participant id)

    def live_decisions(self) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(self.audit) if r["type"] == "decision"]


async def record_run(sb: Sandbox, folder: Path) -> Recorded:
    """Run the daemon against the sandbox, play breakers and near misses, record every frame."""
    cfg_path = replay_config(folder, sb.base_url)
    events = folder / "events.jsonl"
    w = sb.world
    w.create_queue("Sales", SALES)
    w.create_user("Alice Agent", AGENT)
    daemon = Daemon(load_config(cfg_path), config_path=cfg_path, record_path=events, drain_timeout=2.0)
    await asyncio.wait_for(daemon.start(), 20)
    parties: dict[str, tuple[str, str]] = {}
    try:
        def call(recorded: bool = True, ani: str = "tel:+14155550100") -> Any:
            conv = w.start_call(SALES, ani=ani)
            w.connect_agent(conv.id, AGENT)
            if recorded:
                w.set_recording(conv.id, "active")
            return conv

        c = call()  # breaker: flagged external
        p = w.add_external(c.id, "tel:+14155550123")
        w.set_attributes(c.id, p.id, {"complianceFlag": "true"})
        parties["flagged"] = (c.id, p.id)
        c = call()  # near miss: the flag says false
        p = w.add_external(c.id, "tel:+14155550124")
        w.set_attributes(c.id, p.id, {"complianceFlag": "false"})
        parties["flag-false"] = (c.id, p.id)
        c = call()  # breaker: blocked number conferenced in
        p = w.add_external(c.id, "tel:+14155550999")
        parties["blocked"] = (c.id, p.id)
        c = call(ani="tel:+14155550999")  # near miss: the customer has the blocked number
        parties["blocked-customer"] = (c.id, next(x.id for x in c.participants if x.purpose == "customer"))
        c = call(recorded=False)  # breaker by time: outside party on an unrecorded call
        p = w.add_external(c.id, "tel:+14155550125")
        parties["unrecorded"] = (c.id, p.id)
        c = call(recorded=False)  # near miss: recording starts before hold_for runs out
        p = w.add_external(c.id, "tel:+14155550126")
        w.set_recording(c.id, "active")
        parties["recorded-in-time"] = (c.id, p.id)
        c = call()  # observe-only
        cust = next(x.id for x in c.participants if x.purpose == "customer")
        w.set_attributes(c.id, cust, {"riskScore": "91"})
        parties["risky"] = (c.id, cust)

        def done() -> bool:
            gone = all(w.get_call(parties[k][0]).party(parties[k][1]).state == "disconnected"
                       for k in ("flagged", "blocked", "unrecorded"))
            records = read_jsonl(folder / "audit" / "audit.jsonl")
            return gone and sum(1 for r in records if r["type"] == "outcome") >= 4

        await wait_until(done, 15, "three removals and the observed decision")
        await asyncio.sleep(HOLD + 0.3)  # the near miss's hold_for would have run out by now
    finally:
        await asyncio.wait_for(daemon.stop(), 20)
    return Recorded(cfg_path, events, folder / "audit" / "audit.jsonl", parties)


@pytest.fixture
async def recorded(sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sandbox.client_id)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sandbox.client_secret)
    return await record_run(sandbox, tmp_path / "run")


def _key(rule: str, conversation: str, participant: str) -> tuple[str, str, str]:
    return (rule, conversation, participant)


async def test_replay_matches_the_live_run(recorded: Recorded) -> None:
    live = recorded.live_decisions()
    p = recorded.parties
    assert {_key(r["rule"], r["conversation_id"], r["participant_id"]) for r in live} == {
        _key("flagged-party", *p["flagged"]),
        _key("blocked-number-in-conference", *p["blocked"]),
        _key("third-party-needs-recording", *p["unrecorded"]),
        _key("risky-interaction", *p["risky"]),
    }
    assert verify([recorded.audit.parent]).ok

    frames = list(read_frames(recorded.events))
    assert len(frames) >= 25 and all(f.raw.startswith("{") for f in frames)
    result = replay(load_config(recorded.config), iter(frames))
    assert result.rejected == 0
    replayed = [(_key(d.rule, d.conversation_id, d.participant_id), d) for d in result.decisions]
    assert sorted(k for k, _ in replayed) == sorted(
        _key(r["rule"], r["conversation_id"], r["participant_id"]) for r in live)

    # hold_for fires at the same (virtual) time: exactly HOLD after the frame that started it,
    # and where it fired live (the live timer wakes at the deadline; generous bound)
    live_hold = next(r for r in live if r["rule"] == "third-party-needs-recording")
    replay_hold = next(d for k, d in replayed if k[0] == "third-party-needs-recording")
    assert any(abs(replay_hold.decided_at - (f.ts + HOLD)) < 1e-6 for f in frames)
    assert abs(replay_hold.decided_at - live_hold["decided_at"]) < 0.5
    # event-triggered decisions are made at the receive time of their frame, as live
    for k, d in replayed:
        if k[0] != "third-party-needs-recording":
            lv = next(r for r in live if _key(r["rule"], r["conversation_id"], r["participant_id"]) == k)
            assert d.received_at == lv["received_at"]


async def test_replay_cli_prints_the_decisions(recorded: Recorded) -> None:
    code, out, err = await run_cli("replay", "--config", str(recorded.config), str(recorded.events))
    assert code == 0, err
    lines = out.splitlines()
    decisions = [ln for ln in lines if re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z  ", ln)]
    assert len(decisions) == 4, out
    for label, rule, action in (("flagged", "flagged-party", "disconnect"),
                                ("blocked", "blocked-number-in-conference", "disconnect"),
                                ("unrecorded", "third-party-needs-recording", "disconnect"),
                                ("risky", "risky-interaction", "observe")):
        cid, pid = recorded.parties[label]
        assert any(f" {action} " in ln and f" {rule}  conversation={cid} participant={pid} " in ln
                   for ln in decisions), (label, out)
    frames = sum(1 for _ in read_frames(recorded.events))
    assert lines[-1] == f"{frames} frames, 0 rejected, 4 decisions"


def _expect(folder: Path, body: str) -> Path:
    path = folder / "expect.yaml"
    path.write_text(body)
    return path


async def test_expect_passes(recorded: Recorded, tmp_path: Path) -> None:
    p = recorded.parties
    expect = _expect(tmp_path, f"""rules:
  flagged-party:
    acted_on:
      - participant: {p['flagged'][1]}
        conversation: {p['flagged'][0]}
        by: 30s
    not_acted_on:
      - participant: {p['flag-false'][1]}
  blocked-number-in-conference:
    acted_on: [{p['blocked'][1]}]
    not_acted_on: [{p['blocked-customer'][1]}]
  third-party-needs-recording:
    acted_on:
      - participant: {p['unrecorded'][1]}
    not_acted_on:
      - participant: {p['recorded-in-time'][1]}
""")
    code, out, err = await run_cli("replay", "--config", str(recorded.config), str(recorded.events),
                                   "--expect", str(expect))
    assert code == 0, out + err
    assert out.splitlines()[-1] == "ok: 6 expectation(s) met"


async def test_expect_failures_are_each_shown(recorded: Recorded, tmp_path: Path) -> None:
    p = recorded.parties
    expect = _expect(tmp_path, f"""rules:
  flagged-party:
    acted_on:
      - participant: {p['flag-false'][1]}
    not_acted_on:
      - participant: {p['flagged'][1]}
  third-party-needs-recording:
    acted_on:
      - participant: {p['unrecorded'][1]}
        by: 0.5s
  blocked-number-in-conference: []
""")
    code, out, err = await run_cli("replay", "--config", str(recorded.config), str(recorded.events),
                                   "--expect", str(expect))
    assert code == 1, out + err
    lines = out.splitlines()
    start = lines.index("FAIL: 4 expectation(s) not met:")
    problems = lines[start + 1:]
    assert len(problems) == 4, out
    ex = str(expect)
    assert f"  - {ex}:4: rule 'flagged-party' should have acted on participant {p['flag-false'][1]}, " \
           "but did not" in problems
    assert any(ln.startswith(f"  - {ex}:6: rule 'flagged-party' acted on participant {p['flagged'][1]} at ")
               and ln.endswith(", but must not have") for ln in problems), problems
    late = [ln for ln in problems if "later than expected (by 0.5s = " in ln]
    assert len(late) == 1 and late[0].startswith(f"  - {ex}:9: rule 'third-party-needs-recording' acted on "
                                                 f"participant {p['unrecorded'][1]} at ")
    never = [ln for ln in problems if "must not fire" in ln]
    assert len(never) == 1 and never[0].startswith(
        f"  - rule 'blocked-number-in-conference' must not fire, but acted on participant "
        f"{p['blocked'][1]} in conversation {p['blocked'][0]} at "), problems


async def test_bad_expectations_file_exits_2(recorded: Recorded, tmp_path: Path) -> None:
    expect = _expect(tmp_path, "rules:\n  no-such-rule: []\n")
    code, out, err = await run_cli("replay", "--config", str(recorded.config), str(recorded.events),
                                   "--expect", str(expect))
    assert code == 2
    assert re.search(rf"{re.escape(str(expect))}:2:3: unknown rule 'no-such-rule'", err), err


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"not a JSON object"),
    ('["ts", 1]', r"expected an object with 'ts' and 'raw'"),
    ('{"raw": "{}"}', r"missing receive time"),
    ('{"ts": 1763716502.5}', r"missing frame"),
    ('{"received_at": "yesterday", "raw": "{}"}', r"received_at is not an ISO-8601 time"),
])
async def test_malformed_events_file_exits_2_with_file_line(tmp_path: Path, line: str, message: str) -> None:
    cfg = replay_config(tmp_path)
    events = tmp_path / "events.jsonl"
    good = orjson.dumps({"ts": 1763716502.0, "raw": '{"topicName":"channel.metadata","eventBody":{"message":"WebSocket Heartbeat"}}'}).decode()
    events.write_text(f"# recorded\n{good}\n\n{line}\n{good}\n")
    code, out, err = await run_cli("replay", "--config", str(cfg), str(events))
    assert code == 2, out + err
    assert re.fullmatch(rf"confguard: {re.escape(str(events))}:4: {message}.*\n", err), err
    assert "Traceback" not in err


async def test_missing_events_file_exits_2(tmp_path: Path) -> None:
    cfg = replay_config(tmp_path)
    code, _, err = await run_cli("replay", "--config", str(cfg), str(tmp_path / "none.jsonl"))
    assert code == 2 and err.startswith("confguard: cannot read events file ")


# ---------------------------------------------------------------------- committed fixture


async def test_committed_fixture_replays_and_meets_its_expectations() -> None:
    code, out, err = await run_cli("replay", "--config", str(FIXTURES / "config.yaml"),
                                   str(FIXTURES / "events.jsonl"), "--expect", str(FIXTURES / "expect.yaml"))
    assert code == 0, out + err
    assert re.search(r"^ok: \d+ expectation\(s\) met$", out, re.M), out


def test_committed_fixture_hold_for_fires_on_the_virtual_clock() -> None:
    frames = list(read_frames(FIXTURES / "events.jsonl"))
    result = replay(load_config(FIXTURES / "config.yaml"), iter(frames))
    holds = [d for d in result.decisions if d.rule == "third-party-needs-recording"]
    assert len(holds) == 1
    assert any(abs(holds[0].decided_at - (f.ts + HOLD)) < 1e-6 for f in frames), iso(holds[0].decided_at)
    assert {d.rule for d in result.decisions} == {"flagged-party", "blocked-number-in-conference",
                                                  "third-party-needs-recording", "risky-interaction"}


@pytest.mark.parametrize("tz", ["UTC", "Asia/Tokyo", "America/New_York"])
async def test_iso_by_without_offset_is_utc_whatever_the_local_zone(tmp_path: Path, tz: str) -> None:
    """`by: 2026-11-22 03:05:30` means UTC on every machine (it used to be local time)."""
    frames = list(read_frames(FIXTURES / "events.jsonl"))
    flagged = next(d for d in replay(load_config(FIXTURES / "config.yaml"), iter(frames)).decisions
                   if d.rule == "flagged-party")
    env = {**os.environ, "TZ": tz}
    for offset, verdict in ((-0.5, 1), (0.5, 0)):
        naive = iso(flagged.decided_at + offset).replace("T", " ").rstrip("Z")
        expect = _expect(tmp_path, f"rules:\n  flagged-party:\n    acted_on:\n"
                                   f"      - participant: {flagged.participant_id}\n        by: {naive}\n")
        code, out, err = await run_cli("replay", "--config", str(FIXTURES / "config.yaml"),
                                       str(FIXTURES / "events.jsonl"), "--expect", str(expect), env=env)
        assert code == verdict, (tz, naive, out + err)


async def test_extend_lets_timers_run_past_the_last_frame(tmp_path: Path) -> None:
    frames = list(read_frames(FIXTURES / "events.jsonl"))
    config = load_config(FIXTURES / "config.yaml")
    hold = next(d for d in replay(config, iter(frames)).decisions if d.rule == "third-party-needs-recording")
    start = next(i for i, f in enumerate(frames) if abs(f.ts + HOLD - hold.decided_at) < 1e-6)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(orjson.dumps({"ts": f.ts, "raw": f.raw}).decode() + "\n" for f in frames[:start + 1]))

    def rules(out: str) -> list[str]:
        return [ln.split()[2] for ln in out.splitlines() if re.match(r"\d{4}-", ln)]

    code, out, _ = await run_cli("replay", "--config", str(FIXTURES / "config.yaml"), str(cut))
    assert code == 0 and "third-party-needs-recording" not in rules(out)
    code, out, _ = await run_cli("replay", "--config", str(FIXTURES / "config.yaml"), str(cut),
                                 "--extend", str(HOLD + 0.5))
    assert code == 0 and rules(out).count("third-party-needs-recording") == 1
    assert f"{iso(hold.decided_at)}  disconnect third-party-needs-recording " in out
