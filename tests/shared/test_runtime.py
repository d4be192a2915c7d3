"""The runtime assembles the kit: loops under the watchdog, /health, /status, clean stop."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from shared.alerts import AlertType
from shared.config import CommonSettings, load_settings
from shared.errors import PermanentError
from shared.heartbeat import HeartbeatRecord
from shared.runtime import STARTUP_ALERT_AFTER, BotRuntime, StartupAborted, StartupFailed
from tests.helpers import RecordingAlerts
from tests.helpers import wait_until


def make_settings(**overrides: str) -> CommonSettings:
    env = {
        "PORT": "0",
        "WATCHDOG_MAX_SILENCE": "0.3",
        "WATCHDOG_CHECK_INTERVAL": "0.05",
        "WATCHDOG_STARTUP_GRACE": "0",
        "WATCHDOG_STORM_RESTARTS": "3",
        "TIMEOUT_LOOP_CYCLE": "0.2",
        "HEARTBEAT_INTERVAL": "0.05",
        "SHUTDOWN_GRACE": "1",
        "STATUS_TOKEN": "s3cret-status-token",
        **overrides,
    }
    return load_settings(CommonSettings, env)


class MemoryHeartbeats:
    def __init__(self) -> None:
        self.records: list[HeartbeatRecord] = []

    async def write_heartbeat(self, record: HeartbeatRecord) -> None:
        self.records.append(record)


async def test_runtime_serves_health_and_status_with_its_loops() -> None:
    runtime = BotRuntime(bot="worker", settings=make_settings(), host="127.0.0.1")
    cycles = 0

    async def cycle() -> float:
        nonlocal cycles
        cycles += 1
        runtime.stats.processed += 1
        return 0.01

    runtime.add_loop("demo", cycle, interval=0.01)
    runtime.add_section("accounts", lambda: {"alice": {"connected": True}})
    await runtime.start()
    runner = asyncio.create_task(runtime.run_until_stopped())
    try:
        await wait_until(lambda: cycles >= 3)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{runtime.status_server.url}/health") as response:
                assert response.status == 200
            async with http.get(f"{runtime.status_server.url}/status") as response:
                assert response.status == 401
            headers = {"Authorization": "Bearer s3cret-status-token"}
            async with http.get(f"{runtime.status_server.url}/status", headers=headers) as response:
                assert response.status == 200
                body = await response.json()
                text = await response.text()
        assert body["bot"] == "worker"
        assert body["loops"]["demo"]["alive"] is True
        assert body["counters"]["processed"] >= 3
        assert body["accounts"] == {"alice": {"connected": True}}
        assert "s3cret-status-token" not in text
    finally:
        runtime.shutdown.request_stop("test")
        await asyncio.wait_for(runner, 5)
        await runtime.stop()


async def test_health_turns_503_when_a_loop_is_failing_and_heartbeat_keeps_beating() -> None:
    runtime = BotRuntime(bot="worker", settings=make_settings(), host="127.0.0.1")
    store = MemoryHeartbeats()

    async def crashing() -> None:
        raise RuntimeError("boom")

    runtime.watchdog.backoff_base = 0.01
    runtime.add_task_loop("crashy", crashing)
    await runtime.start()
    runtime.start_heartbeat(worker_id="test-worker", store=store)
    runner = asyncio.create_task(runtime.run_until_stopped())
    try:
        await wait_until(lambda: "crashy" in runtime.watchdog.failing())
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{runtime.status_server.url}/health") as response:
                assert response.status == 503
        beats = len(store.records)
        await wait_until(lambda: len(store.records) > beats + 2)
        assert store.records[-1].status == "degraded"
        assert store.records[-1].loops["crashy"]["restarts"] >= 3
    finally:
        runtime.shutdown.request_stop("test")
        await asyncio.wait_for(runner, 5)
        await runtime.stop()
    assert store.records[-1].status == "stopped"


async def test_stop_waits_for_in_flight_work_and_runs_cleanups() -> None:
    runtime = BotRuntime(bot="worker", settings=make_settings(), host="127.0.0.1")
    finished = asyncio.Event()
    cleaned: list[str] = []

    async def work() -> None:
        async with runtime.shutdown.in_flight():
            await asyncio.sleep(0.2)
            finished.set()

    async def cleanup() -> None:
        cleaned.append("db")

    runtime.add_cleanup("db", cleanup)
    await runtime.start()
    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    await runtime.stop()
    assert finished.is_set()
    assert cleaned == ["db"]
    await task


@pytest.mark.parametrize("value", ["-1", "abc", "70000"])
def test_bad_port_is_a_config_error(value: str) -> None:
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="PORT"):
        make_settings(PORT=value)


async def test_a_start_up_step_that_fails_for_a_passing_reason_is_retried_and_the_alert_resolved() -> None:
    alerts = RecordingAlerts()
    runtime = BotRuntime(bot="worker", settings=make_settings(), host="127.0.0.1", alerts=alerts, startup_retry_base=0.01)
    attempts = 0
    seen_while_waiting: list[dict[str, object] | None] = []

    async def step() -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= STARTUP_ALERT_AFTER:
            seen_while_waiting.append((await runtime.status())["starting"])
            raise ConnectionRefusedError(111, "Connect call failed")
        return "open"

    async with runtime:
        assert await runtime.until_started("the database", step, fix="check DATABASE_URL") == "open"
        after = (await runtime.status())["starting"]

    assert attempts == STARTUP_ALERT_AFTER + 1
    assert seen_while_waiting[1] is not None and seen_while_waiting[1]["waiting_for"] == "the database"
    assert after is None
    [(kind, message, key)] = alerts.alerts  # one alert after STARTUP_ALERT_AFTER attempts, not one per attempt
    assert kind is AlertType.INITIALIZATION_FAILED and "still waiting for the database" in message
    assert alerts.resolved == [(AlertType.INITIALIZATION_FAILED, key)]


async def test_a_start_up_step_that_cannot_succeed_stops_start_up_with_one_line_and_an_alert() -> None:
    alerts = RecordingAlerts()
    runtime = BotRuntime(bot="worker", settings=make_settings(), host="127.0.0.1", alerts=alerts, startup_retry_base=0.01)
    attempts = 0

    async def step() -> None:
        nonlocal attempts
        attempts += 1
        raise PermanentError("password authentication failed")

    with pytest.raises(StartupFailed) as failed:
        async with runtime:
            await runtime.until_started("the database", step, fix="check DATABASE_URL")

    assert attempts == 1
    assert str(failed.value) == "worker could not start: the database: password authentication failed (check DATABASE_URL)"
    assert [a[0] for a in alerts.alerts] == [AlertType.INITIALIZATION_FAILED]


async def test_a_stop_while_waiting_for_a_start_up_step_ends_the_wait() -> None:
    runtime = BotRuntime(
        bot="worker", settings=make_settings(), host="127.0.0.1", alerts=RecordingAlerts(), startup_retry_base=60.0
    )
    failing = asyncio.Event()

    async def step() -> None:
        failing.set()
        raise ConnectionRefusedError(111, "Connect call failed")

    async with runtime:
        waiting = asyncio.create_task(runtime.until_started("the database", step, fix="check DATABASE_URL"))
        await asyncio.wait_for(failing.wait(), 5)
        runtime.shutdown.request_stop("test")
        with pytest.raises(StartupAborted):
            await asyncio.wait_for(waiting, 5)  # far less than the 30 s or more pause it was in


async def test_start_removes_temporary_files_a_killed_process_left_and_keeps_fresh_ones(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    (tmp / "ingest").mkdir(parents=True)
    stale, fresh = tmp / "ingest" / "download-1.part", tmp / "outbound-7-photo.jpg"
    stale.write_bytes(b"x" * 10)
    fresh.write_bytes(b"y" * 10)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    runtime = BotRuntime(bot="worker", settings=make_settings(DATA_DIR=str(tmp_path)), host="127.0.0.1", alerts=RecordingAlerts())
    async with runtime:
        pass

    assert not stale.exists() and fresh.exists()


async def test_ready_is_503_while_start_up_waits_for_a_dependency_and_200_once_the_loops_run() -> None:
    runtime = BotRuntime(bot="worker", settings=make_settings(), host="127.0.0.1", alerts=RecordingAlerts(), startup_retry_base=0.01)
    answers: list[tuple[int, dict[str, object]]] = []
    attempts = 0

    async def ready(http: aiohttp.ClientSession) -> tuple[int, dict[str, object]]:
        async with http.get(f"{runtime.status_server.url}/ready") as response:
            return response.status, await response.json()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async def step() -> str:
            nonlocal attempts
            attempts += 1
            if attempts <= 2:
                if attempts == 2:  # the first failure is recorded: start-up is visibly waiting
                    answers.append(await ready(http))
                raise ConnectionRefusedError(111, "Connect call failed")
            answers.append(await ready(http))  # up, but the loops have not started
            return "open"

        async with runtime:
            await runtime.until_started("the database", step, fix="check DATABASE_URL")
            running = asyncio.create_task(runtime.run_until_stopped())
            await wait_until(lambda: runtime.watchdog.is_healthy() and runtime._started)
            answers.append(await ready(http))
            runtime.shutdown.request_stop("test over")
            await asyncio.wait_for(running, 5)

    (waiting, waiting_body), (before_loops, _), (running_status, _) = answers
    assert waiting == 503 and "the database" in str(waiting_body)
    assert before_loops == 503
    assert running_status == 200
