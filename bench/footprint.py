"""Benchmark: memory (RSS) and CPU of an idle worker.py with 1, 20 and 100 sandbox accounts.

    ./start.sh bench footprint [--quick] [--json] [--seconds S] [--accounts 1,20,100]

For each account count: a fresh database on one embedded PostgreSQL and a
fresh sandbox world with that many accounts (sessions encrypted, as in
production); ``python worker.py`` with the default configuration starts,
connects and leases every account, settles for 3 s (``--settle``), and is
then sampled once a second for 60 s (3 s with ``--quick``, which also skips
100 accounts). Nothing is sent or received: this is the cost of being ready
(connections, update handlers, lease renewals, heartbeats, loops).

Columns: RSS mean and max in MB (the worker process and any children;
PostgreSQL is not counted: it is shared and a separate service in
production), CPU as a percentage of one core over the window (user +
system time / wall time), and the start time (process start to every
account leased). Aim at 20 accounts: at most 150 MB and 2 % of a core.
A benchmark, not a test: nothing here asserts on resources.
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
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

from bench._common import (  # noqa: E402
    BenchDatabase,
    WorkerProcess,
    emit,
    leased_accounts,
    machine,
    machine_line,
    make_accounts,
    parser,
    progress,
    wait_until,
    worker_env,
)

logger = logging.getLogger("bench.footprint")

SETTLE_SECONDS = 3.0
"""Pause between the last account leased and the first sample (``--settle``)."""


@dataclass
class Footprint:
    accounts: int
    rss_mean_mb: float
    rss_max_mb: float
    cpu_percent: float
    start_s: float
    seconds: float
    samples: int


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _rss(processes: list[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


async def measure(bench_db: BenchDatabase, n: int, seconds: float, *, settle: float = SETTLE_SECONDS) -> Footprint:
    progress(f"{n} idle account(s): starting worker.py")
    dsn = await bench_db.create(f"bench_fp_{n}")
    accounts = await make_accounts(dsn, bench_db.root / f"sandbox-{n}", n, recipients=1)
    env = worker_env(dsn=dsn, accounts=accounts, data_dir=bench_db.root / f"data-{n}")
    worker = await WorkerProcess(env, bench_db.root / f"worker-{n}.log").start()
    try:
        leased_at = await wait_until(
            lambda: _leased(dsn, n), timeout=60 + n, what=f"{n} accounts leased", interval=0.1, check=worker.check_alive
        )
        start_s = leased_at - worker.started_at
        await asyncio.sleep(settle)  # a pause that is part of the measurement: start-up work is not counted
        worker.check_alive()
        progress(f"{n} idle account(s): sampling for {seconds:g} s")
        processes = _tree(worker.pid)
        cpu_before = _cpu_seconds(processes)
        wall_before = time.monotonic()
        samples: list[int] = []
        while time.monotonic() - wall_before < seconds:
            samples.append(_rss(processes))
            await asyncio.sleep(1.0)
        wall = time.monotonic() - wall_before
        cpu = _cpu_seconds(processes) - cpu_before
        worker.check_alive()
    finally:
        await worker.stop()
        await asyncio.to_thread(accounts.world.close)
    return Footprint(
        accounts=n,
        rss_mean_mb=round(sum(samples) / len(samples) / 1024**2, 1),
        rss_max_mb=round(max(samples) / 1024**2, 1),
        cpu_percent=round(100 * cpu / wall, 2),
        start_s=round(start_s, 1),
        seconds=round(wall, 1),
        samples=len(samples),
    )


async def _leased(dsn: str, n: int) -> bool:
    return await leased_accounts(dsn) >= n


async def run(*, counts: list[int], seconds: float, settle: float = SETTLE_SECONDS) -> dict[str, Any]:
    info = machine()
    results: list[Footprint] = []
    async with BenchDatabase("bench-footprint-") as bench_db:
        for n in counts:
            results.append(await measure(bench_db, n, seconds, settle=settle))
        version = bench_db.version
    headline = next((r for r in results if r.accounts == 20), results[-1])
    return {
        "benchmark": "footprint",
        "accounts": headline.accounts,
        "rss_mb": headline.rss_max_mb,
        "cpu_percent": headline.cpu_percent,
        "aim": "at 20 accounts: <= 150 MB and <= 2 % of a core",
        "cases": [asdict(r) for r in results],
        "seconds": seconds,
        "postgres": version,
        "machine": info,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"footprint benchmark: idle worker.py (default configuration, sandbox mode), {result['seconds']:g} s per case, "
        f"embedded PostgreSQL {result['postgres']} (not counted)",
        f"machine: {machine_line(result['machine'])}; load average after: "
        f"{' '.join(f'{v:.2f}' for v in result['load_average_after'])}",
        "",
        f"{'accounts':>8} | {'RSS mean MB':>11} {'RSS max MB':>10} | {'CPU % of a core':>15} | {'start s':>7}",
    ]
    for c in result["cases"]:
        lines.append(
            f"{c['accounts']:>8} | {c['rss_mean_mb']:>11.1f} {c['rss_max_mb']:>10.1f} | {c['cpu_percent']:>15.2f} | {c['start_s']:>7.1f}"
        )
    lines += [
        "",
        f"at {result['accounts']} accounts: {result['rss_mb']} MB (aim <= 150), {result['cpu_percent']} % of a core (aim <= 2)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_parser = parser("footprint", __doc__)
    args_parser.add_argument("--seconds", type=float, default=None, help="sampling window per case (default 60, 3 with --quick)")
    args_parser.add_argument("--accounts", default=None, help="account counts (default 1,20,100; 1,20 with --quick)")
    args_parser.add_argument(
        "--settle", type=float, default=SETTLE_SECONDS,
        help=f"seconds between every account leased and the first sample (default {SETTLE_SECONDS:g})",
    )
    args = args_parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    counts = [int(c) for c in (args.accounts or ("1,20" if args.quick else "1,20,100")).split(",")]
    seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 60.0)
    started = time.monotonic()
    result = asyncio.run(run(counts=counts, seconds=seconds, settle=args.settle))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    emit(render(result), result, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
