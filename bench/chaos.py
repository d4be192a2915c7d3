"""Chaos suite: real worker.py processes deliver a backlog while everything goes wrong.

    ./start.sh bench chaos [--quick] [--json] [--keep]

1000 messages (``--quick``: 200) from 20 sandbox accounts (``--quick``: 5)
into many chats go through real ``worker.py`` processes while, in turn:
kill -9 of the worker (three times; ``--quick``: once), SIGTERM, a restart of
PostgreSQL (``pg_ctl restart``), PostgreSQL unreachable for 20 s (a TCP
proxy that stalls every connection), Telegram hanging for 30 s, Telegram
dropping connections, flood waits on 10 % of sends, "delivered but the
answer lost" on 5 % of sends, and two replicas running at once.
``--quick`` shortens the outages to a few seconds.

The sandbox world is the ground truth: every chat's received messages are
compared with what was queued for it. Printed: sent, duplicated, lost (queued,
never received and not dead), dead by reason, order violations, messages left
queued, dead-but-delivered, and the time to drain after the last fault. With
``--json`` the last line is one JSON object with at least ``sent``,
``duplicated``, ``lost`` and ``dead``. Exit status 0 when nothing was
duplicated, lost, reordered or left queued; 1 otherwise.

The ingest part is not covered yet.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(ROOT))

import asyncio  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402

from bench._chaos_faults import ChaosProcess, PgProxy  # noqa: E402
from bench._chaos_run import ChaosRun, Step, chaos_main, closing_lines, phase_table, process_lines, reason_lines  # noqa: E402
from shared.db.records import AccountStatus  # noqa: E402
from devkit.sandbox import FaultKind, World  # noqa: E402
from shared.cipher import SessionCipher, generate_key  # noqa: E402


# --- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How big the run is and how long each fault lasts (seconds)."""

    accounts: int
    recipients: int
    per_chat: int
    kills: int
    pg_outage: float
    telegram_hang: float
    drop_window: float
    flood_seconds: int
    flood_share: float = 0.10
    answer_lost_share: float = 0.05
    progress_share: float = 0.2
    progress_timeout: float = 20.0
    send_latency_ms: float = 50.0
    send_jitter_ms: float = 100.0
    seed: int = 10
    drain_timeout: float = 300.0
    timeout_send: float = 4.0
    timeout_db: float = 3.0
    breaker_probe_interval: float | None = None
    """BREAKER_PROBE_INTERVAL; None: the default."""
    poison_chats: int = 2

    @property
    def chats(self) -> int:
        return self.accounts * self.recipients + self.poison_chats

    @property
    def messages(self) -> int:
        return self.chats * self.per_chat


FULL = Plan(accounts=20, recipients=10, per_chat=5, kills=3, pg_outage=20.0, telegram_hang=30.0, drop_window=5.0, flood_seconds=3)
QUICK = Plan(
    accounts=5,
    recipients=8,
    per_chat=5,
    kills=1,
    # Each outage outlasts the deadline it must trip (Telegram hanging 2 s > TIMEOUT_TELEGRAM_SEND,
    # PostgreSQL unreachable 2 s > TIMEOUT_DB), as the full run's do; probes of an open breaker
    # every 0.5 s instead of 2 s, so the next fault does not wait for the end of the last one.
    pg_outage=2.0,
    telegram_hang=2.0,
    drop_window=1.0,
    flood_seconds=1,
    progress_share=0.1,
    progress_timeout=5.0,
    drain_timeout=90.0,
    timeout_send=1.5,
    timeout_db=1.5,
    breaker_probe_interval=0.5,
    poison_chats=1,
)


def worker_env(plan: Plan) -> dict[str, str]:
    """Settings for the workers: short leases, fast polling, retries that outlast the outages.

    A send whose outcome is unknown is retried after 0.5 s (at most one
    attempt per TIMEOUT_TELEGRAM_SEND + 0.5 s while Telegram hangs); other
    transient failures back off 0.5 * 2^n s. MAX_MESSAGE_RETRIES = 14 keeps
    a chat's head alive through the longest outage with room to spare.
    """
    return {
        "PORT": "0",
        "LOG_LEVEL": "INFO",
        "ACCOUNT_LEASE_SECONDS": "3",
        "ACCOUNT_CHECK_INTERVAL": "0.5",
        "OUTBOUND_POLL_INTERVAL": "0.3",
        "OUTBOUND_BATCH_SIZE": "100",
        "RECONCILE_INTERVAL": "30",
        "WATCHDOG_CHECK_INTERVAL": "1",
        "WATCHDOG_MAX_SILENCE": "30",
        "WATCHDOG_STARTUP_GRACE": "5",
        "HEARTBEAT_INTERVAL": "1",
        "RETRY_BASE_DELAY": "0.5",
        "MAX_MESSAGE_RETRIES": "14",
        "TIMEOUT_TELEGRAM_SEND": f"{plan.timeout_send:g}",
        "TIMEOUT_TELEGRAM_ENTITY": "3",
        "TIMEOUT_TELEGRAM_CONNECT": "4",
        "TIMEOUT_TELEGRAM_MEDIA": "5",
        "TIMEOUT_DB": f"{plan.timeout_db:g}",
        "RECONNECT_BACKOFF_MAX": "1",
        "SEND_RATE_PER_ACCOUNT": "1000",
        "SEND_BURST_PER_ACCOUNT": "1000",
        "SEND_RATE_PER_CHAT": "1000",
        "SEND_BURST_PER_CHAT": "1000",
        "SHUTDOWN_GRACE": "4",
        **({"BREAKER_PROBE_INTERVAL": f"{plan.breaker_probe_interval:g}"} if plan.breaker_probe_interval is not None else {}),
    }


# --- the worker processes ------------------------------------------------------------------


class WorkerProcess(ChaosProcess):
    """One ``python worker.py`` with its output in a log file."""

    script = "worker.py"


# --- the run ------------------------------------------------------------------------------------


#: A recipient that does not exist: its messages must fail, each with a reason, and hold up no other chat.
POISON_RECIPIENT = "chaos_nobody_here"


@dataclass
class Chat:
    account: str
    recipient: str
    texts: list[str] = field(default_factory=list)

    @property
    def poison(self) -> bool:
        return self.recipient == POISON_RECIPIENT


class Chaos(ChaosRun[Plan, WorkerProcess]):
    """One chaos run: a database behind a proxy, a sandbox world, worker processes, faults."""

    name = "chaos"
    process_kind = "worker"

    def __init__(self, plan: Plan, *, run_dir: Path) -> None:
        super().__init__(plan, run_dir=run_dir)
        self.proxy: PgProxy | None = None
        self.direct_dsn = ""
        self.proxied_dsn = ""
        self.env: dict[str, str] = {}
        self.chats: list[Chat] = []
        self.account_ids: dict[str, int] = {}
        self.account_peer_ids: dict[int, str] = {}
        self.waves: list[list[tuple[Chat, str]]] = []
        self.enqueued = 0
        self.fault_ids: list[int] = []
        self.latency_rule: int | None = None
        self.cleared_rules: list[dict[str, Any]] = []
        """Fault rules taken away at the end of their phase, as they stood then (their hits count)."""
        self.replicas_leasing = 0

    # set-up --------------------------------------------------------------------------

    async def setup(self) -> None:
        plan = self.plan
        await self.pg.start()
        name = f"chaos_{uuid.uuid4().hex[:8]}"
        self.direct_dsn = await self.pg.create_database(name)
        assert self.pg.socket_path is not None
        self.proxy = PgProxy(unix_path=self.pg.socket_path)
        port = await self.proxy.start()
        self.proxied_dsn = f"postgresql://postgres@127.0.0.1:{port}/{name}"

        world = self.world = World(self.run_dir / "sandbox")
        key = generate_key()
        cipher = SessionCipher(key)
        accounts = [f"chaos_acct_{n:02d}" for n in range(plan.accounts)]
        recipients = [f"chaos_rcpt_{n:02d}" for n in range(plan.recipients)]
        conn = await asyncpg.connect(self.direct_dsn, timeout=10)
        try:
            for n, label in enumerate(accounts):
                phone = f"+1555030{n:04d}"
                peer = await asyncio.to_thread(world.create_user, label, phone=phone)
                self.account_peer_ids[peer.id] = label
                session = cipher.encrypt(await asyncio.to_thread(world.session_string, phone))
                self.account_ids[label] = await conn.fetchval(
                    "select id from account_upsert(p_label => $1, p_phone => $2, p_session_encrypted => $3, p_status => $4)",
                    label,
                    phone,
                    session,
                    AccountStatus.ACTIVE.value,
                )
            for n, label in enumerate(recipients):
                await asyncio.to_thread(world.create_user, label, phone=f"+1555040{n:04d}")
        finally:
            await conn.close()

        self.chats = [Chat(a, r) for a in accounts for r in recipients]
        self.chats += [Chat(accounts[n % len(accounts)], POISON_RECIPIENT) for n in range(plan.poison_chats)]
        # Each chat's messages are spread over the waves (in order, a seeded random
        # pick), so a chat lives through several faults and some waves carry several
        # consecutive messages of one chat.
        rng = random.Random(plan.seed)
        phases = len(self.schedule())
        self.waves = [[] for _ in range(phases)]
        for chat in self.chats:
            for seq, wave in enumerate(sorted(rng.randrange(phases) for _ in range(plan.per_chat))):
                text = f"{chat.account}>{chat.recipient} #{seq:03d}"
                chat.texts.append(text)
                self.waves[wave].append((chat, text))
        for wave in self.waves:
            rng.shuffle(wave)
            wave.sort(key=lambda item: item[0].texts.index(item[1]))  # a chat's messages stay in order

        self.env = {
            **worker_env(plan),
            "DATABASE_URL": self.proxied_dsn,
            "SANDBOX": "1",
            "SANDBOX_DIR": str(world.directory),
            "SESSION_ENCRYPTION_KEY": key,
        }

    # helpers ----------------------------------------------------------------------------

    def new_process(self, number: int) -> WorkerProcess:
        name = f"worker-{number}"
        env = {**self.env, "DATA_DIR": str(self.run_dir / name), "WORKER_ID": f"chaos-{number}"}
        return WorkerProcess(name, env, self.run_dir / f"{name}.log")

    async def enqueue_wave(self) -> int:
        if not self.waves:
            return 0
        wave = self.waves.pop(0)
        conn = await asyncpg.connect(self.direct_dsn, timeout=10)
        try:
            await conn.executemany(
                "select outbound_enqueue(p_account_id => $1, p_peer => $2, p_text => $3, p_dedupe_key => $3)",
                [(self.account_ids[chat.account], chat.recipient, text) for chat, text in wave],
            )
        finally:
            await conn.close()
        self.enqueued += len(wave)
        return len(wave)

    def _delivered_count(self) -> int:
        assert self.world is not None
        return sum(len(self.world.received(chat)) for chat in {c.recipient for c in self.chats if not c.poison})

    async def delivered(self) -> int:
        return await asyncio.to_thread(self._delivered_count)

    async def wave_with_progress(self) -> None:
        """Queue the next wave and wait until part of it went out (so the fault hits sends in flight)."""
        before = await self.delivered()
        size = await self.enqueue_wave()
        target = before + max(1, int(size * self.plan.progress_share))

        async def progressed() -> bool:
            return await self.delivered() >= target

        await self.wait_for(progressed, timeout=self.plan.progress_timeout, what="wave progress")

    async def accounts_leased(self) -> bool:
        conn = await asyncpg.connect(self.direct_dsn, timeout=5)
        try:
            n = await conn.fetchval(
                "select count(*) from telegram_accounts where label like 'chaos_acct_%' "
                "and lease_owner is not null and lease_expires_at > now()"
            )
        finally:
            await conn.close()
        return int(n) == self.plan.accounts

    async def pending(self) -> int:
        conn = await asyncpg.connect(self.direct_dsn, timeout=5)
        try:
            return int(
                await conn.fetchval("select count(*) from messages where direction = 'outbound' and status in ('queued', 'sending')")
            )
        finally:
            await conn.close()

    async def lease_holders(self) -> int:
        """How many processes hold a live lease on one of the run's accounts."""
        conn = await asyncpg.connect(self.direct_dsn, timeout=5)
        try:
            return int(
                await conn.fetchval(
                    "select count(distinct lease_owner) from telegram_accounts where label like 'chaos_acct_%' "
                    "and lease_owner is not null and lease_expires_at > now()"
                )
            )
        finally:
            await conn.close()

    def _clear_rule(self, rule: int) -> None:
        """Take fault ``rule`` away, keeping how it stood (its hits) for the report."""
        assert self.world is not None
        self.cleared_rules += [r for r in self.world.faults() if r["id"] == rule]
        self.world.clear_faults(rule)

    def fault(self, kind: FaultKind, **kwargs: Any) -> int:
        """Add a fault rule ahead of the background latency (the sandbox applies the oldest matching rule)."""
        assert self.world is not None
        if self.latency_rule is not None:
            self.world.clear_faults(self.latency_rule)
        rule = self.world.set_fault(kind, **kwargs)
        self.fault_ids.append(rule.id)
        self.latency_rule = self.world.set_fault(
            FaultKind.LATENCY, method="SendMessage", ms=self.plan.send_latency_ms, jitter_ms=self.plan.send_jitter_ms
        ).id
        return rule.id

    # the faults ---------------------------------------------------------------------------

    def schedule(self) -> list[Step]:
        plan = self.plan
        kills = [(f"kill -9 #{n + 1}", self.kill9) for n in range(plan.kills)]
        steps: list[Step] = [
            kills[0],
            (f"flood waits on {plan.flood_share:.0%} of sends", self.flood),
            ("SIGTERM", self.sigterm),
            (f"Telegram hanging {plan.telegram_hang:g}s", self.telegram_hang),
            (f"Telegram dropping connections {plan.drop_window:g}s", self.telegram_drops),
            (f"answer lost on {plan.answer_lost_share:.0%} of sends", self.answer_lost),
        ]
        if len(kills) > 1:
            steps.append(kills[1])
        steps += [
            ("PostgreSQL restart", self.pg_restart),
            (f"PostgreSQL unreachable {plan.pg_outage:g}s", self.pg_unreachable),
            ("two replicas", self.two_replicas),
        ]
        steps += kills[2:]
        return steps

    async def kill9(self) -> str:
        await self.wave_with_progress()
        victim = self.live()[-1]
        await victim.kill9()
        await self.start_process()
        return f"killed {victim.name}"

    async def flood(self) -> str:
        count = max(1, math.ceil(self.plan.messages * self.plan.flood_share))
        self.fault(FaultKind.FLOOD, method="SendMessage", count=count, seconds=self.plan.flood_seconds)
        await self.wave_with_progress()
        return f"the next {count} sends answer FLOOD_WAIT_{self.plan.flood_seconds}"

    async def sigterm(self) -> str:
        await self.wave_with_progress()
        victim = self.live()[0]
        # The successor starts as the SIGTERM is sent (a deploy's new container), so its start-up
        # overlaps the victim's drain; it takes the accounts the victim hands back.
        successor = await self.start_process()
        code = await victim.terminate(timeout=float(self.env["SHUTDOWN_GRACE"]) + 20)
        self.sigterm_codes.append(code)
        return f"{victim.name} exited with {code}; {successor.name} started with it"

    async def pg_restart(self) -> str:
        await self.wave_with_progress()
        started = time.monotonic()
        await self.pg.restart()
        return f"pg_ctl restart took {time.monotonic() - started:.1f}s"

    async def pg_unreachable(self) -> str:
        assert self.proxy is not None
        await self.wave_with_progress()
        self.proxy.cut()
        try:
            await self.sleep_watching(self.plan.pg_outage)
        finally:
            self.proxy.restore()
        return "every connection stalled, new ones unanswered"

    async def telegram_hang(self) -> str:
        assert self.world is not None
        await self.wave_with_progress()
        rule = self.fault(FaultKind.HANG)
        try:
            await self.sleep_watching(self.plan.telegram_hang)
        finally:
            await asyncio.to_thread(self._clear_rule, rule)
        return "every request unanswered"

    async def telegram_drops(self) -> str:
        assert self.world is not None
        await self.wave_with_progress()
        rule = self.fault(FaultKind.DROP)
        try:
            await self.sleep_watching(self.plan.drop_window)
        finally:
            await asyncio.to_thread(self._clear_rule, rule)
        return "every request drops its connection"

    async def answer_lost(self) -> str:
        count = max(2, math.ceil(self.plan.messages * self.plan.answer_lost_share))
        self.fault(FaultKind.ANSWER_LOST, method="SendMessage", count=count // 2, then="drop")
        self.fault(FaultKind.ANSWER_LOST, method="SendMessage", count=count - count // 2, then="hang")
        await self.wave_with_progress()
        return f"the next {count} sends are stored, then the answer is lost (half drop, half hang)"

    async def two_replicas(self) -> str:
        await self.start_process()
        await self.wave_with_progress()

        async def both_leasing() -> bool:
            self.replicas_leasing = await self.lease_holders()
            return self.replicas_leasing >= 2

        # Two replicas running is not yet two serving: wait until the newcomer holds its share.
        await self.wait_for(both_leasing, timeout=self.plan.progress_timeout * 2, what="two replicas holding accounts")
        return f"{len(self.live())} workers running, {self.replicas_leasing} holding accounts"

    # the run --------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        await self.setup()
        assert self.world is not None
        # Every send takes a little while, so a fault always finds sends in flight.
        self.latency_rule = self.world.set_fault(
            FaultKind.LATENCY, method="SendMessage", ms=self.plan.send_latency_ms, jitter_ms=self.plan.send_jitter_ms
        ).id
        await self.start_process()

        async def leased() -> bool:
            return await self.accounts_leased()

        if not await self.wait_for(leased, timeout=60, what="all accounts leased"):
            raise RuntimeError(f"the worker never leased its accounts; its log ends:\n{self.procs[0].tail()}")
        await self.run_schedule()
        while self.waves:
            await self.enqueue_wave()

        assert self.world is not None
        # Faults not used up by now are part of the story no longer: the end is a clean drain.
        remaining_faults = await asyncio.to_thread(self.world.faults)
        await asyncio.to_thread(self.world.clear_faults)

        async def drained() -> bool:
            return await self.pending() == 0

        return await self.finish(
            drained,
            timeout=self.plan.drain_timeout,
            what="queue drained",
            grace=float(self.env["SHUTDOWN_GRACE"]),
            started_key="workers_started",
            fault_hits=fault_hits([*self.cleared_rules, *remaining_faults]),
            replicas_leasing=self.replicas_leasing,
        )

    async def verdict(self) -> dict[str, Any]:
        """Compare the world with the queue: duplicates, losses, order, the dead and their reasons."""
        assert self.world is not None
        conn = await asyncpg.connect(self.direct_dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "select m.id, a.label, m.peer, m.text, m.status, m.last_error, m.attempts from messages m "
                "join telegram_accounts a on a.id = m.account_id "
                "where m.direction = 'outbound' and m.status is not null order by m.id"
            )
        finally:
            await conn.close()
        by_text = {r["text"]: r for r in rows}
        received: dict[tuple[str, str], list[str]] = defaultdict(list)
        for recipient in sorted({c.recipient for c in self.chats if not c.poison}):
            for message in await asyncio.to_thread(self.world.received, recipient):
                label = self.account_peer_ids.get(message.sender_id or 0)
                if label is not None:
                    received[(label, recipient)].append(message.text or "")

        sent = duplicated = lost = order_violations = unexpected = 0
        dead_by_reason: Counter[str] = Counter()
        dead_but_delivered = marked_sent_not_received = failures_without_reason = poison_not_failed = 0
        examples: dict[str, list[str]] = defaultdict(list)
        for chat in self.chats:
            got = received.get((chat.account, chat.recipient), [])
            expected = set(chat.texts)
            counts = Counter(got)
            for text, n in counts.items():
                if text not in expected:
                    unexpected += n
                elif n > 1:
                    duplicated += n - 1
                    examples["duplicated"].append(text)
            position = {t: i for i, t in enumerate(chat.texts)}
            firsts = [position[t] for t in dict.fromkeys(got) if t in position]
            violations = sum(1 for a, b in zip(firsts, firsts[1:], strict=False) if b < a)
            order_violations += violations
            if violations:
                examples["out_of_order"].append(f"{chat.account}>{chat.recipient}")
            for text in chat.texts:
                row = by_text.get(text)
                status = row["status"] if row is not None else None
                if text in counts:
                    sent += 1
                    if status in ("dead", "failed"):
                        dead_but_delivered += 1
                    continue
                if chat.poison and status != "failed":
                    poison_not_failed += 1
                if status in ("dead", "failed"):
                    reason = (row["last_error"] or "").strip() if row is not None else ""
                    if not reason:
                        failures_without_reason += 1
                    dead_by_reason[f"{status}: {reason[:120] or '(no reason)'}"] += 1
                else:
                    lost += 1
                    examples["lost"].append(f"{text} ({status})")
                    if status == "sent":
                        marked_sent_not_received += 1
        left_queued = sum(1 for r in rows if r["status"] in ("queued", "sending"))
        dead_total = sum(dead_by_reason.values())
        ok = (
            duplicated == 0
            and lost == 0
            and left_queued == 0
            and order_violations == 0
            and unexpected == 0
            and failures_without_reason == 0
        )
        return {
            "ok": ok,
            "enqueued": self.enqueued,
            "sent": sent,
            "duplicated": duplicated,
            "lost": lost,
            "dead": dead_total,
            "dead_by_reason": dict(dead_by_reason.most_common()),
            "left_queued": left_queued,
            "order_violations": order_violations,
            "unexpected_messages": unexpected,
            "dead_but_delivered": dead_but_delivered,
            "marked_sent_not_received": marked_sent_not_received,
            "failures_without_reason": failures_without_reason,
            "poison_messages": sum(len(c.texts) for c in self.chats if c.poison),
            "poison_not_failed": poison_not_failed,
            "max_attempts": max((r["attempts"] for r in rows), default=0),
            "examples": {k: v[:5] for k, v in examples.items()},
        }

    async def close(self) -> None:
        await self.kill_all()
        if self.proxy is not None:
            await self.proxy.stop()
        await super().close()


# --- the command line ---------------------------------------------------------------------------


def fault_hits(rules: list[dict[str, Any]]) -> dict[str, int]:
    """Hits per kind of fault rule (the background latency is not a fault)."""
    hits: Counter[str] = Counter()
    for rule in rules:
        if rule["kind"] == FaultKind.LATENCY.value:
            continue
        name = f"{rule['kind']}:{rule['method']}" + (f":{rule['then']}" if rule["kind"] == FaultKind.ANSWER_LOST.value else "")
        hits[name] += int(rule["hits"] or 0)
    return dict(hits)


def report(result: dict[str, Any], plan: Plan) -> str:
    lines = [
        f"chaos: {plan.messages} messages, {plan.accounts} accounts x {plan.recipients} recipients"
        f" + {plan.poison_chats} chat(s) to a user that does not exist, "
        f"{result.get('workers_started', 0)} worker processes started",
        *phase_table(result, width=44),
        f"sent (received exactly)  {result['sent']}",
        f"duplicated               {result['duplicated']}",
        f"lost                     {result['lost']}",
        f"dead / failed            {result['dead']}",
        *reason_lines(result["dead_by_reason"]),
        f"left queued              {result['left_queued']}",
        f"order violations         {result['order_violations']}",
        f"dead but delivered       {result['dead_but_delivered']}",
        f"poison not failed        {result['poison_not_failed']} of {result['poison_messages']} (to a user that does not exist)",
        f"sent but not received    {result['marked_sent_not_received']}",
        *process_lines(result),
        f"fault hits               {result.get('fault_hits')}",
        f"replicas holding accounts {result.get('replicas_leasing')} (at once, in the two-replica phase)",
        *closing_lines(result),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quick_help = "200 messages, 5 accounts, outages of seconds (the CI form)"
    return chaos_main(argv, Chaos, doc=__doc__, plans=(FULL, QUICK), quick_help=quick_help, report=report)


if __name__ == "__main__":
    sys.exit(main())
