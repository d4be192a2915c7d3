"""Tests for shared/alerts.py against a real aiohttp server on 127.0.0.1 playing the Bot API."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from shared.alerts import AlertSink, AlertType, LogAlertSink, TelegramAlertSender, build_alert_sink
from tests.fixtures.bot_api import BotApiStandIn
from tests.helpers import FakeClock, wait_until

TOKEN = "424242:AAFakeTokenForTestsOnly_abcdefghijklmnopq"
CHAT_ID = "-100777"
WALL = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


@pytest.fixture
def bot_api(bot_api: BotApiStandIn) -> BotApiStandIn:
    """The suite's Bot API stand-in, answering this module's token only."""
    bot_api.token = TOKEN
    return bot_api


SenderFactory = Callable[..., TelegramAlertSender]


@pytest.fixture
async def make_sender(bot_api: BotApiStandIn) -> AsyncIterator[SenderFactory]:
    made: list[TelegramAlertSender] = []

    def factory(**kwargs: Any) -> TelegramAlertSender:
        options: dict[str, Any] = {
            "bot_token": TOKEN,
            "chat_id": CHAT_ID,
            "bot_name": "worker",
            "api_base": bot_api.url,
            "send_timeout": 2.0,
            "retry_base_delay": 0.01,
            "wall_clock": lambda: WALL,
        }
        options.update(kwargs)
        sender = TelegramAlertSender(**options)
        made.append(sender)
        return sender

    yield factory
    for sender in made:
        await sender.close(timeout=1)


async def test_alert_is_sent_as_plain_text_with_icon_type_bot_time_message_and_details(
    bot_api: BotApiStandIn, make_sender: SenderFactory
) -> None:
    sender = make_sender()
    await sender.start()
    assert isinstance(sender, AlertSink)
    queued = sender.alert(
        AlertType.CIRCUIT_BREAKER_OPEN,
        "AI service circuit breaker opened",
        details={"service": "ai", "failures": 5, "dsn": "postgres://bot:pa55word1@db/x"},
    )
    assert queued is True
    await bot_api.wait_requests(1)

    body = bot_api.requests[0].body
    assert body["chat_id"] == CHAT_ID
    assert "parse_mode" not in body
    text = body["text"]
    assert text.splitlines()[0] == "\U0001f6a8 ALERT: circuit_breaker_open"
    assert "Bot: worker" in text
    assert "Time: 2023-11-14 22:13:20 UTC" in text
    assert "Message: AI service circuit breaker opened" in text
    assert "\u2022 service: ai" in text and "\u2022 failures: 5" in text
    assert "pa55word1" not in text
    await wait_until(lambda: sender.get_status()["sent"] == 1)


async def test_same_key_within_window_is_deduplicated_and_sent_again_after_the_window(
    bot_api: BotApiStandIn, make_sender: SenderFactory
) -> None:
    clock = FakeClock()
    sender = make_sender(clock=clock, dedupe_window=600)
    await sender.start()

    assert sender.alert(AlertType.PROCESSING_FAILED, "first", key="chan-1") is True
    assert sender.alert(AlertType.PROCESSING_FAILED, "again", key="chan-1") is False
    assert sender.alert(AlertType.PROCESSING_FAILED, "other key", key="chan-2") is True
    assert sender.alert(AlertType.LOOP_RESTARTED, "other type", key="chan-1") is True
    clock.now += 599
    assert sender.alert(AlertType.PROCESSING_FAILED, "still inside", key="chan-1") is False
    clock.now += 2
    assert sender.alert(AlertType.PROCESSING_FAILED, "after window", key="chan-1") is True

    await bot_api.wait_requests(4)
    assert len(bot_api.requests) == 4
    assert "Message: after window" in bot_api.texts[3]
    assert "suppressed_repeats: 2" in bot_api.texts[3]
    assert sender.get_status()["deduplicated"] == 2


async def test_key_defaults_to_the_type_for_deduplication(make_sender: SenderFactory) -> None:
    sender = make_sender(clock=FakeClock())
    assert sender.alert(AlertType.RESTART_STORM, "one") is True
    assert sender.alert(AlertType.RESTART_STORM, "two") is False
    assert sender.alert(AlertType.RESTART_STORM, "three", key="loop-a") is True


async def test_hanging_bot_api_is_cut_by_send_timeout_and_callers_never_wait(
    bot_api: BotApiStandIn, make_sender: SenderFactory
) -> None:
    bot_api.modes = ["hang", "hang", "ok"]
    sender = make_sender(send_timeout=0.2, max_attempts=2, clock=FakeClock())
    await sender.start()

    assert sender.alert(AlertType.MULTIPLE_FAILURES, "stuck one", key="a") is True
    await bot_api.wait_requests(1)
    # The Bot API is hanging on the first alert right now; raising another returns at once.
    assert sender.alert(AlertType.MULTIPLE_FAILURES, "second", key="b") is True

    await wait_until(lambda: sender.get_status()["failed"] == 1 and sender.get_status()["sent"] == 1)
    status = sender.get_status()
    assert "timed out" in (status["last_error"] or "")
    assert status["retried"] == 1
    assert len(bot_api.requests) == 3
    assert "Message: second" in bot_api.texts[2]


async def test_bot_api_500_is_retried_with_backoff_until_delivered(
    bot_api: BotApiStandIn, make_sender: SenderFactory
) -> None:
    bot_api.modes = ["500", "500", "ok"]
    sender = make_sender(max_attempts=3)
    await sender.start()
    sender.alert(AlertType.INITIALIZATION_FAILED, "db down")

    await wait_until(lambda: sender.get_status()["sent"] == 1)
    status = sender.get_status()
    assert status["retried"] == 2 and status["failed"] == 0
    assert len(bot_api.requests) == 3
    assert len(set(bot_api.texts)) == 1


async def test_bot_api_500_on_every_try_counts_a_failure_and_the_sender_keeps_working(
    bot_api: BotApiStandIn, make_sender: SenderFactory
) -> None:
    bot_api.modes = ["500", "500", "ok"]
    sender = make_sender(max_attempts=2, clock=FakeClock())
    await sender.start()
    sender.alert(AlertType.PROCESSING_FAILED, "lost", key="x")
    await wait_until(lambda: sender.get_status()["failed"] == 1)
    assert "500" in sender.get_status()["last_error"]

    sender.alert(AlertType.PROCESSING_FAILED, "next", key="y")
    await wait_until(lambda: sender.get_status()["sent"] == 1)
    assert "Message: next" in bot_api.texts[-1]


async def test_bot_api_429_is_retried_only_after_its_retry_after(
    bot_api: BotApiStandIn, make_sender: SenderFactory
) -> None:
    bot_api.modes = ["429:1", "ok"]
    sender = make_sender()
    await sender.start()
    sender.alert(AlertType.RATE_LIMIT_EXCEEDED, "slow down")

    await wait_until(lambda: sender.get_status()["sent"] == 1)
    first, second = bot_api.requests
    assert second.at - first.at >= 0.95
    assert "429" in sender.get_status()["last_error"]


async def test_malformed_answer_is_retried_and_never_raises(bot_api: BotApiStandIn, make_sender: SenderFactory) -> None:
    bot_api.modes = ["malformed", "ok"]
    sender = make_sender()
    await sender.start()
    sender.alert(AlertType.MESSAGE_DEAD, "gave up on message 42")

    await wait_until(lambda: sender.get_status()["sent"] == 1)
    assert sender.get_status()["retried"] == 1
    assert "unexpected body" in sender.get_status()["last_error"]


async def test_client_error_400_is_not_retried(bot_api: BotApiStandIn, make_sender: SenderFactory) -> None:
    bot_api.modes = ["400"]
    sender = make_sender(max_attempts=5)
    await sender.start()
    sender.alert(AlertType.PROCESSING_FAILED, "x")

    await wait_until(lambda: sender.get_status()["failed"] == 1)
    assert len(bot_api.requests) == 1
    assert "chat not found" in sender.get_status()["last_error"]


async def test_full_queue_drops_the_oldest_alert_and_counts_it(bot_api: BotApiStandIn, make_sender: SenderFactory) -> None:
    sender = make_sender(queue_size=2)

    def raise_three() -> list[bool]:  # from a thread: no running loop, so nothing starts sending yet
        return [sender.alert(AlertType.PROCESSING_FAILED, f"item {n}", key=f"k{n}") for n in range(3)]

    assert await asyncio.to_thread(raise_three) == [True, True, True]
    status = sender.get_status()
    assert status["dropped"] == 1 and status["queue_size"] == 2

    await sender.start()
    await bot_api.wait_requests(2)
    await wait_until(lambda: sender.get_status()["sent"] == 2)
    assert ["Message: item 1" in bot_api.texts[0], "Message: item 2" in bot_api.texts[1]] == [True, True]


async def test_resolve_sends_a_resolved_message_only_for_an_alert_that_fired(
    bot_api: BotApiStandIn, make_sender: SenderFactory
) -> None:
    sender = make_sender(clock=FakeClock())
    await sender.start()

    assert sender.resolve(AlertType.CIRCUIT_BREAKER_OPEN, key="db") is False
    assert sender.alert(AlertType.CIRCUIT_BREAKER_OPEN, "db breaker open", key="db") is True
    assert sender.get_status()["active"] == ["circuit_breaker_open:db"]
    assert sender.resolve(AlertType.CIRCUIT_BREAKER_OPEN, key="db", message="db breaker closed") is True
    assert sender.resolve(AlertType.CIRCUIT_BREAKER_OPEN, key="db") is False
    # Once resolved, the condition coming back is news again, even inside the window.
    assert sender.alert(AlertType.CIRCUIT_BREAKER_OPEN, "db breaker open again", key="db") is True

    await bot_api.wait_requests(3)
    resolved = bot_api.texts[1]
    assert resolved.startswith("\u2705 RESOLVED: resolved")
    assert "Message: db breaker closed" in resolved
    assert "alert: circuit_breaker_open" in resolved and "key: db" in resolved
    assert "db breaker open again" in bot_api.texts[2]


async def test_alert_raised_from_another_thread_is_delivered(bot_api: BotApiStandIn, make_sender: SenderFactory) -> None:
    sender = make_sender()
    await sender.start()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(sender.alert(AlertType.SUPERVISOR_RESTART, "from a thread")))
    thread.start()
    await asyncio.to_thread(thread.join, 5)
    assert result == [True]
    await bot_api.wait_requests(1)
    assert "from a thread" in bot_api.texts[0]


async def test_alert_inside_the_loop_starts_the_sender_when_start_was_forgotten(
    bot_api: BotApiStandIn, make_sender: SenderFactory
) -> None:
    sender = make_sender()
    sender.alert(AlertType.LOOP_RESTARTED, "no start() call")
    await bot_api.wait_requests(1)


async def test_more_than_max_per_minute_waits_in_the_queue(bot_api: BotApiStandIn, make_sender: SenderFactory) -> None:
    sender = make_sender(max_per_minute=2)
    await sender.start()
    for n in range(3):
        sender.alert(AlertType.PROCESSING_FAILED, f"n{n}", key=str(n))

    await wait_until(lambda: sender.get_status()["waiting_for"] == "rate_limit")
    assert len(bot_api.requests) == 2
    assert sender.get_status()["queue_size"] == 1
    await sender.close(timeout=0.05)
    assert sender.get_status()["dropped"] == 1


async def test_close_flushes_queued_alerts(bot_api: BotApiStandIn, make_sender: SenderFactory) -> None:
    sender = make_sender()
    await sender.start()
    for n in range(3):
        sender.alert(AlertType.PROCESSING_FAILED, f"n{n}", key=str(n))
    await sender.close(timeout=5)
    assert len(bot_api.requests) == 3
    assert sender.get_status()["sent"] == 3
    assert sender.alert(AlertType.PROCESSING_FAILED, "after close", key="late") is False


async def test_bad_input_never_raises_and_unprintable_details_still_send(
    bot_api: BotApiStandIn, make_sender: SenderFactory
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    sender = make_sender()
    await sender.start()
    assert sender.alert("not-a-type", "x") is False  # type: ignore[arg-type]
    assert sender.alert(AlertType.PROCESSING_FAILED, "odd details", details={"obj": Unprintable()}) is True
    await bot_api.wait_requests(1)
    assert "obj: <unprintable Unprintable>" in bot_api.texts[0]


async def test_token_never_appears_in_status_or_logs_even_when_sending_fails(
    bot_api: BotApiStandIn, make_sender: SenderFactory, caplog: pytest.LogCaptureFixture, unused_port: int
) -> None:
    caplog.set_level(logging.DEBUG)
    bot_api.modes = ["500", "hang", "400"]
    sender = make_sender(send_timeout=0.2, max_attempts=3, clock=FakeClock())
    dead = make_sender(api_base=f"http://127.0.0.1:{unused_port}", max_attempts=1, clock=FakeClock())
    await sender.start()
    await dead.start()
    sender.alert(AlertType.ACCOUNT_NEEDS_LOGIN, f"token is {TOKEN}", details={"token": TOKEN})
    dead.alert(AlertType.ACCOUNT_NEEDS_LOGIN, "unreachable api")

    await wait_until(lambda: sender.get_status()["failed"] == 1 and dead.get_status()["failed"] == 1)
    secret_part = TOKEN.split(":")[1]
    for status in (sender.get_status(), dead.get_status()):
        assert secret_part not in json.dumps(status)
        assert CHAT_ID not in json.dumps(status)
    assert dead.get_status()["last_error"].startswith("sendMessage failed")
    assert secret_part not in caplog.text
    assert all(secret_part not in text for text in bot_api.texts)


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_without_a_token_alerts_are_only_logged_with_dedupe(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shared.alerts")
    settings = SimpleNamespace(alert_bot_token=None, alert_chat_id=None, alert_api_base=None, alert_dedupe_window=600)
    sink = build_alert_sink(settings, "ingest")
    assert isinstance(sink, LogAlertSink) and isinstance(sink, AlertSink)
    await sink.start()

    assert sink.alert(AlertType.LOOP_RESTARTED, "loop poller restarted", key="poller", details={"restarts": 2}) is True
    assert sink.alert(AlertType.LOOP_RESTARTED, "again", key="poller") is False
    assert sink.resolve(AlertType.LOOP_RESTARTED, key="poller") is True
    assert sink.resolve(AlertType.LOOP_RESTARTED, key="poller") is False
    await sink.close()

    assert "loop poller restarted" in caplog.text and "Bot: ingest" in caplog.text and "RESOLVED" in caplog.text
    assert sink.get_status()["deduplicated"] == 1


def test_build_alert_sink_with_token_and_chat_returns_a_telegram_sender() -> None:
    settings = SimpleNamespace(alert_bot_token=TOKEN, alert_chat_id=-100, alert_api_base="http://127.0.0.1:9", alert_dedupe_window=30)
    sink = build_alert_sink(settings, "worker")
    assert isinstance(sink, TelegramAlertSender) and sink.enabled
    assert TOKEN.split(":")[1] not in json.dumps(sink.get_status())

    half = SimpleNamespace(alert_bot_token=TOKEN, alert_chat_id=None, alert_api_base=None, alert_dedupe_window=600)
    assert isinstance(build_alert_sink(half, "worker"), LogAlertSink)
