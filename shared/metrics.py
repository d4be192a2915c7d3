"""Every Prometheus metric family of the kit, defined once.

Modules import the family they update; the status server exposes the default
registry at ``/metrics``. Label values stay low-cardinality (an operation
name, a loop name, a breaker name, an account label), never an id, a chat
or a peer. Names follow Prometheus' conventions: base units (seconds,
bytes), ``_total`` for counters. The bots call the small functions at the
end (``message_sent`` ...) with one line where the event happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from shared import tracing
from shared.trends import trends

logger = logging.getLogger(__name__)

OP_CALLS = Counter(
    "bot_operation_calls_total",
    "Calls made through telegram_op/db_op/deadline, by operation and outcome",
    ["operation", "outcome"],
)
OP_LATENCY = Histogram(
    "bot_operation_seconds",
    "Latency of calls made through telegram_op/db_op/deadline",
    ["operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BREAKER_STATE = Gauge("bot_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open", ["breaker"])
BREAKER_TRANSITIONS = Counter("bot_breaker_transitions_total", "Circuit breaker state changes", ["breaker", "to"])
LOOP_RESTARTS = Counter("bot_loop_restarts_total", "Loops restarted by the watchdog", ["loop", "reason"])
LOOP_ABANDONED = Counter("bot_loop_abandoned_total", "Loop tasks that ignored cancellation and were abandoned", ["loop"])
LOOP_CYCLE_ERRORS = Counter("bot_loop_cycle_errors_total", "Loop cycles that raised", ["loop", "kind"])
HEARTBEATS = Counter("bot_heartbeats_total", "Heartbeat writes by outcome", ["outcome"])
RETRY_QUEUE_SIZE = Gauge("bot_retry_queue_items", "Items waiting in the retry queue (memory and store)", ["queue"])
RETRY_QUEUE_EVENTS = Counter("bot_retry_queue_events_total", "Retry queue events", ["queue", "event"])
LOOP_CYCLES = Counter("bot_loop_cycles_total", "Loop cycles run, by outcome (ok, error)", ["loop", "outcome"])
LOOP_CYCLE_SECONDS = Histogram(
    "bot_loop_cycle_seconds",
    "Duration of one loop cycle, including a wait for work inside the cycle",
    ["loop"],
    buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
RETRY_QUEUE_OLDEST_AGE = Gauge(
    "bot_retry_queue_oldest_age_seconds", "Seconds since the oldest waiting item of the retry queue was created (0 when empty)", ["queue"]
)
HEARTBEAT_AGE = Gauge("bot_heartbeat_age_seconds", "Seconds since the last heartbeat write that succeeded (since start before the first)")
TRACE_SPANS_DROPPED = Counter("bot_trace_spans_dropped_total", "Spans dropped because the export queue was full (a slow or absent collector)")
METRICS_REFRESH_ERRORS = Counter(
    "bot_metrics_refresh_errors_total", "Reads of database-backed gauges that failed or ran past their deadline", ["probe"]
)

# --- worker: what an operator watches -------------------------------------------------------------

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

MESSAGES_SENT = Counter("worker_messages_sent_total", "Outbound messages marked sent", ["account"])
MESSAGES_FAILED = Counter(
    "worker_messages_failed_total", "Outbound messages that ended failed or dead, by error kind", ["account", "kind"]
)
MESSAGES_DEAD = Counter("worker_messages_dead_total", "Outbound messages dead after their retries", ["account"])
MESSAGE_RETRIES = Counter("worker_message_retries_total", "Outbound send attempts that will be retried, by error kind", ["account", "kind"])
INBOUND_STORED = Counter("worker_inbound_messages_stored_total", "Incoming messages stored (new rows only)", ["account"])
ENQUEUE_TO_SENT = Histogram(
    "worker_enqueue_to_sent_seconds",
    "Seconds from an outbound row's created_at (enqueue) to it being marked sent",
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("worker_outbound_queue_depth", "Outbound rows still to send (queued or being sent)", ["account"])
QUEUE_DUE = Gauge("worker_outbound_queue_due", "Outbound rows due now (their time has come) or being sent", ["account"])
QUEUE_OLDEST_DUE_AGE = Gauge(
    "worker_outbound_oldest_due_age_seconds", "Seconds since enqueue of the oldest due outbound row (0 when none is due)", ["account"]
)
ACCOUNTS = Gauge("worker_accounts", "Accounts of this worker by connection state", ["state"])
FLOOD_WAITS = Counter("worker_flood_waits_total", "FLOOD_WAIT answers from Telegram", ["account"])
FLOOD_WAIT_SECONDS = Counter("worker_flood_wait_seconds_total", "Seconds Telegram asked to wait, summed", ["account"])
HISTORY_PAGES = Counter("worker_history_pages_total", "History pages fetched and stored", ["account"])
HISTORY_JOBS = Counter("worker_history_jobs_total", "History jobs finished, by outcome (done, failed)", ["outcome"])
MESSAGE_JOBS = Counter("worker_message_jobs_total", "Message jobs run, by kind and outcome (done, failed)", ["kind", "outcome"])

# --- ingest ---------------------------------------------------------------------------------------

IMAGES_STORED = Counter("ingest_images_stored_total", "Images stored in object storage and recorded")
IMAGES_SKIPPED = Counter("ingest_images_skipped_total", "Images skipped, by reason", ["reason"])
IMAGES_FAILED = Counter("ingest_images_failed_total", "Images that failed, by error kind", ["kind"])
BYTES_STORED = Counter("ingest_stored_bytes_total", "Bytes written to object storage")
DOWNLOAD_SECONDS = Histogram(
    "ingest_download_seconds", "Duration of one image download from Telegram", buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
)
PROCESSING_SECONDS = Histogram(
    "ingest_processing_seconds", "Duration of decoding, checking and re-encoding one image", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
)
ORPHANS_SWEPT = Counter("ingest_orphans_swept_total", "Storage objects no row points at, removed by the sweep")

# --- bot.py (Reply Guy) ---------------------------------------------------------------------------

TWEET_TRANSITIONS = Counter("replyguy_tweet_transitions_total", "Tweets moved to a state", ["to"])
DRAFTS = Counter("replyguy_drafts_total", "Reply drafts written by the AI")
DECISIONS = Counter("replyguy_decisions_total", "Drafts decided by the operator (approved, rejected)", ["decision"])
POSTS = Counter("replyguy_posts_total", "Replies posted to X")
DEAD_LETTERS = Counter("replyguy_dead_letters_total", "Tweets given up on (dead letters)")
API_SECONDS = Histogram(
    "replyguy_api_call_seconds", "Latency of calls to X and the AI, by api and outcome", ["api", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


# --- one-line calls for the bots ------------------------------------------------------------------


def message_sent(account: str, created_at: datetime | None) -> None:
    """An outbound row was marked sent: count it and observe its wait since enqueue."""
    MESSAGES_SENT.labels(account).inc()
    if created_at is not None:
        ENQUEUE_TO_SENT.observe(max(0.0, (datetime.now(UTC) - created_at).total_seconds()))
    trends.add("sent")
    tracing.annotate(outcome="sent")


def message_failed(account: str, kind: str, *, dead: bool = False) -> None:
    """An outbound row ended failed (permanent) or dead (out of retries)."""
    MESSAGES_FAILED.labels(account, kind).inc()
    if dead:
        MESSAGES_DEAD.labels(account).inc()
    trends.add("failed")
    tracing.annotate(outcome="dead" if dead else "failed", error_kind=kind)


def message_retry(account: str, kind: str) -> None:
    """An outbound send failed for a passing reason and will be retried."""
    MESSAGE_RETRIES.labels(account, kind).inc()
    tracing.annotate(outcome="retry", error_kind=kind)


def inbound_stored(account: str, count: int = 1) -> None:
    if count:
        INBOUND_STORED.labels(account).inc(count)
        trends.add("received", count)


def flood_wait(account: str, seconds: float) -> None:
    FLOOD_WAITS.labels(account).inc()
    FLOOD_WAIT_SECONDS.labels(account).inc(max(0.0, seconds))
    tracing.annotate(outcome="flood_wait", flood_wait_s=seconds)


def account_seen(account: str) -> None:
    """Start an account's series at 0, so rates and alerts see it before its first event."""
    MESSAGES_SENT.labels(account)
    MESSAGES_DEAD.labels(account)
    INBOUND_STORED.labels(account)
    FLOOD_WAITS.labels(account)
    FLOOD_WAIT_SECONDS.labels(account)
    QUEUE_DEPTH.labels(account)
    QUEUE_DUE.labels(account)
    QUEUE_OLDEST_DUE_AGE.labels(account)


async def refresh_worker_gauges(db: Any, pool: Any) -> None:
    """Queue depth, due rows and the oldest due age per account (one SQL call), and accounts by state."""
    connections = list(getattr(pool, "connections", {}).values()) if pool is not None else []
    states: dict[str, int] = {state: 0 for state in _CONNECTION_STATES}
    for connection in connections:
        state = getattr(connection.state, "value", str(connection.state))
        states[state] = states.get(state, 0) + 1
    for state, count in states.items():
        ACCOUNTS.labels(state).set(count)
    labels = {c.id: c.label for c in connections}
    stats = {s.account_id: s for s in await db.outbound_queue_stats()}
    for account_id in set(labels) | set(stats):
        label = labels.get(account_id)
        if label is None:
            continue  # another worker's account: its own worker reports it
        row = stats.get(account_id)
        QUEUE_DEPTH.labels(label).set(row.depth if row else 0)
        QUEUE_DUE.labels(label).set(row.due if row else 0)
        QUEUE_OLDEST_DUE_AGE.labels(label).set((row.oldest_due_age_seconds or 0.0) if row else 0.0)
    depth = sum(s.depth for s in stats.values() if s.account_id in labels)
    oldest = max((s.oldest_due_age_seconds or 0.0 for s in stats.values() if s.account_id in labels), default=0.0)
    trends.set_level("queue_depth", depth)
    trends.set_level("oldest_queued_age", oldest)


_CONNECTION_STATES = ("idle", "leased_elsewhere", "connecting", "connected", "backoff", "needs_login", "stopped")


@dataclass
class _Probe:
    name: str
    read: Callable[[], Awaitable[None]]
    interval: float
    timeout: float
    next_at: float = 0.0


class GaugeRefresher:
    """Refreshes gauges whose values live elsewhere (the database), each at most every ``interval``.

    One background task; each read is bounded by its ``timeout``, and a read
    that fails or runs late is counted and logged, never raised: a slow
    database makes a gauge stale, it never slows a bot or a scrape.
    """

    def __init__(self) -> None:
        self._probes: list[_Probe] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, name: str, read: Callable[[], Awaitable[None]], *, interval: float = 5.0, timeout: float = 3.0) -> None:
        METRICS_REFRESH_ERRORS.labels(name)
        self._probes.append(_Probe(name, read, interval, timeout))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gauge-refresher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def refresh_due(self) -> None:
        """Read every probe whose interval has passed."""
        now = time.monotonic()
        for probe in list(self._probes):
            if now < probe.next_at:
                continue
            probe.next_at = now + probe.interval
            try:
                async with asyncio.timeout(probe.timeout):
                    await probe.read()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - a gauge read never takes the bot down
                METRICS_REFRESH_ERRORS.labels(probe.name).inc()
                logger.debug("gauge read %s failed: %r", probe.name, exc)

    async def _run(self) -> None:
        while True:
            await self.refresh_due()
            pause = min((p.interval for p in self._probes), default=1.0)
            await asyncio.sleep(min(1.0, pause))


T = TypeVar("T")


async def timed(histogram: Histogram, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` and observe how long it took (also when it raises)."""
    started = time.monotonic()
    try:
        return await awaitable
    finally:
        histogram.observe(time.monotonic() - started)


def image_stored(size: int) -> None:
    IMAGES_STORED.inc()
    BYTES_STORED.inc(max(0, size))


async def api_call(api: str, awaitable: Awaitable[T]) -> T:
    """Await one call to X or the AI and observe its latency by outcome (ok, error)."""
    started = time.monotonic()
    outcome = "error"
    try:
        result = await awaitable
        outcome = "ok"
        return result
    finally:
        API_SECONDS.labels(api, outcome).observe(time.monotonic() - started)
