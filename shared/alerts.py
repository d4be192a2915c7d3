"""Operator alerts through the Telegram Bot API, that can never block or crash their caller.

Any code calls ``sink.alert(AlertType.X, "what happened", key=..., details={...})``
from async code, sync code or another thread. The call only formats the text,
applies deduplication and puts it on a bounded queue; a task of its own sends
it with ``sendMessage`` (plain text, no parse mode), with its own timeout, a
per-minute rate limit, retries for 5xx/timeouts and ``retry_after`` for 429.
A full queue drops the oldest alert and counts it. When the condition clears,
``sink.resolve(AlertType.X, key=...)`` sends a ``resolved`` message, but only
if that alert had fired.

Without ALERT_BOT_TOKEN / ALERT_CHAT_ID, `build_alert_sink` returns a
`LogAlertSink`: alerts are only logged (with the same deduplication).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from prometheus_client import Counter

from shared.logs import redact, register_secret

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

ALERTS = Counter(
    "bot_alerts_total",
    "Operator alerts by type and outcome (queued, deduplicated, dropped, sent, failed, logged)",
    ["type", "outcome"],
)

MAX_TEXT_LENGTH = 4000  # Telegram's limit is 4096 characters per message.
MAX_DETAIL_LENGTH = 500


class AlertType(str, Enum):
    """Kinds of operator alerts (failures, stuck work, dead letters, the supervisor's and the loops')."""

    CIRCUIT_BREAKER_OPEN = "circuit_breaker_open"
    INITIALIZATION_FAILED = "initialization_failed"
    PROCESSING_FAILED = "processing_failed"
    TWEET_PROCESSING_FAILED = "tweet_processing_failed"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    MULTIPLE_FAILURES = "multiple_failures"
    LOOP_RESTARTED = "loop_restarted"
    RESTART_STORM = "restart_storm"
    ACCOUNT_NEEDS_LOGIN = "account_needs_login"
    SESSION_KEY_MISMATCH = "session_key_mismatch"
    ACCOUNT_LIMITED = "account_limited"
    MESSAGE_DEAD = "message_dead"
    RESOURCES_CRITICAL = "resources_critical"
    SUPERVISOR_RESTART = "supervisor_restart"
    SUPERVISOR_GAVE_UP = "supervisor_gave_up"
    RESOLVED = "resolved"


_ICONS: dict[AlertType, str] = {
    AlertType.CIRCUIT_BREAKER_OPEN: "\U0001f6a8",  # police light
    AlertType.INITIALIZATION_FAILED: "\U0001f6a8",
    AlertType.PROCESSING_FAILED: "\u26a0\ufe0f",  # warning sign
    AlertType.TWEET_PROCESSING_FAILED: "\u26a0\ufe0f",
    AlertType.RATE_LIMIT_EXCEEDED: "\u23f3",  # hourglass
    AlertType.MULTIPLE_FAILURES: "\U0001f6a8",
    AlertType.LOOP_RESTARTED: "\U0001f504",  # arrows
    AlertType.RESTART_STORM: "\U0001f6a8",
    AlertType.ACCOUNT_NEEDS_LOGIN: "\U0001f511",  # key
    AlertType.SESSION_KEY_MISMATCH: "\U0001f510",  # closed lock with key
    AlertType.ACCOUNT_LIMITED: "\u23f3",  # hourglass
    AlertType.MESSAGE_DEAD: "\u26a0\ufe0f",
    AlertType.RESOURCES_CRITICAL: "\U0001f525",  # fire
    AlertType.SUPERVISOR_RESTART: "\U0001f504",
    AlertType.SUPERVISOR_GAVE_UP: "\U0001f6a8",
    AlertType.RESOLVED: "\u2705",  # check mark
}


@runtime_checkable
class AlertSink(Protocol):
    """Where operator alerts go. Implementations never block and never raise."""

    def alert(
        self,
        type: AlertType,  # noqa: A002 - the contract's name
        message: str,
        *,
        key: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """Raise an alert; False when it was deduplicated or dropped."""
        ...

    def resolve(self, type: AlertType, *, key: str | None = None, message: str = "") -> bool:  # noqa: A002
        """Say that a condition cleared; only sends if that (type, key) had fired."""
        ...


# --------------------------------------------------------------------------- formatting

def _utc_text(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _detail_value(value: Any) -> str:
    try:
        if isinstance(value, Enum):
            value = value.value
        if isinstance(value, (dict, list, tuple)):
            text = json.dumps(value, default=str, ensure_ascii=False)
        else:
            text = str(value)
    except Exception:  # an object whose __str__ raises must not break the alert
        text = f"<unprintable {type(value).__name__}>"
    if len(text) > MAX_DETAIL_LENGTH:
        text = text[: MAX_DETAIL_LENGTH - 1] + "\u2026"
    return text


def format_alert(
    alert_type: AlertType,
    message: str,
    *,
    bot_name: str,
    wall_time: float,
    details: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> str:
    """Build the plain-text alert body (header, message, details, time), redacted and length-capped.

    Args:
        alert_type: The alert's type; decides the icon.
        message: One-line description of what happened.
        bot_name: Which bot raised it.
        wall_time: Unix time of the alert.
        details: Extra ``key: value`` lines.
        title: Headline; "ALERT" by default.

    Returns:
        Text ready for ``sendMessage`` without a parse mode.
    """
    icon = _ICONS.get(alert_type, "\U0001f6a8")
    lines = [
        f"{icon} {title or 'ALERT'}: {alert_type.value}",
        f"Bot: {bot_name}",
        f"Time: {_utc_text(wall_time)}",
    ]
    if message:
        lines.append(f"Message: {message}")
    if details:
        lines.append("")
        lines.append("Details:")
        for name, value in list(details.items())[:30]:
            lines.append(f"  \u2022 {name}: {_detail_value(value)}")
    text = redact("\n".join(lines))
    if len(text) > MAX_TEXT_LENGTH:
        text = text[: MAX_TEXT_LENGTH - 1] + "\u2026"
    return text


# --------------------------------------------------------------------------- dedupe

@dataclass
class _KeyState:
    last_sent: float
    suppressed: int = 0


class _Deduper:
    """Per-(type, key) memory: when it was last let through, how many were suppressed, what is active."""

    def __init__(self, *, window: float, clock: Callable[[], float]) -> None:
        self.window = float(window)
        self.clock = clock
        self.keys: dict[tuple[AlertType, str], _KeyState] = {}
        self.active: set[tuple[AlertType, str]] = set()

    def admit(self, alert_type: AlertType, key: str) -> tuple[bool, int]:
        """Return (send it?, how many were suppressed since the last one sent)."""
        now = self.clock()
        ident = (alert_type, key)
        self.active.add(ident)
        state = self.keys.get(ident)
        if state is not None and now - state.last_sent < self.window:
            state.suppressed += 1
            return False, 0
        suppressed = state.suppressed if state is not None else 0
        self.keys[ident] = _KeyState(last_sent=now)
        if len(self.keys) > 2000:
            self._prune(now)
        return True, suppressed

    def clear(self, alert_type: AlertType, key: str) -> bool:
        """Forget (type, key); True if it was active (so a `resolved` message is due)."""
        ident = (alert_type, key)
        self.keys.pop(ident, None)
        if ident in self.active:
            self.active.discard(ident)
            return True
        return False

    def _prune(self, now: float) -> None:
        for ident in [i for i, s in self.keys.items() if now - s.last_sent >= self.window]:
            del self.keys[ident]


# --------------------------------------------------------------------------- log-only sink

class LogAlertSink:
    """Alert sink that only writes alerts to the log (used when no bot token is configured).

    Args:
        bot_name: Name shown in each alert.
        dedupe_window: Seconds during which a repeated (type, key) is suppressed.
        clock: Monotonic clock for deduplication.
        wall_clock: Unix time for the text.
    """

    def __init__(
        self,
        *,
        bot_name: str = "bot",
        dedupe_window: float = 600,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.bot_name = bot_name
        self._wall_clock = wall_clock
        self._dedupe = _Deduper(window=dedupe_window, clock=clock)
        self._lock = threading.Lock()
        self.logged = 0
        self.deduplicated = 0

    def alert(
        self,
        type: AlertType,  # noqa: A002
        message: str,
        *,
        key: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """Log the alert unless the same (type, key) was logged within the window. Never raises."""
        try:
            alert_type = AlertType(type)
            with self._lock:
                admitted, suppressed = self._dedupe.admit(alert_type, key or alert_type.value)
                if not admitted:
                    self.deduplicated += 1
                else:
                    self.logged += 1
            if not admitted:
                ALERTS.labels(alert_type.value, "deduplicated").inc()
                return False
            merged = dict(details or {})
            if suppressed:
                merged["suppressed_repeats"] = suppressed
            text = format_alert(alert_type, message, bot_name=self.bot_name, wall_time=self._wall_clock(), details=merged)
            logger.warning("operator alert (not sent, no bot token configured):\n%s", text,
                           extra={"alert_type": alert_type.value, "alert_key": key or alert_type.value})
            ALERTS.labels(alert_type.value, "logged").inc()
            return True
        except Exception:
            logger.exception("could not log an operator alert")
            return False

    def resolve(self, type: AlertType, *, key: str | None = None, message: str = "") -> bool:  # noqa: A002
        """Log a `resolved` line if (type, key) had fired. Never raises."""
        try:
            alert_type = AlertType(type)
            with self._lock:
                was_active = self._dedupe.clear(alert_type, key or alert_type.value)
            if not was_active:
                return False
            details = {"alert": alert_type.value, "key": key or alert_type.value}
            text = format_alert(AlertType.RESOLVED, message or f"{alert_type.value} cleared",
                                bot_name=self.bot_name, wall_time=self._wall_clock(), details=details, title="RESOLVED")
            logger.info("operator alert resolved (not sent, no bot token configured):\n%s", text,
                        extra={"alert_type": AlertType.RESOLVED.value, "alert_key": key or alert_type.value})
            ALERTS.labels(AlertType.RESOLVED.value, "logged").inc()
            return True
        except Exception:
            logger.exception("could not log an operator alert resolution")
            return False

    async def start(self) -> None:
        """Nothing to start; present so callers treat every sink alike."""

    async def close(self, *, timeout: float = 5) -> None:
        """Nothing to flush; present so callers treat every sink alike."""

    def get_status(self) -> dict[str, Any]:
        """Counters for /status."""
        with self._lock:
            return {
                "enabled": False,
                "mode": "log_only",
                "logged": self.logged,
                "deduplicated": self.deduplicated,
                "active": sorted(f"{t.value}:{k}" for t, k in self._dedupe.active),
            }


# --------------------------------------------------------------------------- Telegram sender

@dataclass
class _Pending:
    alert_type: AlertType
    text: str
    queued_at: float = field(default_factory=time.monotonic)


class SenderWait(str, Enum):
    """What the sending task is waiting for, if anything (shown in get_status)."""

    RATE_LIMIT = "rate_limit"
    RETRY_AFTER = "retry_after"
    BACKOFF = "backoff"


class _SendOutcome(Enum):
    SENT = "sent"
    RETRY = "retry"
    GIVE_UP = "give_up"


class TelegramAlertSender:
    """Sends operator alerts to a Telegram chat through the Bot API's ``sendMessage``.

    `alert` and `resolve` are safe to call from any thread and never block or
    raise. Call `start` once the event loop runs (an `alert` made inside the
    loop starts the sender on its own if you forgot) and `close` at shutdown.

    Args:
        bot_token: ALERT_BOT_TOKEN; without it (or without chat_id) alerts are only logged.
        chat_id: ALERT_CHAT_ID: the operator chat, group or channel.
        bot_name: Shown in each alert.
        api_base: Bot API base URL (ALERT_API_BASE), no trailing slash needed.
        dedupe_window: Seconds during which a repeated (type, key) is suppressed.
        send_timeout: Deadline of one ``sendMessage`` request, connect to body.
        queue_size: Pending alerts kept; the oldest is dropped when full.
        max_per_minute: Alerts sent per rolling minute; the rest wait in the queue.
        clock: Monotonic clock used for deduplication (tests pass a fake one).
        wall_clock: Unix time for the alert text.
        max_attempts: Tries per alert for 5xx, timeouts, network errors and malformed answers.
        retry_base_delay: First backoff delay in seconds (doubles each retry).
        max_retry_after: Upper bound on a 429's ``retry_after`` wait.

    Raises:
        ValueError: queue_size or max_per_minute below 1.
    """

    def __init__(
        self,
        *,
        bot_token: str | None,
        chat_id: str | None,
        bot_name: str,
        api_base: str = "https://api.telegram.org",
        dedupe_window: float = 600,
        send_timeout: float = 10,
        queue_size: int = 100,
        max_per_minute: int = 20,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_attempts: int = 3,
        retry_base_delay: float = 1.0,
        max_retry_after: float = 120.0,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if max_per_minute < 1:
            raise ValueError("max_per_minute must be at least 1")
        self.bot_name = bot_name
        self._token = bot_token or None
        self._chat_id = str(chat_id) if chat_id not in (None, "") else None
        register_secret(self._token)
        self._api_base = api_base.rstrip("/")
        self._send_timeout = float(send_timeout)
        self._queue_size = int(queue_size)
        self._max_per_minute = int(max_per_minute)
        self._wall_clock = wall_clock
        self._max_attempts = max(1, int(max_attempts))
        self._retry_base_delay = float(retry_base_delay)
        self._max_retry_after = float(max_retry_after)

        self._lock = threading.Lock()
        self._dedupe = _Deduper(window=dedupe_window, clock=clock)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._sent_times: collections.deque[float] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._waiting_for: SenderWait | None = None
        self._inflight: _Pending | None = None  # taken off the queue, being sent

        self.sent = 0
        self.deduplicated = 0
        self.dropped = 0
        self.failed = 0
        self.retried = 0
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        self.last_sent_time: float | None = None

    @property
    def enabled(self) -> bool:
        """True when a bot token and chat id are configured (alerts go to Telegram)."""
        return self._token is not None and self._chat_id is not None

    # ------------------------------------------------------------ caller side

    def alert(
        self,
        type: AlertType,  # noqa: A002
        message: str,
        *,
        key: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """Queue an alert for sending.

        Args:
            type: The alert type.
            message: What happened, in one line.
            key: Deduplication key (defaults to the type), e.g. a breaker or account name.
            details: Extra ``key: value`` lines (redacted).

        Returns:
            True when queued; False when deduplicated, dropped at once or on any internal error.
            Never raises, never blocks.
        """
        try:
            alert_type = AlertType(type)
            dedupe_key = key or alert_type.value
            with self._lock:
                admitted, suppressed = self._dedupe.admit(alert_type, dedupe_key)
                if not admitted:
                    self.deduplicated += 1
            if not admitted:
                ALERTS.labels(alert_type.value, "deduplicated").inc()
                logger.debug("alert %s/%s deduplicated", alert_type.value, dedupe_key)
                return False
            merged = dict(details or {})
            if suppressed:
                merged["suppressed_repeats"] = suppressed
            text = format_alert(alert_type, message, bot_name=self.bot_name, wall_time=self._wall_clock(), details=merged)
            logger.warning("operator alert %s: %s", alert_type.value, redact(message),
                           extra={"alert_type": alert_type.value, "alert_key": dedupe_key})
            return self._enqueue(_Pending(alert_type, text))
        except Exception:
            logger.exception("could not queue an operator alert")
            return False

    def resolve(self, type: AlertType, *, key: str | None = None, message: str = "") -> bool:  # noqa: A002
        """Queue a `resolved` message if (type, key) had fired since its last resolution.

        Returns:
            True when a `resolved` message was queued. Never raises, never blocks.
        """
        try:
            alert_type = AlertType(type)
            dedupe_key = key or alert_type.value
            with self._lock:
                was_active = self._dedupe.clear(alert_type, dedupe_key)
            if not was_active:
                return False
            details = {"alert": alert_type.value, "key": dedupe_key}
            text = format_alert(AlertType.RESOLVED, message or f"{alert_type.value} cleared",
                                bot_name=self.bot_name, wall_time=self._wall_clock(), details=details, title="RESOLVED")
            logger.info("operator alert resolved: %s/%s", alert_type.value, dedupe_key,
                        extra={"alert_type": AlertType.RESOLVED.value, "alert_key": dedupe_key})
            return self._enqueue(_Pending(AlertType.RESOLVED, text))
        except Exception:
            logger.exception("could not queue an operator alert resolution")
            return False

    def _enqueue(self, pending: _Pending) -> bool:
        if not self.enabled:
            logger.warning("operator alert (not sent, no bot token/chat id configured):\n%s", pending.text)
            ALERTS.labels(pending.alert_type.value, "logged").inc()
            return True
        dropped: _Pending | None = None
        with self._lock:
            if self._closing:
                self.dropped += 1
                dropped = pending
            else:
                if len(self._queue) >= self._queue_size:
                    dropped = self._queue.popleft()
                    self.dropped += 1
                self._queue.append(pending)
        if dropped is not None:
            ALERTS.labels(dropped.alert_type.value, "dropped").inc()
            logger.warning("alert queue full or closed: dropped a %s alert", dropped.alert_type.value)
            if dropped is pending:
                return False
        ALERTS.labels(pending.alert_type.value, "queued").inc()
        self._wake()
        return True

    def _wake(self) -> None:
        loop, event = self._loop, self._wakeup
        if loop is None or event is None:
            self._maybe_autostart()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is loop:
                event.set()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # loop closed between the check and the call
            pass

    def _maybe_autostart(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not in a loop: start() will pick the queue up
        if self._task is None and not self._closing:
            self._start_worker()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the sending task on the running loop (idempotent)."""
        if self._task is None and not self._closing:
            self._start_worker()

    def _start_worker(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._wakeup.set()  # alerts queued before start go out at once
        self._task = self._loop.create_task(self._run(), name="alert-sender")

    async def close(self, *, timeout: float = 5) -> None:
        """Send what is queued within `timeout` seconds, then stop; unsent alerts count as dropped."""
        with self._lock:
            self._closing = True
        task = self._task
        if task is None:
            with self._lock:
                unsent = list(self._queue)
                self._queue.clear()
                self.dropped += len(unsent)
            for pending in unsent:
                ALERTS.labels(pending.alert_type.value, "dropped").inc()
            if unsent:
                logger.warning("alert sender closed before it started: %d alert(s) unsent", len(unsent))
            return
        if self._wakeup is not None:
            self._wakeup.set()
        done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=1.0)
        with self._lock:
            unsent = list(self._queue) + ([self._inflight] if self._inflight is not None else [])
            left = len(unsent)
            self._queue.clear()
            self._inflight = None
            self.dropped += left
        for pending in unsent:
            ALERTS.labels(pending.alert_type.value, "dropped").inc()
        if left:
            logger.warning("alert sender closed with %d alert(s) unsent", left)

    # ------------------------------------------------------------ worker side

    async def _run(self) -> None:
        import aiohttp  # a command that never alerts does not pay for aiohttp's import

        assert self._wakeup is not None
        timeout = aiohttp.ClientTimeout(total=self._send_timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout, raise_for_status=False) as session:
                while True:
                    with self._lock:
                        pending = self._queue.popleft() if self._queue else None
                        self._inflight = pending
                        closing = self._closing
                    if pending is None:
                        if closing:
                            return
                        self._wakeup.clear()
                        with self._lock:
                            if self._queue or self._closing:
                                continue
                        await self._wakeup.wait()
                        continue
                    await self._respect_rate_limit()
                    try:
                        await self._deliver(session, pending)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # never let the worker die
                        self._record_error(f"unexpected error: {type(exc).__name__}: {exc}")
                        logger.exception("alert sender: unexpected error")
                        with self._lock:
                            self.failed += 1
                    with self._lock:
                        self._inflight = None
        except asyncio.CancelledError:
            raise
        except Exception:  # pragma: no cover - session creation failing
            logger.exception("alert sender stopped")

    async def _respect_rate_limit(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            while self._sent_times and now - self._sent_times[0] >= 60.0:
                self._sent_times.popleft()
            if len(self._sent_times) < self._max_per_minute:
                self._waiting_for = None
                return
            self._waiting_for = SenderWait.RATE_LIMIT
            await asyncio.sleep(60.0 - (now - self._sent_times[0]) + 0.01)

    async def _deliver(self, session: aiohttp.ClientSession, pending: _Pending) -> None:
        """Send one alert with retries; records the outcome, never raises (except cancellation)."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            self._sent_times.append(loop.time())
            outcome, wait = await self._send_once(session, pending)
            if outcome is _SendOutcome.SENT:
                with self._lock:
                    self.sent += 1
                    self.last_sent_time = self._wall_clock()
                ALERTS.labels(pending.alert_type.value, "sent").inc()
                return
            if outcome is _SendOutcome.GIVE_UP or attempt >= self._max_attempts:
                with self._lock:
                    self.failed += 1
                ALERTS.labels(pending.alert_type.value, "failed").inc()
                logger.error("operator alert could not be sent (%s); its text was:\n%s", self.last_error, pending.text)
                return
            with self._lock:
                self.retried += 1
            self._waiting_for = SenderWait.RETRY_AFTER if wait is not None else SenderWait.BACKOFF
            delay = wait if wait is not None else self._retry_base_delay * (2 ** (attempt - 1))
            await asyncio.sleep(delay)
            self._waiting_for = None

    async def _send_once(self, session: aiohttp.ClientSession, pending: _Pending) -> tuple[_SendOutcome, float | None]:
        import aiohttp

        url = f"{self._api_base}/bot{self._token}/sendMessage"
        body = {"chat_id": self._chat_id, "text": pending.text, "disable_web_page_preview": True}
        try:
            async with asyncio.timeout(self._send_timeout):
                async with session.post(url, json=body) as response:
                    status = response.status
                    raw = await response.read()
        except TimeoutError:
            self._record_error(f"sendMessage timed out after {self._send_timeout:g}s")
            return _SendOutcome.RETRY, None
        except aiohttp.ClientError as exc:
            self._record_error(f"sendMessage failed: {type(exc).__name__}: {exc}")
            return _SendOutcome.RETRY, None
        except OSError as exc:
            self._record_error(f"sendMessage failed: {type(exc).__name__}: {exc}")
            return _SendOutcome.RETRY, None

        try:
            payload = json.loads(raw.decode("utf-8", errors="replace")) if raw else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            payload = None
        description = str(payload.get("description", "")) if payload else ""

        if 200 <= status < 300:
            if payload is not None and payload.get("ok") is True:
                return _SendOutcome.SENT, None
            self._record_error(f"sendMessage answered {status} with an unexpected body")
            return _SendOutcome.RETRY, None
        if status == 429:
            retry_after = 1.0
            params = payload.get("parameters") if payload else None
            if isinstance(params, dict):
                with contextlib.suppress(TypeError, ValueError):
                    retry_after = float(params.get("retry_after", retry_after))
            retry_after = min(max(retry_after, 0.0), self._max_retry_after)
            self._record_error(f"sendMessage rate limited (429), retry after {retry_after:g}s")
            return _SendOutcome.RETRY, retry_after
        if status >= 500:
            self._record_error(f"sendMessage answered {status}: {description[:200]}")
            return _SendOutcome.RETRY, None
        # 400 (bad chat id, text), 401 (bad token), 403 (bot blocked/kicked), 404 ...: retrying will not help.
        self._record_error(f"sendMessage answered {status}: {description[:200]}")
        return _SendOutcome.GIVE_UP, None

    def _record_error(self, text: str) -> None:
        if self._token:
            text = text.replace(self._token, "[REDACTED]")
        text = redact(text)
        with self._lock:
            self.last_error = text
            self.last_error_time = self._wall_clock()
        logger.warning("alert sender: %s", text)

    # ------------------------------------------------------------ status

    def get_status(self) -> dict[str, Any]:
        """Counters and state for /status; never contains the token or chat id."""
        with self._lock:
            return {
                "enabled": self.enabled,
                "mode": "telegram" if self.enabled else "log_only",
                "running": self._task is not None and not self._task.done(),
                "sent": self.sent,
                "deduplicated": self.deduplicated,
                "dropped": self.dropped,
                "failed": self.failed,
                "retried": self.retried,
                "queue_size": len(self._queue) + (1 if self._inflight is not None else 0),
                "queue_capacity": self._queue_size,
                "waiting_for": self._waiting_for.value if self._waiting_for else None,
                "last_error": self.last_error,
                "last_error_time": _iso(self.last_error_time),
                "last_sent_time": _iso(self.last_sent_time),
                "active": sorted(f"{t.value}:{k}" for t, k in self._dedupe.active),
            }


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return dt.datetime.fromtimestamp(wall, tz=dt.timezone.utc).isoformat()


def build_alert_sink(settings: Any, bot_name: str) -> AlertSink:
    """Choose the alert sink the settings call for.

    Args:
        settings: Anything with ``alert_bot_token``, ``alert_chat_id``,
            ``alert_api_base`` and ``alert_dedupe_window`` (CommonSettings).
        bot_name: Shown in each alert.

    Returns:
        A `TelegramAlertSender` when both token and chat id are set, else a
        `LogAlertSink`. Call ``await sink.start()`` and ``await sink.close()``
        on either.
    """
    token = getattr(settings, "alert_bot_token", None)
    chat_id = getattr(settings, "alert_chat_id", None)
    window = float(getattr(settings, "alert_dedupe_window", 600) or 600)
    if token and chat_id:
        return TelegramAlertSender(
            bot_token=token,
            chat_id=str(chat_id),
            bot_name=bot_name,
            api_base=getattr(settings, "alert_api_base", None) or "https://api.telegram.org",
            dedupe_window=window,
        )
    if token or chat_id:
        logger.warning("alerts: ALERT_BOT_TOKEN and ALERT_CHAT_ID must both be set; alerts will only be logged")
    else:
        logger.info("alerts: no ALERT_BOT_TOKEN configured; alerts will only be logged")
    return LogAlertSink(bot_name=bot_name, dedupe_window=window)
