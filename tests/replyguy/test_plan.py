"""bot.plan_for: the settings resolved into what a run talks to, complete for live mode."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bot import LiveTelegram, plan_for
from shared.config import ConfigError, ReplyGuySettings, load_settings

LIVE_ENV = {
    "X_BEARER_TOKEN": "bearer",
    "X_CONSUMER_KEY": "ck",
    "X_CONSUMER_SECRET": "cs",
    "X_ACCESS_TOKEN": "at",
    "X_ACCESS_TOKEN_SECRET": "ats",
    "AI_API_KEY": "ai-key",
    "TELEGRAM_BOT_TOKEN": "123:abc",
    "TELEGRAM_API_ID": "12345",
    "TELEGRAM_API_HASH": "hash",
    "OPERATOR_CHAT_ID": "-1001",
    "OPERATOR_IDS": "7,8",
    "REPLY_KEYWORDS": "bot",
}


def live_settings(tmp_path: Path) -> ReplyGuySettings:
    return load_settings(ReplyGuySettings, {"DATA_DIR": str(tmp_path), **LIVE_ENV})


def test_live_settings_give_a_plan_with_the_telegram_login_and_operator_chat(tmp_path: Path) -> None:
    plan = plan_for(live_settings(tmp_path))

    assert not plan.sandbox
    assert plan.telegram == LiveTelegram(bot_token="123:abc", api_id=12345, api_hash="hash", operator_chat="-1001")
    assert plan.operator_ids == (7, 8) and plan.x_credentials.bearer_token == "bearer" and plan.ai_key == "ai-key"


def test_sandbox_settings_leave_telegram_to_the_sandbox(tmp_path: Path) -> None:
    plan = plan_for(load_settings(ReplyGuySettings, {"DATA_DIR": str(tmp_path)}))

    assert plan.sandbox and plan.telegram is None and plan.x_base is None and plan.ai_base is None


def test_a_live_plan_missing_a_credential_names_it(tmp_path: Path) -> None:
    settings = dataclasses.replace(live_settings(tmp_path), telegram_api_hash=None)

    with pytest.raises(ConfigError, match="TELEGRAM_API_HASH"):
        plan_for(settings)
