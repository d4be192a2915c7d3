"""Benchmark: our outbound queue against procrastinate and pgqueuer, on the same embedded PostgreSQL.

    ./start.sh bench queue [--quick] [--json] [--claimers N] [--messages N] [--rounds N] [--seconds S]

Two measurements, each run for both systems in the same process, on two
databases of one embedded PostgreSQL (default settings, fsync on):

* throughput: a backlog of messages drained by N concurrent claimers, in
  alternating rounds (ours, procrastinate, ours, ...); the best round of each
  counts, so load from elsewhere on the machine does not decide the ratio.
  Ours: ``claim_outbound`` (a batch, FOR UPDATE SKIP LOCKED), then the
  rows are "sent" together and their marks written as the worker writes
  them (``SentMarks``: the marks of sends that finish together go in one
  ``outbound_mark_sent_many`` statement). Procrastinate: ``fetch_job`` then
  ``finish_job`` for each job (its worker's own calls), after ``defer``.
  pgqueuer (built for throughput): one ``QueueManager`` per claimer, each
  on its own connection, ``run(batch_size=<batch>, mode=drain)``: batched
  dequeue and its buffered completion (``log_jobs`` per batch), as its
  documentation recommends.
* latency: enqueue-to-claim time at a fixed offered load (200 messages/s by
  default), consumers waiting on LISTEN/NOTIFY (ours: a Subscription;
  procrastinate: ``listen_for_jobs``; pgqueuer: its QueueManager's
  listener), reported as p50 and p99.

Prints a table; with ``--json`` the last line is one JSON object with
``ours_per_s``, ``procrastinate_per_s``, ``ratio``, ``p50_ms``, ``p99_ms``
(ours) and the same latencies for procrastinate; ``pgqueuer_per_s``,
``ratio_pgqueuer`` (ours / pgqueuer), ``pgqueuer_p50_ms``,
``pgqueuer_p99_ms``; ``settings`` says how each system is used. A benchmark, not a test:
nothing here asserts on time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/queue.py`, this file would shadow the standard library's
# `queue` module (which asyncio's thread pool imports): drop bench/ from the path.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402

from bench._common import fixed_rate, machine, machine_line, parser, percentile  # noqa: E402
from shared.breaker import CircuitBreaker  # noqa: E402
from shared.db import PostgresDatabase, apply_migrations  # noqa: E402
from shared.db.embedded import EmbeddedPostgres  # noqa: E402

logger = logging.getLogger("bench.queue")


@dataclass(frozen=True)
class Plan:
    messages: int
    rounds: int
    claimers: int
    peers: int
    batch: int
    offered_per_s: float
    seconds: float
    consumers: int
    machine: dict[str, Any]
    """Where the figures come from (bench._common.machine), taken before the run."""


@dataclass
class Result:
    per_s: float
    p50_ms: float
    p99_ms: float
    latency_samples: int


# --- ours ----------------------------------------------------------------------


class Ours:
    name = "ours"

    def __init__(self, dsn: str, plan: Plan) -> None:
        self.plan = plan
        self.db = PostgresDatabase(dsn, timeout=30, max_size=plan.claimers + 6, breaker=CircuitBreaker("bench"))
        self.account = 0

    async def open(self) -> None:
        from worker import SentMarks

        await self.db.open()
        self.account = (await self.db.upsert_account("bench")).id
        self.marks = SentMarks(self.db)

    async def _mark(self, row: Any) -> None:
        await self.marks.mark(row.id, row.lease_token or "", telegram_message_id=row.id, chat_id=row.id)

    async def close(self) -> None:
        await self.db.close()

    async def preload(self, count: int) -> None:
        semaphore = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with semaphore:
                await self.db.enqueue_outbound(self.account, f"peer{i % self.plan.peers}", f"{i}")

        await asyncio.gather(*(one(i) for i in range(count)))

    async def drain(self) -> float:
        done = 0
        total = self.plan.messages

        async def claimer(n: int) -> None:
            nonlocal done
            while done < total:
                rows = await self.db.claim_outbound([self.account], owner=f"claimer-{n}", limit=self.plan.batch)
                if not rows:
                    await asyncio.sleep(0.001)
                    continue
                # Sent together, as the worker's chat tasks do; their marks share one write (SentMarks).
                await asyncio.gather(*(self._mark(row) for row in rows))
                done += len(rows)

        started = time.perf_counter()
        await asyncio.gather(*(claimer(n) for n in range(self.plan.claimers)))
        return total / (time.perf_counter() - started)

    async def latency(self) -> list[float]:
        count = int(self.plan.offered_per_s * self.plan.seconds)
        enqueued_at: dict[int, float] = {}
        latencies: list[float] = []
        finished = asyncio.Event()

        async def produce(i: int) -> None:
            enqueued_at[i] = time.perf_counter()
            await self.db.enqueue_outbound(self.account, f"peer{i % self.plan.peers}", f"{i}")

        async def consume(n: int) -> None:
            subscription = await self.db.subscribe("outbound")
            try:
                while not finished.is_set():
                    rows = await self.db.claim_outbound([self.account], owner=f"consumer-{n}", limit=self.plan.batch)
                    now = time.perf_counter()
                    for row in rows:
                        latencies.append(now - enqueued_at[int(row.text or 0)])
                    await asyncio.gather(*(self._mark(row) for row in rows))
                    if len(latencies) >= count:
                        finished.set()
                        self.db.wake("outbound")  # the other consumers stop now, not at their next timeout
                    elif len(rows) < self.plan.batch:
                        # As the worker does (Outbound._claim_and_send): look again at once only after
                        # a full batch; else wait (a NOTIFY that came during the claim is latched).
                        await subscription.wait(timeout=1.0)
            finally:
                subscription.close()

        consumers = [asyncio.create_task(consume(n)) for n in range(self.plan.consumers)]
        await asyncio.sleep(0.2)  # let the consumers LISTEN first
        await fixed_rate(count, self.plan.offered_per_s, produce, max_in_flight=count)
        await asyncio.wait_for(finished.wait(), timeout=60)
        await asyncio.gather(*consumers)
        return latencies


# --- procrastinate -----------------------------------------------------------------


class Procrastinate:
    name = "procrastinate"

    def __init__(self, dsn: str, plan: Plan) -> None:
        from procrastinate import App, PsycopgConnector

        self.plan = plan
        self.app = App(connector=PsycopgConnector(conninfo=dsn, min_size=1, max_size=plan.claimers + 6))
        self.worker_ids: list[int] = []

    async def open(self) -> None:
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()
        manager = self.app.job_manager
        self.worker_ids = [await manager.register_worker() for _ in range(max(self.plan.claimers, self.plan.consumers))]

    async def close(self) -> None:
        await self.app.close_async()

    def _job(self, i: int) -> Any:
        from procrastinate import jobs

        return jobs.Job(id=None, queue="outbound", lock=None, queueing_lock=None, task_name="send", task_kwargs={"i": i})

    async def preload(self, count: int) -> None:
        manager = self.app.job_manager
        for start in range(0, count, 500):
            await manager.batch_defer_jobs_async([self._job(i) for i in range(start, min(count, start + 500))])

    async def drain(self) -> float:
        from procrastinate.jobs import Status

        manager = self.app.job_manager
        done = 0
        total = self.plan.messages

        async def claimer(n: int) -> None:
            nonlocal done
            while done < total:
                job = await manager.fetch_job(queues=None, worker_id=self.worker_ids[n])
                if job is None:
                    await asyncio.sleep(0.001)
                    continue
                await manager.finish_job(job, status=Status.SUCCEEDED, delete_job=False)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(claimer(n) for n in range(self.plan.claimers)))
        return total / (time.perf_counter() - started)

    async def latency(self) -> list[float]:
        from procrastinate.jobs import Status

        manager = self.app.job_manager
        count = int(self.plan.offered_per_s * self.plan.seconds)
        enqueued_at: dict[int, float] = {}
        latencies: list[float] = []
        finished = asyncio.Event()
        wake = asyncio.Event()

        async def on_notification(**_: Any) -> None:
            wake.set()

        listener = asyncio.create_task(manager.listen_for_jobs(on_notification=on_notification, queues=["outbound"]))

        async def produce(i: int) -> None:
            enqueued_at[i] = time.perf_counter()
            await manager.defer_job_async(self._job(i))

        async def consume(n: int) -> None:
            while not finished.is_set():
                wake.clear()
                job = await manager.fetch_job(queues=["outbound"], worker_id=self.worker_ids[n])
                if job is None:
                    try:
                        await asyncio.wait_for(wake.wait(), timeout=1.0)
                    except TimeoutError:
                        pass
                    continue
                latencies.append(time.perf_counter() - enqueued_at[int(job.task_kwargs["i"])])
                await manager.finish_job(job, status=Status.SUCCEEDED, delete_job=False)
                if len(latencies) >= count:
                    finished.set()
                    wake.set()

        consumers = [asyncio.create_task(consume(n)) for n in range(self.plan.consumers)]
        await asyncio.sleep(0.2)
        await fixed_rate(count, self.plan.offered_per_s, produce, max_in_flight=count)
        await asyncio.wait_for(finished.wait(), timeout=60)
        await asyncio.gather(*consumers)
        listener.cancel()
        try:
            await listener
        except (asyncio.CancelledError, Exception):
            pass
        return latencies


# --- pgqueuer -------------------------------------------------------------------------

#: How pgqueuer is run, as its documentation recommends for throughput: one QueueManager per
#: consumer on its own connection (its LISTEN/NOTIFY wake-up), ``run(batch_size=...)`` so each
#: dequeue takes a batch, and its default completion buffer (one ``log_jobs`` per batch).
PGQUEUER_SETTINGS = "QueueManager per consumer (own asyncpg connection, LISTEN/NOTIFY), run(batch_size={batch}), default durability and completion buffer"


class Pgqueuer:
    name = "pgqueuer"

    def __init__(self, dsn: str, plan: Plan) -> None:
        self.dsn = dsn
        self.plan = plan
        self.conns: list[asyncpg.Connection] = []
        self.admin: asyncpg.Connection | None = None

    async def open(self) -> None:
        from pgqueuer import AsyncpgDriver, Queries

        self.admin = await asyncpg.connect(self.dsn)
        await Queries(AsyncpgDriver(self.admin)).install()

    async def close(self) -> None:
        for conn in self.conns:
            await conn.close()
        self.conns = []
        if self.admin is not None:
            await self.admin.close()

    def _queries(self, conn: asyncpg.Connection) -> Any:
        from pgqueuer import AsyncpgDriver, Queries

        return Queries(AsyncpgDriver(conn))

    async def preload(self, count: int) -> None:
        assert self.admin is not None
        queries = self._queries(self.admin)
        for start in range(0, count, 500):
            n = min(count, start + 500) - start
            await queries.enqueue(["send"] * n, [str(i).encode() for i in range(start, start + n)], [0] * n)

    async def _managers(self, n: int, on_job: Callable[[Any], Awaitable[None]]) -> list[Any]:
        from pgqueuer import QueueManager

        for conn in self.conns:
            await conn.close()
        self.conns = [await asyncpg.connect(self.dsn) for _ in range(n)]
        managers = []
        for conn in self.conns:
            qm = QueueManager(self._queries(conn))

            @qm.entrypoint("send")
            async def send(job: Any) -> None:
                await on_job(job)

            managers.append(qm)
        return managers

    async def drain(self) -> float:
        from pgqueuer.types import QueueExecutionMode

        async def nothing(job: Any) -> None:
            return None

        managers = await self._managers(self.plan.claimers, nothing)
        started = time.perf_counter()
        await asyncio.gather(*(qm.run(batch_size=self.plan.batch, mode=QueueExecutionMode.drain) for qm in managers))
        return self.plan.messages / (time.perf_counter() - started)

    async def latency(self) -> list[float]:
        assert self.admin is not None
        count = int(self.plan.offered_per_s * self.plan.seconds)
        enqueued_at: dict[int, float] = {}
        latencies: list[float] = []
        finished = asyncio.Event()
        managers: list[Any] = []

        async def on_job(job: Any) -> None:
            latencies.append(time.perf_counter() - enqueued_at[int(job.payload or b"0")])
            if len(latencies) >= count and not finished.is_set():
                finished.set()
                for qm in managers:
                    qm.shutdown.set()

        managers += await self._managers(self.plan.consumers, on_job)
        producer = self._queries(self.admin)

        async def produce(i: int) -> None:
            enqueued_at[i] = time.perf_counter()
            await producer.enqueue("send", str(i).encode())

        runs = [asyncio.create_task(qm.run(batch_size=self.plan.batch)) for qm in managers]
        await asyncio.sleep(0.5)  # let the managers LISTEN first
        await fixed_rate(count, self.plan.offered_per_s, produce, max_in_flight=count)
        await asyncio.wait_for(finished.wait(), timeout=60)
        await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), timeout=60)
        return latencies


# --- driver --------------------------------------------------------------------------


async def _compare(systems: list[Any], plan: Plan) -> tuple[list[Result], dict[str, list[float]]]:
    """Drain a backlog in alternating rounds (ours, procrastinate, pgqueuer, ours, ...), so a noisy
    neighbour on the machine hurts all alike; then the latency run of each."""
    runs: dict[str, list[float]] = {system.name: [] for system in systems}
    for system in systems:
        await system.open()
    try:
        for _ in range(plan.rounds):
            for system in systems:
                await system.preload(plan.messages)
                runs[system.name].append(await system.drain())
        results = []
        for system in systems:
            ms = [v * 1000 for v in await system.latency()]
            results.append(
                Result(
                    per_s=max(runs[system.name]),
                    p50_ms=percentile(ms, 50),
                    p99_ms=percentile(ms, 99),
                    latency_samples=len(ms),
                )
            )
    finally:
        for system in systems:
            await system.close()
    return results, runs


async def run(plan: Plan) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    server = EmbeddedPostgres(root / "data")
    try:
        admin_dsn = await server.start()
        conn = await asyncpg.connect(admin_dsn)
        try:
            version = await conn.fetchval("show server_version")
            for name in ("bench_ours", "bench_procrastinate", "bench_pgqueuer"):
                await conn.execute(f"drop database if exists {name}")
                await conn.execute(f"create database {name}")
        finally:
            await conn.close()
        await apply_migrations(server.dsn("bench_ours"))
        (ours, theirs, pgq), runs = await _compare(
            [
                Ours(server.dsn("bench_ours"), plan),
                Procrastinate(server.dsn("bench_procrastinate"), plan),
                Pgqueuer(server.dsn("bench_pgqueuer"), plan),
            ],
            plan,
        )
        ours_runs, their_runs = runs["ours"], runs["procrastinate"]
    finally:
        await server.discard()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "ours_per_s": round(ours.per_s, 1),
        "procrastinate_per_s": round(theirs.per_s, 1),
        "ratio": round(ours.per_s / theirs.per_s, 2) if theirs.per_s else None,
        "p50_ms": round(ours.p50_ms, 2),
        "p99_ms": round(ours.p99_ms, 2),
        "procrastinate_p50_ms": round(theirs.p50_ms, 2),
        "procrastinate_p99_ms": round(theirs.p99_ms, 2),
        "pgqueuer_per_s": round(pgq.per_s, 1),
        "ratio_pgqueuer": round(ours.per_s / pgq.per_s, 2) if pgq.per_s else None,
        "pgqueuer_p50_ms": round(pgq.p50_ms, 2),
        "pgqueuer_p99_ms": round(pgq.p99_ms, 2),
        "pgqueuer_runs_per_s": [round(v, 1) for v in runs["pgqueuer"]],
        "pgqueuer_version": _version("pgqueuer"),
        "procrastinate_version": _version("procrastinate"),
        "settings": {
            "ours": f"claim_outbound(limit={plan.batch}), the batch's marks written together (worker.SentMarks: "
            "outbound_mark_sent_many, its commit not waiting for the WAL flush); LISTEN/NOTIFY Subscription, "
            "claiming again at once only after a full batch (as the worker does)",
            "procrastinate": "fetch_job then finish_job per job (its worker's calls); listen_for_jobs",
            "pgqueuer": PGQUEUER_SETTINGS.format(batch=plan.batch),
        },
        "ours_runs_per_s": [round(v, 1) for v in ours_runs],
        "procrastinate_runs_per_s": [round(v, 1) for v in their_runs],
        "latency_samples": ours.latency_samples,
        "messages": plan.messages,
        "rounds": plan.rounds,
        "claimers": plan.claimers,
        "consumers": plan.consumers,
        "batch": plan.batch,
        "offered_per_s": plan.offered_per_s,
        "postgres": version,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "machine": plan.machine,
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def render(result: dict[str, Any]) -> str:
    lines = [
        f"queue benchmark: embedded PostgreSQL {result['postgres']}, best of {result['rounds']} alternating rounds of "
        f"{result['messages']} messages, {result['claimers']} claimers (ours: batches of {result['batch']}), "
        f"latency at {result['offered_per_s']:g} msg/s with {result['consumers']} consumers each",
        "",
        f"{'':28}{'ours':>12}{'procrastinate':>16}{'pgqueuer':>12}",
        f"{'claim+finish per second':28}{result['ours_per_s']:>12.0f}{result['procrastinate_per_s']:>16.0f}"
        f"{result['pgqueuer_per_s']:>12.0f}",
        f"{'enqueue-to-claim p50 (ms)':28}{result['p50_ms']:>12.2f}{result['procrastinate_p50_ms']:>16.2f}"
        f"{result['pgqueuer_p50_ms']:>12.2f}",
        f"{'enqueue-to-claim p99 (ms)':28}{result['p99_ms']:>12.2f}{result['procrastinate_p99_ms']:>16.2f}"
        f"{result['pgqueuer_p99_ms']:>12.2f}",
        "",
        f"throughput ratio (ours / procrastinate): {result['ratio']}; (ours / pgqueuer): {result['ratio_pgqueuer']} (aim >= 1.5)",
        machine_line(result["machine"]),
        f"load average after: {' '.join(f'{v:.2f}' for v in result['load_average_after'])}",
        f"versions: procrastinate {result['procrastinate_version']}, pgqueuer {result['pgqueuer_version']}",
        "settings:",
        *(f"  {name}: {how}" for name, how in result["settings"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_parser = parser("queue", __doc__, quick_help="1000 messages, 2 rounds, 3 s of latency (under a minute)")
    args_parser.add_argument("--claimers", type=int, default=4, help="concurrent claimers (default 4)")
    args_parser.add_argument("--consumers", type=int, default=2, help="consumers in the latency run, each system (default 2)")
    args_parser.add_argument("--rate", type=float, default=200.0, help="offered load for the latency run (msg/s)")
    args_parser.add_argument("--messages", type=int, default=None, help="backlog drained per round (default 3000, 1000 with --quick)")
    args_parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, 2 with --quick)")
    args_parser.add_argument("--seconds", type=float, default=None, help="latency run per system (default 10, 3 with --quick)")
    args = args_parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # procrastinate warns that its App lives in __main__; true here, and harmless.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    plan = Plan(
        messages=args.messages or (1000 if args.quick else 3000),
        rounds=args.rounds or (2 if args.quick else 3),
        claimers=args.claimers,
        peers=200,
        batch=20,
        offered_per_s=args.rate,
        seconds=args.seconds or (3.0 if args.quick else 10.0),
        consumers=args.consumers,
        machine=machine(),
    )
    result = asyncio.run(run(plan))
    print(render(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
