"""Finding promtool for the tests of ops/ (alert rules and the dashboard's queries).

promtool comes with Prometheus (Debian/Ubuntu package `prometheus`; `.ci/run` installs it).
When it is missing the tests say so plainly: they fail in CI (`CI` set in the environment)
and are skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import os
import shutil

import pytest

INSTALL_HINT = ("promtool not found: install Prometheus' promtool (Debian/Ubuntu: "
                "`apt-get install prometheus`, or put the release tarball's promtool on PATH, "
                "or set PROMTOOL=/path/to/promtool)")


def promtool() -> str:
    """The promtool executable, or fail (CI) / skip (elsewhere) with an install hint."""
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if path and os.access(path, os.X_OK):
        return path
    if os.environ.get("CI"):
        pytest.fail(INSTALL_HINT + " -- required in CI", pytrace=False)
    pytest.skip(INSTALL_HINT)
