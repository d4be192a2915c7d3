"""Tests for shared/shutdown.py: real signals to a real subprocess, and cleanups in process.

The subprocess is ``tests/shared/programs/shutdown_worker.py``; every wait
on it has a deadline, and a test that fails kills it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from shared.shutdown import GracefulShutdown

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0  # deadline of any wait on the subprocess


class Worker:
    """The shutdown_worker program, with its output collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def wait_for_line(self, text: str) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(WAIT):
            while not any(text in line for line in self.lines):
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"worker exited before printing {text!r}: {self.lines}")
                self.lines.append(raw.decode().rstrip("\n"))

    async def exit_code(self) -> int:
        assert self.proc.stdout is not None
        async with asyncio.timeout(WAIT):
            rest = await self.proc.stdout.read()
            self.lines.extend(rest.decode().splitlines())
            return await self.proc.wait()

    def index(self, text: str) -> int:
        return next(i for i, line in enumerate(self.lines) if text in line)


StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker() -> AsyncIterator[StartWorker]:
    started: list[Worker] = []

    async def start(*args: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.shared.programs.shutdown_worker", *args,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        worker = Worker(proc)
        started.append(worker)
        await worker.wait_for_line("ready")
        return worker

    yield start
    for worker in started:
        if worker.proc.returncode is None:
            worker.proc.kill()
            await worker.proc.wait()


@pytest.mark.slow
async def test_sigterm_drains_in_flight_work_and_exits_zero_within_the_grace(start_worker: StartWorker) -> None:
    grace = 5.0
    worker = await start_worker("--grace", str(grace), "--work", "0.5")
    signalled = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    code = await worker.exit_code()
    took = time.monotonic() - signalled

    assert code == 0, worker.lines
    assert took < grace, f"exited {took:.1f}s after SIGTERM; the grace is {grace}s"
    assert any("stopping reason=SIGTERM" in line for line in worker.lines)
    assert worker.index("work finished") < worker.index("drained=True"), "in-flight work finished before the exit"
    assert worker.index("cleanup second") < worker.index("cleanup first"), "cleanups run in reverse order"


@pytest.mark.slow
async def test_a_second_signal_exits_at_once_with_a_non_zero_code(start_worker: StartWorker) -> None:
    worker = await start_worker("--grace", "30", "--hang")
    worker.proc.send_signal(signal.SIGTERM)
    await worker.wait_for_line("stopping reason=SIGTERM")
    worker.proc.send_signal(signal.SIGINT)
    code = await worker.exit_code()  # far sooner than the 30 s grace, or WAIT fails the test
    assert code == 128 + signal.SIGINT, worker.lines
    assert not any("drained=" in line for line in worker.lines)


async def test_cleanups_run_in_reverse_order_and_a_hanging_one_is_cut_by_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shutdown = GracefulShutdown(grace=1.0, exit_now=lambda code: None)
    ran: list[str] = []

    def record(name: str) -> Callable[[], Awaitable[None]]:
        async def clean() -> None:
            ran.append(name)

        return clean

    async def hang() -> None:
        ran.append("hang")
        await asyncio.Event().wait()

    async def explode() -> None:
        ran.append("explode")
        raise RuntimeError("close failed")

    shutdown.add_cleanup("database", record("database"))
    shutdown.add_cleanup("telegram", hang, timeout=0.05)
    shutdown.add_cleanup("leases", explode)
    shutdown.add_cleanup("retry queue", record("retry queue"))

    await asyncio.wait_for(shutdown.run_cleanups(), 5)
    assert ran == ["retry queue", "explode", "hang", "database"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("cleanup telegram timed out" in m for m in messages)
    assert any("cleanup leases failed" in m for m in messages)

    await shutdown.run_cleanups()  # run once only
    assert len(ran) == 4


async def test_drain_waits_for_in_flight_work_and_reports_a_grace_that_ran_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shutdown = GracefulShutdown(grace=0.05)
    assert await shutdown.drain() is True  # nothing in flight

    release = asyncio.Event()
    entered = asyncio.Event()

    async def work() -> None:
        async with shutdown.in_flight():
            entered.set()
            await release.wait()

    task = asyncio.create_task(work())
    await asyncio.wait_for(entered.wait(), 5)
    assert shutdown.in_flight_count == 1
    caplog.set_level(logging.WARNING, logger="shared.shutdown")
    assert await shutdown.drain() is False
    assert any("did not finish" in r.getMessage() for r in caplog.records)

    release.set()
    assert await shutdown.drain(timeout=5) is True
    await task
    assert shutdown.in_flight_count == 0


async def test_finish_drains_then_cleans_up() -> None:
    shutdown = GracefulShutdown(grace=5)
    order: list[str] = []
    release = asyncio.Event()

    async def work() -> None:
        async with shutdown.in_flight():
            await release.wait()
            order.append("work")

    async def cleanup() -> None:
        order.append("cleanup")

    shutdown.add_cleanup("close", cleanup)
    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    finishing = asyncio.create_task(shutdown.finish())
    await asyncio.sleep(0)
    assert order == []
    release.set()
    assert await asyncio.wait_for(finishing, 5) is True
    assert order == ["work", "cleanup"]
    await task


async def test_sleep_wakes_early_when_the_stop_is_requested() -> None:
    shutdown = GracefulShutdown()
    assert await shutdown.sleep(0.01) is False
    sleeper = asyncio.create_task(shutdown.sleep(60))
    await asyncio.sleep(0)
    shutdown.request_stop("fatal error")
    assert await asyncio.wait_for(sleeper, 5) is True
    assert shutdown.stopping and shutdown.reason == "fatal error"
    shutdown.request_stop("again")
    assert shutdown.reason == "fatal error", "the first reason is kept"


def test_the_same_signal_twice_at_once_is_one_request_but_another_signal_exits() -> None:
    exits: list[int] = []
    shutdown = GracefulShutdown(grace=30.0, exit_now=exits.append)
    shutdown._on_signal(signal.SIGINT)
    shutdown._on_signal(signal.SIGINT)  # the terminal's Ctrl-C and the supervisor's forward
    assert shutdown.stopping and exits == []
    shutdown._on_signal(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]
