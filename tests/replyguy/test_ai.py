"""Drafting against the stand-in AI server: prompts, X's length rule, and every fault mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from replyguy.ai import AIClient, Drafter, load_prompt
from replyguy.length import ELLIPSIS, MAX_WEIGHTED_LENGTH, weighted_length
from devkit.local_ai import LocalAI
from shared.alerts import LogAlertSink
from shared.errors import TransientError
from shared.breaker import CircuitBreaker, CircuitOpenError, CircuitState
from shared.errors import PermanentError, RateLimitedError
from tests.replyguy.helpers import active_alerts

TWEET = "My Telegram bot keeps hanging on network calls. How do you make an async bot reliable?"


@pytest.fixture
def drafter(ai_client: AIClient) -> Drafter:
    return Drafter(ai_client, system_prompt=load_prompt(None))


async def test_a_draft_uses_the_system_prompt_and_the_tweet(drafter: Drafter, local_ai: LocalAI) -> None:
    draft = await drafter.draft(text=TWEET, author="demo_dev")

    assert draft.text and draft.weighted_length <= MAX_WEIGHTED_LENGTH and not draft.trimmed
    [messages] = local_ai.requests
    assert messages[0]["role"] == "system" and "280 characters" in messages[0]["content"]
    assert TWEET in messages[1]["content"] and "@demo_dev" in messages[1]["content"]


async def test_an_overlong_reply_is_regenerated_shorter(drafter: Drafter, local_ai: LocalAI) -> None:
    local_ai.faults.add("overlong", count=1)

    draft = await drafter.draft(text=TWEET, author="demo_dev")

    assert draft.regenerations == 1 and not draft.trimmed and weighted_length(draft.text) <= MAX_WEIGHTED_LENGTH
    assert "the limit is 280" in local_ai.requests[1][-1]["content"]


async def test_a_reply_that_stays_overlong_is_cut_at_a_word_boundary(drafter: Drafter, local_ai: LocalAI) -> None:
    local_ai.faults.add("overlong")

    draft = await drafter.draft(text=TWEET, author="demo_dev")

    assert draft.trimmed and draft.regenerations == 2 and len(local_ai.requests) == 3
    assert weighted_length(draft.text) <= MAX_WEIGHTED_LENGTH and draft.text.endswith(ELLIPSIS)
    assert not draft.text[:-1].endswith(" ")


async def test_asking_again_shows_the_model_the_rejected_draft(drafter: Drafter, local_ai: LocalAI) -> None:
    await drafter.draft(text=TWEET, author="demo_dev", previous="the old draft")

    assert "the old draft" in local_ai.requests[0][1]["content"]


async def test_a_429_honours_retry_after_and_alerts(drafter: Drafter, local_ai: LocalAI, alert_sink: LogAlertSink) -> None:
    local_ai.faults.add("rate_limit", reset_in=45, count=1)

    with pytest.raises(RateLimitedError) as caught:
        await drafter.draft(text=TWEET, author="demo_dev")

    assert caught.value.retry_after == pytest.approx(45, abs=1)
    assert "rate_limit_exceeded:ai:chat" in active_alerts(alert_sink)


async def test_server_errors_and_a_hang_are_retried(drafter: Drafter, local_ai: LocalAI) -> None:
    local_ai.faults.add("status", status=500, count=1)
    local_ai.faults.add("hang", count=1)

    draft = await drafter.draft(text=TWEET, author="demo_dev")

    assert draft.text and local_ai.hits["chat"] == 3


async def test_malformed_json_is_retried_until_the_ai_breaker_opens(
    drafter: Drafter, local_ai: LocalAI, breakers: dict[str, CircuitBreaker]
) -> None:
    local_ai.faults.add("malformed")

    with pytest.raises(TransientError, match="not JSON") as raised:
        await drafter.draft(text=TWEET, author="demo_dev")

    # ai_service opens after 3 failures: the fourth attempt never reaches the server, and the
    # caller gets the failure that opened it (to count against its item), not "breaker open".
    assert isinstance(raised.value.__context__, CircuitOpenError)
    assert local_ai.hits["chat"] == 3 and breakers["ai_service"].state is CircuitState.OPEN
    assert "not JSON" in (breakers["ai_service"].get_status()["last_error"] or "")


async def test_a_wrong_key_is_permanent_and_not_retried(local_ai: LocalAI, breakers: dict) -> None:
    client = AIClient(base_url=f"{local_ai.base_url}/v1", api_key="wrong", model="m", timeout=1, breaker=breakers["ai_service"])
    try:
        with pytest.raises(PermanentError, match="401"):
            await client.complete([{"role": "user", "content": "hi"}])
    finally:
        await client.close()
    assert local_ai.hits["chat"] == 1


def test_the_prompt_comes_from_reply_prompt_file(tmp_path: Path) -> None:
    custom = tmp_path / "prompt.txt"
    custom.write_text("Be brief.\n", encoding="utf-8")

    assert load_prompt(custom) == "Be brief."
    with pytest.raises(PermanentError, match="cannot be read"):
        load_prompt(tmp_path / "missing.txt")
