"""python -m shared.db migrate | status."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from shared.db import discover
from tests.fixtures.postgres import PgServer

REPO = Path(__file__).resolve().parents[3]


async def _cli(cwd: Path, *args: str, **env: str) -> tuple[int, str, str]:
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY")}
    full.update(PYTHONPATH=str(REPO), DATA_DIR=str(cwd / "data"), **env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.db", *args, cwd=str(cwd), env=full,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_migrate_applies_everything_once_and_status_lists_it(embedded_pg: PgServer, tmp_path: Path) -> None:
    dsn = await embedded_pg.create_database(migrated=False)
    count = len(discover())
    code, out, err = await _cli(tmp_path, "migrate", "--database-url", dsn)
    assert code == 0, err
    assert f"{count} applied, 0 already applied" in out
    code, out, err = await _cli(tmp_path, "migrate", DATABASE_URL=dsn)
    assert code == 0, err
    assert f"0 applied, {count} already applied" in out
    code, out, _ = await _cli(tmp_path, "status", "--database-url", dsn)
    assert code == 0 and out.count("applied  ") == count and "pending" not in out


async def test_migrate_with_only_the_http_api_configured_exits_2_with_one_line(tmp_path: Path) -> None:
    code, out, err = await _cli(tmp_path, "migrate", SUPABASE_URL="https://example.supabase.co", SUPABASE_SERVICE_ROLE_KEY="k")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--database-url" in err


async def test_bad_setting_exits_2_naming_the_variable(tmp_path: Path) -> None:
    code, _, err = await _cli(tmp_path, "migrate", TIMEOUT_DB="soon")
    assert code == 2 and "TIMEOUT_DB" in err
