"""OpenTelemetry traces of real processes, received by a local OTLP/HTTP collector.

``python worker.py send`` in one process enqueues (and stores the trace
context with the row); ``python worker.py`` in another sends it: both
export to the receiver of tests/fixtures/otlp.py, which decodes the protobuf
and checks names, parent links and that the two processes' spans are one
trace. A collector that hangs must not slow or block the worker.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from devkit.sandbox import World
from tests.fixtures.otlp import OtlpReceiver, hung_otlp_receiver, otlp_receiver  # noqa: F401 - fixtures
from tests.test_worker import worker_cli
from tests.test_worker_process import WorkerProcess, env, fetch, wait_until  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

FAILING = "a message bob will never get"
TEXT = "a message whose text never reaches a span"


def traced_env(env: dict[str, str], receiver: OtlpReceiver, service: str) -> dict[str, str]:
    return {
        **env,
        "SANDBOX": "1",
        "LOG_FORMAT": "json",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
    }


async def _statuses(database_url: str) -> dict[str, str]:
    rows = await fetch(database_url, "select text, status from messages where direction = 'outbound' and status is not null")
    return {r["text"]: r["status"] for r in rows}


async def test_an_enqueue_in_one_process_and_its_send_in_another_are_one_trace(
    env: dict[str, str], database_url: str, tmp_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    world = World.open(Path(env["SANDBOX_DIR"]))
    world.seed_demo()
    world.block("@bob", "@demo_one")
    worker = await WorkerProcess(traced_env(env, otlp_receiver, "worker"), tmp_path / "worker.log").start()
    try:
        cli = traced_env(env, otlp_receiver, "worker-cli")
        # Two CLI processes at once; bob's is queued, then refused by Telegram: bob has blocked demo_one (USER_IS_BLOCKED).
        for code, _, err in await asyncio.gather(
            worker_cli(cli, "send", "--account", "demo_one", "--to", "alice", TEXT),
            worker_cli(cli, "send", "--account", "demo_one", "--to", "bob", FAILING),
        ):
            assert code == 0, err
        await wait_until(
            lambda: _settled(database_url), timeout=30, what="both messages settled", proc=worker
        )
        await wait_until(
            lambda: len(otlp_receiver.named("outbound.send")) >= 2 and len(otlp_receiver.named("outbound.enqueue")) >= 2,
            timeout=30, what="the spans of both processes exported", proc=worker,
        )
    finally:
        await worker.stop()

    enqueues = {s.attributes["message_id"]: s for s in otlp_receiver.named("outbound.enqueue")}
    sends = {s.attributes["message_id"]: s for s in otlp_receiver.named("outbound.send")}
    assert set(enqueues) == set(sends) and len(sends) == 2
    for message_id, send in sends.items():
        enqueue = enqueues[message_id]
        assert enqueue.service == "worker-cli" and send.service == "worker"
        assert send.trace_id == enqueue.trace_id, "one trace from enqueue to mark-sent"
        assert send.parent_span_id == enqueue.span_id
        assert send.attributes["account"] == "demo_one" and send.attributes["attempt"] == 1
    sent = next(s for s in sends.values() if s.attributes.get("outcome") == "sent")
    failed = next(s for s in sends.values() if s.attributes.get("outcome") == "failed")
    assert failed.attributes["error_kind"] == "permanent"

    children = [s for s in otlp_receiver.spans if s.parent_span_id == sent.span_id]
    names = {s.name for s in children}
    assert "telegram.send_message" in names and names & {"db.outbound_mark_sent", "db.outbound_mark_sent_many"}, names
    request = next(s for s in children if s.name == "telegram.send_message")
    assert request.trace_id == sent.trace_id
    assert request.attributes["outcome"] == "ok" and request.attributes["account"] == "demo_one"
    assert request.attributes["attempt"] == 1 and request.attributes["timeout_s"] > 0
    assert request.attributes["outcome_unknown"] is True
    enqueue_db = [s for s in otlp_receiver.spans if s.parent_span_id == enqueues[sent.attributes["message_id"]].span_id]
    assert sorted(s.name for s in enqueue_db) == ["db.outbound_enqueue", "outbound.send"]

    everything = json.dumps([s.attributes for s in otlp_receiver.spans])
    assert TEXT not in everything and "+1" not in everything, "no text or phone number in any span"

    # The worker's JSON log line about the failed message carries that send's trace and span ids.
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    failure = next(line for line in lines if "USER_IS_BLOCKED" in line["message"] or "blocked" in line["message"])
    assert failure["trace_id"] == failed.trace_id and failure["span_id"] == failed.span_id
    assert all("trace_id" not in line for line in lines if "started; status server" in line["message"])


async def _settled(database_url: str) -> bool:
    statuses = await _statuses(database_url)
    return statuses.get(TEXT) == "sent" and statuses.get(FAILING) == "failed"


async def test_a_hung_collector_neither_slows_nor_blocks_the_worker(
    env: dict[str, str], database_url: str, tmp_path: Path, hung_otlp_receiver: OtlpReceiver
) -> None:
    World.open(Path(env["SANDBOX_DIR"])).seed_demo()
    traced = {**traced_env(env, hung_otlp_receiver, "worker"), "OTEL_EXPORTER_OTLP_TIMEOUT": "30", "OTEL_BSP_MAX_QUEUE_SIZE": "64"}
    worker = await WorkerProcess(traced, tmp_path / "worker.log").start()
    try:
        # Three sends from the command line at once, each stopping on time although its spans cannot be
        # delivered, while a burst of 150 is queued directly.
        results = await asyncio.gather(
            *(worker_cli(traced, "send", "--account", "demo_one", "--to", "alice", f"through a hung collector {n}") for n in range(3)),
            _enqueue_burst(database_url, 150, worker),
        )
        for code, _, err in results[:3]:
            assert code == 0, err
        await wait_until(
            lambda: _all_sent(database_url, 153), timeout=60, what="every message sent while the collector hangs", proc=worker
        )
        assert hung_otlp_receiver.requests >= 1, "the worker did try to export"
    finally:
        code = await worker.stop(timeout=20)
    assert code == 0, worker.output()[-3000:]
    # The full queue drops spans; it says so once a minute, not once per span.
    output = worker.output()
    assert "Queue full, dropping" not in output
    assert output.count("span export queue full") == 1, output[-3000:]


async def _enqueue_burst(database_url: str, count: int, worker: WorkerProcess) -> None:
    """``count`` messages from demo_one to bob, queued directly once the worker has registered demo_one."""
    query = "select id from telegram_accounts where label = 'demo_one'"
    await wait_until(lambda: fetch(database_url, query), timeout=30, what="demo_one registered", proc=worker)
    account = (await fetch(database_url, query))[0]["id"]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "select 1 from outbound_enqueue(p_account_id => $1, p_peer => $2, p_text => $3)",
            [(account, "bob", f"burst {n}") for n in range(count)],
        )
    finally:
        await conn.close()


async def _all_sent(database_url: str, count: int) -> bool:
    rows = await fetch(database_url, "select count(*) as n from messages where direction = 'outbound' and status = 'sent'")
    return rows[0]["n"] >= count
