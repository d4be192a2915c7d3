"""worker.py as real processes: kill -9, two replicas, a killed history job, a network outage.

The sandbox world is the ground truth: it lists exactly what each peer
received, duplicates included.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from devkit.sandbox import FaultKind, World
from tests.helpers import wait_until as shared_wait_until
from tests.test_worker import FAST

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


class WorkerProcess:
    """One ``python worker.py`` with its output in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> WorkerProcess:
        handle = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "worker.py", cwd=ROOT, env={**os.environ, **self.env}, stdout=handle, stderr=handle
        )
        handle.close()
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    async def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def reap(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def death(self) -> str | None:
        """Why this process is gone (its exit code and last output), or None while it runs."""
        if self.proc is not None and self.proc.returncode is not None:
            return f"the worker exited with {self.proc.returncode}\n{self.output()[-3000:]}"
        return None


async def wait_until(condition: Callable[[], Any], *, timeout: float, what: str, proc: WorkerProcess | None = None) -> None:
    await shared_wait_until(
        condition,
        timeout=timeout,
        what=what,
        poll=0.05,
        gone=proc.death if proc else None,
        context=(lambda: proc.output()[-3000:]) if proc else None,
    )


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {
        **FAST,
        "DATABASE_URL": database_url,
        "SANDBOX_DIR": str(tmp_path / "sandbox"),
        "DATA_DIR": str(tmp_path / "data"),
        "ACCOUNT_LEASE_SECONDS": "3",
        "LOG_LEVEL": "INFO",
    }


async def fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def _one_each(database_url: str) -> bool:
    rows = await fetch(
        database_url,
        "select count(distinct lease_owner) as owners, count(*) as n from telegram_accounts "
        "where lease_owner is not null and lease_expires_at > now()",
    )
    return rows[0]["owners"] == 2 and rows[0]["n"] == 2


async def accounts_connected(database_url: str) -> bool:
    rows = await fetch(database_url, "select count(*) as n from telegram_accounts where lease_owner is not null and lease_expires_at > now()")
    return rows[0]["n"] == 2


async def account_id(database_url: str, label: str) -> int:
    return (await fetch(database_url, "select id from telegram_accounts where label = $1", label))[0]["id"]


async def enqueue(database_url: str, account: int, peer: str, text: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "select * from outbound_enqueue(p_account_id => $1, p_peer => $2, p_text => $3, p_attachments => '[]'::jsonb)",
            account,
            peer,
            text,
        )
    finally:
        await conn.close()


async def all_sent(database_url: str, count: int) -> bool:
    rows = await fetch(database_url, "select count(*) filter (where status = 'sent') as sent from messages where status is not null")
    return rows[0]["sent"] >= count


def deliveries(world: World, peers: list[str]) -> dict[tuple[int | None, str], list[str]]:
    """What each peer received, per sender, in arrival order."""
    out: dict[tuple[int | None, str], list[str]] = defaultdict(list)
    for peer in peers:
        for message in world.received(peer):
            out[(message.sender_id, peer)].append(message.text)
    return out


async def test_kill_9_mid_batch_then_restart_delivers_each_message_once_and_in_order(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    first = await WorkerProcess(env, tmp_path / "first.log").start()
    second: WorkerProcess | None = None
    try:
        await wait_until(lambda: accounts_connected(database_url), timeout=30, what="accounts leased", proc=first)
        world.set_fault(FaultKind.LATENCY, method="SendMessage", ms=40)
        peers = ["alice", "bob", "carol"]
        expected: dict[tuple[str, str], list[str]] = {}
        for label in ("demo_one", "demo_two"):
            acct = await account_id(database_url, label)
            for peer in peers:
                texts = [f"{label}->{peer} #{n:03d}" for n in range(34)]
                expected[(label, peer)] = texts
                for text in texts:
                    await enqueue(database_url, acct, peer, text)
        total = sum(len(t) for t in expected.values())
        assert total >= 200
        await wait_until(
            lambda: sum(len(world.received(p)) for p in peers) >= 60, timeout=30, what="a third delivered", proc=first
        )
        first.kill9()
        await first.proc.wait()  # type: ignore[union-attr]
        world.clear_faults()
        second = await WorkerProcess(env, tmp_path / "second.log").start()
        await wait_until(lambda: all_sent(database_url, total), timeout=60, what="everything sent after restart", proc=second)
        got = deliveries(world, peers)
        senders = {world.peer(f"@{label}").id: label for label in ("demo_one", "demo_two")}
        for (sender_id, peer), texts in got.items():
            label = senders[sender_id]
            assert texts == expected[(label, peer)], f"{label}->{peer}: duplicates or wrong order"
    finally:
        await first.reap()
        if second is not None:
            await second.reap()


async def test_two_workers_on_one_database_take_one_account_each_and_serve_it_from_that_process_only(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    one = await WorkerProcess(env, tmp_path / "one.log").start()
    two = await WorkerProcess(env, tmp_path / "two.log").start()
    try:
        await wait_until(lambda: _one_each(database_url), timeout=30, what="one account leased by each worker", proc=one)
        for label in ("demo_one", "demo_two"):
            acct = await account_id(database_url, label)
            for n in range(30):
                await enqueue(database_url, acct, "alice" if n % 2 else "bob", f"{label} {n}")
        await wait_until(lambda: all_sent(database_url, 60), timeout=40, what="all 60 sent", proc=two)
        owners = await fetch(
            database_url,
            "select account_id, count(distinct split_part(lease_owner, ':', 3)) as processes "
            "from messages where status = 'sent' group by account_id",
        )
        assert all(r["processes"] == 1 for r in owners), owners
        texts = [m.text for peer in ("alice", "bob") for m in world.received(peer)]
        assert len(texts) == len(set(texts)) == 60
    finally:
        for proc in (one, two):
            await proc.reap()


async def test_sigterm_drains_releases_leases_and_exits_zero(env: dict[str, str], database_url: str, tmp_path: Path) -> None:
    World.open(Path(env["SANDBOX_DIR"])).seed_demo()
    proc = await WorkerProcess(env, tmp_path / "w.log").start()
    try:
        await wait_until(lambda: accounts_connected(database_url), timeout=30, what="accounts leased", proc=proc)
        code = await proc.stop(timeout=float(env["SHUTDOWN_GRACE"]) + 10)
        assert code == 0, proc.output()[-2000:]
        held = await fetch(database_url, "select count(*) as n from telegram_accounts where lease_owner is not null")
        assert held[0]["n"] == 0, "leases released at shutdown, so a new deployment starts at once"
    finally:
        await proc.reap()


async def test_a_killed_history_job_resumes_at_its_cursor(env: dict[str, str], database_url: str, tmp_path: Path) -> None:
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    for n in range(120):
        world.send_incoming("@alice", "@demo_one", f"old {n:03d}", gap=True)
    env = {**env, "HISTORY_PAGE_SIZE": "10", "RECONCILE_INTERVAL": "3600"}
    first = await WorkerProcess(env, tmp_path / "h1.log").start()
    second: WorkerProcess | None = None
    try:
        await wait_until(lambda: accounts_connected(database_url), timeout=30, what="accounts leased", proc=first)
        acct = await account_id(database_url, "demo_one")
        alice = world.peer("@alice").id
        world.set_fault(FaultKind.LATENCY, method="GetHistory", ms=150)
        await fetch(database_url, "select * from job_create(p_account_id => $1, p_kind => 'history', p_payload => jsonb_build_object('chat_id', $2::bigint))", acct, alice)
        await wait_until(
            lambda: _job_fetched(database_url, 40), timeout=30, what="history job part-way", proc=first
        )
        first.kill9()
        await first.proc.wait()  # type: ignore[union-attr]
        before = (await fetch(database_url, "select cursor, fetched_count from jobs"))[0]
        assert before["cursor"] > 0
        world.clear_faults()
        second = await WorkerProcess(env, tmp_path / "h2.log").start()
        await wait_until(lambda: _job_done(database_url), timeout=60, what="history job done", proc=second)
        job = (await fetch(database_url, "select fetched_count, stored_count from jobs"))[0]
        assert job["fetched_count"] <= 120 + 10, "resumed at the cursor: at most one page fetched twice"
        stored = await fetch(
            database_url, "select count(*) as n, count(distinct telegram_message_id) as d from messages where account_id = $1", acct
        )
        assert stored[0]["n"] == stored[0]["d"] == 120
    finally:
        await first.reap()
        if second is not None:
            await second.reap()


async def _job_fetched(database_url: str, at_least: int) -> bool:
    rows = await fetch(database_url, "select fetched_count from jobs")
    return bool(rows) and rows[0]["fetched_count"] >= at_least


async def _job_done(database_url: str) -> bool:
    rows = await fetch(database_url, "select status from jobs")
    return bool(rows) and rows[0]["status"] == "done"


#: The outage outlasts the account lease (3 s), the watchdog's patience (WATCHDOG_MAX_SILENCE, 5 s)
#: and several timed-out attempts of the first message; it ends well within the retries' budget.
OUTAGE = 8.0


async def test_an_8_second_network_outage_is_survived_and_everything_delivered_after(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    # Each attempt times out after 1 s and is retried 0.5 s later (a timeout is retried soon, not
    # doubling): 8 attempts are 12 s, so the retries outlast the 8 s outage by a third, as 6 attempts
    # of 2 + 2 s outlasted 20 s before.
    outage_env = {**env, "TIMEOUT_TELEGRAM_SEND": "1", "TIMEOUT_TELEGRAM_ENTITY": "1", "RETRY_BASE_DELAY": "0.5",
                  "MAX_MESSAGE_RETRIES": "7"}
    proc = await WorkerProcess(outage_env, tmp_path / "outage.log").start()
    try:
        await wait_until(lambda: accounts_connected(database_url), timeout=30, what="accounts leased", proc=proc)
        acct = await account_id(database_url, "demo_one")
        world.set_fault(FaultKind.HANG)  # every request hangs: the network is gone
        outage_started = time.monotonic()
        for n in range(5):
            await enqueue(database_url, acct, "alice", f"during the outage {n}")
        await wait_until(lambda: "timed out" in proc.output(), timeout=OUTAGE, what="a timeout logged", proc=proc)
        remaining = OUTAGE - (time.monotonic() - outage_started)
        if remaining > 0:
            await asyncio.sleep(remaining)  # the outage itself lasts OUTAGE s; nothing is awaited here
        world.clear_faults()
        assert proc.proc is not None and proc.proc.returncode is None, "the worker kept running"
        assert proc.output().count("operation timed out") >= 3, "several attempts timed out during the outage"
        await wait_until(lambda: all_sent(database_url, 5), timeout=60, what="delivered after the outage", proc=proc)
        texts = [m.text for m in world.received("alice")]
        assert sorted(texts) == [f"during the outage {n}" for n in range(5)]
        assert texts == sorted(texts), "in order"
        assert not re.search(r"loop \S+ restarted", proc.output()), "no loop was taken for stuck"
    finally:
        await proc.reap()


async def test_a_worker_started_while_its_database_is_away_waits_for_it_then_serves(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    # The database "appears" when its socket does: a symlink to the real server's socket, made later.
    url = urlsplit(database_url)
    query = parse_qs(url.query)
    real_socket = Path(query["host"][0]) / f".s.PGSQL.{query.get('port', ['5432'])[0]}"
    assert real_socket.exists(), f"the test database is expected on a unix socket: {database_url}"
    away = tmp_path / "away"
    away.mkdir()
    later_url = urlunsplit(url._replace(query=urlencode({"host": str(away), "port": "5432"})))
    proc = await WorkerProcess({**env, "DATABASE_URL": later_url}, tmp_path / "away.log").start()
    try:
        await wait_until(lambda: "waiting for the database (attempt 2)" in proc.output(), timeout=30, what="waiting", proc=proc)
        (away / ".s.PGSQL.5432").symlink_to(real_socket)
        await wait_until(lambda: accounts_connected(database_url), timeout=60, what="accounts leased once it is back", proc=proc)
        assert "the database is up after" in proc.output()
        assert await proc.stop() == 0
    finally:
        await proc.reap()
    assert "Traceback" not in proc.output()


async def test_a_database_that_refuses_the_worker_stops_start_up_with_one_line_and_exit_1(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    url = urlsplit(database_url)
    missing = urlunsplit(url._replace(path="/no_such_database"))
    proc = await WorkerProcess({**env, "DATABASE_URL": missing}, tmp_path / "refused.log").start()
    try:
        assert proc.proc is not None
        assert await asyncio.wait_for(proc.proc.wait(), 60) == 1
    finally:
        await proc.reap()
    output = proc.output()
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if "CRITICAL" in line]
    assert 'worker could not start: the database: database rejected the call (3D000: database "no_such_database" does not exist)' in line
