"""Configuration: every environment variable declared once, parsed into typed settings.

Each variable is a :class:`Setting` in :data:`SETTINGS` with its parser, its
default, the form it expects and a comment. The settings classes are frozen
dataclasses whose field names are the lower-cased variable names, so one
declaration serves the code, ``.env.example`` and the README table
(``python -m shared.config env-example`` / ``markdown`` print them, and a
test checks both files against this registry).

A wrong or missing value raises :class:`ConfigError` naming the variable and
the expected form; :func:`load_or_exit` turns that into one line on stderr
and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from dotenv import dotenv_values


class ConfigError(ValueError):
    """A setting is missing or malformed."""

    def __init__(self, variable: str, expected: str, got: str | None, *, secret: bool = False) -> None:
        self.variable = variable
        self.expected = expected
        self.got = None if secret else got
        if got is None:
            shown = "nothing"
        elif secret:
            shown = "a value not shown here (it is a secret)"
        else:
            shown = repr(got if len(got) <= 60 else got[:57] + "...")
        super().__init__(f"{variable} must be {expected}, got {shown}")


# --- parsers: str -> value, raising ValueError with no message needed ---------


def _float(minimum: float | None = None, *, exclusive: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError
        if minimum is not None and (value < minimum or (exclusive and value == minimum)):
            raise ValueError
        return value

    return parse


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip().replace("_", ""))
        if minimum is not None and value < minimum:
            raise ValueError
        if maximum is not None and value > maximum:
            raise ValueError
        return value

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError
        return value

    return parse


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError
    return value


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        parsed = urlparse(value)
        if parsed.scheme not in schemes or not (parsed.hostname or parsed.path):
            raise ValueError
        if parsed.scheme.startswith("http") and not parsed.hostname:
            raise ValueError
        return value

    return parse


def _path(raw: str) -> Path:
    value = raw.strip()
    if not value:
        raise ValueError
    return Path(value).expanduser()


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError
    return value


# --- the registry -----------------------------------------------------------

ALL = frozenset({"worker", "ingest", "bot"})
PROCESS = ALL | {"supervisor"}
SUPERVISOR = frozenset({"supervisor"})


@dataclass(frozen=True)
class Setting:
    """One environment variable."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    expected: str
    help: str
    bots: frozenset[str] = ALL
    secret: bool = False
    required: bool = False

    @property
    def field(self) -> str:
        return self.name.lower()

    def default_text(self) -> str:
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "1" if self.default else "0"
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return str(self.default)


SETTINGS: list[Setting] = [
    # Timeouts (seed 004)
    Setting("TIMEOUT_TELEGRAM_SEND", _float(0, exclusive=True), 30.0, "a number of seconds > 0", "Deadline of one Telegram send."),
    Setting("TIMEOUT_TELEGRAM_ENTITY", _float(0, exclusive=True), 15.0, "a number of seconds > 0", "Deadline of resolving a chat or user."),
    Setting("TIMEOUT_TELEGRAM_MEDIA", _float(0, exclusive=True), 60.0, "a number of seconds > 0", "Deadline of one media upload or download."),
    Setting("TIMEOUT_DB", _float(0, exclusive=True), 10.0, "a number of seconds > 0", "Deadline of one database call."),
    Setting("TIMEOUT_LOOP_CYCLE", _float(0, exclusive=True), 120.0, "a number of seconds > 0", "Longest one cycle of any loop may run."),
    # Watchdog and heartbeat
    Setting("WATCHDOG_MAX_SILENCE", _float(0, exclusive=True), 60.0, "a number of seconds > 0", "A loop silent this long is restarted."),
    Setting("WATCHDOG_CHECK_INTERVAL", _float(0, exclusive=True), 10.0, "a number of seconds > 0", "How often the watchdog checks the loops."),
    Setting("WATCHDOG_STARTUP_GRACE", _float(0), 30.0, "a number of seconds >= 0", "Extra silence allowed to a loop right after it starts."),
    Setting("WATCHDOG_STORM_RESTARTS", _int(1), 5, "a whole number >= 1", "Restarts of one loop within WATCHDOG_STORM_WINDOW that mark it failing and alert."),
    Setting("WATCHDOG_STORM_WINDOW", _float(0, exclusive=True), 600.0, "a number of seconds > 0", "Window for counting a loop's restarts."),
    Setting("HEARTBEAT_INTERVAL", _float(0, exclusive=True), 15.0, "a number of seconds > 0", "How often the global heartbeat is written."),
    # Retries
    Setting("MAX_MESSAGE_RETRIES", _int(0), 5, "a whole number >= 0", "Retries of a failed item before it is dead."),
    Setting("RETRY_BASE_DELAY", _float(0), 60.0, "a number of seconds >= 0", "First retry delay; it doubles on each retry."),
    Setting("RETRY_QUEUE_CAPACITY", _int(1), 1000, "a whole number >= 1", "Items the retry queue keeps in memory; more spill to the durable store."),
    # Images (ingest)
    Setting("MAX_IMAGE_SIZE_BYTES", _int(1), 52428800, "a whole number of bytes >= 1", "Larger media is skipped before download.", frozenset({"ingest"})),
    Setting("MAX_IMAGE_DIMENSION", _int(16), 8192, "a whole number of pixels >= 16", "Longest side kept; larger images are downscaled or skipped.", frozenset({"ingest"})),
    # Process and server
    Setting("PORT", _int(0, 65535), 8080, "a port number 0-65535", "Port of the status server (Railway sets it).", PROCESS),
    Setting("DATA_DIR", _path, Path("./.data"), "a directory path", "Local state: embedded PostgreSQL, sandbox world, spill files."),
    Setting("SANDBOX_DIR", _path, None, "a directory path", "Telegram sandbox world (default <DATA_DIR>/sandbox), used when no Telegram credentials are set."),
    Setting("SHUTDOWN_GRACE", _float(0), 30.0, "a number of seconds >= 0", "Time in-flight work gets to finish after SIGTERM.", PROCESS),
    Setting("STATUS_TOKEN", _text, None, "a non-empty token", "When set, /status, /metrics and / require it (Bearer or ?token=).", secret=True),
    Setting("LOG_LEVEL", _log_level, "INFO", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL", "Log verbosity.", PROCESS),
    Setting("LOG_FORMAT", _choice("text", "json"), "text", "text or json", "json writes one JSON object per line (Railway).", PROCESS),
    # Alerts
    Setting("ALERT_BOT_TOKEN", _text, None, "a Telegram bot token", "Bot that sends operator alerts; without it alerts are only logged.", PROCESS, secret=True),
    Setting("ALERT_CHAT_ID", _text, None, "a Telegram chat id", "Chat that receives operator alerts.", PROCESS),
    Setting("ALERT_API_BASE", _url("http", "https"), "https://api.telegram.org", "an http(s) URL", "Bot API base URL for alerts.", PROCESS),
    Setting("ALERT_DEDUPE_WINDOW", _float(0), 600.0, "a number of seconds >= 0", "The same alert is sent at most once per window.", PROCESS),
    # Database
    Setting("DATABASE_URL", _url("postgres", "postgresql"), None, "a postgresql:// URL", "PostgreSQL (Supabase: session pooler or direct for NOTIFY).", secret=True),
    Setting("SUPABASE_URL", _url("http", "https"), None, "an https:// URL", "Supabase project URL, used over HTTP when DATABASE_URL is not set."),
    Setting("SUPABASE_SERVICE_ROLE_KEY", _text, None, "a Supabase service role key", "Key for SUPABASE_URL.", secret=True),
    Setting("DB_AUTO_MIGRATE", _bool, False, "0 or 1", "Apply migrations at start (always on for the embedded database)."),
    # Supervisor (SUPERVISED=1 ./start.sh)
    Setting("BOT", _choice("worker", "ingest", "bot"), "worker", "worker, ingest or bot", "Which bot ./start.sh and the supervisor run.", SUPERVISOR),
    Setting("MAX_RESTARTS", _int(0), 10, "a whole number >= 0", "Restarts allowed within RESTART_WINDOW; one more ends the supervisor with exit 1.", SUPERVISOR),
    Setting("RESTART_WINDOW", _float(0, exclusive=True), 3600.0, "a number of seconds > 0", "How long a restart counts against MAX_RESTARTS.", SUPERVISOR),
    Setting("HEALTH_FAIL_AFTER", _float(0), 60.0, "a number of seconds >= 0", "A child whose /health has not answered this long is restarted (0: no probe).", SUPERVISOR),
    Setting("HEALTH_CHECK_INTERVAL", _float(0, exclusive=True), 5.0, "a number of seconds > 0", "Seconds between two /health probes of the child.", SUPERVISOR),
    Setting("HEALTH_STARTUP_GRACE", _float(0), 60.0, "a number of seconds >= 0", "Extra time before a new child's first /health answer is required.", SUPERVISOR),
    Setting("RESTART_BACKOFF_BASE", _float(0), 1.0, "a number of seconds >= 0", "First delay between restarts; it doubles each time.", SUPERVISOR),
    Setting("RESTART_BACKOFF_MAX", _float(0), 60.0, "a number of seconds >= 0", "Cap of the delay between restarts.", SUPERVISOR),
]

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
BY_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS}


# --- settings classes -------------------------------------------------------


@dataclass(frozen=True)
class CommonSettings:
    """What every bot reads."""

    timeout_telegram_send: float
    timeout_telegram_entity: float
    timeout_telegram_media: float
    timeout_db: float
    timeout_loop_cycle: float
    watchdog_max_silence: float
    watchdog_check_interval: float
    watchdog_startup_grace: float
    watchdog_storm_restarts: int
    watchdog_storm_window: float
    heartbeat_interval: float
    max_message_retries: int
    retry_base_delay: float
    retry_queue_capacity: int
    port: int
    data_dir: Path
    sandbox_dir: Path | None
    shutdown_grace: float
    status_token: str | None
    log_level: str
    log_format: str
    alert_bot_token: str | None
    alert_chat_id: str | None
    alert_api_base: str
    alert_dedupe_window: float
    database_url: str | None
    supabase_url: str | None
    supabase_service_role_key: str | None
    db_auto_migrate: bool
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def supabase_key(self) -> str | None:
        return self.supabase_service_role_key

    def secrets(self) -> list[str]:
        """Configured secret values, for log and response redaction."""
        values = []
        for f in dataclasses.fields(self):
            setting = BY_FIELD.get(f.name)
            value = getattr(self, f.name)
            if setting is not None and setting.secret and value:
                values.append(str(value))
        if self.database_url:
            password = urlparse(self.database_url).password
            if password:
                values.append(password)
                if unquote(password) != password:
                    values.append(unquote(password))  # what the driver sees and may echo
        return values


S = TypeVar("S", bound=CommonSettings)


def read_environment(*, dotenv_path: str | os.PathLike[str] | None = ".env") -> dict[str, str]:
    """The process environment over the values of ``.env`` (real variables win)."""
    merged: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ)
    return merged


def parse_setting(setting: Setting, env: Mapping[str, str]) -> Any:
    """Parse one variable from ``env``.

    Raises:
        ConfigError: the value is malformed, or missing when required.
    """
    raw = env.get(setting.name)
    if raw is None or raw.strip() == "":
        if setting.required:
            raise ConfigError(setting.name, setting.expected, None)
        return setting.default
    try:
        return setting.parse(raw)
    except (ValueError, TypeError):
        raise ConfigError(setting.name, setting.expected, raw, secret=setting.secret) from None


def load_settings(cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """Build ``cls`` from ``env`` (default: :func:`read_environment`).

    Raises:
        ConfigError: the first bad variable, by declaration order.
    """
    source = read_environment() if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        setting = BY_FIELD.get(f.name)
        if setting is None:
            raise RuntimeError(f"settings field {cls.__name__}.{f.name} has no Setting in shared.config.SETTINGS")
        values[f.name] = parse_setting(setting, source)
    settings = cls(**values)
    check = getattr(settings, "validate", None)
    if callable(check):
        check()
    return settings


def load_or_exit(cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """:func:`load_settings`, or one line on stderr and exit code 2."""
    try:
        return load_settings(cls, env)
    except ConfigError as exc:
        sys.stderr.write(f"CONFIG ERROR: {exc}\n")
        raise SystemExit(2) from None


def settings_for(bot: str) -> list[Setting]:
    """The variables a bot reads, in declaration order."""
    return [s for s in SETTINGS if bot in s.bots]


# --- generated documentation ----------------------------------------------


def _used_by(setting: Setting) -> str:
    if setting.bots == ALL:
        return "all bots"
    if setting.bots == PROCESS:
        return "all bots and the supervisor"
    return ", ".join(sorted(setting.bots))


def render_env_example() -> str:
    lines = [
        "# Every setting the bots read, with its default. Copy to .env and edit.",
        "# Generated from shared/config.py: python -m shared.config env-example > .env.example",
        "# An empty value means unset (the default applies).",
    ]
    for s in SETTINGS:
        used_by = _used_by(s)
        lines.append("")
        lines.append(f"# {s.help} Expected: {s.expected}. Used by: {used_by}.")
        lines.append(f"{s.name}={s.default_text()}")
    return "\n".join(lines) + "\n"


def render_markdown_table() -> str:
    rows = ["| Variable | Default | Expected | Used by | What it does |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        used_by = _used_by(s)
        default = f"`{s.default_text()}`" if s.default_text() else "(unset)"
        rows.append(f"| `{s.name}` | {default} | {s.expected} | {used_by} | {s.help} |")
    return "\n".join(rows) + "\n"


README_START = "<!-- settings:start -->"
README_END = "<!-- settings:end -->"


def update_readme(path: Path) -> bool:
    """Rewrite the settings table between the README's markers. True when it changed."""
    text = path.read_text(encoding="utf-8")
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(f"{path} has no {README_START} ... {README_END} markers")
    updated = f"{head}{README_START}\n{render_markdown_table()}{README_END}{tail}"
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["update-readme"]:
        changed = update_readme(Path("README.md"))
        sys.stdout.write("README.md updated\n" if changed else "README.md already up to date\n")
        return 0
    if args == ["env-example"]:
        sys.stdout.write(render_env_example())
        return 0
    if args == ["markdown"]:
        sys.stdout.write(render_markdown_table())
        return 0
    if args == ["check"]:
        load_or_exit(CommonSettings)
        sys.stdout.write("configuration OK\n")
        return 0
    sys.stderr.write("usage: python -m shared.config env-example | markdown | update-readme | check\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
