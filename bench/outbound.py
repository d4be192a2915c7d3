"""Benchmark: outbound enqueue-to-delivered latency of worker.py, next to seed 004's polling loop.

    ./start.sh bench outbound [--quick] [--json] [--seconds S] [--rates 50,200,1000] [--accounts 20] [--otlp-hung]

What runs: ``python worker.py`` as a child process on an embedded
PostgreSQL (default settings, fsync on) and the Telegram sandbox with no
added latency, serving 20 sandbox accounts that write to 10 recipients
each. SEND_RATE_PER_ACCOUNT/CHAT and their bursts are raised to 100000 for
this run (the defaults, 20/s per account and 1/s per chat, would make the
token buckets the subject of the measurement); everything else is the
default configuration.

This process offers each load (50, 200 and 1000 messages/s spread over the
accounts, 30 s each; 200/s for 2 s with --quick) by calling ``outbound_enqueue`` on schedule, then waits
until every message is delivered. Latency is ``messages.sent_at -
messages.created_at`` (both stamped by PostgreSQL's clock: the enqueue's
transaction and the mark-sent after the sandbox accepted the message);
throughput is delivered messages over the time from the first enqueue to
the last delivery.

The baseline, in the same run on the same database and world, after the
worker has stopped: seed 004's design (bench/baselines/seed004.py), one loop
that every 2 s selects the queued rows and sends them one at a time with
``client.send_message``. The baseline gets a deadline (load + 30 s, + 5 s
with --quick); rows still queued then count with their age at the deadline,
a lower bound (marked with ``>=`` in the table).

``--realistic`` asks another question: how close does the worker get to
what Telegram allows? The sandbox answers every request after 150 +- 50 ms
(its latency fault), the send limits are the defaults (20/s per account
with a burst of 20, 1/s per chat with a burst of 5) and the sandbox's own
flood limits are set to the same numbers, so a worker that overshoots gets
real FLOOD_WAIT answers. 20 accounts x 10 chats allow at most 200
messages/s, spread evenly; the offered loads are 50 %, 100 % and 150 % of
that (100, 200, 300/s; 30 s each, 5 s with --quick). Per load: delivered/s
(first enqueue to last delivery), ``efficiency`` = delivered/s / min(offered,
200), p50/p99 enqueue-to-sent, ``flood_waits`` (FLOOD_WAIT answers the
sandbox gave) and at 150 % the backlog (queued + sending, sampled every
second) and the rate it drained at once the offer stopped. The 100 % figures
are repeated at the top level of the JSON.

With ``--otlp-hung`` the worker traces every send (OTEL_EXPORTER_OTLP_ENDPOINT
set) to an OTLP/HTTP collector in this process that accepts each request
and never answers: the cost of tracing when the collector is stuck, to set
beside a run without the flag.

Read it as: p50/p99/max per load, ours next to the baseline; ``per_s`` is
what was delivered per second (at most the offered load). Figures depend on
the machine and on its other load (the load average is printed). A
benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ first on sys.path would let bench/queue.py shadow the standard library's queue.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402

from bench._common import (  # noqa: E402
    UNLIMITED_SENDS,
    Accounts,
    BenchDatabase,
    WorkerProcess,
    emit,
    fixed_rate,
    leased_accounts,
    machine,
    machine_line,
    make_accounts,
    parser,
    percentile,
    progress,
    rounded,
    wait_until,
    worker_env,
)
from bench.baselines.seed004 import Seed004Outbound  # noqa: E402

logger = logging.getLogger("bench.outbound")


@dataclass
class LoadResult:
    """One offered load on one system."""

    system: str
    offered_per_s: float
    achieved_offer_per_s: float
    messages: int
    delivered: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    per_s: float | None
    lower_bound: bool


async def measure(dsn: str, tag: str, *, deadline_age: bool) -> tuple[int, int, list[float], float | None]:
    """(messages, delivered, latencies in ms, delivered per second) of the rows tagged ``tag``.

    With ``deadline_age`` the rows not delivered count with their age now (a lower bound).
    """
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "select status = 'sent' as sent, extract(epoch from coalesce(sent_at, clock_timestamp()) - created_at) * 1000 as ms, "
            "created_at, sent_at from messages where text like $1",
            f"{tag}:%",
        )
    finally:
        await conn.close()
    delivered = [r for r in rows if r["sent"]]
    latencies = [float(r["ms"]) for r in (rows if deadline_age else delivered)]
    per_s = None
    if delivered:
        span = (max(r["sent_at"] for r in delivered) - min(r["created_at"] for r in rows)).total_seconds()
        per_s = len(delivered) / span if span > 0 else None
    return len(rows), len(delivered), latencies, per_s


async def delivered_count(dsn: str, tag: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval("select count(*) from messages where text like $1 and status = 'sent'", f"{tag}:%"))
    finally:
        await conn.close()


async def offer(pool: asyncpg.Pool, accounts: Accounts, tag: str, rate: float, seconds: float) -> tuple[int, float]:
    """Enqueue ``rate * seconds`` messages on schedule, round-robin over accounts and recipients."""
    count = max(1, int(rate * seconds))
    n_accounts = len(accounts.ids)

    async def one(i: int) -> None:
        account = accounts.ids[i % n_accounts]
        peer = accounts.recipients[(i // n_accounts) % len(accounts.recipients)]
        await pool.execute(
            "select 1 from outbound_enqueue(p_account_id => $1, p_peer => $2, p_text => $3)", account, peer, f"{tag}:{i}"
        )

    achieved = await fixed_rate(count, rate, one)
    return count, achieved


async def run_load(
    system: str, dsn: str, pool: asyncpg.Pool, accounts: Accounts, rate: float, seconds: float, *, drain: float,
    check: Any = None, lower_bound_ok: bool = False,
) -> LoadResult:
    tag = f"{system}-{rate:g}"
    progress(f"{system}: {rate:g} messages/s for {seconds:g} s")
    count, achieved = await offer(pool, accounts, tag, rate, seconds)
    timed_out = False
    try:
        await wait_until(
            lambda: _all_delivered(dsn, tag, count), timeout=drain, what=f"{tag} delivered", interval=0.2, check=check
        )
    except TimeoutError:
        if not lower_bound_ok:
            raise
        timed_out = True
    messages, delivered, latencies, per_s = await measure(dsn, tag, deadline_age=timed_out)
    return LoadResult(
        system=system,
        offered_per_s=rate,
        achieved_offer_per_s=round(achieved, 1),
        messages=messages,
        delivered=delivered,
        p50_ms=rounded(percentile(latencies, 50)),
        p99_ms=rounded(percentile(latencies, 99)),
        max_ms=rounded(max(latencies) if latencies else None),
        per_s=rounded(per_s),
        lower_bound=timed_out,
    )


async def _all_delivered(dsn: str, tag: str, count: int) -> bool:
    return await delivered_count(dsn, tag) >= count


async def hung_collector() -> tuple[Any, str]:
    """An OTLP/HTTP endpoint that reads each export and never answers (a stuck collector)."""
    from aiohttp import web

    stuck = asyncio.Event()

    async def never(request: web.Request) -> web.Response:
        await request.read()
        await stuck.wait()
        return web.Response()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", never)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def run(*, rates: list[float], seconds: float, n_accounts: int, baseline_grace: float, otlp_hung: bool = False) -> dict[str, Any]:
    info = machine()
    collector, tracing_env = None, {}
    if otlp_hung:
        collector, endpoint = await hung_collector()
        tracing_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    async with BenchDatabase("bench-outbound-") as bench_db:
        dsn = await bench_db.create("bench_outbound")
        accounts = await make_accounts(dsn, bench_db.root / "sandbox", n_accounts, recipients=10)
        env = worker_env(dsn=dsn, accounts=accounts, data_dir=bench_db.root / "worker-data", extra={**UNLIMITED_SENDS, **tracing_env})
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=16)
        ours: list[LoadResult] = []
        theirs: list[LoadResult] = []
        try:
            worker = await WorkerProcess(env, bench_db.root / "worker.log").start()
            try:
                progress(f"worker.py starting with {n_accounts} sandbox accounts")
                await wait_until(lambda: _leased(dsn, n_accounts), timeout=90, what="accounts leased", check=worker.check_alive)
                # Warm up: every chat once (entity cache, connections), not measured.
                await offer(pool, accounts, "warm", n_accounts * len(accounts.recipients), 1.0)
                await wait_until(
                    lambda: _all_delivered(dsn, "warm", n_accounts * len(accounts.recipients)),
                    timeout=90, what="warm-up delivered", interval=0.2, check=worker.check_alive,
                )
                for rate in rates:
                    ours.append(
                        await run_load("ours", dsn, pool, accounts, rate, seconds, drain=seconds + 120, check=worker.check_alive)
                    )
            finally:
                await worker.stop()
            progress("baseline (seed 004): connecting its clients")
            world = accounts.world
            sessions = await asyncio.to_thread(
                lambda: {aid: world.session_string(label) for aid, label in zip(accounts.ids, accounts.labels, strict=True)}
            )
            baseline = Seed004Outbound(dsn, accounts.world_dir, sessions)
            await baseline.start()
            loop = asyncio.create_task(baseline.run())
            try:
                for rate in rates:
                    theirs.append(
                        await run_load(
                            "baseline", dsn, pool, accounts, rate, seconds, drain=seconds + baseline_grace, lower_bound_ok=True
                        )
                    )
                    # Rows the baseline did not reach stay queued; take them out of the next load's way.
                    await pool.execute("update messages set status = 'failed' where status = 'queued' and text like 'baseline-%'")
            finally:
                await baseline.stop()
                loop.cancel()
                try:
                    await loop
                except (asyncio.CancelledError, Exception):
                    pass
        finally:
            await pool.close()
            if collector is not None:
                await collector.cleanup()
    headline_rate = 200.0 if 200.0 in rates else rates[0]
    ours_h = next(r for r in ours if r.offered_per_s == headline_rate)
    theirs_h = next(r for r in theirs if r.offered_per_s == headline_rate)
    speedup = (theirs_h.p50_ms / ours_h.p50_ms) if ours_h.p50_ms and theirs_h.p50_ms else None
    return {
        "benchmark": "outbound",
        "headline_rate": headline_rate,
        "p50_ms": ours_h.p50_ms,
        "p99_ms": ours_h.p99_ms,
        "max_ms": ours_h.max_ms,
        "per_s": ours_h.per_s,
        "baseline_p50_ms": theirs_h.p50_ms,
        "baseline_p99_ms": theirs_h.p99_ms,
        "baseline_per_s": theirs_h.per_s,
        "p50_speedup": rounded(speedup, 1),
        "aim": "p99 <= 100 ms at 200/s; p50 >= 20x better than the baseline",
        "loads": [asdict(r) for r in ours + theirs],
        "seconds_per_load": seconds,
        "accounts": n_accounts,
        "recipients_per_account": 10,
        "settings": {**UNLIMITED_SENDS, "other": "defaults"},
        "tracing": "every send traced to a collector that never answers" if otlp_hung else "off",
        "postgres": bench_db.version,
        "machine": info,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


# --- --realistic: against Telegram's own limits ------------------------------------------

#: The default send limits (shared/config.py), mirrored by the sandbox's flood limits.
DEFAULT_LIMITS = {"per_account_rate": 20.0, "per_account_burst": 20, "per_chat_rate": 1.0, "per_chat_burst": 5}
LATENCY_MS, JITTER_MS = 100.0, 100.0  # 100..200 ms: 150 +- 50 ms on every request


def flood_waits(world: Any) -> int:
    """FLOOD_WAIT (and FLOOD_PREMIUM_WAIT) answers the sandbox has given so far."""
    answers = world.limit_answers()
    return int(answers.get("FLOOD_WAIT", 0) + answers.get("FLOOD_PREMIUM_WAIT", 0))


async def backlog(dsn: str, tag: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval(
            "select count(*) from messages where text like $1 and status in ('queued', 'sending')", f"{tag}:%"
        ))
    finally:
        await conn.close()


async def run_realistic_load(
    dsn: str, pool: asyncpg.Pool, accounts: Accounts, percent: float, cap: float, seconds: float, *, check: Any
) -> dict[str, Any]:
    rate = cap * percent / 100
    tag = f"real-{percent:g}"
    progress(f"realistic: {percent:g} % = {rate:g} messages/s for {seconds:g} s")
    world = accounts.world
    floods_before = await asyncio.to_thread(flood_waits, world)
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append((round(time.monotonic() - started, 1), await backlog(dsn, tag)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)  # a sample a second; the end ends the wait

    sampler = asyncio.create_task(sample())
    try:
        count, achieved = await offer(pool, accounts, tag, rate, seconds)
        offer_ended = time.monotonic() - started
        left_at_end = await backlog(dsn, tag)
        drain_started = time.monotonic()
        await wait_until(lambda: _all_delivered(dsn, tag, count), timeout=seconds * 3 + 120, what=f"{tag} delivered",
                         interval=0.2, check=check)
        drain_s = time.monotonic() - drain_started
    finally:
        done.set()
        await sampler
    messages, delivered, latencies, per_s = await measure(dsn, tag, deadline_age=False)
    floods = await asyncio.to_thread(flood_waits, world) - floods_before
    bound = min(rate, cap)
    result: dict[str, Any] = {
        "percent": percent,
        "offered_per_s": rate,
        "achieved_offer_per_s": round(achieved, 1),
        "limit_bound_per_s": bound,
        "messages": messages,
        "delivered": delivered,
        "delivered_per_s": rounded(per_s),
        "efficiency": rounded(per_s / bound, 3) if per_s else None,
        "p50_ms": rounded(percentile(latencies, 50)),
        "p99_ms": rounded(percentile(latencies, 99)),
        "flood_waits": floods,
    }
    peak = max((n for _, n in samples), default=0)
    result["backlog"] = {
        "peak": peak,
        "at_offer_end": left_at_end,
        "offer_ended_s": round(offer_ended, 1),
        "drain_s": round(drain_s, 1),
        "drain_per_s": rounded(left_at_end / drain_s) if drain_s > 0 and left_at_end else None,
        "samples": samples,
    }
    return result


async def run_realistic(*, seconds: float, n_accounts: int, chats: int, percents: list[float]) -> dict[str, Any]:
    from devkit.sandbox import FaultKind

    info = machine()
    cap = n_accounts * min(DEFAULT_LIMITS["per_account_rate"], chats * DEFAULT_LIMITS["per_chat_rate"])
    async with BenchDatabase("bench-outbound-real-") as bench_db:
        dsn = await bench_db.create("bench_outbound")
        accounts = await make_accounts(dsn, bench_db.root / "sandbox", n_accounts, recipients=chats)
        world = accounts.world
        env = worker_env(dsn=dsn, accounts=accounts, data_dir=bench_db.root / "worker-data", extra={"SANDBOX": "1"})
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=16)
        loads: list[dict[str, Any]] = []
        try:
            worker = await WorkerProcess(env, bench_db.root / "worker.log").start()
            try:
                progress(f"worker.py starting with {n_accounts} sandbox accounts x {chats} chats, default limits")
                await wait_until(lambda: _leased(dsn, n_accounts), timeout=120, what="accounts leased", check=worker.check_alive)
                await offer(pool, accounts, "warm", float(n_accounts * chats), 1.0)  # one message per chat
                await wait_until(lambda: _all_delivered(dsn, "warm", n_accounts * chats), timeout=120,
                                 what="warm-up delivered", interval=0.2, check=worker.check_alive)
                await asyncio.to_thread(world.set_fault, FaultKind.LATENCY, method="*", ms=LATENCY_MS, jitter_ms=JITTER_MS)
                await asyncio.to_thread(
                    world.set_flood_limit, "account",
                    rate=DEFAULT_LIMITS["per_account_rate"], burst=DEFAULT_LIMITS["per_account_burst"],
                )
                await asyncio.to_thread(
                    world.set_flood_limit, "chat", rate=DEFAULT_LIMITS["per_chat_rate"], burst=DEFAULT_LIMITS["per_chat_burst"]
                )
                # Warm-up with the latency and limits in place (not measured): one message per chat.
                await offer(pool, accounts, "warm-latency", cap / 2, n_accounts * chats / (cap / 2))
                await wait_until(lambda: _all_delivered(dsn, "warm-latency", n_accounts * chats), timeout=120,
                                 what="second warm-up delivered", interval=0.2, check=worker.check_alive)
                for percent in percents:
                    loads.append(await run_realistic_load(dsn, pool, accounts, percent, cap, seconds, check=worker.check_alive))
            finally:
                await asyncio.to_thread(world.clear_faults)
                await asyncio.to_thread(world.clear_flood_limits)
                await worker.stop()
        finally:
            await pool.close()
        version = bench_db.version
    full = next((r for r in loads if r["percent"] == 100.0), loads[0])
    return {
        "benchmark": "outbound",
        "mode": "realistic",
        "limit_bound_per_s": cap,
        "efficiency": full["efficiency"],
        "delivered_per_s": full["delivered_per_s"],
        "p50_ms": full["p50_ms"],
        "p99_ms": full["p99_ms"],
        "flood_waits": full["flood_waits"],
        "aim": "efficiency >= 0.95 with 0 FloodWaits at 100 %",
        "loads": loads,
        "seconds_per_load": seconds,
        "accounts": n_accounts,
        "chats_per_account": chats,
        "settings": {
            "sandbox_latency": f"{LATENCY_MS + JITTER_MS / 2:g} +- {JITTER_MS / 2:g} ms on every request",
            "send_limits": "defaults: SEND_RATE_PER_ACCOUNT=20, SEND_BURST_PER_ACCOUNT=20, SEND_RATE_PER_CHAT=1, SEND_BURST_PER_CHAT=5",
            "sandbox_flood_limits": "the same numbers (account 20/s burst 20, chat 1/s burst 5)",
            "other": "defaults",
        },
        "postgres": version,
        "machine": info,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


def render_realistic(result: dict[str, Any]) -> str:
    lines = [
        f"outbound against Telegram's limits: worker.py, {result['accounts']} sandbox accounts x "
        f"{result['chats_per_account']} chats, embedded PostgreSQL {result['postgres']}, {result['seconds_per_load']:g} s per load",
        f"sandbox: {result['settings']['sandbox_latency']}; flood limits: {result['settings']['sandbox_flood_limits']}",
        f"worker: {result['settings']['send_limits']}; everything else default",
        f"limit-bound maximum: {result['limit_bound_per_s']:g} messages/s",
        f"machine: {machine_line(result['machine'])}; load average after: {' '.join(f'{v:.2f}' for v in result['load_average_after'])}",
        "",
        f"{'load':>5} {'offered/s':>9} {'delivered/s':>11} {'efficiency':>10} {'p50 ms':>8} {'p99 ms':>9} {'FloodWaits':>10}",
    ]
    for r in result["loads"]:
        eff = f"{r['efficiency']:.3f}" if r["efficiency"] is not None else "-"
        lines.append(
            f"{r['percent']:>4g}% {r['offered_per_s']:>9g} {r['delivered_per_s'] or 0:>11.1f} {eff:>10} "
            f"{_ms(r['p50_ms'], False):>8} {_ms(r['p99_ms'], False):>9} {r['flood_waits']:>10}"
        )
    over = next((r for r in result["loads"] if r["percent"] > 100), None)
    if over is not None:
        b = over["backlog"]
        lines.append(
            f"backlog at {over['percent']:g} %: peak {b['peak']}, {b['at_offer_end']} left when the offer stopped at "
            f"{b['offer_ended_s']:g} s, drained in {b['drain_s']:g} s ({b['drain_per_s']} messages/s)"
        )
    lines += ["", f"at 100 %: efficiency {result['efficiency']}, {result['flood_waits']} FloodWaits (aim >= 0.95 with 0)"]
    return "\n".join(lines)


async def _leased(dsn: str, n: int) -> bool:
    return await leased_accounts(dsn) >= n


def _ms(value: float | None, lower: bool) -> str:
    if value is None:
        return "-"
    return f"{'>=' if lower else ''}{value:.1f}"


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"outbound benchmark: worker.py, {result['accounts']} sandbox accounts x {result['recipients_per_account']} recipients, "
        f"embedded PostgreSQL {result['postgres']}, no added latency, {result['seconds_per_load']:g} s per load",
        "settings raised for the load test: SEND_RATE_PER_ACCOUNT/CHAT and bursts = 100000 (others default)",
        f"tracing: {result.get('tracing', 'off')}",
        f"machine: {machine_line(m)}; load average after: {' '.join(f'{v:.2f}' for v in result['load_average_after'])}",
        "",
        f"{'offered/s':>9} | {'ours p50':>9} {'p99':>8} {'max':>8} {'per_s':>7} | "
        f"{'seed004 p50':>12} {'p99':>9} {'max':>9} {'per_s':>7} | {'p50 x':>6}",
    ]
    loads = result["loads"]
    for ours in (r for r in loads if r["system"] == "ours"):
        base = next((r for r in loads if r["system"] == "baseline" and r["offered_per_s"] == ours["offered_per_s"]), None)
        lb = bool(base and base["lower_bound"])
        factor = (base["p50_ms"] / ours["p50_ms"]) if base and base["p50_ms"] and ours["p50_ms"] else None
        lines.append(
            f"{ours['offered_per_s']:>9g} | {_ms(ours['p50_ms'], False):>9} {_ms(ours['p99_ms'], False):>8} "
            f"{_ms(ours['max_ms'], False):>8} {ours['per_s'] or 0:>7.0f} | "
            f"{_ms(base and base['p50_ms'], lb):>12} {_ms(base and base['p99_ms'], lb):>9} {_ms(base and base['max_ms'], lb):>9} "
            f"{(base and base['per_s']) or 0:>7.0f} | {('%.0f' % factor) if factor else '-':>6}"
        )
    for r in loads:
        if r["achieved_offer_per_s"] < 0.95 * r["offered_per_s"]:
            lines.append(f"note: {r['system']} at {r['offered_per_s']:g}/s: the enqueuer reached only {r['achieved_offer_per_s']:g}/s")
        if r["delivered"] < r["messages"]:
            lines.append(f"note: {r['system']} at {r['offered_per_s']:g}/s: {r['messages'] - r['delivered']} of {r['messages']} "
                         "not delivered by the deadline (latencies are lower bounds)")
    lines += [
        "",
        f"at {result['headline_rate']:g}/s: p99 {result['p99_ms']} ms (aim <= 100), p50 {result['p50_speedup']}x better than "
        "seed 004's loop (aim >= 20)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_parser = parser("outbound", __doc__)
    args_parser.add_argument("--seconds", type=float, default=None, help="seconds per offered load (default 30, 2 with --quick)")
    args_parser.add_argument("--rates", default=None, help="offered loads, messages/s (default 50,200,1000; 200 with --quick)")
    args_parser.add_argument("--accounts", type=int, default=20, help="sandbox accounts (default 20)")
    args_parser.add_argument("--realistic", action="store_true",
                             help="150 +- 50 ms per request, default limits, sandbox flood limits: efficiency and FloodWaits")

    args_parser.add_argument("--otlp-hung", action="store_true", help="trace every send to an OTLP collector that never answers")
    args = args_parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.realistic:
        started = time.monotonic()
        result = asyncio.run(run_realistic(
            seconds=args.seconds if args.seconds is not None else (5.0 if args.quick else 30.0),
            n_accounts=args.accounts, chats=10, percents=[50.0, 100.0, 150.0],
        ))
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        emit(render_realistic(result), result, as_json=args.json)
        return 0
    rates = [float(r) for r in (args.rates or ("200" if args.quick else "50,200,1000")).split(",")]
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 30.0)
    started = time.monotonic()
    result = asyncio.run(
        run(rates=rates, seconds=seconds, n_accounts=args.accounts, baseline_grace=5.0 if args.quick else 30.0, otlp_hung=args.otlp_hung)
    )
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    emit(render(result), result, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
