"""OpenTelemetry traces: off unless OTEL_EXPORTER_OTLP_ENDPOINT is set.

With an endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) each bot exports its spans over
OTLP/HTTP; the standard variables apply (``OTEL_SERVICE_NAME``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``,
``OTEL_BSP_*``, ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_SAMPLER``). Without one
every call here is a no-op of the API and costs next to nothing.

What is traced:

* one trace per outbound message, from enqueue to mark-sent: the enqueuing
  side (``worker.py send``, a message job, any process calling
  ``enqueue_outbound``) stores the W3C ``traceparent`` with the row, and the
  worker that sends it continues that trace;
* every database call and Telegram request made inside a span is a child
  span (:func:`operation_span`, from :mod:`shared.timeouts`), with its
  timeout and outcome and the account label and attempt of the span above;
* ingest: one span per image; bot.py: one span per tweet step.

Spans never carry message text, captions, phone numbers or tokens: only
ids, labels, counts and outcomes.

Export runs in the SDK's background thread through a
``BatchSpanProcessor`` with a bounded queue: a collector that hangs or is
absent fills the queue, spans beyond it are dropped, and no bot ever waits
for it. JSON log lines written inside a span carry ``trace_id`` and
``span_id`` (:func:`current_ids`, used by :mod:`shared.logs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["SpanKind", "annotate", "current_ids", "current_traceparent", "enabled", "setup", "shutdown", "span", "traced"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRACER_NAME = "telegram-bots"

#: Spans kept in memory for export; beyond it new spans are dropped, never waited for.
MAX_QUEUE_SIZE = 2048

_propagator = TraceContextTextMapPropagator()
_provider: Any | None = None

#: Attributes of the enclosing span that its operation spans repeat (account label, attempt).
_inherited: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("trace_inherited", default={})


def enabled() -> bool:
    """True once :func:`setup` installed an exporting provider in this process."""
    return _provider is not None


def configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (an OTLP endpoint, and the SDK not disabled)."""
    source = os.environ if env is None else env
    if source.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(source.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or source.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip())


def setup(service: str, *, version: str | None = None) -> bool:
    """Install the exporting tracer provider when the environment asks for it; True when it did.

    Called once per process by each bot's entry point and the CLIs that
    enqueue. ``service`` is the default ``service.name`` (OTEL_SERVICE_NAME wins).
    """
    global _provider
    if _provider is not None or not configured():
        return _provider is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, Any] = {SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service}
    if version:
        attributes[SERVICE_VERSION] = version
    try:
        # No exit hook: at exit it would wait for a hung collector; shutdown() bounds the wait instead.
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        queue = int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") or MAX_QUEUE_SIZE)
        batch = min(queue, int(os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") or 512))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), max_queue_size=queue, max_export_batch_size=batch))
    except Exception as exc:  # traces are an aid: a bad OTEL_* value turns them off, never the bot
        logger.warning("tracing off: the OTEL_* settings were refused: %s", exc)
        return False
    logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(_DroppedSpans())
    trace.set_tracer_provider(provider)
    _provider = provider
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    logger.info("tracing on: spans go to %s over OTLP/HTTP", endpoint, extra={"service": attributes[SERVICE_NAME]})
    return True


class _DroppedSpans(logging.Filter):
    """The SDK logs one warning per span it drops while the queue is full: with a stuck
    collector that is a log line per span, whose formatting would cost more than the
    tracing. Count them instead, and say so once a minute."""

    EVERY = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0
        self._said_at = -self.EVERY

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Queue full"):
            return True
        from shared.metrics import TRACE_SPANS_DROPPED

        self.dropped += 1
        TRACE_SPANS_DROPPED.inc()
        now = time.monotonic()
        if now - self._said_at < self.EVERY:
            return False
        self._said_at = now
        record.msg = "span export queue full: the collector does not keep up; %d span(s) dropped so far"
        record.args = (self.dropped,)
        return True


async def shutdown(timeout: float = 2.0) -> None:
    """Export what is queued, waiting at most ``timeout`` seconds.

    The flush runs in a daemon thread of its own, not the event loop's
    executor (which ``asyncio.run`` joins at exit): a hung collector keeps
    that thread, never the process.
    """
    provider = _provider
    if provider is None:
        return
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def flush() -> None:
        try:
            provider.force_flush(int(timeout * 1000))
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    threading.Thread(target=flush, name="trace-flush", daemon=True).start()
    try:
        await asyncio.wait_for(finished, timeout)
    except TimeoutError:
        logger.info("spans not exported within %.0fs at stop (is the collector at OTEL_EXPORTER_OTLP_ENDPOINT up?)", timeout)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


# --- context across processes: the row's traceparent ---------------------------------------------


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, to store with a row; None without a trace."""
    if not enabled():
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def _parent(traceparent: str | None) -> otel_context.Context | None:
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})


def current_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` (hex) of the current span for a log line; empty without tracing."""
    if not enabled():
        return {}
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


# --- spans -----------------------------------------------------------------------------------------


@contextmanager
def span(
    name: str,
    *,
    traceparent: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    inherit: Mapping[str, Any] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Iterator[Span]:
    """A span around a block, current inside it; a child of ``traceparent`` when given.

    ``inherit`` attributes are set on this span and repeated on the
    operation spans (database, Telegram) made inside it. An exception
    marks the span as an error (with the exception's type, not its text).
    """
    if not enabled():
        yield trace.INVALID_SPAN
        return
    attrs = {**(inherit or {}), **(attributes or {})}
    with tracer().start_as_current_span(
        name, context=_parent(traceparent), kind=kind, attributes=_clean(attrs), record_exception=False, set_status_on_exception=False
    ) as current:
        token = _inherited.set({**_inherited.get(), **(inherit or {})}) if inherit else None
        try:
            yield current
        except BaseException as exc:
            if not isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                current.set_attribute("error.type", type(exc).__name__)
            raise
        finally:
            if token is not None:
                _inherited.reset(token)


async def traced(
    name: str,
    awaitable: Awaitable[T],
    *,
    traceparent: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    inherit: Mapping[str, Any] | None = None,
) -> T:
    """Await ``awaitable`` inside :func:`span` (a coroutine runs in the awaiting task's context)."""
    with span(name, traceparent=traceparent, attributes=attributes, inherit=inherit):
        return await awaitable


def of_outbound(row: Any, account: str) -> dict[str, Any]:
    """The span arguments of one send of an outbound row: its trace, id, account label and attempt."""
    return {"traceparent": row.traceparent, "attributes": {"message_id": row.id}, "inherit": {"account": account, "attempt": row.attempts}}


def of_image(channel: Any, message: Any, *, retry: bool = False) -> dict[str, Any]:
    """Attributes of one image's span: the channel's reference (public, not secret), the message id."""
    return {"channel": str(getattr(channel, "ref", channel)), "message_id": getattr(message, "id", None), "retry": retry}


def of_tweet(tweet: Any, *, retry: bool = False) -> dict[str, Any]:
    """Attributes of one tweet step's span: the ids and attempts, never the tweet's or the draft's text."""
    return {"tweet_id": str(tweet.id), "target_tweet_id": tweet.target_tweet_id, "attempts": tweet.attempts, "retry": retry}


def annotate(**attributes: Any) -> None:
    """Set attributes (an outcome, a count) on the current span; nothing without a trace."""
    if enabled():
        current = trace.get_current_span()
        if current.is_recording():
            current.set_attributes(_clean(attributes))


@contextmanager
def operation_span(operation: str, *, timeout: float, outcome_unknown: bool) -> Iterator[Span | None]:
    """A child span for one database call or Telegram request, only inside a trace.

    Loops that poll the database outside any trace make no spans at all.
    """
    if not enabled() or not trace.get_current_span().is_recording():
        yield None
        return
    kind = SpanKind.CLIENT
    attrs = {**_inherited.get(), "operation": operation, "timeout_s": timeout, "outcome_unknown": outcome_unknown}
    with tracer().start_as_current_span(operation, kind=kind, attributes=_clean(attrs), record_exception=False, set_status_on_exception=False) as current:
        yield current


def finish_operation(current: Span | None, outcome: str, exc: BaseException | None = None) -> None:
    if current is None:
        return
    current.set_attribute("outcome", outcome)
    if outcome != "ok":
        current.set_status(Status(StatusCode.ERROR, type(exc).__name__ if exc is not None else outcome))


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attribute values OpenTelemetry accepts (None dropped, enums as their value)."""
    clean: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        value = getattr(value, "value", value)
        clean[key] = value if isinstance(value, (str, bool, int, float)) else str(value)
    return clean
