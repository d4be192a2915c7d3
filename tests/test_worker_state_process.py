"""worker.py as real processes across restarts: the session state in the database closes the gaps.

Messages that arrive while the worker is down are found after the restart
(from the saved update state, or by the dialog scan when that state is gone
or too old), and chats seen before are reachable by numeric id, on a sandbox
that refuses a missing access hash as Telegram does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.sandbox import World
from tests.test_worker_process import WorkerProcess, account_id, accounts_connected, enqueue, fetch, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.process]


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
        # One reconcile pass, the one every connect makes: whatever is stored is stored by it or by catch_up.
        "RECONCILE_INTERVAL": "3600",
        "RECONCILE_WINDOW": "60",
        "LOG_LEVEL": "INFO",
    }


async def stored_texts(database_url: str, account: int) -> list[str]:
    rows = await fetch(database_url, "select text from messages where account_id = $1 and direction = 'inbound'", account)
    return [r["text"] for r in rows]


async def run_until_stored(env: dict[str, str], log: Path, database_url: str, account: int, texts: set[str]) -> WorkerProcess:
    proc = await WorkerProcess(env, log).start()

    async def all_there() -> bool:
        return texts <= set(await stored_texts(database_url, account))

    await wait_until(all_there, timeout=40, what=f"{sorted(texts)} stored", proc=proc)
    return proc


@pytest.mark.parametrize("gap", ["saved_state", "state_deleted", "too_long"])
async def test_messages_written_while_the_worker_was_down_are_stored_once_after_the_restart(
    gap: str, env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    quiet = world.create_user("quiet_one")  # not a contact: reachable only with the access hash
    group = world.create_channel("Quiet Group", megagroup=True, creator="operator", members=["demo_one"])
    world.send_incoming(quiet, "demo_one", "hello, long ago")
    world.send_incoming("operator", group, "group, long ago")
    first = await WorkerProcess(env, tmp_path / "first.log").start()
    second: WorkerProcess | None = None
    try:
        await wait_until(lambda: accounts_connected(database_url), timeout=30, what="accounts leased", proc=first)
        acct = await account_id(database_url, "demo_one")
        for text in ("hello, long ago", "group, long ago"):
            await wait_until(lambda text=text: _has(database_url, acct, text), timeout=30, what=f"{text!r} stored", proc=first)
        assert await first.stop() == 0
        # The quiet chat's last message is older than RECONCILE_WINDOW: the reconciler alone skips it.
        await fetch(database_url, "update chats set last_message_at = now() - interval '2 days' where account_id = $1", acct)
        newcomer = world.create_user("newcomer")
        world.send_incoming(newcomer, "demo_one", "hi, first time here")
        world.send_incoming(quiet, "demo_one", "me again, after a while")
        for n in (1, 2):
            world.send_incoming("operator", group, f"group again {n}")
        if gap == "state_deleted":
            await fetch(database_url, "delete from telegram_update_state")
        elif gap == "too_long":
            world.set_difference_limits(max_pts=1)

        missed = {"hi, first time here", "me again, after a while", "group again 1", "group again 2"}
        second = await run_until_stored(env, tmp_path / "second.log", database_url, acct, missed)
        texts = await stored_texts(database_url, acct)
        for text in ("hello, long ago", "group, long ago", *missed):
            assert texts.count(text) == 1, f"{text!r} stored {texts.count(text)} times"
        scanned = "reading the dialogs for what was missed" in second.output()
        assert scanned is (gap != "saved_state"), second.output()[-3000:]
    finally:
        await first.reap()
        if second is not None:
            await second.reap()


async def _has(database_url: str, account: int, text: str) -> bool:
    return text in await stored_texts(database_url, account)


async def test_after_a_restart_chats_seen_before_work_by_numeric_id_and_unseen_ones_fail_with_what_to_do(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    seen = world.create_user("seen_before")
    group = world.create_channel("Seen Group", megagroup=True, creator="operator", members=["demo_one"])
    ghost = world.create_user("never_seen")
    world.send_incoming(seen, "demo_one", "remember me")
    first = await WorkerProcess(env, tmp_path / "first.log").start()
    second: WorkerProcess | None = None
    try:
        await wait_until(lambda: accounts_connected(database_url), timeout=30, what="accounts leased", proc=first)
        acct = await account_id(database_url, "demo_one")
        assert await fetch(database_url, "select 1 from telegram_update_state where account_id = $1", acct) == [], (
            "the stored session is in the old format: an auth key and nothing else"
        )
        world.send_incoming("operator", group, "in the group")
        await wait_until(lambda: _has(database_url, acct, "remember me"), timeout=30, what="the user's message", proc=first)
        await wait_until(lambda: _has(database_url, acct, "in the group"), timeout=30, what="the group's message", proc=first)
        assert await first.stop() == 0
        upgraded = await fetch(database_url, "select entity_id from telegram_update_state where account_id = $1", acct)
        assert 0 in {r["entity_id"] for r in upgraded}, "upgraded on first use: the update state is saved"

        second = await WorkerProcess(env, tmp_path / "second.log").start()
        await wait_until(lambda: accounts_connected(database_url), timeout=30, what="accounts leased again", proc=second)
        await enqueue(database_url, acct, str(seen.id), "to a user seen before")
        await enqueue(database_url, acct, str(group.marked_id), "to a group seen before")
        await fetch(database_url, "select * from history_job_create(p_account_id => $1, p_chat_id => $2)", acct, seen.id)
        await enqueue(database_url, acct, str(ghost.id), "to a user never seen")
        await fetch(database_url, "select * from history_job_create(p_account_id => $1, p_chat_id => $2)", acct, ghost.id)

        async def settled() -> bool:
            rows = await fetch(database_url, "select status from messages where status is not null")
            jobs = await fetch(database_url, "select status from history_sync_jobs")
            return all(r["status"] in ("sent", "failed") for r in rows) and all(j["status"] in ("done", "failed") for j in jobs)

        await wait_until(settled, timeout=40, what="every message and job settled", proc=second)
        outbound = {r["peer"]: r for r in await fetch(database_url, "select peer, status, last_error from messages where status is not null")}
        jobs = {r["chat_id"]: r for r in await fetch(database_url, "select chat_id, status, last_error from history_sync_jobs")}
        assert outbound[str(seen.id)]["status"] == "sent"
        assert outbound[str(group.marked_id)]["status"] == "sent"
        assert jobs[seen.id]["status"] == "done"
        assert [m.text for m in world.received(seen)] == ["to a user seen before"]
        assert "to a group seen before" in [m.text for m in world.history("operator", group)]
        for failed in (outbound[str(ghost.id)], jobs[ghost.id]):
            assert failed["status"] == "failed"
            assert "address it by @username or phone number, or wait until the chat writes" in failed["last_error"]
        log = second.output()
        assert "is not known to demo_one yet; reading the dialogs first" in log
        assert world.received(ghost) == []
    finally:
        await first.reap()
        if second is not None:
            await second.reap()
