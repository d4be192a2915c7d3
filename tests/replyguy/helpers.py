"""Helpers of the Reply Guy tests: polling with a deadline, a quick settings builder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import ReplyGuySettings, load_settings
from tests.helpers import eventually  # noqa: F401 - the Reply Guy tests import it from here


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


def active_alerts(sink: Any) -> list[str]:
    """``type:key`` of the alerts a LogAlertSink has raised and not resolved."""
    return list(sink.get_status()["active"])
