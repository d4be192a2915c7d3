"""worker.py against real PostgreSQL and the Telegram sandbox, run in-process.

The worker's own loops, leases and Telethon clients run unchanged; faults are
set in the sandbox world as Telegram would show them. Cases that need a real
process (kill -9, two replicas) live in test_worker_process.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from shared.alerts import AlertType
from shared.config import WorkerSettings, load_settings
from shared.db import DatabaseRejected
from shared.runtime import BotRuntime
from devkit.sandbox import FaultKind, World
from tests.helpers import RecordingAlerts, wait_until
from worker import SoonestRetry, Worker, run_worker

FAST = {
    "PORT": "0",
    "SANDBOX": "1",
    "ACCOUNT_CHECK_INTERVAL": "0.2",
    "ACCOUNT_LEASE_SECONDS": "5",
    "OUTBOUND_POLL_INTERVAL": "0.2",
    "RECONCILE_INTERVAL": "0.3",
    "WATCHDOG_CHECK_INTERVAL": "0.2",
    "WATCHDOG_MAX_SILENCE": "5",
    "WATCHDOG_STARTUP_GRACE": "0",
    "HEARTBEAT_INTERVAL": "0.2",
    "RETRY_BASE_DELAY": "0.2",
    "TIMEOUT_TELEGRAM_SEND": "5",  # above the 2 s Telethon sleeps on any 5xx (RANDOM_ID_DUPLICATE)
    "TIMEOUT_TELEGRAM_ENTITY": "2",
    "TIMEOUT_TELEGRAM_CONNECT": "3",
    "RECONNECT_BACKOFF_MAX": "0.5",
    "SEND_RATE_PER_ACCOUNT": "1000",
    "SEND_BURST_PER_ACCOUNT": "1000",
    "SEND_RATE_PER_CHAT": "1000",
    "SEND_BURST_PER_CHAT": "1000",
    "SHUTDOWN_GRACE": "3",
}


@pytest.fixture
def worker_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {**FAST, "DATABASE_URL": database_url, "SANDBOX_DIR": str(tmp_path / "sandbox"), "DATA_DIR": str(tmp_path / "data")}


@asynccontextmanager
async def running_worker(
    env: dict[str, str], *, alerts: RecordingAlerts | None = None, accounts: int = 2
) -> AsyncIterator[Worker]:
    settings = load_settings(WorkerSettings, env)
    runtime = BotRuntime(bot="worker", settings=settings, host="127.0.0.1", alerts=alerts)
    started: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_worker(settings, runtime, started=started.set_result))
    try:
        await wait_until(lambda: started.done() or task.done(), what="worker ready")
        if task.done():
            task.result()
        worker = started.result()
        await wait_until(lambda: len(worker.pool.connected()) == accounts, what=f"{accounts} sandbox account(s) connected")
        yield worker
    finally:
        runtime.shutdown.request_stop("test over")
        await asyncio.wait_for(task, 20)


def world_of(env: dict[str, str]) -> World:
    return World.open(Path(env["SANDBOX_DIR"]))


async def account_ids(worker: Worker) -> dict[str, int]:
    return {a.label: a.id for a in await worker.db.list_accounts()}


async def outbound_rows(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "select id, peer, text, status, attempts, last_error, telegram_message_id from messages "
            "where direction = 'outbound' and status is not null order by id"
        )
    finally:
        await conn.close()


def texts_received(world: World, peer: str) -> list[str]:
    return [m.text for m in world.received(peer)]


async def test_five_sequential_messages_all_arrive_within_seconds_in_order(worker_env: dict[str, str]) -> None:
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        world = world_of(worker_env)
        started = time.monotonic()
        for n in range(5):
            await worker.db.enqueue_outbound(ids["demo_one"], "alice", f"seq {n}")
        await wait_until(lambda: len(texts_received(world, "alice")) >= 5, timeout=10, what="5 messages at alice")
        assert time.monotonic() - started < 10
        assert texts_received(world, "alice") == [f"seq {n}" for n in range(5)]


async def test_worker_accounts_limits_the_worker_to_the_accounts_it_names(
    worker_env: dict[str, str], database_url: str
) -> None:
    world = world_of(worker_env)
    async with running_worker({**worker_env, "WORKER_ACCOUNTS": "demo_one"}, accounts=1) as worker:
        ids = await account_ids(worker)
        await worker.db.enqueue_outbound(ids["demo_two"], "alice", "for the other process")
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "ours")
        await wait_until(lambda: _status_of(database_url, "ours", "sent"), what="our account's message sent")
        assert [c.label for c in worker.pool.connected()] == ["demo_one"]
        conn = await asyncpg.connect(database_url)
        try:
            leases = dict(await conn.fetch("select label, lease_owner from telegram_accounts order by label"))
        finally:
            await conn.close()

    assert leases["demo_one"] is not None and leases["demo_two"] is None  # left for another process to lease
    assert texts_received(world, "alice") == ["ours"]
    assert await _status_of(database_url, "for the other process", "queued")


async def test_delivered_but_the_answer_lost_gives_exactly_one_message(worker_env: dict[str, str], database_url: str) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        world.set_fault(FaultKind.ANSWER_LOST, method="SendMessage", peer="@bob", count=1, then="drop")
        await worker.db.enqueue_outbound(ids["demo_one"], "bob", "only once please")
        await wait_until(
            lambda: _status_of(database_url, "only once please", "sent"), timeout=20, what="the message marked sent"
        )
        assert texts_received(world, "bob") == ["only once please"]
        rows = [r for r in await outbound_rows(database_url) if r["text"] == "only once please"]
        assert rows[0]["attempts"] >= 2, "the lost answer forced a second attempt"


async def _status_of(database_url: str, text: str, status: str) -> bool:
    return any(r["text"] == text and r["status"] == status for r in await outbound_rows(database_url))


async def test_a_dead_session_on_one_account_does_not_disturb_the_others(worker_env: dict[str, str], database_url: str) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    alerts = RecordingAlerts()
    async with running_worker(worker_env, alerts=alerts) as worker:
        ids = await account_ids(worker)
        world.logout("@demo_two", error="SESSION_REVOKED")
        await worker.db.enqueue_outbound(ids["demo_two"], "alice", "from the revoked account")
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "from the healthy account")
        await wait_until(lambda: "from the healthy account" in texts_received(world, "alice"), what="healthy account's send")
        await wait_until(
            lambda: any(t is AlertType.ACCOUNT_NEEDS_LOGIN for t, _, _ in alerts.alerts), what="needs-login alert"
        )
        accounts = {a.label: a for a in await worker.db.list_accounts()}
        assert accounts["demo_two"].status.value == "needs_login"
        assert accounts["demo_one"].status.value == "active"
        assert "from the revoked account" not in texts_received(world, "alice")
        row = next(r for r in await outbound_rows(database_url) if r["text"] == "from the revoked account")
        assert row["status"] == "queued", "the message waits for a new login; nothing is lost"
        assert sum(1 for t, _, _ in alerts.alerts if t is AlertType.ACCOUNT_NEEDS_LOGIN) == 1
        await worker.db.enqueue_outbound(ids["demo_one"], "bob", "still going")
        await wait_until(lambda: "still going" in texts_received(world, "bob"), what="demo_one keeps sending")


async def test_an_update_gap_is_closed_by_the_reconciler(worker_env: dict[str, str], database_url: str) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        pushed = world.send_incoming("@alice", "@demo_one", "pushed normally")
        await wait_until(lambda: _inbound_ids(database_url, ids["demo_one"]), what="pushed message stored")
        silent = world.send_incoming("@alice", "@demo_one", "never pushed", gap=True)
        await wait_until(
            lambda: _has_inbound(database_url, ids["demo_one"], "never pushed"), timeout=10, what="gap message stored"
        )
        texts = await _inbound_texts(database_url, ids["demo_one"])
        assert texts.count("pushed normally") == 1 and texts.count("never pushed") == 1
        assert silent.id > pushed.id


async def _inbound_texts(database_url: str, account_id: int) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("select text from messages where account_id = $1 and direction = 'inbound'", account_id)
    finally:
        await conn.close()
    return [r["text"] for r in rows]


async def _inbound_ids(database_url: str, account_id: int) -> bool:
    return bool(await _inbound_texts(database_url, account_id))


async def _has_inbound(database_url: str, account_id: int, text: str) -> bool:
    return text in await _inbound_texts(database_url, account_id)


async def test_bad_input_fails_only_that_message_with_a_readable_reason(
    worker_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    world.block("@carol", "@demo_one")
    huge = tmp_path / "huge.bin"
    with huge.open("wb") as handle:  # sparse: 2 GiB + 1 byte on paper, nothing on disk
        handle.truncate(2 * 1024**3 + 1)
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        one = ids["demo_one"]
        db = worker.db
        assert db is not None
        await db.enqueue_outbound(one, "nobody_by_this_name", "to an unknown peer")
        await db.enqueue_outbound(one, "carol", "to a user who blocked us")
        # What Telegram's limits forbid never enters the queue: the SQL function names limit and length.
        with pytest.raises(DatabaseRejected, match="4097 UTF-16 code units, Telegram accepts at most 4096"):
            await db.enqueue_outbound(one, "alice", "x" * 4097)
        with pytest.raises(DatabaseRejected, match="empty message"):
            await db.enqueue_outbound(one, "alice", "   ")
        await db.enqueue_outbound(one, "bob", "with a missing file", attachments=[str(tmp_path / "missing.jpg")])
        await db.enqueue_outbound(one, "bob", "with a huge file", attachments=[str(huge)])
        await db.enqueue_outbound(one, "alice", "the good one")
        await wait_until(
            lambda: _all_settled(database_url, 5), timeout=20, what="every message settled"
        )
        rows = {r["text"][:30]: r for r in await outbound_rows(database_url)}
        reasons = {text: (row["status"], row["last_error"]) for text, row in rows.items()}
        assert reasons["the good one"][0] == "sent"
        assert "the good one" in texts_received(world, "alice")
        expected = {
            "to an unknown peer": "username",
            "to a user who blocked us": "blocked",
            "with a missing file": "not found",
            "with a huge file": "too large",
        }
        for text, fragment in expected.items():
            status, error = reasons[text]
            assert status == "failed", (text, status, error)
            assert fragment in (error or "").lower(), (text, error)


async def test_a_failed_message_requeued_by_the_operator_after_the_fix_is_delivered_once(
    worker_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    photo = tmp_path / "later.jpg"
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        queued = await worker.db.enqueue_outbound(ids["demo_one"], "bob", "the photo", attachments=[str(photo)])
        await wait_until(lambda: _status_of(database_url, "the photo", "failed"), what="failed: the file is missing")

        photo.write_bytes(b"\xff\xd8\xff\xe0 not much of a jpeg, but a file")  # the operator fixes the cause
        code, out, err = await worker_cli(worker_env, "requeue", "--account", "demo_one", "--dry-run")
        assert code == 0, err
        assert f"would requeue {queued.id} to bob (was failed: " in out and "1 message(s) would be requeued" in out
        code, out, err = await worker_cli(worker_env, "requeue", str(queued.id))
        assert code == 0, err
        assert f"requeued {queued.id} to bob" in out
        await wait_until(lambda: _status_of(database_url, "the photo", "sent"), what="sent after the requeue")

    assert texts_received(world, "bob").count("the photo") == 1
    code, _, err = await worker_cli(worker_env, "requeue")
    assert code == 2 and "--all" in err  # never everything by accident


async def worker_cli(env: dict[str, str], *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """``python worker.py ARGS`` against the test's database and sandbox."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "worker.py", *args, cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **env},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def _all_settled(database_url: str, count: int) -> bool:
    rows = await outbound_rows(database_url)
    return len(rows) == count and all(r["status"] in ("sent", "failed", "dead") for r in rows)


async def test_a_send_stuck_past_the_watchdogs_patience_is_cut_and_the_loop_and_heartbeat_go_on(
    worker_env: dict[str, str], database_url: str
) -> None:
    env = {**worker_env, "WATCHDOG_MAX_SILENCE": "1", "TIMEOUT_TELEGRAM_SEND": "600"}
    world = world_of(env)
    world.seed_demo()
    async with running_worker(env) as worker:
        ids = await account_ids(worker)
        world.set_fault(FaultKind.HANG, method="SendMessage")
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "stuck for now")
        watchdog = worker.runtime.watchdog
        await wait_until(lambda: _heartbeat_at(database_url), what="a first heartbeat")
        first_beat = await _heartbeat_at(database_url)
        # The send runs in a chat task of its own: the loop keeps cycling (and claiming for other
        # chats) while it hangs, and cuts it once it is silent past WATCHDOG_MAX_SILENCE.
        cycles = watchdog.get_status()["outbound"]["cycles"]
        await wait_until(lambda: watchdog.get_status()["outbound"]["cycles"] >= cycles + 3, timeout=10, what="outbound cycling")
        await wait_until(lambda: _heartbeat_after(database_url, first_beat), what="heartbeat while stuck")
        world.clear_faults()
        await wait_until(lambda: "stuck for now" in texts_received(world, "alice"), timeout=15, what="delivery after the hang")
        assert texts_received(world, "alice").count("stuck for now") == 1


async def _heartbeat_at(database_url: str) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("select max(last_heartbeat_at) from worker_heartbeats where worker_id like 'telegram-main:%'")
    finally:
        await conn.close()


async def _heartbeat_after(database_url: str, when: Any) -> bool:
    now = await _heartbeat_at(database_url)
    return now is not None and now > when


async def test_the_status_shows_accounts_loops_and_the_sandbox(worker_env: dict[str, str]) -> None:
    async with running_worker(worker_env) as worker:
        status = await worker.runtime.status()
        assert status["sandbox"] is True and status["backend"] == "postgres"
        assert set(status["loops"]) == {"accounts", "sync", "outbound", "history", "jobs"}
        assert status["accounts"]["demo_one"]["connected"] is True
        assert status["accounts"]["demo_one"]["lease"] == "held"


async def test_message_jobs_send_later_edit_delete_and_mark_read(worker_env: dict[str, str], database_url: str) -> None:
    from shared.db.records import JobKind, JobStatus

    world = world_of(worker_env)
    world.seed_demo()
    async with running_worker(worker_env) as worker:
        db = worker.db
        assert db is not None
        ids = await account_ids(worker)
        one = ids["demo_one"]
        send = await db.create_job(one, JobKind.SEND, {"peer": "bob", "text": "scheduled hello"})
        await wait_until(lambda: "scheduled hello" in texts_received(world, "bob"), what="scheduled send")
        sent = next(m for m in world.received("bob") if m.text == "scheduled hello")
        edit = await db.create_job(
            one, JobKind.EDIT, {"peer": "bob", "message_id": sent.id, "text": "edited hello"}
        )
        incoming = world.send_incoming("@bob", "@demo_one", "please read me")
        read = await db.create_job(one, JobKind.MARK_READ, {"peer": "bob", "max_id": incoming.id})
        delete = await db.create_job(one, JobKind.DELETE, {"peer": "bob", "message_ids": [sent.id]})

        async def all_done() -> bool:
            jobs = [await db.get_job(j.id) for j in (send, edit, read, delete)]
            return all(j is not None and j.status is JobStatus.DONE for j in jobs)

        await wait_until(all_done, what="all four jobs done")
        again = await db.create_job(one, JobKind.SEND, {"peer": "bob", "text": "x"}, dedupe_key="once")
        same = await db.create_job(one, JobKind.SEND, {"peer": "bob", "text": "x"}, dedupe_key="once")
        assert again.id == same.id, "a repeated dedupe key schedules one job"
        rows = [r for r in await outbound_rows(database_url) if r["text"] == "scheduled hello"]
        assert len(rows) == 1, "the scheduled send queued exactly one message"


async def test_the_cli_sends_lists_and_logs_in_without_showing_secrets(tmp_path: Path, database_url: str) -> None:
    env = {"DATABASE_URL": database_url, "SANDBOX_DIR": str(tmp_path / "sb"), "DATA_DIR": str(tmp_path / "d")}

    def cli(*args: str, stdin: bytes = b"") -> Awaitable[tuple[int, str, str]]:
        return worker_cli(env, *args, stdin=stdin)

    code, out, err = await cli("send", "--account", "demo_one", "--to", "alice", "hi from the CLI")
    assert code == 0, err
    assert out.strip().isdigit(), "send prints the queued message's id and nothing else"
    code, out, err = await cli("send", "--account", "nobody", "--to", "alice", "x")
    assert code == 2 and err.startswith("error: no account labelled 'nobody'") and err.count("\n") == 1, err
    code, out, err = await cli("login", "--phone", "+15550101001", "--label", "alice_account", stdin=b"12345\n")
    assert code == 0, err
    code, out, err = await cli("accounts", "--json")
    assert code == 0, err
    import json

    listed = {row["label"]: row for row in json.loads(out)}
    assert {"demo_one", "demo_two", "alice_account"} <= set(listed)
    assert listed["alice_account"]["has_session"] is True
    assert "+15550101001" not in out, "phones are shown masked"
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("select session_encrypted from telegram_accounts where label = 'alice_account'")
    finally:
        await conn.close()
    assert stored and stored.startswith("gAAAA"), "the session is stored as a Fernet token"


async def test_rotate_key_re_encrypts_every_session_and_an_interrupted_run_loses_nothing(
    tmp_path: Path, database_url: str
) -> None:
    from shared.cipher import SessionCipher, generate_key

    old, new = generate_key(), generate_key()
    base = {"DATABASE_URL": database_url, "SANDBOX_DIR": str(tmp_path / "sb"), "DATA_DIR": str(tmp_path / "d")}

    async def cli(key: str, *args: str) -> tuple[int, str]:
        code, out, err = await worker_cli({**base, "SESSION_ENCRYPTION_KEY": key}, *args)
        return code, out + err

    code, out = await cli(old, "send", "--account", "demo_one", "--to", "alice", "seeds the accounts")
    assert code == 0, out
    conn = await asyncpg.connect(database_url)
    try:
        # A first rotation that was interrupted after one account:
        label, token = (await conn.fetch("select label, session_encrypted from telegram_accounts order by id limit 1"))[0]
        both = SessionCipher(f"{new},{old}")
        await conn.execute("update telegram_accounts set session_encrypted = $1 where label = $2", both.rotate(token), label)
        code, out = await cli(f"{new},{old}", "rotate-key")
        assert code == 0, out
        assert "1 session(s) re-encrypted" in out
        sessions = [r["session_encrypted"] for r in await conn.fetch("select session_encrypted from telegram_accounts")]
    finally:
        await conn.close()
    only_new = SessionCipher(new)
    assert len(sessions) == 2 and all(only_new.decrypt(s) for s in sessions)
    code, out = await cli(old, "rotate-key")
    assert code == 2 and "NEW_KEY,OLD_KEY" in out


async def test_attachments_from_storage_are_sent_and_a_missing_object_fails_with_its_key(
    worker_env: dict[str, str], database_url: str
) -> None:
    import io

    from PIL import Image

    from shared.storage import open_storage

    world = world_of(worker_env)
    world.seed_demo()
    picture = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(picture, "JPEG")
    async with running_worker(worker_env) as worker:
        storage = await open_storage(worker.settings)
        await storage.put("outbound/teal.jpg", picture.getvalue(), content_type="image/jpeg")
        ids = await account_ids(worker)
        db = worker.db
        assert db is not None
        await db.enqueue_outbound(ids["demo_one"], "alice", "a picture", attachments=[{"key": "outbound/teal.jpg"}])
        await db.enqueue_outbound(ids["demo_one"], "alice", "a lost picture", attachments=["storage:outbound/gone.jpg"])
        await wait_until(lambda: _all_settled(database_url, 2), what="both settled")
        rows = {r["text"]: r for r in await outbound_rows(database_url)}
        assert rows["a picture"]["status"] == "sent"
        received = [m for m in world.received("alice") if m.text == "a picture"]
        assert len(received) == 1 and received[0].media is not None
        assert rows["a lost picture"]["status"] == "failed"
        assert "outbound/gone.jpg" in rows["a lost picture"]["last_error"]
        assert not list((Path(worker_env["DATA_DIR"]) / "tmp").glob("*")), "temporary files are removed"


def _fault_hits(world: World, fault_id: int) -> int:
    return next((int(f["hits"] or 0) for f in world.faults() if f["id"] == fault_id), 0)


async def test_a_timed_out_recipient_lookup_is_retried_as_soon_as_a_timed_out_send(
    worker_env: dict[str, str], database_url: str
) -> None:
    env = {**worker_env, "RETRY_BASE_DELAY": "60", "TIMEOUT_TELEGRAM_ENTITY": "1"}
    world = world_of(env)
    world.seed_demo()
    async with running_worker(env) as worker:
        ids = await account_ids(worker)
        fault = world.set_fault(FaultKind.HANG, method="ResolveUsername", count=1)
        started = time.monotonic()
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "after a slow lookup")
        await wait_until(lambda: _fault_hits(world, fault.id) >= 1, timeout=10, what="the lookup hung")
        await wait_until(lambda: "after a slow lookup" in texts_received(world, "alice"), timeout=15, what="delivery")
        # The lookup's deadline (1 s) + the short retry (2 s) + a poll, far below RETRY_BASE_DELAY (60 s).
        assert time.monotonic() - started < 15
        assert texts_received(world, "alice").count("after a slow lookup") == 1


async def test_one_chats_hung_lookup_never_delays_another_chat(worker_env: dict[str, str], database_url: str) -> None:
    env = {**worker_env, "TIMEOUT_TELEGRAM_ENTITY": "30"}
    world = world_of(env)
    world.seed_demo()
    async with running_worker(env) as worker:
        ids = await account_ids(worker)
        fault = world.set_fault(FaultKind.HANG, method="ResolveUsername", count=1)
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "stuck behind its lookup")
        await wait_until(lambda: _fault_hits(world, fault.id) >= 1, timeout=10, what="alice's lookup hung")
        started = time.monotonic()
        await worker.db.enqueue_outbound(ids["demo_one"], "bob", "not held by alice")
        await wait_until(lambda: "not held by alice" in texts_received(world, "bob"), timeout=10, what="bob's message")
        assert time.monotonic() - started < 10, "bob's message went while alice's lookup (30 s deadline) still hung"
        assert "stuck behind its lookup" not in texts_received(world, "alice")


async def test_a_send_telegram_lost_is_cut_as_soon_as_the_connection_check_is_answered(
    worker_env: dict[str, str], database_url: str
) -> None:
    env = {**worker_env, "TIMEOUT_TELEGRAM_SEND": "600", "WATCHDOG_MAX_SILENCE": "600", "BREAKER_PROBE_INTERVAL": "0.5"}
    world = world_of(env)
    world.seed_demo()
    async with running_worker(env) as worker:
        ids = await account_ids(worker)
        fault = world.set_fault(FaultKind.HANG, method="SendMessage", count=1)
        started = time.monotonic()
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "lost in the outage")
        await wait_until(lambda: _fault_hits(world, fault.id) >= 1, timeout=10, what="the send hung")
        await wait_until(lambda: "lost in the outage" in texts_received(world, "alice"), timeout=20, what="delivery")
        # STUCK_SEND_AFTER (5 s) + a ping answered + the retry, far below the 600 s send deadline.
        assert time.monotonic() - started < 20
        assert texts_received(world, "alice").count("lost in the outage") == 1


async def _leases_lapsed(database_url: str, ids: list[int]) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return bool(await conn.fetchval(
            "select bool_and(lease_expires_at is null or lease_expires_at < now()) from telegram_accounts where id = any($1::bigint[])",
            ids,
        ))
    finally:
        await conn.close()


async def _claimed(database_url: str, texts: list[str]) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("select count(*) from messages where text = any($1::text[]) and status = 'sending'", texts))
    finally:
        await conn.close()


async def _all_sent_of(database_url: str, texts: list[str]) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        sent = await conn.fetchval("select count(*) from messages where text = any($1::text[]) and status = 'sent'", texts)
        return int(sent) == len(texts)
    finally:
        await conn.close()


async def test_rows_claimed_before_a_database_outage_that_outlasts_the_account_lease_go_out_once_it_is_back(
    worker_env: dict[str, str], database_url: str
) -> None:
    """The worker reaches PostgreSQL through a relay that is cut while its rows are claimed and in
    flight; the outage outlasts the account leases, so the accounts are leased again (new lease
    tokens) after it. Each account is owed the take-back of its own claimed rows until then: they
    go out within seconds of the return, not after their message lease (335 s here), each once."""
    from bench._common import TcpProxy, free_port
    from shared.breaker import registry

    url = urlsplit(database_url)
    socket_dir = parse_qs(url.query)["host"][0]
    port = parse_qs(url.query).get("port", ["5432"])[0]
    proxy = await TcpProxy(Path(socket_dir) / f".s.PGSQL.{port}", free_port()).start()
    env = {
        **worker_env,
        "DATABASE_URL": f"postgresql://{url.username or 'postgres'}@127.0.0.1:{proxy.port}{url.path}",
        "TIMEOUT_DB": "1",
        "DB_BREAKER_RECOVERY": "1",
        "BREAKER_PROBE_INTERVAL": "0.2",
        "TIMEOUT_TELEGRAM_MEDIA": "300",  # the message lease: 5 + 300 + 30 s, far past the wait below
    }
    world = world_of(env)
    world.seed_demo()
    try:
        async with running_worker(env) as worker:
            ids = await account_ids(worker)
            accounts = [ids["demo_one"], ids["demo_two"]]
            world.set_fault(FaultKind.LATENCY, method="SendMessage", ms=1500)  # rows claimed and in flight at the cut
            texts = []
            for account in accounts:
                for peer in ("alice", "bob", "carol"):
                    for n in range(2):
                        text = f"claimed before the outage {account} {peer} {n}"
                        await worker.db.enqueue_outbound(account, peer, text)
                        texts.append(text)
            await wait_until(lambda: _at_least(_claimed(database_url, texts), 2), timeout=15, what="rows claimed")
            await proxy.cut()
            await wait_until(lambda: not worker.pool.connected(), timeout=30, what="the accounts let go before their leases lapse")
            await wait_until(lambda: _leases_lapsed(database_url, accounts), timeout=30, what="the account leases lapsed")
            stranded = await _claimed(database_url, texts)
            assert stranded > 0, "claimed rows were left behind by the outage"
            world.clear_faults()
            await proxy.restore()
            # Taken back at once: well within this wait, not after the 335 s message lease.
            await wait_until(lambda: _all_sent_of(database_url, texts), timeout=60, what="every claimed row delivered")
            for account in accounts:
                for peer in ("alice", "bob", "carol"):
                    got = [t for t in texts_received(world, peer) if t.startswith(f"claimed before the outage {account} {peer} ")]
                    assert got == [f"claimed before the outage {account} {peer} {n}" for n in range(2)], "each once, in order"
    finally:
        breaker = registry.get("database")
        if breaker is not None:
            breaker.reset()
        await proxy.close()


async def _at_least(value: Awaitable[int], n: int) -> bool:
    return await value >= n


def test_a_failed_jobs_retry_shortens_the_loops_next_pause_to_when_it_is_due() -> None:
    """A retry 0.2 s away is looked for then, not after the loop's 5 s, even when a NOTIFY woke the
    loop before it; dead jobs and no failure change nothing."""
    from shared.db import JobStatus
    from tests.helpers import FakeClock

    clock = FakeClock()
    retries = SoonestRetry(clock=clock)
    assert retries.pause(5.0) == 5.0
    retries.note(attempts=1, base_delay=0.2, status=JobStatus.PENDING)
    retries.note(attempts=3, base_delay=0.2, status=JobStatus.PENDING)  # 0.8 s: the sooner one counts
    clock.advance(0.05)
    assert retries.pause(5.0) == pytest.approx(0.15)
    clock.advance(0.1)  # woken early (a job_create NOTIFY): the retry is still 0.05 s away
    assert retries.pause(5.0) == pytest.approx(0.05)
    clock.advance(0.06)
    assert retries.pause(5.0) == 5.0, "looked when it was due: nothing due then means the interval again"
    assert retries.pause(5.0) == 5.0
    retries.note(attempts=1, base_delay=60.0, status=JobStatus.PENDING)
    assert retries.pause(5.0) == 5.0, "a retry further away than the interval leaves the interval"
    retries.note(attempts=9, base_delay=0.2, status=JobStatus.DEAD)
    assert retries.pause(2.0) == 2.0

    clock.advance(120)  # the 60 s one passed
    retries.note(attempts=1, base_delay=0.2, status=JobStatus.PENDING)
    clock.advance(0.3)  # due, but the loop found work and did not pause
    retries.note(attempts=2, base_delay=0.2, status=JobStatus.PENDING)
    assert retries.pause(5.0) == pytest.approx(0.4), "the next failure's retry, not the one already passed"
