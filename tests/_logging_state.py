"""Tests that call `configure_logging` change process-wide state (structlog's config, root
handlers, library logger levels); `preserved_logging()` puts it back afterwards."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

_LIBRARIES = ("aiohttp", "websockets", "httpx", "httpcore", "asyncio")


@contextmanager
def preserved_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {n: logging.getLogger(n).level for n in _LIBRARIES}
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lvl in libraries.items():
            logging.getLogger(name).setLevel(lvl)
