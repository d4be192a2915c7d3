"""Helpers several test modules share: waiting on a condition with a deadline, an alert sink that records."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from shared.alerts import AlertType


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


class RecordingAlerts:
    """An alert sink that remembers what it was given (the AlertSink protocol, nothing of ours replaced)."""

    def __init__(self) -> None:
        self.alerts: list[tuple[AlertType, str, str | None]] = []
        self.resolved: list[tuple[AlertType, str | None]] = []

    def alert(self, type: AlertType, message: str, *, key: str | None = None, details: Any = None) -> bool:  # noqa: A002
        self.alerts.append((type, message, key))
        return True

    def resolve(self, type: AlertType, *, key: str | None = None, message: str = "") -> bool:  # noqa: A002
        self.resolved.append((type, key))
        return True
