"""daemon/core/ is sans-I/O: none of its modules imports asyncio, httpx, websockets or
aiohttp, directly or through anything it pulls in (checked in sys.modules of a fresh
interpreter after importing each core module), and none reads the clock: it is driven by
tests and by `confguard replay` with plain values and a `now` argument."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "daemon" / "core"
BANNED = {"asyncio", "httpx", "websockets", "aiohttp"}
#: The daemon modules outside core/ that core may use: pure data and errors.
ALLOWED_OUTSIDE = {"daemon", "daemon.config", "daemon.errors"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _module_file(name: str) -> Path:
    rel = Path(*name.split("."))
    pkg = ROOT / rel / "__init__.py"
    return pkg if pkg.exists() else ROOT / rel.with_suffix(".py")


def test_no_core_module_imports_io_libraries() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 5
    found = {str(p.relative_to(ROOT)): sorted(_imports(p) & BANNED) for p in files}
    assert {k: v for k, v in found.items() if v} == {}


def test_importing_each_core_module_loads_no_io_library() -> None:
    """In a fresh interpreter, import the core modules one by one and look at sys.modules
    after each: no I/O library is loaded, not even through a dependency (structlog, which
    imports asyncio, is only imported when the core logs its first line)."""
    code = ("import importlib, json, pkgutil, sys, daemon.core as c\n"
            f"banned = {sorted(BANNED)!r}\n"
            "out = {}\n"
            "for m in pkgutil.walk_packages(c.__path__, 'daemon.core.'):\n"
            "    importlib.import_module(m.name)\n"
            "    out[m.name] = [b for b in banned if b in sys.modules]\n"
            "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, check=True)
    loaded: dict[str, list[str]] = json.loads(run.stdout)
    assert len(loaded) > 10 and "daemon.core.rules" in loaded and "daemon.core.enforcement" in loaded
    # the first module after which a banned library shows up is the one that pulled it in
    assert {m: libs for m, libs in loaded.items() if libs} == {}


def test_core_reads_no_clock() -> None:
    """`now` is always passed in: no call of time.time/monotonic/perf_counter, datetime.now
    or utcnow anywhere in core (docstrings may name them)."""
    clocks = {"time", "monotonic", "perf_counter", "now", "utcnow", "time_ns", "monotonic_ns"}
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in clocks and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id in ("time", "datetime"):
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} reads the clock")


def test_core_pulls_in_no_io_layer_of_the_daemon() -> None:
    """Importing every core module loads no daemon module outside core/ but config and
    errors, and those import no I/O library either."""
    code = ("import importlib, pkgutil, sys, daemon.core as c\n"
            "for m in pkgutil.walk_packages(c.__path__, 'daemon.core.'):\n"
            "    importlib.import_module(m.name)\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] == 'daemon')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, check=True)
    loaded = set(out.stdout.split())
    outside = {m for m in loaded if not (m == "daemon.core" or m.startswith("daemon.core."))}
    allowed = {m for m in outside if m in ALLOWED_OUTSIDE or m.startswith("daemon.config.")}
    assert outside == allowed, sorted(outside - allowed)
    for name in outside:
        assert not _imports(_module_file(name)) & BANNED, name


#: Calls that open, read or write a file (as a method, e.g. `path.read_text()`, or a name).
FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "fdopen",
              "load_lists", "load_list_file", "load_config", "read_secret", "mkstemp"}


def test_no_core_module_opens_a_file() -> None:
    """Issue 17: the core reads no file. List files are read by `daemon.config.load_lists`
    and handed to `compile_rules(cfg, lists)`; no core module calls open(), a Path's
    read/write methods, or the config's file loaders (imported or not)."""
    found = []
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 5
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            name = None
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            elif isinstance(node, ast.ImportFrom):
                hits = [a.name for a in node.names if a.name in FILE_CALLS]
                name = hits[0] if hits else None
            if name in FILE_CALLS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert found == []


def test_compiling_rules_opens_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same at run time: with the lists loaded first, compiling a config whose list comes
    from a file works while every way of opening a file raises."""
    import builtins
    import io

    from daemon.config import load_lists, parse_config
    from daemon.core.rules import compile_rules

    (tmp_path / "blocked.txt").write_text("+15550001\n")
    cfg = parse_config("lists:\n  blocked: {file: blocked.txt}\n"
                       "rules:\n  - name: r\n    action: disconnect\n"
                       "    when: {address: {in_list: blocked}}\n", base_dir=tmp_path)
    lists = load_lists(cfg)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rule compiler opened a file")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    monkeypatch.setattr(Path, "read_text", refuse)
    monkeypatch.setattr(Path, "read_bytes", refuse)
    ruleset = compile_rules(cfg, lists)
    assert [r.name for r in ruleset.rules] == ["r"]
    assert ruleset.lists["blocked"] == frozenset({"+15550001"})
