"""The embedded default: data under DATA_DIR survives the process, even a killed one."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

import psutil
import pytest

from tests.fixtures.postgres import embedded_data_root

REPO = Path(__file__).resolve().parents[3]

PROGRAM = """
import asyncio, sys
from shared.config import CommonSettings, load_settings
from shared.db import open_database

async def main() -> None:
    settings = load_settings(CommonSettings, env={"DATA_DIR": sys.argv[1]})
    db = await open_database(settings)
    if sys.argv[2] == "write":
        await db.upsert_account("persisted", phone="+15550001")
        print("written", db.backend.value, flush=True)
        await asyncio.Event().wait()  # killed here, without closing anything
    print(",".join(a.label for a in await db.list_accounts()), flush=True)
    await db.close()

asyncio.run(main())
"""


async def _spawn(data_dir: Path, mode: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"):
        env.pop(name, None)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROGRAM, str(data_dir), mode,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(data_dir.parent), env=env,
    )


async def test_embedded_database_keeps_its_data_when_the_process_is_killed_and_restarted() -> None:
    root = embedded_data_root("shdb-restart-")
    try:
        await _kill_and_restart(root / "data")
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _kill_and_restart(data_dir: Path) -> None:
    writer = await _spawn(data_dir, "write")
    assert writer.stdout is not None
    try:
        line = await asyncio.wait_for(writer.stdout.readline(), timeout=90)
        assert line.decode().split() == ["written", "embedded"], (await writer.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]
    finally:
        writer.send_signal(signal.SIGKILL)
        await asyncio.wait_for(writer.wait(), timeout=30)

    reader = await _spawn(data_dir, "read")
    out, err = await asyncio.wait_for(reader.communicate(), timeout=90)
    assert reader.returncode == 0, err.decode()[-2000:]
    assert out.decode().strip() == "persisted"
    # The last live user stopped the server on its way out (the killed one no longer counts).
    assert not (data_dir / "postgres" / "postmaster.pid").exists()


async def test_a_discarded_server_is_stopped_and_let_go_so_the_same_data_starts_again() -> None:
    """discard(): the scratch server's stop without a checkpoint or the wheel's machine-wide lock."""
    import asyncpg

    from shared.db.embedded import EmbeddedPostgres

    root = embedded_data_root("shdb-discard-")
    try:
        server = EmbeddedPostgres(root / "data")
        dsn = await server.start()
        pid = server.server.get_pid()
        await server.discard()

        assert not server.running
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, "the postmaster is gone"
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await asyncpg.connect(dsn, timeout=5)
        # Let go, not leaked: the same data directory starts again in this process.
        again = EmbeddedPostgres(root / "data")
        conn = await asyncpg.connect(await again.start(), timeout=10)
        assert await conn.fetchval("select 1") == 1
        await conn.close()
        await again.discard()
    finally:
        shutil.rmtree(root, ignore_errors=True)
