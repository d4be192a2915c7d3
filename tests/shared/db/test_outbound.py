"""The outbound queue's semantics, on every backend (asyncpg, Supabase over HTTP, PostgreSQL 15)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from shared.db import Database, DatabaseRejected, JobKind, OutboundMessage, OutboundStatus, PostgresDatabase, utc_now
from shared.errors import ErrorKind, classify
from tests.shared.db.polling import eventually

SHORT_LEASE = 0.05


async def _account(db: Database, label: str = "main") -> int:
    return (await db.upsert_account(label)).id


async def _claim_one(db: Database, account_id: int, **kwargs: object) -> OutboundMessage:
    rows = await db.claim_outbound([account_id], owner=str(kwargs.pop("owner", "worker-a")), **kwargs)  # type: ignore[arg-type]
    assert len(rows) == 1, rows
    return rows[0]


async def test_concurrent_claimers_never_get_the_same_row(backend_db: Database) -> None:
    account = await _account(backend_db)
    ids = set()
    for n in range(48):
        ids.add((await backend_db.enqueue_outbound(account, f"peer{n % 12}", f"m{n}")).id)
    claimed: list[int] = []

    async def claimer(name: str) -> None:
        while True:
            rows = await backend_db.claim_outbound([account], owner=name, limit=4, per_chat_limit=2)
            if not rows:
                return
            for row in rows:
                claimed.append(row.id)
                assert await backend_db.mark_sent(row.id, row.lease_token or "", telegram_message_id=row.id, chat_id=1000 + row.id)

    await asyncio.gather(*(claimer(f"worker-{i}") for i in range(6)))
    assert len(claimed) == len(set(claimed)), "a row was claimed twice"
    assert set(claimed) == ids


async def test_row_whose_lease_expired_is_claimed_again_with_its_random_id(backend_db: Database) -> None:
    account = await _account(backend_db)
    queued = await backend_db.enqueue_outbound(account, "alice", "hello")
    first = await _claim_one(backend_db, account, owner="killed-worker", lease_seconds=SHORT_LEASE)

    # The first worker "dies": nobody marks the row; once its lease lapses another worker gets it.
    second = (await eventually(lambda: backend_db.claim_outbound([account], owner="worker-b")))[0]

    assert second.id == queued.id
    assert second.random_id == first.random_id == queued.random_id
    assert second.lease_token != first.lease_token
    assert second.attempts == 2


async def test_late_mark_from_the_old_lease_holder_is_refused(backend_db: Database) -> None:
    account = await _account(backend_db)
    await backend_db.enqueue_outbound(account, "alice", "hello")
    zombie = await _claim_one(backend_db, account, owner="zombie", lease_seconds=SHORT_LEASE)
    live = (await eventually(lambda: backend_db.claim_outbound([account], owner="live")))[0]
    assert zombie.lease_token and live.lease_token

    assert await backend_db.mark_sent(zombie.id, zombie.lease_token, telegram_message_id=1, chat_id=7) is False
    assert await backend_db.mark_failed(zombie.id, zombie.lease_token, "late", permanent=True) is None
    assert await backend_db.mark_dead(zombie.id, zombie.lease_token, "late") is False
    assert await backend_db.release_outbound([zombie.id], zombie.lease_token) == 0

    assert await backend_db.mark_sent(live.id, live.lease_token, telegram_message_id=2, chat_id=7) is True
    row = await backend_db.get_outbound(live.id)
    assert row is not None and row.status is OutboundStatus.SENT and row.telegram_message_id == 2


async def test_repeating_a_mark_with_the_same_token_changes_nothing(backend_db: Database) -> None:
    account = await _account(backend_db)
    await backend_db.enqueue_outbound(account, "alice", "hello")
    row = await _claim_one(backend_db, account)
    assert row.lease_token
    assert await backend_db.mark_sent(row.id, row.lease_token, telegram_message_id=5, chat_id=9)
    # The answer to the first mark was lost; the worker marks again.
    assert await backend_db.mark_sent(row.id, row.lease_token, telegram_message_id=5, chat_id=9)
    assert await backend_db.mark_failed(row.id, row.lease_token, "x", permanent=False) is OutboundStatus.SENT


async def test_resend_after_an_unknown_outcome_reuses_the_random_id(backend_db: Database) -> None:
    account = await _account(backend_db)
    queued = await backend_db.enqueue_outbound(account, "alice", "hello")
    first = await _claim_one(backend_db, account)
    assert first.lease_token
    # The send timed out: maybe delivered. Retry right away; the resend must carry the same random_id.
    status = await backend_db.mark_failed(first.id, first.lease_token, "send timed out; outcome unknown", permanent=False, retry_at=utc_now())
    assert status is OutboundStatus.QUEUED
    again = await _claim_one(backend_db, account)
    assert again.random_id == queued.random_id != 0
    assert again.last_error == "send timed out; outcome unknown"


async def test_retries_follow_max_retries_and_base_delay_then_the_row_is_dead(backend_db: Database) -> None:
    account = await _account(backend_db)
    await backend_db.enqueue_outbound(account, "alice", "hello")
    base = 0.01
    for attempt in (1, 2, 3):
        row = (await eventually(lambda: backend_db.claim_outbound([account], owner="w", max_retries=2)))[0]
        assert row.attempts == attempt and row.lease_token
        status = await backend_db.mark_failed(row.id, row.lease_token, f"boom {attempt}", permanent=False, max_retries=2, base_delay=base)
        after = await backend_db.get_outbound(row.id)
        assert after is not None and after.next_attempt_at is not None
        if attempt < 3:
            assert status is OutboundStatus.QUEUED
            assert after.next_attempt_at - after.updated_at == timedelta(seconds=base * 2 ** (attempt - 1))
        else:
            assert status is OutboundStatus.DEAD
            assert after.status is OutboundStatus.DEAD and after.last_error == "boom 3"
    assert await backend_db.claim_outbound([account], owner="w", max_retries=2) == []


async def test_permanent_error_fails_the_row_at_once_with_its_reason(backend_db: Database) -> None:
    account = await _account(backend_db)
    await backend_db.enqueue_outbound(account, "ghost", "hello")
    row = await _claim_one(backend_db, account)
    assert row.lease_token
    reason = "invalid chat: Telegram does not know this peer"
    assert await backend_db.mark_failed(row.id, row.lease_token, reason, permanent=True) is OutboundStatus.FAILED
    failed = await backend_db.get_outbound(row.id)
    assert failed is not None and failed.status is OutboundStatus.FAILED and failed.last_error == reason
    assert failed.attempts == 1
    assert await backend_db.claim_outbound([account], owner="w") == []


async def test_an_operator_requeues_failed_and_dead_rows_which_keep_their_random_id(backend_db: Database) -> None:
    account = await _account(backend_db)
    other = await _account(backend_db, "other")
    failed = await backend_db.enqueue_outbound(account, "ghost", "to a chat joined since")
    row = await _claim_one(backend_db, account)
    assert row.lease_token and row.id == failed.id
    await backend_db.mark_failed(row.id, row.lease_token, "invalid chat", permanent=True)
    elsewhere = await backend_db.enqueue_outbound(other, "ghost", "another account's")
    row = await _claim_one(backend_db, other)
    assert row.lease_token
    await backend_db.mark_failed(row.id, row.lease_token, "invalid chat", permanent=True)
    sent = await backend_db.enqueue_outbound(account, "alice", "delivered")
    row = await _claim_one(backend_db, account)
    assert row.lease_token
    await backend_db.mark_sent(row.id, row.lease_token, telegram_message_id=7)
    before = await backend_db.get_outbound(failed.id)
    assert before is not None

    listed = await backend_db.requeue_outbound(account_id=account, dry_run=True)
    assert [(r.id, r.previous_status, r.last_error) for r in listed] == [(failed.id, OutboundStatus.FAILED, "invalid chat")]
    untouched = await backend_db.get_outbound(failed.id)
    assert untouched is not None and untouched.status is OutboundStatus.FAILED  # a dry run changes nothing

    requeued = await backend_db.requeue_outbound(account_id=account)
    assert [r.id for r in requeued] == [failed.id]  # not the sent row, not the other account's
    again = await _claim_one(backend_db, account)
    assert again.id == failed.id and again.random_id == before.random_id and again.attempts == 1
    assert again.last_error == "requeued by an operator; was failed: invalid chat"
    still = await backend_db.get_outbound(elsewhere.id)
    assert still is not None and still.status is OutboundStatus.FAILED
    assert [r.id for r in await backend_db.requeue_outbound(ids=[elsewhere.id, sent.id])] == [elsewhere.id]
    assert await backend_db.requeue_outbound(ids=[sent.id]) == []


async def test_rows_of_one_chat_go_out_in_enqueue_order(backend_db: Database) -> None:
    account = await _account(backend_db)
    a = [(await backend_db.enqueue_outbound(account, "alice", f"a{i}")).id for i in range(3)]
    b = (await backend_db.enqueue_outbound(account, "bob", "b0")).id

    batch = await backend_db.claim_outbound([account], owner="w1", per_chat_limit=1)
    assert [r.id for r in batch] == [a[0], b]
    # alice's head is still being sent: nobody may start her next message.
    assert await backend_db.claim_outbound([account], owner="w2") == []
    head = batch[0]
    assert head.lease_token
    await backend_db.mark_sent(head.id, head.lease_token, telegram_message_id=1, chat_id=11)
    rest = await backend_db.claim_outbound([account], owner="w2")
    assert [r.id for r in rest] == a[1:], "consecutive rows of one chat come in one batch, in order"


async def test_failed_head_holds_back_its_chat_and_the_rest_of_the_batch_is_released(backend_db: Database) -> None:
    account = await _account(backend_db)
    a = [(await backend_db.enqueue_outbound(account, "alice", f"a{i}")).id for i in range(2)]
    b = (await backend_db.enqueue_outbound(account, "bob", "b0")).id
    batch = await backend_db.claim_outbound([account], owner="w")
    token = batch[0].lease_token
    assert token and [r.id for r in batch] == [*a, b]

    later = utc_now() + timedelta(hours=1)
    assert await backend_db.mark_failed(a[0], token, "flaky", permanent=False, retry_at=later) is OutboundStatus.QUEUED
    assert await backend_db.release_outbound([a[1]], token) == 1
    released = await backend_db.get_outbound(a[1])
    assert released is not None and released.status is OutboundStatus.QUEUED and released.attempts == 0

    await backend_db.mark_sent(b, token, telegram_message_id=3, chat_id=22)
    assert await backend_db.claim_outbound([account], owner="w") == [], "alice waits for her head's retry"


async def test_flood_wait_reschedules_without_counting_the_attempt(backend_db: Database) -> None:
    account = await _account(backend_db)
    await backend_db.enqueue_outbound(account, "alice", "hello")
    row = await _claim_one(backend_db, account)
    assert row.lease_token
    at = utc_now() + timedelta(seconds=300)
    assert await backend_db.reschedule_outbound(row.id, row.lease_token, at=at, reason="FloodWait 300s")
    after = await backend_db.get_outbound(row.id)
    assert after is not None
    assert (after.status, after.attempts, after.last_error) == (OutboundStatus.QUEUED, 0, "FloodWait 300s")
    assert after.next_attempt_at is not None and abs((after.next_attempt_at - at).total_seconds()) < 0.001
    assert await backend_db.claim_outbound([account], owner="w") == []


async def test_dedupe_key_makes_a_repeated_enqueue_return_the_first_row(backend_db: Database) -> None:
    account = await _account(backend_db)
    first = await backend_db.enqueue_outbound(account, "alice", "hello", dedupe_key="req-42")
    again = await backend_db.enqueue_outbound(account, "alice", "hello", dedupe_key="req-42")
    assert first.created and not again.created
    assert (again.id, again.random_id) == (first.id, first.random_id)
    assert len(await backend_db.claim_outbound([account], owner="w")) == 1


async def test_message_without_text_or_attachments_is_rejected_as_permanent(backend_db: Database) -> None:
    account = await _account(backend_db)
    with pytest.raises(DatabaseRejected) as caught:
        await backend_db.enqueue_outbound(account, "alice", "")
    assert caught.value.code == "22023"
    assert classify(caught.value).kind is ErrorKind.PERMANENT
    sent = await backend_db.enqueue_outbound(account, "alice", attachments=["media/cat.jpg"])
    row = await _claim_one(backend_db, account)
    assert row.id == sent.id and row.attachments == ("media/cat.jpg",) and row.text is None


async def test_sweeper_takes_back_rows_of_killed_workers(backend_db: Database) -> None:
    account = await _account(backend_db)
    queued = await backend_db.enqueue_outbound(account, "alice", "a")
    await _claim_one(backend_db, account, owner="killed", lease_seconds=SHORT_LEASE)

    async def requeued() -> tuple[int, int] | None:
        result = await backend_db.requeue_expired_outbound(max_retries=5)
        return (result.requeued, result.dead) if result.requeued or result.dead else None

    assert await eventually(requeued) == (1, 0)
    row = await backend_db.get_outbound(queued.id)
    assert row is not None and row.status is OutboundStatus.QUEUED and row.attempts == 1


async def test_row_whose_worker_died_on_its_last_attempt_becomes_dead(backend_db: Database) -> None:
    account = await _account(backend_db)
    queued = await backend_db.enqueue_outbound(account, "alice", "a")
    await _claim_one(backend_db, account, owner="killed", lease_seconds=SHORT_LEASE, max_retries=0)

    async def dead() -> bool:
        assert await backend_db.claim_outbound([account], owner="w", max_retries=0) == []
        row = await backend_db.get_outbound(queued.id)
        return row is not None and row.status is OutboundStatus.DEAD

    await eventually(dead)
    row = await backend_db.get_outbound(queued.id)
    assert row is not None and row.last_error and "lease expired" in row.last_error


async def test_new_lease_holder_takes_back_the_rows_its_predecessor_was_sending(backend_db: Database) -> None:
    account = await _account(backend_db)
    queued = await backend_db.enqueue_outbound(account, "alice", "a")
    old = await _claim_one(backend_db, account, owner="old-process", lease_seconds=600)
    assert old.lease_token
    await backend_db.create_job(account, JobKind.HISTORY, {"chat_id": 555})
    assert len(await backend_db.claim_jobs([account], [JobKind.HISTORY], owner="old-process")) == 1
    takeover = await backend_db.take_over_account(account, owner="new-process")
    assert (takeover.outbound, takeover.jobs) == (1, 1)
    assert await backend_db.mark_sent(old.id, old.lease_token, telegram_message_id=1, chat_id=2) is False
    again = await _claim_one(backend_db, account, owner="new-process")
    assert again.id == queued.id and again.random_id == queued.random_id


async def test_the_lease_holder_takes_back_its_own_rows_left_by_a_cut_cycle_at_once(backend_db: Database) -> None:
    account = await _account(backend_db)
    token = await backend_db.acquire_account_lease(account, owner="worker-a", seconds=600)
    assert token
    await backend_db.enqueue_outbound(account, "alice", "cut")
    await backend_db.enqueue_outbound(account, "bob", "in hand")
    cut = await backend_db.claim_outbound([account], owner="worker-a", lease_seconds=600, limit=1)
    in_hand = await backend_db.claim_outbound([account], owner="worker-a", lease_seconds=600, limit=1)
    assert len(cut) == len(in_hand) == 1

    # Another process, or a stale account token, may not touch them: the account lease fences the call.
    assert await backend_db.take_back_own_outbound(account, owner="worker-b", account_token=token) == 0
    stale = "00000000-0000-0000-0000-000000000000"
    assert await backend_db.take_back_own_outbound(account, owner="worker-a", account_token=stale) == 0

    taken = await backend_db.take_back_own_outbound(
        account, owner="worker-a", account_token=token, keep_tokens=[in_hand[0].lease_token or ""]
    )
    assert taken == 1, "only the cut batch comes back; the batch still in hand keeps its lease"
    assert await backend_db.mark_sent(cut[0].id, cut[0].lease_token or "", telegram_message_id=1, chat_id=2) is False
    again = await _claim_one(backend_db, account, owner="worker-a")
    assert again.id == cut[0].id and again.random_id == cut[0].random_id
    assert again.attempts == 1, "the cut attempt is not counted"


async def test_counts_and_queue_depth_per_account(backend_db: Database) -> None:
    one = await _account(backend_db, "one")
    two = await _account(backend_db, "two")
    for n in range(3):
        await backend_db.enqueue_outbound(one, f"p{n}", "x")
    await backend_db.enqueue_outbound(two, "p", "x")
    row = (await backend_db.claim_outbound([one], owner="w", limit=1))[0]
    assert row.lease_token
    await backend_db.mark_sent(row.id, row.lease_token, telegram_message_id=1, chat_id=1)
    counts = {(c.account_id, c.status): c.count for c in await backend_db.outbound_counts()}
    assert counts == {(one, OutboundStatus.QUEUED): 2, (one, OutboundStatus.SENT): 1, (two, OutboundStatus.QUEUED): 1}
    assert await backend_db.queue_depth(one) == 2


async def test_queue_stats_give_depth_due_rows_and_the_oldest_due_wait_per_account(backend_db: Database) -> None:
    one = await _account(backend_db, "one")
    two = await _account(backend_db, "two")
    for n in range(3):
        await backend_db.enqueue_outbound(one, f"p{n}", "x")
    await backend_db.enqueue_outbound(two, "p", "later", send_at=utc_now() + timedelta(hours=1))
    row = (await backend_db.claim_outbound([one], owner="w", limit=1))[0]
    await backend_db.mark_sent(row.id, row.lease_token or "", telegram_message_id=1, chat_id=1)
    stats = {s.account_id: s for s in await backend_db.outbound_queue_stats()}
    assert (stats[one].depth, stats[one].due) == (2, 2)
    assert stats[one].oldest_due_age_seconds is not None and 0 <= stats[one].oldest_due_age_seconds < 60
    # A message scheduled for later is in the queue but not due, so it does not age.
    assert (stats[two].depth, stats[two].due, stats[two].oldest_due_age_seconds) == (1, 0, None)


async def test_the_enqueuers_trace_context_travels_with_the_row_and_a_malformed_one_is_dropped(backend_db: Database) -> None:
    account = await _account(backend_db)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for text, value in (("traced", traceparent), ("garbled", "00-not-a-trace-context")):
        await backend_db.call("outbound_enqueue", {"p_account_id": account, "p_peer": "alice", "p_text": text, "p_traceparent": value})
    rows = {r.text: r for r in await backend_db.claim_outbound([account], owner="w", limit=10)}
    assert rows["traced"].traceparent == traceparent
    assert rows["garbled"].traceparent is None and rows["garbled"].status is OutboundStatus.SENDING


async def test_enqueue_wakes_a_waiting_claimer_through_notify(database: PostgresDatabase, database_url: str) -> None:
    account = await _account(database)
    subscription = await database.subscribe("outbound")
    assert subscription.live
    waiter = asyncio.create_task(subscription.wait(timeout=60))
    # Another process enqueues: its own pool, the same database.
    other = await PostgresDatabase(database_url, timeout=10.0).open()
    try:
        await other.enqueue_outbound(account, "alice", "wake up")
    finally:
        await other.close()
    assert await asyncio.wait_for(waiter, timeout=10) is True
    assert len(await database.claim_outbound([account], owner="w")) == 1


async def test_marks_of_sends_that_finished_together_are_written_in_one_statement(backend_db: Database) -> None:
    account = await _account(backend_db)
    for n in range(3):
        await backend_db.enqueue_outbound(account, f"peer{n}", f"m{n}")
    rows = await backend_db.claim_outbound([account], owner="worker-a")
    assert len(rows) == 3
    marks = [(r.id, r.lease_token or "", 100 + r.id, 200 + r.id) for r in rows]
    marks[1] = (rows[1].id, "00000000-0000-0000-0000-000000000000", 1, 2)  # a fenced-off mark
    assert await backend_db.mark_sent_many(marks) == [True, False, True]
    assert await backend_db.mark_sent_many([marks[0]]) == [True], "repeating a mark changes nothing"
    assert (await backend_db.get_outbound(rows[0].id)).status is OutboundStatus.SENT  # type: ignore[union-attr]
    assert (await backend_db.get_outbound(rows[1].id)).status is OutboundStatus.SENDING  # type: ignore[union-attr]


async def test_the_marks_commit_without_waiting_for_the_disk_only_in_their_own_transaction(
    database: PostgresDatabase, database_url: str
) -> None:
    """outbound_mark_sent_many turns synchronous_commit off for its own transaction: its marks are
    visible at once to everyone, and the session's next transactions (claims, enqueues) still wait
    for the disk."""
    account = await _account(database)
    await database.enqueue_outbound(account, "alice", "hello")
    row = await _claim_one(database, account)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("set synchronous_commit = on")  # the test server's default may be off
        async with conn.transaction():
            marked = await conn.fetch(
                "select * from outbound_mark_sent_many($1, $2, $3, $4)", [row.id], [row.lease_token], [7], [8]
            )
            assert [(r["id"], r["marked"]) for r in marked] == [(row.id, True)]
            assert await conn.fetchval("show synchronous_commit") == "off"
        assert await conn.fetchval("show synchronous_commit") == "on"
    finally:
        await conn.close()
    assert (await database.get_outbound(row.id)).status is OutboundStatus.SENT  # type: ignore[union-attr]


async def test_rows_waiting_behind_a_flood_waited_head_never_starve_other_chats(backend_db: Database) -> None:
    account = await _account(backend_db)
    head = await backend_db.enqueue_outbound(account, "alice", "a0")
    for n in range(1, 5):
        await backend_db.enqueue_outbound(account, "alice", f"a{n}")
    other = await backend_db.enqueue_outbound(account, "bob", "b0")
    claimed = await _claim_one(backend_db, account, limit=1)
    assert claimed.id == head.id
    # Telegram asked alice's chat to wait: its head goes back to the queue for a minute.
    assert await backend_db.reschedule_outbound(head.id, claimed.lease_token or "", at=utc_now() + timedelta(seconds=60))
    # The window of candidates (limit * 4 = 4 rows) would hold only alice's waiting rows.
    nxt = await _claim_one(backend_db, account, limit=1)
    assert nxt.id == other.id, "bob's message is claimed although alice's rows wait behind her head"


async def test_a_local_wake_ends_the_outbound_wait_without_a_notification(backend_db: Database) -> None:
    """What the worker does when an account connects again: its queued rows may go now, so the outbound
    loop's wait ends at once instead of at the next poll (nothing changed in the database)."""
    backend_db.wake("outbound")  # nobody waits yet: nothing is latched for later
    await backend_db.wait_for_wakeup("outbound", 0)  # the loop's subscription, as at its first idle wait
    backend_db.wake("outbound")
    assert await asyncio.wait_for(backend_db.wait_for_wakeup("outbound", 3600), 10) is True


async def test_a_local_wake_reaches_every_subscription_of_the_channel_and_none_of_another(backend_db: Database) -> None:
    """The worker's history and jobs loops each wait on their own subscription to the jobs channel:
    an account that connects wakes both, and nothing listening elsewhere."""
    history, jobs, accounts = [await backend_db.subscribe(c) for c in ("jobs", "jobs", "accounts")]
    closed = await backend_db.subscribe("jobs")
    closed.close()

    backend_db.wake("jobs")

    assert history.event.is_set() and jobs.event.is_set()
    assert not accounts.event.is_set() and not closed.event.is_set()
    for sub in (history, jobs, accounts):
        sub.close()
