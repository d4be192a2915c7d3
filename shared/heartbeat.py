"""The global heartbeat: one record per process, written on a fixed interval.

It runs as its own task, independent of the loops, so it keeps beating while a
loop is stuck (a loop that stops writing while the process lives) and tells whoever reads it
which loops are well. A failing store is logged and counted and never stops
the heartbeat. The record goes to a :class:`HeartbeatStore`: the database's
``worker_heartbeats`` table, or a JSON file under DATA_DIR before a database
exists (what ``python -m shared.health`` reads, like arq's ``--check``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.errors import describe
from shared.metrics import HEARTBEAT_AGE, HEARTBEATS

logger = logging.getLogger(__name__)


@dataclass
class HeartbeatRecord:
    worker_id: str
    status: str
    loops: dict[str, Any]
    version: str
    host: str
    pid: int
    #: Worker replicas only: what the other replicas need to share the accounts (``{"pinned": [...]}``).
    fleet: dict[str, Any] | None = None


class HeartbeatStore(Protocol):
    async def write_heartbeat(self, record: HeartbeatRecord) -> None: ...


class RemovableHeartbeatStore(HeartbeatStore, Protocol):
    async def remove_heartbeat(self, worker_id: str) -> bool: ...


class FileHeartbeatStore:
    """Writes the record atomically to a JSON file, with the time it was written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _write(self, record: HeartbeatRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**asdict(record), "last_heartbeat_at": time.time()}), encoding="utf-8")
        tmp.replace(self.path)

    async def write_heartbeat(self, record: HeartbeatRecord) -> None:
        await asyncio.to_thread(self._write, record)


class GlobalHeartbeat:
    """Writes a :class:`HeartbeatRecord` every ``interval`` seconds.

    Args:
        worker_id: the record's key (WORKER_ID, e.g. ``telegram-main``).
        store: where the record goes.
        version: the code's version, shown with the record.
        status: returns "online", "degraded" ... at each beat.
        loops: returns the watchdog's loop status at each beat.
        interval: seconds between beats (HEARTBEAT_INTERVAL).
        timeout: deadline of one write.
        fleet: returns the record's ``fleet`` part at each beat (worker replicas).
        remove_on_stop: stopping deletes the record instead of writing a last
            "stopped" one: a worker replica leaves its fleet at once.
    """

    def __init__(
        self,
        *,
        worker_id: str,
        store: HeartbeatStore,
        version: str,
        status: Callable[[], str] = lambda: "online",
        loops: Callable[[], dict[str, Any]] = dict,
        interval: float = 15.0,
        timeout: float = 10.0,
        fleet: Callable[[], dict[str, Any]] | None = None,
        remove_on_stop: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self.store = store
        self.version = version
        self._status = status
        self._loops = loops
        self.interval = interval
        self.timeout = timeout
        self._fleet = fleet
        self.remove_on_stop = remove_on_stop
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.beats = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.last_ok_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.host = socket.gethostname()
        self.pid = os.getpid()
        started = time.time()
        HEARTBEAT_AGE.set_function(lambda: time.time() - (self.last_ok_at or started))

    def record(self, status: str | None = None) -> HeartbeatRecord:
        try:
            loops = self._loops()
        except Exception as exc:  # a status bug must not stop the beat
            loops = {"error": describe(exc)}
        return HeartbeatRecord(
            worker_id=self.worker_id,
            status=status or self._status(),
            loops=loops,
            version=self.version,
            host=self.host,
            pid=self.pid,
            fleet=self._fleet() if self._fleet is not None else None,
        )

    async def beat_once(self, status: str | None = None) -> bool:
        """Write one record. Returns False (after logging) when the store failed."""
        try:
            await asyncio.wait_for(self.store.write_heartbeat(self.record(status)), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = describe(exc) if not isinstance(exc, TimeoutError) else f"heartbeat write timed out after {self.timeout:g}s"
            self.last_error_at = time.time()
            HEARTBEATS.labels("failed").inc()
            log = logger.warning if self.consecutive_failures < 5 else logger.error
            log("heartbeat write failed (%d in a row): %s", self.consecutive_failures, self.last_error)
            return False
        self.beats += 1
        self.consecutive_failures = 0
        self.last_ok_at = time.time()
        HEARTBEATS.labels("ok").inc()
        return True

    async def _run(self) -> None:
        while not self._stopping:
            await self.beat_once()
            await asyncio.sleep(self.interval)

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        logger.error("heartbeat task ended unexpectedly (%r); restarting it", task.exception())
        self.start()

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="heartbeat")
        self._task.add_done_callback(self._done)

    async def stop(self, *, final_status: str = "stopped") -> None:
        """Stop beating and write a last record saying so, or remove the record (best effort)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1)
        remove = getattr(self.store, "remove_heartbeat", None)
        if self.remove_on_stop and remove is not None:
            try:
                await asyncio.wait_for(remove(self.worker_id), self.timeout)
            except Exception as exc:
                logger.warning("could not remove the heartbeat record (%s); it ages out", describe(exc))
            return
        await self.beat_once(final_status)

    def get_status(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "beats": self.beats,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_ok_at": self.last_ok_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "interval_s": self.interval,
        }
