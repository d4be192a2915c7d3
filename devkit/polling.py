"""Waiting on a condition with a deadline: the one polling loop of the tests and the benchmarks.

Never a bare sleep: :func:`eventually` returns as soon as the condition holds.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    gone: Callable[[], str | None] | None = None,
    context: Callable[[], str] | None = None,
    error: type[Exception] = AssertionError,
) -> T:
    """Poll ``probe`` (sync or async) until it returns something truthy, and return that value.

    Never a bare sleep: it returns as soon as the value is truthy, and fails
    with ``what`` (and the last value) when ``timeout`` passes.

    Args:
        gone: called on every poll; a text means the thing being watched died
            (a subprocess exited): fail at once with that text instead of
            waiting out the deadline.
        context: text added to a timeout's message (a process's last output).
        error: what a timeout raises (tests: AssertionError, benchmarks: TimeoutError).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if gone is not None:
            death = gone()
            if death:
                raise error(f"{what}: {death}")
        if time.monotonic() > deadline:
            detail = "\n" + context() if context is not None else ""
            raise error(f"{what} not met within {timeout}s (last value {value!r}){detail}")
        await asyncio.sleep(interval)
