"""Rule load errors: every problem is a ConfigError located file:line:col at the culprit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.config import load_lists, parse_config
from daemon.errors import ConfigError
from daemon.core.rules import compile_rules

try:
    from tests._rules_helpers import BLOCKED, EXAMPLE, load
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ on sys.path
    from _rules_helpers import BLOCKED, EXAMPLE, load  # type: ignore[no-redef]


def _err(text: str, tmp_path: Path, files: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, tmp_path, files)
    return info.value


def _rule(body: str) -> str:
    """A config with one rule; `body` is the rule's lines after `- name: r` (4-space indent)."""
    return "lists:\n  vip: {values: [u1]}\nrules:\n  - name: r\n" + body + "    action: disconnect\n"


# Line numbers below count from 1: line 1 `lists:`, 2 `  vip:`, 3 `rules:`, 4 `  - name: r`,
# 5 the first line of `body`.

@pytest.mark.parametrize("body, where, needle", [
    # unknown field: at the key
    ("    when:\n      purpsoe: external\n", "6:7", "unknown party field 'purpsoe'"),
    ("    call:\n      recording: true\n", "6:7", "unknown call field 'recording'"),
    ("    when:\n      connected_parties: {gte: 3}\n", "6:7", "is a call field"),
    ("    when:\n      attributes.: x\n", "6:7", "needs a participant data key"),
    ("    when: {any: [{purpose: agent}, {bogus: 1}]}\n", "5:37", "unknown party field 'bogus'"),
    ("    call:\n      has_party: {purpose: acd, queue: q1}\n", "6:33", "unknown party field 'queue'"),
    # unknown operator: at the operator key
    ("    when:\n      purpose: {equal: external}\n", "6:17", "unknown operator 'equal'"),
    ("    when:\n      not: {user_id: {in_lists: vip}}\n", "6:23", "unknown operator 'in_lists'"),
    # bad regex: at the value
    ("    when:\n      name: {matches: 'Fraud(('}\n", "6:23", "bad regular expression"),
    # types that cannot work
    ("    when:\n      purpose: {gt: 3}\n", "6:17", "operator 'gt' cannot work on 'purpose'"),
    ("    when:\n      held: {lte: 1}\n", "6:14", "operator 'lte' cannot work on 'held'"),
    ("    when:\n      purpose: {in: external}\n", "6:21", "in needs a list"),
    ("    when:\n      purpose: {not_in: 3}\n", "6:25", "not_in needs a list"),
    ("    when:\n      held: \"true\"\n", "6:13", "write true without quotes"),
    ("    when:\n      held: {in: [true, 'no']}\n", "6:25", "needs a boolean"),
    ("    when:\n      connected_seconds: {gt: '600'}\n", "6:31", "gt needs a number"),
    ("    call:\n      connected_parties: '3'\n", "6:26", "is a number"),
    ("    when:\n      connected_seconds: {contains: '6'}\n", "6:27", "cannot work on 'connected_seconds'"),
    ("    when:\n      held: {in_list: vip}\n", "6:14", "cannot work on 'held'"),
    ("    when:\n      flagged_reason: {exists: 'yes'}\n", "6:32", "exists takes true or false"),
    ("    when:\n      attributes.score: {gte: high}\n", "6:31", "gte needs a number"),
    ("    when:\n      purpose: [customer, external]\n", "6:16", "bare list"),
    ("    when:\n      purpose: null\n", "6:16", "bare null"),
    ("    when:\n      any: {purpose: agent}\n", "6:12", "non-empty list"),
    ("    when:\n      not: [{purpose: agent}]\n", "6:12", "expected a mapping"),
    ("    when:\n      name: {starts_with: 5}\n", "6:27", "starts_with needs text"),
    ("    when:\n      purpose: {}\n", "6:16", "empty operator mapping"),
    ("    call:\n      has_party: acd\n", "6:18", "has_party' takes a mapping"),
    ("    when:\n      user_id: {in_list: [u1]}\n", "6:26", "takes the name of a list"),
    # missing list
    ("    when:\n      user_id: {not_in_list: trusted}\n", "6:30", "unknown list 'trusted'"),
    # bad hold_for
    ("    when: {purpose: external}\n    hold_for: banana\n", "6:15", "bad hold_for 'banana'"),
    ("    when: {purpose: external}\n    hold_for: -3\n", "6:15", "bad hold_for"),
    ("    when: {purpose: external}\n    hold_for: 10 minutes\n", "6:15", "bad hold_for"),
    # messages
    ("    when: {purpose: external}\n    message: 'removed {party.nmae}'\n", "6:14",
     "unknown placeholder {party.nmae}"),
    ("    when: {purpose: external}\n    message: 'on {conversation.id}'\n", "6:14",
     "unknown placeholder {conversation.id}"),
    ("    when: {purpose: external}\n    message: 'oops {party.name'\n", "6:14", "bad message template"),
    ("    when: {purpose: external}\n    message: '{party.name!r}'\n", "6:14", "not supported"),
    # no conditions at all would match every party
    ("    description: nothing\n", "4:5", "has no conditions"),
])
def test_load_errors_are_located(tmp_path: Path, body: str, where: str, needle: str) -> None:
    err = _err(_rule(body), tmp_path)
    assert str(err).startswith(f"config.yaml:{where}: "), str(err)
    assert needle in str(err), str(err)
    assert err.file == "config.yaml"


def test_disabled_rule_is_still_checked(tmp_path: Path) -> None:
    err = _err(_rule("    enabled: false\n    when:\n      purpsoe: external\n"), tmp_path)
    assert str(err).startswith("config.yaml:7:7: rule 'r': unknown party field 'purpsoe'")


def test_missing_list_file(tmp_path: Path) -> None:
    text = "lists:\n  blocked: {file: nowhere.txt}\nrules: []\n"
    err = _err(text, tmp_path)
    assert str(err).startswith("config.yaml:2:19: list 'blocked': list file not found: ")
    assert "nowhere.txt" in str(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_list_file_permissions(tmp_path: Path) -> None:
    f = tmp_path / "secret.txt"
    f.write_text("+44\n")
    f.chmod(0)
    err = _err("lists:\n  b: {file: secret.txt}\n", tmp_path)
    assert str(err).startswith("config.yaml:2:13: list 'b': cannot read list file")


def test_unreadable_list_file_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage\n")
    err = _err("lists:\n  b:\n    file: bin.txt\n", tmp_path)
    assert str(err).startswith("config.yaml:3:11: list 'b': cannot read list file")


def test_list_file_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    err = _err("lists:\n  b: {file: adir}\n", tmp_path)
    assert str(err).startswith("config.yaml:2:13: list 'b': cannot read list file")


def test_duplicate_rule_name(tmp_path: Path) -> None:
    text = ("rules:\n  - name: a\n    when: {purpose: agent}\n    action: observe\n"
            "  - name: a\n    when: {purpose: agent}\n    action: observe\n")
    err = _err(text, tmp_path)
    assert str(err).startswith("config.yaml:5:11: duplicate rule name 'a'")


def test_newer_schema_version_refused(tmp_path: Path) -> None:
    err = _err("schema_version: 99\nrules: []\n", tmp_path)
    assert str(err).startswith("config.yaml:1:17: schema_version 99 is newer")


def test_example_config_loads(tmp_path: Path) -> None:
    rs = load(EXAMPLE, tmp_path, {"blocked-numbers.txt": BLOCKED})
    assert len(rs.rules) == 6


def test_deep_nesting_is_an_error_not_a_crash(tmp_path: Path) -> None:
    cond = "{purpose: agent}"
    for _ in range(40):
        cond = "{not: " + cond + "}"
    err = _err(_rule(f"    when: {cond}\n"), tmp_path)
    assert "nested deeper than" in str(err) and str(err).startswith("config.yaml:5:")


def test_compile_without_source_positions(tmp_path: Path) -> None:
    cfg = parse_config(_rule("    when: {purpsoe: x}\n"), file="config.yaml", base_dir=tmp_path)
    cfg = cfg.model_copy(update={"source": None})
    with pytest.raises(ConfigError, match="unknown party field 'purpsoe'"):
        compile_rules(cfg, load_lists(cfg))


def test_cli_style_load_config_error_from_file(tmp_path: Path) -> None:
    from daemon.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(_rule("    when:\n      name: {matches: '['}\n"))
    with pytest.raises(ConfigError) as info:
        cfg = load_config(path)
        compile_rules(cfg, load_lists(cfg))
    assert str(info.value).startswith(f"{path}:6:23: rule 'r': bad regular expression")
