"""The X API client against the stand-in X server: reads, OAuth 1.0a posts, and every fault mode."""

from __future__ import annotations

import dataclasses
import time

import pytest

from replyguy.http import RetryPolicy
from devkit.local_x import SANDBOX_X_CREDENTIALS, LocalX
from replyguy.xapi import DuplicateContentError, XClient
from shared.alerts import LogAlertSink
from shared.breaker import CircuitBreaker
from shared.errors import ErrorKind, PermanentError, RateLimitedError, TransientError, UnknownOutcomeError, classify
from shared.timeouts import OperationTimeout
from tests.replyguy.conftest import FAST_RETRY
from tests.replyguy.helpers import active_alerts


async def test_search_returns_matching_tweets_oldest_first_with_authors(x_client: XClient) -> None:
    tweets = await x_client.search_recent("bot -is:retweet -is:reply")

    assert [t.author for t in tweets] == ["demo_dev", "demo_founder"]
    assert int(tweets[0].id) < int(tweets[1].id)


async def test_search_since_id_returns_only_newer_tweets(x_client: XClient, local_x: LocalX) -> None:
    first = await x_client.search_recent("bot")
    newer = local_x.add_tweet("carol_x", "a brand new bot question")

    again = await x_client.search_recent("bot", since_id=first[-1].id)

    assert [t.id for t in again] == [newer["id"]]


async def test_a_users_timeline_and_an_unknown_username(x_client: XClient) -> None:
    user = await x_client.user_by_username("@demo_news")
    assert user is not None and user.username == "demo_news"

    tweets = await x_client.user_tweets(user.id, username=user.username)

    assert [t.author for t in tweets] == ["demo_news"]
    assert await x_client.user_by_username("nobody_here") is None


async def test_a_reply_is_posted_with_a_verified_oauth1_signature(x_client: XClient, local_x: LocalX) -> None:
    target = (await x_client.search_recent("bot"))[0]

    reply_id = await x_client.post_reply("Thanks, useful!", target.id)

    [reply] = local_x.replies_to(target.id)
    assert reply["id"] == reply_id and reply["author_id"] == SANDBOX_X_CREDENTIALS.user_id
    assert await x_client.find_reply(target.id) == reply_id


async def test_a_post_signed_with_the_wrong_secret_is_refused_and_not_retried(local_x: LocalX) -> None:
    wrong = dataclasses.replace(SANDBOX_X_CREDENTIALS, consumer_secret="not-the-secret")
    client = XClient(base_url=local_x.base_url, credentials=wrong, timeout=1, breaker=CircuitBreaker("x"), retry=FAST_RETRY)
    try:
        with pytest.raises(PermanentError, match="credentials"):
            await client.post_reply("hello", "1860000000000000001")
    finally:
        await client.close()
    assert local_x.hits["post"] == 1 and local_x.replies_to("1860000000000000001") == []


async def test_a_429_honours_the_reset_header_alerts_and_stops_further_calls(
    x_client: XClient, local_x: LocalX, alert_sink: LogAlertSink
) -> None:
    local_x.faults.add("rate_limit", endpoint="search", reset_in=120, count=1)

    with pytest.raises(RateLimitedError) as caught:
        await x_client.search_recent("bot")

    assert 100 <= caught.value.retry_after <= 121
    assert "rate_limit_exceeded:twitter:search" in active_alerts(alert_sink)
    with pytest.raises(RateLimitedError):
        await x_client.search_recent("bot")  # refused locally until the reset
    assert local_x.hits["search"] == 1
    assert x_client.health()["status"] == "degraded"


async def test_a_short_rate_limit_is_waited_out_inside_the_call(local_x: LocalX) -> None:
    policy = RetryPolicy(max_retries=3, base_delay=0.01, max_delay=10.0)  # waits up to the 10 s cap are honoured
    client = XClient(base_url=local_x.base_url, credentials=SANDBOX_X_CREDENTIALS, timeout=1, breaker=CircuitBreaker("x"), retry=policy)
    local_x.faults.add("rate_limit", endpoint="user", reset_in=0, count=1)
    try:
        user = await client.user_by_username("demo_dev")
    finally:
        await client.close()

    assert user is not None and local_x.hits["user"] == 2


async def test_server_errors_are_retried_with_backoff(x_client: XClient, local_x: LocalX) -> None:
    local_x.faults.add("status", endpoint="search", status=503, count=2)

    tweets = await x_client.search_recent("bot")

    assert len(tweets) == 2 and local_x.hits["search"] == 3


async def test_server_errors_give_up_after_three_retries(x_client: XClient, local_x: LocalX) -> None:
    local_x.faults.add("status", endpoint="search", status=500)

    with pytest.raises(TransientError):
        await x_client.search_recent("bot")

    assert local_x.hits["search"] == 4


async def test_a_hung_read_times_out_and_is_retried(x_client: XClient, local_x: LocalX) -> None:
    local_x.faults.add("hang", endpoint="search", count=1)

    tweets = await x_client.search_recent("bot")

    assert len(tweets) == 2 and local_x.hits["search"] == 2


async def test_malformed_json_is_a_transient_error(x_client: XClient, local_x: LocalX) -> None:
    local_x.faults.add("malformed", endpoint="search")

    with pytest.raises(TransientError, match="malformed"):
        await x_client.search_recent("bot")

    assert local_x.hits["search"] == 4


async def test_a_post_answered_with_500_has_an_unknown_outcome_and_is_not_retried(x_client: XClient, local_x: LocalX) -> None:
    local_x.faults.add("status", endpoint="post", status=500)

    with pytest.raises(UnknownOutcomeError):
        await x_client.post_reply("maybe", "1860000000000000001")

    assert local_x.hits["post"] == 1


async def test_a_post_whose_answer_is_lost_times_out_as_unknown_and_is_found_again(x_client: XClient, local_x: LocalX) -> None:
    local_x.faults.add("answer_lost", endpoint="post", count=1)
    started = time.monotonic()

    with pytest.raises(OperationTimeout) as caught:
        await x_client.post_reply("did it go out?", "1860000000000000002")

    assert caught.value.outcome_unknown and classify(caught.value).kind is ErrorKind.UNKNOWN_OUTCOME
    assert time.monotonic() - started < 10
    [reply] = local_x.replies_to("1860000000000000002")
    assert await x_client.find_reply("1860000000000000002") == reply["id"]
    assert local_x.hits["post"] == 1


async def test_posting_the_same_text_twice_is_refused_as_a_duplicate(x_client: XClient) -> None:
    await x_client.post_reply("same words", "1860000000000000001")

    with pytest.raises(DuplicateContentError):
        await x_client.post_reply("same words", "1860000000000000001")


async def test_our_own_id_comes_from_users_me_when_not_configured(local_x: LocalX) -> None:
    creds = dataclasses.replace(SANDBOX_X_CREDENTIALS, user_id=None)
    client = XClient(base_url=local_x.base_url, credentials=creds, timeout=1, breaker=CircuitBreaker("x"), retry=FAST_RETRY)
    try:
        assert await client.me() == "1000"
        assert await client.me() == "1000"
    finally:
        await client.close()
    assert local_x.hits["me"] == 1
