"""Tests for shared/retry.py: what is retried, how often, how long it waits."""

from __future__ import annotations

import logging
import time

import pytest

from shared.breaker import CircuitOpenError
from shared.errors import AccountDeadError, PermanentError, RateLimitedError, TransientError, UnknownOutcomeError
from shared.retry import exponential_delay, retry_async
from shared.timeouts import OperationTimeout


class Flaky:
    """Raises the scripted errors in turn, then answers; counts its attempts."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.attempts = 0
        self.raised: list[BaseException] = []

    async def __call__(self) -> str:
        self.attempts += 1
        if self.errors:
            error = self.errors.pop(0)
            self.raised.append(error)
            raise error
        return "done"


FAST = {"base_delay": 0.001, "max_delay": 0.01}


async def test_transient_errors_are_retried_until_success() -> None:
    flaky = Flaky(TransientError("blip 1"), ConnectionResetError("blip 2"))
    assert await retry_async(flaky, max_retries=3, **FAST) == "done"
    assert flaky.attempts == 3


async def test_gives_up_after_max_retries_and_raises_the_last_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shared.retry")
    flaky = Flaky(*(TransientError(f"blip {i}") for i in range(10)))

    async def send() -> str:
        return await flaky()

    with pytest.raises(TransientError) as caught:
        await retry_async(send, max_retries=2, name="send", **FAST)
    assert flaky.attempts == 3, "the first attempt plus max_retries retries"
    assert caught.value is flaky.raised[-1]
    retries_logged = [r for r in caplog.records if r.getMessage().startswith("retrying")]
    assert len(retries_logged) == 2
    assert "send" in retries_logged[0].getMessage()


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("message too long"),
        ValueError("bad input"),
        UnknownOutcomeError("send may have landed"),
        OperationTimeout("telegram.send_message", 30, outcome_unknown=True),
        AccountDeadError("session revoked"),
    ],
    ids=["permanent", "value_error", "unknown_outcome", "timeout_outcome_unknown", "account_dead"],
)
async def test_permanent_errors_and_unknown_outcomes_are_not_retried(error: BaseException) -> None:
    flaky = Flaky(error, error)
    with pytest.raises(type(error)) as caught:
        await retry_async(flaky, max_retries=5, **FAST)
    assert caught.value is error
    assert flaky.attempts == 1


async def test_a_plain_timeout_is_transient_and_retried() -> None:
    flaky = Flaky(OperationTimeout("db.claim", 10))
    assert await retry_async(flaky, max_retries=1, **FAST) == "done"
    assert flaky.attempts == 2


async def test_a_short_rate_limit_is_waited_out_inside_the_call() -> None:
    flaky = Flaky(RateLimitedError("flood wait", retry_after=0.05))
    started = time.monotonic()
    assert await retry_async(flaky, max_retries=1, base_delay=0.001, max_delay=1.0) == "done"
    assert flaky.attempts == 2
    assert time.monotonic() - started >= 0.05, "the service's retry_after is honoured, not the shorter backoff"


async def test_a_rate_limit_longer_than_max_delay_is_raised_at_once() -> None:
    error = RateLimitedError("flood wait", retry_after=120)
    flaky = Flaky(error)
    started = time.monotonic()
    with pytest.raises(RateLimitedError) as caught:
        await retry_async(flaky, max_retries=3, base_delay=0.001, max_delay=1.0)
    assert caught.value is error and caught.value.retry_after == 120
    assert flaky.attempts == 1
    assert time.monotonic() - started < 5


async def test_max_rate_wait_overrides_max_delay_for_rate_limits() -> None:
    flaky = Flaky(RateLimitedError("flood wait", retry_after=0.02))
    with pytest.raises(RateLimitedError):
        await retry_async(flaky, max_retries=3, base_delay=0.001, max_delay=1.0, max_rate_wait=0.01)
    assert flaky.attempts == 1


async def test_a_transient_error_asking_for_a_long_wait_is_raised_not_slept_on() -> None:
    # An open circuit is transient but says "not for 30 s": raise it so the caller reschedules.
    error = CircuitOpenError("t_retry_breaker", 30.0)
    flaky = Flaky(error)
    with pytest.raises(CircuitOpenError):
        await retry_async(flaky, max_retries=3, base_delay=0.001, max_delay=0.5)
    assert flaky.attempts == 1


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (50, 10.0)],
)
def test_exponential_delay_doubles_from_base_and_stops_at_the_cap(attempt: int, expected: float) -> None:
    assert exponential_delay(attempt, base=1.0, cap=10.0, jitter=False) == expected


def test_exponential_delay_of_a_huge_attempt_number_is_the_cap_not_an_overflow() -> None:
    assert exponential_delay(10_000, base=1.0, cap=60.0, jitter=False) == 60.0


def test_exponential_delay_jitter_stays_between_half_and_full_delay() -> None:
    for attempt in range(1, 8):
        full = min(10.0, 2 ** (attempt - 1))
        for _ in range(50):
            delay = exponential_delay(attempt, base=1.0, cap=10.0)
            assert full / 2 <= delay <= full
