"""The approval step in the Telegram sandbox: operators' presses and answers, and strangers'."""

from __future__ import annotations

from replyguy.approval import NOT_ALLOWED, Decision, callback_data, parse_callback
from shared.db import Tweet, TweetStatus
from tests.replyguy.conftest import Rig, RigFactory
from tests.replyguy.helpers import eventually

DRAFT = "Timeouts on every call and a watchdog: that is most of it."


async def drafted_tweet(rig: Rig, target: str = "1860000000000000001") -> Tweet:
    """A tweet already drafted, sent to the operators by one approve cycle."""
    inserted = await rig.db.insert_tweet(target, author="demo_dev", text="How do you make a bot reliable?")
    await rig.db.tweet_transition(inserted.tweet.id, [TweetStatus.DISCOVERED], TweetStatus.DRAFTED, draft=DRAFT)
    await rig.guy.approve.cycle()
    tweet = await rig.db.get_tweet(inserted.tweet.id)
    assert tweet is not None
    return tweet


async def status_of(rig: Rig, tweet: Tweet) -> TweetStatus:
    current = await rig.db.get_tweet(tweet.id)
    assert current is not None
    return current.status


async def answered(rig: Rig, query_id: int) -> str:
    answer = await eventually(lambda: (a := rig.world.callback_answer(query_id)) is not None and a.answered and a,
                              what="the bot's answer to the press")
    return str(answer.message)


def test_button_data_round_trips_and_foreign_buttons_are_ignored() -> None:
    data = callback_data(Decision.APPROVE, "0b7c6f4e-2d7a-4a39-9d52-5f1a8c2b9e10")

    assert len(data) <= 64
    assert parse_callback(data) == (Decision.APPROVE, "0b7c6f4e-2d7a-4a39-9d52-5f1a8c2b9e10")
    assert parse_callback(b"other:a:1") is None and parse_callback(b"rg:x:1") is None and parse_callback(None) is None


async def test_a_draft_reaches_the_operator_chat_with_three_buttons(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await drafted_tweet(rig)

    assert tweet.status is TweetStatus.PENDING_APPROVAL and tweet.approval_message_id
    [message] = rig.drafts_in_chat()
    assert [label for label, _ in message.buttons] == ["Approve", "Reject", "Regenerate"]
    assert DRAFT in message.text and "@demo_dev" in message.text


async def test_an_operators_approve_press_approves_and_closes_the_buttons(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await drafted_tweet(rig)

    query = rig.world.press("operator", chat=rig.operator_chat, text="Approve")

    assert await answered(rig, query) == "Approved."
    assert await status_of(rig, tweet) is TweetStatus.APPROVED
    edited = await eventually(lambda: [m for m in rig.world.history("operator", rig.operator_chat) if "Approved by" in m.text])
    assert "@operator" in edited[0].text and not edited[0].buttons
    assert rig.guy.wake.post.is_set()


async def test_a_strangers_press_is_not_allowed_and_changes_nothing(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await drafted_tweet(rig)

    query = rig.world.press("demo_one", chat=rig.operator_chat, text="Approve")

    answer = await eventually(lambda: (a := rig.world.callback_answer(query)) and a.answered and a)
    assert answer.message == NOT_ALLOWED and answer.alert and "not allowed" in answer.message
    assert await status_of(rig, tweet) is TweetStatus.PENDING_APPROVAL
    assert rig.drafts_in_chat()[0].buttons and rig.desk.refused == 1


async def test_an_operators_answer_replaces_the_draft(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await drafted_tweet(rig)
    [message] = rig.drafts_in_chat()

    rig.world.send_incoming("operator", rig.operator_chat, "My own, better reply.", reply_to=message.id)

    replaced = await eventually(lambda: _draft_is(rig, tweet, "My own, better reply."), what="the draft replaced")
    assert replaced.status is TweetStatus.PENDING_APPROVAL
    await eventually(lambda: any("Draft replaced" in m.text for m in rig.world.received("operator")))
    shown = await eventually(lambda: [m for m in rig.drafts_in_chat() if "My own, better reply." in m.text])
    assert [label for label, _ in shown[0].buttons] == ["Approve", "Reject", "Regenerate"]


async def test_a_strangers_answer_is_not_allowed_and_the_draft_stays(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await drafted_tweet(rig)
    mine = [m for m in rig.world.history("demo_one", rig.operator_chat) if m.buttons][0]

    rig.world.send_incoming("demo_one", rig.operator_chat, "Post this instead!", reply_to=mine.id)

    await eventually(lambda: any(NOT_ALLOWED in m.text for m in rig.world.received("demo_one")), what="the refusal")
    current = await rig.db.get_tweet(tweet.id)
    assert current is not None and current.draft == DRAFT


async def test_an_overlong_answer_is_refused_with_the_limit(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await drafted_tweet(rig)
    [message] = rig.drafts_in_chat()

    rig.world.send_incoming("operator", rig.operator_chat, "word " * 80, reply_to=message.id)

    await eventually(lambda: any("the limit is 280" in m.text for m in rig.world.received("operator")))
    current = await rig.db.get_tweet(tweet.id)
    assert current is not None and current.draft == DRAFT


async def test_an_operators_reject_press_rejects(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await drafted_tweet(rig)
    [message] = rig.drafts_in_chat()

    query = rig.world.press("operator", chat=rig.operator_chat, message_id=message.id, text="Reject")

    assert await answered(rig, query) == "Rejected."
    assert await status_of(rig, tweet) is TweetStatus.REJECTED


async def test_a_press_on_a_draft_already_decided_changes_nothing(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await drafted_tweet(rig)
    [message] = rig.drafts_in_chat()
    await rig.db.tweet_transition(tweet.id, [TweetStatus.PENDING_APPROVAL], TweetStatus.REJECTED)

    query = rig.world.press("operator", chat=rig.operator_chat, message_id=message.id, text="Approve")

    assert "already rejected" in await answered(rig, query)
    assert await status_of(rig, tweet) is TweetStatus.REJECTED


async def test_regenerate_drafts_again_and_asks_again(rig_factory: RigFactory) -> None:
    rig = await rig_factory()
    tweet = await drafted_tweet(rig)

    query = rig.world.press("operator", chat=rig.operator_chat, text="Regenerate")
    assert await answered(rig, query) == "Regenerating."
    assert await status_of(rig, tweet) is TweetStatus.DISCOVERED

    await rig.guy.draft.cycle()
    await rig.guy.approve.cycle()

    assert await status_of(rig, tweet) is TweetStatus.PENDING_APPROVAL
    assert DRAFT in rig.local_ai.requests[-1][1]["content"]  # the model saw the rejected draft
    assert len(rig.drafts_in_chat()) == 1  # the old message lost its buttons; the new one has them


async def _draft_is(rig: Rig, tweet: Tweet, text: str) -> Tweet | None:
    current = await rig.db.get_tweet(tweet.id)
    return current if current is not None and current.draft == text else None
