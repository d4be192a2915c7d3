"""worker.py replicas as real processes on one database and one sandbox world.

A fleet must never turn one replica's mistake into every account's problem:
these tests run the sequences an operator would (a wrong key, replicas
joining, SIGTERM, kill -9) and read the truth from the database and the
sandbox world.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from bench._common import Accounts, free_port, make_accounts
from devkit.sandbox import World
from shared.cipher import DECRYPT_FAILURE, generate_key
from tests.test_worker import worker_cli
from tests.test_worker_process import WorkerProcess, account_id, enqueue, fetch, wait_until

pytestmark = pytest.mark.slow


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
        "LOG_LEVEL": "INFO",
    }


async def statuses(database_url: str) -> dict[str, tuple[str, str | None]]:
    rows = await fetch(database_url, "select label, status, last_error from telegram_accounts order by label")
    return {r["label"]: (r["status"], r["last_error"]) for r in rows}


async def leased(database_url: str, labels: set[str]) -> bool:
    rows = await fetch(
        database_url, "select label from telegram_accounts where lease_owner is not null and lease_expires_at > now()"
    )
    return {r["label"] for r in rows} >= labels


async def test_a_replica_with_the_wrong_key_changes_no_account_and_exits_2_and_the_right_key_brings_them_back(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    World.open(Path(env["SANDBOX_DIR"])).seed_demo()
    right = {**env, "SESSION_ENCRYPTION_KEY": generate_key()}
    wrong = {**env, "SESSION_ENCRYPTION_KEY": generate_key(), "DATA_DIR": str(tmp_path / "data-b")}

    a = await WorkerProcess(right, tmp_path / "a.log").start()
    try:
        await wait_until(lambda: leased(database_url, {"demo_one", "demo_two"}), timeout=30, what="A serves both", proc=a)
        assert await a.stop() == 0
    finally:
        await a.reap()
    before = await statuses(database_url)
    assert {status for status, _ in before.values()} == {"active"}

    b = await WorkerProcess(wrong, tmp_path / "b.log").start()
    try:
        assert b.proc is not None
        assert await b.proc.wait() == 2, b.output()[-3000:]
    finally:
        await b.reap()
    assert await statuses(database_url) == before, "a wrong key is the process's problem, never the accounts'"
    [line] = [line for line in b.output().splitlines() if "CRITICAL" in line]
    assert "SESSION_ENCRYPTION_KEY" in line and "no account was changed" in line
    assert "Traceback" not in b.output()

    # What an older version did with a wrong key, and a real logout next to it.
    await fetch(
        database_url, "update telegram_accounts set status = 'needs_login', last_error = $1 where label = 'demo_two'", DECRYPT_FAILURE
    )
    await fetch(
        database_url,
        "update telegram_accounts set status = 'needs_login', last_error = 'AUTH_KEY_UNREGISTERED: the session was revoked' "
        "where label = 'demo_one'",
    )
    a2 = await WorkerProcess(right, tmp_path / "a2.log").start()
    try:
        await wait_until(lambda: leased(database_url, {"demo_two"}), timeout=30, what="demo_two back and served", proc=a2)
        await enqueue(database_url, await account_id(database_url, "demo_two"), "alice", "after the wrong key")
        world = World.open(Path(env["SANDBOX_DIR"]))
        await wait_until(
            lambda: [m.text for m in world.received("alice")] == ["after the wrong key"], timeout=30, what="delivered", proc=a2
        )
        after = await statuses(database_url)
        assert after["demo_two"][0] == "active"
        assert after["demo_one"] == ("needs_login", "AUTH_KEY_UNREGISTERED: the session was revoked"), "a real logout stays"
        assert await a2.stop() == 0
    finally:
        await a2.reap()


# --- the fleet -----------------------------------------------------------------------------

#: Short lease and heartbeat, so that every bound below is a few seconds.
LEASE = 5.0
CHECK = 0.2
FLEET = {
    "ACCOUNT_LEASE_SECONDS": str(LEASE),
    "ACCOUNT_CHECK_INTERVAL": str(CHECK),
    "HEARTBEAT_INTERVAL": "0.5",
    "FLEET_LIVENESS_BEATS": "3",
    "ACCOUNT_HANDOFF_GRACE": "2",
    "RECONCILE_INTERVAL": "600",
    "LOG_LEVEL": "WARNING",
}


@pytest.fixture
async def fleet_accounts(env: dict[str, str], database_url: str) -> Accounts:
    return await make_accounts(database_url, Path(env["SANDBOX_DIR"]), 30, recipients=3)


def replica_env(env: dict[str, str], accounts: Accounts, tmp_path: Path, n: int) -> dict[str, str]:
    return {
        **env,
        **FLEET,
        "SESSION_ENCRYPTION_KEY": accounts.key,
        "DATA_DIR": str(tmp_path / f"data-{n}"),
        "PORT": str(free_port()),  # the watch below reads each replica's /status
    }


async def holdings(database_url: str) -> Counter[str]:
    """Live account leases per holding process (its pid)."""
    rows = await fetch(
        database_url,
        "select split_part(lease_owner, ':', 3) as pid, count(*) as n from telegram_accounts "
        "where lease_owner is not null and lease_expires_at > now() group by 1",
    )
    return Counter({r["pid"]: r["n"] for r in rows})


async def held_by(database_url: str) -> dict[str, str]:
    rows = await fetch(
        database_url,
        "select label, split_part(lease_owner, ':', 3) as pid from telegram_accounts "
        "where lease_owner is not null and lease_expires_at > now()",
    )
    return {r["label"]: r["pid"] for r in rows}


async def live_replicas(database_url: str) -> int:
    rows = await fetch(database_url, "select count(*) as n from worker_heartbeats where fleet is not null and status <> 'stopped'")
    return rows[0]["n"]


def pid_of(proc: WorkerProcess) -> str:
    assert proc.proc is not None
    return str(proc.proc.pid)


def shares(counts: Counter[str], procs: list[WorkerProcess]) -> list[int]:
    return sorted((counts.get(pid_of(p), 0) for p in procs), reverse=True)


class DoubleConnectionWatch:
    """Samples every replica's /status and proves no account is connected in two processes at once.

    Two processes report an account connected in one round; the one sampled
    later connected at ``connected_since``. If that is before the earlier
    sample began, it was connected all through the earlier sample: both at
    once. (A handoff between the two samples is not an overlap.)
    """

    def __init__(self, procs: list[WorkerProcess]) -> None:
        self.procs = procs
        self.overlaps: list[str] = []
        self.rounds = 0
        self.reports = 0
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def port(proc: WorkerProcess) -> int:
        return int(proc.env["PORT"])

    async def _round(self, http: aiohttp.ClientSession) -> None:
        seen: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for proc in list(self.procs):
            port = self.port(proc)
            if proc.death():
                continue
            began = time.time()
            try:
                async with http.get(f"http://127.0.0.1:{port}/status", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    data = await r.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            for label, account in (data.get("accounts") or {}).items():
                if isinstance(account, dict) and account.get("connected") and account.get("connected_since"):
                    seen[label].append((began, float(account["connected_since"]), pid_of(proc)))
                    self.reports += 1
        for label, reports in seen.items():
            for (first_began, _, first_pid), (_, later_since, later_pid) in zip(reports, reports[1:]):
                if later_pid != first_pid and later_since <= first_began:
                    self.overlaps.append(f"{label}: connected in {first_pid} and {later_pid} at once")
        self.rounds += 1

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as http:
            while True:
                await self._round(http)
                await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Producer:
    """Enqueues messages without pause, each (account, recipient) chat numbered in order."""

    def __init__(self, database_url: str, accounts: Accounts) -> None:
        self.database_url = database_url
        self.accounts = accounts
        self.expected: dict[tuple[str, str], list[str]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.database_url)
        try:
            n = 0
            while not self._stop.is_set():
                index = n % len(self.accounts.ids)
                peer = self.accounts.recipients[(n // len(self.accounts.ids)) % len(self.accounts.recipients)]
                label = self.accounts.labels[index]
                text = f"{label}->{peer} #{len(self.expected[(label, peer)]):04d}"
                await conn.execute(
                    "select * from outbound_enqueue(p_account_id => $1, p_peer => $2, p_text => $3, p_attachments => '[]'::jsonb)",
                    self.accounts.ids[index],
                    peer,
                    text,
                )
                self.expected[(label, peer)].append(text)
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.01)
        finally:
            await conn.close()

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.expected.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def all_sent(database_url: str, count: int) -> bool:
    rows = await fetch(database_url, "select count(*) as n from messages where direction = 'outbound' and status = 'sent'")
    return rows[0]["n"] >= count


def assert_each_once_in_order(world: World, accounts: Accounts, expected: dict[tuple[str, str], list[str]]) -> None:
    senders = {world.peer(f"@{label}").id: label for label in accounts.labels}
    got: dict[tuple[str, str], list[str]] = defaultdict(list)
    for peer in accounts.recipients:
        for message in world.received(peer):
            got[(senders[message.sender_id], peer)].append(message.text)
    assert set(got) <= set(expected)
    for chat, texts in expected.items():
        assert got.get(chat, []) == texts, f"{chat}: lost, duplicated or out of order"


async def test_replicas_share_30_accounts_evenly_and_a_fourth_takes_its_share_with_every_message_once_in_order(
    env: dict[str, str], database_url: str, tmp_path: Path, fleet_accounts: Accounts
) -> None:
    accounts = fleet_accounts
    procs = [await WorkerProcess(replica_env(env, accounts, tmp_path, n), tmp_path / f"w{n}.log").start() for n in range(3)]
    watch = DoubleConnectionWatch(procs)
    producer = Producer(database_url, accounts)
    try:
        await wait_until(lambda: _live(database_url, 3), timeout=60, what="3 replicas live", proc=procs[0])
        watch.start()
        started = time.monotonic()
        await wait_until(
            lambda: _balanced(database_url, procs, [10, 10, 10], slack=1, total=30),
            timeout=3 * LEASE + 30,
            what="10 +- 1 accounts each",
            proc=procs[1],
        )
        assert time.monotonic() - started <= 3 * LEASE, "balanced within 3 lease periods"

        producer.start()
        procs.append(await WorkerProcess(replica_env(env, accounts, tmp_path, 3), tmp_path / "w3.log").start())
        await wait_until(lambda: _live(database_url, 4), timeout=60, what="the 4th replica live", proc=procs[3])
        joined = time.monotonic()
        await wait_until(
            lambda: _balanced(database_url, procs, [8, 8, 7, 7], slack=0, total=30),
            timeout=2 * LEASE + 30,
            what="8/8/7/7",
            proc=procs[3],
        )
        assert time.monotonic() - joined <= 2 * LEASE, "the newcomer has its share within 2 lease periods"
        await producer.stop()
        await wait_until(lambda: all_sent(database_url, producer.count), timeout=60, what="every message sent", proc=procs[0])
        assert producer.count > 100
        assert_each_once_in_order(accounts.world, accounts, producer.expected)
        await watch.stop()
        assert watch.rounds >= 5 and watch.reports >= 30 * 5, "the watch saw the connections it judges"
        assert watch.overlaps == [], watch.overlaps
    finally:
        await producer.stop()
        await watch.stop()
        for proc in procs:
            await proc.reap()


async def _live(database_url: str, n: int) -> bool:
    return await live_replicas(database_url) == n


async def _balanced(database_url: str, procs: list[WorkerProcess], target: list[int], *, slack: int, total: int) -> bool:
    counts = await holdings(database_url)
    got = shares(counts, procs)
    return sum(got) == total and all(abs(g - t) <= slack for g, t in zip(got, target, strict=True))


async def test_a_killed_replicas_accounts_move_within_the_lease_bound_and_a_stopped_ones_at_once(
    env: dict[str, str], database_url: str, tmp_path: Path, fleet_accounts: Accounts
) -> None:
    accounts = fleet_accounts
    procs = [await WorkerProcess(replica_env(env, accounts, tmp_path, n), tmp_path / f"k{n}.log").start() for n in range(3)]
    watch = DoubleConnectionWatch(procs)
    try:
        await wait_until(
            lambda: _balanced(database_url, procs, [10, 10, 10], slack=1, total=30), timeout=60, what="balanced", proc=procs[0]
        )
        watch.start()
        victim, stopped, survivor = procs
        theirs = {label for label, pid in (await held_by(database_url)).items() if pid == pid_of(victim)}
        victim.kill9()
        killed = time.monotonic()
        await wait_until(
            lambda: _moved(database_url, theirs, {pid_of(stopped), pid_of(survivor)}), timeout=30, what="killed replica's accounts taken", proc=survivor
        )
        bound = LEASE + CHECK + 2
        assert time.monotonic() - killed <= bound, f"taken over within ACCOUNT_LEASE_SECONDS + ACCOUNT_CHECK_INTERVAL + 2 s ({bound}s)"

        await wait_until(lambda: _balanced(database_url, [stopped, survivor], [15, 15], slack=0, total=30), timeout=30, what="15/15", proc=survivor)
        theirs = {label for label, pid in (await held_by(database_url)).items() if pid == pid_of(stopped)}
        assert stopped.proc is not None
        stopped.proc.send_signal(15)
        terminated = time.monotonic()
        await wait_until(lambda: _moved(database_url, theirs, {pid_of(survivor)}), timeout=30, what="stopped replica's accounts taken", proc=survivor)
        # 2 s for the work in hand, then one connect (each account connects in parallel).
        assert time.monotonic() - terminated <= 2 + float(env["TIMEOUT_TELEGRAM_CONNECT"])
        assert await asyncio.wait_for(stopped.proc.wait(), 30) == 0
        await watch.stop()
        assert watch.reports > 0, "the watch saw the connections it judges"
        assert watch.overlaps == [], watch.overlaps
    finally:
        await watch.stop()
        for proc in procs:
            await proc.reap()


async def _moved(database_url: str, labels: set[str], to: set[str]) -> bool:
    now = await held_by(database_url)
    return all(now.get(label) in to for label in labels)


async def test_a_replica_whose_key_opens_only_some_sessions_leaves_the_others_to_a_replica_that_can(
    env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    from shared.cipher import SessionCipher

    accounts = await make_accounts(database_url, Path(env["SANDBOX_DIR"]), 12, recipients=1)
    newer = generate_key()
    resealed = accounts.labels[::2]
    conn = await asyncpg.connect(database_url)
    try:
        for label in resealed:
            phone = await conn.fetchval("select phone from telegram_accounts where label = $1", label)
            session = SessionCipher(newer).encrypt(accounts.world.session_string(phone))
            await conn.execute("update telegram_accounts set session_encrypted = $1 where label = $2", session, label)
    finally:
        await conn.close()
    both = {**replica_env(env, accounts, tmp_path, 0), "SESSION_ENCRYPTION_KEY": f"{newer},{accounts.key}"}
    stale = replica_env(env, accounts, tmp_path, 1)  # only the older key: half the sessions stay closed to it
    procs = [await WorkerProcess(both, tmp_path / "both.log").start(), await WorkerProcess(stale, tmp_path / "stale.log").start()]
    try:
        full, partial = procs

        async def settled() -> bool:
            held = await held_by(database_url)
            mine = [label for label, pid in held.items() if pid == pid_of(partial)]
            return len(held) == 12 and bool(mine) and all(held[label] == pid_of(full) for label in resealed)

        await wait_until(settled, timeout=60, what="every account held, the resealed ones by the replica with the key", proc=partial)
        rows = await fetch(database_url, "select distinct status from telegram_accounts where label like 'bench%'")
        assert [r["status"] for r in rows] == ["active"], "no account was marked needs_login"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{DoubleConnectionWatch.port(partial)}/ready") as response:
                assert response.status == 503 and "key_mismatch" in await response.text()

            async def full_ready() -> bool:  # its readiness checks run on their own schedule: ready soon, not at once
                async with http.get(f"http://127.0.0.1:{DoubleConnectionWatch.port(full)}/ready") as response:
                    return response.status == 200

            await wait_until(full_ready, timeout=30, what="the replica with every key ready", proc=full)
        code, out, err = await worker_cli(both, "fleet", "--json")
        assert code == 0, err
        shown = {r["pid"]: r for r in json.loads(out)["fleet"]}
        assert sorted(shown[int(pid_of(partial))]["key_mismatch"]) == sorted(resealed)
    finally:
        for proc in procs:
            await proc.reap()
