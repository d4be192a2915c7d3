"""Tests for shared/watchdog.py: silent, crashing and stubborn loops are restarted; storms alert once.

Small real timings (max_silence 0.3 s, check_interval 0.1 s, backoff 0.05 s)
and the real event loop; every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from shared.breaker import CircuitOpenError
from shared.timeouts import OperationTimeout
from shared.watchdog import LoopState, LoopWatchdog, periodic
from tests.helpers import RecordingAlerts
from tests.helpers import wait_until as until

MAX_SILENCE = 0.3
CHECK_INTERVAL = 0.1
BACKOFF = 0.05
SLACK = 0.3  # scheduling slack on a busy 2-core machine; a correctness bound, not a speed target
EARLY = 0.01  # asyncio may fire a timer up to its clock resolution early



@pytest.fixture
async def make_watchdog() -> AsyncIterator[Callable[..., LoopWatchdog]]:
    """Build watchdogs with the small test timings; every one is stopped afterwards."""
    made: list[LoopWatchdog] = []

    def make(**kwargs: Any) -> LoopWatchdog:
        options: dict[str, Any] = {
            "max_silence": MAX_SILENCE,
            "check_interval": CHECK_INTERVAL,
            "startup_grace": 0.0,
            "backoff_base": BACKOFF,
            "backoff_max": 1.0,
            "cancel_grace": 0.2,
            "storm_restarts": 50,
        }
        options.update(kwargs)
        watchdog = LoopWatchdog(**options)
        made.append(watchdog)
        return watchdog

    yield make
    for watchdog in made:
        await watchdog.stop(timeout=1.0)


class Starts:
    """Records when a factory was called, so tests can wait for (re)starts."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def mark(self) -> int:
        self.times.append(time.monotonic())
        return len(self.times)

    def __len__(self) -> int:
        return len(self.times)


async def test_a_loop_that_stops_pinging_is_restarted_within_max_silence_plus_check_interval(
    make_watchdog: Callable[..., LoopWatchdog],
) -> None:
    watchdog = make_watchdog()
    starts = Starts()
    last_ping = 0.0

    async def body() -> None:
        nonlocal last_ping
        run = starts.mark()
        pings = 0
        while True:
            if run == 1 and pings >= 5:
                await asyncio.Event().wait()  # hung: silent, but honours cancellation
            watchdog.ping("silent")
            if run == 1:
                last_ping = time.monotonic()
            pings += 1
            await asyncio.sleep(0.02)

    watchdog.register("silent", body)
    await watchdog.start()
    await until(lambda: len(starts) >= 2, what="the restart")

    gap = starts.times[1] - last_ping
    status = watchdog.get_status()["silent"]
    assert status["restarts"] == 1
    assert status["last_restart_reason"] == "silent"
    assert status["last_error"] is not None and "silent for" in status["last_error"]
    assert MAX_SILENCE - EARLY <= gap <= MAX_SILENCE + CHECK_INTERVAL + BACKOFF + SLACK, gap


async def test_a_crashing_loop_is_restarted_with_growing_backoff_and_its_traceback_logged(
    make_watchdog: Callable[..., LoopWatchdog], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="shared.watchdog")
    watchdog = make_watchdog(backoff_max=10.0)
    starts = Starts()

    async def crashing_cycle_of_doom() -> None:
        run = starts.mark()
        if run <= 4:
            raise RuntimeError(f"boom {run}")
        await asyncio.Event().wait()

    watchdog.register("crasher", crashing_cycle_of_doom)
    await watchdog.start()
    await until(lambda: len(starts) >= 5, what="four restarts")

    gaps = [b - a for a, b in zip(starts.times, starts.times[1:])]
    expected = [BACKOFF * 2**n for n in range(4)]  # 0.05, 0.1, 0.2, 0.4
    for gap, delay in zip(gaps, expected):
        assert gap >= delay - EARLY, (gaps, expected)
    assert gaps[3] > gaps[0], gaps

    status = watchdog.get_status()["crasher"]
    assert status["restarts"] == 4
    assert status["last_restart_reason"] == "crashed"
    assert status["last_error"] == "RuntimeError: boom 4"
    assert REGISTRY.get_sample_value("bot_loop_restarts_total", {"loop": "crasher", "reason": "crashed"}) >= 4

    crashes = [r.getMessage() for r in caplog.records if "crasher crashed" in r.getMessage()]
    assert len(crashes) == 4
    assert "Traceback (most recent call last)" in crashes[0]
    assert "crashing_cycle_of_doom" in crashes[0] and "RuntimeError: boom 1" in crashes[0]


async def test_a_loop_that_returns_is_restarted(make_watchdog: Callable[..., LoopWatchdog]) -> None:
    watchdog = make_watchdog()
    starts = Starts()

    async def body() -> None:
        if starts.mark() == 1:
            return
        await asyncio.Event().wait()

    watchdog.register("returner", body)
    await watchdog.start()
    await until(lambda: len(starts) >= 2, what="the restart")
    assert watchdog.get_status()["returner"]["last_restart_reason"] == "returned"


async def test_a_loop_that_ignores_cancellation_is_abandoned_reported_and_replaced(
    make_watchdog: Callable[..., LoopWatchdog],
) -> None:
    watchdog = make_watchdog(cancel_grace=0.1)
    starts = Starts()
    release = asyncio.Event()
    stubborn_finished = asyncio.Event()
    fresh_pings = 0

    async def body() -> None:
        nonlocal fresh_pings
        if starts.mark() == 1:
            try:
                while not release.is_set():
                    try:
                        await release.wait()  # silent, and deaf to cancellation
                    except asyncio.CancelledError:
                        pass
            finally:
                stubborn_finished.set()
            return
        while True:
            watchdog.ping("stubborn")
            fresh_pings += 1
            await asyncio.sleep(0.02)

    watchdog.register("stubborn", body)
    await watchdog.start()
    try:
        await until(lambda: fresh_pings >= 3, what="a fresh loop running")
        status = watchdog.get_status()["stubborn"]
        assert status["abandoned"] == 1
        assert "abandoned" in (status["last_error"] or "")
        assert status["alive"] is True
        assert not stubborn_finished.is_set(), "the abandoned task was not awaited to its end"
    finally:
        release.set()
        await asyncio.wait_for(stubborn_finished.wait(), 5)


async def test_a_restart_storm_marks_the_loop_failing_and_alerts_exactly_once(
    make_watchdog: Callable[..., LoopWatchdog],
) -> None:
    sink = RecordingAlerts()
    watchdog = make_watchdog(storm_restarts=3, backoff_max=BACKOFF, alerts=sink)
    starts = Starts()

    async def body() -> None:
        starts.mark()
        raise ConnectionError("database unreachable")

    watchdog.register("storm", body)
    await watchdog.start()
    assert watchdog.is_healthy()
    await until(lambda: watchdog.get_status()["storm"]["state"] == "failing", what="failing")
    assert not watchdog.is_healthy()
    assert watchdog.failing() == ["storm"]
    assert watchdog.summary()["failing"] == ["storm"]

    restarts_then = watchdog.get_status()["storm"]["restarts"]
    await until(lambda: watchdog.get_status()["storm"]["restarts"] >= restarts_then + 3, what="more restarts")
    storms = sink.of_type("restart_storm")
    assert len(storms) == 1, sink.alerts
    assert storms[0][2] == "storm:storm"
    assert len(sink.of_type("loop_restarted")) >= 3
    assert watchdog.get_status()["storm"]["state"] == LoopState.FAILING.value


async def test_a_storm_clears_with_a_resolved_alert_once_the_loop_is_stable(
    make_watchdog: Callable[..., LoopWatchdog],
) -> None:
    sink = RecordingAlerts()
    watchdog = make_watchdog(storm_restarts=2, storm_window=0.5, backoff_max=BACKOFF, alerts=sink)
    starts = Starts()

    async def body() -> None:
        if starts.mark() <= 3:
            raise RuntimeError("flapping")
        while True:
            watchdog.ping("flappy")
            await asyncio.sleep(0.02)

    watchdog.register("flappy", body)
    await watchdog.start()
    await until(lambda: len(sink.of_type("restart_storm")) == 1, what="the storm alert")
    await until(lambda: watchdog.is_healthy(), what="the storm to clear")
    assert sink.resolved == [("restart_storm", "storm:flappy")]
    assert watchdog.get_status()["flappy"]["state"] == "running"


async def test_the_monitor_task_is_restarted_when_killed(make_watchdog: Callable[..., LoopWatchdog]) -> None:
    watchdog = make_watchdog()
    starts = Starts()
    silent = asyncio.Event()

    async def body() -> None:
        starts.mark()
        while not silent.is_set():
            watchdog.ping("watched")
            await asyncio.sleep(0.02)
        await asyncio.Event().wait()

    watchdog.register("watched", body)
    await watchdog.start()

    def monitors() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "watchdog-monitor" and not t.done()]

    (monitor,) = monitors()
    monitor.cancel()
    await until(lambda: watchdog.summary()["monitor_restarts"] == 1, what="the monitor restart")
    (replacement,) = monitors()
    assert replacement is not monitor

    silent.set()  # the new monitor must still do its job
    await until(lambda: len(starts) >= 2, what="the silent loop's restart by the new monitor")
    assert watchdog.summary()["monitor_alive"] is True


async def test_is_healthy_is_false_before_start_and_after_stop(make_watchdog: Callable[..., LoopWatchdog]) -> None:
    watchdog = make_watchdog()

    async def body() -> None:
        while True:
            watchdog.ping("idle")
            await asyncio.sleep(0.02)

    watchdog.register("idle", body)
    assert not watchdog.is_healthy()
    await watchdog.start()
    assert watchdog.is_healthy()
    await watchdog.stop()
    assert not watchdog.is_healthy()
    assert watchdog.get_status()["idle"]["state"] == "stopped"
    assert watchdog.get_status()["idle"]["alive"] is False


async def test_register_refuses_duplicates_and_starts_late_loops_at_once(
    make_watchdog: Callable[..., LoopWatchdog],
) -> None:
    watchdog = make_watchdog()
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        await asyncio.Event().wait()

    await watchdog.start()
    watchdog.register("late", body, max_silence=5.0)
    with pytest.raises(ValueError):
        watchdog.register("late", body)
    await asyncio.wait_for(started.wait(), 5)
    assert watchdog.get_status()["late"]["max_silence_s"] == 5.0


async def test_get_status_has_every_field(make_watchdog: Callable[..., LoopWatchdog]) -> None:
    watchdog = make_watchdog()

    async def body() -> None:
        while True:
            watchdog.ping("fields")
            await asyncio.sleep(0.02)

    watchdog.register("fields", body)
    await watchdog.start()
    await until(lambda: watchdog.get_status()["fields"]["cycles"] >= 2, what="pings")
    watchdog.record_error("fields", KeyError("chat"))
    status = watchdog.get_status()["fields"]
    assert set(status) == {
        "state", "alive", "last_ping_ago_s", "max_silence_s", "restarts", "restarts_in_window",
        "last_restart_reason", "abandoned", "cycles", "cycle_errors", "last_error", "last_error_at",
    }
    assert status["state"] == "running" and status["alive"] is True
    assert 0 <= status["last_ping_ago_s"] <= MAX_SILENCE
    assert (status["restarts"], status["abandoned"], status["cycle_errors"]) == (0, 0, 1)
    assert status["last_error"] == "KeyError: 'chat'"
    assert set(watchdog.summary()) == {"healthy", "monitor_alive", "monitor_restarts", "failing"}


# --- periodic() -------------------------------------------------------------------


async def run_periodic(
    make_watchdog: Callable[..., LoopWatchdog],
    name: str,
    cycle: Callable[[], Awaitable[float | None]],
    **kwargs: Any,
) -> LoopWatchdog:
    watchdog = make_watchdog(max_silence=30.0)
    options: dict[str, Any] = {"interval": 0.01, "cycle_timeout": 5.0, "error_backoff_max": 0.02}
    options.update(kwargs)
    watchdog.register(name, periodic(watchdog, name, cycle, **options))
    await watchdog.start()
    return watchdog


async def test_periodic_catches_a_failing_cycle_records_it_and_keeps_going(
    make_watchdog: Callable[..., LoopWatchdog],
) -> None:
    calls = 0

    async def cycle() -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ValueError(f"bad row {calls}")

    watchdog = await run_periodic(make_watchdog, "t_periodic_errors", cycle)
    await until(lambda: calls >= 5, what="cycles after the failures")
    status = watchdog.get_status()["t_periodic_errors"]
    assert status["restarts"] == 0, "a failed cycle does not kill the loop"
    assert status["cycle_errors"] == 2
    assert status["last_error"] == "ValueError: bad row 2"
    assert status["cycles"] >= 5
    assert REGISTRY.get_sample_value(
        "bot_loop_cycle_errors_total", {"loop": "t_periodic_errors", "kind": "permanent"}
    ) == 2


async def test_periodic_resumes_when_an_open_breaker_lets_a_probe_through_not_after_a_blind_backoff(
    make_watchdog: Callable[..., LoopWatchdog], caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    second = asyncio.Event()

    async def cycle() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise CircuitOpenError("database", retry_after=0.3)
        second.set()

    caplog.set_level(logging.WARNING, logger="shared.watchdog")
    # Without the breaker's hint the pause after a failed cycle would be the 60 s interval.
    await run_periodic(make_watchdog, "t_periodic_breaker", cycle, interval=60.0, error_backoff_max=60.0)
    await asyncio.wait_for(second.wait(), 10)
    assert calls == 2
    assert "loop t_periodic_breaker waits 1.0s: circuit breaker 'database' is open" in caplog.text


async def test_periodic_refusals_by_an_open_breaker_do_not_grow_the_pause_after_a_plain_failure(
    make_watchdog: Callable[..., LoopWatchdog], caplog: pytest.LogCaptureFixture
) -> None:
    """A long outage means many refusals; the plain failure after them (a probe let through that
    failed) waits as a first failure does, about a second, not the 60 s cap."""
    from shared.errors import TransientError

    calls = 0
    done = asyncio.Event()

    async def cycle() -> None:
        nonlocal calls
        calls += 1
        if calls <= 8:
            raise CircuitOpenError("database", retry_after=0.0)
        if calls == 9:
            raise TransientError("database away")
        done.set()

    caplog.set_level(logging.WARNING, logger="shared.watchdog")
    await run_periodic(make_watchdog, "t_periodic_refusals", cycle, interval=0.01, error_backoff_max=60.0)
    await asyncio.wait_for(done.wait(), 10)  # counted with the refusals: 9 failures, a 30-60 s pause
    assert calls == 10
    assert "loop t_periodic_refusals cycle failed (transient): database away" in caplog.text


async def test_periodic_refused_by_an_open_breaker_goes_on_the_moment_it_closes(
    make_watchdog: Callable[..., LoopWatchdog],
) -> None:
    from shared.breaker import CircuitBreaker
    from shared.errors import TransientError

    breaker = CircuitBreaker("t_periodic_close", failure_threshold=1, recovery_timeout=3600.0)
    calls = 0
    ran = asyncio.Event()

    async def down() -> None:
        raise TransientError("database away")

    async def work() -> None:
        return None

    async def cycle() -> None:
        nonlocal calls
        calls += 1
        ran.set()
        await breaker.call(work)

    with pytest.raises(TransientError):
        await breaker.call(down)
    # The breaker says "an hour" (no probe): the pause is the 60 s cap, unless its closing wakes the loop.
    await run_periodic(make_watchdog, "t_periodic_close", cycle, interval=60.0, error_backoff_max=60.0)
    await asyncio.wait_for(ran.wait(), 5)
    ran.clear()
    assert calls == 1
    breaker.reset()  # closed: what a probe that succeeded does
    await asyncio.wait_for(ran.wait(), 5)  # far less than the 60 s pause
    assert calls == 2
    assert not breaker._close_waiters, "the loop's waiter is gone once it woke"


async def test_periodic_wakes_early_on_its_event(make_watchdog: Callable[..., LoopWatchdog]) -> None:
    wake = asyncio.Event()
    calls = 0
    ran = asyncio.Event()

    async def cycle() -> None:
        nonlocal calls
        calls += 1
        ran.set()

    await run_periodic(make_watchdog, "t_periodic_wake", cycle, interval=60.0, wake=wake)
    await asyncio.wait_for(ran.wait(), 5)
    ran.clear()
    assert calls == 1
    wake.set()
    await asyncio.wait_for(ran.wait(), 5)  # far less than the 60 s interval
    assert calls == 2


async def test_periodic_cycle_return_value_sets_the_pause(make_watchdog: Callable[..., LoopWatchdog]) -> None:
    calls = 0
    third = asyncio.Event()

    async def cycle() -> float | None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            third.set()
            return None  # back to the 60 s interval
        return 0  # more work waiting: run again at once

    await run_periodic(make_watchdog, "t_periodic_pause", cycle, interval=60.0)
    await asyncio.wait_for(third.wait(), 5)
    assert calls == 3


async def test_periodic_cuts_a_hung_cycle_at_cycle_timeout(make_watchdog: Callable[..., LoopWatchdog]) -> None:
    calls = 0
    recovered = asyncio.Event()
    first_cancelled = asyncio.Event()

    async def cycle() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                first_cancelled.set()
                raise
        recovered.set()

    watchdog = await run_periodic(make_watchdog, "t_periodic_hung", cycle, cycle_timeout=0.05)
    await asyncio.wait_for(recovered.wait(), 5)
    assert first_cancelled.is_set()
    status = watchdog.get_status()["t_periodic_hung"]
    assert status["cycle_errors"] == 1
    assert status["restarts"] == 0
    expected = str(OperationTimeout("t_periodic_hung.cycle", 0.05))
    assert status["last_error"] == f"OperationTimeout: {expected}"


async def test_an_idle_pause_longer_than_max_silence_is_not_a_hang_but_a_stuck_cycle_is(
    make_watchdog: Callable[..., LoopWatchdog],
) -> None:
    watchdog = make_watchdog()  # max silence 0.3 s
    idle_cycles = 0
    stuck = asyncio.Event()

    async def idle() -> float:
        nonlocal idle_cycles
        idle_cycles += 1
        return 1.0  # sleeps 1 s between cycles, on purpose

    async def hangs() -> float:
        stuck.set()
        await asyncio.Event().wait()
        return 0.0

    watchdog.register("t_idle", periodic(watchdog, "t_idle", idle, interval=1.0, cycle_timeout=60.0))
    watchdog.register("t_stuck", periodic(watchdog, "t_stuck", hangs, interval=0.01, cycle_timeout=60.0))
    await watchdog.start()
    await asyncio.wait_for(stuck.wait(), 5)
    deadline = time.monotonic() + 5
    while watchdog.get_status()["t_stuck"]["restarts"] == 0:
        assert time.monotonic() < deadline, "the stuck cycle was never restarted"
        await asyncio.sleep(0.01)
    while idle_cycles < 2:  # a second idle cycle: at least one full pause has passed
        assert time.monotonic() < deadline + 5
        await asyncio.sleep(0.01)
    assert watchdog.get_status()["t_idle"]["restarts"] == 0
