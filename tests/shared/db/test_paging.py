"""Answers longer than Supabase's 1000-row cap: every list is read in pages, on every backend.

Supabase's API (PostgREST's max-rows) answers at most 1000 rows per request and
says nothing of the rest; the stand-in does the same. The big tests run over
HTTP with 1500 rows; the others read each list with tiny pages and compare it
with one read in a single page, so each keyset is proven, ties included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from shared.db import (
    Database,
    Direction,
    InboundMessage,
    IngestStatus,
    OutboundStatus,
    SupabaseDatabase,
    TweetStatus,
)
from shared.heartbeat import HeartbeatRecord
from tests.fixtures.postgrest import DEFAULT_MAX_ROWS, PostgrestEndpoint

MANY = 1500
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


async def _sql(dsn: str, statement: str, *args: Any) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def _failed_outbound(dsn: str, account_id: int, count: int) -> None:
    """``count`` outbound messages that ended failed, written at once (the queue's own path is proven elsewhere)."""
    await _sql(
        dsn,
        "insert into messages (account_id, direction, peer, text, status, random_id, attempts, last_error) "
        "select $1, 'outbound', 'peer' || n, 'm' || n, 'failed', new_random_id(), 1, 'invalid chat' "
        "from generate_series(1, $2) n",
        account_id,
        count,
    )


async def test_the_stand_in_leaves_out_rows_beyond_1000_like_supabase(
    supabase_database: SupabaseDatabase, postgrest: PostgrestEndpoint, database_url: str
) -> None:
    account = (await supabase_database.upsert_account("main")).id
    await _failed_outbound(database_url, account, MANY)
    # One unpaged call: the function chooses all 1500, the answer holds 1000.
    rows = await supabase_database.call("outbound_requeue", {"p_account_id": account, "p_dry_run": True})
    assert postgrest.max_rows == DEFAULT_MAX_ROWS == len(rows) == 1000


async def test_requeue_of_1500_messages_completes_over_http(supabase_database: SupabaseDatabase, database_url: str) -> None:
    account = (await supabase_database.upsert_account("main")).id
    await _failed_outbound(database_url, account, MANY)

    listed = await supabase_database.requeue_outbound(account_id=account, dry_run=True)
    assert len(listed) == len({r.id for r in listed}) == MANY
    requeued = await supabase_database.requeue_outbound(account_id=account)
    assert sorted(r.id for r in requeued) == sorted(r.id for r in listed)
    counts = {c.status: c.count for c in await supabase_database.outbound_counts(account)}
    assert counts == {OutboundStatus.QUEUED: MANY}


async def test_recovery_of_1500_stale_tweets_completes_over_http(supabase_database: SupabaseDatabase, database_url: str) -> None:
    await _sql(
        database_url,
        "insert into tweet_queue (target_tweet_id, status, draft, approved_at, updated_at) "
        "select 't' || n, 'posting', 'a draft', now() - interval '2 hours', now() - interval '1 hour' "
        "from generate_series(1, $1) n",
        MANY,
    )
    recovered = await supabase_database.recover_stale_tweets(minutes=30)
    assert len(recovered) == len({r.id for r in recovered}) == MANY
    assert {(r.previous_status, r.status) for r in recovered} == {(TweetStatus.POSTING, TweetStatus.APPROVED)}
    assert await supabase_database.tweet_counts() == {TweetStatus.APPROVED: MANY}


async def test_a_list_of_1500_rows_reads_whole_over_http(supabase_database: SupabaseDatabase, database_url: str) -> None:
    await _sql(
        database_url,
        "insert into telegram_accounts (label) select 'account-' || lpad(n::text, 4, '0') from generate_series(1, $1) n",
        MANY,
    )
    accounts = await supabase_database.list_accounts()
    assert [a.label for a in accounts] == [f"account-{n:04d}" for n in range(1, MANY + 1)]


async def test_a_batch_of_1500_messages_is_stored_with_one_answer_each_over_http(supabase_database: SupabaseDatabase) -> None:
    account = (await supabase_database.upsert_account("main")).id
    messages = [
        InboundMessage(chat_id=100 + n % 2, telegram_message_id=n, direction=Direction.INBOUND, text=f"m{n}", sent_at=T0)
        for n in range(1, MANY + 1)
    ]
    stored = await supabase_database.store_messages(account, [*messages, messages[0]])
    assert len(stored) == MANY + 1
    assert all(s.inserted for s in stored[:MANY]) and not stored[MANY].inserted
    assert stored[MANY].id == stored[0].id
    odd, even = await supabase_database.get_chat(account, 101), await supabase_database.get_chat(account, 100)
    assert odd is not None and even is not None
    assert (odd.last_message_id, even.last_message_id) == (MANY - 1, MANY)


# --- every list, in tiny pages, equals the list in one page ---------------------------------------


async def _in_pages(db: Database, read: Callable[[], Awaitable[Any]], page_size: int = 2) -> tuple[Any, Any]:
    """What ``read`` returns with pages of ``page_size`` rows, and with one page for everything."""
    before = db.page_size
    try:
        db.page_size = page_size
        small = await read()
        db.page_size = 10_000
        whole = await read()
    finally:
        db.page_size = before
    return small, whole


async def test_every_list_reads_the_same_in_tiny_pages_as_in_one(backend_db: Database) -> None:
    db = backend_db
    accounts = [(await db.upsert_account(f"acct-{n}")).id for n in range(5)]
    main = accounts[0]
    # Chats: two with the same last message time, two that never had a message.
    await db.store_messages(
        main,
        [
            InboundMessage(chat_id=chat, telegram_message_id=1, direction=Direction.INBOUND, text="hi", sent_at=at)
            for chat, at in [(11, T0), (12, T0), (13, T0 + timedelta(seconds=1)), (14, T0 - timedelta(days=1))]
        ],
    )
    for chat in (15, 16, 17):
        await db.upsert_chat(main, chat)
    # Outbound rows of several accounts and statuses.
    for account in accounts:
        await db.enqueue_outbound(account, "alice", "one")
        await db.enqueue_outbound(account, "bob", "two")
    await db.claim_outbound(accounts[:3], owner="w", limit=3, per_chat_limit=1)
    for n in range(5):
        await db.write_heartbeat(HeartbeatRecord(f"worker-{n}", "running", {}, "1", "host", 100 + n))
    for n in range(5):  # the same due time and creation time: the id breaks the tie
        await db.upsert_retry_item("bot", item_id=f"r{n}", kind="k", payload={}, attempts=n % 2, next_attempt_at=T0, last_error=None, created_at=T0)
        await db.exhaust_retry_item("bot", item_id=f"x{n}", kind="k", payload={}, attempts=3, last_error="gone", created_at=T0)
    for n in range(5):
        await db.record_ingest_image(-100, n, status=IngestStatus.STORED, storage_key=f"k{n}", sha256="same")
    for n in range(5):
        await db.insert_tweet(f"tw{n}")
        await db.advance_reply_cursor(f"source-{n}", str(n))

    reads: dict[str, Callable[[], Awaitable[Any]]] = {
        "accounts": db.list_accounts,
        "recent chats": lambda: db.recent_chats(main),
        "recent chats, at most 5": lambda: db.recent_chats(main, limit=5),
        "chats since": lambda: db.recent_chats(main, since=T0),
        "outbound counts": db.outbound_counts,
        "heartbeats": db.list_heartbeats,
        "pending retry items": lambda: db.pending_retry_items("bot", limit=100),
        "pending retry items, at most 3": lambda: db.pending_retry_items("bot", limit=3),
        "dead letters": lambda: db.exhausted_retry_items("bot", limit=100),
        "images by hash": lambda: db.ingest_images_by_sha256("same"),
        "stored keys": lambda: db.ingest_stored_keys([f"k{n}" for n in range(7)]),
        "tweets": lambda: db.list_tweets(limit=100),
        "tweets, at most 3": lambda: db.list_tweets(statuses=[TweetStatus.DISCOVERED], limit=3),
        "reply cursors": db.reply_cursors,
    }
    for name, read in reads.items():
        small, whole = await _in_pages(db, read)
        assert small == whole, name
        assert whole, name
    assert [c.telegram_chat_id for c in await db.recent_chats(main)] == [13, 11, 12, 14, 15, 16, 17]
    assert len(await db.list_accounts()) == 5 and len(await db.list_tweets(limit=3)) == 3
    assert await db.ingest_stored_keys([f"k{n}" for n in range(7)]) == {f"k{n}" for n in range(5)}


async def test_requeue_and_recovery_in_tiny_pages_move_every_row_once(backend_db: Database) -> None:
    db = backend_db
    db.page_size = 2
    account = (await db.upsert_account("main")).id
    for n in range(5):
        await db.enqueue_outbound(account, f"peer{n}", "hello")
    while claimed := await db.claim_outbound([account], owner="w", limit=10):
        for row in claimed:
            assert row.lease_token
            await db.mark_failed(row.id, row.lease_token, "invalid chat", permanent=True)
    dry = await db.requeue_outbound(account_id=account, dry_run=True)
    done = await db.requeue_outbound(account_id=account)
    assert len(dry) == 5 and [r.id for r in done] == [r.id for r in dry]

    for n in range(5):
        tweet = (await db.insert_tweet(f"stale{n}")).tweet
        assert await db.tweet_transition(tweet.id, [TweetStatus.DISCOVERED], TweetStatus.FAILED, last_error="AI 500")
        if n == 0:  # a dead letter: kept failed, and still reported once
            await db.exhaust_retry_item("replyguy", item_id="d", kind="draft", payload={"tweet_id": str(tweet.id)}, attempts=5, last_error="AI 500")
    recovered = await db.recover_stale_tweets(minutes=0, bot="replyguy")
    assert len(recovered) == len({r.id for r in recovered}) == 5
    assert sorted(r.status.value for r in recovered) == ["discovered"] * 4 + ["failed"]
    assert await db.recover_stale_tweets(minutes=0, bot="replyguy") == [
        r for r in recovered if r.status is TweetStatus.FAILED
    ]


async def test_a_claim_never_asks_for_more_rows_than_an_answer_can_hold(backend_db: Database) -> None:
    db = backend_db
    db.page_size = 2
    account = (await db.upsert_account("main")).id
    for n in range(5):
        await db.enqueue_outbound(account, f"peer{n}", "hello")
    claimed = await db.claim_outbound([account], owner="w", limit=50)
    expected = 2 if db.rows_capped else 5  # asyncpg answers every row
    assert len(claimed) == min(db.batch_limit(50), 5) == expected
    counts = {c.status: c.count for c in await db.outbound_counts(account)}
    assert (counts.get(OutboundStatus.SENDING), counts.get(OutboundStatus.QUEUED, 0)) == (expected, 5 - expected)  # none claimed unseen


@pytest.mark.parametrize("advance", [True, False])
async def test_a_long_batch_moves_chat_cursors_only_when_asked(backend_db: Database, advance: bool) -> None:
    db = backend_db
    db.page_size = 2
    account = (await db.upsert_account("main")).id
    ids = [5, 3, 9, 1, 7]
    messages = [InboundMessage(chat_id=42, telegram_message_id=i, direction=Direction.INBOUND, text=str(i), sent_at=T0) for i in ids]
    stored = await db.store_messages(account, messages, advance_cursor=advance)
    assert [s.telegram_message_id for s in stored] == ids and all(s.inserted for s in stored)
    chat = await db.get_chat(account, 42)
    assert chat is not None and chat.last_message_id == (9 if advance else 0)
