"""The migration to one jobs table moves the rows of both old job tables, and they run on.

A database is migrated up to the migration before it, given history sync
jobs and message jobs in every state, then migrated to the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import asyncpg

from shared.db import MESSAGE_JOB_KINDS, JobKind, JobStatus, PostgresDatabase, apply_migrations, discover
from tests.fixtures.postgres import PgServer, fresh_breaker

ONE_JOBS_TABLE = "20261204200000"

# Old rows: ids overlap across the two tables (both start at 1).
_OLD_ROWS = """
insert into telegram_accounts (label) values ('main'), ('other');

insert into history_sync_jobs (account_id, chat_id, cursor, target_count, fetched_count, stored_count,
                               status, attempts, run_at, lease_owner, lease_token, lease_expires_at, last_error)
values
    -- a worker died holding it: its lease lapsed, its cursor saved
    ((select id from telegram_accounts where label = 'main'), 555, 900, 300, 100, 98,
     'running', 1, now() - interval '1 hour', 'dead-worker', gen_random_uuid(), now() - interval '1 minute', null),
    ((select id from telegram_accounts where label = 'main'), 777, 0, null, 0, 0,
     'pending', 0, now() - interval '1 minute', null, null, null, null),
    ((select id from telegram_accounts where label = 'other'), 42, 1, null, 5000, 4990,
     'done', 1, now() - interval '1 day', 'w', gen_random_uuid(), null, null);

insert into message_jobs (account_id, kind, payload, dedupe_key, status, attempts, run_at, last_error, result, finished_at)
values
    ((select id from telegram_accounts where label = 'main'), 'send', '{"peer": "alice", "text": "hi"}', 'greeting',
     'pending', 0, now() - interval '1 minute', null, null, null),
    ((select id from telegram_accounts where label = 'main'), 'edit', '{"peer": "alice", "message_id": 9, "text": "fixed"}', null,
     'dead', 6, now() - interval '1 hour', 'FLOOD', null, now()),
    ((select id from telegram_accounts where label = 'other'), 'mark_read', '{"peer": "bob"}', null,
     'done', 1, now() - interval '1 day', null, '{"read": 3}', now()),
    ((select id from telegram_accounts where label = 'main'), 'delete', '{"peer": "alice", "message_ids": [1]}', null,
     'pending', 0, now() + interval '1 day', null, null, null);
"""


async def test_rows_of_both_old_job_tables_move_into_jobs_and_run_on(embedded_pg: PgServer, tmp_path: Path) -> None:
    for migration in discover():
        if migration.version < ONE_JOBS_TABLE:
            shutil.copy(migration.path, tmp_path / migration.path.name)
    dsn = await embedded_pg.create_database(migrated=False)
    try:
        await apply_migrations(dsn, directory=tmp_path)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(_OLD_ROWS)
            old_history = [dict(r) for r in await conn.fetch("select * from history_sync_jobs order by id")]
            old_messages = [dict(r) for r in await conn.fetch("select * from message_jobs order by id")]
            accounts = {r["label"]: r["id"] for r in await conn.fetch("select id, label from telegram_accounts")}
        finally:
            await conn.close()

        report = await apply_migrations(dsn)
        assert ONE_JOBS_TABLE in report.applied

        db = await PostgresDatabase(dsn, timeout=10.0, breaker=fresh_breaker(), poll_interval=0.2).open()
        try:
            moved = {j.id: j for j in await db.list_jobs(limit=100)}
            assert len(moved) == len(old_history) + len(old_messages)

            # Message jobs keep their ids (a send job's outbound row is keyed by it).
            for old in old_messages:
                job = moved[old["id"]]
                assert (job.kind.value, job.payload, job.dedupe_key, job.status.value, job.attempts, job.result) == (
                    old["kind"], _json(old["payload"]), old["dedupe_key"], old["status"], old["attempts"], _json(old["result"]),
                )
                assert (job.run_at, job.created_at, job.finished_at, job.last_error) == (
                    old["run_at"], old["created_at"], old["finished_at"], old["last_error"],
                )
            # History jobs are numbered after them and keep their chat, target and progress.
            offset = max(m["id"] for m in old_messages)
            for old in old_history:
                job = moved[old["id"] + offset]
                assert job.kind is JobKind.HISTORY
                assert (job.account_id, job.chat_id, job.target_count, job.cursor, job.fetched_count, job.stored_count) == (
                    old["account_id"], old["chat_id"], old["target_count"], old["cursor"], old["fetched_count"], old["stored_count"],
                )
                assert (job.status.value, job.attempts, job.lease_token, job.run_at, job.created_at) == (
                    old["status"], old["attempts"], None if old["lease_token"] is None else str(old["lease_token"]),
                    old["run_at"], old["created_at"],
                )

            # They run on: the dead worker's history job resumes at its cursor, then the waiting one.
            main = accounts["main"]
            (resumed,) = await db.claim_jobs([main], [JobKind.HISTORY], owner="new", limit=1, lease_seconds=300)
            assert (resumed.chat_id, resumed.cursor, resumed.attempts) == (555, 900, 2)
            assert resumed.lease_token
            assert await db.save_job_progress(resumed.id, resumed.lease_token, cursor=800, fetched=100, stored=100)
            assert await db.complete_job(resumed.id, resumed.lease_token)
            (waiting,) = await db.claim_jobs([main], [JobKind.HISTORY], owner="new", limit=5)
            assert waiting.chat_id == 777
            done = await db.get_job(resumed.id)
            assert done is not None and (done.status, done.fetched_count) == (JobStatus.DONE, 200)

            # The due send runs once; its dedupe key still holds; the dead edit can be requeued.
            (send,) = await db.claim_jobs([main], MESSAGE_JOB_KINDS, owner="new")
            assert send.kind is JobKind.SEND and send.lease_token
            assert await db.complete_job(send.id, send.lease_token, result={"message_id": 1})
            assert (await db.create_job(main, JobKind.SEND, {"peer": "alice", "text": "hi"}, dedupe_key="greeting")).id == send.id
            dead_edit = next(m["id"] for m in old_messages if m["kind"] == "edit")
            (requeued,) = await db.requeue_jobs([dead_edit])
            assert requeued.status is JobStatus.PENDING

            # A new job is numbered after every moved one; the old tables and functions are gone.
            fresh = await db.create_job(main, JobKind.HISTORY, {"chat_id": 1})
            assert fresh.id > max(moved)
        finally:
            await db.close()
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("select to_regclass('public.history_sync_jobs')") is None
            assert await conn.fetchval("select to_regclass('public.message_jobs')") is None
            left = await conn.fetch(
                "select proname from pg_proc where pronamespace = 'public'::regnamespace"
                " and (proname like 'history_job%' or proname like 'message_job%')"
            )
            assert left == []
        finally:
            await conn.close()
    finally:
        if embedded_pg.drop_after_test:
            await embedded_pg.drop_database(dsn)


def _json(value: object) -> object:
    return json.loads(value) if isinstance(value, str) else value
