"""A retry queue that never drops an item silently.

Failed work goes in with its error; it comes out again when due (first after
``base_delay``, doubling, at most ``max_retries`` retries), in time order.
Exhausted items go to the dead-letter store with their last error; work that
can never succeed goes there at once with :meth:`RetryQueue.dead_letter`.

Durability: every change is written through to a :class:`RetryStore` (the
``retry_items`` table once a database is configured, a JSON-lines file under
DATA_DIR otherwise) before the call returns, so a crash loses nothing. Memory
holds at most ``capacity`` items, soonest first; the rest wait in the store
(they "spill") and are loaded back as room frees up or at the next start.
When the primary store itself fails (the database is down, which is exactly
when things get queued), the item goes to the local fallback file and is
moved back into the primary store on the next load.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from shared.metrics import RETRY_QUEUE_EVENTS, RETRY_QUEUE_OLDEST_AGE, RETRY_QUEUE_SIZE

logger = logging.getLogger(__name__)


@dataclass
class RetryItem:
    """One piece of work waiting for another attempt."""

    id: str
    kind: str
    payload: dict[str, Any]
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["next_attempt_at"] = self.next_attempt_at.isoformat()
        data["created_at"] = self.created_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetryItem:
        return cls(
            id=str(data["id"]),
            kind=str(data["kind"]),
            payload=dict(data.get("payload") or {}),
            attempts=int(data.get("attempts", 0)),
            next_attempt_at=_aware(data["next_attempt_at"]),
            last_error=data.get("last_error"),
            created_at=_aware(data.get("created_at") or data["next_attempt_at"]),
        )


def _aware(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class RetryStore(Protocol):
    """Where retry items live durably (see ``shared.db.retry_store`` for the table)."""

    async def upsert(self, item: RetryItem) -> None: ...
    async def remove(self, item_id: str) -> None: ...
    async def load_pending(self, *, limit: int) -> list[RetryItem]: ...
    async def count_pending(self) -> int: ...
    async def mark_exhausted(self, item: RetryItem) -> None: ...
    async def count_exhausted(self) -> int: ...


class JsonlRetryStore:
    """A :class:`RetryStore` in one JSON-lines file: an append-only log of changes.

    Each line is ``{"op": "upsert" | "remove" | "exhausted", ...}``; the state is
    the replay of the log. The replay happens once, at the first call; after
    that the state is an index in memory, updated by each write once its line
    is appended and flushed, so loads and counts never read the file again.
    The file is compacted (rewritten from the index to a temporary file,
    fsynced, renamed over the log) once it holds COMPACT_AFTER lines and more
    than twice as many lines as live items. File I/O runs in a thread so the
    event loop never waits on the disk.

    One instance per file and process: writes that another process makes to
    the file after this instance's first call are not seen (a restart, that
    is a new instance, replays them).
    """

    COMPACT_AFTER = 5000
    """Lines in the log before compaction is considered."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = asyncio.Lock()
        self._loaded = False
        self._pending: dict[str, RetryItem] = {}
        self._exhausted: dict[str, RetryItem] = {}
        self._lines = 0  # lines in the file, readable or not

    @staticmethod
    def _apply(record: dict[str, Any], pending: dict[str, RetryItem], exhausted: dict[str, RetryItem]) -> None:
        """Apply one log record to an index.

        Raises:
            ValueError, KeyError, TypeError: the record is malformed (the index is unchanged).
        """
        op = record["op"]
        if op == "remove":  # forget the item, waiting or dead
            pending.pop(str(record["id"]), None)
            exhausted.pop(str(record["id"]), None)
            return
        item = RetryItem.from_json(record["item"])
        if op == "upsert":
            pending[item.id] = item
        elif op == "exhausted":
            pending.pop(item.id, None)
            exhausted[item.id] = item

    def _load(self) -> None:
        """Replay the file into the index (once, at the first call)."""
        pending: dict[str, RetryItem] = {}
        exhausted: dict[str, RetryItem] = {}
        lines = 0
        if self.path.exists():
            with self.path.open("r", encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    line = line.strip()
                    if not line:
                        continue
                    lines += 1
                    try:
                        self._apply(json.loads(line), pending, exhausted)
                    except (ValueError, KeyError, TypeError):
                        # A torn last line after a crash; everything before it stands.
                        logger.warning("skipping unreadable line %d of %s", number, self.path)
        self._pending, self._exhausted, self._lines = pending, exhausted, lines
        self._loaded = True

    def _append(self, record: dict[str, Any]) -> None:
        if not self._loaded:
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, separators=(",", ":"))
        line = (text + "\n").encode("utf-8")
        with self.path.open("a+b") as handle:
            size = handle.seek(0, 2)
            if size:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    # A crash tore the last line: start a fresh one so this record stays readable.
                    line = b"\n" + line
            handle.write(line)
            handle.flush()
        self._lines += 1
        # The index takes the record as written (as a replay would read it), not the caller's object.
        self._apply(json.loads(text), self._pending, self._exhausted)
        if self._lines >= self.COMPACT_AFTER and self._lines > 2 * (len(self._pending) + len(self._exhausted)):
            self._compact()

    def _compact(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for item in self._exhausted.values():
                handle.write(json.dumps({"op": "exhausted", "item": item.to_json()}, separators=(",", ":")) + "\n")
            for item in self._pending.values():
                handle.write(json.dumps({"op": "upsert", "item": item.to_json()}, separators=(",", ":")) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)
        self._lines = len(self._exhausted) + len(self._pending)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    async def _read(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the index, replaying the file first if this is the first call."""
        async with self._lock:
            if not self._loaded:
                await asyncio.to_thread(self._load)
            return fn()

    async def upsert(self, item: RetryItem) -> None:
        await self._run(self._append, {"op": "upsert", "item": item.to_json()})

    async def remove(self, item_id: str) -> None:
        await self._run(self._append, {"op": "remove", "id": item_id})

    async def mark_exhausted(self, item: RetryItem) -> None:
        await self._run(self._append, {"op": "exhausted", "item": item.to_json()})

    async def load_pending(self, *, limit: int) -> list[RetryItem]:
        """Items still to retry, soonest ``next_attempt_at`` first (copies: the index stays as written)."""
        soonest = await self._read(lambda: heapq.nsmallest(limit, self._pending.values(), key=lambda i: i.next_attempt_at))
        return [_copy(item) for item in soonest]

    async def count_pending(self) -> int:
        return int(await self._read(lambda: len(self._pending)))

    async def count_exhausted(self) -> int:
        return int(await self._read(lambda: len(self._exhausted)))

    async def exhausted_items(self) -> list[RetryItem]:
        return [_copy(item) for item in await self._read(lambda: list(self._exhausted.values()))]


def _copy(item: RetryItem) -> RetryItem:
    return replace(item, payload=dict(item.payload))


@dataclass(order=True)
class _Entry:
    due: datetime
    seq: int
    item: RetryItem = field(compare=False)


def doubling_delay(base_delay: float, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failure: base, 2*base, 4*base... (RETRY_BASE_DELAY's
    doubling, as the SQL ``retry_delay`` computes it below its cap)."""
    return base_delay * (2 ** max(0, attempts - 1))


class RetryQueue:
    """Bounded in memory, durable underneath; see the module docstring.

    Args:
        name: shown in /status and metrics (one queue per bot or kind).
        store: the durable store (the database's ``retry_items`` when there is one).
        fallback: the local file used when ``store`` fails; may be the same
            kind of file store as ``store`` when there is no database.
        capacity: items kept in memory.
        base_delay: seconds before the first retry; doubles on each retry.
        max_retries: retries before an item is exhausted (dead).
        store_timeout: deadline of one store call.
        clock: wall-clock seconds; injectable for tests.
    """

    def __init__(
        self,
        *,
        name: str,
        store: RetryStore,
        fallback: RetryStore | None = None,
        capacity: int = 1000,
        base_delay: float = 60.0,
        max_retries: int = 5,
        store_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.store = store
        self.fallback = fallback
        self.capacity = capacity
        self.base_delay = base_delay
        self.max_retries = max_retries
        self.store_timeout = store_timeout
        self._clock = clock
        self._heap: list[_Entry] = []
        self._in_memory: set[str] = set()
        self._checked_out: dict[str, RetryItem] = {}
        self._seq = 0
        self._total = 0  # items not yet done, memory + store
        self._dead = 0
        self._counters = {"queued": 0, "retried": 0, "succeeded": 0, "exhausted": 0, "spilled": 0, "fallback_writes": 0}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        RETRY_QUEUE_OLDEST_AGE.labels(name).set_function(lambda: self.oldest_age() or 0.0)

    # --- helpers ------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def delay_for(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure: base, 2*base, 4*base..."""
        return doubling_delay(self.base_delay, attempts)

    async def _write(self, op: str, *args: Any) -> None:
        """Write to the store, or to the fallback when the store fails."""
        try:
            await asyncio.wait_for(getattr(self.store, op)(*args), self.store_timeout)
            return
        except Exception as exc:
            if self.fallback is None or self.fallback is self.store:
                raise
            logger.warning(
                "retry store failed; writing to the local fallback instead",
                extra={"queue": self.name, "op": op, "error": f"{type(exc).__name__}: {exc}"},
            )
        self._counters["fallback_writes"] += 1
        await asyncio.wait_for(getattr(self.fallback, op)(*args), self.store_timeout)

    def _push_memory(self, item: RetryItem) -> bool:
        if item.id in self._in_memory or item.id in self._checked_out:
            return True
        if len(self._heap) >= self.capacity:
            return False
        self._seq += 1
        heapq.heappush(self._heap, _Entry(item.next_attempt_at, self._seq, item))
        self._in_memory.add(item.id)
        return True

    def _event(self, event: str) -> None:
        self._counters[event] = self._counters.get(event, 0) + 1
        RETRY_QUEUE_EVENTS.labels(self.name, event).inc()
        RETRY_QUEUE_SIZE.labels(self.name).set(self._total)

    # --- public API -----------------------------------------------------------

    async def load(self) -> int:
        """Load waiting items from the stores (at start). Returns how many are waiting.

        Items found in the fallback file are moved into the primary store.
        """
        async with self._lock:
            if self.fallback is not None and self.fallback is not self.store:
                await self._move_home(await self.fallback.load_pending(limit=1_000_000), self.store.upsert, "retry items")
                # Dead letters written there too: the store is where everything that reads
                # them (the Reply Guy's recovery, the status counts) looks.
                exhausted_items = getattr(self.fallback, "exhausted_items", None)
                if callable(exhausted_items):
                    await self._move_home(await exhausted_items(), self.store.mark_exhausted, "dead letters")
            items = await self.store.load_pending(limit=self.capacity)
            for item in items:
                self._push_memory(item)
            self._total = await self.store.count_pending()
            if self.fallback is not None and self.fallback is not self.store:
                self._total += await self.fallback.count_pending()
            self._dead = await self.store.count_exhausted()
            if self.fallback is not None and self.fallback is not self.store:
                self._dead += await self.fallback.count_exhausted()
            RETRY_QUEUE_SIZE.labels(self.name).set(self._total)
            if self._total:
                logger.info("retry queue %s: %d items waiting", self.name, self._total, extra={"queue": self.name})
            self._changed.set()
            return self._total

    async def _move_home(
        self, stranded: list[RetryItem], write: Callable[[RetryItem], Awaitable[None]], what: str
    ) -> None:
        """Write items the fallback file holds into the store, removing each from the file once it is there."""
        assert self.fallback is not None
        moved = 0
        for item in stranded:
            try:
                await asyncio.wait_for(write(item), self.store_timeout)
                await self.fallback.remove(item.id)
                moved += 1
            except Exception:
                logger.warning("primary retry store still failing; %d %s stay in the fallback file", len(stranded) - moved, what)
                break
        if moved:
            logger.info("moved %d %s from the fallback file into the store", moved, what)

    async def put(self, kind: str, payload: dict[str, Any], *, error: str, delay: float | None = None) -> RetryItem:
        """Queue work that just failed once. Durable when this returns.

        Raises:
            Exception: only when both the store and the fallback failed; the
                caller still holds the work and must not drop it.
        """
        now = self._now()
        wait = self.delay_for(1) if delay is None else delay
        item = RetryItem(
            id=uuid.uuid4().hex,
            kind=kind,
            payload=payload,
            attempts=0,
            next_attempt_at=now + timedelta(seconds=wait),
            last_error=error,
            created_at=now,
        )
        async with self._lock:
            await self._write("upsert", item)
            self._total += 1
            if not self._push_memory(item):
                self._event("spilled")
                logger.info("retry queue %s over capacity: item waits in the store", self.name, extra={"queue": self.name, "item": item.id})
            self._event("queued")
            self._changed.set()
        return item

    async def due(self, *, limit: int = 100) -> list[RetryItem]:
        """Take the items whose time has come, soonest first.

        Each must then be settled with :meth:`succeeded` or :meth:`failed`;
        until then it stays in the store, so a crash brings it back.
        """
        async with self._lock:
            now = self._now()
            out: list[RetryItem] = []
            while self._heap and len(out) < limit and self._heap[0].due <= now:
                entry = heapq.heappop(self._heap)
                self._in_memory.discard(entry.item.id)
                self._checked_out[entry.item.id] = entry.item
                out.append(entry.item)
            if len(self._heap) < self.capacity // 2 and self._total > len(self._heap) + len(self._checked_out):
                await self._refill()
                while self._heap and len(out) < limit and self._heap[0].due <= now:
                    entry = heapq.heappop(self._heap)
                    self._in_memory.discard(entry.item.id)
                    self._checked_out[entry.item.id] = entry.item
                    out.append(entry.item)
            return out

    async def _refill(self) -> None:
        try:
            items = await asyncio.wait_for(self.store.load_pending(limit=self.capacity), self.store_timeout)
        except Exception as exc:
            logger.warning("could not refill retry queue %s from its store: %s", self.name, exc)
            return
        for item in items:
            if not self._push_memory(item):
                break

    async def succeeded(self, item: RetryItem) -> None:
        """The work went through: forget it."""
        async with self._lock:
            await self._write("remove", item.id)
            self._checked_out.pop(item.id, None)
            self._total = max(0, self._total - 1)
            self._event("succeeded")

    async def failed(self, item: RetryItem, error: str, *, permanent: bool = False, retry_after: float | None = None) -> bool:
        """The retry failed again. Returns True when the item is now dead.

        Args:
            permanent: the error can never go away: dead at once.
            retry_after: wait this long instead of the doubling delay (a rate limit's wait; 0: the service came back while this attempt failed).
        """
        async with self._lock:
            self._checked_out.pop(item.id, None)
            attempts = item.attempts + 1
            if permanent or attempts >= self.max_retries:
                dead = replace(item, attempts=attempts, last_error=error)
                await self._write("mark_exhausted", dead)
                self._total = max(0, self._total - 1)
                self._dead += 1
                self._event("exhausted")
                logger.error(
                    "retry item exhausted",
                    extra={"queue": self.name, "item": item.id, "kind": item.kind, "attempts": attempts, "error": error},
                )
                return True
            wait = retry_after if retry_after is not None else self.delay_for(attempts + 1)
            again = replace(item, attempts=attempts, last_error=error, next_attempt_at=self._now() + timedelta(seconds=wait))
            await self._write("upsert", again)
            if not self._push_memory(again):
                self._event("spilled")
            self._event("retried")
            self._changed.set()
            return False

    async def dead_letter(self, item: RetryItem) -> None:
        """Record work that can never succeed as a dead letter at once, without queueing it.

        For work that failed permanently before it was ever queued (an item
        already in the queue is settled with ``failed(..., permanent=True)``).
        The item is written as exhausted (to the fallback when the store
        fails) and counted like an item exhausted by :meth:`failed`. Durable
        when this returns.

        Raises:
            ValueError: an item with this id is in the queue's memory.
            Exception: when both the store and the fallback failed.
        """
        async with self._lock:
            if item.id in self._in_memory or item.id in self._checked_out:
                raise ValueError(f"retry item {item.id} is queued; settle it with failed(..., permanent=True)")
            await self._write("mark_exhausted", item)
            self._dead += 1
            self._event("exhausted")
            logger.warning(
                "retry item dead on arrival",
                extra={"queue": self.name, "item": item.id, "kind": item.kind, "attempts": item.attempts, "error": item.last_error},
            )

    async def postpone(self, item: RetryItem, delay: float, *, reason: str | None = None) -> None:
        """Give back a checked-out item that was not tried (a breaker refused the call), due in ``delay`` s.

        No attempt is counted: the item did nothing wrong. Durable when this returns.
        """
        async with self._lock:
            self._checked_out.pop(item.id, None)
            later = replace(
                item, next_attempt_at=self._now() + timedelta(seconds=max(0.0, delay)), last_error=reason or item.last_error
            )
            await self._write("upsert", later)
            self._push_memory(later)

    async def release(self, item: RetryItem) -> None:
        """Give back a checked-out item untouched (e.g. at shutdown)."""
        async with self._lock:
            self._checked_out.pop(item.id, None)
            self._push_memory(item)

    def retry_now(self, kinds: frozenset[str] | None = None) -> int:
        """Make the items in memory (of these kinds; all when None) due now: the service they
        failed on is back, so they need not wait out their delay. Attempts are not touched.
        Returns how many were brought forward."""
        now = self._now()
        moved = 0
        for entry in self._heap:
            if entry.due > now and (kinds is None or entry.item.kind in kinds):
                entry.due = now
                moved += 1
        if moved:
            heapq.heapify(self._heap)
            self._changed.set()
        return moved

    @property
    def changed(self) -> asyncio.Event:
        """Set whenever an item is queued, given back or brought forward: a loop that drains the
        queue may wake on it (cleared by whoever waits on it)."""
        return self._changed

    def next_due_in(self) -> float | None:
        """Seconds until the soonest item in memory is due (None when empty)."""
        if not self._heap:
            return None if self._total <= len(self._checked_out) else self.base_delay
        return max(0.0, (self._heap[0].due - self._now()).total_seconds())

    async def wait_changed(self, timeout: float) -> None:
        """Sleep up to ``timeout`` or until an item is queued."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def close(self) -> None:
        """Shutdown: give back checked-out items. Everything is already durable."""
        async with self._lock:
            for item in list(self._checked_out.values()):
                self._push_memory(item)
            self._checked_out.clear()
            logger.info("retry queue %s closed with %d items waiting in its store", self.name, self._total)

    def __len__(self) -> int:
        return self._total

    def oldest_age(self) -> float | None:
        """Seconds since the oldest item in memory or in flight was created; None when there is none."""
        created = [e.item.created_at for e in list(self._heap)] + [i.created_at for i in list(self._checked_out.values())]
        return (self._now() - min(created)).total_seconds() if created else None

    def get_status(self) -> dict[str, Any]:
        oldest = self.oldest_age()
        if oldest is not None:
            oldest = round(oldest, 1)
        return {
            "name": self.name,
            "size": self._total,
            "in_memory": len(self._heap),
            "in_flight": len(self._checked_out),
            "capacity": self.capacity,
            "oldest_age_s": oldest,
            "next_due_in_s": None if self.next_due_in() is None else round(self.next_due_in() or 0.0, 1),
            "dead": self._dead,
            **{k: v for k, v in self._counters.items()},
        }
