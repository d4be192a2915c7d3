"""Graceful shutdown: stop taking work, finish what is in flight, clean up, exit 0.

On SIGTERM or SIGINT the ``stopping`` event is set: loops stop claiming new
work, in-flight work (tracked with :meth:`GracefulShutdown.in_flight`) gets
``grace`` seconds to finish, then cleanups run in reverse order of
registration, each under its own deadline (spill the retry queue, release
leases, disconnect clients, close the database). A second signal exits at
once.

Railway sends SIGTERM and, by default, SIGKILL 3 s later: set
``drainingSeconds`` above SHUTDOWN_GRACE in ``railway.toml``. Whatever a
SIGKILL interrupts is still safe: work is in the database before any side
effect, and leases lapse.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: The same signal again within this many seconds is a duplicate delivery, not a second request.
DUPLICATE_SIGNAL_WINDOW = 1.0


@dataclass
class _Cleanup:
    name: str
    fn: Callable[[], Awaitable[object]]
    timeout: float


class GracefulShutdown:
    """Coordinates a clean stop of one process.

    Args:
        grace: seconds in-flight work gets after the first signal (SHUTDOWN_GRACE).
        exit_now: called with an exit code on the second signal.
    """

    def __init__(self, *, grace: float = 30.0, exit_now: Callable[[int], None] = os._exit) -> None:
        self.grace = grace
        self._exit_now = exit_now
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0
        self._cleanups: list[_Cleanup] = []
        self._first_signal: tuple[signal.Signals, float] | None = None
        self.reason: str | None = None
        self.stop_requested_at: float | None = None

    # --- signals ------------------------------------------------------------

    def install(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Handle ``signals`` on the running event loop."""
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self._first_signal is not None:
            first_sig, first_at = self._first_signal
            if sig == first_sig and now - first_at < DUPLICATE_SIGNAL_WINDOW:
                # Ctrl-C under the supervisor reaches the bot twice at once (the
                # terminal's and the forwarded one): that is one request, not two.
                logger.debug("duplicate %s within %.1fs ignored", sig.name, DUPLICATE_SIGNAL_WINDOW)
                return
            logger.warning("second signal (%s): exiting at once", sig.name)
            self._exit_now(128 + int(sig))
            return
        self._first_signal = (sig, now)
        logger.info("%s received: finishing in-flight work (grace %.0fs)", sig.name, self.grace)
        self.request_stop(sig.name)

    def request_stop(self, reason: str = "requested") -> None:
        """Begin the shutdown (signals call this; so may a fatal error)."""
        if not self._stopping.is_set():
            self.reason = reason
            self.stop_requested_at = time.monotonic()
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait(self) -> None:
        """Return when the shutdown begins."""
        await self._stopping.wait()

    async def sleep(self, seconds: float) -> bool:
        """Sleep, waking early when the shutdown begins. True when stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass
        return self.stopping

    # --- in-flight work -------------------------------------------------------

    @asynccontextmanager
    async def in_flight(self) -> AsyncIterator[None]:
        """Mark a block as work the shutdown must wait for."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    @property
    def in_flight_count(self) -> int:
        return self._in_flight

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for in-flight work to finish. False when the grace ran out first."""
        limit = self.grace if timeout is None else timeout
        try:
            await asyncio.wait_for(self._idle.wait(), limit)
            return True
        except TimeoutError:
            logger.warning("%d in-flight items did not finish within %.0fs", self._in_flight, limit)
            return False

    # --- cleanups -------------------------------------------------------------

    def add_cleanup(self, name: str, fn: Callable[[], Awaitable[object]], *, timeout: float = 5.0) -> None:
        """Run ``fn`` at shutdown; cleanups run last-registered first."""
        self._cleanups.append(_Cleanup(name, fn, timeout))

    async def run_cleanups(self) -> None:
        """Run every cleanup under its deadline; a failing one never stops the rest."""
        for cleanup in reversed(self._cleanups):
            try:
                await asyncio.wait_for(cleanup.fn(), cleanup.timeout)
                logger.debug("cleanup %s done", cleanup.name)
            except TimeoutError:
                logger.error("cleanup %s timed out after %.1fs", cleanup.name, cleanup.timeout)
            except Exception:
                logger.exception("cleanup %s failed", cleanup.name)
        self._cleanups.clear()

    async def finish(self) -> bool:
        """Drain within the grace, then run the cleanups. True when fully drained."""
        drained = await self.drain()
        await self.run_cleanups()
        return drained
