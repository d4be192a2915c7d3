"""Tests for shared/retry_queue.py: order, backoff, dead letters, capacity, durability.

The store is the real JSON-lines file store under ``tmp_path``; a broken
primary store is a real one whose file path is a directory (every write
fails with IsADirectoryError, the way a full or read-only disk fails).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from shared.retry_queue import JsonlRetryStore, RetryItem, RetryQueue
from tests.helpers import FakeClock

ROOT = Path(__file__).resolve().parents[2]
START = 1_700_000_000.0


def make_queue(path: Path, clock: FakeClock, **kwargs: object) -> RetryQueue:
    options: dict[str, object] = {"name": f"t_{path.stem}", "base_delay": 10.0, "max_retries": 3, "capacity": 100}
    options.update(kwargs)
    return RetryQueue(store=JsonlRetryStore(path), clock=clock, **options)  # type: ignore[arg-type]


async def drain_all(queue: RetryQueue, *, rounds: int = 20) -> list[RetryItem]:
    """Take every due item, settling each as succeeded, until the queue is empty."""
    taken: list[RetryItem] = []
    for _ in range(rounds):
        batch = await queue.due()
        if not batch:
            break
        for item in batch:
            await queue.succeeded(item)
        taken.extend(batch)
    return taken


async def test_items_come_out_in_time_order_only_when_due(tmp_path: Path) -> None:
    clock = FakeClock(START)
    queue = make_queue(tmp_path / "order.jsonl", clock)
    await queue.put("send", {"n": "late"}, error="e", delay=30)
    await queue.put("send", {"n": "early"}, error="e", delay=10)
    await queue.put("send", {"n": "middle"}, error="e", delay=20)

    assert await queue.due() == []
    assert queue.next_due_in() == pytest.approx(10)
    clock.advance(15)
    assert [i.payload["n"] for i in await queue.due()] == ["early"]
    clock.advance(100)
    assert [i.payload["n"] for i in await queue.due()] == ["middle", "late"]


async def test_retry_delays_are_base_then_doubling(tmp_path: Path) -> None:
    clock = FakeClock(START)
    queue = make_queue(tmp_path / "delays.jsonl", clock, max_retries=5)
    assert [queue.delay_for(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]

    item = await queue.put("send", {}, error="first failure")
    assert (item.next_attempt_at.timestamp() - START) == pytest.approx(10)

    waits = []
    for _ in range(3):
        clock.advance(queue.next_due_in() or 0)
        (taken,) = await queue.due()
        dead = await queue.failed(taken, "failed again")
        assert not dead
        waits.append(queue.next_due_in())
    assert waits == [20, 40, 80]


async def test_item_is_exhausted_after_max_retries_with_its_last_error(tmp_path: Path) -> None:
    clock = FakeClock(START)
    path = tmp_path / "exhaust.jsonl"
    queue = make_queue(path, clock, max_retries=3)
    await queue.put("send", {"text": "hi"}, error="attempt 0")

    results = []
    for attempt in range(1, 4):
        clock.advance(1000)
        (item,) = await queue.due()
        results.append(await queue.failed(item, f"attempt {attempt} failed"))
    assert results == [False, False, True]

    status = queue.get_status()
    assert (status["size"], status["dead"], status["exhausted"]) == (0, 1, 1)
    clock.advance(10_000)
    assert await queue.due() == []

    store = JsonlRetryStore(path)
    (dead,) = await store.exhausted_items()
    assert dead.last_error == "attempt 3 failed"
    assert dead.attempts == 3 and dead.payload == {"text": "hi"}
    assert await store.count_pending() == 0


async def test_permanent_failure_is_dead_at_once(tmp_path: Path) -> None:
    clock = FakeClock(START)
    queue = make_queue(tmp_path / "permanent.jsonl", clock, max_retries=5)
    await queue.put("send", {}, error="timeout")
    clock.advance(100)
    (item,) = await queue.due()
    assert await queue.failed(item, "PermanentError: chat not found", permanent=True) is True
    assert queue.get_status()["dead"] == 1
    assert len(queue) == 0


async def test_retry_after_from_the_service_overrides_the_backoff(tmp_path: Path) -> None:
    clock = FakeClock(START)
    queue = make_queue(tmp_path / "retry_after.jsonl", clock)
    await queue.put("send", {}, error="e")
    clock.advance(10)
    (item,) = await queue.due()
    await queue.failed(item, "FloodWait 3s", retry_after=3)
    assert queue.next_due_in() == pytest.approx(3)


async def test_past_capacity_items_spill_to_the_store_and_none_is_lost(tmp_path: Path) -> None:
    clock = FakeClock(START)
    queue = make_queue(tmp_path / "spill.jsonl", clock, capacity=3)
    put_ids = [(await queue.put("send", {"n": n}, error="e", delay=1 + n)).id for n in range(8)]
    status = queue.get_status()
    assert (status["size"], status["in_memory"], status["spilled"]) == (8, 3, 5)

    clock.advance(100)
    taken = await drain_all(queue)
    assert sorted(i.id for i in taken) == sorted(put_ids)
    assert len(taken) == len({i.id for i in taken}), "no item handed out twice"
    assert len(queue) == 0


async def test_a_new_process_loads_back_every_item_of_a_queue_past_capacity(tmp_path: Path) -> None:
    path = tmp_path / "crashed.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.shared.programs.retry_queue_writer",
        "--path", str(path), "--items", "25", "--capacity", "5",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    written = json.loads(stdout.decode().strip().splitlines()[-1])
    assert written["in_memory"] == 5 and len(written["ids"]) == 25

    clock = FakeClock(START * 2)  # far past every item's due time
    queue = make_queue(path, clock, capacity=5)
    assert await queue.load() == 25
    assert queue.get_status()["in_memory"] == 5
    taken = await drain_all(queue, rounds=50)
    assert sorted(i.id for i in taken) == sorted(written["ids"])
    assert sorted(i.payload["number"] for i in taken) == list(range(25))


async def test_a_failing_primary_store_writes_to_the_fallback_and_load_moves_items_back(tmp_path: Path) -> None:
    clock = FakeClock(START)
    primary_path = tmp_path / "primary.jsonl"
    primary_path.mkdir()  # every write to the primary fails now
    fallback = JsonlRetryStore(tmp_path / "fallback.jsonl")
    queue = RetryQueue(name="t_fallback", store=JsonlRetryStore(primary_path), fallback=fallback,
                       clock=clock, base_delay=10)
    first = await queue.put("send", {"n": 1}, error="db down")
    second = await queue.put("send", {"n": 2}, error="db down")
    assert queue.get_status()["fallback_writes"] == 2
    assert await fallback.count_pending() == 2

    primary_path.rmdir()  # the database is back
    restarted = RetryQueue(name="t_fallback_2", store=JsonlRetryStore(primary_path), fallback=fallback,
                           clock=clock, base_delay=10)
    assert await restarted.load() == 2
    assert await fallback.count_pending() == 0
    primary = JsonlRetryStore(primary_path)
    assert sorted(i.id for i in await primary.load_pending(limit=10)) == sorted([first.id, second.id])
    clock.advance(60)
    assert sorted(i.payload["n"] for i in await drain_all(restarted)) == [1, 2]


async def test_put_raises_when_store_and_fallback_both_fail_so_the_caller_keeps_the_work(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.mkdir()
    queue = RetryQueue(name="t_both_broken", store=JsonlRetryStore(broken), clock=FakeClock(START))
    with pytest.raises(OSError):
        await queue.put("send", {}, error="e")
    assert len(queue) == 0


async def test_a_torn_last_line_is_skipped_and_later_writes_survive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(START)
    path = tmp_path / "torn.jsonl"
    queue = make_queue(path, clock)
    kept = await queue.put("send", {"n": "before crash"}, error="e")
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"op":"upsert","item":{"id":"torn","kind":"se')  # the crash cut this write

    caplog.set_level(logging.WARNING, logger="shared.retry_queue")
    restarted = make_queue(path, clock)
    assert await restarted.load() == 1
    assert any("unreadable line" in r.getMessage() for r in caplog.records)

    after = await restarted.put("send", {"n": "after restart"}, error="e")
    third = make_queue(path, clock)
    assert await third.load() == 2, "a write after the torn line must not be glued onto it"
    clock.advance(1000)
    assert sorted(i.id for i in await drain_all(third)) == sorted([kept.id, after.id])


async def test_get_status_reports_size_oldest_age_and_dead(tmp_path: Path) -> None:
    clock = FakeClock(START)
    queue = make_queue(tmp_path / "status.jsonl", clock, capacity=2, max_retries=1)
    empty = queue.get_status()
    assert (empty["size"], empty["oldest_age_s"], empty["dead"], empty["next_due_in_s"]) == (0, None, 0, None)

    await queue.put("send", {}, error="e", delay=5)
    clock.advance(30)
    await queue.put("send", {}, error="e", delay=5)
    await queue.put("send", {}, error="e", delay=5)
    clock.advance(12)
    status = queue.get_status()
    assert status["name"] == "t_status"
    assert status["size"] == 3 and status["in_memory"] == 2 and status["capacity"] == 2
    assert status["oldest_age_s"] == 42.0
    assert status["queued"] == 3 and status["spilled"] == 1

    (item, *_) = await queue.due(limit=1)
    assert queue.get_status()["in_flight"] == 1
    await queue.failed(item, "still failing")
    status = queue.get_status()
    assert (status["dead"], status["size"], status["in_flight"]) == (1, 2, 0)


async def test_close_gives_back_checked_out_items_and_they_survive_a_restart(tmp_path: Path) -> None:
    clock = FakeClock(START)
    path = tmp_path / "close.jsonl"
    queue = make_queue(path, clock)
    await queue.put("send", {"n": 1}, error="e")
    clock.advance(10)
    (item,) = await queue.due()
    await queue.close()
    assert queue.get_status()["in_flight"] == 0
    assert [i.id for i in await queue.due()] == [item.id]

    restarted = make_queue(path, clock)
    assert await restarted.load() == 1


async def test_wait_changed_wakes_when_an_item_is_queued(tmp_path: Path) -> None:
    queue = make_queue(tmp_path / "wake.jsonl", FakeClock(START))
    waiter = asyncio.create_task(queue.wait_changed(60))
    await asyncio.sleep(0)
    await queue.put("send", {}, error="e")
    await asyncio.wait_for(waiter, 5)


def _exhausted_events(queue: RetryQueue) -> float:
    return REGISTRY.get_sample_value("bot_retry_queue_events_total", {"queue": queue.name, "event": "exhausted"}) or 0.0


def _doomed(item_id: str) -> RetryItem:
    now = datetime.fromtimestamp(START, UTC)
    return RetryItem(id=item_id, kind="post", payload={"tweet_id": "t1"}, attempts=1, next_attempt_at=now,
                     last_error="PermanentError: 400", created_at=now)


@pytest.mark.parametrize("primary", ["working", "broken"])
async def test_dead_letter_records_an_item_exhausted_at_once_and_counts_it(tmp_path: Path, primary: str) -> None:
    clock = FakeClock(START)
    primary_path = tmp_path / "primary.jsonl"
    if primary == "broken":
        primary_path.mkdir()  # every write to the primary fails: the fallback file takes the dead letter
    fallback = JsonlRetryStore(tmp_path / "fallback.jsonl")
    queue = RetryQueue(name=f"t_doa_{primary}", store=JsonlRetryStore(primary_path), fallback=fallback,
                       clock=clock, base_delay=10)
    events_before = _exhausted_events(queue)

    await queue.dead_letter(_doomed("post-t1"))

    status = queue.get_status()
    assert (status["dead"], status["exhausted"], status["size"], status["queued"]) == (1, 1, 0, 0)
    assert _exhausted_events(queue) == events_before + 1
    clock.advance(10_000)
    assert await queue.due() == [], "a dead letter is never retried"
    written_to = fallback if primary == "broken" else JsonlRetryStore(primary_path)
    assert [(i.id, i.last_error) for i in await written_to.exhausted_items()] == [("post-t1", "PermanentError: 400")]
    assert await written_to.count_pending() == 0
    if primary == "working":
        restarted = RetryQueue(name="t_doa_restarted", store=JsonlRetryStore(primary_path), clock=clock)
        assert await restarted.load() == 0 and restarted.get_status()["dead"] == 1


async def test_dead_letters_written_to_the_fallback_move_to_the_store_at_load(tmp_path: Path) -> None:
    clock = FakeClock(START)
    primary_path = tmp_path / "primary.jsonl"
    primary_path.mkdir()  # the database is down when the dead letter is written
    fallback = JsonlRetryStore(tmp_path / "fallback.jsonl")
    queue = RetryQueue(name="t_dead_home", store=JsonlRetryStore(primary_path), fallback=fallback, clock=clock)
    await queue.dead_letter(_doomed("post-t9"))
    assert await fallback.count_exhausted() == 1

    primary_path.rmdir()  # it is back: the next start moves the dead letter where readers look
    restarted = RetryQueue(name="t_dead_home_2", store=JsonlRetryStore(primary_path), fallback=fallback, clock=clock)
    assert await restarted.load() == 0
    assert restarted.get_status()["dead"] == 1
    assert await fallback.count_exhausted() == 0
    assert [i.id for i in await JsonlRetryStore(primary_path).exhausted_items()] == ["post-t9"]


async def test_dead_letter_refuses_an_item_the_queue_holds(tmp_path: Path) -> None:
    queue = make_queue(tmp_path / "held.jsonl", FakeClock(START))
    queued = await queue.put("send", {}, error="e")
    with pytest.raises(ValueError, match="failed"):
        await queue.dead_letter(queued)
    assert queue.get_status()["dead"] == 0 and len(queue) == 1


async def test_a_second_store_on_the_same_file_sees_what_the_first_wrote(tmp_path: Path) -> None:
    path = tmp_path / "restart.jsonl"
    first = JsonlRetryStore(path)
    now = datetime.fromtimestamp(START, UTC)
    items = [RetryItem(id=f"i{n}", kind="send", payload={"n": n}, attempts=0, next_attempt_at=now + timedelta(seconds=n),
                       last_error="e", created_at=now) for n in range(4)]
    for item in items:
        await first.upsert(item)
    await first.remove("i1")
    await first.mark_exhausted(replace(items[2], attempts=3, last_error="gave up"))
    assert (await first.count_pending(), await first.count_exhausted()) == (2, 1)

    second = JsonlRetryStore(path)  # a new process after a restart
    assert [i.id for i in await second.load_pending(limit=10)] == ["i0", "i3"]
    assert await second.load_pending(limit=10) == await first.load_pending(limit=10)
    (dead,) = await second.exhausted_items()
    assert (dead.id, dead.attempts, dead.last_error) == ("i2", 3, "gave up")
    assert (await second.count_pending(), await second.count_exhausted()) == (2, 1)


async def test_the_file_store_reads_its_file_once_then_answers_from_memory(tmp_path: Path) -> None:
    path = tmp_path / "once.jsonl"
    store = JsonlRetryStore(path)
    queue = RetryQueue(name="t_once", store=store, clock=FakeClock(START), base_delay=10)
    await queue.put("send", {"n": 1}, error="e")
    assert await store.count_pending() == 1
    path.write_text("")  # were the file read again, the store would now be empty
    assert await store.count_pending() == 1 and len(await store.load_pending(limit=10)) == 1


async def test_compaction_keeps_the_state_and_shrinks_the_file(tmp_path: Path) -> None:
    path = tmp_path / "compact.jsonl"
    store = JsonlRetryStore(path)
    store.COMPACT_AFTER = 20
    now = datetime.fromtimestamp(START, UTC)
    for n in range(30):
        item = RetryItem(id=f"i{n}", kind="send", payload={}, attempts=0, next_attempt_at=now, last_error="e", created_at=now)
        await store.upsert(item)
        if n % 3:
            await store.remove(item.id)
    await store.mark_exhausted(replace(item, attempts=5))

    lines = [line for line in path.read_text().splitlines() if line]
    assert len(lines) < 30 + 20 + 1, "compacted at least once"
    assert not path.with_suffix(".jsonl.tmp").exists()
    reopened = JsonlRetryStore(path)
    assert sorted(i.id for i in await reopened.load_pending(limit=100)) == sorted(f"i{n}" for n in range(0, 30, 3))
    assert [i.id for i in await reopened.exhausted_items()] == ["i29"]


async def test_retry_now_brings_waiting_items_of_the_named_kinds_forward_without_counting_an_attempt(tmp_path: Path) -> None:
    clock = FakeClock(START)
    queue = make_queue(tmp_path / "now.jsonl", clock)
    await queue.put("post", {"n": "post"}, error="X answered 503", delay=60)
    await queue.put("draft", {"n": "draft"}, error="AI answered 503", delay=60)
    assert await queue.due() == []

    assert queue.retry_now(frozenset({"post"})) == 1
    [item] = await queue.due()
    assert item.payload["n"] == "post" and item.attempts == 0
    assert await queue.due() == [], "other kinds keep their delay"
    assert queue.retry_now() == 1
    assert [i.payload["n"] for i in await queue.due()] == ["draft"]
