"""ingest.py as a real process: kill -9 mid-batch, SIGTERM with images in flight, 500 posts while down, two replicas.

The process talks to moto's S3 server in this test process (real HTTP), a
fresh database on the embedded PostgreSQL and the sandbox world on disk.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from PIL import Image

from devkit.sandbox import FaultKind, World
from tests.helpers import wait_until as shared_wait_until
from tests.ingest.s3_server import S3Server, s3_bucket, s3_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
CHANNEL = "@demo_photos"

pytestmark = pytest.mark.slow

FAST = {
    "PORT": "0",
    "SANDBOX": "1",
    "LOG_LEVEL": "INFO",
    "ACCOUNT_CHECK_INTERVAL": "0.2",
    "ACCOUNT_LEASE_SECONDS": "3",  # a killed replica's account is taken over 3 s after its last renewal
    "WATCHDOG_CHECK_INTERVAL": "0.2",
    "WATCHDOG_MAX_SILENCE": "10",
    "WATCHDOG_STARTUP_GRACE": "0",
    "HEARTBEAT_INTERVAL": "0.5",
    "RETRY_BASE_DELAY": "0.2",
    "TIMEOUT_TELEGRAM_ENTITY": "5",
    "TIMEOUT_TELEGRAM_CONNECT": "5",
    "TIMEOUT_STORAGE": "5",
    "RECONNECT_BACKOFF_MAX": "0.5",
    "SHUTDOWN_GRACE": "10",
    "INGEST_GC_INTERVAL": "0",
}


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (seed % 256, (seed // 256) % 256, 33)).save(buffer, "PNG")
    return buffer.getvalue()


def post_pngs(world: World, seeds: range, *, gap: bool = False) -> list[int]:
    return [
        world.post_to_channel(CHANNEL, png(n), gap=gap, as_document=True, mime_type="image/png", file_name=f"{n}.png").id
        for n in seeds
    ]


class IngestProcess:
    """One ``python ingest.py`` with its output in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> IngestProcess:
        handle = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "ingest.py", cwd=ROOT, env={**os.environ, **self.env}, stdout=handle, stderr=handle
        )
        handle.close()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def port(self) -> int | None:
        found = re.findall(r"status server on port (\d+)", self.output())
        return int(found[-1]) if found else None

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port()}/status", timeout=5) as response:
            return json.loads(response.read())

    async def wait_connected(self) -> None:
        await wait_until(lambda: self.port() is not None, what="status server up", proc=self)
        await wait_until(lambda: self.status().get("ingest", {}).get("connected"), what="connected to the sandbox", proc=self)

    async def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def reap(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def wait_until(
    condition: Callable[[], Any], *, timeout: float = 40.0, what: str, proc: IngestProcess | None = None
) -> None:
    def gone() -> str | None:
        if proc is not None and proc.proc is not None and proc.proc.returncode is not None:
            return f"ingest exited with {proc.proc.returncode}\n{proc.output()[-3000:]}"
        return None

    await shared_wait_until(
        condition,
        timeout=timeout,
        what=what,
        poll=0.1,
        gone=gone,
        context=(lambda: proc.output()[-3000:]) if proc else None,
    )


async def fetch(database_url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


async def stored_count(database_url: str) -> int:
    rows = await fetch(database_url, "select count(*) as n from ingest_images where status = 'stored'")
    return int(rows[0]["n"])


@pytest.fixture
def env(tmp_path: Path, database_url: str, s3_server: S3Server, s3_bucket: str) -> dict[str, str]:
    return {
        **FAST,
        **s3_server.env(s3_bucket),
        "DATABASE_URL": database_url,
        "DATA_DIR": str(tmp_path / "data"),
        "SANDBOX_DIR": str(tmp_path / "sandbox"),
    }


async def test_kill_9_mid_batch_then_restart_leaves_no_duplicate_rows_and_no_row_without_its_object(
    env: dict[str, str], database_url: str, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    first = await IngestProcess(env, tmp_path / "first.log").start()
    second: IngestProcess | None = None
    try:
        await first.wait_connected()
        world.set_fault(FaultKind.LATENCY, method="GetFile", ms=300)
        posted = post_pngs(world, range(40))
        await wait_until(lambda: _at_least(database_url, 4), what="a few stored", proc=first)
        world.clear_faults()
        world.set_fault(FaultKind.HANG, method="GetFile")  # the batch stops mid-way, downloads in flight
        await first.kill9()
        assert await stored_count(database_url) < 40
        world.clear_faults()
        second = await IngestProcess(env, tmp_path / "second.log").start()
        await wait_until(lambda: _at_least(database_url, 40), timeout=60, what="all 40 stored after restart", proc=second)
        rows = await fetch(database_url, "select message_id, storage_key, status from ingest_images order by message_id")
        keys = s3_server.keys(s3_bucket, "ingest/")
        assert [r["message_id"] for r in rows] == posted  # one row per message, none twice
        assert all(r["status"] == "stored" and r["storage_key"] in keys for r in rows)  # every row has its object
        status = second.status()["ingest"]["channels"][CHANNEL]
        assert status["cursor"] == posted[-1] and status["lag"] == 0
    finally:
        await first.reap()
        if second is not None:
            await second.reap()


async def _at_least(database_url: str, n: int) -> bool:
    return await stored_count(database_url) >= n


@pytest.mark.timeout(360)
async def test_sigterm_finishes_in_flight_images_and_500_posts_made_while_down_are_all_caught_up(
    env: dict[str, str], database_url: str, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    first = await IngestProcess(env, tmp_path / "first.log").start()
    second: IngestProcess | None = None
    try:
        await first.wait_connected()
        world.set_fault(FaultKind.LATENCY, method="GetFile", ms=150)
        before = post_pngs(world, range(12))
        await wait_until(lambda: _at_least(database_url, 1), what="the first stored", proc=first)
        assert await first.stop() == 0
        assert "drained" in first.output()
        stored_before = await stored_count(database_url)
        rows = await fetch(database_url, "select storage_key from ingest_images")
        assert {r["storage_key"] for r in rows} <= s3_server.keys(s3_bucket)
        world.clear_faults()

        while_down = post_pngs(world, range(1000, 1500), gap=True)
        second = await IngestProcess(env, tmp_path / "second.log").start()
        try:
            # A correctness deadline, not a speed bound: ~15 s alone, far more on a loaded 2-core machine.
            await wait_until(lambda: _at_least(database_url, 512), timeout=120, what="all 512 stored", proc=second)
        except AssertionError as exc:  # say which images are missing, not just how many
            got = {r["message_id"]: r["status"] for r in await fetch(database_url, "select message_id, status from ingest_images")}
            missing = [m for m in before + while_down if m not in got]
            not_stored = {m: s for m, s in got.items() if s != "stored"}
            raise AssertionError(f"{len(got)} rows; missing {missing[:50]}; not stored {not_stored}\n{exc}") from exc
        rows = await fetch(database_url, "select message_id, status from ingest_images order by message_id")
        assert [r["message_id"] for r in rows] == before + while_down
        status = second.status()
        channel = status["ingest"]["channels"][CHANNEL]
        assert channel["cursor"] == while_down[-1] and channel["lag"] == 0
        assert status["counters"]["processed"] == 512 - stored_before
        assert status["ingest"]["queue_size"] == 0
        assert await second.stop() == 0
    finally:
        await first.reap()
        if second is not None:
            await second.reap()


async def test_two_replicas_read_one_at_a_time_and_the_second_takes_over_a_killed_first_without_duplicates(
    env: dict[str, str], database_url: str, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    # Railway's overlapping deploy: the new replica starts while the old one still runs.
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    first = await IngestProcess(env, tmp_path / "first.log").start()
    second: IngestProcess | None = None
    try:
        await first.wait_connected()
        second = await IngestProcess({**env, "DATA_DIR": str(tmp_path / "data-2")}, tmp_path / "second.log").start()
        replica = second
        await wait_until(lambda: replica.port() is not None, what="second status server up", proc=second)
        await wait_until(lambda: "is held by another process" in replica.output(),
                         what="the second replica sees the account leased", proc=second)
        assert not second.status()["ingest"].get("connected"), "one reader at a time: the account's lease"

        world.set_fault(FaultKind.LATENCY, method="GetFile", ms=200)
        posted = post_pngs(world, range(30))
        await wait_until(lambda: _at_least(database_url, 3), what="a few stored by the first", proc=first)
        await first.kill9()
        world.clear_faults()
        await wait_until(lambda: _at_least(database_url, 30), timeout=90, what="all 30 stored by the second", proc=second)
        rows = await fetch(database_url, "select message_id, storage_key, status from ingest_images order by message_id")
        assert [r["message_id"] for r in rows] == posted  # one row per message, none twice
        keys = s3_server.keys(s3_bucket, "ingest/")
        assert all(r["status"] == "stored" and r["storage_key"] in keys for r in rows)
        assert await second.stop() == 0
    finally:
        await first.reap()
        if second is not None:
            await second.reap()
