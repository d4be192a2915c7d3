"""Each bot, started while its database cannot be reached, answers /ready with 503 and says what it waits for.

A load balancer or Railway's health check must not send work to a process
that is still waiting for a dependency; ``/health`` (the process lives) stays
200 meanwhile, so nothing restarts it for waiting.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import eventually

ROOT = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.mark.parametrize("bot", ["worker", "ingest", "bot"])
async def test_ready_is_503_while_the_bot_waits_for_its_database(bot: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    port = closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "SUPABASE_", "DATABASE_URL", "BOT", "PORT"))}
    env.update(
        DATABASE_URL=f"postgresql://nobody@127.0.0.1:{closed_port()}/none",  # refused at once, again and again
        SANDBOX="1",
        SANDBOX_DIR=str(tmp_path / "sandbox"),
        DATA_DIR=str(tmp_path / "data"),
        PORT=str(port),
        LOG_FORMAT="text",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, f"{bot}.py", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        def gone() -> str | None:
            return None if proc.returncode is None else f"{bot}.py exited {proc.returncode} while its database was away"

        answers: list[tuple[int, str]] = []

        async def waiting_for_the_database() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{port}/ready") as response:
                    answers.append((response.status, await response.text()))
            except aiohttp.ClientConnectionError:
                return False  # the status server is not listening yet
            return "database" in answers[-1][1].lower()

        await eventually(waiting_for_the_database, timeout=30, what=f"{bot}.py saying it waits for the database", gone=gone,
                         context=lambda: repr(answers[-3:]))
        assert {status for status, _ in answers} == {503}, answers  # never ready before its database answered
        async with http.get(f"http://127.0.0.1:{port}/health") as response:
            assert response.status == 200, await response.text()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
