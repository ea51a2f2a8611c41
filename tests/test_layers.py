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
