"""Retry with exponential backoff, built on tenacity.

``retry_async`` retries only what :func:`shared.errors.classify` calls
transient, and honours a rate limit's ``retry_after`` when it is short
enough to wait inside the call; a longer one is raised at once so the
caller can reschedule the work instead of sleeping on it. Permanent errors,
unknown outcomes and dead accounts are never retried here: retrying a send
whose outcome is unknown is the caller's decision (it needs the same
``random_id``).

``exponential_delay`` is the one backoff formula of the project (reconnects,
watchdog restarts, the supervisor, the retry queue).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from shared.errors import ErrorKind, classify

logger = logging.getLogger(__name__)

T = TypeVar("T")


def exponential_delay(attempt: int, *, base: float, cap: float, jitter: bool = True) -> float:
    """Delay before retry number ``attempt`` (1-based): base, 2*base, 4*base ... capped.

    With ``jitter`` the value is drawn from [delay/2, delay] ("equal jitter"),
    so a fleet of clients does not retry in lockstep.
    """
    delay = min(cap, base * 2.0 ** min(max(0, attempt - 1), 60))  # the exponent capped: no float overflow
    if jitter:
        delay = delay / 2 + random.uniform(0, delay / 2)
    return delay


def _should_retry(max_rate_wait: float) -> Callable[[BaseException], bool]:
    def predicate(exc: BaseException) -> bool:
        verdict = classify(exc)
        if verdict.kind is ErrorKind.TRANSIENT:
            # A transient error may name its own wait (an open circuit breaker):
            # like a rate limit, a long one is raised for the caller to reschedule.
            return verdict.retry_after is None or verdict.retry_after <= max_rate_wait
        if verdict.kind is ErrorKind.RATE_LIMITED:
            return (verdict.retry_after or 0.0) <= max_rate_wait
        return False

    return predicate


def _wait(base_delay: float, max_delay: float) -> Callable[[RetryCallState], float]:
    def compute(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None:
            verdict = classify(exc)
            if verdict.retry_after is not None:
                return verdict.retry_after
        return exponential_delay(state.attempt_number, base=base_delay, cap=max_delay)

    return compute


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    max_retries: int = 3,
    base_delay: float = 1.0,
    max_delay: float = 10.0,
    max_rate_wait: float | None = None,
    name: str = "",
) -> T:
    """Await ``fn()`` and retry it on transient errors.

    Args:
        fn: a zero-argument coroutine function (called again on each attempt).
        max_retries: retries after the first attempt.
        base_delay: first delay; it doubles each retry.
        max_delay: the cap of one delay.
        max_rate_wait: the longest rate-limit wait honoured inside the call
            (default ``max_delay``); longer ones raise at once.
        name: for the log lines.
    """

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.warning(
            "retrying %s after %s (attempt %d of %d)",
            name or getattr(fn, "__qualname__", "call"),
            type(exc).__name__ if exc else "error",
            state.attempt_number,
            max_retries + 1,
            extra={"sleep_s": round(state.upcoming_sleep, 3)},
        )

    retrying = AsyncRetrying(
        stop=stop_after_attempt(max_retries + 1),
        wait=_wait(base_delay, max_delay),
        retry=retry_if_exception(_should_retry(max_delay if max_rate_wait is None else max_rate_wait)),
        before_sleep=log_retry,
        sleep=asyncio.sleep,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover
