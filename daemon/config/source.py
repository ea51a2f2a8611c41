"""YAML with positions: `config.yaml` text -> plain Python data + where each node stands.

Contract: `compose_with_positions(text, file)` returns `(data, ConfigSource)` or raises
`ConfigError` located `file:line:col` (syntax errors, duplicate keys, merge keys, non-text
keys, unacceptable characters). Lines and columns are 1-based. No file is read here: the
caller hands the text (`daemon.config.loader` reads it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.errors import ConfigError

try:  # the libyaml-backed loader is several times faster; fall back to pure Python
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

#: A node's path: mapping keys and list indexes from the document root, e.g. ("rules", 2, "when").
Path_ = tuple[str | int, ...]


@dataclass(slots=True)
class ConfigSource:
    """Where each node of a loaded YAML document stands, for `file:line:col` messages.

    `values[path]` is the (line, col) of the value at `path`; `keys[path]` that of its
    mapping key. Paths are tuples of keys and list indexes, e.g. `("rules", 2, "when")`.
    `base_dir` is the folder of config.yaml: every relative path in the file is relative
    to it (`daemon.config.secrets.resolve`).
    """

    file: str
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path)
    constructor: yaml.constructor.SafeConstructor = field(
        default_factory=yaml.constructor.SafeConstructor, repr=False, compare=False)

    def position(self, path: Path_, *, key: bool = False) -> tuple[int | None, int | None]:
        """The nearest known position for `path`, walking up to its parents."""
        p = tuple(path)
        while True:
            table = self.keys if key and p in self.keys else self.values
            if p in table:
                return table[p]
            if not p:
                return None, None
            p = p[:-1]

    def error(self, path: Path_, message: str, *, key: bool = False) -> ConfigError:
        line, col = self.position(path, key=key)
        return ConfigError(message, file=self.file, line=line, col=col)


class _NoDupLoader(_Loader):
    pass


def compose_with_positions(text: str, file: str) -> tuple[Any, ConfigSource]:
    """Parse YAML text into plain Python data plus a `ConfigSource` of node positions.

    Raises ConfigError for syntax errors and duplicate keys (YAML silently keeps the last).
    """
    src = ConfigSource(file=file)
    try:
        node = yaml.compose(text, Loader=_NoDupLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", file=file,
                          line=mark.line + 1 if mark else None,
                          col=mark.column + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:
        # Unacceptable characters carry a character offset, not a mark: locate it by hand.
        pos = max(0, min(int(exc.position), len(text)))
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise ConfigError(f"invalid YAML: unacceptable character U+{ord(char):04X} "
                          f"(control characters are not allowed)", file=file, line=line,
                          col=col) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from None
    except RecursionError:
        raise ConfigError(f"invalid YAML: nested more than about {sys.getrecursionlimit()} "
                          f"levels deep", file=file) from None
    if node is None:
        return {}, src
    _refuse_aliases(node, file)
    try:
        return _build(node, (), src), src
    except RecursionError:
        raise ConfigError(f"invalid YAML: nested more than about {sys.getrecursionlimit()} "
                          f"levels deep", file=file) from None


#: Nodes a document may have (each list item, mapping key and value is one).
MAX_NODES = 2_000_000


def _refuse_aliases(root: yaml.Node, file: str) -> None:
    """Refuse YAML anchors and aliases (`&name` / `*name`) before anything is expanded.

    An alias is the same node object as its anchor in the composed graph, so the graph is
    small even for a "billion laughs" document; it is building plain data from it that
    blows up (a 650-byte file took 24 s and 2.5 GB to a MemoryError). One pass over the
    graph with a seen-set finds any node reached twice, in time linear in the file. Also
    caps the node count at MAX_NODES."""
    seen: set[int] = set()
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            mark = node.start_mark
            raise ConfigError("YAML anchors and aliases (&name, *name) are not supported: write "
                              "the value out where it is used (this is the anchored value)",
                              file=file, line=mark.line + 1, col=mark.column + 1)
        seen.add(id(node))
        if len(seen) > MAX_NODES:
            raise ConfigError(f"invalid YAML: more than {MAX_NODES} values", file=file)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.append(v)
                stack.append(k)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _key_error(src: ConfigSource, knode: yaml.Node, message: str) -> ConfigError:
    return ConfigError(message, file=src.file, line=knode.start_mark.line + 1,
                       col=knode.start_mark.column + 1)


def _build_mapping(node: yaml.MappingNode, path: Path_, src: ConfigSource) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for knode, vnode in node.value:
        if not isinstance(knode, yaml.ScalarNode):
            raise _key_error(src, knode, "mapping keys must be plain text")
        if knode.tag == "tag:yaml.org,2002:merge":
            raise _key_error(src, knode, "YAML merge keys (<<) are not supported; write the keys out")
        k = str(knode.value)
        if "\x00" in k:
            raise _key_error(src, knode, "a NUL character (\\0) in a key: not allowed")
        if k in out:
            raise _key_error(src, knode, f"duplicate key {k!r}: each key may appear once")
        src.keys[path + (k,)] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
        out[k] = _build(vnode, path + (k,), src)
    return out


def _build(node: yaml.Node, path: Path_, src: ConfigSource) -> Any:
    src.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        return _build_mapping(node, path, src)
    if isinstance(node, yaml.SequenceNode):
        return [_build(v, path + (i,), src) for i, v in enumerate(node.value)]
    # Scalars: the resolver's tag decides the type (int, float, bool, null, str).
    try:
        value = src.constructor.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid value: {exc}", file=src.file,
                          line=node.start_mark.line + 1, col=node.start_mark.column + 1) from None
    if isinstance(value, str) and "\x00" in value:  # "\0" in a quoted string: no path, name or id has one
        raise ConfigError("a NUL character (\\0) in a value: not allowed", file=src.file,
                          line=node.start_mark.line + 1, col=node.start_mark.column + 1)
    return value
