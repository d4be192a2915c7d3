"""The Reply Guy bot's tweet queue: insert once, guarded transitions, crash recovery (seed 001)."""

from __future__ import annotations

import pytest

from shared.db import Database, DatabaseRejected, TweetStatus


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


async def test_tweets_stuck_in_failed_or_posting_are_recovered_while_attempts_remain(backend_db: Database) -> None:
    stuck = (await backend_db.insert_tweet("t3")).tweet
    for to in (TweetStatus.DRAFTED, TweetStatus.APPROVED, TweetStatus.POSTING):
        assert await backend_db.tweet_transition(stuck.id, [TweetStatus.DISCOVERED, TweetStatus.DRAFTED, TweetStatus.APPROVED], to)
    failed = (await backend_db.insert_tweet("t4")).tweet
    assert await backend_db.tweet_transition(failed.id, [TweetStatus.DISCOVERED], TweetStatus.FAILED, last_error="API 503")
    fresh = (await backend_db.insert_tweet("t5")).tweet

    assert await backend_db.recover_stale_tweets(minutes=30) == [], "nothing has been stuck for 30 minutes"
    recovered = await backend_db.recover_stale_tweets(minutes=0)
    assert {(r.id, r.previous_status) for r in recovered} == {(stuck.id, TweetStatus.POSTING), (failed.id, TweetStatus.FAILED)}
    again = await backend_db.get_tweet(failed.id)
    assert again is not None and again.status is TweetStatus.APPROVED and again.last_error and "API 503" in again.last_error
    untouched = await backend_db.get_tweet(fresh.id)
    assert untouched is not None and untouched.status is TweetStatus.DISCOVERED
    # Out of attempts: left alone.
    assert await backend_db.tweet_transition(stuck.id, [TweetStatus.APPROVED], TweetStatus.POSTING)
    assert await backend_db.recover_stale_tweets(minutes=0, max_attempts=2) == []


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
