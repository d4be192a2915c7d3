"""The Reply Guy bot's tweet queue: insert once, guarded transitions, crash recovery."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.db import Database, DatabaseRejected, Tweet, TweetStatus


async def test_tweet_is_queued_once_per_target(backend_db: Database) -> None:
    first = await backend_db.insert_tweet("1790000000000000001", author="@someone", text="hot take")
    again = await backend_db.insert_tweet("1790000000000000001", author="@someone", text="hot take")
    assert first.created and not again.created
    assert again.tweet.id == first.tweet.id and again.tweet.status is TweetStatus.DISCOVERED


async def test_transition_applies_only_from_the_expected_statuses(backend_db: Database) -> None:
    tweet = (await backend_db.insert_tweet("t1")).tweet
    assert await backend_db.tweet_transition(tweet.id, [TweetStatus.DISCOVERED], TweetStatus.DRAFTED, draft="reply")
    assert await backend_db.tweet_transition(tweet.id, [TweetStatus.DRAFTED], TweetStatus.PENDING_APPROVAL, approval_message_id=321)
    assert await backend_db.tweet_transition(tweet.id, [TweetStatus.PENDING_APPROVAL], TweetStatus.APPROVED)
    # Two workers race to post: only one moves it.
    assert await backend_db.tweet_transition(tweet.id, [TweetStatus.APPROVED], TweetStatus.POSTING)
    assert await backend_db.tweet_transition(tweet.id, [TweetStatus.APPROVED], TweetStatus.POSTING) is False
    assert await backend_db.tweet_transition(tweet.id, [TweetStatus.POSTING], TweetStatus.POSTED, posted_tweet_id="999")
    done = await backend_db.get_tweet(tweet.id)
    assert done is not None
    assert (done.status, done.draft, done.approval_message_id, done.posted_tweet_id, done.attempts) == (TweetStatus.POSTED, "reply", 321, "999", 1)
    assert done.drafted_at and done.approved_at and done.posted_at
    assert await backend_db.tweet_counts() == {TweetStatus.POSTED: 1}
    assert [t.id for t in await backend_db.list_tweets(statuses=[TweetStatus.POSTED])] == [tweet.id]


async def test_unknown_transition_field_is_rejected(backend_db: Database) -> None:
    tweet = (await backend_db.insert_tweet("t2")).tweet
    with pytest.raises(DatabaseRejected):
        await backend_db.call("tweet_transition", {"p_id": tweet.id, "p_from": ["discovered"], "p_to": "drafted", "p_fields": {"status": "posted"}})


async def _tweet_in(db: Database, target: str, path: list[TweetStatus], *, draft: str | None = None, error: str | None = None) -> Tweet:
    """A new tweet moved along ``path`` (the draft, if any, set on the first step, the error on the last)."""
    tweet = (await db.insert_tweet(target)).tweet
    at = TweetStatus.DISCOVERED
    for number, to in enumerate(path):
        first, last = number == 0, number == len(path) - 1
        assert await db.tweet_transition(tweet.id, [at], to, draft=draft if first else None, last_error=error if last else None)
        at = to
    moved = await db.get_tweet(tweet.id)
    assert moved is not None
    return moved


APPROVED_THEN = [TweetStatus.PENDING_APPROVAL, TweetStatus.APPROVED]


async def test_recovery_sends_each_stale_tweet_straight_to_where_it_can_safely_continue(backend_db: Database) -> None:
    no_draft = await _tweet_in(backend_db, "t3", [TweetStatus.FAILED], error="API 503")
    unapproved = await _tweet_in(backend_db, "t4", [TweetStatus.FAILED], draft="a draft", error="AI 500")
    unapproved_posting = await _tweet_in(backend_db, "t5", [TweetStatus.DRAFTED, TweetStatus.POSTING], draft="a draft")
    approved_posting = await _tweet_in(backend_db, "t6", [*APPROVED_THEN, TweetStatus.POSTING], draft="a reply")
    approved_failed = await _tweet_in(backend_db, "t7", [*APPROVED_THEN, TweetStatus.POSTING, TweetStatus.FAILED], draft="a reply")
    fresh = await _tweet_in(backend_db, "t8", [])

    assert await backend_db.recover_stale_tweets(minutes=30) == [], "nothing has been stuck for 30 minutes"
    recovered = await backend_db.recover_stale_tweets(minutes=0)

    assert {(r.id, r.previous_status, r.status) for r in recovered} == {
        (no_draft.id, TweetStatus.FAILED, TweetStatus.DISCOVERED),
        (unapproved.id, TweetStatus.FAILED, TweetStatus.DRAFTED),
        (unapproved_posting.id, TweetStatus.POSTING, TweetStatus.DRAFTED),
        (approved_posting.id, TweetStatus.POSTING, TweetStatus.APPROVED),
        (approved_failed.id, TweetStatus.FAILED, TweetStatus.APPROVED),
    }
    for item in recovered:
        now = await backend_db.get_tweet(item.id)
        assert now is not None and now.status is item.status, "the result is what the table holds"
    # Nothing an operator did not approve is ever approved, not even for a moment.
    assert {t.id for t in await backend_db.list_tweets(statuses=[TweetStatus.APPROVED])} == {approved_posting.id, approved_failed.id}
    again = await backend_db.get_tweet(no_draft.id)
    assert again is not None and again.last_error and "recovered after" in again.last_error and "API 503" in again.last_error
    untouched = await backend_db.get_tweet(fresh.id)
    assert untouched is not None and untouched.status is TweetStatus.DISCOVERED


async def test_recovery_leaves_tweets_alone_once_out_of_posting_attempts(backend_db: Database) -> None:
    tired = await _tweet_in(backend_db, "t9", [*APPROVED_THEN, TweetStatus.POSTING, TweetStatus.APPROVED, TweetStatus.POSTING], draft="r")
    assert tired.attempts == 2

    assert await backend_db.recover_stale_tweets(minutes=0, max_attempts=2) == []
    assert [(r.id, r.status) for r in await backend_db.recover_stale_tweets(minutes=0, max_attempts=3)] == [(tired.id, TweetStatus.APPROVED)]


async def test_recovery_keeps_the_bots_dead_letters_failed_and_untouched(backend_db: Database) -> None:
    dead = await _tweet_in(backend_db, "t10", [*APPROVED_THEN, TweetStatus.POSTING, TweetStatus.FAILED], draft="r", error="X 400")
    await backend_db.exhaust_retry_item("bot", item_id=f"post-{dead.id}", kind="post", payload={"tweet_id": dead.id},
                                        attempts=1, last_error="X 400")
    dead_posting = await _tweet_in(backend_db, "t11", [*APPROVED_THEN, TweetStatus.POSTING], draft="r")
    await backend_db.exhaust_retry_item("bot", item_id="any-id", kind="post", payload={"tweet_id": dead_posting.id},
                                        attempts=3, last_error="X 500")
    still_retrying = await _tweet_in(backend_db, "t12", [*APPROVED_THEN, TweetStatus.POSTING, TweetStatus.FAILED], draft="r")
    await backend_db.upsert_retry_item("bot", item_id="pending-id", kind="post", payload={"tweet_id": still_retrying.id},
                                       attempts=1, next_attempt_at=datetime.now(UTC), last_error="X 500")
    other_bots = await _tweet_in(backend_db, "t13", [TweetStatus.FAILED], draft="r")
    await backend_db.exhaust_retry_item("worker", item_id="w", kind="send", payload={"tweet_id": other_bots.id},
                                        attempts=5, last_error="gone")

    recovered = await backend_db.recover_stale_tweets(minutes=0, bot="bot")

    assert {(r.id, r.previous_status, r.status) for r in recovered} == {
        (dead.id, TweetStatus.FAILED, TweetStatus.FAILED),
        (dead_posting.id, TweetStatus.POSTING, TweetStatus.FAILED),
        (still_retrying.id, TweetStatus.FAILED, TweetStatus.APPROVED),  # a pending retry is no dead letter
        (other_bots.id, TweetStatus.FAILED, TweetStatus.DRAFTED),  # another bot's dead letter is not ours
    }
    assert await backend_db.get_tweet(dead.id) == dead, "the dead letter's row is not written at all"
    was_posting = await backend_db.get_tweet(dead_posting.id)
    assert was_posting is not None and was_posting.status is TweetStatus.FAILED
    # Without a bot, any bot's dead letter counts.
    orphan = await _tweet_in(backend_db, "t14", [TweetStatus.FAILED], draft="r")
    await backend_db.exhaust_retry_item("worker", item_id="w2", kind="send", payload={"tweet_id": orphan.id},
                                        attempts=5, last_error="gone")
    assert [(r.id, r.status) for r in await backend_db.recover_stale_tweets(minutes=0) if r.id == orphan.id] == [
        (orphan.id, TweetStatus.FAILED)
    ]


async def test_reply_cursors_only_move_forward_and_posts_are_counted_since_a_time(backend_db: Database) -> None:
    from datetime import UTC, datetime, timedelta

    assert await backend_db.reply_cursors() == {}
    assert await backend_db.advance_reply_cursor("search:bot", "1790000000000000009") == "1790000000000000009"
    assert await backend_db.advance_reply_cursor("search:bot", "1790000000000000008") == "1790000000000000009"
    assert await backend_db.advance_reply_cursor("search:bot", "17900000000000000010") == "17900000000000000010"
    assert await backend_db.reply_cursors() == {"search:bot": "17900000000000000010"}
    tweet = (await backend_db.insert_tweet("t-count")).tweet
    for before, after in (
        (TweetStatus.DISCOVERED, TweetStatus.DRAFTED),
        (TweetStatus.DRAFTED, TweetStatus.PENDING_APPROVAL),
        (TweetStatus.PENDING_APPROVAL, TweetStatus.APPROVED),
        (TweetStatus.APPROVED, TweetStatus.POSTING),
    ):
        assert await backend_db.tweet_transition(tweet.id, [before], after)
    assert await backend_db.tweet_transition(tweet.id, [TweetStatus.POSTING], TweetStatus.POSTED, posted_tweet_id="1")
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    assert await backend_db.count_tweets_posted_since(hour_ago) == 1
    assert await backend_db.count_tweets_posted_since(datetime.now(UTC) + timedelta(hours=1)) == 0
