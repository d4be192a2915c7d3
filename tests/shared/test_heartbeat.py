"""Tests for shared/heartbeat.py: the heartbeat outlives stuck loops and broken stores.

The store is the real JSON file store under ``tmp_path``; a broken store is
the same store pointed below a regular file (every write fails with an
OSError), and a hung one never answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from shared.heartbeat import FileHeartbeatStore, GlobalHeartbeat, HeartbeatRecord
from shared.watchdog import LoopWatchdog
from tests.helpers import wait_until as until


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def failed_beats() -> float:
    return REGISTRY.get_sample_value("bot_heartbeats_total", {"outcome": "failed"}) or 0.0


class HungStore:
    """A store whose writes never return (a database that stopped answering)."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def write_heartbeat(self, record: HeartbeatRecord) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def test_file_store_writes_readable_json(tmp_path: Path) -> None:
    path = tmp_path / "state" / "heartbeat.json"
    heartbeat = GlobalHeartbeat(worker_id="telegram-main", store=FileHeartbeatStore(path), version="1.2.3",
                                status=lambda: "degraded", loops=lambda: {"outbound": {"state": "running"}})
    before = time.time()
    assert await heartbeat.beat_once() is True
    record = read(path)
    assert record["worker_id"] == "telegram-main"
    assert record["status"] == "degraded"
    assert record["version"] == "1.2.3"
    assert record["loops"] == {"outbound": {"state": "running"}}
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert before <= record["last_heartbeat_at"] <= time.time()
    assert not path.with_suffix(".tmp").exists(), "written atomically through a temporary file"


async def test_heartbeat_keeps_writing_while_a_registered_loop_is_stuck(tmp_path: Path) -> None:
    watchdog = LoopWatchdog(max_silence=60, check_interval=0.05, startup_grace=0)
    stuck = asyncio.Event()

    async def stuck_loop() -> None:
        watchdog.ping("outbound")
        stuck.set()
        await asyncio.Event().wait()  # hung on a network call without a deadline

    watchdog.register("outbound", stuck_loop)
    path = tmp_path / "heartbeat.json"
    heartbeat = GlobalHeartbeat(worker_id="w1", store=FileHeartbeatStore(path), version="t",
                                loops=watchdog.get_status, interval=0.02)
    await watchdog.start()
    try:
        await asyncio.wait_for(stuck.wait(), 5)
        heartbeat.start()
        beats_at_start = heartbeat.beats
        await until(lambda: heartbeat.beats >= beats_at_start + 5, what="five beats")
        first_age = read(path)["loops"]["outbound"]["last_ping_ago_s"]
        await until(lambda: read(path)["loops"]["outbound"]["last_ping_ago_s"] > first_age + 0.1,
                    what="the stuck loop's silence growing in the record")
        assert read(path)["loops"]["outbound"]["cycles"] == 1
    finally:
        await heartbeat.stop()
        await watchdog.stop()


async def test_a_failing_store_is_logged_and_counted_and_the_heartbeat_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shared.heartbeat")
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the directory should be")
    heartbeat = GlobalHeartbeat(worker_id="w2", store=FileHeartbeatStore(blocker / "heartbeat.json"), version="t",
                                interval=0.01)
    failed_before = failed_beats()
    heartbeat.start()
    try:
        await until(lambda: heartbeat.failures >= 3, what="three failed beats")
        assert heartbeat.beats == 0
        assert heartbeat.consecutive_failures >= 3
        assert heartbeat.last_error is not None and "not_a_dir" in heartbeat.last_error
        assert failed_beats() >= failed_before + 3
        assert any("heartbeat write failed" in r.getMessage() for r in caplog.records)

        blocker.unlink()  # the disk (or database) is fine again
        await until(lambda: heartbeat.beats >= 1, what="a beat after recovery")
        assert heartbeat.consecutive_failures == 0
        assert read(blocker / "heartbeat.json")["worker_id"] == "w2"
    finally:
        await heartbeat.stop()


async def test_a_hanging_store_is_cut_at_its_timeout_and_the_heartbeat_goes_on() -> None:
    store = HungStore()
    heartbeat = GlobalHeartbeat(worker_id="w3", store=store, version="t", interval=0.01, timeout=0.03)
    heartbeat.start()
    try:
        await until(lambda: heartbeat.failures >= 3, what="three timed-out beats")
        assert store.cancelled >= 3, "each hung write was cancelled"
        assert heartbeat.last_error == "heartbeat write timed out after 0.03s"
        status = heartbeat.get_status()
        assert status["failures"] >= 3 and status["beats"] == 0 and status["last_ok_at"] is None
    finally:
        await heartbeat.stop()


async def test_a_failing_loops_callback_does_not_stop_the_beat(tmp_path: Path) -> None:
    def broken_loops() -> dict[str, Any]:
        raise RuntimeError("status bug")

    path = tmp_path / "heartbeat.json"
    heartbeat = GlobalHeartbeat(worker_id="w4", store=FileHeartbeatStore(path), version="t", loops=broken_loops)
    assert await heartbeat.beat_once() is True
    assert read(path)["loops"] == {"error": "RuntimeError: status bug"}


async def test_stop_writes_a_final_stopped_record(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.json"
    heartbeat = GlobalHeartbeat(worker_id="w5", store=FileHeartbeatStore(path), version="t", interval=0.01)
    heartbeat.start()
    await until(lambda: heartbeat.beats >= 2, what="two beats")
    assert read(path)["status"] == "online"
    await heartbeat.stop()
    assert read(path)["status"] == "stopped"
    live = [t for t in asyncio.all_tasks() if t.get_name() == "heartbeat" and not t.done()]
    assert live == [], "no beat can follow the final one"


async def test_get_status_fields(tmp_path: Path) -> None:
    heartbeat = GlobalHeartbeat(worker_id="w6", store=FileHeartbeatStore(tmp_path / "hb.json"), version="t",
                                interval=7.0)
    await heartbeat.beat_once()
    status = heartbeat.get_status()
    assert status == {
        "worker_id": "w6", "beats": 1, "failures": 0, "consecutive_failures": 0,
        "last_ok_at": status["last_ok_at"], "last_error": None, "last_error_at": None, "interval_s": 7.0,
    }
    assert status["last_ok_at"] is not None
