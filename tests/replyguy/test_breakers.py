"""The three breakers open and close as the seed configures them, on real calls.

twitter_api: 5 failures, 120 s open, 3 trial calls; ai_service: 3, 60 s, 2;
database: 3, 30 s, 2. Time is a clock the test moves; the calls are real
requests to the stand-ins and real database calls.
"""

from __future__ import annotations

import pytest

from bot import configure_breakers
from replyguy.ai import AIClient
from replyguy.http import RetryPolicy
from devkit.local_ai import SANDBOX_AI_KEY, LocalAI
from devkit.local_x import SANDBOX_X_CREDENTIALS, LocalX
from replyguy.xapi import XClient
from shared.breaker import BreakerRegistry, CircuitOpenError, CircuitState
from shared.db import DatabaseUnavailable, PostgresDatabase
from shared.errors import TransientError
from tests.helpers import FakeClock, wait_until

ONE_ATTEMPT = RetryPolicy(max_retries=0, base_delay=0.0, max_delay=0.0)
"""One request per call, so the test counts failures exactly."""


async def test_twitter_api_opens_after_5_failures_and_closes_after_120_s_and_3_good_trials(local_x: LocalX) -> None:
    clock = FakeClock()
    breaker = configure_breakers(BreakerRegistry(), clock=clock)["twitter_api"]
    client = XClient(base_url=local_x.base_url, credentials=SANDBOX_X_CREDENTIALS, timeout=1, breaker=breaker, retry=ONE_ATTEMPT)
    local_x.faults.add("status", endpoint="search", status=502)
    try:
        for _ in range(4):
            with pytest.raises(TransientError):
                await client.search_recent("bot")
        assert breaker.state is CircuitState.CLOSED
        with pytest.raises(TransientError):
            await client.search_recent("bot")
        assert breaker.state is CircuitState.OPEN

        with pytest.raises(CircuitOpenError):
            await client.search_recent("bot")
        assert local_x.hits["search"] == 5  # refused without a request

        clock.advance(119)
        assert breaker.state is CircuitState.OPEN
        clock.advance(1)
        assert breaker.state is CircuitState.HALF_OPEN
        local_x.faults.clear()
        await client.search_recent("bot")
        await client.search_recent("bot")
        assert breaker.state is CircuitState.HALF_OPEN
        await client.search_recent("bot")
        assert breaker.state is CircuitState.CLOSED
    finally:
        await client.close()


async def test_a_failed_trial_opens_the_twitter_breaker_again(local_x: LocalX) -> None:
    clock = FakeClock()
    breaker = configure_breakers(BreakerRegistry(), clock=clock)["twitter_api"]
    client = XClient(base_url=local_x.base_url, credentials=SANDBOX_X_CREDENTIALS, timeout=1, breaker=breaker, retry=ONE_ATTEMPT)
    local_x.faults.add("status", endpoint="search", status=500)
    try:
        for _ in range(5):
            with pytest.raises(TransientError):
                await client.search_recent("bot")
        clock.advance(120)
        with pytest.raises(TransientError):
            await client.search_recent("bot")
        assert breaker.state is CircuitState.OPEN
        status = breaker.get_status()
        assert status["recovery_timeout_s"] == 120.0
        # Callers are told to come back after the next probe of GET /2/users/me, not after the full 120 s.
        assert status["retry_in_s"] <= status["probe_interval_s"] + 0.1
    finally:
        await client.close()


async def test_ai_service_opens_after_3_failures_and_closes_after_60_s_and_2_good_trials(local_ai: LocalAI) -> None:
    clock = FakeClock()
    breaker = configure_breakers(BreakerRegistry(), clock=clock)["ai_service"]
    client = AIClient(base_url=local_ai.base_url, api_key=SANDBOX_AI_KEY, model="m", timeout=1, breaker=breaker, retry=ONE_ATTEMPT)
    messages = [{"role": "user", "content": '"""a tweet about bots"""'}]
    local_ai.faults.add("status", status=503)
    try:
        for _ in range(3):
            with pytest.raises(TransientError):
                await client.complete(messages)
        assert breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitOpenError):
            await client.complete(messages)
        assert local_ai.hits["chat"] == 3

        clock.advance(60)
        local_ai.faults.clear()
        await client.complete(messages)
        assert breaker.state is CircuitState.HALF_OPEN
        await client.complete(messages)
        assert breaker.state is CircuitState.CLOSED
    finally:
        await client.close()


async def test_database_opens_after_3_failures_and_closes_after_30_s_and_2_good_trials(database_url: str) -> None:
    clock = FakeClock()
    breaker = configure_breakers(BreakerRegistry(), clock=clock)["database"]
    down = await PostgresDatabase("postgresql://postgres@127.0.0.1:1/none", timeout=2, breaker=breaker).open()
    up = await PostgresDatabase(database_url, timeout=5, breaker=breaker).open()
    try:
        for _ in range(3):
            with pytest.raises(DatabaseUnavailable):
                await down.ping()
        assert breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitOpenError):
            await up.ping()  # the service is refused as a whole while open

        clock.advance(30)
        await up.ping()
        assert breaker.state is CircuitState.HALF_OPEN
        await up.ping()
        assert breaker.state is CircuitState.CLOSED
    finally:
        await down.close()
        await up.close()


def test_the_breakers_are_configured_as_the_seed_says() -> None:
    status = {name: b.get_status() for name, b in configure_breakers(BreakerRegistry()).items()}

    assert {n: (s["failure_threshold"], s["recovery_timeout_s"], s["half_open_max_calls"]) for n, s in status.items()} == {
        "twitter_api": (5, 120.0, 3),
        "ai_service": (3, 60.0, 2),
        "database": (3, 30.0, 2),
    }


async def test_after_an_x_outage_the_probe_of_users_me_closes_the_breaker_without_waiting_120_s(local_x: LocalX) -> None:
    registry = BreakerRegistry()
    registry.set_probe_interval(0.1)
    breaker = configure_breakers(registry)["twitter_api"]
    client = XClient(base_url=local_x.base_url, credentials=SANDBOX_X_CREDENTIALS, timeout=1, breaker=breaker, retry=ONE_ATTEMPT)
    try:
        local_x.faults.add("status", endpoint="*", status=503)
        for _ in range(5):
            with pytest.raises(TransientError):
                await client.search_recent("bot")
        assert breaker.state is CircuitState.OPEN
        await wait_until(lambda: local_x.hits["me"] >= 2, timeout=5, what="probes of /2/users/me")
        searches = local_x.hits["search"]
        local_x.faults.clear()
        await wait_until(lambda: breaker.state is CircuitState.CLOSED, timeout=5, what="closed by 3 good probes")
        assert local_x.hits["search"] == searches, "only the probe touched X while the breaker was open"
        assert await client.search_recent("bot") is not None
    finally:
        await client.close()


async def test_the_ai_breaker_probes_get_models(local_ai: LocalAI) -> None:
    registry = BreakerRegistry()
    registry.set_probe_interval(0.1)
    breaker = configure_breakers(registry)["ai_service"]
    client = AIClient(base_url=local_ai.base_url, api_key=SANDBOX_AI_KEY, model="m", timeout=1, breaker=breaker, retry=ONE_ATTEMPT)
    try:
        local_ai.faults.add("status", endpoint="*", status=503)
        for _ in range(3):
            with pytest.raises(TransientError):
                await client.complete([{"role": "user", "content": "hi"}])
        assert breaker.state is CircuitState.OPEN
        await wait_until(lambda: local_ai.hits["models"] >= 1, timeout=5, what="a probe of /models")
        local_ai.faults.clear()
        await wait_until(lambda: breaker.state is CircuitState.CLOSED, timeout=5, what="closed by good probes")
    finally:
        await client.close()
