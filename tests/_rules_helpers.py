"""Builders shared by the rule tests (tests/core/test_rules*.py, test_enforcement.py) and the
tests that configure the example rules of config.yaml (commands/test_replay.py,
e2e/test_e2e_rules.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from daemon.config import load_lists, parse_config
from daemon.core.ids import ConversationId, ParticipantId
from daemon.core.model import Call, Change, Participant
from daemon.core.rules import RuleEngine, RuleSet, compile_rules

QUEUE = "0d5c7a44-3f2e-4b1a-8c9d-6e7f8a9b0c1d"
TRUSTED = "6f1c2a9e-0b3d-4c8e-9a57-2d1e4b7c8f01"

#: The six example rules of the rule format (config.yaml): their `when` / `call` /
#: `hold_for` and action as YAML lines below the name, with the places that tests vary.
_SHIPPED: dict[str, str] = {
    "flagged-party": """\
    when:
      purpose: {{in: [customer, external]}}
      attributes.complianceFlag: "true"
    action: disconnect""",
    "blocked-number-in-conference": """\
    when:
      purpose: external
      address: {{in_list: blocked_numbers}}
    call:
      connected_parties: {{gte: 3}}
    action: disconnect""",
    "third-party-needs-recording": """\
    when: {{purpose: external, state: connected}}
    call: {{recording_state: {{not_in: [active]}}}}
    hold_for: {hold_for}
    action: disconnect""",
    "supervisor-monitor-time-limit": """\
    when:
      monitored_participant_id: {{exists: true}}
      user_id: {{not_in_list: trusted_supervisors}}
      connected_seconds: {{gt: {monitor_limit}}}
    action: disconnect""",
    "no-outside-party-on-payments": """\
    when: {{purpose: external}}
    call:
      has_party: {{purpose: acd, queue_id: {payments}}}
    action: disconnect""",
    "flagged-interaction": """\
    when:
      any: [{{flagged_reason: {{exists: true}}}}, {{attributes.riskScore: {{gte: 80}}}}]
      not: {{purpose: agent}}
    action: observe""",
}


def shipped_rule(name: str, *extra: str, description: str | None = None, hold_for: str = "10s",
                 monitor_limit: int = 600, payments: str = QUEUE) -> str:
    """The example rule `name` (one of the six of config.yaml) as an item of a `rules:` list
    (YAML lines ending in a newline): `description` after its name, when given; each line of
    `extra` (e.g. "severity: critical") after its action; `hold_for` of
    third-party-needs-recording, the `connected_seconds` limit of
    supervisor-monitor-time-limit and the queue of no-outside-party-on-payments as given
    (defaults: config.yaml's)."""
    lines = [f"  - name: {name}"]
    if description is not None:
        lines.append(f"    description: {description}")
    lines.append(_SHIPPED[name].format(hold_for=hold_for, monitor_limit=monitor_limit,
                                       payments=payments))
    lines.extend(f"    {x}" for x in extra)
    return "\n".join(lines) + "\n"


EXAMPLE = f"""\
mode: enforce
safety:
  max_disconnects_per_minute: 30
lists:
  blocked_numbers: {{file: blocked-numbers.txt}}
  trusted_supervisors: {{values: [{TRUSTED}]}}
rules:
""" + "".join(
    shipped_rule(name, description="Remove a customer or external party whose participant data "
                 "carries a compliance flag." if name == "flagged-party" else None)
    for name in _SHIPPED)

BLOCKED = "# blocked numbers\n+44 20 7946 0000  # fraud ring\ntel:+1-555-010-9999\n\n"


def load(text: str, tmp_path: Path, files: dict[str, str] | None = None) -> RuleSet:
    for name, content in (files or {}).items():
        (tmp_path / name).write_text(content)
    cfg = parse_config(text, file="config.yaml", base_dir=tmp_path)
    return compile_rules(cfg, load_lists(cfg))


def example(tmp_path: Path) -> RuleSet:
    return load(EXAMPLE, tmp_path, {"blocked-numbers.txt": BLOCKED})


def one_rule(tmp_path: Path, *, when: dict[str, Any] | None = None,
             call: dict[str, Any] | None = None, lists: dict[str, Any] | None = None,
             **extra: Any) -> RuleSet:
    rule: dict[str, Any] = {"name": "r", "action": "disconnect", **extra}
    if when is not None:
        rule["when"] = when
    if call is not None:
        rule["call"] = call
    doc: dict[str, Any] = {"rules": [rule]}
    if lists is not None:
        doc["lists"] = lists
    return load(yaml.safe_dump(doc, sort_keys=False), tmp_path)


def party(pid: str, **kw: Any) -> Participant:
    kw.setdefault("state", "connected")
    return Participant(id=ParticipantId(pid), **kw)


def make_call(*parties: Participant, cid: str = "c1", **kw: Any) -> Call:
    return Call(id=ConversationId(cid), participants={p.id: p for p in parties}, **kw)


def change(call: Call, received_at: float = 0.0, *changed: Participant) -> Change:
    return Change(call=call, changed=tuple(changed), call_changed=True, source="event",
                  received_at=received_at)


def fired(engine: RuleEngine, call: Call, now: float) -> set[tuple[str, str]]:
    return {(d.rule, d.participant_id) for d in engine.on_change(change(call, now), now)}


def holds(rs: RuleSet, call: Call, pid: str, now: float = 1000.0) -> bool:
    p = call.participants[ParticipantId(pid)]
    return any(d.rule == "r" for d in RuleEngine(rs).evaluate_party(call, p, now))
