"""Benchmark: time from an injected fault to healthy again, next to the bound the configuration promises.

    ./start.sh bench recovery [--quick] [--json] [--outage S] [--parallel]

Each case runs ``python worker.py`` (sandbox mode, 2 sandbox accounts) on an
embedded PostgreSQL, warms it up (one message per account delivered), then
injects one fault and at the same moment enqueues one message. "Healthy
again" is the moment that message is delivered (``status = 'sent'``) and
the worker's ``/health`` answers 200. The clock starts when the fault is
injected.

Cases and the bound each is compared with (all from the settings passed to
the worker, printed with the table):

* hung send: the sandbox never answers one SendMessage. Bound:
  TIMEOUT_TELEGRAM_SEND + the unknown-outcome retry delay
  (min(2 s, RETRY_BASE_DELAY)) + OUTBOUND_POLL_INTERVAL.
* stuck loop: the same hang, but TIMEOUT_TELEGRAM_SEND (60 s) is longer
  than the watchdog's patience, so the outbound loop is silent and must be
  restarted. Bound: WATCHDOG_MAX_SILENCE + WATCHDOG_CHECK_INTERVAL + the
  watchdog's first restart delay (1 s, LoopWatchdog's default) +
  OUTBOUND_POLL_INTERVAL.
* dropped connection: the sandbox drops the connection on one SendMessage.
  Bound: min(2 s, RETRY_BASE_DELAY) + RECONNECT_BACKOFF_MAX +
  ACCOUNT_CHECK_INTERVAL + OUTBOUND_POLL_INTERVAL.
* database outage: the worker reaches PostgreSQL through a TCP relay in
  this process; the relay resets every connection and refuses new ones for
  the outage (30 s; 5 s with ``--outage 5``). Bound: outage +
  DB_BREAKER_RECOVERY (the breaker may have just reopened on a failed probe
  when the database comes back) + TIMEOUT_DB (a probe in flight) +
  OUTBOUND_POLL_INTERVAL, + ACCOUNT_CHECK_INTERVAL when the outage outlasts
  ACCOUNT_LEASE_SECONDS (the leases lapse and are claimed again): while the
  breaker is open the outbound loop waits exactly until its next probe. The table also says how much of the time
  came after the database was back.
* kill -9 under the supervisor: ``python supervisor.py -- python worker.py``;
  the worker child is SIGKILLed. Bound: RESTART_BACKOFF_BASE + start time
  (measured in this run: supervisor start to the first child serving its
  accounts) + ACCOUNT_LEASE_SECONDS (the dead child's lease must lapse) +
  ACCOUNT_CHECK_INTERVAL + OUTBOUND_POLL_INTERVAL.

Read it as: ``ratio`` = measured / promised; at or under 1.2 the
configuration keeps its promise. ``--quick`` runs only the first three
cases. A benchmark, not a test: nothing here asserts on time.

``--defaults`` measures something else: what an outage costs an operator who
keeps every default setting (only the fault lengths are set). Each case puts
work in hand when the dependency fails (sends slowed to 1 s by the sandbox,
so rows are claimed and in flight; messages enqueued to several chats during
the outage) and reports ``after_return_s``: seconds from the dependency's
return until every one of those messages is delivered and /health answers
200. Aim: at most 5 s each.

* database reset (30 s): the relay resets every connection and refuses new
  ones for the outage.
* database hung (30 s): the relay stalls every connection (nothing is
  answered, nothing is closed) for the outage, then resets them: a failover.
* Telegram outage (20 s): the sandbox never answers any request, lookups of
  new recipients included.
* storage outage (3 s, ingest.py): R2 (moto's S3 server) refuses every
  connection while four images are posted to the watched channel; after
  return = R2 back -> every one of them stored.
* X outage (10 s, bot.py): the local X stand-in answers 503 to every request
  (its breakers' probe included) while the operator approves a reply draft;
  after return = X back -> that reply posted.

``--quick`` with ``--defaults`` shortens the outages to 8 s (database) and
6 s (Telegram, X).

``--parallel`` runs independent cases at once, to be done sooner (the smoke
test uses it): the stuck loop beside the hung send and the dropped
connection, on a database, world and accounts of its own; with
``--defaults``, bot.py's and ingest.py's cases beside worker.py's (which
still come one after another). The cases then share the machine's cores, so
the figures to compare come from runs without it.
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
import re  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import psutil  # noqa: E402

from bench._common import (  # noqa: E402
    UNLIMITED_SENDS,
    Accounts,
    BenchDatabase,
    S3Server,
    WORKER_BASE_ENV,
    TcpProxy,
    WorkerProcess,
    emit,
    free_port,
    leased_accounts,
    machine,
    machine_line,
    make_accounts,
    parser,
    progress,
    rounded,
    wait_until,
    worker_env,
)

logger = logging.getLogger("bench.recovery")

#: The worker's configuration in every case (each case adds its own on top).
BASE: dict[str, str] = {
    **UNLIMITED_SENDS,
    "ACCOUNT_CHECK_INTERVAL": "1",
    "ACCOUNT_LEASE_SECONDS": "5",
    "OUTBOUND_POLL_INTERVAL": "0.5",
    "WATCHDOG_CHECK_INTERVAL": "0.5",
    "WATCHDOG_MAX_SILENCE": "3",
    "HEARTBEAT_INTERVAL": "1",
    "RETRY_BASE_DELAY": "0.5",
    "TIMEOUT_TELEGRAM_SEND": "2",
    "TIMEOUT_TELEGRAM_ENTITY": "2",
    "TIMEOUT_TELEGRAM_CONNECT": "3",
    "TIMEOUT_DB": "2",
    "DB_BREAKER_RECOVERY": "5",
    "RECONNECT_BACKOFF_MAX": "1",
    "RECONCILE_INTERVAL": "3600",
    "SHUTDOWN_GRACE": "3",
}

WATCHDOG_FIRST_RESTART_DELAY = 1.0
"""LoopWatchdog's backoff_base: the delay before a loop's first restart (not a setting)."""



@dataclass
class CaseResult:
    case: str
    measured_s: float | None
    promised_s: float
    ratio: float | None
    bound: str
    error: str | None = None
    note: str | None = None


def f(env: dict[str, str], name: str) -> float:
    return float(env[name])


class Harness:
    """One database and sandbox world shared by the cases; a fresh worker per case."""

    def __init__(self, bench_db: BenchDatabase, db_name: str, dsn: str, accounts: Accounts, port: int) -> None:
        self.bench_db = bench_db
        self.db_name = db_name
        self.dsn = dsn
        self.accounts = accounts
        self.port = port
        self.counter = 0
        self.data_dir = bench_db.root / ("worker-data" if db_name == "bench_recovery" else f"worker-data-{db_name}")

    def env(self, extra: dict[str, str], *, dsn: str | None = None) -> dict[str, str]:
        return worker_env(
            dsn=dsn or self.dsn,
            accounts=self.accounts,
            data_dir=self.data_dir,
            extra={**BASE, "PORT": str(self.port), **extra},
        )

    async def healthy(self) -> bool:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
                async with session.get(f"http://127.0.0.1:{self.port}/health") as response:
                    return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def enqueue(self, text: str, account: int | None = None) -> int:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return int(
                await conn.fetchval(
                    "select id from outbound_enqueue(p_account_id => $1, p_peer => $2, p_text => $3)",
                    account if account is not None else self.accounts.ids[0],
                    self.accounts.recipients[0],
                    text,
                )
            )
        finally:
            await conn.close()

    async def sent(self, message_id: int) -> bool:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return await conn.fetchval("select status from messages where id = $1", message_id) == "sent"
        finally:
            await conn.close()

    async def ready(self, check: Callable[[], None], *, timeout: float = 60) -> None:
        """Accounts leased, /health 200 and one message per account delivered (warm entity cache)."""
        n = len(self.accounts.ids)
        await wait_until(lambda: _at_least(leased_accounts(self.dsn), n), timeout=timeout, what="accounts leased", check=check)
        await wait_until(self.healthy, timeout=timeout, what="/health 200", check=check)
        ids = [await self.enqueue(f"warm {self.counter} {a}", a) for a in self.accounts.ids]
        self.counter += 1
        await wait_until(lambda: _all(self.sent(i) for i in ids), timeout=timeout, what="warm-up delivered", check=check)

    async def recovered(self, message_id: int, *, timeout: float, check: Callable[[], None] | None = None) -> float:
        """The monotonic time at which ``message_id`` is delivered and /health answers 200."""
        return await wait_until(
            lambda: _both(self.sent(message_id), self.healthy()), timeout=timeout, what="healthy again", interval=0.05, check=check
        )


async def _at_least(value: Awaitable[int], n: int) -> bool:
    return await value >= n


async def _all(checks: Any) -> bool:
    for check in checks:
        if not await check:
            return False
    return True


async def _both(a: Awaitable[bool], b: Awaitable[bool]) -> bool:
    if not await a:
        b.close()  # type: ignore[attr-defined]
        return False
    return await b


def result(case: str, started: float, ended: float | None, promised: float, bound: str, error: str | None = None) -> CaseResult:
    measured = None if ended is None else ended - started
    return CaseResult(
        case=case,
        measured_s=rounded(measured, 2),
        promised_s=round(promised, 2),
        ratio=rounded(measured / promised, 2) if measured is not None else None,
        bound=bound,
        error=error,
    )


# --- the cases ------------------------------------------------------------------------


async def telegram_cases(h: Harness, *, stuck: bool) -> list[CaseResult]:
    """Hung send and dropped connection (one worker), or the stuck loop (a worker with a long send deadline)."""
    from devkit.sandbox import FaultKind

    world = h.accounts.world
    extra = {"TIMEOUT_TELEGRAM_SEND": "60"} if stuck else {}
    env = h.env(extra)
    worker = await WorkerProcess(env, h.bench_db.root / f"worker-{'stuck' if stuck else 'telegram'}.log").start()
    results: list[CaseResult] = []
    try:
        await h.ready(worker.check_alive)
        if stuck:
            cases = [("stuck loop", FaultKind.HANG)]
        else:
            cases = [("hung send", FaultKind.HANG), ("dropped connection", FaultKind.DROP)]
        for name, kind in cases:
            progress(f"case: {name}")
            if name == "hung send":
                promised = f(env, "TIMEOUT_TELEGRAM_SEND") + min(2.0, f(env, "RETRY_BASE_DELAY")) + f(env, "OUTBOUND_POLL_INTERVAL")
                bound = "TIMEOUT_TELEGRAM_SEND + min(2, RETRY_BASE_DELAY) + OUTBOUND_POLL_INTERVAL"
            elif name == "stuck loop":
                promised = (
                    f(env, "WATCHDOG_MAX_SILENCE") + f(env, "WATCHDOG_CHECK_INTERVAL") + WATCHDOG_FIRST_RESTART_DELAY
                    + f(env, "OUTBOUND_POLL_INTERVAL")
                )
                bound = "WATCHDOG_MAX_SILENCE + WATCHDOG_CHECK_INTERVAL + 1 s restart delay + OUTBOUND_POLL_INTERVAL"
            else:
                promised = (
                    min(2.0, f(env, "RETRY_BASE_DELAY")) + f(env, "RECONNECT_BACKOFF_MAX") + f(env, "ACCOUNT_CHECK_INTERVAL")
                    + f(env, "OUTBOUND_POLL_INTERVAL")
                )
                bound = "min(2, RETRY_BASE_DELAY) + RECONNECT_BACKOFF_MAX + ACCOUNT_CHECK_INTERVAL + OUTBOUND_POLL_INTERVAL"
            await asyncio.to_thread(world.set_fault, kind, method="SendMessage", count=1)
            started = time.monotonic()
            message = await h.enqueue(f"{name} {h.counter}")
            h.counter += 1
            try:
                ended = await h.recovered(message, timeout=promised * 3 + 10, check=worker.check_alive)
                results.append(result(name, started, ended, promised, bound))
            except (TimeoutError, RuntimeError) as exc:
                results.append(result(name, started, None, promised, bound, error=str(exc).splitlines()[0]))
            await asyncio.to_thread(world.clear_faults)
    finally:
        await worker.stop()
    return results


async def database_outage(h: Harness, outage: float) -> CaseResult:
    progress(f"case: database outage ({outage:g} s)")
    proxy = await TcpProxy(h.bench_db.socket_path, free_port()).start()
    env = h.env({}, dsn=h.bench_db.tcp_dsn(h.db_name, proxy.port))
    promised = outage + f(env, "DB_BREAKER_RECOVERY") + f(env, "TIMEOUT_DB") + f(env, "OUTBOUND_POLL_INTERVAL")
    bound = f"outage ({outage:g} s) + DB_BREAKER_RECOVERY + TIMEOUT_DB + OUTBOUND_POLL_INTERVAL"
    if outage > f(env, "ACCOUNT_LEASE_SECONDS"):  # the leases lapsed: each account is claimed and connected again
        promised += f(env, "ACCOUNT_CHECK_INTERVAL")
        bound += " + ACCOUNT_CHECK_INTERVAL (leases lapsed)"
    worker = await WorkerProcess(env, h.bench_db.root / "worker-outage.log").start()
    try:
        await h.ready(worker.check_alive)
        await proxy.cut()
        started = time.monotonic()
        message = await h.enqueue(f"database outage {h.counter}")
        h.counter += 1
        await asyncio.sleep(outage)  # the outage itself: nothing is awaited here
        await proxy.restore()
        restored = time.monotonic()
        try:
            ended = await h.recovered(message, timeout=promised * 2 + 10, check=worker.check_alive)
            outcome = result("database outage", started, ended, promised, bound)
            outcome.note = f"{ended - restored:.1f} s of it after the database was back"
            return outcome
        except (TimeoutError, RuntimeError) as exc:
            return result("database outage", started, None, promised, bound, error=str(exc).splitlines()[0])
    finally:
        await worker.stop()
        await proxy.close()


async def kill_9_supervised(h: Harness) -> CaseResult:
    progress("case: kill -9 under the supervisor")
    env = h.env(
        {
            "HEALTH_FAIL_AFTER": "10",
            "HEALTH_CHECK_INTERVAL": "1",
            "HEALTH_STARTUP_GRACE": "30",
            "RESTART_BACKOFF_BASE": "1",
            "RESTART_BACKOFF_MAX": "10",
            "MAX_RESTARTS": "10",
            "BOT": "worker",
        }
    )
    supervisor = WorkerProcess(
        env, h.bench_db.root / "supervisor.log", argv=[sys.executable, "supervisor.py", "--", sys.executable, "worker.py"]
    )
    spawned = time.monotonic()
    await supervisor.start()
    try:
        n = len(h.accounts.ids)
        ready_at = await wait_until(
            lambda: _at_least(leased_accounts(h.dsn), n), timeout=60, what="accounts leased", check=supervisor.check_alive
        )
        start_time = ready_at - spawned
        await h.ready(supervisor.check_alive)
        promised = (
            f(env, "RESTART_BACKOFF_BASE") + start_time + f(env, "ACCOUNT_LEASE_SECONDS") + f(env, "ACCOUNT_CHECK_INTERVAL")
            + f(env, "OUTBOUND_POLL_INTERVAL")
        )
        bound = (
            f"RESTART_BACKOFF_BASE + start time ({start_time:.1f} s, measured) + ACCOUNT_LEASE_SECONDS + "
            "ACCOUNT_CHECK_INTERVAL + OUTBOUND_POLL_INTERVAL"
        )
        children = psutil.Process(supervisor.pid).children()
        if not children:
            return result("kill -9 (supervised)", 0.0, None, promised, bound, error="the supervisor has no child")
        os.kill(children[0].pid, signal.SIGKILL)
        started = time.monotonic()
        message = await h.enqueue(f"after kill {h.counter}")
        h.counter += 1
        try:
            ended = await h.recovered(message, timeout=promised * 2 + 10, check=supervisor.check_alive)
            return result("kill -9 (supervised)", started, ended, promised, bound)
        except (TimeoutError, RuntimeError) as exc:
            return result("kill -9 (supervised)", started, None, promised, bound, error=str(exc).splitlines()[0])
    finally:
        await supervisor.stop(timeout=20)
        for child in psutil.Process().children(recursive=True):  # a worker the supervisor left behind
            if child.pid != supervisor.pid and "worker.py" in " ".join(child.cmdline()):
                child.kill()


async def harness(bench_db: BenchDatabase, name: str, *, recipients: int) -> Harness:
    """A fresh database ``name`` with 2 sandbox accounts in a world of its own, and a port for the worker."""
    dsn = await bench_db.create(name)
    suffix = "" if name == "bench_recovery" else f"-{name}"
    accounts = await make_accounts(dsn, bench_db.root / f"sandbox{suffix}", 2, recipients=recipients)
    return Harness(bench_db, name, dsn, accounts, free_port())


async def run(*, quick: bool, outage: float, parallel: bool = False) -> dict[str, Any]:
    info = machine()
    async with BenchDatabase("bench-recovery-") as bench_db:
        h = await harness(bench_db, "bench_recovery", recipients=1)
        if parallel:  # the stuck loop's worker beside the other one, on its own database, world and accounts
            stuck = await harness(bench_db, "bench_recovery_stuck", recipients=1)
            first, second = await asyncio.gather(telegram_cases(h, stuck=False), telegram_cases(stuck, stuck=True))
            cases = first + second
        else:
            cases = await telegram_cases(h, stuck=False)
            cases += await telegram_cases(h, stuck=True)
        if not quick:
            cases.append(await database_outage(h, outage))
            cases.append(await kill_9_supervised(h))
        version = bench_db.version
    worst = max((c.ratio for c in cases if c.ratio is not None), default=None)
    return {
        "benchmark": "recovery",
        "cases": [asdict(c) for c in cases],
        "worst_ratio": worst,
        "all_within_1_2": all(c.ratio is not None and c.ratio <= 1.2 for c in cases),
        "settings": BASE,
        "outage_s": outage if not quick else None,
        "quick": quick,
        "postgres": version,
        "machine": info,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


# --- --defaults: the cost of an outage with the default settings ----------------------


@dataclass
class AfterReturn:
    case: str
    outage_s: float
    after_return_s: float | None
    messages: int
    error: str | None = None


async def _all_sent(dsn: str, ids: list[int]) -> bool:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval("select count(*) from messages where id = any($1::bigint[]) and status = 'sent'", ids)) == len(ids)
    finally:
        await conn.close()


async def _any_sending(dsn: str, ids: list[int]) -> bool:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return bool(await conn.fetchval("select count(*) from messages where id = any($1::bigint[]) and status = 'sending'", ids))
    finally:
        await conn.close()


async def _enqueue_spread(h: Harness, label: str, per_account: int) -> list[int]:
    """``per_account`` messages per account, each to another recipient (several chats)."""
    conn = await asyncpg.connect(h.dsn, timeout=10)
    try:
        ids = []
        for account in h.accounts.ids:
            for n in range(per_account):
                peer = h.accounts.recipients[n % len(h.accounts.recipients)]
                ids.append(int(await conn.fetchval(
                    "select id from outbound_enqueue(p_account_id => $1, p_peer => $2, p_text => $3)",
                    account, peer, f"{label} {h.counter} {account} {n}",
                )))
        h.counter += 1
        return ids
    finally:
        await conn.close()


def defaults_env(h: Harness, *, dsn: str | None = None) -> dict[str, str]:
    """Every setting at its default: only what the sandbox process needs."""
    return worker_env(
        dsn=dsn or h.dsn, accounts=h.accounts, data_dir=h.data_dir, extra={"PORT": str(h.port), "SANDBOX": "1"}
    )


async def defaults_database(h: Harness, kind: str, outage: float) -> AfterReturn:
    from bench._chaos_faults import PgProxy
    from devkit.sandbox import FaultKind

    name = f"database {kind} ({outage:g} s)"
    progress(f"--defaults case: {name}")
    world = h.accounts.world
    if kind == "reset":
        reset_proxy = await TcpProxy(h.bench_db.socket_path, free_port()).start()
        port = reset_proxy.port
    else:
        hung_proxy = PgProxy(unix_path=h.bench_db.socket_path)
        port = await hung_proxy.start()
    env = defaults_env(h, dsn=h.bench_db.tcp_dsn(h.db_name, port))
    worker = await WorkerProcess(env, h.bench_db.root / f"worker-defaults-db-{kind}.log").start()
    ids: list[int] = []
    try:
        await h.ready(worker.check_alive, timeout=120)
        # Work in hand at the fault: sends take 1 s, so rows are claimed and in flight when it strikes.
        await asyncio.to_thread(world.set_fault, FaultKind.LATENCY, method="SendMessage", ms=1000)
        ids = await _enqueue_spread(h, f"db-{kind}", 4)
        await wait_until(lambda: _any_sending(h.dsn, ids), timeout=60, what="rows in flight", check=worker.check_alive)
        if kind == "reset":
            await reset_proxy.cut()
        else:
            hung_proxy.cut()
        ids += await _enqueue_spread(h, f"during db-{kind}", 2)
        await asyncio.sleep(outage)  # the outage itself
        await asyncio.to_thread(world.clear_faults)
        if kind == "reset":
            await reset_proxy.restore()
        else:
            hung_proxy.restore()
        restored = time.monotonic()
        try:
            ended = await wait_until(
                lambda: _both(_all_sent(h.dsn, ids), h.healthy()), timeout=300, what="all delivered", interval=0.1, check=worker.check_alive
            )
            return AfterReturn(name, outage, round(ended - restored, 2), len(ids))
        except (TimeoutError, RuntimeError) as exc:
            return AfterReturn(name, outage, None, len(ids), error=str(exc).splitlines()[0])
    finally:
        await asyncio.to_thread(world.clear_faults)
        await worker.stop()
        if kind == "reset":
            await reset_proxy.close()
        else:
            await hung_proxy.stop()


async def defaults_telegram(h: Harness, outage: float) -> AfterReturn:
    from devkit.sandbox import FaultKind

    name = f"Telegram outage ({outage:g} s)"
    progress(f"--defaults case: {name}")
    world = h.accounts.world
    worker = await WorkerProcess(defaults_env(h), h.bench_db.root / "worker-defaults-telegram.log").start()
    ids: list[int] = []
    try:
        await h.ready(worker.check_alive, timeout=120)
        await asyncio.to_thread(world.set_fault, FaultKind.HANG, method="*")
        ids = await _enqueue_spread(h, "telegram", 4)  # new recipients: their lookups hang too
        await asyncio.sleep(outage / 2)
        ids += await _enqueue_spread(h, "telegram later", 2)
        await asyncio.sleep(outage / 2)
        await asyncio.to_thread(world.clear_faults)
        restored = time.monotonic()
        try:
            ended = await wait_until(
                lambda: _both(_all_sent(h.dsn, ids), h.healthy()), timeout=300, what="all delivered", interval=0.1, check=worker.check_alive
            )
            return AfterReturn(name, outage, round(ended - restored, 2), len(ids))
        except (TimeoutError, RuntimeError) as exc:
            return AfterReturn(name, outage, None, len(ids), error=str(exc).splitlines()[0])
    finally:
        await asyncio.to_thread(world.clear_faults)
        await worker.stop()


_DRAFT = re.compile(r"Reply draft for @\S+ \(tweet (\d+)\)")


def _drafts(world_dir: Path) -> list[str]:
    """The tweets whose reply drafts reached the operator chat of the sandbox world, in order."""
    from devkit.sandbox import World

    if not world_dir.exists():
        return []
    world = World(world_dir)
    try:
        messages = world.history("operator", "Demo Operators")
    except LookupError:
        return []  # bot.py has not made its sandbox's operator chat yet
    finally:
        world.close()
    return [m.group(1) for m in (_DRAFT.search(x.text or "") for x in messages) if m]


def _approve(world_dir: Path) -> None:
    from devkit.sandbox import World

    world = World(world_dir)
    try:
        world.press("operator", chat="Demo Operators", text="Approve")
    finally:
        world.close()


async def defaults_x(h: Harness, outage: float) -> AfterReturn:
    """bot.py with every default: X fails (HTTP 503 on every endpoint, its breakers' probe
    included) while the operator approves a draft; after return = X back -> the reply posted."""
    from devkit.local_x import LocalX

    name = f"X outage, bot.py ({outage:g} s)"
    progress(f"--defaults case: {name}")
    root = h.bench_db.root / "bot-defaults-x"
    world_dir = root / "sandbox"
    local_x = await LocalX().start()
    env = {
        **WORKER_BASE_ENV,
        "LOG_LEVEL": "INFO",
        "DATABASE_URL": await h.bench_db.create("bench_recovery_bot"),
        "SANDBOX": "1",
        "SANDBOX_DIR": str(world_dir),
        "DATA_DIR": str(root / "data"),
        "X_API_BASE": local_x.base_url,
        "PORT": str(free_port()),
    }
    bot = await WorkerProcess(env, root.with_suffix(".log"), argv=[sys.executable, "bot.py"]).start()
    try:
        await wait_until(lambda: bool(_drafts(world_dir)), timeout=120, what="a first draft", interval=0.2, check=bot.check_alive)
        local_x.faults.add("status", endpoint="*", status=503)
        failed_at = time.monotonic()
        await asyncio.to_thread(_approve, world_dir)  # the operator approves while X is down
        await asyncio.sleep(max(0.0, outage - (time.monotonic() - failed_at)))
        local_x.faults.clear()
        restored = time.monotonic()
        try:
            ended = await wait_until(
                lambda: any(local_x.replies_to(t) for t in _drafts(world_dir)), timeout=120, what="the approved reply posted", interval=0.1, check=bot.check_alive
            )
            return AfterReturn(name, outage, round(ended - restored, 2), 1)
        except (TimeoutError, RuntimeError) as exc:
            return AfterReturn(name, outage, None, 1, error=str(exc).splitlines()[0])
    finally:
        await bot.stop()
        await local_x.stop()


async def _stored(dsn: str, message_ids: list[int]) -> bool:
    """Every one of these channel messages has its image stored (row ``stored``, so its object is in the bucket)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        n = await conn.fetchval(
            "select count(distinct message_id) from ingest_images where status = 'stored' and message_id = any($1::bigint[])",
            message_ids,
        )
    finally:
        await conn.close()
    return int(n) == len(message_ids)


async def defaults_storage(h: Harness, outage: float) -> AfterReturn:
    """ingest.py with every default: R2 (moto's S3 server) refuses every connection while images are
    posted to the watched channel; after return = storage back -> every one of those images stored."""
    from bench.chaos_ingest import CHANNEL, unique_image
    from devkit.sandbox import World

    name = f"storage outage, ingest ({outage:g} s)"
    progress(f"--defaults case: {name}")
    root = h.bench_db.root / "ingest-defaults-storage"
    world_dir = root / "sandbox"
    world_dir.mkdir(parents=True)
    s3 = S3Server(access_key="bench-access-key", secret_key="bench-secret-key")
    await asyncio.to_thread(s3.start)
    world = World(world_dir)
    await asyncio.to_thread(world.seed_demo)
    port = free_port()
    dsn = await h.bench_db.create("bench_recovery_ingest")
    env = {
        **WORKER_BASE_ENV,
        **s3.env(await asyncio.to_thread(s3.create_bucket, "bench")),
        "LOG_LEVEL": "INFO",
        "DATABASE_URL": dsn,
        "SANDBOX": "1",
        "SANDBOX_DIR": str(world_dir),
        "DATA_DIR": str(root / "data"),
        "PORT": str(port),
    }
    ingest = await WorkerProcess(env, root.with_suffix(".log"), argv=[sys.executable, "ingest.py"]).start()

    def post(n: int) -> int:
        data, mime, file_name = unique_image(n)
        return int(world.post_to_channel(CHANNEL, data, as_document=True, mime_type=mime, file_name=file_name).id)

    try:
        first = [await asyncio.to_thread(post, 0)]
        await wait_until(lambda: _stored(dsn, first), timeout=120, what="a first image stored", interval=0.2, check=ingest.check_alive)
        await asyncio.to_thread(s3.stop)
        started = time.monotonic()
        posted = [await asyncio.to_thread(post, n) for n in range(1, 5)]  # read, fetched, refused by storage
        await asyncio.sleep(max(0.0, outage - (time.monotonic() - started)))
        await asyncio.to_thread(s3.start)
        restored = time.monotonic()
        try:
            ended = await wait_until(
                lambda: _stored(dsn, posted), timeout=180, what="every image stored", interval=0.1, check=ingest.check_alive
            )
            return AfterReturn(name, outage, round(ended - restored, 2), len(posted))
        except (TimeoutError, RuntimeError) as exc:
            return AfterReturn(name, outage, None, len(posted), error=str(exc).splitlines()[0])
    finally:
        await ingest.stop()
        world.close()
        await asyncio.to_thread(s3.stop)


DEFAULTS_CASES = ("reset", "hung", "telegram", "storage", "x")
"""The cases of ``--defaults``: the database reset, the database hung then reset, Telegram away,
R2 away (ingest.py), X away (bot.py)."""


async def run_defaults(
    *, quick: bool, db_outage: float, telegram_outage: float, x_outage: float = 10.0, storage_outage: float = 3.0,
    only: tuple[str, ...] = DEFAULTS_CASES, parallel: bool = False,
) -> dict[str, Any]:
    info = machine()
    async with BenchDatabase("bench-recovery-defaults-") as bench_db:
        h = await harness(bench_db, "bench_recovery", recipients=4)

        async def one(name: str) -> AfterReturn:
            if name in ("reset", "hung"):
                return await defaults_database(h, name, db_outage)
            if name == "telegram":
                return await defaults_telegram(h, telegram_outage)
            if name == "storage":
                return await defaults_storage(h, storage_outage)
            return await defaults_x(h, x_outage)

        if parallel:
            # worker.py's cases share the accounts and the port: one after another; ingest.py's and
            # bot.py's have their own database and world, so they run beside them.
            async def in_turn(names: list[str]) -> list[AfterReturn]:
                return [await one(name) for name in names]

            worker_cases = [n for n in only if n in ("reset", "hung", "telegram")]
            others = [n for n in only if n not in worker_cases]
            done = await asyncio.gather(in_turn(worker_cases), *(one(n) for n in others))
            by_name = dict(zip(worker_cases, done[0], strict=True)) | dict(zip(others, done[1:], strict=True))
            cases = [by_name[n] for n in only]
        else:
            cases = [await one(name) for name in only]
        version = bench_db.version
    measured = [c.after_return_s for c in cases if c.after_return_s is not None]
    failed = any(c.after_return_s is None for c in cases)
    return {
        "benchmark": "recovery",
        "mode": "defaults",
        "cases": [asdict(c) for c in cases],
        "after_return_s": {c.case: c.after_return_s for c in cases},
        "worst_after_return_s": None if failed or not measured else max(measured),
        "aim_after_return_s": 5.0,
        "settings": "defaults (only the fault lengths set)",
        "quick": quick,
        "postgres": version,
        "machine": info,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


def render_defaults(result: dict[str, Any]) -> str:
    lines = [
        "recovery with the default settings: worker.py in sandbox mode, 2 accounts, embedded PostgreSQL "
        f"{result['postgres']}; after return = the dependency back -> every message in hand delivered and /health 200 "
        "(bot.py: the reply approved during the outage posted)",
        f"machine: {machine_line(result['machine'])}; load average after: "
        f"{' '.join(f'{v:.2f}' for v in result['load_average_after'])}",
        "settings: every default (only the fault lengths set)",
        "",
        f"{'case':<30} {'messages':>8} {'after return s':>15}",
    ]
    for c in result["cases"]:
        value = f"{c['after_return_s']:.2f}" if c["after_return_s"] is not None else "FAILED"
        lines.append(f"{c['case']:<30} {c['messages']:>8} {value:>15}")
        if c["error"]:
            lines.append(f"{'':<30} error: {c['error']}")
    lines += ["", f"worst after return: {result['worst_after_return_s']} s (aim <= {result['aim_after_return_s']:g})"]
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    lines = [
        "recovery benchmark: worker.py in sandbox mode, 2 accounts, embedded PostgreSQL "
        f"{result['postgres']}; healthy again = the message enqueued at the fault delivered and /health 200",
        f"machine: {machine_line(result['machine'])}; load average after: "
        f"{' '.join(f'{v:.2f}' for v in result['load_average_after'])}",
        "settings: " + ", ".join(f"{k}={v}" for k, v in result["settings"].items() if not k.startswith("SEND_")),
        "",
        f"{'case':<22} {'measured s':>10} {'promised s':>10} {'ratio':>6}  bound",
    ]
    for c in result["cases"]:
        measured = f"{c['measured_s']:.2f}" if c["measured_s"] is not None else "FAILED"
        ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
        lines.append(f"{c['case']:<22} {measured:>10} {c['promised_s']:>10.2f} {ratio:>6}  {c['bound']}")
        if c["error"]:
            lines.append(f"{'':<22} error: {c['error']}")
        if c.get("note"):
            lines.append(f"{'':<22} ({c['note']})")
    lines += ["", f"worst measured/promised: {result['worst_ratio']} (aim <= 1.2)"]
    if result["quick"]:
        lines.append("--quick: database outage and kill -9 under the supervisor not run")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_parser = parser("recovery", __doc__)
    args_parser.add_argument("--outage", type=float, default=None, help="database outage length in seconds (default 30; 8 with --defaults --quick)")
    args_parser.add_argument("--defaults", action="store_true", help="the cost of outages with every default setting (after_return_s per case)")
    args_parser.add_argument("--x-outage", type=float, default=None, help="with --defaults: X outage length for bot.py (default 10; 6 with --quick)")
    args_parser.add_argument("--telegram-outage", type=float, default=None, help="with --defaults: Telegram outage length (default 20; 6 with --quick)")
    args_parser.add_argument("--storage-outage", type=float, default=3.0, help="with --defaults: R2 outage length for ingest.py (default 3)")
    args_parser.add_argument(
        "--parallel", action="store_true",
        help="independent cases at once, each on its own database and world (quicker; the figures then share the cores)",
    )
    args_parser.add_argument(
        "--cases", default=",".join(DEFAULTS_CASES),
        help=f"with --defaults: the cases to run, comma-separated (default all: {','.join(DEFAULTS_CASES)})",
    )
    args = args_parser.parse_args(argv)
    only = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = [c for c in only if c not in DEFAULTS_CASES]
    if unknown or not only:
        args_parser.error(f"--cases takes some of {','.join(DEFAULTS_CASES)} (got {args.cases!r})")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    if args.defaults:
        db_outage = args.outage if args.outage is not None else (8.0 if args.quick else 30.0)
        tg_outage = args.telegram_outage if args.telegram_outage is not None else (6.0 if args.quick else 20.0)
        x_outage = args.x_outage if args.x_outage is not None else (6.0 if args.quick else 10.0)
        outcome = asyncio.run(
            run_defaults(
                quick=args.quick, db_outage=db_outage, telegram_outage=tg_outage, x_outage=x_outage,
                storage_outage=args.storage_outage, only=only, parallel=args.parallel,
            )
        )
        outcome["wall_seconds"] = round(time.monotonic() - started, 1)
        emit(render_defaults(outcome), outcome, as_json=args.json)
        return 0
    args.outage = 30.0 if args.outage is None else args.outage
    outcome = asyncio.run(run(quick=args.quick, outage=args.outage, parallel=args.parallel))
    outcome["wall_seconds"] = round(time.monotonic() - started, 1)
    emit(render(outcome), outcome, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
