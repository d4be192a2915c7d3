"""One active replica: a named lease in the database, the others stand by.

Some work must never run in two processes at once even when a platform
runs two replicas (the Reply Guy: one operator chat, one poster). The
active replica holds the lease ``name`` and renews it every quarter of
``seconds``; a standby tries to take it on the same cadence and, when it is
released (SIGTERM), at once through a notification. After a kill -9 it
lapses, and a standby takes over within ``seconds`` plus a quarter of it.

Fenced on both sides: the renewal's token is refused once the lease was
taken, and a timer ends the active role at 80 % of the lease when renewals
do not come through, before anyone else may take it; ``on_lost`` is then
called once (the bot stops, and its next start stands by).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.errors import describe

if TYPE_CHECKING:
    from shared.db import Database
    from shared.shutdown import GracefulShutdown

logger = logging.getLogger(__name__)

#: The channel process_lease_release notifies on.
CHANNEL = "process_leases"


class ActiveLease:
    """The lease ``name`` of one process among replicas.

    Args:
        db: where the lease lives.
        name: the lease (e.g. ``reply-guy``).
        owner: this process (``name:host:pid:random``).
        seconds: the lease's length (BOT_LEASE_SECONDS).
        on_lost: called once when the lease is lost while active.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        db: Database,
        *,
        name: str,
        owner: str,
        seconds: float,
        on_lost: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.name = name
        self.owner = owner
        self.seconds = seconds
        self.on_lost = on_lost
        self._clock = clock
        self.token: str | None = None
        self.state = "starting"
        self.holder: str | None = None
        self.active_since: float | None = None
        self.lost_reason: str | None = None
        self._renewed_at = 0.0
        self._fence: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def cadence(self) -> float:
        return self.seconds / 4

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    async def wait_until_active(self, shutdown: GracefulShutdown) -> bool:
        """Stand by until this process holds the lease. False when a stop came first."""
        sub = None
        try:
            while not shutdown.stopping:
                attempt_at = self._clock()
                try:
                    token = await self.db.acquire_process_lease(self.name, owner=self.owner, seconds=self.seconds)
                except Exception as exc:
                    logger.warning("cannot reach the %s lease (%s); trying again", self.name, describe(exc))
                    token = None
                if token is not None:
                    self._become_active(token, attempt_at)
                    return True
                holder = await self._holder()
                if self.state != "standby" or holder != self.holder:
                    logger.warning(
                        "standing by: %s is active (the %s lease); this replica takes over when it stops",
                        holder or "another replica",
                        self.name,
                    )
                self.state, self.holder = "standby", holder
                if sub is None:
                    try:
                        sub = await self.db.subscribe(CHANNEL)
                    except Exception:
                        sub = None
                waiter = asyncio.ensure_future(sub.wait(self.cadence)) if sub is not None else None
                stopping = asyncio.ensure_future(shutdown.sleep(self.cadence))
                pending = {t for t in (waiter, stopping) if t is not None}
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
            return False
        finally:
            if sub is not None:
                sub.close()

    async def _holder(self) -> str | None:
        try:
            return await self.db.process_lease_holder(self.name)
        except Exception:
            return None

    def _become_active(self, token: str, renewed_at: float) -> None:
        self.token = token
        self.state = "active"
        self.holder = self.owner
        self.active_since = time.time()
        self._renewed_at = renewed_at
        self._arm_fence()
        self._task = asyncio.create_task(self._renew_forever(), name=f"lease-{self.name}")
        logger.info("active: this replica holds the %s lease", self.name)

    async def _renew_forever(self) -> None:
        while self.token is not None:
            await asyncio.sleep(self.cadence)
            token = self.token
            if token is None:
                return
            started = self._clock()
            try:
                renewed = await self.db.renew_process_lease(self.name, token, seconds=self.seconds)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("could not renew the %s lease (%s); the fence stops us if this goes on", self.name, describe(exc))
                continue
            if not renewed:
                self._lose("the lease was taken by another replica")
                return
            self._renewed_at = started
            self._arm_fence()

    def _arm_fence(self) -> None:
        if self._fence is not None:
            self._fence.cancel()
        delay = max(0.0, self.seconds * 0.8 - (self._clock() - self._renewed_at))
        self._fence = asyncio.get_running_loop().call_later(delay, self._lose, "the lease could not be renewed in time")

    def _lose(self, reason: str) -> None:
        if self.token is None or self.lost:
            return
        self.token = None
        self.state = "lost"
        self.lost_reason = reason
        if self._fence is not None:
            self._fence.cancel()
            self._fence = None
        logger.error("no longer the active replica: %s; stopping so that nothing runs twice", reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    async def release(self) -> None:
        """Stopping: give the lease up at once, so a standby takes over now (notified)."""
        token, self.token = self.token, None
        if self._fence is not None:
            self._fence.cancel()
            self._fence = None
        if self._task is not None:
            self._task.cancel()
        if token is None:
            return
        self.state = "released"
        try:
            await self.db.release_process_lease(self.name, token)
        except Exception as exc:
            logger.warning("could not release the %s lease (%s); it lapses in %.0fs", self.name, describe(exc), self.seconds)

    def status(self) -> dict[str, Any]:
        """The ``replica`` section of /status."""
        return {
            "state": self.state,
            "lease": self.name,
            "this": self.owner,
            "active": self.holder,
            "active_since": self.active_since,
            "lease_seconds": self.seconds,
            "lost_reason": self.lost_reason,
        }
