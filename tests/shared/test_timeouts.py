"""Tests for shared/timeouts.py: every network await ends, and nothing is swallowed.

The "hung" callees wait on events nobody sets, the way a silent socket looks;
each test names its operation uniquely so the Prometheus counters it reads
are its own.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from shared import timeouts
from shared.timeouts import OperationTimeout, bounded, db_op, deadline, telegram_op

WAIT = 5.0  # deadline of every wait in these tests; never reached when they pass


def calls(operation: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("bot_operation_calls_total", {"operation": operation, "outcome": outcome}) or 0.0


def latency_count(operation: str) -> float:
    return REGISTRY.get_sample_value("bot_operation_seconds_count", {"operation": operation}) or 0.0


class Hung:
    """A callee that never answers until cancelled; records that it was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def __call__(self) -> str:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "never"


async def test_hung_telegram_call_is_cut_at_its_timeout_and_raised_as_operation_timeout() -> None:
    hung = Hung()
    started = time.monotonic()
    with pytest.raises(OperationTimeout) as caught:
        await telegram_op(hung(), 0.05, "t_hung_send", outcome_unknown=True, detail="chat 42")
    elapsed = time.monotonic() - started

    err = caught.value
    assert isinstance(err, TimeoutError)
    assert (err.name, err.seconds, err.outcome_unknown) == ("telegram.t_hung_send", 0.05, True)
    assert "chat 42" in str(err) and "outcome unknown" in str(err)
    assert hung.cancelled.is_set(), "the hung call is cancelled, not left running"
    assert elapsed < 0.05 + timeouts.CANCEL_GRACE_SECONDS
    assert calls("telegram.t_hung_send", "timeout") == 1


async def test_db_timeout_without_outcome_unknown_says_so() -> None:
    with pytest.raises(OperationTimeout) as caught:
        await db_op(Hung()(), 0.02, "t_hung_claim")
    assert caught.value.name == "db.t_hung_claim"
    assert caught.value.outcome_unknown is False
    assert "outcome unknown" not in str(caught.value)


async def test_result_is_returned_and_counted_ok() -> None:
    async def answer() -> dict[str, int]:
        return {"id": 7}

    before = latency_count("db.t_ok")
    assert await db_op(answer(), 1.0, "t_ok") == {"id": 7}
    assert await bounded(answer(), 1.0, "t_ok_bounded") == {"id": 7}
    assert calls("db.t_ok", "ok") == 1
    assert calls("t_ok_bounded", "ok") == 1
    assert latency_count("db.t_ok") == before + 1


async def test_errors_propagate_unchanged_and_are_never_turned_into_none() -> None:
    original = ValueError("Cannot find any entity corresponding to 'nobody'")

    async def fail() -> str:
        raise original

    with pytest.raises(ValueError) as caught:
        await telegram_op(fail(), 1.0, "t_raises")
    assert caught.value is original
    assert calls("telegram.t_raises", "error") == 1
    assert calls("telegram.t_raises", "timeout") == 0


async def test_a_timeout_error_raised_by_the_callee_is_not_relabelled() -> None:
    inner = TimeoutError("the library's own timeout")

    async def fail() -> None:
        raise inner

    with pytest.raises(TimeoutError) as caught:
        await db_op(fail(), 1.0, "t_inner_timeout")
    assert caught.value is inner
    assert not isinstance(caught.value, OperationTimeout)


async def test_cancelling_the_caller_passes_through_and_cancels_the_inner_work() -> None:
    hung = Hung()
    caller = asyncio.create_task(telegram_op(hung(), 60, "t_caller_cancelled"))
    await asyncio.wait_for(hung.started.wait(), WAIT)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, WAIT)
    await asyncio.wait_for(hung.cancelled.wait(), WAIT)
    assert calls("telegram.t_caller_cancelled", "timeout") == 0


async def test_a_callee_that_ignores_cancellation_is_abandoned_and_the_call_still_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()
    finished = asyncio.Event()
    refusals = 0

    async def stubborn() -> None:
        nonlocal refusals
        try:
            while not release.is_set():
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    refusals += 1  # swallowed: the callee ignores cancellation
        finally:
            finished.set()

    started = time.monotonic()
    with pytest.raises(OperationTimeout) as caught:
        await asyncio.wait_for(db_op(stubborn(), 0.05, "t_stubborn"), WAIT)
    elapsed = time.monotonic() - started

    assert caught.value.name == "db.t_stubborn"
    assert refusals >= 1, "it was asked to stop"
    assert not finished.is_set(), "it is still running: abandoned, not awaited"
    assert elapsed < 0.05 + timeouts.CANCEL_GRACE_SECONDS + 2.0
    assert any("abandoned" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    # Let the abandoned callee end so the event loop can close.
    release.set()
    await asyncio.wait_for(finished.wait(), WAIT)


async def test_deadline_block_raises_operation_timeout_with_its_name() -> None:
    hung = Hung()
    with pytest.raises(OperationTimeout) as caught:
        async with deadline(0.05, "t_cycle", outcome_unknown=True):
            await hung()
    assert (caught.value.name, caught.value.seconds, caught.value.outcome_unknown) == ("t_cycle", 0.05, True)
    assert hung.cancelled.is_set()
    assert calls("t_cycle", "timeout") == 1


async def test_deadline_block_passes_results_errors_and_inner_timeouts_through() -> None:
    async with deadline(1.0, "t_block_ok"):
        value = await asyncio.sleep(0, result=3)
    assert value == 3
    assert calls("t_block_ok", "ok") == 1

    with pytest.raises(KeyError):
        async with deadline(1.0, "t_block_error"):
            raise KeyError("missing")
    assert calls("t_block_error", "error") == 1

    inner = OperationTimeout("db.t_inner", 0.01)
    with pytest.raises(OperationTimeout) as caught:
        async with deadline(1.0, "t_block_inner"):
            raise inner
    assert caught.value is inner, "an inner deadline's error is kept, not replaced by the block's"
    assert calls("t_block_inner", "timeout") == 0


async def test_cancelling_a_deadline_block_passes_through() -> None:
    hung = Hung()

    async def block() -> None:
        async with deadline(60, "t_block_cancelled"):
            await hung()

    task = asyncio.create_task(block())
    await asyncio.wait_for(hung.started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert calls("t_block_cancelled", "timeout") == 0


async def test_timeouts_are_counted_per_operation_name() -> None:
    for _ in range(3):
        with pytest.raises(OperationTimeout):
            await telegram_op(Hung()(), 0.01, "t_count_a")
    with pytest.raises(OperationTimeout):
        await telegram_op(Hung()(), 0.01, "t_count_b")
    assert calls("telegram.t_count_a", "timeout") == 3
    assert calls("telegram.t_count_b", "timeout") == 1
