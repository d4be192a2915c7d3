"""Telegram's send limits as Telegram applies them, through the worker's real loops.

FLOOD_WAIT holds every send of the account (other accounts go on) and is
never drawn a second time during the hold; SLOWMODE_WAIT holds one chat;
PEER_FLOOD pauses the account's messages to non-contacts, alerts once and
loses nothing. The sandbox answers as Telegram would and counts its answers.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shared.alerts import AlertType
from devkit.sandbox import FaultKind
from tests.helpers import RecordingAlerts, eventually, wait_until
from tests.test_worker import FAST, account_ids, outbound_rows, running_worker, texts_received, world_of
from worker import Worker

# The holds these tests wait out last several seconds: long enough that the
# checks made during a hold are done before it ends, even on a busy machine
# (they take about 0.5 s; a hold that ended first fails the checks, it does not pass them).
pytestmark = pytest.mark.slow
FLOOD_WAIT = 5
PEER_FLOOD_PAUSE = 4


@pytest.fixture
def worker_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    # One send of an account in flight at a time: the strict policy, where the answer to one
    # send is known before the next starts, so the FLOOD_WAIT answers can be counted exactly.
    return {
        **FAST, "DATABASE_URL": database_url, "SANDBOX_DIR": str(tmp_path / "sandbox"), "DATA_DIR": str(tmp_path / "data"),
        "SEND_IN_FLIGHT_PER_ACCOUNT": "1",
    }


async def _row(database_url: str, text: str) -> asyncpg.Record:
    return next(r for r in await outbound_rows(database_url) if r["text"] == text)


async def _sent_at(database_url: str, text: str) -> datetime | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("select sent_at from messages where text = $1 and status = 'sent'", text)
    finally:
        await conn.close()


async def _hold(database_url: str, label: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow(
            "select h.flood_until, h.limited_until from account_send_holds h join telegram_accounts a on a.id = h.account_id "
            "where a.label = $1",
            label,
        )
    finally:
        await conn.close()


def _outbound_cycles(worker: Worker) -> int:
    return int(worker.runtime.watchdog.get_status()["outbound"]["cycles"])


async def _cycles_pass(worker: Worker, count: int) -> None:
    """Let the outbound loop run ``count`` more cycles (each one reads the holds and claims)."""
    target = _outbound_cycles(worker) + count
    await wait_until(lambda: _outbound_cycles(worker) >= target, what=f"{count} outbound cycles")


async def _account_state(worker: Worker, label: str) -> dict[str, Any]:
    status = await worker.runtime.status()
    return status["accounts"][label]


async def test_a_flood_wait_on_one_chat_holds_every_chat_of_the_account_and_draws_no_second(
    worker_env: dict[str, str], database_url: str
) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        db = worker.db
        assert db is not None
        # Telegram's limit on the account: one message, then FLOOD_WAIT_10 for any chat.
        world.set_flood_limit("account", rate=1 / FLOOD_WAIT, burst=1, account="demo_one")
        await db.enqueue_outbound(ids["demo_one"], "alice", "first, within the limit")
        await wait_until(lambda: "first, within the limit" in texts_received(world, "alice"), what="the first message")
        await db.enqueue_outbound(ids["demo_one"], "alice", "draws the flood wait")
        await wait_until(lambda: _hold(database_url, "demo_one"), what="the account's flood wait stored")
        assert world.limit_answers("demo_one") == {"FLOOD_WAIT": 1}

        await db.enqueue_outbound(ids["demo_one"], "bob", "another chat of the held account")
        await db.enqueue_outbound(ids["demo_two"], "alice", "another account")
        await wait_until(lambda: "another account" in texts_received(world, "alice"), what="the other account's send")
        await _cycles_pass(worker, 3)

        hold = await _hold(database_url, "demo_one")
        assert hold is not None and hold["flood_until"] is not None
        assert world.limit_answers("demo_one") == {"FLOOD_WAIT": 1}, "nothing was sent into the hold"
        assert texts_received(world, "bob") == []
        waiting = await _row(database_url, "another chat of the held account")
        assert (waiting["status"], waiting["attempts"]) == ("queued", 0), "not even tried during the hold"
        other = await eventually(lambda: _sent_at(database_url, "another account"), what="the other account's message marked sent")
        assert other is not None and other < hold["flood_until"], "the other account sent during the hold"
        state = await _account_state(worker, "demo_one")
        assert state["state"] == "flood_wait" and state["flood_wait_until"] is not None

        # The hold ends: both messages go, once each, and not before its end.
        world.clear_flood_limits()
        await wait_until(
            lambda: "another chat of the held account" in texts_received(world, "bob")
            and "draws the flood wait" in texts_received(world, "alice"),
            timeout=FLOOD_WAIT + 15,
            what="the held messages after the flood wait",
        )
        for text in ("draws the flood wait", "another chat of the held account"):
            # Telegram has it; the worker marks it sent when Telegram's answer is back.
            sent_at = await eventually(lambda: _sent_at(database_url, text), what=f"{text!r} marked sent")
            assert sent_at is not None and sent_at >= hold["flood_until"], f"{text!r} went before the hold ended"
        assert texts_received(world, "alice").count("draws the flood wait") == 1
        assert texts_received(world, "bob") == ["another chat of the held account"]
        assert world.limit_answers("demo_one") == {"FLOOD_WAIT": 1}


async def test_the_stored_flood_wait_holds_the_account_in_the_next_process_too(
    worker_env: dict[str, str], database_url: str
) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    world.set_flood_limit("account", rate=1 / 30, burst=1, account="demo_one")
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "uses the one message")
        await worker.db.enqueue_outbound(ids["demo_one"], "bob", "draws FLOOD_WAIT_30")
        await wait_until(lambda: _hold(database_url, "demo_one"), what="the account's flood wait stored")
    assert world.limit_answers("demo_one") == {"FLOOD_WAIT": 1}

    # A new process takes the account over (a restart, a deploy): it keeps to the stored hold.
    async with running_worker(worker_env) as worker:
        await worker.db.enqueue_outbound(ids["demo_one"], "carol", "queued during the hold")
        await worker.db.enqueue_outbound(ids["demo_two"], "carol", "from the other account")
        await wait_until(lambda: "from the other account" in texts_received(world, "carol"), what="the other account's send")
        await _cycles_pass(worker, 3)
        assert world.limit_answers("demo_one") == {"FLOOD_WAIT": 1}
        assert texts_received(world, "carol") == ["from the other account"]
        assert (await _account_state(worker, "demo_one"))["state"] == "flood_wait"


async def test_flood_premium_wait_holds_the_account_like_flood_wait(worker_env: dict[str, str], database_url: str) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        world.set_fault(FaultKind.ERROR, method="SendMessage", peer="@alice", error="FLOOD_PREMIUM_WAIT_60", count=1)
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "draws FLOOD_PREMIUM_WAIT")
        await wait_until(lambda: _hold(database_url, "demo_one"), what="the account's hold stored")
        await worker.db.enqueue_outbound(ids["demo_one"], "bob", "held with the account")
        await _cycles_pass(worker, 3)
        assert texts_received(world, "bob") == []
        assert world.limit_answers("demo_one") == {"FLOOD_PREMIUM_WAIT": 1}
        row = await _row(database_url, "draws FLOOD_PREMIUM_WAIT")
        assert row["status"] == "queued" and "FloodPremiumWait" in (row["last_error"] or "")


async def test_slow_mode_holds_only_its_chat(worker_env: dict[str, str], database_url: str) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        world.set_fault(FaultKind.ERROR, method="SendMessage", peer="@alice", error="SLOWMODE_WAIT_60", count=1)
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "into slow mode")
        await wait_until(lambda: _slowed(database_url), what="slow mode answered")
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "behind it in the same chat")
        await worker.db.enqueue_outbound(ids["demo_one"], "bob", "another chat goes on")
        await wait_until(lambda: "another chat goes on" in texts_received(world, "bob"), what="bob's message")
        await _cycles_pass(worker, 3)

        assert texts_received(world, "alice") == []
        assert await _hold(database_url, "demo_one") is None, "slow mode is no account hold"
        assert world.limit_answers("demo_one") == {"SLOWMODE_WAIT": 1}
        row = await _row(database_url, "into slow mode")
        assert row["status"] == "queued" and "SlowModeWait" in (row["last_error"] or "")
        assert (await _row(database_url, "behind it in the same chat"))["status"] == "queued"
        assert (await _account_state(worker, "demo_one"))["state"] == "connected"


async def test_a_flood_wait_on_resolving_a_username_holds_only_that_chat(worker_env: dict[str, str], database_url: str) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "alice is resolved now")
        await wait_until(lambda: "alice is resolved now" in texts_received(world, "alice"), what="the first message")
        world.create_user("newcomer", first_name="New")
        # Resolving a username has a limit of its own: its wait is no reason to stop the account's sends.
        world.set_fault(FaultKind.FLOOD, method="ResolveUsername", seconds=60, count=1)
        await worker.db.enqueue_outbound(ids["demo_one"], "newcomer", "needs a resolve")
        await wait_until(lambda: _waiting(database_url, "needs a resolve"), what="the resolve's flood wait")
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "alice goes on")
        await wait_until(lambda: "alice goes on" in texts_received(world, "alice"), what="alice's second message")
        assert await _hold(database_url, "demo_one") is None
        assert texts_received(world, "newcomer") == []
        assert world.limit_answers("demo_one") == {"FLOOD_WAIT": 1}


async def _waiting(database_url: str, text: str) -> bool:
    row = await _row(database_url, text)
    return row["status"] == "queued" and bool(row["last_error"])


async def _slowed(database_url: str) -> bool:
    row = await _row(database_url, "into slow mode")
    return row["status"] == "queued" and bool(row["last_error"])


async def test_peer_flood_pauses_messages_to_strangers_alerts_once_and_loses_nothing(
    worker_env: dict[str, str], database_url: str
) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    for name in ("stranger_one", "stranger_two"):
        world.create_user(name, first_name=name)
    alerts = RecordingAlerts()
    env = {**worker_env, "PEER_FLOOD_PAUSE": str(PEER_FLOOD_PAUSE)}
    async with running_worker(env, alerts=alerts) as worker:
        ids = await account_ids(worker)
        # Telegram's spam limit: one cold message, then PEER_FLOOD for any non-contact.
        world.set_flood_limit("non_contacts", rate=0.0001, burst=1, account="demo_one")
        await worker.db.enqueue_outbound(ids["demo_one"], "stranger_one", "a cold message")
        await wait_until(lambda: texts_received(world, "stranger_one") == ["a cold message"], what="the first cold message")
        await worker.db.enqueue_outbound(ids["demo_one"], "stranger_two", "draws PEER_FLOOD")
        await wait_until(
            lambda: any(t is AlertType.ACCOUNT_LIMITED for t, _, _ in alerts.alerts), what="the account_limited alert"
        )
        state = await _account_state(worker, "demo_one")
        assert state["state"] == "limited" and state["limited_until"] is not None
        row = await _row(database_url, "draws PEER_FLOOD")
        assert row["status"] == "queued" and "PEER_FLOOD" in (row["last_error"] or ""), "queued, not failed"

        await worker.db.enqueue_outbound(ids["demo_one"], "stranger_one", "a second cold message")
        await worker.db.enqueue_outbound(ids["demo_one"], "alice", "to a contact")
        await wait_until(lambda: "to a contact" in texts_received(world, "alice"), what="the contact's message")
        assert texts_received(world, "stranger_one") == ["a cold message"]
        assert world.limit_answers("demo_one") == {"PEER_FLOOD": 1}

        # After the pause every message goes, exactly once.
        hold = await _hold(database_url, "demo_one")
        assert hold is not None and hold["limited_until"] is not None
        world.clear_flood_limits()
        await wait_until(
            lambda: texts_received(world, "stranger_two") == ["draws PEER_FLOOD"]
            and texts_received(world, "stranger_one") == ["a cold message", "a second cold message"],
            timeout=PEER_FLOOD_PAUSE + 15,
            what="the paused messages after PEER_FLOOD_PAUSE",
        )
        for text in ("draws PEER_FLOOD", "a second cold message"):
            # Telegram has it; the worker marks it sent when Telegram's answer is back.
            sent_at = await eventually(lambda: _sent_at(database_url, text), what=f"{text!r} marked sent")
            assert sent_at is not None and sent_at >= hold["limited_until"], f"{text!r} went during the pause"
        await wait_until(lambda: (AlertType.ACCOUNT_LIMITED, "limited:demo_one") in alerts.resolved, what="resolved")
        assert [t for t, _, _ in alerts.alerts].count(AlertType.ACCOUNT_LIMITED) == 1
        assert world.limit_answers("demo_one") == {"PEER_FLOOD": 1}
        assert (await _account_state(worker, "demo_one"))["state"] == "connected"
        assert all(r["status"] == "sent" for r in await outbound_rows(database_url))
