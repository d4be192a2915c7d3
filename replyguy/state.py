"""Small local state of the Reply Guy: discovery cursors and replies posted per day.

Kept in ``DATA_DIR/replyguy/state.json``, written atomically off the event
loop. Losing it is safe by design: without a cursor the next search reads the
last page again and ``tweet_queue`` keeps each tweet once; the day's post
count is seeded from the database at start (see ``ReplyGuy.start``). It
lives in a file because the schema has no table for it yet (the report to
the lead proposes one).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def utc_day(wall: float) -> str:
    """``YYYY-MM-DD`` of a Unix time, in UTC (the daily cap's day)."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d")


class LocalState:
    """Cursors (``since_id`` per discovery source) and posts per UTC day.

    Args:
        path: the JSON file.
        clock: wall-clock seconds.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float]) -> None:
        self.path = Path(path)
        self.clock = clock
        self.cursors: dict[str, str] = {}
        self.posted: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Read the file when it exists (an unreadable file is logged and ignored)."""

        def read() -> dict[str, Any]:
            if not self.path.exists():
                return {}
            return dict(json.loads(self.path.read_text(encoding="utf-8")))

        try:
            data = await asyncio.to_thread(read)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable state file %s: %s", self.path, exc)
            data = {}
        self.cursors = {str(k): str(v) for k, v in (data.get("cursors") or {}).items()}
        self.posted = {str(k): int(v) for k, v in (data.get("posted") or {}).items()}

    async def save(self) -> None:
        today = utc_day(self.clock())
        self.posted = {day: n for day, n in self.posted.items() if day >= today}  # keep only today
        text = json.dumps({"cursors": self.cursors, "posted": self.posted}, indent=1, sort_keys=True)

        def write() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(self.path)

        async with self._lock:
            await asyncio.to_thread(write)

    def cursor(self, source: str) -> str | None:
        return self.cursors.get(source)

    async def advance(self, source: str, newest_id: str) -> None:
        """Move a source's cursor forward (tweet ids only grow)."""
        current = self.cursors.get(source)
        if current is not None and current.isdigit() and newest_id.isdigit() and int(newest_id) <= int(current):
            return
        self.cursors[source] = newest_id
        await self.save()

    def posted_today(self) -> int:
        return self.posted.get(utc_day(self.clock()), 0)

    async def count_post(self) -> int:
        """One more reply today; returns today's count."""
        day = utc_day(self.clock())
        self.posted[day] = self.posted.get(day, 0) + 1
        await self.save()
        return self.posted[day]

    def at_least(self, count: int) -> None:
        """Raise today's count to ``count`` (seeded from the database at start)."""
        day = utc_day(self.clock())
        self.posted[day] = max(self.posted.get(day, 0), count)


__all__ = ["LocalState", "utc_day"]
