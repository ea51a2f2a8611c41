"""`confguard test RULES_TEST.yaml`: rule unit tests from timelines, on replay's virtual clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from _logging_state import preserved_logging
from daemon.commands.cli import main
from daemon.commands.ruletest import EPOCH, frames, load_test_file
from daemon.core.events import CallEvent, parse_message

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "tests" / "rules" / "config.test.yaml"
FAILING = ROOT / "tests" / "fixtures" / "ruletest" / "failing.test.yaml"
CONFIG = ROOT / "config.yaml"

@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main` configures logging on the captured stderr; later tests must not log there."""
    with preserved_logging():
        yield



def test_shipped_rule_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "SUCCESS: 18 test(s) passed" in out
    assert "FAIL" not in out


@pytest.mark.parametrize("path", sorted((ROOT / "tests" / "rules").glob("*.test.yaml")),
                         ids=lambda p: p.name)
def test_every_rule_test_file_passes(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every file in tests/rules/ runs in `make test`: add one and it is checked."""
    code = main(["test", str(path)])
    assert code == 0, capsys.readouterr().out


def test_every_shipped_rule_is_tested_acting_and_not(capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.config import load_config

    tf = load_test_file(SHIPPED)
    acts = {e.rule for c in tf.cases for e in c.expect if e.at is not None}
    never = {e.rule for c in tf.cases for e in c.expect if e.at is None}
    rules = {r.name for r in load_config(CONFIG).rules}
    assert rules - acts == set(), "rules with no case where they act"
    assert rules - never == set(), "rules with no near miss"


def test_failing_example_prints_a_readable_diff(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", str(FAILING)]) == 1
    out = capsys.readouterr().out
    assert "FAIL recording pauses at 4 s" in out
    assert "ok   this one passes" in out
    assert "- third-party-needs-recording  call c1 party ext-1  at 10s ±1s   (line 18)" in out
    assert "+ third-party-needs-recording  call c1 party ext-1  at 14s" in out
    assert "- flagged-party  call c1 party ext-1  at 3s ±1s   (line 19)" in out
    assert "+ flagged-party  call c1 party ext-1  never acted on" in out
    assert "+ flagged-interaction  call c1 party ext-1  at 0s   (not expected)" in out
    assert "FAILED: 1 of 2 test(s)" in out


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "t.test.yaml"
    p.write_text(f"config: {CONFIG}\n" + body, encoding="utf-8")
    return p


ONE_CALL = """tests:
  - name: x
    calls:
      c1:
        timeline:
          - at: 0s
            recording_state: active
            parties:
              p1: {{purpose: customer, state: connected{extra}}}
    expect: {expect}
"""


@pytest.mark.parametrize("body, where, message", [
    (ONE_CALL.format(extra=", stat: connected", expect="[]"), ":10:57:", "unknown party field 'stat'"),
    (ONE_CALL.format(extra=", direction: sideways", expect="[]"), ":10:", "direction: expected one of"),
    (ONE_CALL.format(extra="", expect="[{rule: nope, party: p1, at: 1s}]"), ":11:21:", "unknown rule 'nope'"),
    (ONE_CALL.format(extra="", expect="[{rule: flagged-party, party: p9, at: 1s}]"), ":11:",
     "party 'p9' is in no call"),
    (ONE_CALL.format(extra="", expect="[{rule: flagged-party, party: p1, at: soon}]"), ":11:",
     "at (or 'never'): expected a duration"),
    (ONE_CALL.format(extra="", expect="[{rule: flagged-party, party: p1}]"), ":11:",
     "an expectation needs 'at:'"),
    ("tests: []\n", ":2:", "non-empty list of tests"),
    ("tests:\n  - calls: {c1: {timeline: [{at: 5s}, {at: 1s}]}}\n    expect: []\n", ":3:",
     "steps must be in time order"),
    ("tests: [\n", ":", "invalid YAML"),
])
def test_bad_input_is_exit_2_with_file_line_col(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 body: str, where: str, message: str) -> None:
    path = _write(tmp_path, body)
    assert main(["test", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}{where}"), err
    assert message in err


def test_missing_file_and_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read test file" in capsys.readouterr().err
    p = tmp_path / "t.yaml"
    p.write_text("config: missing.yaml\ntests: [{calls: {c: {timeline: [{at: 0s}]}}, expect: []}]\n")
    assert main(["test", str(p)]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_timeline_becomes_genesys_call_events(tmp_path: Path) -> None:
    path = _write(tmp_path, """tests:
  - calls:
      c1:
        queue: q-1
        timeline:
          - at: 0s
            parties:
              a: {purpose: agent, state: connected, user_id: u1, held: false}
              x: {purpose: external, state: dialing, address: "tel:+1", attributes: {k: 5, f: true}}
          - at: 2.5s
            recording_state: paused
            parties:
              x: {state: connected, attributes: {k: null}}
          - at: 9s
            parties:
              x: {state: disconnected}
    expect: []
""")
    case = load_test_file(path).cases[0]
    got = list(frames(case))
    assert [f.ts - EPOCH for f in got] == [0.0, 2.5, 9.0]
    msgs = [parse_message(f.raw) for f in got]
    assert all(isinstance(m, CallEvent) for m in msgs)
    first = orjson.loads(got[0].raw)
    assert first["topicName"] == "v2.routing.queues.q-1.conversations.calls"
    acd, a, x = first["eventBody"]["participants"]
    # `queue: q-1` puts the call in that queue: an ended ACD leg there, as a real call has
    assert acd == {"id": "c1-acd", "purpose": "acd", "name": "queue", "queue": {"id": "q-1"},
                   "state": "disconnected", "disconnectType": "transfer",
                   "connectedTime": "2026-01-01T00:00:00.000Z", "endTime": "2026-01-01T00:00:00.000Z"}
    assert a == {"id": "a", "purpose": "agent", "state": "connected", "user": {"id": "u1"},
                 "held": False, "connectedTime": "2026-01-01T00:00:00.000Z"}
    assert x["attributes"] == {"k": "5", "f": "true"} and "connectedTime" not in x
    second = orjson.loads(got[1].raw)["eventBody"]
    assert second["recordingState"] == "paused"
    assert second["participants"][2]["attributes"] == {"f": "true"}
    assert second["participants"][2]["connectedTime"] == "2026-01-01T00:00:02.500Z"
    third = orjson.loads(got[2].raw)["eventBody"]["participants"][2]
    assert third["endTime"] == "2026-01-01T00:00:09.000Z"


def test_tolerance_and_until(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = """tolerance: 2s
tests:
  - until: {until}
    calls:
      c1:
        timeline:
          - at: 0s
            parties:
              agent-1: {{purpose: agent, state: connected}}
              ext-1: {{purpose: external, state: connected, address: "tel:+14155550123"}}
    expect:
      - {{rule: third-party-needs-recording, party: ext-1, at: {at}}}
"""
    assert main(["test", str(_write(tmp_path, body.format(until="1m", at="11.5s")))]) == 0
    assert main(["test", str(_write(tmp_path, body.format(until="1m", at="12.5s")))]) == 1
    # the clock stops at 5 s: the 10 s hold never completes
    assert main(["test", str(_write(tmp_path, body.format(until="5s", at="never")))]) == 0
    capsys.readouterr()


def test_config_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("subscriptions: {queues: [q]}\nrules:\n  - name: any-customer\n"
                   "    when: {purpose: customer}\n    action: observe\n", encoding="utf-8")
    p = tmp_path / "t.yaml"
    p.write_text("config: nowhere.yaml\ntests:\n  - calls: {c: {timeline: [{at: 3s, parties: "
                 "{p: {purpose: customer}}}]}}\n    expect: [{rule: any-customer, party: p, at: 3s}]\n")
    assert main(["test", "--config", str(cfg), str(p)]) == 0
    assert "SUCCESS: 1 test(s) passed" in capsys.readouterr().out


def test_readme_example_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Testing rules"):]
    example = section[section.index("```yaml\n") + 8:section.index("```\n", section.index("```yaml\n") + 8)]
    assert example.startswith("# rules.test.yaml")
    path = tmp_path / "rules.test.yaml"
    path.write_text(example.replace("config: config.yaml", f"config: {CONFIG}"), encoding="utf-8")
    assert main(["test", str(path)]) == 0, capsys.readouterr().out
    assert "SUCCESS: 3 test(s) passed" in capsys.readouterr().out


def test_queue_puts_the_call_on_that_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`queue:` puts the call in that queue (an ended ACD leg in it joins the call), so a rule
    on the queue (`has_party: {purpose: acd, queue_id: ...}`) fires; without it, it does not."""
    payments = "0d5c7a44-3f2e-4b1a-8c9d-6e7f8a9b0c1d"
    body = """config: {config}
tests:
  - name: through {name}
    calls:
      c1:
{queue}        timeline:
          - at: 0s
            recording_state: active
            parties:
              cust-1: {{purpose: customer, state: connected}}
              agent-1: {{purpose: agent, state: connected}}
          - at: 5s
            parties:
              ext-1: {{purpose: external, state: connected, address: "tel:+14155550123"}}
    expect:
      - {{rule: no-outside-party-on-payments, party: ext-1, at: {at}}}
"""
    on_queue = tmp_path / "on.test.yaml"
    on_queue.write_text(body.format(config=CONFIG, name="Payments", queue=f"        queue: {payments}\n", at="5s"))
    assert main(["test", str(on_queue)]) == 0, capsys.readouterr().out
    other = tmp_path / "off.test.yaml"
    other.write_text(body.format(config=CONFIG, name="no queue", queue="", at="never"))
    assert main(["test", str(other)]) == 0, capsys.readouterr().out
