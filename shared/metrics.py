"""Every Prometheus metric family of the kit, defined once.

Modules import the family they update; the status server exposes the default
registry at ``/metrics``. Label values stay low-cardinality (an operation
name, a loop name, a breaker name), never an id or a peer.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
