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
    assert outside <= ALLOWED_OUTSIDE, sorted(outside - ALLOWED_OUTSIDE)
    for name in outside:
        assert not _imports(_module_file(name)) & BANNED, name
