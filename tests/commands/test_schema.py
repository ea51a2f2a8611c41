"""`confguard check --schema`: the JSON Schema of config.yaml, committed as
docs/config.schema.json, knows the rules' fields and operators and accepts the shipped config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from daemon.commands.check import schema_text
from daemon.core.rules import ATTRIBUTES, FIELDS, OPERATORS, operators_for

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "config.schema.json"


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def _errors(doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(doc)]


def test_committed_schema_is_current() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == schema_text(), (
        "docs/config.schema.json is stale: run `confguard check --schema > docs/config.schema.json`")


def test_check_schema_prints_it() -> None:
    res = subprocess.run([sys.executable, "-m", "daemon", "check", "--schema"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(schema_text())


def test_shipped_config_names_the_schema_and_validates() -> None:
    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# yaml-language-server: $schema=./docs/config.schema.json"
    assert _errors(yaml.safe_load(text)) == []


def test_rules_part_knows_fields_and_operators() -> None:
    """Every field of the registry, with exactly its operators."""
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    defs = schema["$defs"]

    def operators(prop: dict[str, Any]) -> set[str]:
        cond = defs[prop["$ref"].rsplit("/", 1)[1]] if "$ref" in prop else prop
        return set(cond["anyOf"][1]["properties"])

    party = defs["PartyConditions"]["properties"]
    call = defs["CallConditions"]["properties"]
    for spec in FIELDS.values():
        where = party if spec.scope == "party" else call
        assert operators(where[spec.name]) == set(spec.operators), spec.name
        if spec.scope == "call":
            assert operators(party[f"call.{spec.name}"]) == set(spec.operators), spec.name
    assert operators(defs["PartyConditions"]["patternProperties"]["^attributes\\..+$"]) == \
        set(ATTRIBUTES.operators) == set(OPERATORS)
    assert call["has_party"] == party["call.has_party"]
    assert set(operators_for("bool")) < set(OPERATORS)


def _rule(when: dict[str, Any], call: dict[str, Any] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": "r", "action": "disconnect", "when": when}
    if call is not None:
        rule["call"] = call
    return {"subscriptions": {"queues": ["q"]}, "rules": [rule]}


@pytest.mark.parametrize("when, call", [
    ({"purpose": "external", "attributes.riskScore": {"gte": 80}}, None),
    ({"connected_seconds": {"gt": 600}, "held": True}, {"recording_state": {"not_in": ["active"]}}),
    ({"any": [{"flagged_reason": {"exists": True}}, {"address": {"matches": "^tel:\\+44.*"}}],
      "not": {"purpose": "agent"}}, {"has_party": {"purpose": "acd", "queue_id": "q1"}}),
    ({"call.connected_parties": {"gte": 3}, "address": {"in_list": "blocked"}}, None),
    ({"call.has_party": {"purpose": "acd"}, "call.recording_state": "paused"}, None),
])
def test_schema_accepts_valid_rules(when: dict[str, Any], call: dict[str, Any] | None) -> None:
    assert _errors(_rule(when, call)) == []


@pytest.mark.parametrize("when, call, where", [
    ({"purpose": "external", "purpse": "x"}, None, "rules/0/when"),           # unknown field
    ({"purpose": {"equal": "x"}}, None, "rules/0/when/purpose"),              # unknown operator
    ({"held": "yes"}, None, "rules/0/when/held"),                              # bool field, text
    ({"purpose": {"gt": 3}}, None, "rules/0/when/purpose"),                   # numeric op on text
    ({"connected_seconds": {"matches": "1.*"}}, None, "rules/0/when/connected_seconds"),
    ({"purpose": "x"}, {"purpose": "agent"}, "rules/0/call"),                  # party field in call
    ({"address": {"matches": "("}}, None, "rules/0/when/address"),             # bad regex
    ({"call.purpose": "agent"}, None, "rules/0/when"),                          # not a call field
    ({"call.connected_parties": {"contains": "3"}}, None, "rules/0/when/call.connected_parties"),
])
def test_schema_rejects_what_the_compiler_rejects(when: dict[str, Any], call: dict[str, Any] | None,
                                                  where: str) -> None:
    errors = _errors(_rule(when, call))
    assert errors and any(e.startswith(where) for e in errors), errors


def test_schema_rejects_unknown_top_level_keys() -> None:
    errors = _errors({"rulez": []})
    assert errors


@pytest.mark.parametrize("section", [
    {"ha": {"backend": "postgres", "dsn": "postgresql://confguard@db.example:5432/confguard",
            "lease": "confguard-prod", "takeover_after": "5s", "node": "host-a"}},
    {"ha": {"takeover_after": 2.5}},
    {"ops": {"shutdown_timeout": "15s"}},
])
def test_schema_accepts_durations_in_both_forms(section: dict[str, Any]) -> None:
    """The contract writes `takeover_after: 5s`: an editor must not flag it."""
    errors = list(_validator().iter_errors({"schema_version": 1, **section}))
    assert errors == []
