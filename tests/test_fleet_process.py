"""worker.py replicas as real processes on one database and one sandbox world.

A fleet must never turn one replica's mistake into every account's problem:
these tests run the sequences an operator would (a wrong key, replicas
joining, SIGTERM, kill -9) and read the truth from the database and the
sandbox world.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.sandbox import World
from shared.sessions import DECRYPT_FAILURE, generate_key
from tests.test_worker_process import WorkerProcess, account_id, enqueue, fetch, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    from tests.test_worker import FAST

    return {
        **FAST,
        "SANDBOX": "1",
        "DATABASE_URL": database_url,
        "SANDBOX_DIR": str(tmp_path / "sandbox"),
        "DATA_DIR": str(tmp_path / "data"),
        "ACCOUNT_LEASE_SECONDS": "3",
        "LOG_LEVEL": "INFO",
    }


async def statuses(database_url: str) -> dict[str, tuple[str, str | None]]:
    rows = await fetch(database_url, "select label, status, last_error from telegram_accounts order by label")
    return {r["label"]: (r["status"], r["last_error"]) for r in rows}


async def leased(database_url: str, labels: set[str]) -> bool:
    rows = await fetch(
        database_url, "select label from telegram_accounts where lease_owner is not null and lease_expires_at > now()"
    )
    return {r["label"] for r in rows} >= labels


async def test_a_replica_with_the_wrong_key_changes_no_account_and_exits_2_and_the_right_key_brings_them_back(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    World.open(Path(env["SANDBOX_DIR"])).seed_demo()
    right = {**env, "SESSION_ENCRYPTION_KEY": generate_key()}
    wrong = {**env, "SESSION_ENCRYPTION_KEY": generate_key(), "DATA_DIR": str(tmp_path / "data-b")}

    a = await WorkerProcess(right, tmp_path / "a.log").start()
    try:
        await wait_until(lambda: leased(database_url, {"demo_one", "demo_two"}), timeout=30, what="A serves both", proc=a)
        assert await a.stop() == 0
    finally:
        await a.reap()
    before = await statuses(database_url)
    assert {status for status, _ in before.values()} == {"active"}

    b = await WorkerProcess(wrong, tmp_path / "b.log").start()
    try:
        assert b.proc is not None
        assert await b.proc.wait() == 2, b.output()[-3000:]
    finally:
        await b.reap()
    assert await statuses(database_url) == before, "a wrong key is the process's problem, never the accounts'"
    [line] = [line for line in b.output().splitlines() if "CRITICAL" in line]
    assert "SESSION_ENCRYPTION_KEY" in line and "no account was changed" in line
    assert "Traceback" not in b.output()

    # What an older version did with a wrong key, and a real logout next to it.
    await fetch(
        database_url, "update telegram_accounts set status = 'needs_login', last_error = $1 where label = 'demo_two'", DECRYPT_FAILURE
    )
    await fetch(
        database_url,
        "update telegram_accounts set status = 'needs_login', last_error = 'AUTH_KEY_UNREGISTERED: the session was revoked' "
        "where label = 'demo_one'",
    )
    a2 = await WorkerProcess(right, tmp_path / "a2.log").start()
    try:
        await wait_until(lambda: leased(database_url, {"demo_two"}), timeout=30, what="demo_two back and served", proc=a2)
        await enqueue(database_url, await account_id(database_url, "demo_two"), "alice", "after the wrong key")
        world = World.open(Path(env["SANDBOX_DIR"]))
        await wait_until(
            lambda: [m.text for m in world.received("alice")] == ["after the wrong key"], timeout=30, what="delivered", proc=a2
        )
        after = await statuses(database_url)
        assert after["demo_two"][0] == "active"
        assert after["demo_one"] == ("needs_login", "AUTH_KEY_UNREGISTERED: the session was revoked"), "a real logout stays"
        assert await a2.stop() == 0
    finally:
        await a2.reap()
