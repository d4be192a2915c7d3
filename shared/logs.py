"""Logging setup and secret redaction for every bot.

`setup_logging` configures the root logger once per process (text for people,
JSON lines for Railway), and installs a filter that scrubs secrets from every
record that reaches our handler: the message, its arguments, `extra=` fields,
exception text and stack text. `redact` and `redact_obj` are the same scrubbing
for code that builds responses or alert texts itself (the status server runs
every JSON body through `redact_obj`).

What counts as a secret:

* exact values registered with `register_secret` (tokens, keys, session
  strings, database passwords), replaced by ``[REDACTED]``;
* patterns: Telegram bot tokens, ``Bearer ...`` credentials, passwords in
  URLs (``postgres://user:pass@host``), Telethon StringSession strings,
  ``sk-...`` API keys, AWS access key ids and AWS-like secret keys,
  ``password=`` / ``token=`` style assignments, and phone numbers written with
  a leading ``+`` (only the last two digits are kept).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import IO, Any

from shared import tracing

logger = logging.getLogger(__name__)

REDACTED = "[REDACTED]"

# Registered secrets shorter than this are ignored: replacing "abc" everywhere
# would mangle ordinary text and hide nothing worth hiding.
MIN_SECRET_LENGTH = 4

_FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS: frozenset[str] = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}

# JSON keys the formatter writes itself; an `extra=` field with one of these
# names is written as "extra_<name>" instead of overwriting it.
_RESERVED_JSON_KEYS = frozenset({"time", "level", "logger", "message", "exc_info", "stack_info"})

_HANDLER_MARK = "_shared_logs_handler"


# --------------------------------------------------------------------------- patterns

def _mask_phone(match: re.Match[str]) -> str:
    text = match.group(0)
    total = sum(ch.isdigit() for ch in text)
    seen = 0
    out: list[str] = []
    for ch in text:
        if ch.isdigit():
            seen += 1
            out.append(ch if seen > total - 2 else "*")
        else:
            out.append(ch)
    return "".join(out)


def mask_phone(phone: str) -> str:
    """A phone number as every output shows it: the last two digits only (``+*********67``).

    The log redaction masks numbers found in text the same way.
    """
    text = phone if phone.startswith("+") or not phone[:1].isdigit() else f"+{phone}"
    return _mask_phone(re.match(r".*", text, flags=re.DOTALL))  # type: ignore[arg-type]


_B64URL = r"A-Za-z0-9_\-"

# (pattern, replacement) applied in order, after the registered secrets.
_PATTERNS: tuple[tuple[re.Pattern[str], Any], ...] = (
    # Telethon StringSession: version "1" + urlsafe base64 of ip, port, dc, 256-byte auth key.
    (re.compile(rf"(?<![{_B64URL}])1[{_B64URL}]{{300,}}={{0,2}}"), REDACTED),
    # Telegram bot token, also inside ".../bot<token>/sendMessage".
    (re.compile(r"(?<!\d)\d{6,12}:[A-Za-z0-9_-]{30,}"), REDACTED),
    # Authorization: Bearer <credential>
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\g<1>{REDACTED}"),
    # Passwords in URLs: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*:)([^\s@/]+)(@)"), rf"\g<1>{REDACTED}\g<3>"),
    # OpenAI-style API keys.
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),
    # AWS access key ids.
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    # AWS-like secret keys: 40 chars of base64 with upper, lower and a digit or / +
    # (a lower-case hex SHA-1 does not qualify).
    (
        re.compile(
            r"(?<![A-Za-z0-9/+=])"
            r"(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])(?=[A-Za-z0-9/+]{0,39}[0-9/+])"
            r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
        ),
        REDACTED,
    ),
    # key=value / key: value assignments of obviously secret things (query strings, dumps).
    (
        re.compile(
            r"(?i)\b((?:password|passwd|pwd|secret|client_secret|token|access_token|refresh_token|"
            r"bot_token|api_key|apikey|api_hash|service_role_key|session_string|string_session|"
            r"secret_access_key|aws_secret_access_key)"
            r"[\"']?\s*[:=]\s*[\"']?)([^\s\"'&,;}]+)"
        ),
        rf"\g<1>{REDACTED}",
    ),
    # Phone numbers written with a leading "+": keep the last two digits.
    (re.compile(r"(?<![\w+])\+\d(?:[ .()\-]{0,2}\d){6,14}(?!\d)"), _mask_phone),
)

# Keys whose values redact_obj hides entirely, whatever they look like.
_SECRET_KEY_RE = re.compile(
    r"(?i)(password|passwd|secret|token|api_key|apikey|api_hash|authorization|session_string|"
    r"string_session|service_role_key|private_key|credential)"
)


# --------------------------------------------------------------------------- secrets

_secrets_lock = threading.Lock()
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Remember an exact value that must never appear in logs or responses.

    Call it for every token, key, session string and password the process
    loads. Empty values and values shorter than `MIN_SECRET_LENGTH` are
    ignored. Safe to call from any thread, any number of times.

    Args:
        value: The secret; None is accepted and ignored.
    """
    global _secrets_re
    if not value:
        return
    value = str(value).strip()
    if len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value in _secrets:
            return
        _secrets.add(value)
        ordered = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(re.escape(s) for s in ordered))


def redact(text: str) -> str:
    """Return `text` with registered secrets and known secret patterns hidden.

    Args:
        text: Any text; non-strings are converted with `str` first.

    Returns:
        The scrubbed text. Never raises for ordinary input.
    """
    if not isinstance(text, str):
        text = str(text)
    if not text:
        return text
    secrets_re = _secrets_re
    if secrets_re is not None:
        text = secrets_re.sub(REDACTED, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_obj(obj: Any) -> Any:
    """Redact every string inside dicts, lists, tuples and sets, recursively.

    Values under keys that name a secret (``token``, ``password``,
    ``api_key`` ...) are replaced entirely unless they are empty, numbers or
    booleans. Enums become their value. Other objects are returned unchanged
    (serialise them with `redact(str(obj))`).

    Args:
        obj: A JSON-like structure.

    Returns:
        A new structure; the input is not modified.
    """
    return _redact_obj(obj, depth=0)


def _redact_obj(obj: Any, *, depth: int) -> Any:
    if depth > 50:
        return REDACTED
    if isinstance(obj, Enum):
        obj = obj.value
    if isinstance(obj, str):
        return redact(obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            new_key = redact(key) if isinstance(key, str) else key
            if (
                isinstance(key, str)
                and _SECRET_KEY_RE.search(key)
                and value not in (None, "")
                and not isinstance(value, (bool, int, float, Mapping, list, tuple))
            ):
                out[new_key] = REDACTED
            else:
                out[new_key] = _redact_obj(value, depth=depth + 1)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_redact_obj(item, depth=depth + 1) for item in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj


# --------------------------------------------------------------------------- filter and formatters

class RedactingFilter(logging.Filter):
    """Scrubs a record in place: message (with args merged), extras, exception and stack text.

    Attached to the handler `setup_logging` installs; attach it to any other
    handler that must be safe too. Always returns True (it never drops records).
    """

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging API name
        try:
            try:
                message = record.getMessage()
            except Exception:  # a bad format string must not hide the record
                message = f"{record.msg!s} {record.args!r}"
            record.msg = redact(message)
            record.args = None
            for key, value in list(vars(record).items()):
                if key not in _STANDARD_ATTRS:
                    setattr(record, key, redact_obj(value) if not isinstance(value, str) else redact(value))
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
            if record.stack_info:
                record.stack_info = redact(record.stack_info)
        except Exception:  # pragma: no cover - a filter must never break logging
            record.msg = "[log record could not be redacted]"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


def _iso_utc(created: float) -> str:
    stamp = dt.datetime.fromtimestamp(created, tz=dt.timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601 UTC), level, logger, message, extras, exc_info."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: A003 - logging API name
        payload: dict[str, Any] = {
            "time": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            payload[f"extra_{key}" if key in _RESERVED_JSON_KEYS else key] = value
        payload.update(tracing.current_ids())  # inside a span: the ids a trace search needs
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            payload["exc_info"] = record.exc_text
        if record.stack_info:
            payload["stack_info"] = record.stack_info
        try:
            return json.dumps(payload, ensure_ascii=False, default=_json_default)
        except (TypeError, ValueError):
            payload = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)) for k, v in payload.items()}
            return json.dumps(payload, ensure_ascii=False, default=str)


def _json_default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    return redact(str(value))


class TextFormatter(logging.Formatter):
    """``2025-01-01T12:00:00.000Z INFO name: message key=value ...`` plus the traceback."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: A003 - logging API name
        line = f"{_iso_utc(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_short(v)}" for k, v in extras.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=_json_default, ensure_ascii=False)
    return json.dumps(text, ensure_ascii=False) if (" " in text or not text) else text


# --------------------------------------------------------------------------- setup

def _parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    name = str(level).strip().upper()
    if name.isdigit():
        return int(name)
    value = logging.getLevelName(name)
    if name == "WARN":
        return logging.WARNING
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r} (use DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    return value


def setup_logging(*, level: str | int = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Configure the root logger: one handler, the chosen format, redaction on.

    Idempotent: calling it again replaces the handler it installed before
    (handlers installed by others, e.g. pytest's, are left alone).

    Args:
        level: LOG_LEVEL name (DEBUG, INFO, WARNING, ERROR, CRITICAL) or number.
        fmt: LOG_FORMAT, "text" or "json".
        stream: Where to write; standard output when None.

    Raises:
        ValueError: Unknown level or format.
    """
    numeric = _parse_level(level)
    fmt = str(fmt).strip().lower()
    if fmt not in _FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (use 'text' or 'json')")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        try:
            old.flush()
        except Exception:  # pragma: no cover - a closed stream
            pass
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)


def register_secrets(values: Iterable[str | None]) -> None:
    """Register several secrets at once (see `register_secret`)."""
    for value in values:
        register_secret(value)
