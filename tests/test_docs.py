"""The operator's documentation (README.md and docs/*.md) and the program agree.

Both ways, read from the code itself (the argparse parser of `confguard`, the pydantic
models of config.yaml):
- every `confguard COMMAND` and every `--flag` the docs write exists, with that command;
  every command has its `## \\`confguard COMMAND\\`` section in docs/commands.md naming
  every one of its flags;
- every config key the docs write (`genesys.read_timeout`, a key in a ```yaml example)
  exists; every key of the models is a row of the table in docs/configuration.md, and
  every key of a rule is a row of "A rule" in docs/rules.md;
- every relative link resolves to a file and, with `#anchor`, to one of its headings;
- the README stays under 600 lines and the docs carry no internal wording.

Where to document something new (the failure messages say it too): a command or flag in
its section of docs/commands.md; a config key as a row of docs/configuration.md; a log
event in docs/log-events.md (`.venv/bin/python tests/_log_events.py --write`).
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from daemon.commands.cli import build_parser
from daemon.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
COMMANDS_DOC = DOCS / "commands.md"
CONFIG_DOC = DOCS / "configuration.md"
RULES_DOC = DOCS / "rules.md"
#: The manuals an operator reads: every docs/*.md but docs/architecture.md (for contributors;
#: it is checked for links and wording only).
OPERATOR_DOCS = tuple(sorted(p.name for p in DOCS.glob("*.md") if p.name != "architecture.md"))
MAX_README_LINES = 600
#: Flags of other programs that the docs show in commands (curl, systemctl, pip, ...).
FOREIGN_FLAGS = frozenset({
    "--now", "--offline", "--upgrade", "--no-deps", "--data", "--request", "--header",
    "--write", "--where", "--fail", "--silent", "--show-error", "--help",
    "--strict", "--endpoint-url", "--queue-name",
})
#: Wording that belongs to the team, not to an operator's manual.
INTERNAL_WORDING = (re.compile(r"team notes", re.I), re.compile(r"\bissue \d+\b", re.I),
                    re.compile(r"\bTODO\b"), re.compile(r"\bintegrator\b", re.I))


# ------------------------------------------------------------------ what the code has

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings
            if o.startswith("--") and o != "--help"}


def code_commands() -> dict[str, set[str]]:
    """"run" -> its long flags, "audit verify" -> ..., "" -> the global flags. A command
    with subcommands (audit) is listed with its subcommands only."""
    top = build_parser()
    out: dict[str, set[str]] = {"": _long_flags(top)}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        subs = _subparsers(parser)
        if not subs:
            out[name] = _long_flags(parser)
        for sub, p in subs.items():
            walk(f"{name} {sub}".strip(), p)

    for name, p in _subparsers(top).items():
        walk(name, p)
    return out


def _model_of(annotation: Any) -> tuple[str, type[BaseModel] | None]:
    """("model"|"dict"|"list"|"leaf", the model class) for a field's annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _model_of(inner[0]) if len(inner) == 1 else ("leaf", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    if origin is dict and args and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return "dict", args[1]
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return "list", args[0]
    return "leaf", None


def model_keys(model: type[BaseModel], prefix: str = "") -> dict[str, type[BaseModel] | None]:
    """Every key path of `model`: "genesys" -> its model, "genesys.read_timeout" -> None,
    "lists.<name>" -> ListSpec, "rules" -> None (a rule's keys are RuleSpec's). Fields
    excluded from the schema (Config.source) are not keys."""
    out: dict[str, type[BaseModel] | None] = {}
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        key = f"{prefix}{info.alias or name}"
        kind, sub = _model_of(info.annotation)
        if kind == "model" and sub is not None:
            out[key] = sub
            out.update(model_keys(sub, key + "."))
        elif kind == "dict" and sub is not None:
            out[key] = None
            out[f"{key}.<name>"] = sub
            out.update(model_keys(sub, f"{key}.<name>."))
        else:
            out[key] = None
    return out


def config_keys() -> set[str]:
    return set(model_keys(Config))


def rule_keys() -> set[str]:
    rule_model = _model_of(Config.model_fields["rules"].annotation)[1]
    assert rule_model is not None
    return set(rule_model.model_fields)


# ------------------------------------------------------------------ what the docs say

def doc_files() -> list[Path]:
    return [README] + [DOCS / name for name in OPERATOR_DOCS]


FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def code_text(text: str) -> list[str]:
    """The code in a Markdown text: each fenced block (continuation lines joined) and each
    inline code span, in order."""
    out = [m.group(2).replace("\\\n", " ") for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    out += [m.group(1) for m in INLINE.finditer(prose)]
    return out


COMMAND_USE = re.compile(r"(?<![\w/.=-])confguard((?:\s+--log-level\s+\S+)?)\s+([a-z][a-z-]*)((?:\s+[a-z][a-z-]*)?)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def command_uses(snippet: str, commands: dict[str, set[str]]) -> list[tuple[str, str, list[str]]]:
    """(command as written, known command or "", flags that follow it on its line)."""
    out = []
    for line in snippet.splitlines():
        for m in COMMAND_USE.finditer(line):
            first, second = m.group(2), m.group(3).strip()
            name = f"{first} {second}" if f"{first} {second}" in commands else first
            rest = line[m.end(2) if name == first else m.end(3):]
            nxt = COMMAND_USE.search(rest)
            rest = rest[:nxt.start()] if nxt else rest
            rest = rest.split(" | ", 1)[0] if "|" in rest and "(" not in rest else rest
            out.append((name if name in commands else first, name if name in commands else "",
                        FLAG.findall(rest)))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def table_keys(text: str, heading: str | None = None) -> set[str]:
    """Backticked names in the first column of the Markdown tables of `text` (or of the
    section under `heading`)."""
    if heading is not None:
        start = text.index(heading)
        end = text.find("\n#", start + len(heading))
        text = text[start:end if end >= 0 else None]
    keys: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            first = line.split("|")[1]
            keys.update(re.findall(r"`([^`]+)`", first))
    return keys


# ------------------------------------------------------------------ the tests

def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < MAX_README_LINES, (
        f"README.md has {lines} lines; keep it under {MAX_README_LINES}: put reference material in "
        "docs/<topic>.md and a short paragraph with a link in the README")


def test_inventories_see_the_code() -> None:
    """Guards against the scans going blind (a renamed parser attribute, a model moved)."""
    commands = code_commands()
    assert {"run", "check", "test", "explain", "eject", "audit verify", "sandbox"} <= set(commands)
    assert "--online" in commands["check"] and "--log-level" in commands[""]
    keys = config_keys()
    assert {"genesys.read_timeout", "audit.path", "lists.<name>.file", "rules"} <= keys
    assert {"name", "when", "action"} <= rule_keys()


def test_every_command_and_flag_in_the_docs_exists() -> None:
    commands = code_commands()
    every_flag = set().union(*commands.values())
    wrong: list[str] = []
    for path in doc_files():
        for snippet in code_text(path.read_text(encoding="utf-8")):
            for written, name, flags in command_uses(snippet, commands):
                if not name:
                    wrong.append(f"{path.name}: `confguard {written}`: no such command")
                    continue
                allowed = commands[name] | commands[""]
                wrong += [f"{path.name}: `confguard {name} {f}`: {name} has no such flag"
                          for f in flags if f not in allowed and f not in FOREIGN_FLAGS]
            wrong += [f"{path.name}: `{f}`: no command has this flag (a foreign tool's? "
                      "add it to FOREIGN_FLAGS)"
                      for f in FLAG.findall(snippet) if f not in every_flag and f not in FOREIGN_FLAGS]
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_every_command_and_flag_is_documented() -> None:
    """Each command has a section `## \\`confguard NAME\\`` in docs/commands.md that names every
    one of its flags; the global flags are named before the first section."""
    text = COMMANDS_DOC.read_text(encoding="utf-8")
    sections = {m.group(1): m.start() for m in re.finditer(r"^## `confguard ([a-z ]+)`", text, re.M)}
    missing: list[str] = []
    for name, flags in code_commands().items():
        if name == "":
            body = text[:min(sections.values())]
        elif name not in sections:
            missing.append(f"`confguard {name}`: add a section '## `confguard {name}`' to docs/commands.md")
            continue
        else:
            start = sections[name]
            later = [s for s in sections.values() if s > start]
            body = text[start:min(later) if later else None]
        missing += [f"`confguard {name}`: document {f} in its section of docs/commands.md"
                    for f in sorted(flags) if not re.search(rf"{re.escape(f)}(?![\w-])", body)]
    assert not missing, "\n".join(missing)
    readme = README.read_text(encoding="utf-8")
    assert [n for n in code_commands() if n and f"confguard {n}" not in readme] == [], (
        "every command has a line in the README's Commands table")


CONFIG_KEY = re.compile(r"^[a-z_]+(?:\.(?:[a-z_]+|<name>))+$")


def _doc_key_problems(key: str, keys: set[str]) -> str | None:
    top = key.split(".")[0]
    if top not in {k for k in keys if "." not in k}:
        return None  # not a config key (`call.connected_parties`, `config.yaml`, ...)
    generic = re.sub(r"^(lists|control\.callers)\.(?!<name>)[\w-]+", r"\1.<name>", key)
    return None if generic in keys else f"`{key}`: no such config key"


def _yaml_key_problems(data: Any, keys: set[str], rules: set[str], prefix: str = "") -> list[str]:
    out: list[str] = []
    if not isinstance(data, dict):
        return out
    for k, v in data.items():
        key = f"{prefix}{k}"
        generic = re.sub(r"^(lists|control\.callers)\.[^.]+", r"\1.<name>", key)
        if generic not in keys:
            out.append(f"`{key}`: no such config key")
            continue
        if generic == "rules" and isinstance(v, list):
            out += [f"`rules[].{rk}`: no such rule key" for r in v if isinstance(r, dict)
                    for rk in r if rk not in rules]
        elif isinstance(v, dict) and any(x.startswith(generic + ".") for x in keys):
            out += _yaml_key_problems(v, keys, rules, key + ".")
    return out


def test_every_config_key_in_the_docs_exists() -> None:
    keys, rules = config_keys(), rule_keys()
    sections = {k for k in keys if "." not in k}
    wrong: list[str] = []
    seen_yaml = 0
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        for m in INLINE.finditer(FENCE.sub("", text)):
            token = m.group(1).split(":")[0].strip()
            if CONFIG_KEY.match(token) and (problem := _doc_key_problems(token, keys)):
                wrong.append(f"{path.name}: {problem}")
        for m in FENCE.finditer(text):
            if m.group(1) != "yaml":
                continue
            try:
                data = yaml.safe_load(m.group(2))
            except yaml.YAMLError:
                continue
            if isinstance(data, dict) and data and set(data) <= sections:
                seen_yaml += 1
                wrong += [f"{path.name} (yaml example): {p}" for p in _yaml_key_problems(data, keys, rules)]
    assert seen_yaml >= 3, "the scan sees no config examples"
    assert not wrong, "\n".join(wrong)


def test_every_config_key_is_documented() -> None:
    text = CONFIG_DOC.read_text(encoding="utf-8")
    listed = table_keys(text)
    missing = sorted(k for k in config_keys() if k not in listed
                     and not any(x.startswith(k + ".") for x in config_keys()))  # sections
    assert not missing, "add a row for each key to the table in docs/configuration.md: " + ", ".join(missing)
    stale = sorted(k for k in listed if CONFIG_KEY.match(k) or k in config_keys()
                   if k not in config_keys())
    assert stale == [], "docs/configuration.md lists keys the configuration does not have"
    rule_rows = table_keys(RULES_DOC.read_text(encoding="utf-8"), "## A rule")
    assert sorted(rule_keys() - rule_rows) == [], "add each rule key to 'A rule' in docs/rules.md"
    assert sorted(rule_rows - rule_keys()) == [], "'A rule' in docs/rules.md lists keys a rule does not have"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    broken: list[str] = []
    for m in LINK.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        target = m.group(1)
        if re.match(r"^[a-z]+:", target):
            continue  # http(s):, mailto:
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


def test_no_internal_wording() -> None:
    found = [f"{p.name}:{n}: {line.strip()}" for p in [README, *sorted(DOCS.glob("*.md"))]
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if any(w.search(line) for w in INTERNAL_WORDING)]
    assert not found, "write for the operator (no team notes, issue numbers or to-dos):\n" + "\n".join(found)


def test_every_sandbox_operation_is_documented() -> None:
    """docs/sandbox.md has a section per driver operation naming each field, with a curl
    example; it names no operation the sandbox does not have."""
    from daemon.sandbox.scenario import OPS

    text = (DOCS / "sandbox.md").read_text(encoding="utf-8")
    sections = {m.group(1): m.start() for m in re.finditer(r"^### `([a-z_]+)`", text, re.M)}
    problems = [f"{name}: documented, but the sandbox has no such operation"
                for name in sections if name not in {s.name for s in OPS}]
    for spec in OPS:
        if spec.name not in sections:
            problems.append(f"{spec.name}: add a section '### `{spec.name}`' to docs/sandbox.md")
            continue
        start = sections[spec.name]
        later = [s for s in sections.values() if s > start]
        body = text[start:min(later) if later else text.find("\n## ", start)]
        problems += [f"{spec.name}: document the field {f.name}" for f in spec.fields
                     if f"`{f.name}`" not in body]
        if f"/sandbox/{spec.name}" not in body or "curl" not in body:
            problems.append(f"{spec.name}: give a curl example")
    assert not problems, "\n".join(problems)


def test_every_manual_is_linked_from_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    unlinked = [name for name in (*OPERATOR_DOCS, "architecture.md") if f"](docs/{name})" not in readme]
    assert not unlinked, "add a row to the README's Documentation table for: " + ", ".join(unlinked)
