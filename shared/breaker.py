"""Circuit breakers: stop hammering a service that is down, probe it, recover.

CLOSED lets calls through and counts consecutive failures; at
``failure_threshold`` it turns OPEN and refuses calls with
:class:`CircuitOpenError` (a transient error carrying ``retry_after``) for
``recovery_timeout`` seconds; then HALF_OPEN admits at most
``half_open_max_calls`` trial calls: ``success_threshold`` successes close
it, one failure opens it again.

A breaker may also be given a *probe*: a cheap call of the service's own (the
database's ``select 1``, a HEAD of the bucket, an authenticated GET). While
the circuit is open, the probe runs every ``probe_interval`` seconds in the
background (BREAKER_PROBE_INTERVAL, default 2 s) and ``success_threshold``
probes in a row close the circuit, so work resumes within seconds of the
service's return instead of after the full recovery timeout. Real calls are
still refused while it is open: only the probe touches the failing service,
once per interval. The recovery timeout stays as the fallback (a probe that
cannot tell, e.g. one the credentials may not make).

A counted failure that leaves the circuit closed (fewer than
``failure_threshold``) makes the service *suspect*: the probe runs at the same
interval until it answers. A short outage often fails one call and never
opens the circuit, and that call's work then waits out its retry delay (a
minute by default) although the service came back seconds later. So when a
probe failed (the service was seen down) and a later one succeeds while the
circuit is still closed, the ``on_close`` listeners hear "the service is
back" just as when a circuit closes. If the first probe succeeds, the service
was never seen down: the failure may be the call's own, so nothing is retried
early and its delay stands.

Why our own code and not a library: pybreaker is synchronous (its async
support needs Tornado) and has no half-open call limit; purgatory is async
but has neither a half-open call limit nor a success threshold, and neither
can decide what counts as a failure through our error classifier. This file
is small enough to read in one sitting and is tested state by state.

Only failures that say something about the service count: by default those
:func:`shared.errors.classify` calls transient or unknown-outcome. A
"message too long" is the caller's problem and leaves the breaker closed.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from shared.errors import ErrorKind, TransientError, classify
from shared.metrics import BREAKER_STATE, BREAKER_TRANSITIONS

if TYPE_CHECKING:
    from shared.alerts import AlertSink

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class CircuitState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_STATE_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


class CircuitOpenError(TransientError):
    """Raised instead of calling a service whose breaker is open.

    ``source`` is the breaker that refused: a caller that waits ``retry_after``
    can wait on :meth:`closing` as well and go on the moment the circuit
    closes (a probe succeeded), instead of sleeping out a pause that was only
    an estimate.
    """

    def __init__(self, breaker: str, retry_after: float, *, source: CircuitBreaker | None = None) -> None:
        self.breaker = breaker
        self.retry_after = max(0.0, retry_after)
        self.source = source
        super().__init__(f"circuit breaker '{breaker}' is open; next probe in {self.retry_after:.1f}s")

    def closing(self) -> asyncio.Future[None] | None:
        """A future that resolves when the refusing breaker closes again (None: breaker unknown)."""
        return self.source.closing() if self.source is not None else None


#: Seconds between probes of an open circuit (BREAKER_PROBE_INTERVAL).
DEFAULT_PROBE_INTERVAL = 2.0

#: The longest a probe may take before it counts as failed.
PROBE_TIMEOUT = 10.0

#: After a successful probe the confirming ones follow this much sooner (at most).
CONFIRM_PROBE_GAP = 0.5

Probe = Callable[[], Awaitable[Any]]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _counts_by_default(exc: BaseException) -> bool:
    return classify(exc).kind in (ErrorKind.TRANSIENT, ErrorKind.UNKNOWN_OUTCOME)


class CircuitBreaker:
    """A circuit breaker for sync and async callables.

    Args:
        name: shown in /status, metrics and alerts.
        failure_threshold: consecutive counted failures that open the circuit.
        recovery_timeout: seconds the circuit stays open before probing.
        half_open_max_calls: trial calls admitted while half-open.
        success_threshold: successful trials that close the circuit
            (capped at ``half_open_max_calls``).
        counts: decides whether an exception counts as a failure; by default
            the classifier's transient and unknown-outcome kinds. Rate limits
            do not count: the caller waits the time asked for, and a flood
            wait on one chat says nothing about the whole service.
        clock: monotonic seconds; injectable for tests.
        alerts: where "circuit_breaker_open" and its resolution go.
        probe: a cheap call of the service, run in the background while the
            circuit is open (see :meth:`set_probe`).
        probe_interval: seconds between probes.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        half_open_max_calls: int = 3,
        success_threshold: int = 2,
        counts: Callable[[BaseException], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        alerts: AlertSink | None = None,
        probe: Probe | None = None,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
    ) -> None:
        if failure_threshold < 1 or half_open_max_calls < 1 or success_threshold < 1 or recovery_timeout < 0:
            raise ValueError("breaker thresholds must be >= 1 and the recovery timeout >= 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.half_open_max_calls = half_open_max_calls
        self.success_threshold = min(success_threshold, half_open_max_calls)
        self.alerts = alerts
        self._counts = counts or _counts_by_default
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials_admitted = 0
        self._trial_successes = 0
        self._total_failures = 0
        self._total_successes = 0
        self._rejected = 0
        self._times_opened = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_change_at = time.time()
        self._probe: Probe | None = probe
        self.probe_interval = probe_interval
        self._probe_task: asyncio.Task[None] | None = None
        self._next_probe_at: float | None = None
        self._probes_run = 0
        self._suspect = False
        self._times_back = 0
        self._on_close: list[Callable[[], None]] = []
        self._close_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        BREAKER_STATE.labels(name).set(0)

    # --- state ------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def _maybe_half_open(self) -> None:
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self.recovery_timeout:
            self._transition(CircuitState.HALF_OPEN)

    def _transition(self, to: CircuitState) -> None:
        previous = self._state
        if previous is to:
            return
        self._state = to
        self._last_change_at = time.time()
        if to is CircuitState.OPEN:
            self._opened_at = self._clock()
            self._times_opened += 1
        if to is CircuitState.HALF_OPEN:
            self._trials_admitted = 0
            self._trial_successes = 0
        if to is CircuitState.CLOSED:
            self._failures = 0
            self._next_probe_at = None
        BREAKER_STATE.labels(self.name).set(_STATE_VALUE[to])
        BREAKER_TRANSITIONS.labels(self.name, to.value).inc()
        log = logger.warning if to is CircuitState.OPEN else logger.info
        log(
            "circuit breaker %s: %s -> %s",
            self.name,
            previous.value,
            to.value,
            extra={"breaker": self.name, "from": previous.value, "to": to.value, "last_error": self._last_error},
        )
        self._notify(previous, to)
        if to is CircuitState.OPEN:
            self._start_probing()
        if to is CircuitState.CLOSED:
            self._suspect = False
            self._wake_close_waiters()
            self._service_back()

    @property
    def times_back(self) -> int:
        """How often the service was seen back (a close, or a suspect service answering after failed
        probes). A caller that notes it before a call and finds it changed after the call failed knows
        the service returned meanwhile: that call's retry need not wait out its delay."""
        return self._times_back

    def _service_back(self) -> None:
        self._times_back += 1
        for callback in list(self._on_close):
            try:
                callback()
            except Exception:  # a listener must never break the caller
                logger.exception("breaker %s: an on_close listener failed", self.name)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the service is back: the circuit closes again, or a probe
        answers after probes of a suspect service (a failure that left the circuit closed) failed.
        Work that failed while it was down can then go again at once instead of waiting out its
        retry delay. It runs in the thread that saw the service back and must not block."""
        self._on_close.append(callback)

    def closing(self) -> asyncio.Future[None]:
        """A future of the running loop that resolves when the circuit closes (at once when it is closed).

        Why: a loop refused by the open circuit waits until the next probe, but
        the probe's outcome is not known in advance; waiting on this as well
        lets it go on the instant the service is confirmed back. The caller
        cancels the future when it stops waiting (it is then forgotten).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._state is CircuitState.CLOSED:
                future.set_result(None)
                return future
            self._close_waiters = [(lp, f) for lp, f in self._close_waiters if not f.done()]
            self._close_waiters.append((loop, future))
        return future

    def _wake_close_waiters(self) -> None:
        """Resolve every :meth:`closing` future (called under the lock, from any thread)."""
        waiters, self._close_waiters = self._close_waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # its loop is closed
                pass

    def _notify(self, previous: CircuitState, to: CircuitState) -> None:
        if self.alerts is None:
            return
        from shared.alerts import AlertType

        key = f"breaker:{self.name}"
        try:
            if to is CircuitState.OPEN and previous is CircuitState.CLOSED:
                self.alerts.alert(
                    AlertType.CIRCUIT_BREAKER_OPEN,
                    f"Circuit breaker '{self.name}' opened after {self.failure_threshold} failures",
                    key=key,
                    details={"breaker": self.name, "error": self._last_error or "", "retry_in_s": self.recovery_timeout},
                )
            elif to is CircuitState.CLOSED:
                self.alerts.resolve(AlertType.CIRCUIT_BREAKER_OPEN, key=key, message=f"Circuit breaker '{self.name}' closed again")
        except Exception:  # an alert must never break the caller
            logger.exception("could not queue breaker alert")

    def _before_call(self) -> None:
        with self._lock:
            self._maybe_half_open()
            if self._state is CircuitState.OPEN:
                self._rejected += 1
                raise CircuitOpenError(self.name, self._retry_in(), source=self)
            if self._state is CircuitState.HALF_OPEN:
                if self._trials_admitted >= self.half_open_max_calls:
                    self._rejected += 1
                    raise CircuitOpenError(self.name, 0.0, source=self)
                self._trials_admitted += 1

    def record_success(self) -> None:
        with self._lock:
            self._total_successes += 1
            if self._state is CircuitState.HALF_OPEN:
                self._trial_successes += 1
                if self._trial_successes >= self.success_threshold:
                    self._transition(CircuitState.CLOSED)
            else:
                self._failures = 0

    def record_failure(self, exc: BaseException) -> None:
        if not self._counts(exc):
            # Not the service's fault; in half-open it still frees the trial slot.
            with self._lock:
                if self._state is CircuitState.HALF_OPEN:
                    self._trials_admitted = max(0, self._trials_admitted - 1)
            return
        with self._lock:
            self._total_failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"[:300]
            self._last_error_at = time.time()
            if self._state is CircuitState.HALF_OPEN:
                self._transition(CircuitState.OPEN)
            elif self._state is CircuitState.CLOSED:
                self._failures += 1
                if self._failures >= self.failure_threshold:
                    self._transition(CircuitState.OPEN)
                else:
                    # Suspect: probe until it answers (see the module's docstring).
                    self._suspect = True
                    self._start_probing()

    # --- calling ----------------------------------------------------------

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker.

        Raises:
            CircuitOpenError: the circuit is open (or half-open and full).
            Exception: whatever ``fn`` raised, after counting it.
        """
        self._before_call()
        try:
            result = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            self._release_trial()
            raise
        except BaseException as exc:
            self.record_failure(exc)
            raise
        self.record_success()
        return result

    def call_sync(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call a synchronous ``fn`` through the breaker (e.g. inside a thread)."""
        self._before_call()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.record_failure(exc)
            raise
        self.record_success()
        return result

    def _release_trial(self) -> None:
        with self._lock:
            if self._state is CircuitState.HALF_OPEN:
                self._trials_admitted = max(0, self._trials_admitted - 1)

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Use the breaker as a decorator on a sync or async function."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call(fn, *args, **kwargs)

            return async_wrapper

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            return self.call_sync(fn, *args, **kwargs)

        return sync_wrapper

    # --- probing ----------------------------------------------------------

    def set_probe(self, probe: Probe | None, *, interval: float | None = None) -> None:
        """Probe the service with ``probe()`` while the circuit is open (None: stop probing).

        ``probe`` must bypass this breaker (it is called while the breaker
        refuses calls) and have its own deadline; :data:`PROBE_TIMEOUT`
        bounds it as well. An answer that says nothing about the service's
        health (a permanent error such as a refused permission) counts as a
        success: the service answered.
        """
        self._probe = probe
        if interval is not None:
            self.probe_interval = interval
        if probe is None:
            self._stop_probing()
        elif self._state is CircuitState.OPEN or self._suspect:
            self._start_probing()

    def clear_probe(self, probe: Probe) -> None:
        """Stop probing with ``probe`` (a closing owner), unless another owner set its own since."""
        if self._probe == probe:
            self.set_probe(None)

    def _retry_in(self) -> float:
        """Seconds until the open circuit may admit a call: the next probe's result, or the recovery timeout."""
        fallback = max(0.0, self.recovery_timeout - (self._clock() - self._opened_at))
        if self._next_probe_at is None:
            return fallback
        # A little after the probe, so a caller waking then finds the circuit already closed.
        return min(fallback, max(0.0, self._next_probe_at - self._clock()) + 0.1)

    def _start_probing(self) -> None:
        if self._probe is None or self.probe_interval <= 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # opened from a thread: the recovery timeout applies
            return
        task = self._probe_task
        # A probe of another event loop (one that has ended, e.g. an earlier asyncio.run) never finishes.
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._next_probe_at = self._clock() + self.probe_interval
        self._probe_task = loop.create_task(self._probe_until_closed(), name=f"breaker-probe-{self.name}")

    def _stop_probing(self) -> None:
        task, self._probe_task = self._probe_task, None
        self._next_probe_at = None
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:  # its loop is already closed
                pass

    async def _probe_until_closed(self) -> None:
        """Probe while the circuit is open (until it closes) or the service is suspect (until it answers)."""
        successes = 0
        gap = self.probe_interval
        seen_down = False
        while True:
            with self._lock:
                if self._probe is None or (self._state is CircuitState.CLOSED and not self._suspect):
                    self._next_probe_at = None
                    return
                self._next_probe_at = self._clock() + gap
            await asyncio.sleep(gap)
            probe = self._probe
            if probe is None:
                continue
            self._probes_run += 1
            started = self._clock()
            try:
                await asyncio.wait_for(probe(), PROBE_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._counts(exc) or isinstance(exc, TimeoutError):
                    successes = 0
                    seen_down = True
                    # The next probe is due one interval after this one *started*: a probe that hung
                    # until the service came back (a failover resets the stalled connection) is
                    # followed at once, not an interval later. Still one probe at a time.
                    gap = max(0.0, self.probe_interval - (self._clock() - started))
                    with self._lock:
                        self._last_error = f"probe: {type(exc).__name__}: {exc}"[:300]
                        if self._state is CircuitState.HALF_OPEN:
                            self._transition(CircuitState.OPEN)
                    logger.debug("breaker %s: probe failed: %s", self.name, exc)
                    continue
            with self._lock:
                suspect_answered = self._state is CircuitState.CLOSED
                if suspect_answered:
                    self._suspect = False
                    self._next_probe_at = None
            if suspect_answered:
                if seen_down:
                    logger.info("breaker %s: the service answers again after failed probes", self.name)
                    self._service_back()
                return
            successes += 1
            gap = min(CONFIRM_PROBE_GAP, self.probe_interval)
            if successes >= self.success_threshold:
                with self._lock:
                    if self._state is not CircuitState.CLOSED:
                        logger.info("circuit breaker %s: %d probe(s) succeeded", self.name, successes)
                        self._transition(CircuitState.CLOSED)
                self._next_probe_at = None
                return

    def reset(self) -> None:
        """Close the circuit and forget the failure count (an operator's action)."""
        with self._lock:
            self._transition(CircuitState.CLOSED)
            self._failures = 0
            self._suspect = False

    def get_status(self) -> dict[str, Any]:
        with self._lock:
            self._maybe_half_open()
            retry_in = None
            if self._state is CircuitState.OPEN:
                retry_in = round(self._retry_in(), 1)
            return {
                "name": self.name,
                "state": self._state.value,
                "consecutive_failures": self._failures,
                "failure_threshold": self.failure_threshold,
                "recovery_timeout_s": self.recovery_timeout,
                "half_open_max_calls": self.half_open_max_calls,
                "success_threshold": self.success_threshold,
                "probe_interval_s": self.probe_interval if self._probe is not None else None,
                "probes_run": self._probes_run,
                "retry_in_s": retry_in,
                "times_opened": self._times_opened,
                "total_failures": self._total_failures,
                "total_successes": self._total_successes,
                "rejected_calls": self._rejected,
                "last_error": self._last_error,
                "last_error_at": self._last_error_at,
                "last_change_at": self._last_change_at,
            }


class BreakerRegistry:
    """Every breaker of the process, so /status can list them."""

    def __init__(self) -> None:
        self._breakers: dict[str, CircuitBreaker] = {}
        self._alerts: AlertSink | None = None
        self._probe_interval = DEFAULT_PROBE_INTERVAL
        self._lock = threading.Lock()

    def get_or_create(self, name: str, **kwargs: Any) -> CircuitBreaker:
        """Return the breaker called ``name``, creating it with ``kwargs`` the first time."""
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is None:
                kwargs.setdefault("alerts", self._alerts)
                kwargs.setdefault("probe_interval", self._probe_interval)
                breaker = CircuitBreaker(name, **kwargs)
                self._breakers[name] = breaker
            return breaker

    def get_or_create_with_recovery(self, name: str, recovery_timeout: float, **kwargs: Any) -> CircuitBreaker:
        """:meth:`get_or_create`, then open ``recovery_timeout`` seconds from now on (a setting wins over
        whoever created the breaker first)."""
        breaker = self.get_or_create(name, recovery_timeout=recovery_timeout, **kwargs)
        breaker.recovery_timeout = recovery_timeout
        return breaker

    def get(self, name: str) -> CircuitBreaker | None:
        return self._breakers.get(name)

    def set_alerts(self, sink: AlertSink | None) -> None:
        """Send the state changes of every breaker, present and future, to ``sink``."""
        with self._lock:
            self._alerts = sink
            for breaker in self._breakers.values():
                breaker.alerts = sink

    def set_probe_interval(self, seconds: float) -> None:
        """Probe open circuits every ``seconds`` (BREAKER_PROBE_INTERVAL), for every breaker present and future."""
        with self._lock:
            self._probe_interval = seconds
            for breaker in self._breakers.values():
                breaker.probe_interval = seconds

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: breaker.get_status() for name, breaker in sorted(self._breakers.items())}

    def any_open(self) -> bool:
        return any(b.state is CircuitState.OPEN for b in self._breakers.values())

    def clear(self) -> None:
        """Forget every breaker (tests and a process that rewires itself)."""
        with self._lock:
            self._breakers.clear()


registry = BreakerRegistry()
