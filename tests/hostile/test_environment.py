"""Hostile environment values: each is refused at start with exit 2 and one line naming the variable.

Common settings go through ``python -m shared.config check``; worker-only
settings through ``python worker.py`` itself. Both run in a scratch directory
(no ``.env`` is read) with only the variables of the case set.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.config import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
SETTING_NAMES = {s.name for s in SETTINGS}
SECRETS = {s.name for s in SETTINGS if s.secret}


@dataclass
class Exit:
    code: int | None
    stdout: str
    stderr: str


def clean_env(tmp_path: Path, values: dict[str, str]) -> dict[str, str]:
    """The process environment without any of our settings, plus the case's values."""
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env.update({"DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT), **values})
    return env


async def run(args: list[str], env: dict[str, str], cwd: Path, *, timeout: float = 30.0) -> Exit:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        return Exit(None, out.decode(errors="replace"), err.decode(errors="replace"))
    return Exit(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def assert_one_line_naming(result: Exit, name: str, value: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.code == 2, f"exit {result.code}\n{result.stderr[-2000:]}"
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr[-2000:]}"
    assert lines[0].startswith("CONFIG ERROR:") and name in lines[0], lines[0]
    if name in SECRETS and len(value.strip()) > 3:
        assert value.strip() not in lines[0], "a secret's value is never echoed"


COMMON: list[tuple[str, str]] = [
    ("TIMEOUT_DB", "abc"),
    ("TIMEOUT_DB", "-1"),
    ("TIMEOUT_DB", "0"),
    ("TIMEOUT_DB", "nan"),
    ("TIMEOUT_DB", "inf"),
    ("TIMEOUT_DB", "1e999"),
    ("TIMEOUT_TELEGRAM_SEND", "30s"),
    ("PORT", "70000"),
    ("PORT", "-5"),
    ("PORT", "80.5"),
    ("PORT", "0x50"),
    ("MAX_MESSAGE_RETRIES", "-1"),
    ("MAX_MESSAGE_RETRIES", "1.5"),
    ("RETRY_BASE_DELAY", "-0.1"),
    ("RETRY_QUEUE_CAPACITY", "0"),
    ("SHUTDOWN_GRACE", "soon"),
    ("ALERT_DEDUPE_WINDOW", "-600"),
    ("DATABASE_URL", "not a url"),
    ("DATABASE_URL", "http://db.example.com/app"),
    ("DATABASE_URL", "mysql://user:hunter2@db/app"),
    ("SUPABASE_URL", "ftp://project.supabase.co"),
    ("SUPABASE_URL", "https://"),
    ("ALERT_API_BASE", "javascript:alert(1)"),
    ("ALERT_API_BASE", "api.telegram.org"),
    ("LOG_LEVEL", "LOUD"),
    ("LOG_FORMAT", "xml"),
    ("DB_AUTO_MIGRATE", "maybe"),
]


@pytest.mark.parametrize(("name", "value"), COMMON, ids=[f"{n}={v}" for n, v in COMMON])
async def test_a_bad_common_value_is_refused_by_config_check_in_one_line(tmp_path: Path, name: str, value: str) -> None:
    result = await run(["-m", "shared.config", "check"], clean_env(tmp_path, {name: value}), tmp_path)
    assert_one_line_naming(result, name, value)


async def test_config_check_accepts_the_defaults(tmp_path: Path) -> None:
    result = await run(["-m", "shared.config", "check"], clean_env(tmp_path, {}), tmp_path)
    assert result.code == 0 and "configuration OK" in result.stdout, result.stderr


WORKER: list[tuple[str, str, dict[str, str]]] = [
    ("TELEGRAM_API_ID", "abc", {}),
    ("TELEGRAM_API_ID", "-7", {}),
    ("TELEGRAM_API_HASH", "", {"TELEGRAM_API_ID": "12345"}),  # one of the pair set: name the missing one
    ("SESSION_ENCRYPTION_KEY", "", {"TELEGRAM_API_ID": "12345", "TELEGRAM_API_HASH": "abcdef"}),
    ("SEND_RATE_PER_CHAT", "0", {}),
    ("OUTBOUND_BATCH_SIZE", "100000", {}),
    ("ACCOUNT_LEASE_SECONDS", "0.5", {}),
    ("HISTORY_PAGE_SIZE", "1000", {}),
]


@pytest.mark.parametrize(("name", "value", "extra"), WORKER, ids=[f"{n}={v or '(unset)'}" for n, v, _ in WORKER])
async def test_a_bad_worker_value_stops_worker_py_with_exit_2_and_one_line(
    tmp_path: Path, name: str, value: str, extra: dict[str, str]
) -> None:
    values = {**extra, **({name: value} if value else {})}
    result = await run([str(ROOT / "worker.py")], clean_env(tmp_path, values), tmp_path)
    assert_one_line_naming(result, name, value)


async def test_a_malformed_session_key_stops_worker_py_with_exit_2_and_one_line(tmp_path: Path) -> None:
    values = {"SESSION_ENCRYPTION_KEY": "not-a-fernet-key", "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}
    result = await run([str(ROOT / "worker.py")], clean_env(tmp_path, values), tmp_path)
    assert_one_line_naming(result, "SESSION_ENCRYPTION_KEY", "not-a-fernet-key")


# --- sandbox mode is chosen explicitly once a database is configured ----------


@pytest.mark.parametrize("bot", ["worker.py", "ingest.py", "bot.py"])
@pytest.mark.parametrize("database", ["DATABASE_URL", "SUPABASE_URL"])
async def test_a_bot_with_a_database_but_no_telegram_credentials_refuses_to_run_the_sandbox_on_it(
    tmp_path: Path, bot: str, database: str
) -> None:
    values = {
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
        "SUPABASE_URL": "https://project.supabase.co",
    }
    env = {database: values[database]}
    if database == "SUPABASE_URL":
        env["SUPABASE_SERVICE_ROLE_KEY"] = "service-role-key"
    result = await run([str(ROOT / bot)], clean_env(tmp_path, env), tmp_path)
    assert_one_line_naming(result, "TELEGRAM_API_ID", "")
    line = result.stderr.strip()
    assert "SANDBOX=1" in line and database in line and "Traceback" not in result.stderr + result.stdout


async def test_sandbox_1_with_real_credentials_is_a_contradiction_named_in_one_line(tmp_path: Path) -> None:
    values = {"SANDBOX": "1", "TELEGRAM_API_ID": "12345", "TELEGRAM_API_HASH": "0123456789abcdef0123456789abcdef",
              "SESSION_ENCRYPTION_KEY": "5u7t8mUrTaRdjhwtm6HCJsq6GRoZmNBV2A_mWTw56gM="}
    result = await run([str(ROOT / "worker.py")], clean_env(tmp_path, values), tmp_path)
    assert_one_line_naming(result, "SANDBOX", "1")
