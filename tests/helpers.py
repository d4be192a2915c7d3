"""Helpers the test modules share: waiting on a condition with a deadline (devkit.polling), a clock the test moves, an alert sink that records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from devkit.polling import eventually
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
    """:func:`eventually` for a condition whose value is not needed (15 s by default)."""
    await eventually(condition, timeout=timeout, interval=poll, what=what, gone=gone, context=context)


class FakeClock:
    """Seconds that move only when the test says so (monotonic or wall clock alike)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingAlerts:
    """An alert sink that remembers what it was given (the AlertSink protocol, nothing of ours replaced)."""

    def __init__(self) -> None:
        self.alerts: list[tuple[AlertType, str, str | None]] = []
        self.details: list[Any] = []  # each alert's details, in the order of ``alerts``
        self.resolved: list[tuple[AlertType, str | None]] = []

    def alert(self, type: AlertType, message: str, *, key: str | None = None, details: Any = None) -> bool:  # noqa: A002
        self.alerts.append((type, message, key))
        self.details.append(details)
        return True

    def of_type(self, kind: AlertType | str) -> list[tuple[AlertType, str, str | None]]:
        """The alerts of one type (an AlertType or its value)."""
        return [a for a in self.alerts if a[0] == kind]

    def resolve(self, type: AlertType, *, key: str | None = None, message: str = "") -> bool:  # noqa: A002
        self.resolved.append((type, key))
        return True
