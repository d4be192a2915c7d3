"""Two bot.py replicas on one database: one active, the other stands by and takes over after a kill -9.

Nothing is asked twice (each draft reaches the operator chat once) and
nothing is posted twice (X holds one reply per tweet), read from the sandbox
world and the stand-in X API, the ground truths.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest

from devkit.local_x import LocalX
from devkit.sandbox import World
from tests.test_bot import BotProcess, base_env, bots, get_json  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

LEASE = 3.0
DRAFT = re.compile(r"Reply draft for @\S+ \(tweet (\d+)\)")


def drafts_asked(sandbox: Path) -> Counter[str]:
    """Each tweet whose draft reached the operator chat, and how often."""
    world = World(sandbox)
    try:
        messages = world.history("operator", "Demo Operators")
    finally:
        world.close()
    return Counter(m.group(1) for m in (DRAFT.search(x.text or "") for x in messages) if m)


async def test_one_replica_is_active_the_other_takes_over_after_kill_9_and_nothing_is_asked_or_posted_twice(
    tmp_path: Path, bots: list[BotProcess], local_x: LocalX, database_url: str  # noqa: F811
) -> None:
    shared = {"X_API_BASE": local_x.base_url, "DATABASE_URL": database_url, "BOT_LEASE_SECONDS": str(LEASE), "SANDBOX": "1"}
    first = await BotProcess.start(base_env(tmp_path, {**shared, "DATA_DIR": str(tmp_path / "a")}))
    bots.append(first)
    await first.wait_for(r"active: this replica holds the reply-guy lease")
    await first.wait_for(r"draft for \d+ sent to the operators", count=3, timeout=60)
    second = await BotProcess.start(base_env(tmp_path, {**shared, "DATA_DIR": str(tmp_path / "b")}))
    bots.append(second)
    await second.wait_for(r"standing by: reply-guy:\S+ is active")
    code, status = await get_json(f"http://127.0.0.1:{await second.port()}/status")
    assert code == 200 and status["replica"]["state"] == "standby" and "loops" in status and not status["loops"]

    asked = drafts_asked(tmp_path / "sandbox")
    assert len(asked) == 3 and set(asked.values()) == {1}
    await first.kill()  # kill -9
    killed = time.monotonic()
    await second.wait_for(r"active: this replica holds the reply-guy lease", timeout=30)
    assert time.monotonic() - killed <= LEASE + LEASE / 4 + 1, "a standby takes over within the lease and a quarter"
    await second.wait_for(r"crash recovery: ", timeout=30)

    world = World(tmp_path / "sandbox")
    try:
        world.press("operator", chat="Demo Operators", text="Approve")
    finally:
        world.close()
    posted = await second.wait_for(r"replied to (\d+) with (\d+)", timeout=30)
    assert [r["id"] for r in local_x.replies_to(posted.group(1))] == [posted.group(2)]
    # Discovery goes on in the new active replica; what the first one asked is never asked again.
    after = drafts_asked(tmp_path / "sandbox")
    assert set(after.values()) == {1}, after
    assert local_x.hits["post"] == 1
    assert await second.stop() == 0
