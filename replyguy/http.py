"""One remote JSON API (X or the AI service): deadline, breaker, backoff, rate limits.

:class:`HttpService` is what the X and AI clients share. Every request runs
under a deadline (TIMEOUT_HTTP); each attempt goes through the service's
circuit breaker; transient failures are retried by ``shared.retry`` (3
retries, 1 s doubling to 10 s by default); a 429 is turned into
:class:`shared.errors.RateLimitedError` with the wait the service asked for,
an operator alert (``rate_limit_exceeded``) and a local gate that refuses
further calls to that endpoint until the limit resets, so we never hammer a
service that told us to wait.

The service also remembers how its last call went, for
``health_check_all()``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from shared import metrics
from shared.alerts import AlertSink, AlertType
from shared.breaker import CircuitBreaker, CircuitOpenError
from shared.config import ReplyGuySettings
from shared.errors import ErrorKind, RateLimitedError, TransientError, UnknownOutcomeError, classify, describe
from shared.retry import retry_async
from shared.timeouts import bounded

from replyguy.health import Health, breaker_health, worst

logger = logging.getLogger(__name__)

T = TypeVar("T")


#: The largest answer read from the X or AI API; a bigger one is refused, not held in memory.
MAX_ANSWER_BYTES = 2 * 1024 * 1024


async def read_capped(response: aiohttp.ClientResponse, what: str) -> bytes:
    """The body, or TransientError when it is larger than :data:`MAX_ANSWER_BYTES`."""
    declared = response.content_length
    if declared is not None and declared > MAX_ANSWER_BYTES:
        raise TransientError(f"{what}: answer too large ({declared} bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise TransientError(f"{what}: answer too large (over {MAX_ANSWER_BYTES} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class RetryPolicy:
    """``retry_async`` settings for one service (3 retries, 1 s base, 10 s cap)."""

    max_retries: int = 3
    base_delay: float = 1.0
    max_delay: float = 10.0


@dataclass(frozen=True)
class HttpSettings:
    """How the X and AI clients call their service, built once from the settings.

    One object handed to every client (and by the client to its
    :class:`HttpService`), instead of the same loose parameters passed on at
    each level.

    Attributes:
        timeout: deadline of one request, including reading the answer (TIMEOUT_HTTP).
        retry: backoff for transient failures.
        alerts: where ``rate_limit_exceeded`` goes (None: logged only).
        clock: wall-clock seconds (rate-limit resets are wall-clock times).
    """

    timeout: float
    retry: RetryPolicy = RetryPolicy()
    alerts: AlertSink | None = None
    clock: Callable[[], float] = time.time

    @classmethod
    def from_settings(cls, settings: ReplyGuySettings, *, alerts: AlertSink | None, retry: RetryPolicy = RetryPolicy()) -> HttpSettings:
        """From a bot's settings (``timeout_http``, TIMEOUT_HTTP) and its alert sink."""
        return cls(timeout=settings.timeout_http, retry=retry, alerts=alerts)


@dataclass(frozen=True)
class HttpResult:
    """A response, read in full within the deadline."""

    status: int
    headers: Mapping[str, str]
    """Header names lower-cased."""
    body: bytes

    def json(self) -> Any:
        """The body as JSON.

        Raises:
            ValueError: the body is not JSON (nesting too deep for the parser included).
        """
        try:
            return json.loads(self.body.decode("utf-8"))
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    def error_detail(self) -> str:
        """The service's own words about an error, shortened."""
        try:
            data = self.json()
        except ValueError:
            return self.body[:200].decode("utf-8", "replace")
        if isinstance(data, dict):
            for key in ("detail", "title", "message"):
                if isinstance(data.get(key), str):
                    return data[key][:200]
            error = data.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return error["message"][:200]
            errors = data.get("errors")
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                return str(errors[0].get("message") or errors[0].get("detail") or errors[0])[:200]
        return str(data)[:200]


class HttpService:
    """Calls to one remote API.

    Args:
        name: ``twitter`` or ``ai``; names metrics, logs and alerts.
        breaker: the service's circuit breaker (``twitter_api``, ``ai_service``).
        settings: deadline, backoff, alert sink and clock.
    """

    def __init__(self, name: str, *, breaker: CircuitBreaker, settings: HttpSettings) -> None:
        self.name = name
        self.breaker = breaker
        self.settings = settings
        self.timeout = settings.timeout
        self.retry = settings.retry
        self.alerts = settings.alerts
        self.clock = settings.clock
        self._session: aiohttp.ClientSession | None = None
        self._limited_until: dict[str, float] = {}
        self.last_ok_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_call_failed = False
        self.calls = 0
        self.rate_limits = 0

    # --- plumbing -------------------------------------------------------------------

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout + 5),
                raise_for_status=False,
            )
        return self._session

    async def close(self) -> None:
        """Close the session this service made."""
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def send(
        self,
        endpoint: str,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        changes_state: bool = False,
    ) -> HttpResult:
        """One request under the deadline, read in full.

        Args:
            endpoint: a short, low-cardinality name (``search``, ``post``).
            changes_state: the request creates something (a POST). Then a
                timeout or a connection lost after the request may have been
                sent means "maybe done": :class:`UnknownOutcomeError` or an
                ``OperationTimeout`` with ``outcome_unknown``.

        Raises:
            RateLimitedError: the endpoint's rate limit has not reset yet (no request made).
            OperationTimeout: past the deadline.
            aiohttp.ClientConnectorError: no connection could be made (nothing was sent).
            UnknownOutcomeError: the connection broke after a state-changing request went out.
            aiohttp.ClientError: other connection problems of a read.
        """
        self.check_gate(endpoint)

        async def go() -> HttpResult:
            try:
                async with self._session_now().request(
                    method, url, params=params, json=json_body, headers=dict(headers), allow_redirects=False
                ) as response:
                    body = await read_capped(response, f"{self.name} {endpoint}")
                    return HttpResult(response.status, {k.lower(): v for k, v in response.headers.items()}, body)
            except aiohttp.ClientConnectorError:
                raise  # never connected: nothing was sent
            except aiohttp.ClientError as exc:
                if changes_state:
                    raise UnknownOutcomeError(f"{self.name} {endpoint}: connection lost ({describe(exc)})") from exc
                raise

        self.calls += 1
        return await metrics.api_call(self.name, bounded(go(), self.timeout, f"{self.name}.{endpoint}", outcome_unknown=changes_state))

    async def call(self, endpoint: str, attempt: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """Run ``attempt`` through the breaker, retrying transient failures with backoff.

        Raises:
            CircuitOpenError: the breaker was open before this call tried anything.
            Exception: the last failure (already classified by its type). When
                this call's own failures opened the breaker, that failure is
                raised, not the "breaker open" of the retry after it: the item
                being worked on caused it and must have it counted (a poison
                item would otherwise be handed to every trial call again).
        """
        own_failures: list[BaseException] = []

        async def guarded() -> T:
            try:
                return await self.breaker.call(attempt)
            except CircuitOpenError:
                raise
            except Exception as exc:
                own_failures.append(exc)
                raise

        try:
            if retry:
                result = await retry_async(
                    guarded,
                    max_retries=self.retry.max_retries,
                    base_delay=self.retry.base_delay,
                    max_delay=self.retry.max_delay,
                    name=f"{self.name}.{endpoint}",
                )
            else:
                result = await guarded()
        except CircuitOpenError as exc:
            if not own_failures:
                self._failed(endpoint, exc)
                raise
            cause = own_failures[-1]
            self._failed(endpoint, cause)
            raise cause from exc
        except Exception as exc:
            self._failed(endpoint, exc)
            raise
        self.last_ok_at = self.clock()
        self.last_call_failed = False
        return result

    async def probe(self, url: str, headers: Mapping[str, str]) -> None:
        """One GET past the breaker and without retries: the open breaker's probe.

        Any answer but a server error means the service is back (a 401 or a
        429 is the service answering; real calls will hear it themselves).

        Raises:
            TransientError: a 5xx, 408 or 425.
            OperationTimeout: no answer within the deadline.
            aiohttp.ClientError: no connection.
        """
        result = await self.send("probe", "GET", url, headers=headers)
        if result.status >= 500 or result.status in (408, 425):
            raise TransientError(f"{self.name} probe answered {result.status}")

    def _failed(self, endpoint: str, exc: BaseException) -> None:
        verdict = classify(exc)
        if verdict.kind is ErrorKind.PERMANENT:
            # Our request was wrong (or a duplicate); the service itself answered fine.
            self.last_ok_at = self.clock()
            return
        self.last_call_failed = True
        self.last_error = f"{endpoint}: {verdict.reason}"
        self.last_error_at = self.clock()

    # --- rate limits ---------------------------------------------------------------------

    def check_gate(self, endpoint: str) -> None:
        """Refuse a call while the endpoint's rate limit has not reset.

        Raises:
            RateLimitedError: with the seconds left.
        """
        until = self._limited_until.get(endpoint)
        if until is None:
            return
        left = until - self.clock()
        if left <= 0:
            self._limited_until.pop(endpoint, None)
            return
        raise RateLimitedError(f"{self.name} {endpoint} rate limited for {left:.0f}s more", retry_after=left)

    def rate_limited(self, endpoint: str, retry_after: float, *, detail: str = "") -> RateLimitedError:
        """Record a 429, alert the operator and return the error to raise."""
        wait = max(1.0, retry_after)
        self._limited_until[endpoint] = self.clock() + wait
        self.rate_limits += 1
        reset_at = time.strftime("%H:%M:%S UTC", time.gmtime(self.clock() + wait))
        message = f"{self.name} API rate limit reached on {endpoint}; waiting {wait:.0f}s (until {reset_at})"
        logger.warning(message, extra={"service": self.name, "endpoint": endpoint, "retry_after_s": round(wait, 1)})
        if self.alerts is not None:
            self.alerts.alert(
                AlertType.RATE_LIMIT_EXCEEDED,
                message,
                key=f"{self.name}:{endpoint}",
                details={"service": self.name, "endpoint": endpoint, "retry_after_s": round(wait), "detail": detail},
            )
        return RateLimitedError(message, retry_after=wait)

    def limited_until(self) -> dict[str, float]:
        """Endpoints still rate limited, with the wall-clock time they reset."""
        now = self.clock()
        return {endpoint: until for endpoint, until in self._limited_until.items() if until > now}

    # --- health ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``healthy`` | ``degraded`` | ``error`` from the breaker, rate limits and the last call."""
        states = [breaker_health(self.breaker)]
        limited = self.limited_until()
        if limited or self.last_call_failed:
            states.append(Health.DEGRADED)
        return {
            "status": worst(states).value,
            "circuit_breaker": self.breaker.get_status()["state"],
            "last_ok_at": self.last_ok_at,
            "last_error": self.last_error,
            "last_call_failed": self.last_call_failed,
            "rate_limited": {k: round(v - self.clock(), 1) for k, v in limited.items()},
            "calls": self.calls,
        }


def retry_after_header(headers: Mapping[str, str], default: float) -> float:
    """Seconds from a ``retry-after`` header (a number; names lower-cased), else ``default``."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
    return default


__all__ = ["HttpResult", "HttpService", "HttpSettings", "RetryPolicy", "retry_after_header"]
