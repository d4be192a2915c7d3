"""Helpers of the Reply Guy tests: polling with a deadline, a quick settings builder."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from shared.config import ReplyGuySettings, load_settings

T = TypeVar("T")

FAST_ENV: dict[str, str] = {
    "TIMEOUT_HTTP": "2",
    "TIMEOUT_DB": "5",
    "TIMEOUT_TELEGRAM_SEND": "5",
    "TIMEOUT_TELEGRAM_ENTITY": "5",
    "RETRY_BASE_DELAY": "0",
    "POST_DELAY_MIN": "0",
    "POST_DELAY_MAX": "0",
}
"""Short deadlines and no delays, so a failing case fails fast."""


def settings_for(tmp_path: Path, env: Mapping[str, str] | None = None) -> ReplyGuySettings:
    """Reply Guy settings in sandbox mode, with DATA_DIR under ``tmp_path``."""
    return load_settings(ReplyGuySettings, {"DATA_DIR": str(tmp_path / "data"), **FAST_ENV, **(env or {})})


async def eventually(
    probe: Callable[[], T | Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``probe`` (sync or async) until it returns something truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s (last value {value!r})")
        await asyncio.sleep(interval)


def active_alerts(sink: Any) -> list[str]:
    """``type:key`` of the alerts a LogAlertSink has raised and not resolved."""
    return list(sink.get_status()["active"])
