"""One message or job that always fails never stalls the worker's outbound and jobs loops.

A poison item comes first (Telegram answers RPC_CALL_FAIL, a 500, for every
request aimed at its chat), normal ones after it. The poison one is retried
with backoff, each failure counted, and ends ``dead`` with its reason and one
``message_dead`` alert; the normal ones complete meanwhile, and no breaker is
left open. Real PostgreSQL, the real Telegram sandbox, the worker's own loops.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from shared.alerts import AlertType
from shared.breaker import registry as breaker_registry
from shared.db.records import JobStatus, MessageJobKind
from devkit.sandbox import FaultKind
from tests.helpers import RecordingAlerts, wait_until
from tests.test_worker import account_ids, outbound_rows, running_worker, texts_received, worker_cli, worker_env, world_of  # noqa: F401

RETRIES = {"MAX_MESSAGE_RETRIES": "2", "RETRY_BASE_DELAY": "0.2"}


async def _is_dead(row: object) -> bool:
    return (await row)["status"] == "dead"  # type: ignore[misc]


def dead_alerts(alerts: RecordingAlerts) -> list[tuple[AlertType, str, str | None]]:
    return [a for a in alerts.alerts if a[0] is AlertType.MESSAGE_DEAD]


async def test_a_message_telegram_always_fails_is_dead_with_its_reason_and_the_others_go_out(
    worker_env: dict[str, str], database_url: str
) -> None:
    env = {**worker_env, **RETRIES}
    world = world_of(env)
    world.seed_demo()
    world.set_fault(FaultKind.ERROR, method="SendMessage", peer="@carol", error="RPC_CALL_FAIL", error_code=500)
    alerts = RecordingAlerts()
    async with running_worker(env, alerts=alerts) as worker:
        one = (await account_ids(worker))["demo_one"]
        db = worker.db
        assert db is not None
        await db.enqueue_outbound(one, "carol", "the poison one")
        for n in range(3):
            await db.enqueue_outbound(one, "alice" if n % 2 else "bob", f"normal {n}")

        await wait_until(lambda: "normal 0" in texts_received(world, "bob") and "normal 2" in texts_received(world, "bob")
                         and "normal 1" in texts_received(world, "alice"), timeout=20, what="the normal messages")

        async def poison() -> asyncpg.Record:
            return next(r for r in await outbound_rows(database_url) if r["text"] == "the poison one")

        await wait_until(lambda: _is_dead(poison()), timeout=30, what="the poison message dead")
        row = await poison()
        assert row["attempts"] == 3 and "RpcCallFail" in (row["last_error"] or "")
        assert texts_received(world, "carol") == []
        [alert] = dead_alerts(alerts)
        assert f"Message {row['id']}" in alert[1]
        assert not breaker_registry.any_open()


async def test_a_job_telegram_always_fails_is_dead_with_its_reason_and_the_next_jobs_run(
    worker_env: dict[str, str], database_url: str
) -> None:
    env = {**worker_env, **RETRIES}
    world = world_of(env)
    world.seed_demo()
    world.set_fault(FaultKind.ERROR, method="ReadHistory", peer="@carol", error="RPC_CALL_FAIL", error_code=500)
    alerts = RecordingAlerts()
    async with running_worker(env, alerts=alerts) as worker:
        one = (await account_ids(worker))["demo_one"]
        db = worker.db
        assert db is not None
        incoming = world.send_incoming("@carol", "@demo_one", "read me if you can")
        poison = await db.create_message_job(one, MessageJobKind.MARK_READ, {"peer": "carol", "max_id": incoming.id})
        normal = [await db.create_message_job(one, MessageJobKind.SEND, {"peer": "bob", "text": f"job {n}"}) for n in range(2)]

        await wait_until(lambda: all(f"job {n}" in texts_received(world, "bob") for n in range(2)), timeout=20, what="normal jobs")

        async def poison_dead() -> bool:
            job = await db.get_message_job(poison.id)
            return job is not None and job.status is JobStatus.DEAD

        await wait_until(poison_dead, timeout=30, what="the poison job dead")
        dead = await db.get_message_job(poison.id)
        assert dead is not None and "RpcCallFail" in (dead.last_error or "")
        for job in normal:
            done = await db.get_message_job(job.id)
            assert done is not None and done.status is JobStatus.DONE
        [alert] = dead_alerts(alerts)
        assert f"Job {poison.id}" in alert[1] and "RpcCallFail" in alert[1]
        assert not breaker_registry.any_open()


async def test_the_cli_refuses_text_that_cannot_be_stored_with_one_readable_line(tmp_path: Path, database_url: str) -> None:
    env = {"DATABASE_URL": database_url, "SANDBOX": "1", "SANDBOX_DIR": str(tmp_path / "sb"), "DATA_DIR": str(tmp_path / "d"),
           "LANG": "C.UTF-8"}
    # A byte that is not UTF-8 in argv reaches Python as a lone surrogate (PEP 383).
    code, out, err = await worker_cli(env, "send", "--account", "demo_one", "--to", "alice", b"caf\xe9 ok")  # type: ignore[arg-type]

    assert code == 2 and out == ""  # bad input
    [line] = err.strip().splitlines()
    assert line.startswith(
        "error: the text contains a lone surrogate (U+DCE9) at position 3, which is not valid Unicode text"
    ), line
    assert await outbound_rows(database_url) == []


async def test_a_row_refused_by_the_open_storage_breaker_spends_no_attempt(worker_env: dict[str, str], database_url: str) -> None:
    from shared.errors import TransientError

    env = {**worker_env, **RETRIES, "STORAGE_BREAKER_RECOVERY": "60"}
    world = world_of(env)
    world.seed_demo()
    async with running_worker(env) as worker:
        storage = worker.outbound.storage  # type: ignore[union-attr]
        assert storage is not None
        for _ in range(storage.breaker.failure_threshold):  # other rows' downloads failed: the breaker is open
            storage.breaker.record_failure(TransientError("storage unreachable"))
        one = (await account_ids(worker))["demo_one"]
        await worker.db.enqueue_outbound(one, "alice", "a picture", attachments=[{"key": "outbound/any.jpg"}])  # type: ignore[union-attr]

        async def refused() -> bool:
            rows = await outbound_rows(database_url)
            return bool(rows) and "breaker" in (rows[0]["last_error"] or "")

        await wait_until(refused, what="the row refused by the open breaker")
        [row] = await outbound_rows(database_url)
        assert row["status"] == "queued" and row["attempts"] == 0, "no attempt spent; it waits for the breaker"


async def test_a_history_job_telegram_always_fails_is_dead_with_one_alert_and_the_next_job_completes(
    worker_env: dict[str, str], database_url: str
) -> None:
    env = {**worker_env, **RETRIES}
    world = world_of(env)
    demo = world.seed_demo()
    carol, bob = (next(p for p in demo.contacts if p.username == name) for name in ("carol", "bob"))
    world.send_incoming("@bob", "@demo_one", "an old message from bob")
    world.set_fault(FaultKind.ERROR, method="GetHistory", peer="@carol", error="RPC_CALL_FAIL", error_code=500)
    alerts = RecordingAlerts()
    async with running_worker(env, alerts=alerts) as worker:
        one = (await account_ids(worker))["demo_one"]
        db = worker.db
        assert db is not None
        poison = await db.create_history_job(one, carol.id)
        normal = await db.create_history_job(one, bob.id)

        async def status_of(job_id: int) -> asyncpg.Record:
            conn = await asyncpg.connect(database_url)
            try:
                return await conn.fetchrow("select status, last_error from history_sync_jobs where id = $1", job_id)
            finally:
                await conn.close()

        async def settled() -> bool:
            return (await status_of(poison.id))["status"] == "dead" and (await status_of(normal.id))["status"] == "done"

        await wait_until(settled, timeout=30, what="the poison job dead and the normal one done")
        assert "RpcCallFail" in ((await status_of(poison.id))["last_error"] or "")
        dead = [a for a in alerts.alerts if a[0] is AlertType.PROCESSING_FAILED]
        assert [key for _, _, key in dead] == [f"history-dead:{poison.id}"]
