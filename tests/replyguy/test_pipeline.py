"""bot.ReplyGuy in-process: every step on real parts, one cycle at a time.

The loops' cycles are called directly (the process-level tests in
tests/test_bot.py run them under the watchdog); the stand-ins, the database
and the sandbox are real.
"""

from __future__ import annotations

import random

import pytest

from bot import search_query
from devkit.local_x import SANDBOX_X_CREDENTIALS
from shared.db import RetryItemStatus, Tweet, TweetStatus
from tests.replyguy.conftest import Rig, RigFactory
from tests.replyguy.helpers import active_alerts, eventually

OURS = SANDBOX_X_CREDENTIALS.user_id


async def tweets_by_status(rig: Rig) -> dict[str, list[Tweet]]:
    found: dict[str, list[Tweet]] = {}
    for tweet in await rig.db.list_tweets():
        found.setdefault(tweet.status.value, []).append(tweet)
    return found


async def approved_tweet(rig: Rig, target: str = "1860000000000000001", draft: str = "A kind and useful reply.") -> Tweet:
    """A tweet the operators approved (the approval itself is tested in test_approval)."""
    inserted = await rig.db.insert_tweet(target, author="demo_dev", text="How do you make a bot reliable?")
    tweet_id = inserted.tweet.id
    await rig.db.tweet_transition(tweet_id, [TweetStatus.DISCOVERED], TweetStatus.PENDING_APPROVAL, draft=draft)
    await rig.db.tweet_transition(tweet_id, [TweetStatus.PENDING_APPROVAL], TweetStatus.APPROVED)
    tweet = await rig.db.get_tweet(tweet_id)
    assert tweet is not None
    return tweet


async def current(rig: Rig, tweet: Tweet) -> Tweet:
    fresh = await rig.db.get_tweet(tweet.id)
    assert fresh is not None
    return fresh


def test_the_search_query_asks_for_any_keyword_without_retweets_or_replies() -> None:
    assert search_query(["bot"]) == "bot -is:retweet -is:reply"
    assert search_query(["bot", "two words"]) == '(bot OR "two words") -is:retweet -is:reply'


async def test_one_tweet_goes_from_discovery_to_one_posted_reply(rig_factory: RigFactory) -> None:
    rig = await rig_factory()

    await rig.guy.discover.cycle()
    assert len((await tweets_by_status(rig))["discovered"]) == 3
    await rig.guy.draft.cycle()
    await rig.guy.approve.cycle()
    assert len(rig.drafts_in_chat()) == 3

    rig.world.press("operator", chat=rig.demo.operators, text="Approve")
    approved = await eventually(lambda: _with_status(rig, TweetStatus.APPROVED), what="an approved tweet")
    await rig.guy.post.cycle()

    posted = await current(rig, approved[0])
    assert posted.status is TweetStatus.POSTED and posted.posted_tweet_id
    [reply] = rig.local_x.replies_to(posted.target_tweet_id)
    assert reply["id"] == posted.posted_tweet_id and reply["text"] == posted.draft and reply["author_id"] == OURS
    assert rig.guy.state.posted_today() == 1 and rig.guy.runtime.stats.processed == 1


async def _with_status(rig: Rig, status: TweetStatus) -> list[Tweet]:
    return await rig.db.list_tweets(statuses=[status])


async def test_discovery_stores_each_tweet_once_and_reads_from_its_cursor(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    await rig.guy.discover.cycle()
    searches = rig.local_x.hits["search"]

    await rig.guy.discover.cycle()
    fresh = rig.local_x.add_tweet("someone_new", "is this bot any good?")
    await rig.guy.discover.cycle()

    tweets = await rig.db.list_tweets()
    assert len(tweets) == 4 and tweets[-1].target_tweet_id == fresh["id"] and tweets[-1].author == "someone_new"
    assert rig.guy.state.cursor(f"search:{search_query(['bot'])}") == fresh["id"]
    assert rig.local_x.hits["search"] == searches + 2


async def test_our_own_tweets_are_not_discovered(rig_factory: RigFactory) -> None:
    rig = await rig_factory(env={"REPLY_KEYWORDS": "thanks"})
    rig.local_x.add_tweet("replyguy_demo", "thanks for reading")
    rig.local_x.add_tweet("demo_dev", "thanks everyone")

    await rig.guy.discover.cycle()

    assert [t.author for t in await rig.db.list_tweets()] == ["demo_dev"]


async def test_a_failing_source_does_not_stop_the_others(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    rig.local_x.faults.add("status", endpoint="search", status=500)

    await rig.guy.discover.cycle()

    assert [t.author for t in await rig.db.list_tweets()] == ["demo_news"]


async def test_rate_limited_discovery_waits_for_the_reset_and_alerts(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    rig.local_x.faults.add("rate_limit", endpoint="search", reset_in=90)
    rig.local_x.faults.add("rate_limit", endpoint="user", reset_in=90)

    pause = await rig.guy.discover.cycle()

    assert pause is not None and 60 <= pause <= 91
    assert {"rate_limit_exceeded:twitter:search", "rate_limit_exceeded:twitter:user"} <= set(active_alerts(rig.sink))
    await rig.guy.discover.cycle()
    assert rig.local_x.hits["search"] == 1 and rig.local_x.hits["user"] == 1  # nothing asked before the reset


async def test_an_ai_outage_leaves_tweets_waiting_while_its_breaker_is_open(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    await rig.guy.discover.cycle()
    rig.local_ai.faults.add("status", status=500)

    pause = await rig.guy.draft.cycle()

    assert pause is not None and pause >= 1
    by_status = await tweets_by_status(rig)
    # The tweet whose calls opened the breaker has that attempt counted (a retry waits in the
    # dead-letter queue); the others were never tried and wait, nothing lost.
    [first] = by_status["failed"]
    assert "500" in (first.last_error or "") and len(by_status["discovered"]) == 2
    assert await rig.db.count_retry_items("bot", [RetryItemStatus.PENDING]) == 1
    assert rig.local_ai.hits["chat"] == 3  # ai_service opened after 3 failures


async def test_an_overlong_draft_is_regenerated_before_the_operator_sees_it(rig_factory: RigFactory) -> None:
    rig = await rig_factory(env={"REPLY_TARGET_ACCOUNTS": "demo_news", "REPLY_KEYWORDS": ""})
    await rig.guy.discover.cycle()
    rig.local_ai.faults.add("overlong", count=1)

    await rig.guy.draft.cycle()

    [tweet] = await rig.db.list_tweets(statuses=[TweetStatus.DRAFTED])
    assert tweet.draft and len(tweet.draft) < 280 and rig.local_ai.hits["chat"] == 2


async def test_a_post_whose_answer_was_lost_is_found_and_recorded_once(rig_factory: RigFactory) -> None:
    rig = await rig_factory(env={"TIMEOUT_HTTP": "1"})
    tweet = await approved_tweet(rig)
    rig.local_x.faults.add("answer_lost", endpoint="post", count=1)

    await rig.guy.post.cycle()

    posted = await current(rig, tweet)
    [reply] = rig.local_x.replies_to(tweet.target_tweet_id)
    assert posted.status is TweetStatus.POSTED and posted.posted_tweet_id == reply["id"]
    assert rig.local_x.hits["post"] == 1 and rig.guy.state.posted_today() == 1


async def test_a_post_still_failing_when_x_was_seen_back_is_retried_at_once_not_after_a_minute(rig_factory: RigFactory) -> None:
    """A short X outage: the POST fails, the probe sees X down, then back, while the lookup for the
    reply still retries; the "back" signal came before the retry was queued, so the retry is due now."""
    rig = await rig_factory(env={"RETRY_BASE_DELAY": "60"})
    breaker = rig.breakers["twitter_api"]
    breaker.probe_interval = 0.005  # the probe sees X down, then back, within the lookup's retries
    tweet = await approved_tweet(rig)
    rig.local_x.faults.add("status", endpoint="post", status=503, count=1)
    rig.local_x.faults.add("status", endpoint="timeline", status=503, count=3)
    rig.local_x.faults.add("status", endpoint="me", status=503, count=1)

    await rig.guy.post.cycle()

    assert (await current(rig, tweet)).status is TweetStatus.FAILED and breaker.times_back == 1
    assert rig.queue.next_due_in() == 0.0, "due now, not after RETRY_BASE_DELAY"
    await rig.guy.dlq.cycle()
    assert (await current(rig, tweet)).status is TweetStatus.POSTED
    assert len(rig.local_x.replies_to(tweet.target_tweet_id)) == 1


async def test_a_rate_limited_post_waits_in_line_and_alerts(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await approved_tweet(rig)
    rig.local_x.faults.add("rate_limit", endpoint="post", reset_in=300, count=1)

    pause = await rig.guy.post.cycle()

    assert pause is not None and pause > 200
    assert (await current(rig, tweet)).status is TweetStatus.APPROVED
    assert "rate_limit_exceeded:twitter:post" in active_alerts(rig.sink)
    assert await rig.db.count_retry_items("bot", [RetryItemStatus.PENDING, RetryItemStatus.RETRYING]) == 0


async def test_a_failed_post_is_retried_from_the_dlq_and_goes_out_once(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await approved_tweet(rig)
    rig.local_x.faults.add("status", endpoint="post", status=503, count=1)

    await rig.guy.post.cycle()
    failed = await current(rig, tweet)
    assert failed.status is TweetStatus.FAILED and "503" in (failed.last_error or "")
    assert await rig.db.count_retry_items("bot", [RetryItemStatus.PENDING]) == 1

    await rig.guy.dlq.cycle()

    posted = await current(rig, tweet)
    assert posted.status is TweetStatus.POSTED
    assert len(rig.local_x.replies_to(tweet.target_tweet_id)) == 1 and rig.local_x.hits["post"] == 2
    assert rig.local_x.hits["timeline"] >= 1  # looked for an earlier reply before posting again
    assert await rig.db.count_retry_items("bot", list(RetryItemStatus)) == 0


async def test_the_dlq_retries_as_configured_then_keeps_a_dead_letter_and_alerts_once(rig_factory: RigFactory) -> None:
    rig = await rig_factory(env={"MAX_MESSAGE_RETRIES": "3"})
    tweet = await approved_tweet(rig)
    rig.local_x.faults.add("status", endpoint="post", status=500)

    await rig.guy.post.cycle()
    for _ in range(5):
        await rig.guy.dlq.cycle()

    assert rig.local_x.hits["post"] == 1 + 3  # the first attempt, then 3 retries
    [dead] = await rig.db.exhausted_retry_items("bot")
    assert dead.status is RetryItemStatus.EXHAUSTED and dead.attempts == 3 and "500" in (dead.last_error or "")
    assert (await current(rig, tweet)).status is TweetStatus.FAILED
    assert [a for a in active_alerts(rig.sink) if a.startswith("tweet_processing_failed:dead:")] == [f"tweet_processing_failed:dead:{dead.id}"]
    assert rig.local_x.replies_to(tweet.target_tweet_id) == []


async def test_a_permanent_post_error_is_a_dead_letter_at_once(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await approved_tweet(rig, target="999")  # X knows no such tweet: 400

    await rig.guy.post.cycle()

    assert (await current(rig, tweet)).status is TweetStatus.FAILED
    [dead] = await rig.db.exhausted_retry_items("bot")
    assert dead.kind == "post" and "400" in (dead.last_error or "")
    assert rig.queue.get_status()["dead"] == 1, "the queue counts it at once, not only after a restart"
    assert f"tweet_processing_failed:tweet:{tweet.id}" in active_alerts(rig.sink)


async def test_an_interrupted_post_whose_reply_exists_is_recorded_not_posted_again(rig_factory: RigFactory) -> None:
    rig = await rig_factory(settle_after=0)
    tweet = await approved_tweet(rig)
    # The crash: intent recorded, X got the reply, the process died before recording it.
    await rig.db.tweet_transition(tweet.id, [TweetStatus.APPROVED], TweetStatus.POSTING)
    landed = rig.local_x.add_tweet("replyguy_demo", tweet.draft or "", in_reply_to=tweet.target_tweet_id)

    await rig.guy.post.cycle()

    posted = await current(rig, tweet)
    assert posted.status is TweetStatus.POSTED and posted.posted_tweet_id == landed["id"]
    assert rig.local_x.hits["post"] == 0 and len(rig.local_x.replies_to(tweet.target_tweet_id)) == 1


async def test_an_interrupted_post_that_never_reached_x_is_posted_once(rig_factory: RigFactory) -> None:
    rig = await rig_factory(settle_after=0)
    tweet = await approved_tweet(rig)
    await rig.db.tweet_transition(tweet.id, [TweetStatus.APPROVED], TweetStatus.POSTING)

    await rig.guy.post.cycle()

    posted = await current(rig, tweet)
    assert posted.status is TweetStatus.POSTED and posted.attempts == 2
    assert rig.local_x.hits["post"] == 1 and len(rig.local_x.replies_to(tweet.target_tweet_id)) == 1


async def test_a_young_posting_intent_is_left_alone_while_a_post_may_be_in_flight(rig_factory: RigFactory) -> None:
    rig = await rig_factory()  # settles after TIMEOUT_HTTP + 5 s
    tweet = await approved_tweet(rig)
    await rig.db.tweet_transition(tweet.id, [TweetStatus.APPROVED], TweetStatus.POSTING)

    assert await rig.guy.post.settle_posting() == 0
    assert (await current(rig, tweet)).status is TweetStatus.POSTING and rig.local_x.hits["timeline"] == 0
    # The loop comes back when the intent is old enough to settle, not a whole interval later.
    pause = await rig.guy.post.cycle()
    assert pause is not None and 0 < pause <= rig.guy.post.settle_after
    assert (await current(rig, tweet)).status is TweetStatus.POSTING and rig.local_x.hits["timeline"] == 0


async def test_recovery_puts_stuck_tweets_back_where_they_can_safely_continue(rig_factory: RigFactory) -> None:
    rig = await rig_factory(stale_minutes=0)
    no_draft = (await rig.db.insert_tweet("1860000000000000001", author="a", text="t")).tweet
    await rig.db.tweet_transition(no_draft.id, [TweetStatus.DISCOVERED], TweetStatus.FAILED, last_error="ai down")
    unapproved = (await rig.db.insert_tweet("1860000000000000002", author="b", text="t")).tweet
    await rig.db.tweet_transition(unapproved.id, [TweetStatus.DISCOVERED], TweetStatus.FAILED, draft="a draft")
    posting = await approved_tweet(rig, target="1860000000000000003")
    await rig.db.tweet_transition(posting.id, [TweetStatus.APPROVED], TweetStatus.POSTING)
    dead = (await rig.db.insert_tweet("1860000000000000004", author="d", text="t")).tweet
    await rig.db.tweet_transition(dead.id, [TweetStatus.DISCOVERED], TweetStatus.FAILED, draft="x")
    await rig.db.exhaust_retry_item("bot", item_id="draft-dead", kind="draft", payload={"tweet_id": dead.id},
                                    attempts=5, last_error="gave up")

    counts = await rig.guy.recovery.run()

    assert counts == {"recovered": 4, "to_discovered": 1, "to_drafted": 1, "approved": 1, "kept_dead": 1}
    assert (await current(rig, no_draft)).status is TweetStatus.DISCOVERED
    assert (await current(rig, unapproved)).status is TweetStatus.DRAFTED  # the operator is asked again
    assert (await current(rig, posting)).status is TweetStatus.APPROVED  # posted only after a lookup
    assert (await current(rig, dead)).status is TweetStatus.FAILED


async def test_a_tweet_the_bot_dead_lettered_stays_failed_through_recovery(rig_factory: RigFactory) -> None:
    rig = await rig_factory(stale_minutes=0)
    tweet = await approved_tweet(rig, target="999")  # X knows no such tweet: 400, a dead letter at once
    await rig.guy.post.cycle()
    failed = await current(rig, tweet)
    assert failed.status is TweetStatus.FAILED

    counts = await rig.guy.recovery.run()

    assert counts == {"recovered": 1, "to_discovered": 0, "to_drafted": 0, "approved": 0, "kept_dead": 1}
    assert await current(rig, tweet) == failed
    assert rig.local_x.hits["post"] == 1


async def test_the_daily_cap_stops_posting_until_midnight(rig_factory: RigFactory) -> None:
    rig = await rig_factory(env={"POST_DAILY_CAP": "1"})
    first = await approved_tweet(rig, target="1860000000000000001", draft="first reply")
    second = await approved_tweet(rig, target="1860000000000000002", draft="second reply")

    pause = await rig.guy.post.cycle()

    statuses = {(await current(rig, t)).status for t in (first, second)}
    assert statuses == {TweetStatus.POSTED, TweetStatus.APPROVED}
    assert pause is not None and 0 < pause <= 600 and rig.local_x.hits["post"] == 1


async def test_an_approved_reply_waits_its_random_delay(rig_factory: RigFactory) -> None:
    rig = await rig_factory(env={"POST_DELAY_MIN": "30", "POST_DELAY_MAX": "60"}, rng=random.Random(7))
    tweet = await approved_tweet(rig)

    pause = await rig.guy.post.cycle()

    assert pause is not None and 29 <= pause <= 60
    assert (await current(rig, tweet)).status is TweetStatus.APPROVED and rig.local_x.hits["post"] == 0


async def test_three_failed_cycles_in_a_row_alert_multiple_failures_and_a_success_resolves_it(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    inserted = await rig.db.insert_tweet("1860000000000000001", author="demo_dev", text="t")
    await rig.db.tweet_transition(inserted.tweet.id, [TweetStatus.DISCOVERED], TweetStatus.DRAFTED, draft="d")
    fault = rig.world.set_fault("error", method="SendMessage", error="ChatWriteForbiddenError")
    cycle = rig.guy.watched("approve", rig.guy.approve.cycle)

    for _ in range(3):
        with pytest.raises(Exception):
            await cycle()

    assert "multiple_failures:step:approve" in active_alerts(rig.sink)
    rig.world.clear_faults(fault.id)
    await cycle()
    assert "multiple_failures:step:approve" not in active_alerts(rig.sink)


async def test_health_reports_each_dependency_and_the_worst_overall(rig_factory: RigFactory) -> None:
    rig = await rig_factory()

    health = await rig.guy.health_check_all()
    assert {k: v["status"] for k, v in health["checks"].items()} == {
        "database": "healthy", "twitter": "healthy", "ai": "healthy", "telegram": "healthy"
    }
    assert health["overall"] == "healthy"
    assert all({"status", "detail", "checked_at"} <= set(v) for v in health["checks"].values())

    rig.local_ai.faults.add("status", status=500, count=1)
    await rig.guy.ai.complete([{"role": "user", "content": "hi"}])  # one failure, then a retry that works
    rig.local_x.faults.add("malformed", endpoint="search")
    with pytest.raises(Exception):
        await rig.guy.x.search_recent("bot")
    health = await rig.guy.health_check_all()
    assert health["checks"]["ai"]["status"] == "healthy" and health["checks"]["twitter"]["status"] == "degraded"
    assert health["overall"] == "degraded"

    for _ in range(2):
        with pytest.raises(Exception):
            await rig.guy.x.search_recent("bot")
    health = await rig.guy.health_check_all()
    twitter = health["checks"]["twitter"]
    assert twitter["status"] == "error" and twitter["data"]["circuit_breaker"] == "open"
    assert health["overall"] == "error"


async def test_status_shows_the_pipeline(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    await rig.guy.discover.cycle()

    status = await rig.guy.status()

    assert status["mode"] == "sandbox" and status["tweets"] == {"discovered": 3}
    assert status["daily_cap"] == 50 and status["approval"]["connected"]
