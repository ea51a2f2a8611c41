"""Every configuration error in one pass: each as `config.yaml:LINE:COL: ...`, a problem
inside a rule naming the rule by its `name`, from `check` and from `run` alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import parse_config
from daemon.errors import ConfigError, ConfigErrors

ROOT = Path(__file__).resolve().parents[2]

THREE_RULES = """\
subscriptions: {queues: [Sales]}
lists:
  blocked: {values: ["+14155550999"]}
rules:
  - name: fine
    when: {purpose: external}
    action: disconnect
  - name: typo-field
    when: {purpse: external}
    action: disconnect
  - name: bad-action
    when: {purpose: customer}
    action: remove
  - name: missing-list
    when: {address: {in_list: nope}}
    action: disconnect
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.parametrize("command", ["check", "run"])
def test_three_mistakes_in_three_rules_in_one_run(tmp_path: Path, command: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(THREE_RULES, encoding="utf-8")
    proc = _cli(command, "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"{cfg}:9:12", "rule 'typo-field'"],
        [f"{cfg}:13:13", "rule 'bad-action'"],
        [f"{cfg}:15:31", "rule 'missing-list'"],
    ], proc.stderr
    assert "unknown party field 'purpse'" in lines[0]
    assert "action: got 'remove', expected one of 'disconnect' or 'observe'" in lines[1]
    assert "unknown list 'nope'" in lines[2]
    assert "Traceback" not in proc.stderr and "rules[" not in proc.stderr


def test_problems_in_several_sections_are_all_reported() -> None:
    text = ("genesys: {read_timeout: -1, regon: x}\nsafety: {max_disconnects_per_minute: many}\n"
            "rules:\n  - {name: a, when: {purpose: x}, action: observe}\n"
            "  - {name: a, when: {purpose: y}, action: observe}\n")
    with pytest.raises(ConfigErrors) as info:
        parse_config(text)
    where = [(e.line, e.col) for e in info.value.errors]
    assert where == sorted(where) and len(where) == 3
    text_out = str(info.value)
    assert "read_timeout" in text_out and "unknown key 'regon'" in text_out
    assert "max_disconnects_per_minute" in text_out
    # fixed those: the duplicate rule name is the one left, located at the second one
    with pytest.raises(ConfigError) as one:
        parse_config("rules:\n  - {name: a, when: {purpose: x}, action: observe}\n"
                     "  - {name: a, when: {purpose: y}, action: observe}\n")
    assert one.value.line == 3
    assert one.value.message.startswith("duplicate rule name 'a' (first at line 2)")


def test_one_problem_reads_as_before(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("subscriptions: {queues: [Sales]}\nrules:\n  - name: r\n    when: {purpose: x}\n"
                   "    action: remove\n", encoding="utf-8")
    proc = _cli("check", "--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr == (f"{cfg}:5:13: rule 'r': action: got 'remove', expected one of "
                           "'disconnect' or 'observe'\n")
