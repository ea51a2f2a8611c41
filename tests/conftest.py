import os

import pytest

# Genesys Cloud sandbox fixtures (`sandbox`, `sandbox_client`); tests/ is on sys.path (no __init__.py).
pytest_plugins = ["sandbox_fixtures"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On pytest-xdist workers (`make test` runs `-n 2 --dist loadgroup`): the tests marked
    `slow` (each a minute or so of wall time) are handed out first, so that no worker is
    left running one of them alone at the end. Every worker sorts the same way (xdist
    requires identical collections); a plain `pytest` run keeps the collection order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
