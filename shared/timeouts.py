"""Deadlines for every network await.

``telegram_op`` and ``db_op`` run an awaitable under a deadline and raise a
typed :class:`OperationTimeout` when it passes. Nothing is swallowed: other
errors propagate unchanged, and cancellation of the caller passes through.
A callee that ignores cancellation is abandoned after a short grace instead
of being awaited forever (``asyncio.wait_for`` would hang on it).

Each call is counted per operation name (calls, timeouts, errors, latency)
for ``/metrics``; keep names low-cardinality (``send_message``, not
``send_message(12345)``) and put identifiers into ``detail``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from shared import tracing
from shared.metrics import OP_CALLS, OP_LATENCY

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a timed-out callee gets to honour its cancellation before it is abandoned.
CANCEL_GRACE_SECONDS = 1.0


class OperationTimeout(TimeoutError):
    """An operation passed its deadline.

    Attributes:
        name: the operation name.
        seconds: the deadline that passed.
        outcome_unknown: True when the call may have taken effect anyway
            (a send whose answer never came); such work must only be retried
            idempotently.
    """

    def __init__(self, name: str, seconds: float, *, outcome_unknown: bool = False, detail: str = "") -> None:
        self.name = name
        self.seconds = seconds
        self.outcome_unknown = outcome_unknown
        self.detail = detail
        what = f"{name}({detail})" if detail else name
        suffix = "; outcome unknown" if outcome_unknown else ""
        super().__init__(f"{what} timed out after {seconds:g}s{suffix}")


_abandoned: set[asyncio.Future[object]] = set()


def _forget(task: asyncio.Future[object]) -> None:
    _abandoned.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.debug("abandoned operation finished with %r", task.exception())


async def _run_with_deadline(aw: Awaitable[T], timeout: float, name: str, outcome_unknown: bool, detail: str) -> T:
    # Inside a trace every bounded call is a child span (the task below copies the context).
    with tracing.operation_span(name, timeout=timeout, outcome_unknown=outcome_unknown) as span:
        try:
            result = await _run_untraced(aw, timeout, name, outcome_unknown, detail)
        except OperationTimeout as exc:
            tracing.finish_operation(span, "timeout", exc)
            raise
        except BaseException as exc:
            tracing.finish_operation(span, "cancelled" if isinstance(exc, asyncio.CancelledError) else "error", exc)
            raise
        tracing.finish_operation(span, "ok")
        return result


async def _run_untraced(aw: Awaitable[T], timeout: float, name: str, outcome_unknown: bool, detail: str) -> T:
    started = time.perf_counter()
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        OP_LATENCY.labels(name).observe(time.perf_counter() - started)
    if task in done:
        try:
            result = task.result()
        except BaseException:
            OP_CALLS.labels(name, "error").inc()
            raise
        OP_CALLS.labels(name, "ok").inc()
        return result
    OP_CALLS.labels(name, "timeout").inc()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE_SECONDS)
    if not done:
        logger.error(
            "operation ignored cancellation and was abandoned",
            extra={"operation": name, "detail": detail, "timeout_s": timeout},
        )
        _abandoned.add(task)
        task.add_done_callback(_forget)
    elif not task.cancelled() and task.exception() is not None:
        # It failed while being cancelled; the timeout is still the story.
        logger.debug("timed-out operation %s also raised %r", name, task.exception())
    logger.warning(
        "operation timed out",
        extra={"operation": name, "detail": detail, "timeout_s": timeout, "outcome_unknown": outcome_unknown},
    )
    raise OperationTimeout(name, timeout, outcome_unknown=outcome_unknown, detail=detail)


async def telegram_op(
    aw: Awaitable[T], timeout: float, name: str, *, outcome_unknown: bool = False, detail: str = ""
) -> T:
    """Await a Telegram call under a deadline.

    Args:
        aw: the coroutine or future to await.
        timeout: seconds before :class:`OperationTimeout` is raised.
        name: low-cardinality operation name for logs and metrics.
        outcome_unknown: set for calls that change state on Telegram's side
            (sends, edits): their timeout means "maybe done".
        detail: free text for the log line (a peer, an id).

    Raises:
        OperationTimeout: the deadline passed.
        Exception: whatever the call raised, unchanged.
    """
    return await _run_with_deadline(aw, timeout, f"telegram.{name}", outcome_unknown, detail)


async def db_op(aw: Awaitable[T], timeout: float, name: str, *, outcome_unknown: bool = False, detail: str = "") -> T:
    """Await a database call under a deadline. Same contract as :func:`telegram_op`."""
    return await _run_with_deadline(aw, timeout, f"db.{name}", outcome_unknown, detail)


async def bounded(aw: Awaitable[T], timeout: float, name: str, *, outcome_unknown: bool = False, detail: str = "") -> T:
    """Await any other network call (HTTP, storage) under a deadline."""
    return await _run_with_deadline(aw, timeout, name, outcome_unknown, detail)


@asynccontextmanager
async def deadline(seconds: float, name: str, *, outcome_unknown: bool = False) -> AsyncIterator[None]:
    """Bound a block of awaits: ``async with deadline(120, "outbound.cycle"): ...``.

    Raises:
        OperationTimeout: the block ran past ``seconds``.
    """
    started = time.perf_counter()
    outcome = "ok"
    scope = asyncio.timeout(seconds)
    try:
        async with scope:
            yield
    except TimeoutError:
        if not scope.expired():
            outcome = "error"
            raise
        outcome = "timeout"
        raise OperationTimeout(name, seconds, outcome_unknown=outcome_unknown) from None
    except BaseException:
        outcome = "error"
        raise
    finally:
        OP_CALLS.labels(name, outcome).inc()
        OP_LATENCY.labels(name).observe(time.perf_counter() - started)
