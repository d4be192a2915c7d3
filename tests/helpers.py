"""Helpers several test modules share: waiting on a condition with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def wait_until(
    condition: Callable[[], Any],
    *,
    timeout: float = 15.0,
    what: str = "condition",
    poll: float = 0.02,
    gone: Callable[[], str | None] | None = None,
    context: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` (sync, or returning a coroutine) until it is truthy.

    Never a bare sleep: it returns as soon as the condition holds, and fails
    with ``what`` when ``timeout`` passes.

    Args:
        gone: called on every poll; a text means the thing being watched died
            (a subprocess exited): fail at once with that text instead of
            waiting out the deadline.
        context: text added to a timeout's message (a process's last output).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if gone is not None:
            death = gone()
            if death:
                raise AssertionError(f"{what}: {death}")
        if time.monotonic() > deadline:
            detail = "\n" + context() if context is not None else ""
            raise AssertionError(f"{what} not met within {timeout}s{detail}")
        await asyncio.sleep(poll)
