"""Fuzzing configuration loading with hypothesis: whatever the document,
`daemon.config.parse_config` + `daemon.rules.compile_rules` give either a valid config or a
`ConfigError` located as `file:line:col` -- never another exception.

Inputs: random text; the shipped config.yaml with random line-level damage (lines dropped,
duplicated, re-indented, characters spliced in); and the shipped config as data with
plausible-but-wrong mutations (values replaced by wrong types or odd scalars, keys dropped,
misspelt or invented, rule operators and field names swapped for valid or invalid ones,
list sources broken) dumped back to YAML.
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import load_lists, parse_config
from daemon.errors import ConfigError
from daemon.core.rules import compile_rules

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TEXT = (ROOT / "config.yaml").read_text()
SHIPPED = yaml.safe_load(SHIPPED_TEXT)
FILE = "fuzz/config.yaml"
_TMP = tempfile.mkdtemp(prefix="confguard-fuzz-config-")
(Path(_TMP) / "blocked-numbers.txt").write_text((ROOT / "blocked-numbers.txt").read_text())
LOCATED = re.compile(r"^" + re.escape(FILE) + r":\d+:\d+: \S")

OPERATORS = ["equals", "not_equals", "in", "not_in", "in_list", "not_in_list", "matches", "contains",
             "starts_with", "exists", "gt", "gte", "lt", "lte", "any", "all", "not", "has_party",
             "eq", "regex", "greater", "", "IN", "in list"]
FIELDS = ["purpose", "state", "address", "ani", "user_id", "queue_id", "held", "connected_seconds",
          "attributes.x", "attributes.", "monitored_participant_id", "recording_state", "secure_pause",
          "connected_parties", "queue_ids", "has_party", "bogus", "call.id", "attributes"]
ODD = st.sampled_from([None, "", " ", "true", "yes", 0, -1, 1.5, 10**20, "10x", "1h30", "nan", "inf",
                       [], {}, [None], {"": None}, "{party.nope}", "{", "}", "(", "[a-", "*", "\x00",
                       "ééé", True, False, "eu-west-9", "127.0.0.1:99999", "disconnect", "observe",
                       "-5s", "10 s", "1e400"])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
VALUES = st.recursive(SCALARS | ODD, lambda k: st.lists(k, max_size=3)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS + OPERATORS), k,
                                        max_size=3), max_leaves=8)


def _check(text: str) -> None:
    """The property: a valid RuleSet, or a located ConfigError; nothing else escapes."""
    try:
        cfg = parse_config(text, file=FILE, base_dir=Path(_TMP))
        compile_rules(cfg, load_lists(cfg))
    except ConfigError as exc:
        assert exc.file == FILE, f"error without the file: {exc}"
        assert exc.line is not None and exc.col is not None, f"error without line:col: {exc}"
        assert LOCATED.match(str(exc)), str(exc)
        assert "Traceback" not in str(exc)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    node = data
    for part in path[:-1]:
        node = node[part]
    return node


@st.composite
def mutated_documents(draw: st.DrawFn) -> str:
    data = copy.deepcopy(SHIPPED)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        key = path[-1]
        how = draw(st.integers(0, 6))
        if how == 0:  # a wrong value
            parent[key] = draw(VALUES)
        elif how == 1 and isinstance(parent, dict):  # a key dropped
            del parent[key]
        elif how == 2 and isinstance(parent, dict):  # a key misspelt
            value = parent.pop(key)
            parent[draw(st.sampled_from([f"{key}s", str(key)[:-1] or "x", str(key).upper(),
                                         str(key).replace("_", "-"), f" {key}"]))] = value
        elif how == 3 and isinstance(parent, dict):  # an operator or field swapped in
            parent[draw(st.sampled_from(OPERATORS + FIELDS))] = draw(VALUES)
        elif how == 4:  # a rule condition rebuilt from parts
            rules = data.get("rules")
            # An earlier mutation may have replaced any rule (not only the first) by a
            # scalar: rebuild the condition of a rule that is still a mapping.
            dicts = [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else []
            if dicts:
                draw(st.sampled_from(dicts))["when"] = {
                    draw(st.sampled_from(FIELDS)): {draw(st.sampled_from(OPERATORS)): draw(VALUES)}}
        elif how == 5:  # list sources broken
            data["lists"] = {"blocked_numbers": draw(st.sampled_from([
                {"file": "missing.txt"}, {"file": "blocked-numbers.txt", "values": ["1"]}, {},
                {"values": "not a list"}, {"values": [None, 1, {}]}, {"file": "/"}, {"file": ""}]))}
        elif how == 6 and isinstance(parent, list):  # a list entry duplicated
            parent.append(copy.deepcopy(parent[key]))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@st.composite
def damaged_text(draw: st.DrawFn) -> str:
    lines = SHIPPED_TEXT.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.integers(0, 4))
        if how == 0:
            del lines[i]
        elif how == 1:
            lines.insert(i, lines[i])
        elif how == 2:
            lines[i] = draw(st.sampled_from(["", " ", "  ", "\t", "   "])) + lines[i]
        elif how == 3:
            j = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:j] + draw(st.text(max_size=4)) + lines[i][j:]
        else:
            lines[i] = lines[i].replace(":", draw(st.sampled_from(["", " :", "::", ": :"])), 1)
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=400))
def test_random_text_is_a_config_or_a_located_error(text: str) -> None:
    _check(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=damaged_text())
def test_damaged_shipped_file_is_a_config_or_a_located_error(text: str) -> None:
    _check(text)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(text=mutated_documents())
def test_plausible_but_wrong_configs_are_a_config_or_a_located_error(text: str) -> None:
    _check(text)


def test_the_shipped_config_is_valid() -> None:
    cfg = parse_config(SHIPPED_TEXT, file=FILE, base_dir=Path(_TMP))
    assert len(compile_rules(cfg, load_lists(cfg)).rules) == len(SHIPPED["rules"])


def test_a_control_character_is_located_by_line_and_column() -> None:
    try:
        parse_config("schema_version: 1\nmode: e\x1fnforce\n", file=FILE, base_dir=Path(_TMP))
    except ConfigError as exc:
        assert (exc.line, exc.col) == (2, 8), str(exc)
        assert "U+001F" in str(exc)
    else:
        raise AssertionError("a control character was accepted")
