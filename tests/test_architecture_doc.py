"""docs/architecture.md keeps up with the tree: every module of daemon/ is named in it (by
its file name, e.g. `state.py`, or its path, e.g. `core/state.py`), and every module path it
names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAEMON = ROOT / "daemon"
DOC = ROOT / "docs" / "architecture.md"


def _modules() -> list[Path]:
    return sorted(p.relative_to(DAEMON) for p in DAEMON.rglob("*.py")
                  if p.name not in ("__init__.py", "__main__.py"))


def test_every_module_is_named() -> None:
    text = DOC.read_text()
    missing = [str(m) for m in _modules()
               if m.as_posix() not in text and not re.search(rf"(?<![\w/]){re.escape(m.name)}", text)]
    assert missing == [], "describe these modules in docs/architecture.md"


def test_every_named_path_exists() -> None:
    text = DOC.read_text()
    named = set(re.findall(
        r"(?<![\w/])(?:daemon/)?((?:core|config|genesys|service|commands|sandbox)/[\w/]+\.py)\b", text))
    assert named, "the scan sees no module paths"
    gone = sorted(p for p in named if not (DAEMON / p).exists())
    assert gone == [], "docs/architecture.md names modules that no longer exist"
