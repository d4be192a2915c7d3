"""A flood wait outlives the process that drew it: real ``python worker.py`` processes and kill -9.

The account's hold is stored, so the next process that takes the account
keeps to it instead of drawing the next FLOOD_WAIT; the sandbox counts every
FLOOD_WAIT it answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.sandbox import World
from tests.test_worker_process import WorkerProcess, account_id, accounts_connected, enqueue, env, fetch, wait_until  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.process]

#: Long enough that the second process is up and holds demo_one well within the hold (the test
#: checks that it does: otherwise it would prove nothing).
FLOOD_WAIT = 10


async def _row(database_url: str, text: str) -> dict | None:
    rows = await fetch(database_url, "select status, last_error, sent_at from messages where text = $1", text)
    return dict(rows[0]) if rows else None


async def _is_sent(database_url: str, text: str) -> bool:
    row = await _row(database_url, text)
    return row is not None and row["status"] == "sent"


async def _held_by(database_url: str, pid: int) -> bool:
    """Both accounts are leased by the process ``pid`` (lease owners are ``worker:host:pid:...``)."""
    rows = await fetch(
        database_url,
        "select count(*) as n from telegram_accounts where split_part(lease_owner, ':', 3) = $1 and lease_expires_at > now()",
        str(pid),
    )
    return rows[0]["n"] == 2


async def _within_the_hold(database_url: str, label: str) -> bool:
    rows = await fetch(
        database_url,
        "select h.flood_until > now() as holding from account_send_holds h join telegram_accounts a on a.id = h.account_id "
        "where a.label = $1",
        label,
    )
    return bool(rows) and rows[0]["holding"]


async def _flood_until(database_url: str, label: str) -> object | None:
    rows = await fetch(
        database_url,
        "select h.flood_until from account_send_holds h join telegram_accounts a on a.id = h.account_id where a.label = $1",
        label,
    )
    return rows[0]["flood_until"] if rows else None


def _received(world: World, peer: str) -> list[str]:
    return [m.text for m in world.received(peer)]


async def test_the_next_process_keeps_to_a_flood_wait_drawn_before_a_kill_9(
    env: dict[str, str], database_url: str, tmp_path: Path  # noqa: F811
) -> None:
    env = {**env, "SEND_IN_FLIGHT_PER_ACCOUNT": "1"}  # the strict policy: FLOOD_WAIT answers counted exactly
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    first = await WorkerProcess(env, tmp_path / "first.log").start()
    second: WorkerProcess | None = None
    try:
        await wait_until(lambda: accounts_connected(database_url), timeout=30, what="accounts leased", proc=first)
        one, two = await account_id(database_url, "demo_one"), await account_id(database_url, "demo_two")
        world.set_flood_limit("account", rate=1 / FLOOD_WAIT, burst=1, account="demo_one")
        await enqueue(database_url, one, "alice", "within the limit")
        await wait_until(lambda: _received(world, "alice") == ["within the limit"], timeout=15, what="the first send", proc=first)
        await enqueue(database_url, one, "alice", "draws the flood wait")

        async def flooded() -> bool:
            row = await _row(database_url, "draws the flood wait")
            return bool(row and row["status"] == "queued" and row["last_error"]) and await _flood_until(database_url, "demo_one") is not None

        await wait_until(flooded, timeout=15, what="the flood wait stored and the row back in the queue", proc=first)
        first.kill9()

        await enqueue(database_url, one, "bob", "queued while no process runs")
        second = await WorkerProcess(env, tmp_path / "second.log").start()
        assert second.proc is not None
        pid = second.proc.pid
        await wait_until(lambda: _held_by(database_url, pid), timeout=30, what="accounts leased by the second process", proc=second)
        await enqueue(database_url, two, "carol", "the other account goes on")
        await wait_until(
            lambda: "the other account goes on" in _received(world, "carol"), timeout=15, what="demo_two's send", proc=second
        )
        assert world.limit_answers("demo_one") == {"FLOOD_WAIT": 1}
        assert await _within_the_hold(database_url, "demo_one"), "the second process had demo_one while the hold lasted"

        # From here a send into the hold would succeed: its time would give it away.
        world.clear_flood_limits()
        flood_until = await _flood_until(database_url, "demo_one")
        await wait_until(
            lambda: "draws the flood wait" in _received(world, "alice") and _received(world, "bob"),
            timeout=FLOOD_WAIT + 30,
            what="the held messages after the flood wait",
            proc=second,
        )
        for text in ("draws the flood wait", "queued while no process runs"):
            # Telegram has it; the worker marks it sent when Telegram's answer is back.
            await wait_until(lambda text=text: _is_sent(database_url, text), timeout=15, what=f"{text!r} marked sent", proc=second)
            row = await _row(database_url, text)
            assert row is not None and row["status"] == "sent"
            assert row["sent_at"] >= flood_until, f"{text!r} went during the flood wait"
        assert _received(world, "alice") == ["within the limit", "draws the flood wait"]
        assert _received(world, "bob") == ["queued while no process runs"]
        assert world.limit_answers("demo_one") == {"FLOOD_WAIT": 1}
        assert await second.stop() == 0
    finally:
        await first.reap()
        if second is not None:
            await second.reap()
