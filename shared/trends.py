"""The last hour in one-minute buckets, in memory, for the status page's sparklines.

Counters (messages sent, failed, received) add up within a minute; levels
(queue depth, the oldest queued message's age) keep the highest value seen
in the minute. Nothing is stored: a restart starts a new hour, which is what
a person looking at "did sending slow down lately?" needs, without another
service. Prometheus keeps the long history.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

COUNTERS = ("sent", "failed", "received")
LEVELS = ("queue_depth", "oldest_queued_age")


class Trends:
    """Per-minute buckets of the last ``minutes`` minutes.

    Args:
        minutes: how many buckets are kept (the page draws all of them).
        clock: Unix time (tests pass their own).
    """

    def __init__(self, *, minutes: int = 60, clock: Callable[[], float] = time.time) -> None:
        self.minutes = minutes
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[int, dict[str, float]] = {}

    def _minute(self) -> int:
        return int(self._clock() // 60)

    def _bucket(self) -> dict[str, float]:
        minute = self._minute()
        bucket = self._buckets.get(minute)
        if bucket is None:
            bucket = self._buckets[minute] = {}
            for old in [m for m in self._buckets if m <= minute - self.minutes]:
                del self._buckets[old]
        return bucket

    def add(self, name: str, count: float = 1) -> None:
        """Count ``count`` events of ``name`` in the current minute."""
        with self._lock:
            bucket = self._bucket()
            bucket[name] = bucket.get(name, 0) + count

    def set_level(self, name: str, value: float) -> None:
        """Record a level; the minute keeps its highest value."""
        with self._lock:
            bucket = self._bucket()
            bucket[name] = max(bucket.get(name, value), value)

    def series(self, name: str) -> list[float | None]:
        """``minutes`` values, oldest first; a minute without data is 0 for a counter, None for a level."""
        empty = None if name in LEVELS else 0
        with self._lock:
            now = self._minute()
            return [self._buckets.get(m, {}).get(name, empty) for m in range(now - self.minutes + 1, now + 1)]

    def as_dict(self) -> dict[str, Any]:
        """What /status carries under ``trends``: the series and the minute the last bucket starts."""
        return {
            "bucket_seconds": 60,
            "last_minute_start": self._minute() * 60,
            "series": {name: self.series(name) for name in (*COUNTERS, *LEVELS)},
        }

    def clear(self) -> None:
        with self._lock:
            self._buckets.clear()


trends = Trends()
"""The process's trends: the bots feed it through :mod:`shared.metrics`; /status shows it."""
