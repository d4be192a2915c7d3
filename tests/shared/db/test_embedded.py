"""The embedded default: data under DATA_DIR survives the process, even a killed one."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

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
