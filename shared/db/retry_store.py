"""The retry queue's durable store in the ``retry_items`` table.

:class:`DbRetryStore` implements :class:`shared.retry_queue.RetryStore` for one
bot: its rows are ``retry_items`` with ``bot = <name>`` (the original bot's
``failed_tweets`` are the Reply Guy bot's rows). Pending items have
``attempts == 0``, retrying ones more; exhausted items stay as dead letters
with their last error.
"""

from __future__ import annotations

import logging

from shared.db.base import Database
from shared.db.records import RetryItemStatus, RetryRow
from shared.retry_queue import RetryItem

logger = logging.getLogger(__name__)


def _item(row: RetryRow) -> RetryItem:
    return RetryItem(
        id=row.id,
        kind=row.kind,
        payload=dict(row.payload),
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        created_at=row.created_at,
    )


class DbRetryStore:
    """A :class:`shared.retry_queue.RetryStore` on the database.

    Args:
        db: the database (any backend).
        bot: whose items these are (``worker``, ``ingest``, ``reply_guy`` ...).

    Every method raises what :class:`Database` calls raise (the retry queue
    falls back to its local file while the database is unavailable).
    """

    def __init__(self, db: Database, bot: str) -> None:
        if not bot:
            raise ValueError("bot name is required")
        self.db = db
        self.bot = bot

    async def upsert(self, item: RetryItem) -> None:
        """Insert or update by id: pending (no attempts yet) or retrying."""
        await self.db.upsert_retry_item(
            self.bot,
            item_id=item.id,
            kind=item.kind,
            payload=item.payload,
            attempts=item.attempts,
            next_attempt_at=item.next_attempt_at,
            last_error=item.last_error,
            created_at=item.created_at,
        )

    async def remove(self, item_id: str) -> None:
        await self.db.remove_retry_item(self.bot, item_id)

    async def load_pending(self, *, limit: int) -> list[RetryItem]:
        """Items still to retry, soonest ``next_attempt_at`` first."""
        return [_item(row) for row in await self.db.pending_retry_items(self.bot, limit=limit)]

    async def count_pending(self) -> int:
        return await self.db.count_retry_items(self.bot, (RetryItemStatus.PENDING, RetryItemStatus.RETRYING))

    async def mark_exhausted(self, item: RetryItem) -> None:
        """Keep the item as a dead letter (status exhausted, its last error)."""
        await self.db.exhaust_retry_item(
            self.bot,
            item_id=item.id,
            kind=item.kind,
            payload=item.payload,
            attempts=item.attempts,
            last_error=item.last_error,
            created_at=item.created_at,
        )

    async def count_exhausted(self) -> int:
        return await self.db.count_retry_items(self.bot, (RetryItemStatus.EXHAUSTED,))

    async def exhausted_items(self, *, limit: int = 100) -> list[RetryItem]:
        """Dead letters, newest first (for operators)."""
        return [_item(row) for row in await self.db.exhausted_retry_items(self.bot, limit=limit)]
