"""Jobs of every kind (history sync, scheduled message work): one table, claimed with leases, fenced by their tokens."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.db import MESSAGE_JOB_KINDS, Database, DatabaseRejected, JobKind, JobStatus, utc_now
from tests.shared.db.polling import eventually


async def test_history_job_saves_its_cursor_under_its_lease_and_completes(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    job = await backend_db.create_job(account, JobKind.HISTORY, {"chat_id": 555, "target_count": 300})
    assert (await backend_db.create_job(account, JobKind.HISTORY, {"chat_id": 555})).id == job.id, "one open job per chat"
    (claimed,) = await backend_db.claim_jobs([account], [JobKind.HISTORY], owner="w")
    assert claimed.status is JobStatus.RUNNING and claimed.lease_token
    assert await backend_db.save_job_progress(claimed.id, claimed.lease_token, cursor=900, fetched=100, stored=98)
    assert await backend_db.save_job_progress(claimed.id, claimed.lease_token, cursor=800, fetched=100, stored=100)
    assert await backend_db.complete_job(claimed.id, claimed.lease_token)
    done = await backend_db.get_job(job.id)
    assert done is not None
    assert (done.status, done.cursor, done.fetched_count, done.stored_count) == (JobStatus.DONE, 800, 200, 198)
    assert done.finished_at is not None
    assert (await backend_db.create_job(account, JobKind.HISTORY, {"chat_id": 555})).id != job.id, "a finished job does not block a new one"


async def test_history_job_of_a_dead_worker_resumes_from_its_cursor_and_the_zombie_is_fenced(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    await backend_db.create_job(account, JobKind.HISTORY, {"chat_id": 555})
    (zombie,) = await backend_db.claim_jobs([account], [JobKind.HISTORY], owner="a", lease_seconds=0.05)
    assert zombie.lease_token
    assert await backend_db.save_job_progress(zombie.id, zombie.lease_token, cursor=500, fetched=50, lease_seconds=0.05)
    (resumed,) = await eventually(lambda: backend_db.claim_jobs([account], [JobKind.HISTORY], owner="b"))
    assert resumed.cursor == 500 and resumed.attempts == 2
    assert await backend_db.save_job_progress(zombie.id, zombie.lease_token, cursor=400) is False
    assert await backend_db.complete_job(zombie.id, zombie.lease_token) is False
    assert await backend_db.fail_job(zombie.id, zombie.lease_token, "late", permanent=True) is None


async def test_failed_history_job_retries_with_backoff_then_dies(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    await backend_db.create_job(account, JobKind.HISTORY, {"chat_id": 1})
    (job,) = await backend_db.claim_jobs([account], [JobKind.HISTORY], owner="w", max_retries=1)
    assert job.lease_token
    assert await backend_db.fail_job(job.id, job.lease_token, "timeout", permanent=False, max_retries=1, base_delay=0.01) is JobStatus.PENDING
    (again,) = await eventually(lambda: backend_db.claim_jobs([account], [JobKind.HISTORY], owner="w", max_retries=1))
    assert again.lease_token
    assert await backend_db.fail_job(again.id, again.lease_token, "timeout 2", permanent=False, max_retries=1) is JobStatus.DEAD
    assert await backend_db.release_jobs([again.id], again.lease_token) == 0


async def test_message_job_runs_when_due_once_and_keeps_its_result(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    later = await backend_db.create_job(account, JobKind.SEND, {"peer": "alice", "text": "hi"}, run_at=utc_now() + timedelta(hours=1))
    now = await backend_db.create_job(account, JobKind.EDIT, {"chat_id": 5, "message_id": 9, "text": "fixed"}, dedupe_key="edit-5-9")
    assert (await backend_db.create_job(account, JobKind.EDIT, {}, dedupe_key="edit-5-9")).id == now.id
    claimed = await backend_db.claim_jobs([account], MESSAGE_JOB_KINDS, owner="w")
    assert [j.id for j in claimed] == [now.id]
    job = claimed[0]
    assert job.kind is JobKind.EDIT and job.payload == {"chat_id": 5, "message_id": 9, "text": "fixed"}
    assert job.lease_token
    assert await backend_db.complete_job(job.id, job.lease_token, result={"edited": True})
    assert await backend_db.claim_jobs([account], MESSAGE_JOB_KINDS, owner="w") == []
    done = await backend_db.get_job(job.id)
    assert done is not None and done.status is JobStatus.DONE and done.result == {"edited": True}
    pending = await backend_db.get_job(later.id)
    assert pending is not None and pending.status is JobStatus.PENDING


async def test_message_job_failures_are_fenced_retried_and_released(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    first = await backend_db.create_job(account, JobKind.DELETE, {"chat_id": 5, "ids": [1, 2]})
    second = await backend_db.create_job(account, JobKind.MARK_READ, {"chat_id": 5})
    jobs = await backend_db.claim_jobs([account], MESSAGE_JOB_KINDS, owner="w")
    token = jobs[0].lease_token
    assert token and [j.id for j in jobs] == [first.id, second.id]
    assert await backend_db.fail_job(first.id, token, "MESSAGE_DELETE_FORBIDDEN", permanent=True) is JobStatus.FAILED
    assert await backend_db.release_jobs([second.id], token) == 1
    assert await backend_db.fail_job(second.id, "00000000-0000-0000-0000-000000000000", "x", permanent=False) is None
    (again,) = await backend_db.claim_jobs([account], MESSAGE_JOB_KINDS, owner="w")
    assert again.id == second.id and again.attempts == 1


async def test_a_claim_takes_only_the_kinds_it_asks_for(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    history = await backend_db.create_job(account, JobKind.HISTORY, {"chat_id": 7})
    send = await backend_db.create_job(account, JobKind.SEND, {"peer": "alice", "text": "hi"})
    assert [j.id for j in await backend_db.claim_jobs([account], MESSAGE_JOB_KINDS, owner="jobs")] == [send.id]
    (claimed,) = await backend_db.claim_jobs([account], [JobKind.HISTORY], owner="history", limit=5)
    assert (claimed.id, claimed.chat_id, claimed.target_count) == (history.id, 7, None)


async def test_a_history_job_needs_a_chat(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    with pytest.raises(DatabaseRejected):
        await backend_db.create_job(account, JobKind.HISTORY, {"target_count": 5})


async def test_requeue_gives_a_dead_job_fresh_attempts_and_leaves_others_alone(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    doomed = await backend_db.create_job(account, JobKind.MARK_READ, {"peer": "alice"})
    waiting = await backend_db.create_job(account, JobKind.SEND, {"peer": "alice", "text": "later"}, run_at=utc_now() + timedelta(hours=1))
    (job,) = await backend_db.claim_jobs([account], MESSAGE_JOB_KINDS, owner="w", max_retries=0)
    assert job.lease_token
    assert await backend_db.fail_job(job.id, job.lease_token, "boom", permanent=False, max_retries=0) is JobStatus.DEAD
    requeued = {j.id: j for j in await backend_db.requeue_jobs([doomed.id, waiting.id])}
    assert (requeued[doomed.id].status, requeued[doomed.id].attempts) == (JobStatus.PENDING, 0)
    assert requeued[waiting.id].run_at == waiting.run_at, "a job that did not fail is not touched"
    (again,) = await backend_db.claim_jobs([account], MESSAGE_JOB_KINDS, owner="w")
    assert again.id == doomed.id and again.attempts == 1


async def test_jobs_are_listed_newest_first_across_pages_by_status_and_kind(backend_db: Database) -> None:
    backend_db.page_size = 2
    account = (await backend_db.upsert_account("main")).id
    made = [await backend_db.create_job(account, JobKind.HISTORY, {"chat_id": n}) for n in range(3)]
    made += [await backend_db.create_job(account, JobKind.SEND, {"peer": "bob", "text": str(n)}) for n in range(3)]
    everything = await backend_db.list_jobs(limit=100)
    assert [j.id for j in everything] == sorted((j.id for j in made), reverse=True)
    history = await backend_db.list_jobs(kinds=[JobKind.HISTORY], limit=100)
    assert [j.chat_id for j in history] == [2, 1, 0]
    assert len(await backend_db.list_jobs(limit=5)) == 5
    assert await backend_db.list_jobs(statuses=[JobStatus.DONE]) == []
