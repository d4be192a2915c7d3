"""Tests for shared/breaker.py: the breaker walked state by state with an injected clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from shared.breaker import BreakerRegistry, CircuitBreaker, CircuitOpenError, CircuitState, registry
from shared.errors import ErrorKind, PermanentError, TransientError, classify
from tests.helpers import FakeClock, RecordingAlerts, wait_until



async def ok() -> str:
    return "ok"


async def down() -> None:
    raise TransientError("service down")


async def bad_input() -> None:
    raise PermanentError("message too long")


async def fail_n(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(TransientError, match="service down"):
            await breaker.call(down)


def make(name: str, clock: FakeClock, **kwargs: Any) -> CircuitBreaker:
    options: dict[str, Any] = {"failure_threshold": 3, "recovery_timeout": 30.0, "half_open_max_calls": 2,
                               "success_threshold": 2}
    options.update(kwargs)
    return CircuitBreaker(name, clock=clock, **options)


async def test_opens_at_its_failure_threshold_and_refuses_with_retry_after() -> None:
    clock = FakeClock()
    breaker = make("t_opens", clock)
    await fail_n(breaker, 2)
    assert breaker.state is CircuitState.CLOSED
    await fail_n(breaker, 1)
    assert breaker.state is CircuitState.OPEN

    clock.advance(10)
    called = False

    async def must_not_run() -> None:
        nonlocal called
        called = True

    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call(must_not_run)
    assert not called
    assert caught.value.breaker == "t_opens"
    assert caught.value.retry_after == pytest.approx(20.0)
    verdict = classify(caught.value)
    assert verdict.kind is ErrorKind.TRANSIENT and verdict.retry_after == pytest.approx(20.0)
    assert REGISTRY.get_sample_value("bot_breaker_state", {"breaker": "t_opens"}) == 2


async def test_a_success_resets_the_consecutive_failure_count() -> None:
    breaker = make("t_resets_count", FakeClock())
    await fail_n(breaker, 2)
    assert await breaker.call(ok) == "ok"
    await fail_n(breaker, 2)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.get_status()["consecutive_failures"] == 2


async def test_half_opens_after_the_recovery_timeout_and_closes_after_success_threshold() -> None:
    clock = FakeClock()
    breaker = make("t_half_open", clock)
    await fail_n(breaker, 3)
    clock.advance(29.9)
    assert breaker.state is CircuitState.OPEN
    clock.advance(0.1)
    assert breaker.state is CircuitState.HALF_OPEN

    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.HALF_OPEN, "one success of two is not enough"
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.CLOSED
    assert REGISTRY.get_sample_value("bot_breaker_state", {"breaker": "t_half_open"}) == 0


async def test_half_open_admits_at_most_half_open_max_calls_trials() -> None:
    clock = FakeClock()
    breaker = make("t_trials", clock, half_open_max_calls=2, success_threshold=2)
    await fail_n(breaker, 3)
    clock.advance(30)

    release = asyncio.Event()
    entered = 0

    async def slow_trial() -> str:
        nonlocal entered
        entered += 1
        await release.wait()
        return "ok"

    trials = [asyncio.create_task(breaker.call(slow_trial)) for _ in range(2)]
    async with asyncio.timeout(5):
        while entered < 2:
            await asyncio.sleep(0.01)
    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call(ok)
    assert caught.value.retry_after == 0.0
    assert breaker.get_status()["rejected_calls"] == 1

    release.set()
    assert await asyncio.wait_for(asyncio.gather(*trials), 5) == ["ok", "ok"]
    assert breaker.state is CircuitState.CLOSED


async def test_a_failure_in_half_open_reopens_for_a_full_recovery_timeout() -> None:
    clock = FakeClock()
    breaker = make("t_reopen", clock)
    await fail_n(breaker, 3)
    clock.advance(30)
    assert breaker.state is CircuitState.HALF_OPEN
    await fail_n(breaker, 1)
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call(ok)
    assert caught.value.retry_after == pytest.approx(30.0)
    assert breaker.get_status()["times_opened"] == 2


async def test_a_cancelled_trial_frees_its_half_open_slot() -> None:
    clock = FakeClock()
    breaker = make("t_cancel_trial", clock, half_open_max_calls=1, success_threshold=1)
    await fail_n(breaker, 3)
    clock.advance(30)
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    trial = asyncio.create_task(breaker.call(hang))
    await asyncio.wait_for(started.wait(), 5)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.CLOSED


@pytest.mark.parametrize("error", [PermanentError("text too long"), ValueError("bad chat id")], ids=["permanent", "value"])
async def test_permanent_errors_do_not_count_toward_opening(error: Exception) -> None:
    breaker = make("t_permanent_" + type(error).__name__, FakeClock())

    async def raise_it() -> None:
        raise error

    for _ in range(10):
        with pytest.raises(type(error)):
            await breaker.call(raise_it)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.get_status()["total_failures"] == 0


async def test_a_permanent_error_in_half_open_neither_reopens_nor_uses_up_a_trial() -> None:
    clock = FakeClock()
    breaker = make("t_half_open_permanent", clock, half_open_max_calls=1, success_threshold=1)
    await fail_n(breaker, 3)
    clock.advance(30)
    with pytest.raises(PermanentError):
        await breaker.call(bad_input)
    assert breaker.state is CircuitState.HALF_OPEN
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.CLOSED


async def test_custom_counts_predicate_decides_what_is_a_failure() -> None:
    breaker = make("t_counts", FakeClock(), failure_threshold=1, counts=lambda exc: isinstance(exc, KeyError))
    with pytest.raises(TransientError):
        await breaker.call(down)
    assert breaker.state is CircuitState.CLOSED

    async def missing() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await breaker.call(missing)
    assert breaker.state is CircuitState.OPEN


async def test_sync_callables_through_call_sync_and_in_a_thread() -> None:
    clock = FakeClock()
    breaker = make("t_sync", clock, failure_threshold=2)

    def upload(size: int) -> int:
        if size < 0:
            raise ConnectionResetError("reset by peer")
        return size

    assert breaker.call_sync(upload, 5) == 5
    assert await asyncio.to_thread(breaker.call_sync, upload, 6) == 6
    for _ in range(2):
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(breaker.call_sync, upload, -1)
    with pytest.raises(CircuitOpenError):
        breaker.call_sync(upload, 1)


async def test_decorator_form_wraps_sync_and_async_functions() -> None:
    clock = FakeClock()
    breaker = make("t_decorator", clock, failure_threshold=1)

    @breaker
    async def fetch(x: int) -> int:
        if x < 0:
            raise TransientError("down")
        return x * 2

    @breaker
    def compute(x: int) -> int:
        return x + 1

    assert fetch.__name__ == "fetch" and compute.__name__ == "compute"
    assert await fetch(2) == 4
    assert compute(2) == 3
    with pytest.raises(TransientError):
        await fetch(-1)
    with pytest.raises(CircuitOpenError):
        await fetch(2)
    with pytest.raises(CircuitOpenError):
        compute(2)


async def test_reset_closes_an_open_circuit() -> None:
    clock = FakeClock()
    breaker = make("t_reset", clock)
    await fail_n(breaker, 3)
    assert breaker.state is CircuitState.OPEN
    breaker.reset()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.get_status()["consecutive_failures"] == 0
    assert await breaker.call(ok) == "ok"


async def test_get_status_reports_state_counts_and_time_to_next_probe() -> None:
    clock = FakeClock()
    breaker = make("t_status", clock)
    assert await breaker.call(ok) == "ok"
    await fail_n(breaker, 3)
    clock.advance(12)
    status = breaker.get_status()
    assert status["name"] == "t_status"
    assert status["state"] == "open"
    assert status["retry_in_s"] == 18.0
    assert status["total_failures"] == 3 and status["total_successes"] == 1
    assert status["times_opened"] == 1
    assert status["last_error"] == "TransientError: service down"
    assert {"failure_threshold", "recovery_timeout_s", "half_open_max_calls", "success_threshold",
            "rejected_calls", "last_error_at", "last_change_at"} <= status.keys()


async def test_opening_alerts_once_and_closing_resolves() -> None:
    clock = FakeClock()
    sink = RecordingAlerts()
    breaker = make("t_alerts", clock, alerts=sink, success_threshold=1)
    await fail_n(breaker, 3)
    assert [(a[0], a[2]) for a in sink.alerts] == [("circuit_breaker_open", "breaker:t_alerts")]
    assert "t_alerts" in sink.alerts[0][1]
    assert sink.details[0] is not None and "service down" in sink.details[0]["error"]

    # Re-opening from half-open is the same incident: no second alert.
    clock.advance(30)
    await fail_n(breaker, 1)
    assert len(sink.alerts) == 1
    assert sink.resolved == []

    clock.advance(30)
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.CLOSED
    assert [(r[0], r[1]) for r in sink.resolved] == [("circuit_breaker_open", "breaker:t_alerts")]


async def test_a_failing_alert_sink_never_breaks_the_caller() -> None:
    class BrokenSink(RecordingAlerts):
        def alert(self, type: str, message: str, *, key: str | None = None, details: dict[str, Any] | None = None) -> bool:
            raise RuntimeError("sink exploded")

    breaker = make("t_broken_sink", FakeClock(), alerts=BrokenSink(), failure_threshold=1)
    await fail_n(breaker, 1)
    assert breaker.state is CircuitState.OPEN


def test_invalid_thresholds_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("t_invalid", failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("t_invalid", recovery_timeout=-1)


async def test_registry_returns_one_breaker_per_name_and_reports_every_status() -> None:
    own = BreakerRegistry()
    sink = RecordingAlerts()
    first = own.get_or_create("t_reg_db", failure_threshold=1)
    assert own.get_or_create("t_reg_db", failure_threshold=99) is first
    assert first.failure_threshold == 1
    own.get_or_create("t_reg_storage")
    own.set_alerts(sink)
    later = own.get_or_create("t_reg_telegram")
    assert first.alerts is sink and later.alerts is sink

    with pytest.raises(TransientError):
        await first.call(down)
    status = own.status()
    assert list(status) == ["t_reg_db", "t_reg_storage", "t_reg_telegram"]
    assert status["t_reg_db"]["state"] == "open"
    assert own.any_open()
    assert len(sink.alerts) == 1
    own.clear()
    assert own.status() == {}

    shared_breaker = registry.get_or_create("t_process_wide")
    assert registry.get("t_process_wide") is shared_breaker
    assert registry.status()["t_process_wide"]["state"] == "closed"


class Service:
    """A dependency that is down until the test brings it back; counts the calls it gets."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0
        self.probes = 0
        self.error: Exception = TransientError("service down")

    async def work(self) -> str:
        self.calls += 1
        if not self.up:
            raise self.error
        return "ok"

    async def probe(self) -> None:
        self.probes += 1
        if not self.up:
            raise self.error


async def test_an_open_breaker_probes_and_closes_as_soon_as_the_service_is_back() -> None:
    service = Service()
    breaker = CircuitBreaker("probed", failure_threshold=2, recovery_timeout=3600.0, success_threshold=2, probe_interval=0.05)
    breaker.set_probe(service.probe)
    for _ in range(2):
        with pytest.raises(TransientError):
            await breaker.call(service.work)
    assert breaker.state is CircuitState.OPEN
    await wait_until(lambda: service.probes >= 3, timeout=5, what="three probes")
    with pytest.raises(CircuitOpenError) as refused:
        await breaker.call(service.work)
    assert refused.value.retry_after <= 0.05 + 0.1 + 1e-6, "callers wait for the next probe, not the recovery timeout"
    assert service.calls == 2, "while open, only the probe touches the service"

    service.up = True
    await wait_until(lambda: breaker.state is CircuitState.CLOSED, timeout=5, what="closed by the probes")
    assert await breaker.call(service.work) == "ok"
    assert breaker.get_status()["probe_interval_s"] == 0.05


async def test_a_failure_that_leaves_the_circuit_closed_probes_and_says_when_the_service_is_back() -> None:
    """A short outage fails one call and never opens the circuit: its work hears "back" from the probe."""
    service = Service()
    breaker = CircuitBreaker("suspect", failure_threshold=5, recovery_timeout=3600.0, probe_interval=0.05)
    breaker.set_probe(service.probe)
    heard: list[str] = []
    breaker.on_close(lambda: heard.append("back"))
    with pytest.raises(TransientError):
        await breaker.call(service.work)
    await wait_until(lambda: service.probes >= 2, timeout=5, what="the suspect service probed")
    assert breaker.state is CircuitState.CLOSED and heard == [], "down: probed, nothing heard yet"
    assert service.calls == 1, "probing touches only the probe"

    service.up = True
    await wait_until(lambda: heard == ["back"], timeout=5, what="the service heard back")
    await wait_until(lambda: breaker._probe_task is not None and breaker._probe_task.done(), timeout=5,
                     what="probing ended: a service that answered is probed no more")
    assert breaker.state is CircuitState.CLOSED


async def test_a_suspect_service_whose_first_probe_answers_retries_nothing_early() -> None:
    """The failure may be the call's own (one bad request): the service was never seen down."""
    service = Service()
    breaker = CircuitBreaker("suspect-up", failure_threshold=5, recovery_timeout=3600.0, probe_interval=0.05)
    breaker.set_probe(service.probe)
    heard: list[str] = []
    breaker.on_close(lambda: heard.append("back"))
    with pytest.raises(TransientError):
        await breaker.call(service.work)
    service.up = True
    await wait_until(lambda: service.probes >= 1 and breaker._probe_task is not None and breaker._probe_task.done(),
                     timeout=5, what="the probe answered")
    assert heard == []


async def test_a_probe_answered_with_a_permanent_error_still_says_the_service_is_up() -> None:
    service = Service()
    breaker = CircuitBreaker("probed-permanent", failure_threshold=1, recovery_timeout=3600.0, success_threshold=1,
                             half_open_max_calls=1, probe_interval=0.05)
    breaker.set_probe(service.probe)
    with pytest.raises(TransientError):
        await breaker.call(service.work)
    service.error = PermanentError("403: the key may not HEAD the bucket")
    await wait_until(lambda: breaker.state is CircuitState.CLOSED, timeout=5, what="closed by the probes")


async def test_without_a_probe_the_recovery_timeout_applies_and_clearing_stops_probing() -> None:
    service = Service()
    breaker = CircuitBreaker("unprobed", failure_threshold=1, recovery_timeout=3600.0, probe_interval=0.05)
    breaker.set_probe(service.probe)
    breaker.clear_probe(service.probe)
    with pytest.raises(TransientError):
        await breaker.call(service.work)
    service.up = True
    assert breaker._probe_task is None and breaker.get_status()["probe_interval_s"] is None
    assert service.probes == 0 and breaker.state is CircuitState.OPEN


async def test_the_registry_applies_the_probe_interval_to_every_breaker() -> None:
    reg = BreakerRegistry()
    first = reg.get_or_create("first")
    reg.set_probe_interval(0.5)
    second = reg.get_or_create("second")
    assert first.probe_interval == second.probe_interval == 0.5


async def test_on_close_listeners_hear_each_time_the_service_is_back_and_a_failing_one_breaks_nothing() -> None:
    clock = FakeClock()
    breaker = make("t_on_close", clock)
    heard: list[str] = []
    breaker.on_close(lambda: heard.append("back"))
    breaker.on_close(lambda: 1 / 0)  # type: ignore[func-returns-value]
    await fail_n(breaker, 3)
    assert heard == []
    clock.advance(30)
    assert await breaker.call(ok) == "ok"
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.CLOSED
    assert heard == ["back"]


class HungService(Service):
    """A service whose probes hang until the test lets them go: a failover that stalls every connection."""

    def __init__(self) -> None:
        super().__init__()
        self.released = asyncio.Event()

    async def probe(self) -> None:
        self.probes += 1
        if self.probes == 1:
            await self.released.wait()  # stalled until the connection is reset
            raise TransientError("connection reset")
        if not self.up:
            raise self.error


async def test_a_probe_that_hung_until_the_service_came_back_is_followed_at_once_and_waiters_wake_on_close() -> None:
    clock = FakeClock()
    service = HungService()
    breaker = CircuitBreaker("probed-hung", failure_threshold=1, recovery_timeout=1e9, success_threshold=2, probe_interval=0.05,
                             clock=clock)
    breaker.set_probe(service.probe)
    with pytest.raises(TransientError):
        await breaker.call(service.work)
    closing = breaker.closing()
    await wait_until(lambda: service.probes == 1, timeout=5, what="the first probe hung")
    breaker.probe_interval = 3600.0  # from now on a probe is due an hour after the last one started
    clock.advance(3601.0)  # the hung probe has been in flight longer than that
    service.up = True
    service.released.set()  # the service is back: the stalled connection is reset, the probe fails
    await wait_until(lambda: breaker.state is CircuitState.CLOSED, timeout=10, what="closed by the next probes, not an hour later")
    assert service.probes >= 3, "the failed probe and two that confirm the return"
    await asyncio.wait_for(closing, 1)
    assert breaker.closing().done(), "a closed breaker's closing() is resolved at once"


async def test_closing_futures_that_were_given_up_are_forgotten() -> None:
    breaker = CircuitBreaker("closing-forgotten", failure_threshold=1, recovery_timeout=1e9)
    with pytest.raises(TransientError):
        await breaker.call(down)
    for _ in range(100):
        breaker.closing().cancel()  # each loop pause gives up its future when it ends
    kept = breaker.closing()
    assert len(breaker._close_waiters) == 1
    breaker.reset()
    await asyncio.wait_for(kept, 1)


def test_a_probe_left_behind_by_an_ended_event_loop_does_not_stop_probing_in_the_next() -> None:
    """A process-wide breaker outlives an ``asyncio.run`` (a CLI call, a test): its probe there never ends."""
    service = Service()
    breaker = CircuitBreaker("two-loops", failure_threshold=5, recovery_timeout=3600.0, probe_interval=0.01)
    breaker.set_probe(service.probe)

    async def fail_once() -> None:
        with pytest.raises(TransientError):
            await breaker.call(service.work)

    async def fail_then_recover() -> None:
        await fail_once()
        await wait_until(lambda: service.probes >= 1, timeout=5, what="probed in this loop")
        service.up = True
        await wait_until(lambda: breaker.times_back == 1, timeout=5, what="the service seen back")

    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(fail_once())  # suspect: a probe starts in this loop...
    finally:
        first.close()  # ...which ends without cancelling it (asyncio.run would)
    asyncio.run(fail_then_recover())
