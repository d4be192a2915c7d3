"""``worker.py history``, ``schedule`` and ``jobs``: the job loops started and followed from the command line."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from shared.cli import CliError
from tests.test_worker import running_worker, texts_received, wait_until, worker_cli, worker_env, world_of  # noqa: F401 (worker_env is a fixture)
from worker import parse_when

pytestmark = [pytest.mark.slow, pytest.mark.process]  # they run our programs as real processes


def test_at_takes_now_relative_and_iso_times_utc_unless_a_zone_is_given() -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert parse_when("now", now=now) == now
    assert parse_when("+10m", now=now) == now + timedelta(minutes=10)
    assert parse_when("2h", now=now) == now + timedelta(hours=2)
    assert parse_when("2026-12-24T18:00") == datetime(2026, 12, 24, 18, 0, tzinfo=UTC)
    assert parse_when("2026-12-24T18:00+01:00").utcoffset() == timedelta(hours=1)
    with pytest.raises(CliError, match="not a time"):
        parse_when("tomorrow-ish")


async def jobs(env: dict[str, str]) -> list[dict]:
    code, out, err = await worker_cli(env, "jobs", "--json")
    assert code == 0, err
    return json.loads(out)


async def job_statuses(env: dict[str, str]) -> dict[str, list[str]]:
    """Each kind's job statuses, read from the database: what the waits poll (``jobs`` is a process start each)."""
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        rows = await conn.fetch("select kind, status from jobs order by id")
    finally:
        await conn.close()
    statuses: dict[str, list[str]] = {}
    for row in rows:
        statuses.setdefault(row["kind"], []).append(row["status"])
    return statuses


async def test_history_schedule_edit_and_delete_run_as_jobs_that_jobs_lists_with_progress(worker_env: dict[str, str]) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    for n in range(5):
        world.send_incoming("alice", "demo_one", f"old {n}")
    async with running_worker(worker_env):
        code, out, err = await worker_cli(worker_env, "history", "--account", "demo_one", "--chat", "alice", "--limit", "3")
        assert code == 0 and out.startswith("history job "), err

        async def history_done() -> bool:
            return (await job_statuses(worker_env)).get("history") == ["done"]

        await wait_until(history_done, timeout=30, what="the history job done")
        history = [j for j in await jobs(worker_env) if j["type"] == "history"][0]
        assert history["fetched"] >= 3 and history["percent"] == 100.0

        code, out, err = await worker_cli(worker_env, "schedule", "--account", "demo_one", "--to", "alice", "--at", "+1s", "later on")
        assert code == 0 and out.startswith("send job "), err
        await wait_until(lambda: "later on" in texts_received(world, "alice"), timeout=30, what="the scheduled send delivered")
        sent = [m for m in world.received("alice") if m.text == "later on"][0]

        code, _, err = await worker_cli(
            worker_env, "schedule", "--account", "demo_one", "--to", "alice", "--at", "now", "--edit", str(sent.id), "edited"
        )
        assert code == 0, err
        await wait_until(lambda: "edited" in texts_received(world, "alice"), timeout=30, what="the edit applied")
        code, _, err = await worker_cli(worker_env, "schedule", "--account", "demo_one", "--to", "alice", "--at", "now", "--delete", str(sent.id))
        assert code == 0, err

        async def all_done() -> bool:
            return all(status == "done" for kind in (await job_statuses(worker_env)).values() for status in kind)

        await wait_until(all_done, timeout=30, what="every job done")
        listed = await jobs(worker_env)
        assert all(j["status"] == "done" for j in listed) and {"history", "send", "edit", "delete"} <= {j["type"] for j in listed}, listed
        code, out, err = await worker_cli(worker_env, "jobs")
        assert code == 0, err
        for kind in ("history", "send", "edit", "delete"):
            assert f" {kind} " in out, out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("history", "--account", "demo_one", "--chat", "@nobody_we_know"), "knows no chat '@nobody_we_know'"),
        (("history", "--account", "demo_one", "--chat", "alice", "--limit", "0"), "--limit must be above 0"),
        (("schedule", "--account", "demo_one", "--to", "alice", "--at", "soonish", "x"), "not a time"),
        (("schedule", "--account", "demo_one", "--to", "alice", "--at", "now", "x" * 5000), "5000 UTF-16"),
        (("schedule", "--account", "demo_one", "--to", "alice", "--at", "now", "--edit", "5"), "an edit needs the new text"),
        (("jobs", "--status", "lost"), "invalid choice"),
    ],
)
async def test_bad_job_commands_end_with_one_line_and_exit_2(worker_env: dict[str, str], args: tuple[str, ...], says: str) -> None:
    code, out, err = await worker_cli({**worker_env, "SANDBOX": "1"}, *args)
    assert code == 2 and says in err and err.count("\n") == 1 and "Traceback" not in err, out + err
