"""Logging for the core without importing an I/O stack at import time.

structlog imports asyncio (for its async loggers), so a module-level `structlog.get_logger`
would make every core import load asyncio. `get_logger(name)` returns a stand-in that
imports structlog at the first line logged; the daemon has imported it long before, and
`confguard replay` or a benchmark only pays for it if the core has something to say.
Lines go through structlog exactly as before (event name, key-value fields, levels).
"""

from __future__ import annotations

from typing import Any


class CoreLogger:
    """A structlog logger, fetched on first use. Methods: debug, info, warning, error,
    critical, exception; each takes the event name and key-value fields."""

    __slots__ = ("_name", "_log")

    def __init__(self, name: str) -> None:
        self._name = name
        self._log: Any = None

    def _get(self) -> Any:
        if self._log is None:
            import structlog  # deferred: see the module docstring

            self._log = structlog.get_logger(self._name)
        return self._log

    def debug(self, event: str, **kw: object) -> None:
        self._get().debug(event, **kw)

    def info(self, event: str, **kw: object) -> None:
        self._get().info(event, **kw)

    def warning(self, event: str, **kw: object) -> None:
        self._get().warning(event, **kw)

    def error(self, event: str, **kw: object) -> None:
        self._get().error(event, **kw)

    def critical(self, event: str, **kw: object) -> None:
        self._get().critical(event, **kw)

    def exception(self, event: str, **kw: object) -> None:
        self._get().exception(event, **kw)


def get_logger(name: str) -> CoreLogger:
    return CoreLogger(name)


DEBUG = 10  # logging.DEBUG, without importing logging here


def debug_enabled() -> bool:
    """Whether structlog's current configuration emits debug lines. A guard for debug lines
    on hot paths whose fields cost something to build: about a microsecond, where a debug
    call on a module-level (lazy) structlog logger binds a new logger each time (~5-15 us)
    only to drop the line. Follows reconfiguration (tests, `configure_logging`)."""
    import structlog  # deferred: see the module docstring

    check = getattr(structlog.get_config()["wrapper_class"], "is_enabled_for", None)
    return bool(check(None, DEBUG)) if callable(check) else True
