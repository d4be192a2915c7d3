"""The fleet's pieces in-process: the session key, membership and the fair share.

Real PostgreSQL and the Telegram sandbox; the process-level sequences
(replicas joining, kill -9, a wrong key across restarts) are in
test_fleet_process.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.alerts import AlertType
from shared.config import WorkerSettings, load_settings
from shared.db import open_database
from devkit.sandbox import World
from shared.cipher import SessionCipher, generate_key
from shared.telegram import SANDBOX_KEY_FILE, session_cipher
from tests.helpers import RecordingAlerts, wait_until
from tests.test_worker import FAST, running_worker, worker_cli
from worker import seed_sandbox_accounts


@pytest.fixture
def worker_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {**FAST, "DATABASE_URL": database_url, "SANDBOX_DIR": str(tmp_path / "sandbox"), "DATA_DIR": str(tmp_path / "data")}


async def test_a_session_the_key_cannot_open_is_key_mismatch_not_needs_login_and_ready_says_so(worker_env: dict[str, str]) -> None:
    settings = load_settings(WorkerSettings, worker_env)
    world = World.open(settings.sandbox_path)
    db = await open_database(settings)
    try:
        await seed_sandbox_accounts(db, world, session_cipher(settings))
        two = next(a for a in await db.list_accounts() if a.label == "demo_two")
        stranger = SessionCipher(generate_key())
        await db.save_account_session(two.id, stranger.encrypt(world.session_string(two.phone or "")))
    finally:
        await db.close()
    alerts = RecordingAlerts()
    async with running_worker(worker_env, alerts=alerts, accounts=1) as worker:
        await wait_until(lambda: worker.pool.key_mismatched() == ["demo_two"], what="demo_two key_mismatch")
        status = await worker.runtime.status()
        assert status["session_key"]["status"] == "key_mismatch"
        assert status["accounts"]["demo_two"]["state"] == "key_mismatch"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{worker.runtime.status_server.url}/ready") as response:
                assert response.status == 503
                assert "key_mismatch" in await response.text()
        accounts = {a.label: a for a in await worker.db.list_accounts()}
        assert accounts["demo_two"].status.value == "active", "the account is fine; this process's key is not"
        assert accounts["demo_two"].lease_owner is None, "released for a process with the right key"
        await worker.pool.refresh()
        await worker.pool.refresh()
        assert len([a for a in alerts.alerts if a[0] is AlertType.SESSION_KEY_MISMATCH]) == 1, "alerted once"


def test_sandbox_processes_sharing_a_world_share_its_key_whatever_their_data_dir(tmp_path: Path) -> None:
    world = tmp_path / "world"
    one = load_settings(WorkerSettings, {"SANDBOX_DIR": str(world), "DATA_DIR": str(tmp_path / "a")})
    two = load_settings(WorkerSettings, {"SANDBOX_DIR": str(world), "DATA_DIR": str(tmp_path / "b")})
    token = session_cipher(one).encrypt("a session")
    assert session_cipher(two).decrypt(token) == "a session"
    assert (world / SANDBOX_KEY_FILE).is_file()


def test_a_sandbox_key_an_older_version_kept_in_data_dir_moves_into_the_world(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    old = generate_key()
    (data / SANDBOX_KEY_FILE).write_text(old)
    settings = load_settings(WorkerSettings, {"DATA_DIR": str(data)})
    token = SessionCipher(old).encrypt("kept")
    assert session_cipher(settings).decrypt(token) == "kept"
    assert (settings.sandbox_path / SANDBOX_KEY_FILE).read_text() == old


async def test_the_fleet_view_shows_each_replica_with_its_heartbeat_held_accounts_and_target_share(
    worker_env: dict[str, str],
) -> None:
    async with running_worker(worker_env) as worker:
        pool = worker.pool
        await wait_until(lambda: _fleet_row(pool) is not None and _fleet_row(pool)["held"] == 2, what="held 2 in the fleet view")
        status = await worker.runtime.status()
        [(replica, row)] = status["fleet"].items()
        assert replica == pool.owner and row["this"] is True and row["state"] == "alive"
        assert row["target"] == 2 and row["pid"] == os.getpid() and row["version"] and row["last_heartbeat_at"]
        code, out, err = await worker_cli(worker_env, "fleet", "--json")
        assert code == 0, err
        shown = json.loads(out)
        assert shown["replicas"] == 1 and shown["active_accounts"] == 2 and shown["held"] == 2
        assert [(r["replica"], r["held"], r["target"]) for r in shown["fleet"]] == [(pool.owner, 2, 2)]
        code, out, err = await worker_cli(worker_env, "fleet")
        assert code == 0, err
        assert pool.owner in out and "1 live replica(s), 2 active account(s), 2 held, 0 not held" in out


def _fleet_row(pool: Any) -> dict[str, Any] | None:
    return pool.fleet_status().get(pool.owner)
