"""History sync jobs and scheduled message jobs: claimed with leases, fenced by their tokens."""

from __future__ import annotations

from datetime import timedelta

from shared.db import Database, JobStatus, MessageJobKind, utc_now
from tests.shared.db.polling import eventually


async def test_history_job_saves_its_cursor_under_its_lease_and_completes(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    job = await backend_db.create_history_job(account, 555, target_count=300)
    assert (await backend_db.create_history_job(account, 555)).id == job.id, "one open job per chat"
    (claimed,) = await backend_db.claim_history_jobs([account], owner="w")
    assert claimed.status is JobStatus.RUNNING and claimed.lease_token
    assert await backend_db.save_history_cursor(claimed.id, claimed.lease_token, cursor=900, fetched=100, stored=98)
    assert await backend_db.save_history_cursor(claimed.id, claimed.lease_token, cursor=800, fetched=100, stored=100)
    assert await backend_db.complete_history_job(claimed.id, claimed.lease_token)
    done = await backend_db.get_history_job(job.id)
    assert done is not None
    assert (done.status, done.cursor, done.fetched_count, done.stored_count) == (JobStatus.DONE, 800, 200, 198)
    assert done.finished_at is not None
    assert (await backend_db.create_history_job(account, 555)).id != job.id, "a finished job does not block a new one"


async def test_history_job_of_a_dead_worker_resumes_from_its_cursor_and_the_zombie_is_fenced(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    await backend_db.create_history_job(account, 555)
    (zombie,) = await backend_db.claim_history_jobs([account], owner="a", lease_seconds=0.05)
    assert zombie.lease_token
    assert await backend_db.save_history_cursor(zombie.id, zombie.lease_token, cursor=500, fetched=50, lease_seconds=0.05)
    (resumed,) = await eventually(lambda: backend_db.claim_history_jobs([account], owner="b"))
    assert resumed.cursor == 500 and resumed.attempts == 2
    assert await backend_db.save_history_cursor(zombie.id, zombie.lease_token, cursor=400) is False
    assert await backend_db.complete_history_job(zombie.id, zombie.lease_token) is False
    assert await backend_db.fail_history_job(zombie.id, zombie.lease_token, "late", permanent=True) is None


async def test_failed_history_job_retries_with_backoff_then_dies(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    await backend_db.create_history_job(account, 1)
    (job,) = await backend_db.claim_history_jobs([account], owner="w", max_retries=1)
    assert job.lease_token
    assert await backend_db.fail_history_job(job.id, job.lease_token, "timeout", permanent=False, max_retries=1, base_delay=0.01) is JobStatus.PENDING
    (again,) = await eventually(lambda: backend_db.claim_history_jobs([account], owner="w", max_retries=1))
    assert again.lease_token
    assert await backend_db.fail_history_job(again.id, again.lease_token, "timeout 2", permanent=False, max_retries=1) is JobStatus.DEAD
    assert await backend_db.release_history_job(again.id, again.lease_token) is False


async def test_message_job_runs_when_due_once_and_keeps_its_result(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    later = await backend_db.create_message_job(account, MessageJobKind.SEND, {"peer": "alice", "text": "hi"}, run_at=utc_now() + timedelta(hours=1))
    now = await backend_db.create_message_job(account, MessageJobKind.EDIT, {"chat_id": 5, "message_id": 9, "text": "fixed"}, dedupe_key="edit-5-9")
    assert (await backend_db.create_message_job(account, MessageJobKind.EDIT, {}, dedupe_key="edit-5-9")).id == now.id
    claimed = await backend_db.claim_message_jobs([account], owner="w")
    assert [j.id for j in claimed] == [now.id]
    job = claimed[0]
    assert job.kind is MessageJobKind.EDIT and job.payload == {"chat_id": 5, "message_id": 9, "text": "fixed"}
    assert job.lease_token
    assert await backend_db.complete_message_job(job.id, job.lease_token, result={"edited": True})
    assert await backend_db.claim_message_jobs([account], owner="w") == []
    done = await backend_db.get_message_job(job.id)
    assert done is not None and done.status is JobStatus.DONE and done.result == {"edited": True}
    pending = await backend_db.get_message_job(later.id)
    assert pending is not None and pending.status is JobStatus.PENDING


async def test_message_job_failures_are_fenced_retried_and_released(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    first = await backend_db.create_message_job(account, MessageJobKind.DELETE, {"chat_id": 5, "ids": [1, 2]})
    second = await backend_db.create_message_job(account, MessageJobKind.MARK_READ, {"chat_id": 5})
    jobs = await backend_db.claim_message_jobs([account], owner="w")
    token = jobs[0].lease_token
    assert token and [j.id for j in jobs] == [first.id, second.id]
    assert await backend_db.fail_message_job(first.id, token, "MESSAGE_DELETE_FORBIDDEN", permanent=True) is JobStatus.FAILED
    assert await backend_db.release_message_jobs([second.id], token) == 1
    assert await backend_db.fail_message_job(second.id, "00000000-0000-0000-0000-000000000000", "x", permanent=False) is None
    (again,) = await backend_db.claim_message_jobs([account], owner="w")
    assert again.id == second.id and again.attempts == 1
