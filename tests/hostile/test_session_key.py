"""A well-formed but wrong SESSION_ENCRYPTION_KEY: the account it cannot open is left alone, shown as key_mismatch.

A key that cannot decrypt is this process's problem, not the account's: its
status stays active (a process with the right key serves it), the worker
stays up, the other account keeps sending, and the account's queued message
is kept (not failed, not lost) for a process with the right key.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared.config import WorkerSettings, load_settings
from shared.db import PostgresDatabase
from shared.db.records import AccountStatus
from shared.runtime import BotRuntime
from devkit.sandbox import World
from shared.cipher import SessionCipher, generate_key
from tests.fixtures.postgres import fresh_breaker
from tests.test_worker import outbound_rows, texts_received, wait_until, worker_env  # noqa: F401 (worker_env is a fixture)
from worker import Worker, run_worker

pytestmark = pytest.mark.slow


async def test_an_account_sealed_under_another_key_is_left_alone_shown_with_a_reason_and_the_rest_runs(
    worker_env: dict[str, str], database_url: str
) -> None:
    world = World.open(Path(worker_env["SANDBOX_DIR"]))
    demo = world.seed_demo()
    old_key, new_key = generate_key(), generate_key()
    db = await PostgresDatabase(database_url, timeout=10.0, breaker=fresh_breaker()).open()
    try:
        one = demo.accounts[0]
        sealed = SessionCipher(old_key).encrypt(world.session_string(one.phone))
        await db.upsert_account(one.username or "demo_one", phone=one.phone, session=sealed, status=AccountStatus.ACTIVE)
    finally:
        await db.close()

    settings = load_settings(WorkerSettings, {**worker_env, "SESSION_ENCRYPTION_KEY": new_key})
    runtime = BotRuntime(bot="worker", settings=settings, host="127.0.0.1")
    started: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_worker(settings, runtime, started=started.set_result))
    try:
        await wait_until(lambda: started.done() or task.done(), what="worker ready")
        if task.done():
            task.result()
        worker = started.result()
        await wait_until(lambda: len(worker.pool.connected()) == 1, what="demo_two connected")

        pool = worker.pool
        await wait_until(lambda: pool.key_mismatched() == ["demo_one"], what="demo_one key_mismatch")
        accounts = {a.label: a for a in await worker.db.list_accounts()}
        assert accounts["demo_one"].status is AccountStatus.ACTIVE, "the account is fine; this process's key is not"
        reason = (await runtime.status())["accounts"]["demo_one"]["last_error"] or ""
        assert "key" in reason.lower(), f"the reason names the key: {reason!r}"
        assert "gAAAA" not in reason and old_key not in reason and new_key not in reason, "no secret in the reason"

        await worker.db.enqueue_outbound(accounts["demo_one"].id, "alice", "waits for the right key")
        await worker.db.enqueue_outbound(accounts["demo_two"].id, "bob", "goes out now")
        await wait_until(lambda: texts_received(world, "bob") == ["goes out now"], what="demo_two delivers")
        rows = {r["text"]: r for r in await outbound_rows(database_url)}
        assert rows["waits for the right key"]["status"] == "queued", "kept for a process with the right key, not failed"
        assert not task.done(), "the worker is still running"
    finally:
        runtime.shutdown.request_stop("test over")
        await asyncio.wait_for(task, 20)
