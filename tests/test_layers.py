"""The import rule of docs/architecture.md ("Packages and the import rule"): which daemon
packages each package may import at run time. Imports inside `if TYPE_CHECKING:` (for
annotations only) do not count."""

from __future__ import annotations

import ast
from pathlib import Path

DAEMON = Path(__file__).resolve().parents[1] / "daemon"

#: package -> the daemon packages (or single modules) it may import at run time.
ALLOWED: dict[str, set[str]] = {
    "core": {"core", "config", "errors"},
    "config": {"config", "errors"},
    "errors": set(),
    "genesys": {"genesys", "core", "config", "errors"},
    "service": {"service", "core", "config", "errors", "genesys"},
    "sandbox": {"sandbox", "core"},
    "commands": {"commands", "service", "genesys", "core", "config", "errors", "sandbox"},
}
#: Entry points that only forward to a command.
ENTRY_POINTS = {"__main__.py", "sandbox/__main__.py"}


def _package(path: Path) -> str:
    rel = path.relative_to(DAEMON)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else ""


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every `daemon.*` import not under `if TYPE_CHECKING:`."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m == "daemon" or m.startswith("daemon.")]


def _allowed(target: str, rules: set[str]) -> bool:
    parts = target.split(".")[1:]  # without "daemon"
    if not parts:
        return True  # the package itself (its version string)
    return parts[0] in rules or ".".join(parts[:2]) in rules


def test_packages_import_only_what_the_layering_allows() -> None:
    wrong = []
    for path in sorted(DAEMON.rglob("*.py")):
        rel = path.relative_to(DAEMON).as_posix()
        package = _package(path)
        if rel in ENTRY_POINTS or package not in ALLOWED:
            continue
        for line, target in _runtime_imports(ast.parse(path.read_text())):
            if not _allowed(target, ALLOWED[package]):
                wrong.append(f"daemon/{rel}:{line} imports {target}")
    assert wrong == [], "see docs/architecture.md, 'Packages and the import rule'"


def test_every_package_has_a_rule() -> None:
    packages = {_package(p) for p in DAEMON.rglob("*.py")} - {""}
    assert packages - {"__main__"} <= set(ALLOWED), packages - set(ALLOWED)


# ------------------------------------------------------------------ import cycles


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(DAEMON.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(*, type_only: bool) -> dict[str, set[str]]:
    """daemon module -> the daemon modules it imports anywhere in its body (module level or
    inside a function: a cycle hidden by a function-level import is still a cycle), the
    `if TYPE_CHECKING:` ones too when `type_only`. `from pkg import mod` is an edge to the
    submodule `pkg.mod`; `from pkg import name` one to `pkg` (its __init__)."""
    files = {_module_name(p): p for p in DAEMON.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        skip: set[int] = set()
        if not type_only:
            for node in ast.walk(tree):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    if f"{base}.{a.name}" in files:
                        out.add(f"{base}.{a.name}")
                    elif base in files:
                        out.add(base)
        out.discard(name)
        graph[name] = out
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_anywhere_in_daemon() -> None:
    """No cycle between any daemon modules, inside a package (the sandbox's app, server and
    scenario had one, hidden by function-level imports) or across packages."""
    graph = _import_graph(type_only=False)
    assert len(graph) > 50 and "daemon.sandbox.app" in graph["daemon.sandbox.server"]
    assert _cycles(graph) == []


#: Type-only cycles (imports under `if TYPE_CHECKING:` included) still allowed, to be removed.
TYPE_ONLY_CYCLES_LEFT: list[list[str]] = []


def test_no_new_type_only_import_cycle() -> None:
    """Annotations may not close a cycle either (core/model <-> core/enforcement and
    service/assembly <-> service/eventbridge did)."""
    assert _cycles(_import_graph(type_only=True)) == TYPE_ONLY_CYCLES_LEFT


def test_every_logger_is_named_after_its_module() -> None:
    """`get_logger(__name__)` everywhere (the names were a mix of __name__, confguard.* and
    daemon.*)."""
    wrong = []
    for path in sorted(DAEMON.rglob("*.py")):
        if path == DAEMON / "core" / "logs.py":
            continue  # the core's lazy logger itself: get_logger(self._name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "get_logger" \
                    and node.args and not (isinstance(node.args[0], ast.Name) and node.args[0].id == "__name__"):
                wrong.append(f"{path.relative_to(DAEMON.parent)}:{node.lineno}")
    assert wrong == []
