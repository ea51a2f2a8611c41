"""The field registry (daemon.core.rules.fields.FIELDS): its public shape, and that the
operators it lists for each field are exactly those the compiler accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import load_lists, parse_config
from daemon.core.rules import (
    ATTRIBUTES, CALL_FIELDS, FIELDS, OPERATORS, PARTY_FIELDS, FieldSpec, compile_rules,
)
from daemon.errors import ConfigError

_SAMPLE = {"str": "x", "phone": "+442079460000", "set": "x", "attr": "x", "bool": True, "num": 1}


def _arg(op: str, kind: str) -> object:
    if op == "exists":
        return True
    if op in ("in", "not_in"):
        return [_SAMPLE[kind]]
    if op in ("gt", "gte", "lt", "lte"):
        return 1
    if op in ("matches", "contains", "starts_with"):
        return "x"
    if op in ("in_list", "not_in_list"):
        return "l"
    return _SAMPLE[kind]


def _compiles(tmp_path: Path, spec: FieldSpec, op: str) -> bool:
    import yaml

    name = spec.name if spec is not ATTRIBUTES else "attributes.k"
    cond = {name: {op: _arg(op, spec.type)}}
    rule: dict[str, object] = {"name": "r", "action": "observe"}
    if spec.scope == "call":
        rule["when"] = {"purpose": "external"}
        rule["call"] = cond
    else:
        rule["when"] = cond
    text = yaml.safe_dump({"lists": {"l": {"values": ["x"]}}, "rules": [rule]})
    try:
        cfg = parse_config(text, file=str(tmp_path / "c.yaml"), base_dir=tmp_path)
        compile_rules(cfg, load_lists(cfg))
    except ConfigError:
        return False
    return True


def test_registry_shape() -> None:
    assert set(PARTY_FIELDS) <= set(FIELDS)
    for name, spec in FIELDS.items():
        assert isinstance(spec, FieldSpec)
        assert spec.scope in ("party", "call")
        assert spec.type in ("str", "phone", "bool", "num", "attr", "set")
        assert spec.operators and set(spec.operators) <= set(OPERATORS)
        assert name == spec.name or name == f"call.{spec.name}"
    calls = {s.name for s in FIELDS.values() if s.scope == "call"}
    assert calls == set(CALL_FIELDS)
    assert FIELDS["purpose"].scope == "party" and FIELDS["held"].type == "bool"
    assert FIELDS["connected_parties"].scope == "call" and "gte" in FIELDS["connected_parties"].operators
    assert "matches" not in FIELDS["held"].operators and "gt" not in FIELDS["address"].operators


@pytest.mark.parametrize("name", [*FIELDS, "attributes.<key>"])
def test_listed_operators_are_exactly_the_ones_that_compile(tmp_path: Path, name: str) -> None:
    spec = ATTRIBUTES if name == "attributes.<key>" else FIELDS[name]
    got = tuple(op for op in OPERATORS if _compiles(tmp_path, spec, op))
    assert got == spec.operators
