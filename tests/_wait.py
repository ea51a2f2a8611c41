"""The one polling helper of the tests: wait, bounded, until a condition holds.

    from _wait import wait_until
    await wait_until(lambda: daemon.enforcer.in_flight == 0, 10, "the removals to finish")

`pred` is polled every `interval` seconds (default 10 ms) on the running loop's clock: a
plain callable, or one returning an awaitable (an `async def` predicate). The first truthy
value is returned. After `timeout` seconds (checked after each poll, so `pred` runs at
least once) it raises AssertionError naming `what` and the timeout: a test that waits
fails loudly, never hangs and never sleeps-and-hopes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_until(pred: Callable[[], T | Awaitable[T]], timeout: float = 10.0,
                     what: str = "condition", *, interval: float = 0.01) -> T:
    """Poll `pred` until truthy; its value. AssertionError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
