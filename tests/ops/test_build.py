"""Packaging: `make demo` installs only the runtime dependencies; `project.license` is an
SPDX string (a TOML table is deprecated by setuptools and warns at every build)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_license_is_an_spdx_string() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))


def test_demo_installs_runtime_dependencies_only() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    prereqs = re.search(r"^demo:(.*)$", makefile, re.M)
    assert prereqs is not None
    assert "$(STAMP)" not in prereqs.group(1).split()
    stamp = prereqs.group(1).split()[0].strip("$()")
    recipe = re.search(rf"^\$\({stamp}\):.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None, stamp
    assert "pip install -q -e .\n" in recipe.group(1)
    assert "[test" not in recipe.group(1) and "[bench" not in recipe.group(1)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = " ".join(extras["dependencies"]).lower()
    for dev_only in ("mypy", "hypothesis", "purecloudplatformclientv2", "pytest"):
        assert dev_only not in runtime


def test_sniffio_is_a_runtime_dependency() -> None:
    """httpcore (under httpx) imports sniffio 4 times a request; when it is not installed
    (anyio no longer requires it) each is a failed import that searches sys.path again,
    ~0.1-0.2 ms per REST call (bench/RESULTS.md, "Request budget")."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(re.match(r"sniffio\b", d) for d in project["dependencies"])
