"""Benchmark: worker.py replicas sharing the accounts (fair share, scaling, handoffs, exactly once).

    ./start.sh bench fleet [--quick] [--json] [--accounts 60] [--messages 40]

What runs: 1, then 2, then 3 ``python worker.py`` replicas on one embedded
PostgreSQL and one Telegram sandbox world, serving 60 sandbox accounts that
write to 10 recipients each, with the sandbox's latency fault at 100 ms on
every request and the default settings (rate limits, lease, check interval
and heartbeat). For each replica count this process waits until every
account is held and the shares are within one, enqueues 40 messages per
account at once and measures delivered/s (messages over the time from the
enqueue to the last delivery) in total and per replica (from each sent
row's lease owner).

Then, with the 3 replicas and messages enqueued without pause (a message
every 5 ms, or slower when that is more than half of what the accounts may
send at the default limits: a smaller run stays under its capacity as the
full one does, instead of piling up a backlog to drain), the three
handoffs: a 4th replica joins (seconds until every replica has its share),
one stops with SIGTERM and one is killed with kill -9 (seconds until every
account it held is held by another). The bound of the kill is
ACCOUNT_LEASE_SECONDS + ACCOUNT_CHECK_INTERVAL + 2 s. At the end every
message is looked up in the sandbox world: lost (never arrived) and
duplicated (arrived more than once) must both be 0.

--quick: 1 and 3 replicas, 12 accounts, 10 messages each, a 3 s lease, a
0.5 s check and a 0.5 s heartbeat, so it runs in well under a minute.

Read it as: on one machine the replicas share its cores, so scaling is about
the cost of coordination (aim: 3 replicas deliver at least 0.9x what one
delivers, ``scaling_3x``, and each replica's share of the sends is within
+-15 % of the mean); across machines the capacity adds up. A benchmark, not a
test: nothing here asserts on time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ first on sys.path would let bench/queue.py shadow the standard library's queue.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402

from bench._common import (  # noqa: E402
    Accounts,
    BenchDatabase,
    WorkerProcess,
    emit,
    machine,
    machine_line,
    make_accounts,
    parser,
    progress,
    rounded,
    wait_until,
    worker_env,
)

from shared.config import BY_NAME  # noqa: E402

logger = logging.getLogger("bench.fleet")

LATENCY_MS = 100.0
QUICK = {"ACCOUNT_LEASE_SECONDS": "3", "ACCOUNT_CHECK_INTERVAL": "0.5", "HEARTBEAT_INTERVAL": "0.5"}


class Fleet:
    """The replicas of one run, each a ``python worker.py`` with its own DATA_DIR."""

    def __init__(self, dsn: str, accounts: Accounts, root: Path, extra: dict[str, str]) -> None:
        self.dsn = dsn
        self.accounts = accounts
        self.root = root
        self.extra = extra
        self.procs: list[WorkerProcess] = []
        self._n = 0

    async def add(self) -> WorkerProcess:
        self._n += 1
        env = worker_env(dsn=self.dsn, accounts=self.accounts, data_dir=self.root / f"replica-{self._n}", extra=self.extra)
        proc = await WorkerProcess(env, self.root / f"replica-{self._n}.log").start()
        self.procs.append(proc)
        return proc

    def check(self) -> None:
        for proc in self.procs:
            proc.check_alive()

    async def stop_all(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs))
        self.procs.clear()


async def shares(dsn: str) -> dict[str, int]:
    """Accounts held per replica (its pid)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "select split_part(lease_owner, ':', 3) as pid, count(*) as n from telegram_accounts "
            "where status = 'active' and lease_owner is not null and lease_expires_at > now() group by 1"
        )
    finally:
        await conn.close()
    return {r["pid"]: int(r["n"]) for r in rows}


async def holders(dsn: str) -> dict[int, str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "select id, split_part(lease_owner, ':', 3) as pid from telegram_accounts "
            "where lease_owner is not null and lease_expires_at > now()"
        )
    finally:
        await conn.close()
    return {r["id"]: r["pid"] for r in rows}


async def settled(dsn: str, procs: list[WorkerProcess], total: int) -> bool:
    """Every account held, by these replicas only, shares within one."""
    held = await shares(dsn)
    pids = {str(p.pid) for p in procs}
    counts = [held.get(pid, 0) for pid in pids]
    return set(held) <= pids and sum(counts) == total and max(counts) - min(counts) <= 1


async def enqueue(pool: asyncpg.Pool, accounts: Accounts, tag: str, per_account: int) -> int:
    """``per_account`` messages per account, round-robin over the recipients, in one statement per account."""
    recipients = accounts.recipients

    async def one(account_id: int, label: str) -> None:
        await pool.execute(
            "select outbound_enqueue(p_account_id => $1, p_peer => ($2::text[])[1 + n % array_length($2::text[], 1)], "
            "p_text => $3 || ':' || $4 || ':' || n, p_attachments => '[]'::jsonb) from generate_series(0, $5 - 1) as n",
            account_id,
            recipients,
            tag,
            label,
            per_account,
        )

    await asyncio.gather(*(one(a, label) for a, label in zip(accounts.ids, accounts.labels, strict=True)))
    return per_account * len(accounts.ids)


async def delivered(dsn: str, tag: str) -> tuple[int, float | None, dict[str, int]]:
    """(sent rows, delivered per second from first enqueue to last send, sends per replica) of ``tag``."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "select count(*) filter (where status = 'sent') as sent, min(created_at) as first, max(sent_at) as last "
            "from messages where text like $1",
            f"{tag}:%",
        )
        per = await conn.fetch(
            "select split_part(lease_owner, ':', 3) as pid, count(*) as n from messages "
            "where text like $1 and status = 'sent' group by 1",
            f"{tag}:%",
        )
    finally:
        await conn.close()
    span = (row["last"] - row["first"]).total_seconds() if row["last"] and row["first"] else 0
    return int(row["sent"]), (int(row["sent"]) / span if span > 0 else None), {r["pid"]: int(r["n"]) for r in per}


async def throughput(fleet: Fleet, pool: asyncpg.Pool, replicas: int, per_account: int, total: int) -> dict[str, Any]:
    while len(fleet.procs) < replicas:
        await fleet.add()
    progress(f"{replicas} replica(s): waiting for the shares")
    started = time.monotonic()
    await wait_until(lambda: settled(fleet.dsn, fleet.procs, total), timeout=180, what="settled", interval=0.1, check=fleet.check)
    settle_s = time.monotonic() - started
    held = await shares(fleet.dsn)
    tag = f"r{replicas}"
    count = await enqueue(pool, fleet.accounts, tag, per_account)
    progress(f"{replicas} replica(s): {count} messages enqueued")
    await wait_until(
        lambda: _sent(fleet.dsn, tag, count), timeout=600, what=f"{tag} delivered", interval=0.2, check=fleet.check
    )
    sent, per_s, per_replica = await delivered(fleet.dsn, tag)
    counts = list(per_replica.values())
    mean = sum(counts) / len(counts) if counts else 0
    spread = max(abs(c - mean) / mean * 100 for c in counts) if counts and mean else None
    return {
        "replicas": replicas,
        "settle_s": round(settle_s, 2),
        "accounts_held": sorted(held.values(), reverse=True),
        "max_minus_min": max(held.values()) - min(held.values()) if held else None,
        "messages": count,
        "delivered": sent,
        "delivered_per_s": rounded(per_s, 1),
        "per_replica_sends": sorted(counts, reverse=True),
        "per_replica_per_s": [rounded(c / count * per_s, 1) if per_s else None for c in sorted(counts, reverse=True)],
        "share_spread_pct": rounded(spread, 1),
    }


async def _sent(dsn: str, tag: str, count: int) -> bool:
    return (await delivered(dsn, tag))[0] >= count


#: The pause between two messages enqueued during the handoffs, at the most.
BACKGROUND_PAUSE = 0.005


def background_pause(accounts: int, recipients: int) -> float:
    """Seconds between two messages enqueued during the handoffs: :data:`BACKGROUND_PAUSE`, or longer when
    that would offer more than half of what ``accounts`` x ``recipients`` chats may send at the default
    limits (SEND_RATE_PER_ACCOUNT, SEND_RATE_PER_CHAT). 60 accounts may send 600/s: 5 ms it is."""
    per_account = min(float(BY_NAME["SEND_RATE_PER_ACCOUNT"].default), recipients * float(BY_NAME["SEND_RATE_PER_CHAT"].default))
    return max(BACKGROUND_PAUSE, 2 / (accounts * per_account))


class Background:
    """Messages enqueued without pause during the handoffs (round-robin over accounts and recipients)."""

    def __init__(self, pool: asyncpg.Pool, accounts: Accounts) -> None:
        self.pool = pool
        self.accounts = accounts
        self.pause = background_pause(len(accounts.ids), len(accounts.recipients))
        self.count = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        n = 0
        ids, labels, recipients = self.accounts.ids, self.accounts.labels, self.accounts.recipients
        while not self._stop.is_set():
            i = n % len(ids)
            peer = recipients[(n // len(ids)) % len(recipients)]
            await self.pool.execute(
                "select outbound_enqueue(p_account_id => $1, p_peer => $2, p_text => $3, p_attachments => '[]'::jsonb)",
                ids[i],
                peer,
                f"moves:{labels[i]}:{n}",
            )
            n += 1
            self.count = n
            try:
                await asyncio.wait_for(self._stop.wait(), self.pause)
            except TimeoutError:
                pass

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def handoffs(fleet: Fleet, pool: asyncpg.Pool, total: int) -> dict[str, Any]:
    """Join, SIGTERM and kill -9 under load; seconds each takes."""
    background = Background(pool, fleet.accounts)
    background.start()
    try:
        progress("handoff: a 4th replica joins")
        newcomer = await fleet.add()
        await wait_until(lambda: _beats(fleet.dsn, 4), timeout=120, what="4th replica live", interval=0.05, check=fleet.check)
        joined = time.monotonic()
        await wait_until(lambda: settled(fleet.dsn, fleet.procs, total), timeout=180, what="4 settled", interval=0.05, check=fleet.check)
        join_s = time.monotonic() - joined
        spread_4 = await shares(fleet.dsn)

        progress("handoff: one replica stops with SIGTERM")
        leaving = fleet.procs[0]
        theirs = {a for a, pid in (await holders(fleet.dsn)).items() if pid == str(leaving.pid)}
        assert leaving.proc is not None
        leaving.proc.send_signal(signal.SIGTERM)
        terminated = time.monotonic()
        fleet.procs.remove(leaving)
        others = {str(p.pid) for p in fleet.procs}
        await wait_until(lambda: _taken(fleet.dsn, theirs, others), timeout=120, what="SIGTERM handoff", interval=0.05, check=fleet.check)
        sigterm_s = time.monotonic() - terminated
        await leaving.stop()

        progress("handoff: one replica is killed (kill -9)")
        await wait_until(lambda: settled(fleet.dsn, fleet.procs, total), timeout=180, what="3 settled", interval=0.05, check=fleet.check)
        victim = next(p for p in fleet.procs if p is not newcomer)
        theirs = {a for a, pid in (await holders(fleet.dsn)).items() if pid == str(victim.pid)}
        assert victim.proc is not None
        victim.proc.kill()
        killed = time.monotonic()
        await victim.proc.wait()
        fleet.procs.remove(victim)
        others = {str(p.pid) for p in fleet.procs}
        await wait_until(lambda: _taken(fleet.dsn, theirs, others), timeout=180, what="kill -9 handoff", interval=0.05, check=fleet.check)
        kill_s = time.monotonic() - killed
    finally:
        await background.stop()
    progress(f"handoffs done: waiting for the {background.count} messages enqueued during them")
    await wait_until(lambda: _sent(fleet.dsn, "moves", background.count), timeout=300, what="moves delivered", interval=0.2, check=fleet.check)
    return {
        "handoff_join_s": round(join_s, 2),
        "handoff_sigterm_s": round(sigterm_s, 2),
        "handoff_kill_s": round(kill_s, 2),
        "accounts_held_4": sorted(spread_4.values(), reverse=True),
        "messages_during_moves": background.count,
    }


async def _beats(dsn: str, n: int) -> bool:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        live = await conn.fetchval("select count(*) from worker_heartbeats where fleet is not null and status <> 'stopped'")
    finally:
        await conn.close()
    return int(live) >= n


async def _taken(dsn: str, accounts: set[int], by: set[str]) -> bool:
    now = await holders(dsn)
    return all(now.get(a) in by for a in accounts)


def exactly_once(accounts: Accounts, expected: set[str]) -> tuple[int, int]:
    """(lost, duplicated) among the texts this run enqueued, from the sandbox world."""
    world = accounts.world
    seen: Counter[str] = Counter()
    for peer in accounts.recipients:
        for message in world.received(peer):
            if message.text in expected:
                seen[message.text] += 1
    lost = len(expected - set(seen))
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    return lost, duplicated


async def expected_texts(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return {r["text"] for r in await conn.fetch("select text from messages where direction = 'outbound'")}
    finally:
        await conn.close()


async def run(*, n_accounts: int, per_account: int, quick: bool) -> dict[str, Any]:
    info = machine()
    extra = dict(QUICK) if quick else {}
    lease = float(extra.get("ACCOUNT_LEASE_SECONDS", 20))
    check = float(extra.get("ACCOUNT_CHECK_INTERVAL", 5))
    async with BenchDatabase("bench-fleet-") as bench_db:
        dsn = await bench_db.create("bench_fleet")
        accounts = await make_accounts(dsn, bench_db.root / "sandbox", n_accounts, recipients=10)
        from devkit.sandbox import FaultKind

        accounts.world.set_fault(FaultKind.LATENCY, ms=LATENCY_MS)
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=8)
        fleet = Fleet(dsn, accounts, bench_db.root, extra)
        phases: list[dict[str, Any]] = []
        try:
            for replicas in (1, 3) if quick else (1, 2, 3):
                phases.append(await throughput(fleet, pool, replicas, per_account, n_accounts))
                progress(f"{replicas} replica(s): {phases[-1]['delivered_per_s']} delivered/s")
            moves = await handoffs(fleet, pool, n_accounts)
        finally:
            progress("stopping the replicas")
            await fleet.stop_all()
            await pool.close()
        progress("exactly once: every message looked up in the sandbox world")
        lost, duplicated = exactly_once(accounts, await expected_texts(dsn))
    one, three = phases[0]["delivered_per_s"], phases[-1]["delivered_per_s"]
    spreads = [p["max_minus_min"] for p in phases if p["max_minus_min"] is not None]
    max_minus_min = max([*spreads, max(moves["accounts_held_4"]) - min(moves["accounts_held_4"])])
    return {
        "benchmark": "fleet",
        "accounts": n_accounts,
        "recipients_per_account": 10,
        "messages_per_account": per_account,
        "latency_ms": LATENCY_MS,
        "phases": phases,
        **moves,
        "handoff_bound_s": round(lease + check + 2, 1),
        "balanced": max_minus_min <= 1,
        "max_minus_min": max_minus_min,
        "shares_within_15pct": all(p["share_spread_pct"] is not None and p["share_spread_pct"] <= 15 for p in phases),
        "scaling_3x": rounded(three / one, 2) if one and three else None,
        "lost": lost,
        "duplicated": duplicated,
        "settings": {**extra, "other": "defaults"} if extra else "defaults",
        "machine": info,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"fleet benchmark: worker.py replicas over {result['accounts']} sandbox accounts x {result['recipients_per_account']} recipients, "
        f"{result['messages_per_account']} messages per account, sandbox latency {result['latency_ms']:g} ms, settings: "
        f"{result['settings'] if isinstance(result['settings'], str) else ', '.join(f'{k}={v}' for k, v in result['settings'].items())}",
        f"machine: {machine_line(result['machine'])}; load average after: {' '.join(f'{v:.2f}' for v in result['load_average_after'])}",
        "",
        f"{'replicas':>8} | {'held':>12} | {'settle s':>8} | {'delivered/s':>11} | {'per replica/s':>22} | {'share spread':>12}",
    ]
    for p in result["phases"]:
        per = " ".join(f"{v:g}" for v in p["per_replica_per_s"] if v is not None)
        lines.append(
            f"{p['replicas']:>8} | {'/'.join(map(str, p['accounts_held'])):>12} | {p['settle_s']:>8.2f} | "
            f"{p['delivered_per_s'] or 0:>11.1f} | {per:>22} | {('%.1f %%' % p['share_spread_pct']) if p['share_spread_pct'] is not None else '-':>12}"
        )
    lines += [
        "",
        f"handoffs under load: join {result['handoff_join_s']} s (shares {'/'.join(map(str, result['accounts_held_4']))}), "
        f"SIGTERM {result['handoff_sigterm_s']} s, kill -9 {result['handoff_kill_s']} s (bound {result['handoff_bound_s']} s)",
        f"scaling: 3 replicas deliver {result['scaling_3x']}x what one does on this machine (aim >= 0.9); "
        f"shares within +-15 %: {'yes' if result['shares_within_15pct'] else 'no'}; accounts max - min: {result['max_minus_min']}",
        f"exactly once: lost {result['lost']}, duplicated {result['duplicated']} "
        f"(of every message, {result['messages_during_moves']} of them enqueued during the moves)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_parser = parser("fleet", __doc__, quick_help="12 accounts, 10 messages each, a 3 s lease (well under a minute)")
    args_parser.add_argument("--accounts", type=int, default=None, help="sandbox accounts (default 60, 12 with --quick)")
    args_parser.add_argument("--messages", type=int, default=None, help="messages per account per phase (default 40, 10 with --quick)")
    args = args_parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    n_accounts = args.accounts or (12 if args.quick else 60)
    per_account = args.messages or (10 if args.quick else 40)
    started = time.monotonic()
    result = asyncio.run(run(n_accounts=n_accounts, per_account=per_account, quick=args.quick))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    emit(render(result), result, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
