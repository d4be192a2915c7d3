"""Tests for shared/config.py: defaults, bad values named, the check CLI, .env, secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import (
    BY_NAME,
    SETTINGS,
    CommonSettings,
    ConfigError,
    load_or_exit,
    load_settings,
    parse_setting,
    read_environment,
)

ROOT = Path(__file__).resolve().parents[2]


def clean_environ(**overrides: str) -> dict[str, str]:
    """The current environment without any of our settings, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in BY_NAME}
    env.update(overrides)
    return env


def run_config(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "shared.config", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


# --- defaults ---------------------------------------------------------------------

DEFAULTS = {
    "TIMEOUT_TELEGRAM_SEND": 30,
    "TIMEOUT_TELEGRAM_ENTITY": 15,
    "TIMEOUT_TELEGRAM_MEDIA": 60,
    "TIMEOUT_DB": 10,
    "TIMEOUT_LOOP_CYCLE": 120,
    "WATCHDOG_MAX_SILENCE": 60,
    "WATCHDOG_CHECK_INTERVAL": 10,
    "HEARTBEAT_INTERVAL": 15,
    "MAX_MESSAGE_RETRIES": 5,
    "RETRY_BASE_DELAY": 60,
    "RETRY_QUEUE_CAPACITY": 1000,
    "MAX_IMAGE_SIZE_BYTES": 52428800,
    "MAX_IMAGE_DIMENSION": 8192,
    "PORT": None,  # unset: each bot's own default port (worker 8080, ingest 8081, bot 8082)
    "DATA_DIR": Path("./.data"),
}


@pytest.mark.parametrize(("name", "expected"), DEFAULTS.items(), ids=list(DEFAULTS))
def test_defaults_match_the_issue(name: str, expected: object) -> None:
    assert parse_setting(BY_NAME[name], {}) == expected


def test_common_settings_load_from_an_empty_environment_with_those_defaults() -> None:
    settings = load_settings(CommonSettings, {})
    for name, expected in DEFAULTS.items():
        field = name.lower()
        if hasattr(settings, field) and expected is not None:
            assert getattr(settings, field) == expected, name
    assert settings.port == 8080, "PORT unset: the worker's port for settings of no particular bot"
    assert settings.database_url is None and settings.supabase_key is None
    assert settings.log_format == "text" and settings.log_level == "INFO"
    assert settings.alert_api_base == "https://api.telegram.org"
    assert settings.db_auto_migrate is False


def test_blank_values_mean_the_default() -> None:
    settings = load_settings(CommonSettings, {"TIMEOUT_DB": "  ", "PORT": "", "DATABASE_URL": ""})
    assert (settings.timeout_db, settings.port, settings.database_url) == (10, 8080, None)


def test_values_are_parsed_into_their_types() -> None:
    settings = load_settings(CommonSettings, {
        "TIMEOUT_DB": "2.5", "PORT": " 9000 ", "RETRY_QUEUE_CAPACITY": "1_000", "DB_AUTO_MIGRATE": "yes",
        "LOG_FORMAT": "JSON", "LOG_LEVEL": "debug", "DATA_DIR": "/tmp/bots",
    })
    assert settings.timeout_db == 2.5
    assert settings.port == 9000
    assert settings.retry_queue_capacity == 1000
    assert settings.db_auto_migrate is True
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
    assert settings.data_dir == Path("/tmp/bots")


def test_every_variable_is_declared_once() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    for setting in SETTINGS:
        assert setting.help and setting.expected, setting.name


# --- wrong values ----------------------------------------------------------------------

WRONG = [
    ("TIMEOUT_TELEGRAM_SEND", "thirty"),
    ("TIMEOUT_TELEGRAM_SEND", "-1"),
    ("TIMEOUT_TELEGRAM_SEND", "0"),
    ("TIMEOUT_DB", "nan"),
    ("TIMEOUT_DB", "inf"),
    ("TIMEOUT_LOOP_CYCLE", "10s"),
    ("WATCHDOG_MAX_SILENCE", "-5"),
    ("MAX_MESSAGE_RETRIES", "-1"),
    ("MAX_MESSAGE_RETRIES", "2.5"),
    ("RETRY_BASE_DELAY", "NaN"),
    ("RETRY_QUEUE_CAPACITY", "0"),
    ("PORT", "70000"),
    ("PORT", "http"),
    ("ALERT_API_BASE", "not a url"),
    ("ALERT_API_BASE", "ftp://api.telegram.org"),
    ("ALERT_API_BASE", "https://"),
    ("SUPABASE_URL", "project.supabase.co"),
    ("DATABASE_URL", "mysql://user:pw@127.0.0.1/db"),
    ("LOG_FORMAT", "xml"),
    ("LOG_LEVEL", "LOUD"),
    ("DB_AUTO_MIGRATE", "maybe"),
]


@pytest.mark.parametrize(("name", "raw"), WRONG, ids=[f"{n}={v}" for n, v in WRONG])
def test_a_wrong_value_raises_config_error_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(CommonSettings, {name: raw})
    assert caught.value.variable == name
    assert str(caught.value).startswith(f"{name} must be {BY_NAME[name].expected}")


def test_the_error_shows_the_bad_value_but_never_a_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(CommonSettings, {"TIMEOUT_DB": "abc"})
    assert "'abc'" in str(caught.value)

    with pytest.raises(ConfigError) as caught:
        load_settings(CommonSettings, {"DATABASE_URL": "mysql://bot:hunter2@127.0.0.1/db"})
    assert caught.value.variable == "DATABASE_URL"
    assert "hunter2" not in str(caught.value)


def test_load_or_exit_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_or_exit(CommonSettings, {"PORT": "-3"})
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PORT" in err


def test_check_cli_with_a_wrong_environment_value_exits_2_with_one_line_naming_it() -> None:
    result = run_config("check", cwd=ROOT, env=clean_environ(TIMEOUT_DB="abc"))
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "TIMEOUT_DB" in lines[0] and "'abc'" in lines[0]
    assert result.stdout == ""


def test_check_cli_accepts_a_good_environment() -> None:
    result = run_config("check", cwd=ROOT, env=clean_environ(TIMEOUT_DB="3"))
    assert (result.returncode, result.stdout.strip()) == (0, "configuration OK"), result


# --- .env -----------------------------------------------------------------------------------


def test_dotenv_values_are_read_and_the_real_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("TIMEOUT_DB=3\nTIMEOUT_TELEGRAM_SEND=12\n# a comment\nLOG_FORMAT=json\n", encoding="utf-8")
    for name in BY_NAME:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TIMEOUT_DB", "7")
    settings = load_settings(CommonSettings, read_environment(dotenv_path=dotenv))
    assert settings.timeout_db == 7, "the real environment wins"
    assert settings.timeout_telegram_send == 12, ".env fills in the rest"
    assert settings.log_format == "json"


def test_check_cli_reads_dotenv_from_its_working_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TIMEOUT_TELEGRAM_MEDIA=abc\n", encoding="utf-8")
    bad = run_config("check", cwd=tmp_path, env=clean_environ())
    assert bad.returncode == 2 and "TIMEOUT_TELEGRAM_MEDIA" in bad.stderr, bad
    fixed = run_config("check", cwd=tmp_path, env=clean_environ(TIMEOUT_TELEGRAM_MEDIA="45"))
    assert fixed.returncode == 0, fixed


def test_a_missing_dotenv_file_is_fine(tmp_path: Path) -> None:
    env = read_environment(dotenv_path=tmp_path / "absent.env")
    assert env == dict(os.environ)


# --- secrets -------------------------------------------------------------------------------


def test_secrets_include_tokens_the_database_url_and_its_password() -> None:
    settings = load_settings(CommonSettings, {
        "DATABASE_URL": "postgresql://bot:s3cr3t-pw@127.0.0.1:5432/bots",
        "STATUS_TOKEN": "status-token-1",
        "ALERT_BOT_TOKEN": "123:alert-token",
        "SUPABASE_SERVICE_ROLE_KEY": "service-role-key",
        "ALERT_CHAT_ID": "-1001",
    })
    secrets = settings.secrets()
    assert "s3cr3t-pw" in secrets
    assert "postgresql://bot:s3cr3t-pw@127.0.0.1:5432/bots" in secrets
    assert {"status-token-1", "123:alert-token", "service-role-key"} <= set(secrets)
    assert "-1001" not in secrets, "a chat id is not a secret"


def test_secrets_include_a_percent_encoded_password_in_both_forms() -> None:
    settings = load_settings(CommonSettings, {"DATABASE_URL": "postgresql://bot:p%40ss%2Fword@127.0.0.1/bots"})
    assert {"p%40ss%2Fword", "p@ss/word"} <= set(settings.secrets())


def test_no_secrets_when_none_are_configured() -> None:
    assert load_settings(CommonSettings, {}).secrets() == []


def test_settings_are_frozen() -> None:
    settings = load_settings(CommonSettings, {})
    with pytest.raises(AttributeError):
        settings.timeout_db = 1.0  # type: ignore[misc]
