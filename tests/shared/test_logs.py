"""Tests for shared/logs.py: JSON/text logging, idempotent setup, redaction of secrets."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
from collections.abc import Iterator

import pytest

from shared.logs import REDACTED, RedactingFilter, redact, redact_obj, register_secret, setup_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    """Put the root logger back the way the test found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def _lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def _fresh_secret() -> str:
    return f"s3cr3t-{secrets.token_hex(12)}"


def test_json_format_writes_one_object_per_line_with_time_level_logger_message_and_extras(restore_root: None) -> None:
    stream = io.StringIO()
    setup_logging(level="INFO", fmt="json", stream=stream)
    log = logging.getLogger("tests.logs.json")
    log.info("hello %s", "world", extra={"account": "main", "attempt": 3})
    log.warning("second line\nwith a newline")

    lines = _lines(stream)
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "hello world"
    assert first["level"] == "INFO"
    assert first["logger"] == "tests.logs.json"
    assert first["account"] == "main" and first["attempt"] == 3
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["message"] == "second line\nwith a newline"
    assert second["level"] == "WARNING"


def test_extra_field_named_like_a_json_key_does_not_overwrite_it(restore_root: None) -> None:
    stream = io.StringIO()
    setup_logging(fmt="json", stream=stream)
    logging.getLogger("tests.logs.clash").info("msg", extra={"level": "custom", "time": "x"})
    record = json.loads(_lines(stream)[0])
    assert record["level"] == "INFO"
    assert record["extra_level"] == "custom" and record["extra_time"] == "x"


def test_exception_text_is_included_and_secrets_in_it_are_redacted(restore_root: None) -> None:
    secret = _fresh_secret()
    register_secret(secret)
    stream = io.StringIO()
    setup_logging(fmt="json", stream=stream)
    try:
        raise RuntimeError(f"connect failed with password {secret} to postgres://bot:hunter2pass@db:5432/x")
    except RuntimeError:
        logging.getLogger("tests.logs.exc").exception("boom for %s", secret)

    output = stream.getvalue()
    assert secret not in output
    assert "hunter2pass" not in output
    record = json.loads(_lines(stream)[0])
    assert record["message"] == f"boom for {REDACTED}"
    assert "RuntimeError" in record["exc_info"] and "Traceback" in record["exc_info"]


def test_registered_secret_is_redacted_from_message_args_and_extra_fields(restore_root: None) -> None:
    secret = _fresh_secret()
    register_secret(secret)
    stream = io.StringIO()
    setup_logging(fmt="text", stream=stream)
    log = logging.getLogger("tests.logs.text")
    log.warning(f"literal {secret}")
    log.warning("arg %s", secret)
    log.warning("extra", extra={"config": {"key": secret, "list": [secret]}, "plain": secret})

    output = stream.getvalue()
    assert secret not in output
    assert output.count(REDACTED) >= 5


def test_text_format_has_time_level_logger_message_and_extras(restore_root: None) -> None:
    stream = io.StringIO()
    setup_logging(fmt="text", stream=stream)
    logging.getLogger("tests.logs.plain").error("it broke", extra={"loop": "sender"})
    line = _lines(stream)[0]
    assert " ERROR tests.logs.plain: it broke" in line
    assert "loop=sender" in line


def test_setup_logging_twice_keeps_one_handler_and_applies_the_new_level(restore_root: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(level="DEBUG", fmt="text", stream=first)
    setup_logging(level="WARNING", fmt="json", stream=second)
    log = logging.getLogger("tests.logs.idem")
    log.info("hidden")
    log.warning("shown")

    assert first.getvalue() == ""
    lines = _lines(second)
    assert len(lines) == 1 and json.loads(lines[0])["message"] == "shown"
    ours = [h for h in logging.getLogger().handlers if any(isinstance(f, RedactingFilter) for f in h.filters)]
    assert len(ours) == 1


def test_unknown_level_or_format_raises_value_error(restore_root: None) -> None:
    with pytest.raises(ValueError, match="log level"):
        setup_logging(level="LOUD")
    with pytest.raises(ValueError, match="log format"):
        setup_logging(fmt="xml")


_SESSION = "1" + base64.urlsafe_b64encode(bytes(range(256)) + b"\x7f\x00\x00\x01\x01\xbb\x02").decode()


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("token 123456789:AAHfiqksKZ8WmR2zSjiQ7_v4TMAKdiHm9T0 here", "AAHfiqksKZ8WmR2zSjiQ7_v4TMAKdiHm9T0"),
        ("POST https://api.telegram.org/bot123456789:AAHfiqksKZ8WmR2zSjiQ7_v4TMAKdiHm9T0/sendMessage", "AAHfiqksKZ8WmR2zSjiQ7"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc.def", "eyJhbGciOiJIUzI1NiJ9"),
        ("dsn postgres://bot:S0me-Pass_word@db.example:5432/postgres", "S0me-Pass_word"),
        ("postgresql+asyncpg://user:pw123456@host/db", "pw123456"),
        (f"session={_SESSION}", _SESSION[:60]),
        (f"loaded {_SESSION} ok", _SESSION[100:160]),
        ("openai sk-proj-abcdefghijklmnopqrstuv123", "abcdefghijklmnopqrstuv"),
        ("aws AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY end", "wJalrXUtnFEMI"),
        ("GET /status?token=abcdef123456&x=1", "abcdef123456"),
        ('{"api_key": "k-998877665544"}', "998877665544"),
    ],
)
def test_known_secret_patterns_are_redacted(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert REDACTED in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call +15551234567 now", "call +*********67 now"),
        ("uk +44 20 7946 0958", "uk +** ** **** **58"),
    ],
)
def test_phone_numbers_keep_only_the_last_two_digits(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "message 12345678 in chat -1001234567890 sent at 2025-01-01T12:00:00+00:00",
        "commit 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12",
        "uuid 123e4567-e89b-12d3-a456-426614174000, value 1.7e+09",
        "http://127.0.0.1:8080/path@anchor",
        "retry in 30s (attempt 2/5)",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_obj_recurses_and_hides_values_under_secret_keys() -> None:
    secret = _fresh_secret()
    register_secret(secret)
    data = {
        "loops": [{"name": "sender", "error": f"failed with {secret}"}],
        "db": ("postgres://u:pw-abcdef@h/db",),
        "alert_bot_token": "not-obviously-secret",
        "token_required": True,
        "count": 3,
        "nothing": None,
    }
    out = redact_obj(data)
    text = json.dumps(out)
    assert secret not in text and "pw-abcdef" not in text and "not-obviously-secret" not in text
    assert out["token_required"] is True and out["count"] == 3 and out["nothing"] is None
    assert out["loops"][0]["name"] == "sender"
    assert data["loops"][0]["error"].endswith(secret)  # input untouched


def test_short_or_empty_secrets_are_ignored() -> None:
    register_secret("")
    register_secret(None)
    register_secret("ab")
    assert redact("ab abc") == "ab abc"
