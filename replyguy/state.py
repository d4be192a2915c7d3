"""The Reply Guy's discovery cursors and its replies posted per UTC day.

Both live in the database (``reply_cursors`` and ``tweet_queue``), so a
redeploy on an ephemeral disk forgets nothing; this object keeps a copy in
memory for the loops. Losing a cursor would be harmless anyway: the next
search reads the last page again and ``tweet_queue`` keeps each tweet once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from shared.db import Database

logger = logging.getLogger(__name__)


def utc_day(wall: float) -> str:
    """``YYYY-MM-DD`` of a Unix time, in UTC (the daily cap's day)."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d")


class ReplyState:
    """Cursors (``since_id`` per discovery source) and posts per UTC day.

    Args:
        db: where cursors and posted tweets live.
        clock: wall-clock seconds.
    """

    def __init__(self, db: Database, *, clock: Callable[[], float]) -> None:
        self.db = db
        self.clock = clock
        self.cursors: dict[str, str] = {}
        self.posted: dict[str, int] = {}

    async def load(self) -> None:
        """Read the cursors and today's count from the database."""
        self.cursors = await self.db.reply_cursors()
        midnight = datetime.fromtimestamp(self.clock(), UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        self.posted = {utc_day(self.clock()): await self.db.count_tweets_posted_since(midnight)}

    def cursor(self, source: str) -> str | None:
        return self.cursors.get(source)

    async def advance(self, source: str, newest_id: str) -> None:
        """Move a source's cursor forward (tweet ids only grow)."""
        self.cursors[source] = await self.db.advance_reply_cursor(source, newest_id)

    def posted_today(self) -> int:
        return self.posted.get(utc_day(self.clock()), 0)

    async def count_post(self) -> int:
        """One more reply today; returns today's count."""
        day = utc_day(self.clock())
        self.posted = {day: self.posted.get(day, 0) + 1}
        return self.posted[day]

    def at_least(self, count: int) -> None:
        """Raise today's count to ``count``."""
        day = utc_day(self.clock())
        self.posted[day] = max(self.posted.get(day, 0), count)


__all__ = ["ReplyState", "utc_day"]
