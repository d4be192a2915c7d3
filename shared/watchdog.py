"""The loop watchdog: every loop pings; a silent or dead loop is restarted.

Each loop is registered with a *factory* (a function returning a fresh
coroutine), so a restart starts a new, clean loop. The watchdog restarts a
loop whose task ended (logging the exception with its traceback) or that has
not pinged for ``max_silence`` seconds. A loop task that ignores
cancellation is abandoned after ``cancel_grace`` and reported, never awaited
forever. Restarts of one loop are spaced by exponential backoff (1 s doubling
to 60 s); more than ``storm_restarts`` within ``storm_window`` marks the
loop ``failing`` (``/health`` answers 503) and alerts the operator once; it
clears, with a "resolved" alert, when the loop has been quiet again.

The monitor task is itself watched: if it dies it is restarted from its done
callback, and :meth:`LoopWatchdog.is_healthy` turns false when it has not
completed a check for three intervals, so the process-level supervisor
(``/health``) can act.

:func:`periodic` builds the usual loop body: ping, one bounded cycle, sleep
or wake early, with per-cycle errors caught, classified, counted and
recorded instead of killing the loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.breaker import CircuitOpenError
from shared.errors import classify, describe
from shared.metrics import LOOP_ABANDONED, LOOP_CYCLE_ERRORS, LOOP_CYCLE_SECONDS, LOOP_CYCLES, LOOP_RESTARTS
from shared.retry import exponential_delay
from shared.timeouts import OperationTimeout

if TYPE_CHECKING:
    from shared.alerts import AlertSink

logger = logging.getLogger(__name__)

LoopFactory = Callable[[], Awaitable[None]]


class LoopState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILING = "failing"
    STOPPED = "stopped"


@dataclass
class _Loop:
    name: str
    factory: LoopFactory
    max_silence: float
    task: asyncio.Task[None] | None = None
    state: LoopState = LoopState.PENDING
    started_at: float = 0.0
    last_ping: float = 0.0
    grace_until: float = 0.0
    pinged: bool = False
    restarts: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    abandoned: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_restart_reason: str | None = None
    cycles: int = 0
    cycle_errors: int = 0
    restart_task: asyncio.Task[None] | None = None
    storm_alerted: bool = False
    handled_task: asyncio.Task[None] | None = None


class LoopWatchdog:
    """Watches named loops and restarts them when they die or go silent.

    Args:
        max_silence: seconds without a ping before a loop is restarted.
        check_interval: seconds between two checks of the monitor.
        startup_grace: extra silence allowed after each (re)start.
        storm_restarts: restarts within ``storm_window`` that make a loop failing.
        storm_window: seconds over which restarts are counted.
        backoff_base / backoff_max: delay before restarting the same loop again.
        cancel_grace: seconds a cancelled loop gets before it is abandoned.
        alerts: sink for loop_restarted / restart_storm alerts.
        clock / wall: monotonic and wall-clock seconds (injectable).
    """

    def __init__(
        self,
        *,
        max_silence: float = 60.0,
        check_interval: float = 10.0,
        startup_grace: float = 30.0,
        storm_restarts: int = 5,
        storm_window: float = 600.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        cancel_grace: float = 5.0,
        alerts: AlertSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.max_silence = max_silence
        self.check_interval = check_interval
        self.startup_grace = startup_grace
        self.storm_restarts = storm_restarts
        self.storm_window = storm_window
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.cancel_grace = cancel_grace
        self.alerts = alerts
        self._clock = clock
        self._wall = wall
        self._loops: dict[str, _Loop] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._running = False
        self._last_check = 0.0
        self._monitor_restarts = 0
        self._abandoned: set[asyncio.Task[None]] = set()

    # --- registration and pings --------------------------------------------

    def register(self, name: str, factory: LoopFactory, *, max_silence: float | None = None) -> None:
        """Watch a loop; it starts now if the watchdog runs, else at :meth:`start`."""
        if name in self._loops:
            raise ValueError(f"loop {name!r} is registered already")
        loop = _Loop(name=name, factory=factory, max_silence=max_silence or self.max_silence)
        self._loops[name] = loop
        if self._running:
            self._start_loop(loop)

    def ping(self, name: str, *, pause: float = 0.0) -> None:
        """Called by a loop on every cycle: "I am alive".

        Args:
            pause: the loop is about to sleep this long on purpose; its
                silence is counted from the end of the pause, so an idle
                interval longer than ``max_silence`` is not mistaken for a hang.
        """
        loop = self._loops.get(name)
        if loop is not None:
            # A ping only ever extends: a ping from elsewhere must not cancel an announced pause.
            loop.last_ping = max(loop.last_ping, self._clock() + max(0.0, pause))
            loop.pinged = True
            loop.cycles += 1

    def record_error(self, name: str, exc: BaseException) -> None:
        """A loop reports a cycle that failed without ending the loop."""
        loop = self._loops.get(name)
        if loop is None:
            return
        loop.cycle_errors += 1
        loop.last_error = describe(exc)
        loop.last_error_at = self._wall()

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start every registered loop and the monitor."""
        if self._running:
            return
        self._running = True
        self._last_check = self._clock()  # healthy from the start, not only after the first pass
        for loop in self._loops.values():
            self._start_loop(loop)
        self._start_monitor()

    async def stop(self, *, timeout: float | None = None) -> None:
        """Cancel the monitor and every loop; abandon those that ignore it."""
        self._running = False
        grace = self.cancel_grace if timeout is None else timeout
        tasks: list[asyncio.Task[Any]] = []
        if self._monitor is not None:
            self._monitor.cancel()
            tasks.append(self._monitor)
        for loop in self._loops.values():
            if loop.restart_task is not None:
                loop.restart_task.cancel()
                tasks.append(loop.restart_task)
            if loop.task is not None and not loop.task.done():
                loop.task.cancel()
                tasks.append(loop.task)
            loop.state = LoopState.STOPPED
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                logger.error("task %s ignored cancellation at shutdown; abandoned", task.get_name())
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    logger.debug("loop ended with %r at shutdown", task.exception())

    def _start_monitor(self) -> None:
        self._monitor = asyncio.create_task(self._monitor_loop(), name="watchdog-monitor")
        self._monitor.add_done_callback(self._monitor_done)

    def _monitor_done(self, task: asyncio.Task[None]) -> None:
        if not self._running:
            return
        self._monitor_restarts += 1
        exc = None if task.cancelled() else task.exception()
        logger.error("watchdog monitor ended (%r); restarting it", exc)
        self._start_monitor()

    def _start_loop(self, loop: _Loop) -> None:
        now = self._clock()
        loop.started_at = now
        loop.last_ping = now
        loop.grace_until = now + self.startup_grace
        loop.pinged = False
        loop.task = asyncio.create_task(self._run_factory(loop), name=f"loop-{loop.name}")
        loop.task.add_done_callback(lambda task, loop=loop: self._loop_done(loop, task))
        if loop.state is not LoopState.FAILING:
            loop.state = LoopState.RUNNING

    async def _run_factory(self, loop: _Loop) -> None:
        await loop.factory()

    def _loop_done(self, loop: _Loop, task: asyncio.Task[None]) -> None:
        if not self._running or task is not loop.task or task is loop.handled_task:
            return
        # Whichever sees the end first (this done callback or the monitor's
        # check) handles it, once, with the real reason and the traceback.
        loop.handled_task = task
        if task.cancelled():
            reason = "cancelled"
        elif task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            reason = "crashed"
            loop.last_error = describe(exc)
            loop.last_error_at = self._wall()
            logger.error(
                "loop %s crashed:\n%s",
                loop.name,
                "".join(traceback.format_exception(exc)),
                extra={"loop": loop.name, "error": describe(exc)},
            )
        else:
            reason = "returned"
            logger.warning("loop %s returned; loops should run until cancelled", loop.name, extra={"loop": loop.name})
        self._schedule_restart(loop, reason)

    # --- restarts -------------------------------------------------------------

    def _schedule_restart(self, loop: _Loop, reason: str) -> None:
        if loop.restart_task is not None and not loop.restart_task.done():
            return
        now = self._clock()
        while loop.restart_times and now - loop.restart_times[0] > self.storm_window:
            loop.restart_times.popleft()
        loop.restart_times.append(now)
        loop.restarts += 1
        loop.last_restart_reason = reason
        LOOP_RESTARTS.labels(loop.name, reason).inc()
        delay = exponential_delay(len(loop.restart_times), base=self.backoff_base, cap=self.backoff_max, jitter=False)
        storm = len(loop.restart_times) > self.storm_restarts
        loop.state = LoopState.FAILING if storm else LoopState.RESTARTING
        logger.warning(
            "restarting loop %s in %.1fs (%s; restart %d, %d in window)",
            loop.name,
            delay,
            reason,
            loop.restarts,
            len(loop.restart_times),
            extra={"loop": loop.name, "reason": reason, "delay_s": delay, "restarts": loop.restarts},
        )
        self._alert_restart(loop, reason, storm)
        loop.restart_task = asyncio.create_task(self._restart_after(loop, delay), name=f"restart-{loop.name}")

    def _alert_restart(self, loop: _Loop, reason: str, storm: bool) -> None:
        if self.alerts is None:
            return
        from shared.alerts import AlertType

        try:
            if storm and not loop.storm_alerted:
                loop.storm_alerted = True
                self.alerts.alert(
                    AlertType.RESTART_STORM,
                    f"Loop '{loop.name}' restarted {len(loop.restart_times)} times in {self.storm_window:.0f}s; marked failing",
                    key=f"storm:{loop.name}",
                    details={"loop": loop.name, "last_error": loop.last_error or reason},
                )
            else:
                self.alerts.alert(
                    AlertType.LOOP_RESTARTED,
                    f"Loop '{loop.name}' restarted ({reason})",
                    key=f"restart:{loop.name}",
                    details={"loop": loop.name, "reason": reason, "last_error": loop.last_error or ""},
                )
        except Exception:
            logger.exception("could not queue a watchdog alert")

    async def _restart_after(self, loop: _Loop, delay: float) -> None:
        old = loop.task
        if old is not None and not old.done():
            old.cancel()
            done, _ = await asyncio.wait({old}, timeout=self.cancel_grace)
            if not done:
                loop.abandoned += 1
                LOOP_ABANDONED.labels(loop.name).inc()
                self._abandoned.add(old)
                old.add_done_callback(self._abandoned.discard)
                loop.last_error = f"loop ignored cancellation; abandoned after {self.cancel_grace:g}s"
                loop.last_error_at = self._wall()
                logger.error(
                    "loop %s ignored cancellation; abandoned (it may still be running)",
                    loop.name,
                    extra={"loop": loop.name, "abandoned": loop.abandoned},
                )
        await asyncio.sleep(delay)
        if self._running:
            self._start_loop(loop)
            logger.info("loop %s restarted", loop.name, extra={"loop": loop.name, "restarts": loop.restarts})

    # --- the monitor ------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(self.check_interval)

    def check(self) -> None:
        """One pass: restart silent loops; clear storms that calmed down."""
        now = self._clock()
        self._last_check = now
        for loop in self._loops.values():
            if loop.restart_task is not None and not loop.restart_task.done():
                continue
            if loop.task is None:
                continue
            if loop.task.done():
                # The done callback normally handles this; the monitor may get there first.
                self._loop_done(loop, loop.task)
                continue
            # Until its first ping a (re)started loop also gets the start-up grace.
            silent_since = loop.last_ping if loop.pinged else loop.grace_until
            silence = now - silent_since
            if silence > loop.max_silence:
                logger.error(
                    "loop %s silent for %.0fs (max %.0fs)",
                    loop.name,
                    now - loop.last_ping,
                    loop.max_silence,
                    extra={"loop": loop.name, "silence_s": round(now - loop.last_ping, 1)},
                )
                loop.last_error = f"silent for {now - loop.last_ping:.0f}s"
                loop.last_error_at = self._wall()
                self._schedule_restart(loop, "silent")
                continue
            self._maybe_clear_storm(loop, now)

    def _maybe_clear_storm(self, loop: _Loop, now: float) -> None:
        while loop.restart_times and now - loop.restart_times[0] > self.storm_window:
            loop.restart_times.popleft()
        if loop.state is LoopState.FAILING and len(loop.restart_times) <= self.storm_restarts // 2:
            loop.state = LoopState.RUNNING
            loop.storm_alerted = False
            logger.info("loop %s calmed down; no longer failing", loop.name)
            if self.alerts is not None:
                from shared.alerts import AlertType

                self.alerts.resolve(AlertType.RESTART_STORM, key=f"storm:{loop.name}", message=f"Loop '{loop.name}' is stable again")
        elif loop.state is LoopState.RESTARTING:
            loop.state = LoopState.RUNNING

    # --- status ---------------------------------------------------------------

    def monitor_alive(self) -> bool:
        if not self._running:
            return False
        return self._clock() - self._last_check <= 3 * self.check_interval + 1

    def is_healthy(self) -> bool:
        """False when a loop is failing or the monitor stopped checking."""
        if not self.monitor_alive():
            return False
        return all(loop.state is not LoopState.FAILING for loop in self._loops.values())

    def failing(self) -> list[str]:
        return [name for name, loop in self._loops.items() if loop.state is LoopState.FAILING]

    def get_status(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        status: dict[str, dict[str, Any]] = {}
        for name, loop in self._loops.items():
            alive = loop.task is not None and not loop.task.done()
            status[name] = {
                "state": loop.state.value,
                "alive": alive,
                "last_ping_ago_s": round(max(0.0, now - loop.last_ping), 1) if loop.task is not None else None,
                "max_silence_s": loop.max_silence,
                "restarts": loop.restarts,
                "restarts_in_window": len(loop.restart_times),
                "last_restart_reason": loop.last_restart_reason,
                "abandoned": loop.abandoned,
                "cycles": loop.cycles,
                "cycle_errors": loop.cycle_errors,
                "last_error": loop.last_error,
                "last_error_at": loop.last_error_at,
            }
        return status

    def summary(self) -> dict[str, Any]:
        return {
            "healthy": self.is_healthy(),
            "monitor_alive": self.monitor_alive(),
            "monitor_restarts": self._monitor_restarts,
            "failing": self.failing(),
        }


def periodic(
    watchdog: LoopWatchdog,
    name: str,
    cycle: Callable[[], Awaitable[float | None]],
    *,
    interval: float,
    cycle_timeout: float,
    wake: asyncio.Event | None = None,
    error_backoff_max: float = 30.0,
) -> LoopFactory:
    """Build a loop factory: ping, run one bounded cycle, then sleep or wake early.

    Args:
        cycle: one unit of work; may return how long to sleep before the next
            cycle (``None`` means ``interval``; ``0`` means run again at once).
        interval: default pause between cycles.
        cycle_timeout: deadline of one cycle (TIMEOUT_LOOP_CYCLE).
        wake: an event that ends the pause early (e.g. set by a NOTIFY).
        error_backoff_max: cap of the pause after consecutive failed cycles.

    A failed cycle is logged, classified, counted and recorded in the
    watchdog; the loop goes on after a growing pause, or, when the error says
    how long to wait (an open breaker's next probe, a rate limit), after
    exactly that long (capped at ``error_backoff_max``). A loop refused by an
    open breaker also wakes the moment that breaker closes (its probes
    succeeded), so it resumes within milliseconds of the service's return
    rather than at the end of a pause that was only an estimate. Only
    cancellation (a restart or shutdown) ends it.
    """

    async def run() -> None:
        failures = 0  # consecutive failed cycles (logged)
        blind = 0  # of those, the ones that did not say how long to wait: they grow the pause
        while True:
            watchdog.ping(name)
            pause: float | None
            closing: asyncio.Future[None] | None = None
            started = time.monotonic()
            try:
                async with asyncio.timeout(cycle_timeout):
                    pause = await cycle()
                failures = blind = 0
                LOOP_CYCLES.labels(name, "ok").inc()
                LOOP_CYCLE_SECONDS.labels(name).observe(time.monotonic() - started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                LOOP_CYCLES.labels(name, "error").inc()
                LOOP_CYCLE_SECONDS.labels(name).observe(time.monotonic() - started)
                if isinstance(exc, TimeoutError) and not isinstance(exc, OperationTimeout):
                    exc = OperationTimeout(f"{name}.cycle", cycle_timeout)
                failures += 1
                verdict = classify(exc)
                LOOP_CYCLE_ERRORS.labels(name, verdict.kind.value).inc()
                watchdog.record_error(name, exc)
                if verdict.retry_after is not None:
                    # A breaker that is open, or a service that said when: wait exactly that
                    # long (at least a moment, at most the cap), not a blind growing pause.
                    pause = min(error_backoff_max, max(verdict.retry_after, min(interval, 1.0)))
                    refused = _circuit_open(exc)
                    if refused is not None:
                        closing = refused.closing()
                    logger.warning(
                        "loop %s waits %.1fs: %s",
                        name,
                        pause,
                        verdict.reason,
                        extra={"loop": name, "kind": verdict.kind.value, "consecutive_failures": failures},
                    )
                else:
                    log = logger.warning if failures < 3 else logger.error
                    log(
                        "loop %s cycle failed (%s): %s",
                        name,
                        verdict.kind.value,
                        verdict.reason,
                        exc_info=failures >= 3,
                        extra={"loop": name, "kind": verdict.kind.value, "consecutive_failures": failures},
                    )
                    # Only blind failures grow the pause: refusals by an open breaker were waited out
                    # exactly, and counting them made a failure right after an outage wait up to the cap.
                    blind += 1
                    pause = min(error_backoff_max, max(interval, exponential_delay(blind, base=1.0, cap=error_backoff_max)))
            wait = interval if pause is None else pause
            watchdog.ping(name, pause=max(0.0, wait))
            if wait <= 0:
                if closing is not None:
                    closing.cancel()
                await asyncio.sleep(0)
                continue
            if wake is None and closing is None:
                await asyncio.sleep(wait)
                continue
            waiters: set[asyncio.Future[Any]] = set()
            if closing is not None:
                waiters.add(closing)
            if wake is not None:
                waiters.add(asyncio.ensure_future(wake.wait()))
            try:
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if wake is not None:
                wake.clear()

    return run


def _circuit_open(exc: BaseException) -> CircuitOpenError | None:
    """The breaker refusal behind ``exc`` (itself, or what it was raised from), if any."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        if isinstance(current, CircuitOpenError):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None
