"""The retry queue's durable store in retry_items (one table of failed items for every bot)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from shared.db import Database
from shared.db.retry_store import DbRetryStore
from shared.retry_queue import RetryItem, RetryQueue

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _item(item_id: str, *, attempts: int = 0, due: datetime = T0, error: str | None = None) -> RetryItem:
    return RetryItem(id=item_id, kind="post_tweet", payload={"tweet": item_id}, attempts=attempts, next_attempt_at=due, last_error=error, created_at=T0)


async def test_store_keeps_pending_items_soonest_first_and_dead_letters_apart(backend_db: Database) -> None:
    store = DbRetryStore(backend_db, "reply_guy")
    await store.upsert(_item("b", due=T0 + timedelta(minutes=5)))
    await store.upsert(_item("a", attempts=2, due=T0 + timedelta(minutes=1), error="503"))
    await store.upsert(_item("c", due=T0 + timedelta(minutes=9)))
    assert [i.id for i in await store.load_pending(limit=2)] == ["a", "b"]
    loaded = (await store.load_pending(limit=10))[0]
    assert loaded == _item("a", attempts=2, due=T0 + timedelta(minutes=1), error="503")
    assert await store.count_pending() == 3

    await store.mark_exhausted(_item("c", attempts=5, error="gave up: 503"))
    await store.remove("b")
    assert await store.count_pending() == 1 and await store.count_exhausted() == 1
    (dead,) = await store.exhausted_items()
    assert dead.id == "c" and dead.last_error == "gave up: 503"
    # Another bot's items are its own.
    assert await DbRetryStore(backend_db, "worker").count_pending() == 0


async def test_retry_queue_spills_into_the_table_and_a_new_process_finds_everything(database: Database) -> None:
    clock = T0.timestamp()
    queue = RetryQueue(name="worker", store=DbRetryStore(database, "worker"), capacity=2, base_delay=60, clock=lambda: clock)
    for n in range(5):
        await queue.put("send", {"n": n}, error=f"boom {n}")
    restarted = RetryQueue(name="worker", store=DbRetryStore(database, "worker"), capacity=10, base_delay=60, clock=lambda: clock + 3600)
    assert await restarted.load() == 5
    due = await restarted.due(limit=10)
    assert sorted(item.payload["n"] for item in due) == [0, 1, 2, 3, 4]


async def test_a_dead_letter_on_arrival_is_an_exhausted_row_and_the_queue_counts_it_at_once(backend_db: Database) -> None:
    queue = RetryQueue(name="reply_guy", store=DbRetryStore(backend_db, "reply_guy"), base_delay=60, clock=lambda: T0.timestamp())
    await queue.load()

    await queue.dead_letter(_item("post-t1", attempts=1, error="X 400"))

    assert (queue.get_status()["dead"], len(queue)) == (1, 0)
    (row,) = await backend_db.exhausted_retry_items("reply_guy")
    assert (row.id, row.kind, row.attempts, row.last_error) == ("post-t1", "post_tweet", 1, "X 400")
    assert await DbRetryStore(backend_db, "reply_guy").count_pending() == 0
    restarted = RetryQueue(name="reply_guy", store=DbRetryStore(backend_db, "reply_guy"))
    assert await restarted.load() == 0 and restarted.get_status()["dead"] == 1
