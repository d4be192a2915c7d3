"""Configuration: every environment variable declared once, parsed into typed settings.

Each variable is a :class:`Setting` in :data:`SETTINGS` with its parser, its
default, the form it expects and a comment. The settings classes are frozen
dataclasses whose field names are the lower-cased variable names, so one
declaration serves the code, ``.env.example`` and docs/configuration.md
(``./start.sh config env-example`` prints the one, ``./start.sh config docs``
writes the other, and a test checks both files against this registry).

A wrong or missing value raises :class:`ConfigError` naming the variable and
the expected form; :func:`load_or_exit` turns that into one line on stderr
and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar
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


def _percent(raw: str) -> float:
    value = _float(0, exclusive=True)(raw)
    if value > 100:
        raise ValueError
    return value


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


def _csv(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    if not items:
        raise ValueError
    return items


def _int_csv(raw: str) -> tuple[int, ...]:
    return tuple(int(item) for item in _csv(raw))


def _fernet_keys(raw: str) -> str:
    """One Fernet key, or several comma-separated (newest first): each must open."""
    from shared.cipher import SessionCipher, SessionKeyError

    value = raw.strip()
    try:
        SessionCipher(value)
    except SessionKeyError:
        raise ValueError from None
    return value


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
TELEGRAM = frozenset({"worker", "ingest"})
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
    field_name: str | None = None

    @property
    def field(self) -> str:
        return self.field_name or self.name.lower()

    def default_text(self) -> str:
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "1" if self.default else "0"
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return str(self.default)


SETTINGS: list[Setting] = [
    # Timeouts: the deadlines of every network await
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
    Setting("PORT", _int(0, 65535), None, "a port number 0-65535", "Port of the status server (Railway sets it). Unset: worker 8080, ingest 8081, bot 8082, so the three run side by side.", PROCESS),
    Setting("DATA_DIR", _path, Path("./.data"), "a directory path", "Local state: embedded PostgreSQL, sandbox world, spill files."),
    Setting("SANDBOX", _bool, False, "0 or 1", "Run on the local sandbox although a database is configured (without it, a bot with DATABASE_URL or SUPABASE_URL but no credentials refuses to start). Only sandbox accounts are used.", field_name="sandbox_requested"),
    Setting("SANDBOX_DIR", _path, None, "a directory path", "Telegram sandbox world (default <DATA_DIR>/sandbox), used when no Telegram credentials are set."),
    Setting("SHUTDOWN_GRACE", _float(0), 30.0, "a number of seconds >= 0", "Time in-flight work gets to finish after SIGTERM.", PROCESS),
    Setting("STATUS_TOKEN", _text, None, "a non-empty token", "When set, every path but /health and /ready requires it (Bearer or ?token=).", secret=True),
    Setting("RESOURCE_WARN_PERCENT", _percent, 70.0, "a percentage above 0 and at most 100", "CPU, memory or disk use at or above this is degraded (health CLI, /status, /health/detailed)."),
    Setting("RESOURCE_CRITICAL_PERCENT", _percent, 90.0, "a percentage above 0 and at most 100", "CPU, memory or disk use at or above this is an error."),
    Setting("RESOURCE_AVERAGE_WINDOW", _float(0), 60.0, "a number of seconds >= 0", "CPU and memory are judged by their average over this window, so a short spike changes no verdict (0: the latest sample alone)."),
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
    Setting("DB_BREAKER_RECOVERY", _float(0, exclusive=True), 30.0, "a number of seconds > 0", "Seconds the database breaker stays open after failed calls in a row before it lets a probe through; loops resume when it does. Lower it to recover faster from short outages."),
    Setting("BREAKER_PROBE_INTERVAL", _float(0, exclusive=True), 2.0, "a number of seconds > 0", "While a circuit breaker is open, a cheap call of the service's own (select 1, a HEAD of the bucket, an authenticated GET, Telegram's connection check) probes it this often; probes that succeed close the breaker at once instead of after its recovery timeout. A failure that leaves the breaker closed is probed too, and work that failed while the service was down goes again as soon as a probe answers."),
    # Telegram user accounts (worker, ingest)
    Setting("TELEGRAM_API_ID", _int(1), None, "a whole number from my.telegram.org", "Telegram API id (bots need one too); unset means sandbox mode (no real Telegram).", TELEGRAM | {"bot"}),
    Setting("TELEGRAM_API_HASH", _text, None, "the API hash from my.telegram.org", "Telegram API hash, with TELEGRAM_API_ID.", TELEGRAM | {"bot"}, secret=True),
    Setting("SESSION_ENCRYPTION_KEY", _fernet_keys, None, "a Fernet key (./start.sh sessions new-key)", "Encrypts Telegram sessions at rest; several comma-separated, newest first, during a rotation. Required outside sandbox mode.", TELEGRAM, secret=True),
    Setting("TIMEOUT_TELEGRAM_CONNECT", _float(0, exclusive=True), 30.0, "a number of seconds > 0", "Deadline of connecting one account.", TELEGRAM),
    Setting("ACCOUNT_LEASE_SECONDS", _float(1), 20.0, "a number of seconds >= 1", "An account's lease; renewed every third of it, lapses after a kill (another replica takes the account within this plus ACCOUNT_CHECK_INTERVAL and 2 s).", TELEGRAM),
    Setting("ACCOUNT_CHECK_INTERVAL", _float(0, exclusive=True), 5.0, "a number of seconds > 0", "How often each account's lease and connection, and the worker fleet, are checked.", TELEGRAM),
    Setting("RECONNECT_BACKOFF_MAX", _float(0, exclusive=True), 300.0, "a number of seconds > 0", "Cap of the delay between reconnect attempts.", TELEGRAM),
    Setting("RECONNECT_ALERT_AFTER", _int(1), 10, "a whole number >= 1", "Failed reconnects of one account before the operator is alerted.", TELEGRAM),
    # worker.py
    Setting("WORKER_ID", _text, "telegram-main", "a name", "The worker's heartbeat id.", frozenset({"worker"})),
    Setting("FLEET_LIVENESS_BEATS", _int(2), 3, "a whole number >= 2", "A worker replica is live while its heartbeat is younger than this many heartbeat intervals; a worker beats at least every ACCOUNT_LEASE_SECONDS divided by this.", frozenset({"worker"})),
    Setting("ACCOUNT_HANDOFF_GRACE", _float(0), 2.0, "a number of seconds >= 0", "Longest wait for an account's work in hand before it is handed to another replica.", frozenset({"worker"})),
    Setting("WORKER_ACCOUNTS", _csv, None, "comma-separated account labels", "The telegram_accounts rows this worker serves, pinned to it: other replicas leave them to it (default: its fair share of every active one). Leave ingest's INGEST_ACCOUNT out when both share a database.", frozenset({"worker"})),
    Setting("OUTBOUND_BATCH_SIZE", _int(1, 10000), 100, "a whole number 1-10000", "Outbound messages claimed per round trip.", frozenset({"worker"})),
    Setting("OUTBOUND_POLL_INTERVAL", _float(0, exclusive=True), 1.0, "a number of seconds > 0", "Longest wait between two claims when no NOTIFY arrives.", frozenset({"worker"})),
    Setting("SEND_RATE_PER_ACCOUNT", _float(0, exclusive=True), 20.0, "messages per second > 0", "Sustained sends per account.", frozenset({"worker"})),
    Setting("SEND_BURST_PER_ACCOUNT", _int(1), 20, "a whole number >= 1", "Sends an account may make at once after a quiet spell.", frozenset({"worker"})),
    Setting("SEND_IN_FLIGHT_PER_ACCOUNT", _int(1, 32), 4, "a whole number 1-32", "Sends of one account waiting for Telegram's answer at once (paced by the rate limits above). With 1 no send ever starts before the previous answer is known, so a FLOOD_WAIT is never drawn twice; more keep up with the account's rate when each request takes 100 ms or more, at the cost that sends already on their way when a FLOOD_WAIT comes back may draw it too.", frozenset({"worker"})),
    Setting("SEND_RATE_PER_CHAT", _float(0, exclusive=True), 1.0, "messages per second > 0", "Sustained sends into one chat.", frozenset({"worker"})),
    Setting("SEND_BURST_PER_CHAT", _int(1), 5, "a whole number >= 1", "Sends into one chat at once after a quiet spell.", frozenset({"worker"})),
    Setting("PEER_FLOOD_PAUSE", _float(0, exclusive=True), 3600.0, "a number of seconds > 0", "After Telegram answers PEER_FLOOD (its spam limit), the account sends nothing to non-contacts for this long; the messages wait in the queue.", frozenset({"worker"})),
    Setting("RECONCILE_INTERVAL", _float(0, exclusive=True), 60.0, "a number of seconds > 0", "How often chats (worker) or channels (ingest) are re-read for messages whose update never came.", frozenset({"worker", "ingest"})),
    Setting("RECONCILE_WINDOW", _float(0, exclusive=True), 86400.0, "a number of seconds > 0", "Chats active within this window are reconciled.", frozenset({"worker"})),
    Setting("HISTORY_PAGE_SIZE", _int(1, 100), 100, "a whole number 1-100", "Messages fetched per history page.", frozenset({"worker"})),
    # ingest.py
    Setting("INGEST_CHANNELS", _csv, None, "comma-separated channel usernames or ids", "Channels whose images are stored (sandbox mode: the demo channel).", frozenset({"ingest"})),
    Setting("INGEST_ACCOUNT", _text, None, "an account label", "The telegram_accounts row ingest logs in with (default: the first active one).", frozenset({"ingest"})),
    Setting("INGEST_BACKFILL_LIMIT", _int(0), 100, "a whole number >= 0", "Messages read back on a channel's first run.", frozenset({"ingest"})),
    Setting("INGEST_OVERSIZE", _choice("resize", "skip"), "resize", "resize or skip", "What happens to images larger than MAX_IMAGE_DIMENSION.", frozenset({"ingest"})),
    Setting("INGEST_MEMORY_BUDGET_MB", _int(16), 256, "a whole number of megabytes >= 16", "Memory one image may take while ingest decodes and processes it; a JPEG is decoded at a reduced scale to fit, other formats above it are skipped (memory_budget).", frozenset({"ingest"})),
    Setting("INGEST_KEEP_EXIF", _bool, False, "0 or 1", "Keep EXIF metadata (it is stripped by default).", frozenset({"ingest"})),
    Setting("INGEST_GC_INTERVAL", _float(0), 3600.0, "a number of seconds >= 0", "How often orphan objects (stored, no row, older than 24 h) are swept; 0 turns it off.", frozenset({"ingest"})),
    Setting("R2_ACCOUNT_ID", _text, None, "a Cloudflare account id", "Cloudflare R2 account (builds the endpoint); unset with R2_ENDPOINT unset means local storage under DATA_DIR.", frozenset({"ingest", "worker"})),
    Setting("R2_ENDPOINT", _url("http", "https"), None, "an http(s) URL", "S3 endpoint, instead of R2_ACCOUNT_ID (any S3-compatible store).", frozenset({"ingest", "worker"})),
    Setting("R2_BUCKET", _text, None, "a bucket name", "Bucket for stored images.", frozenset({"ingest", "worker"})),
    Setting("R2_ACCESS_KEY_ID", _text, None, "an access key id", "R2 access key id.", frozenset({"ingest", "worker"}), secret=True),
    Setting("R2_SECRET_ACCESS_KEY", _text, None, "a secret access key", "R2 secret access key.", frozenset({"ingest", "worker"}), secret=True),
    Setting("TIMEOUT_STORAGE", _float(0, exclusive=True), 30.0, "a number of seconds > 0", "Deadline of one storage call.", frozenset({"ingest", "worker"})),
    Setting("STORAGE_BREAKER_RECOVERY", _float(0, exclusive=True), 60.0, "a number of seconds > 0", "Seconds the storage (r2) breaker stays open after 5 failed calls in a row before it lets a probe through.", frozenset({"ingest", "worker"})),
    # bot.py (Reply Guy)
    Setting("X_API_BASE", _url("http", "https"), "https://api.twitter.com", "an http(s) URL", "X API v2 base URL.", frozenset({"bot"})),
    Setting("X_BEARER_TOKEN", _text, None, "an X API bearer token", "App token for searching tweets.", frozenset({"bot"}), secret=True),
    Setting("X_CONSUMER_KEY", _text, None, "an X API key", "OAuth 1.0a consumer key for posting.", frozenset({"bot"}), secret=True),
    Setting("X_CONSUMER_SECRET", _text, None, "an X API key secret", "OAuth 1.0a consumer secret.", frozenset({"bot"}), secret=True),
    Setting("X_ACCESS_TOKEN", _text, None, "an X access token", "OAuth 1.0a user access token.", frozenset({"bot"}), secret=True),
    Setting("X_ACCESS_TOKEN_SECRET", _text, None, "an X access token secret", "OAuth 1.0a user access token secret.", frozenset({"bot"}), secret=True),
    Setting("X_USER_ID", _text, None, "the numeric id of the posting account", "Our own X account, used to find our earlier replies after a crash.", frozenset({"bot"})),
    Setting("REPLY_KEYWORDS", _csv, None, "comma-separated search terms", "Tweets matching these are candidates.", frozenset({"bot"})),
    Setting("REPLY_TARGET_ACCOUNTS", _csv, None, "comma-separated X usernames", "Recent tweets of these accounts are candidates.", frozenset({"bot"})),
    Setting("DISCOVER_INTERVAL", _float(1), 300.0, "a number of seconds >= 1", "How often tweets are discovered.", frozenset({"bot"})),
    Setting("AI_BASE_URL", _url("http", "https"), "https://api.openai.com/v1", "an http(s) URL", "OpenAI-compatible chat-completions API.", frozenset({"bot"})),
    Setting("AI_API_KEY", _text, None, "an API key", "Key for AI_BASE_URL.", frozenset({"bot"}), secret=True),
    Setting("AI_MODEL", _text, "gpt-4o-mini", "a model name", "Model that drafts replies.", frozenset({"bot"})),
    Setting("REPLY_PROMPT_FILE", _path, None, "a file path", "System prompt for drafting (a built-in prompt when unset).", frozenset({"bot"})),
    Setting("TELEGRAM_BOT_TOKEN", _text, None, "a Telegram bot token", "The bot that asks the operator to approve drafts.", frozenset({"bot"}), secret=True),
    Setting("OPERATOR_CHAT_ID", _text, None, "a Telegram chat id or @username", "Where drafts are sent for approval.", frozenset({"bot"})),
    Setting("OPERATOR_IDS", _int_csv, None, "comma-separated Telegram user ids", "Users allowed to approve, reject or edit.", frozenset({"bot"})),
    Setting("POST_DELAY_MIN", _float(0), 0.0, "a number of seconds >= 0", "Least random delay before posting an approved reply.", frozenset({"bot"})),
    Setting("POST_DELAY_MAX", _float(0), 0.0, "a number of seconds >= 0", "Most random delay before posting an approved reply.", frozenset({"bot"})),
    Setting("POST_DAILY_CAP", _int(0), 50, "a whole number >= 0", "Replies posted per UTC day at most.", frozenset({"bot"})),
    Setting("BOT_LEASE_SECONDS", _float(1), 20.0, "a number of seconds >= 1", "With several bot.py replicas one is active (holds this lease, renewed every quarter of it) and the others stand by; after a kill -9 a standby takes over within this plus a quarter of it.", frozenset({"bot"})),
    Setting("TIMEOUT_HTTP", _float(0, exclusive=True), 30.0, "a number of seconds > 0", "Deadline of one X or AI API call.", frozenset({"bot"})),
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
    sandbox_requested: bool
    sandbox_dir: Path | None
    shutdown_grace: float
    status_token: str | None
    resource_warn_percent: float
    resource_critical_percent: float
    resource_average_window: float
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
    db_breaker_recovery: float
    breaker_probe_interval: float

    @property
    def sandbox(self) -> bool:
        """Run on local stand-ins instead of the real services (each bot says which credentials decide)."""
        return False

    def refuse_implicit_sandbox(self, credentials: str) -> None:
        """Stop a bot from running its sandbox on a configured database unless SANDBOX=1 says so.

        A forgotten credential on a deployment would otherwise seed demo
        accounts into the real database and serve them with stand-in clients.

        Raises:
            ConfigError: when sandbox mode was chosen only by a missing credential.
        """
        if not self.sandbox or self.sandbox_requested:
            return
        configured = "DATABASE_URL" if self.database_url else "SUPABASE_URL" if self.supabase_url else None
        if configured is not None:
            raise ConfigError(
                credentials,
                f"set when {configured} is (or set SANDBOX=1 to run the local sandbox on that database)",
                None,
            )

    def validate(self) -> None:
        # Settings of no particular bot (./start.sh db, ./start.sh config check) have no mode to contradict.
        own_mode = type(self).sandbox is not CommonSettings.sandbox
        if self.sandbox_requested and own_mode and not self.sandbox:
            raise ConfigError("SANDBOX", "0 (or unset) while real credentials are set: pick one", "1")
        if self.resource_critical_percent < self.resource_warn_percent:
            raise ConfigError(
                "RESOURCE_CRITICAL_PERCENT",
                f"at least RESOURCE_WARN_PERCENT ({self.resource_warn_percent:g})",
                f"{self.resource_critical_percent:g}",
            )

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


@dataclass(frozen=True)
class TelegramSettings(CommonSettings):
    """What the bots that log in Telegram user accounts read (worker, ingest)."""

    telegram_api_id: int | None
    telegram_api_hash: str | None
    session_encryption_key: str | None
    timeout_telegram_connect: float
    account_lease_seconds: float
    account_check_interval: float
    reconnect_backoff_max: float
    reconnect_alert_after: int

    @property
    def sandbox(self) -> bool:
        """No Telegram credentials: run against the local sandbox world."""
        return self.telegram_api_id is None and self.telegram_api_hash is None

    @property
    def sandbox_path(self) -> Path:
        return self.sandbox_dir or self.data_dir / "sandbox"

    def validate(self) -> None:
        CommonSettings.validate(self)
        if (self.telegram_api_id is None) != (self.telegram_api_hash is None):
            missing = "TELEGRAM_API_HASH" if self.telegram_api_hash is None else "TELEGRAM_API_ID"
            raise ConfigError(missing, BY_NAME[missing].expected + " (set both, or neither for sandbox mode)", None)
        if not self.sandbox and not self.session_encryption_key:
            raise ConfigError("SESSION_ENCRYPTION_KEY", BY_NAME["SESSION_ENCRYPTION_KEY"].expected + " outside sandbox mode", None)


@dataclass(frozen=True)
class StorageSettings:
    """Object storage (Cloudflare R2 or any S3 API); local files when unset."""

    r2_account_id: str | None
    r2_endpoint: str | None
    r2_bucket: str | None
    r2_access_key_id: str | None
    r2_secret_access_key: str | None
    timeout_storage: float
    storage_breaker_recovery: float

    @property
    def r2_configured(self) -> bool:
        return bool(self.r2_account_id or self.r2_endpoint)

    def validate_storage(self) -> None:
        if not self.r2_configured:
            return
        for name in ("R2_BUCKET", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"):
            if not getattr(self, name.lower()):
                raise ConfigError(name, BY_NAME[name].expected + " when R2 is configured", None)


@dataclass(frozen=True)
class WorkerSettings(TelegramSettings, StorageSettings):
    """worker.py."""

    worker_id: str
    fleet_liveness_beats: int
    account_handoff_grace: float
    outbound_batch_size: int
    outbound_poll_interval: float
    send_rate_per_account: float
    send_in_flight_per_account: int
    send_burst_per_account: int
    send_rate_per_chat: float
    send_burst_per_chat: int
    peer_flood_pause: float
    reconcile_interval: float
    reconcile_window: float
    history_page_size: int
    worker_accounts: tuple[str, ...] | None

    def validate(self) -> None:
        TelegramSettings.validate(self)
        self.validate_storage()


@dataclass(frozen=True)
class IngestSettings(TelegramSettings, StorageSettings):
    """ingest.py."""

    max_image_size_bytes: int
    max_image_dimension: int
    ingest_channels: tuple[str, ...] | None
    ingest_account: str | None
    ingest_backfill_limit: int
    ingest_oversize: str
    ingest_memory_budget_mb: int
    ingest_keep_exif: bool
    ingest_gc_interval: float
    reconcile_interval: float

    def validate(self) -> None:
        TelegramSettings.validate(self)
        self.validate_storage()
        if not self.sandbox and not self.ingest_channels:
            raise ConfigError("INGEST_CHANNELS", BY_NAME["INGEST_CHANNELS"].expected, None)


@dataclass(frozen=True)
class ReplyGuySettings(CommonSettings):
    """bot.py (Reply Guy). With no X, AI or bot credentials it runs on local stand-ins."""

    x_api_base: str
    x_bearer_token: str | None
    x_consumer_key: str | None
    x_consumer_secret: str | None
    x_access_token: str | None
    x_access_token_secret: str | None
    x_user_id: str | None
    reply_keywords: tuple[str, ...] | None
    reply_target_accounts: tuple[str, ...] | None
    discover_interval: float
    ai_base_url: str
    ai_api_key: str | None
    ai_model: str
    reply_prompt_file: Path | None
    telegram_bot_token: str | None
    telegram_api_id: int | None
    telegram_api_hash: str | None
    operator_chat_id: str | None
    operator_ids: tuple[int, ...] | None
    post_delay_min: float
    post_delay_max: float
    post_daily_cap: int
    bot_lease_seconds: float
    timeout_http: float

    @property
    def sandbox(self) -> bool:
        """No credentials at all: local X and AI APIs and the Telegram sandbox."""
        return not (self.x_bearer_token or self.ai_api_key or self.telegram_bot_token)

    def validate(self) -> None:
        CommonSettings.validate(self)
        if self.post_delay_max < self.post_delay_min:
            raise ConfigError("POST_DELAY_MAX", f"at least POST_DELAY_MIN ({self.post_delay_min:g})", str(self.post_delay_max))
        if self.sandbox:
            return
        for name in (
            "X_BEARER_TOKEN", "X_CONSUMER_KEY", "X_CONSUMER_SECRET", "X_ACCESS_TOKEN", "X_ACCESS_TOKEN_SECRET",
            "AI_API_KEY", "TELEGRAM_BOT_TOKEN", "TELEGRAM_API_ID", "TELEGRAM_API_HASH", "OPERATOR_CHAT_ID", "OPERATOR_IDS",
        ):
            if not getattr(self, name.lower()):
                raise ConfigError(name, BY_NAME[name].expected + " (set every credential, or none for the local stand-ins)", None)
        if not (self.reply_keywords or self.reply_target_accounts):
            raise ConfigError("REPLY_KEYWORDS", "set (or REPLY_TARGET_ACCOUNTS)", None)


S = TypeVar("S")


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


#: The status server's port per bot when PORT is unset: the walk-throughs run side by side.
DEFAULT_PORTS = {"worker": 8080, "ingest": 8081, "bot": 8082}

#: Which bot a settings class belongs to (for its default port).
_BOT_OF_CLASS = {"WorkerSettings": "worker", "IngestSettings": "ingest", "ReplyGuySettings": "bot"}


def default_port(cls: type, values: Mapping[str, Any]) -> int:
    """PORT's default for the bot ``cls`` configures (a supervisor probes the bot it runs: BOT)."""
    bot = _BOT_OF_CLASS.get(cls.__name__) or str(values.get("bot") or "worker")
    return DEFAULT_PORTS.get(bot, DEFAULT_PORTS["worker"])


def load_settings(cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """Build ``cls`` from ``env`` (default: :func:`read_environment`).

    Raises:
        ConfigError: the first bad variable, by declaration order.
    """
    source = read_environment() if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        setting = BY_FIELD.get(f.name)
        if setting is None:
            raise RuntimeError(f"settings field {cls.__name__}.{f.name} has no Setting in shared.config.SETTINGS")
        values[f.name] = parse_setting(setting, source)
    if "port" in values and values["port"] is None:
        values["port"] = default_port(cls, values)
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
        exit_with(exc)


def exit_with(exc: ConfigError) -> NoReturn:
    """One line on stderr and exit code 2: how every bad setting ends a start."""
    sys.stderr.write(f"CONFIG ERROR: {exc}\n")
    raise SystemExit(2) from None


def refuse_implicit_sandbox_or_exit(settings: CommonSettings, credentials: str) -> None:
    """:meth:`CommonSettings.refuse_implicit_sandbox`, or one line and exit code 2."""
    try:
        settings.refuse_implicit_sandbox(credentials)
    except ConfigError as exc:
        exit_with(exc)


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
        "# Generated from shared/config.py: ./start.sh config env-example > .env.example",
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


#: The generated settings reference.
CONFIGURATION_DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def render_configuration_doc() -> str:
    """docs/configuration.md: every setting, generated from :data:`SETTINGS` (a test keeps it current)."""
    return (
        "# Configuration\n\n"
        "<!-- Generated from shared/config.py: ./start.sh config docs. Edit the Setting there, not this file. -->\n\n"
        "Every variable the bots and the supervisor read, its default and what it does. "
        "`.env.example` lists the same with comments: copy it to `.env` for local runs "
        "(real environment variables win over `.env`). A bad value stops start-up with one line naming "
        "the variable and the form it expects (exit 2).\n\n"
        "The few a real deployment needs are listed in the [README](../README.md#going-real); "
        "everything else has a default that works.\n\n"
        + render_markdown_table()
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]) or args[1:] in (["-h"], ["--help"]):
        sys.stdout.write(
            "usage: ./start.sh config env-example | markdown | docs | check\n"
            "  env-example  print .env.example\n  markdown     print the settings table\n"
            "  docs         write docs/configuration.md\n  check        load the settings, exit 2 naming a bad one\n"
        )
        return 0
    if args == ["docs"]:
        CONFIGURATION_DOC.write_text(render_configuration_doc(), encoding="utf-8")
        sys.stdout.write(f"{CONFIGURATION_DOC.relative_to(CONFIGURATION_DOC.parent.parent)} written\n")
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
    sys.stderr.write("usage: ./start.sh config env-example | markdown | docs | check\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
