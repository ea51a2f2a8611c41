"""Loading: config.yaml (a file or text) -> a validated `Config`, and the list files it names.

Contract:
- `load_config(path)` reads the file and returns `parse_config(text, file, base_dir=its
  folder)`; `parse_config` returns a `Config` or raises `ConfigError` whose `str()` is
  `FILE:LINE:COL: <what is wrong, what was expected>`. Unknown keys are errors everywhere.
  Every problem pydantic finds is reported in one pass (`ConfigErrors`, a ConfigError with
  one line per problem; a problem inside a rule names the rule by its `name`), with the
  configuration minus the refused rules as `.config` when that validates, so a caller can go
  on to compile the other rules.
- `load_lists(cfg)` reads every list under `lists:` (files relative to config.yaml): the
  loaded lists that `daemon.core.rules.compile_rules(cfg, lists)` takes. A list file that
  cannot be read is a ConfigError located at its `file:` key. This is the only place list
  files are read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemon.config.models import SCHEMA_VERSION, Config
from daemon.config.secrets import read_file
from daemon.config.source import ConfigSource, Path_, compose_with_positions
from daemon.errors import ConfigError, ConfigErrors


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _rule_label(data: Any, path: Path_) -> tuple[str, Path_] | None:
    """("rule 'NAME'", the rest of the path) for a path inside `rules[i]` whose rule has a
    text name; None otherwise."""
    if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int) and isinstance(data, dict):
        rules = data.get("rules")
        if isinstance(rules, list) and 0 <= path[1] < len(rules) and isinstance(rules[path[1]], dict):
            name = rules[path[1]].get("name")
            if isinstance(name, str) and name:
                return f"rule {name!r}", path[2:]
    return None


def _describe(err: Mapping[str, Any], path: Path_, data: Any = None) -> str:
    """One pydantic error as an operator reads it; inside a rule, the rule is named by its
    `name` (`rule 'flagged-party': action: got 'remove', ...`)."""
    label = _rule_label(data, path)
    if label is not None:
        inner = _describe(err, label[1])
        return f"{label[0]}: {inner}"
    kind = err.get("type", "")
    loc = _dotted(path)
    if path and path[-1] == "hold_for":
        return f"{loc}: expected a duration such as 10s, 2m, 500ms or a number of seconds, got {err.get('input')!r}"
    if kind == "extra_forbidden":
        return f"unknown key {str(err['loc'][-1])!r}; check the spelling (allowed keys are in docs/configuration.md)"
    if kind == "missing":
        where = f" in {loc}" if loc else ""
        return f"missing required key {str(err['loc'][-1])!r}{where}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{loc}: got {err.get('input')!r}, expected one of {expected}"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _check_whole(cfg: Config, src: ConfigSource) -> list[ConfigError]:
    """What one model cannot see: unique rule names, one list source, one DSN source,
    callers. Every problem of the first two kinds; then the first of the others."""
    problems: list[ConfigError] = []
    names: dict[str, int] = {}
    for i, rule in enumerate(cfg.rules):
        if rule.name in names:
            line = src.position(("rules", names[rule.name], "name"))[0]
            problems.append(src.error(("rules", i, "name"),
                                      f"duplicate rule name {rule.name!r} (first at line {line}); names must be unique"))
            continue
        names[rule.name] = i
    for name, spec in cfg.lists.items():
        if (spec.file is None) == (spec.values is None):
            problems.append(src.error(("lists", name), f"list {name!r} needs exactly one of 'file' or 'values'"))
    try:
        _check_sections(cfg, src)
    except ConfigError as exc:
        problems.append(exc)
    return problems


def _check_sections(cfg: Config, src: ConfigSource) -> None:
    if cfg.ha.dsn is not None and cfg.ha.dsn_file is not None:
        raise src.error(("ha", "dsn_file"), "ha: give one of 'dsn' or 'dsn_file', not both")
    margin = cfg.ha.safety_margin
    if margin is not None and margin >= cfg.ha.takeover_after * 2 / 3:
        raise src.error(("ha", "safety_margin"),
                        f"ha.safety_margin ({margin:g} s) must stay below 2/3 of ha.takeover_after "
                        f"({cfg.ha.takeover_after:g} s), or the leader could never renew and send")
    if cfg.control.listen is not None and not cfg.control.callers:
        raise src.error(("control", "listen"),
                        "control.listen is set but control.callers names no caller: nobody could "
                        "use the API (add e.g. callers: {orchestrator: {token_file: orchestrator.token}})")
    client_ca = cfg.control.tls.client_ca_file if cfg.control.tls is not None else None
    cns: dict[str, str] = {}
    for name, caller in cfg.control.callers.items():
        cn = caller.client_cert_cn
        if cn is None:
            continue
        if client_ca is None:
            raise src.error(("control", "callers", name, "client_cert_cn"),
                            "client_cert_cn needs control.tls.client_ca_file (client certificates "
                            "are only asked for, and checked, with it)")
        if cn in cns:
            raise src.error(("control", "callers", name, "client_cert_cn"),
                            f"client_cert_cn {cn!r} already names caller {cns[cn]!r}; give each caller its own")
        cns[cn] = name


def parse_config(text: str, file: str = "config.yaml", base_dir: Path | None = None) -> Config:
    """Validate YAML text as a Config; raises ConfigError located at the first problem.
    `base_dir` is the folder relative paths in the text are relative to (default: `.`)."""
    data, src = compose_with_positions(text, file)
    src.base_dir = base_dir or Path(".")
    if not isinstance(data, dict):
        raise src.error((), "the top level must be a mapping of sections (genesys, subscriptions, rules, ...)")
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise src.error(("schema_version",),
                        f"schema_version {version} is newer than this confguard understands "
                        f"(up to {SCHEMA_VERSION}); upgrade confguard")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems = _validation_problems(exc, data, src)
        partial = _without_bad_rules(data, exc, src)
        ConfigErrors.raise_all(problems, config=partial)
        raise AssertionError("unreachable") from None  # raise_all raised: problems is not empty
    ConfigErrors.raise_all(_check_whole(cfg, src), config=cfg.model_copy(update={"source": src}))
    return cfg.model_copy(update={"source": src})


def _validation_problems(exc: ValidationError, data: Any, src: ConfigSource) -> list[ConfigError]:
    """Every pydantic error as a located ConfigError, one per place (pydantic can report a
    value twice, once per branch of a union)."""
    problems: list[ConfigError] = []
    seen: set[Path_] = set()
    for err in exc.errors():
        loc = _data_path(data, tuple(err.get("loc", ())))
        if loc in seen:
            continue
        seen.add(loc)
        problems.append(src.error(loc, _describe(err, loc, data), key=err.get("type") == "extra_forbidden"))
    return problems


def _without_bad_rules(data: dict[str, Any], exc: ValidationError, src: ConfigSource) -> Config | None:
    """The configuration without the rules pydantic refused, when that validates (so the
    other rules can still be compiled and checked in the same pass); else None."""
    bad = {err["loc"][1] for err in exc.errors()
           if len(err.get("loc", ())) >= 2 and err["loc"][0] == "rules" and isinstance(err["loc"][1], int)}
    if not bad or not isinstance(data.get("rules"), list):
        return None
    kept = [r for i, r in enumerate(data["rules"]) if i not in bad]
    try:
        cfg = Config.model_validate({**data, "rules": kept})
    except ValidationError:
        return None
    # The kept rules' positions: map their new indexes back onto the file's.
    old_index = [i for i in range(len(data["rules"])) if i not in bad]
    moved = ConfigSource(file=src.file, base_dir=src.base_dir)
    for table_name in ("values", "keys"):
        table, out = getattr(src, table_name), getattr(moved, table_name)
        for path, pos in table.items():
            if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int):
                if path[1] in bad:
                    continue
                out[("rules", old_index.index(path[1]), *path[2:])] = pos
            else:
                out[path] = pos
    return cfg.model_copy(update={"source": moved})


def _data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    """The part of a pydantic error location that exists in the data (pydantic inserts
    union-branch names such as 'str' that are not keys); an unknown key is kept last."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            out.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            out.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and not out[-1:] == [part]:
            continue
    return tuple(out)


#: Bytes config.yaml may hold.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: Bytes one list file may hold, and values one list may have (file or inline).
MAX_LIST_BYTES = 32 * 1024 * 1024
MAX_LIST_VALUES = 1_000_000


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Raises ConfigError (never a traceback for bad input):
    config.yaml must be a regular file of at most MAX_CONFIG_BYTES (`read_file`: a FIFO or a
    device is refused without waiting on it)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    text = read_file(p, "cannot read config file {path}: {reason}", max_bytes=MAX_CONFIG_BYTES)
    return parse_config(text, file=str(path), base_dir=p.parent)


def load_list_file(path: Path) -> list[str]:
    """One value a line; blank lines and '#' comments ignored; surrounding spaces stripped.
    A regular file of at most MAX_LIST_BYTES with at most MAX_LIST_VALUES values, else a
    ConfigError."""
    if not path.exists():
        raise ConfigError(f"list file not found: {path}")
    text = read_file(path, "cannot read list file {path}: {reason}", max_bytes=MAX_LIST_BYTES)
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        value = line.split("#", 1)[0].strip()
        if value:
            if "\x00" in value:
                raise ConfigError(f"list file {path}:{lineno}: a NUL character; not allowed in a value")
            out.append(value)
            if len(out) > MAX_LIST_VALUES:
                raise ConfigError(f"list file {path} has more than {MAX_LIST_VALUES} values")
    return out


def load_lists(cfg: Config) -> dict[str, frozenset[str]]:
    """The contents of every list under `lists:` (files resolved against the config's
    folder). A file that cannot be read is a ConfigError located at its `file:` key."""
    src = cfg.source or ConfigSource(file="<config>")
    out: dict[str, frozenset[str]] = {}
    problems: list[ConfigError] = []
    for name, spec in cfg.lists.items():
        if spec.file is not None:
            try:
                values = load_list_file(cfg.resolve_path(spec.file))
            except ConfigError as exc:
                problems.append(src.error(("lists", name, "file"), f"list {name!r}: {exc.message}"))
                continue
        else:
            values = [str(v) for v in spec.values or ()]
            if len(values) > MAX_LIST_VALUES:
                problems.append(src.error(("lists", name, "values"),
                                          f"list {name!r} has more than {MAX_LIST_VALUES} values"))
                continue
        out[name] = frozenset(values)
    ConfigErrors.raise_all(problems)
    return out
