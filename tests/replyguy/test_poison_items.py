"""One tweet that always fails never stalls the Reply Guy's draft, approve and post steps.

A poison tweet comes first, normal ones after it. The poison one has every
failure counted (also the one that opened a breaker), waits in the
dead-letter queue between its tries, and ends as a dead letter with its
reason and one ``tweet_processing_failed`` alert; the normal ones complete
and the breaker closes. The AI and X answers are the stand-ins' real HTTP
answers; breaker time is a clock the test moves.
"""

from __future__ import annotations

import pytest

from bot import configure_breakers
from shared.breaker import BreakerRegistry, CircuitBreaker, CircuitState
from shared.db import RetryItemStatus, Tweet, TweetStatus
from tests.replyguy.conftest import Rig, RigFactory
from tests.helpers import FakeClock
from tests.replyguy.helpers import active_alerts


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breakers(clock: FakeClock) -> dict[str, CircuitBreaker]:
    """The configured breakers on the test's clock (overrides the conftest's)."""
    return configure_breakers(BreakerRegistry(), clock=clock)


POISON = "POISONTWEET"


async def discovered(rig: Rig, target: str, text: str) -> Tweet:
    return (await rig.db.insert_tweet(target, author="someone", text=text)).tweet


async def status_of(rig: Rig, tweet: Tweet) -> Tweet:
    fresh = await rig.db.get_tweet(tweet.id)
    assert fresh is not None
    return fresh


def poison_alerts(rig: Rig) -> list[str]:
    return [a for a in active_alerts(rig.sink) if a.startswith("tweet_processing_failed:")]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("content_filter", "without any text (finish_reason content_filter)"),
        ("no_choices", "without any choices"),
        ("malformed", "not JSON"),
    ],
)
async def test_a_tweet_the_ai_never_answers_is_dead_lettered_and_the_others_are_drafted(
    rig_factory: RigFactory, clock: FakeClock, fault: str, reason: str
) -> None:
    rig = await rig_factory(env={"MAX_MESSAGE_RETRIES": "2"})
    ai = rig.breakers["ai_service"]
    poison = await discovered(rig, "1870000000000000001", f"{POISON} what do you think?")
    normal = [await discovered(rig, f"187000000000000001{i}", f"A normal question about reliability {i}") for i in range(2)]
    rig.local_ai.faults.add(fault, endpoint="chat", match=POISON)

    # Its failures open the breaker; the opening failure is counted against it, with its reason.
    await rig.guy.draft.cycle()
    failed = await status_of(rig, poison)
    assert failed.status is TweetStatus.FAILED and reason in (failed.last_error or "")
    assert ai.state is CircuitState.OPEN
    assert [(await status_of(rig, t)).status for t in normal] == [TweetStatus.DISCOVERED] * 2

    # The half-open trials go to the tweets after it, which are drafted and close the breaker.
    clock.advance(61)
    await rig.guy.draft.cycle()
    assert [(await status_of(rig, t)).status for t in normal] == [TweetStatus.DRAFTED] * 2
    assert ai.state is CircuitState.CLOSED

    # Its retries from the dead-letter queue fail too: after MAX_MESSAGE_RETRIES it is dead, alerted once.
    await rig.guy.dlq.cycle()
    clock.advance(61)
    await rig.guy.dlq.cycle()
    [dead] = await rig.db.exhausted_retry_items("bot")
    assert dead.status is RetryItemStatus.EXHAUSTED and dead.kind == "draft" and reason in (dead.last_error or "")
    assert (await status_of(rig, poison)).status is TweetStatus.FAILED
    assert poison_alerts(rig) == [f"tweet_processing_failed:dead:{dead.id}"]

    # Later tweets are drafted as soon as the AI answers them, and the breaker closes again.
    clock.advance(61)
    later = [await discovered(rig, f"187000000000000002{i}", f"Another normal question {i}") for i in range(2)]
    await rig.guy.draft.cycle()
    assert [(await status_of(rig, t)).status for t in later] == [TweetStatus.DRAFTED] * 2
    assert ai.state is CircuitState.CLOSED


async def test_a_retry_refused_by_an_open_breaker_spends_no_attempt(rig_factory: RigFactory, clock: FakeClock) -> None:
    rig = await rig_factory(env={"MAX_MESSAGE_RETRIES": "2"})
    poison = await discovered(rig, "1870000000000000031", f"{POISON} once more")
    rig.local_ai.faults.add("content_filter", endpoint="chat", match=POISON)
    await rig.guy.draft.cycle()
    assert rig.breakers["ai_service"].state is CircuitState.OPEN
    hits = rig.local_ai.hits["chat"]

    await rig.guy.dlq.cycle()  # the breaker is still open: nothing is tried

    assert rig.local_ai.hits["chat"] == hits
    assert await rig.db.count_retry_items("bot", [RetryItemStatus.PENDING]) == 1
    assert await rig.db.exhausted_retry_items("bot") == []
    assert (await status_of(rig, poison)).status is TweetStatus.FAILED


async def test_a_draft_telegram_refuses_is_dead_lettered_and_the_next_drafts_reach_the_operators(
    rig_factory: RigFactory,
) -> None:
    rig = await rig_factory()
    poison = await discovered(rig, "1870000000000000041", "A tweet whose draft is far too long")
    await rig.db.tweet_transition(poison.id, [TweetStatus.DISCOVERED], TweetStatus.DRAFTED, draft="word " * 1000)
    normal = []
    for i in range(2):
        tweet = await discovered(rig, f"187000000000000005{i}", f"A normal tweet {i}")
        await rig.db.tweet_transition(tweet.id, [TweetStatus.DISCOVERED], TweetStatus.DRAFTED, draft=f"A fine reply {i}")
        normal.append(tweet)

    await rig.guy.approve.cycle()

    failed = await status_of(rig, poison)
    assert failed.status is TweetStatus.FAILED and "text too long" in (failed.last_error or "")
    [dead] = await rig.db.exhausted_retry_items("bot")
    assert dead.kind == "approve" and "text too long" in (dead.last_error or "")
    assert poison_alerts(rig) == [f"tweet_processing_failed:tweet:{poison.id}"]
    assert [(await status_of(rig, t)).status for t in normal] == [TweetStatus.PENDING_APPROVAL] * 2
    assert len(rig.drafts_in_chat()) == 2


async def test_a_reply_x_always_refuses_is_dead_lettered_and_the_next_replies_go_out(
    rig_factory: RigFactory, clock: FakeClock
) -> None:
    rig = await rig_factory(env={"MAX_MESSAGE_RETRIES": "2"})
    tweets = []
    for i, draft in enumerate([f"{POISON} reply", "A fine reply one", "A fine reply two"]):
        target = rig.local_x.add_tweet("someone", f"Question {i}")["id"]
        tweet = await discovered(rig, target, f"Question {i}")
        await rig.db.tweet_transition(tweet.id, [TweetStatus.DISCOVERED], TweetStatus.PENDING_APPROVAL, draft=draft)
        await rig.db.tweet_transition(tweet.id, [TweetStatus.PENDING_APPROVAL], TweetStatus.APPROVED)
        tweets.append(tweet)
    poison, *normal = tweets
    rig.local_x.faults.add("status", endpoint="post", status=503, match=POISON)

    await rig.guy.post.cycle()

    assert (await status_of(rig, poison)).status is TweetStatus.FAILED
    assert [(await status_of(rig, t)).status for t in normal] == [TweetStatus.POSTED] * 2
    for _ in range(3):
        await rig.guy.dlq.cycle()
    [dead] = await rig.db.exhausted_retry_items("bot")
    assert dead.kind == "post" and "503" in (dead.last_error or "")
    assert poison_alerts(rig) == [f"tweet_processing_failed:dead:{dead.id}"]
    assert rig.local_x.replies_to(poison.target_tweet_id) == []
    assert rig.breakers["twitter_api"].state is CircuitState.CLOSED


async def test_an_ai_reply_with_a_nul_character_is_drafted_without_it(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await discovered(rig, "1870000000000000071", "A question about reliability")
    rig.local_ai.faults.add("nul_in_text", endpoint="chat", count=1)

    await rig.guy.draft.cycle()

    drafted = await status_of(rig, tweet)
    assert drafted.status is TweetStatus.DRAFTED and drafted.draft and "\x00" not in drafted.draft
    assert drafted.draft.startswith("Interesting point about")  # the stand-in sent "Interesting \x00point about"
