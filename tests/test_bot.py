"""bot.py as a real process: the embedded default, a kill -9 mid-post, health exit codes, bad settings.

Each case runs ``python bot.py`` with DATA_DIR and SANDBOX_DIR under
tmp_path and PORT=0, waits on its log lines or its status server with a
deadline, and talks to it only from outside: the sandbox world, the stand-in
X and AI servers (run here when the case needs to set their faults), the
database and ``python bot.py health``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.local_ai import LocalAI
from devkit.local_x import LocalX
from shared.db import PostgresDatabase, Tweet, TweetStatus
from devkit.sandbox import World
from tests.helpers import eventually

REPO = Path(__file__).resolve().parent.parent
BOT_PY = REPO / "bot.py"


def base_env(tmp_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment: nothing from the developer's shell leaks into the bot's settings."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "DATA_DIR": str(tmp_path / "data"),
        "SANDBOX_DIR": str(tmp_path / "sandbox"),
        "PORT": "0",
        "DISCOVER_INTERVAL": "1",
        "HEARTBEAT_INTERVAL": "1",
        "SHUTDOWN_GRACE": "5",
        "TIMEOUT_HTTP": "5",
        "RETRY_BASE_DELAY": "1",
    }
    env.update(extra or {})
    if "DATABASE_URL" in env:
        env["SANDBOX"] = "1"  # the local stand-ins on a configured database are asked for explicitly
    return env


class BotProcess:
    """``python bot.py`` with its output collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, env: Mapping[str, str], *args: str) -> BotProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(BOT_PY), *args, cwd=REPO, env=dict(env),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, pattern: str, *, count: int = 1, timeout: float = 30.0) -> re.Match[str]:
        """The ``count``-th line matching ``pattern``; fails with the output after ``timeout`` s."""
        regex = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            matches = [m for line in self.lines if (m := regex.search(line))]
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc.returncode is not None and self._reader.done():
                raise AssertionError(f"bot exited ({self.proc.returncode}) before {pattern!r}:\n{self.output()[-4000:]}")
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.output()[-4000:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    async def port(self) -> int:
        return int((await self.wait_for(r"status server on port (\d+)")).group(1))

    async def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 20.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await self._reader


@pytest.fixture
async def bots() -> AsyncIterator[list[BotProcess]]:
    """Started bots; any still running at the end is stopped (killed when it will not stop)."""
    started: list[BotProcess] = []
    yield started
    for bot in started:
        if bot.proc.returncode is None:
            try:
                await bot.stop(timeout=15)
            except Exception:
                await bot.kill()


async def run_cli(*args: str, env: Mapping[str, str], timeout: float = 60.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=REPO, env=dict(env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


async def get_json(url: str, *, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url, headers=headers) as response:
            return response.status, await response.json()


# --- the embedded default ---------------------------------------------------------------------


@pytest.mark.slow
async def test_the_embedded_default_takes_a_tweet_from_discovery_to_a_posted_reply(tmp_path: Path, bots: list[BotProcess]) -> None:
    env = base_env(tmp_path)
    bot = await BotProcess.start(env)
    bots.append(bot)

    await bot.wait_for(r"REPLY GUY SANDBOX MODE")
    await bot.wait_for(r"X API: local stand-in at http://127\.0\.0\.1:\d+")
    await bot.wait_for(r"draft for \d+ sent to the operators", count=3, timeout=60)

    # The README's step: the operator presses Approve with the sandbox's command line.
    code, out = await run_cli(sys.executable, "-m", "devkit.sandbox", "--dir", env["SANDBOX_DIR"], "press", "operator",
                              "--chat", "Demo Operators", "--button", "Approve", "--wait", "15", env=env)
    assert code == 0 and "bot answered: 'Approved.'" in out, out
    posted = await bot.wait_for(r"replied to (\d+) with (\d+) \(1 of 50 today\)", timeout=30)

    port = await bot.port()
    status_code, status = await get_json(f"http://127.0.0.1:{port}/status")
    assert status_code == 200 and status["sandbox"]["mode"] == "sandbox" and status["backend"] == "embedded"
    assert status["reply_guy"]["tweets"] == {"pending_approval": 2, "posted": 1}
    assert set(status["loops"]) == {"discover", "draft", "approve", "post", "dlq"}
    assert status["heartbeat"]["worker_id"] == "reply-guy"
    stored = json.loads((tmp_path / "data" / "replyguy" / "local_x.json").read_text())
    replies = [t for t in stored["tweets"] if t.get("in_reply_to") == posted.group(1)]
    assert [r["id"] for r in replies] == [posted.group(2)]

    # What an operator's Prometheus sees of it.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            metrics = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(await response.text()) for s in family.samples
            }
    assert metrics[("replyguy_posts_total", ())] == 1 and metrics[("replyguy_drafts_total", ())] == 3
    assert metrics[("replyguy_decisions_total", (("decision", "approve"),))] == 1
    assert metrics[("replyguy_tweet_transitions_total", (("to", "posted"),))] == 1
    assert metrics[("replyguy_api_call_seconds_count", (("api", "ai"), ("outcome", "ok")))] >= 3

    assert await bot.stop() == 0
    assert "stopped in" in bot.output()


# --- exactly once across a kill -9 ----------------------------------------------------------------


@pytest.mark.slow
async def test_a_kill_between_posting_and_recording_leaves_exactly_one_reply(
    tmp_path: Path, bots: list[BotProcess], local_x: LocalX, database_url: str
) -> None:
    # A short lease: the restarted bot takes over from the killed one after 3 s, not the default 20 s.
    env = base_env(tmp_path, {"X_API_BASE": local_x.base_url, "DATABASE_URL": database_url, "TIMEOUT_HTTP": "60",
                              "BOT_LEASE_SECONDS": "3"})
    bot = await BotProcess.start(env)
    bots.append(bot)
    await bot.wait_for(r"draft for \d+ sent to the operators", count=3, timeout=60)
    # X will store the reply and then never answer: the bot sits between the post and the update.
    local_x.faults.add("answer_lost", endpoint="post")
    world = World(tmp_path / "sandbox")
    try:
        world.press("operator", chat="Demo Operators", text="Approve")
    finally:
        world.close()

    replies = await eventually(lambda: _replies(local_x), what="the reply stored by X", timeout=30, interval=0.1)
    target = replies[0]["referenced_tweets"][0]["id"]
    await bot.kill()  # kill -9, mid-request
    db = await PostgresDatabase(database_url, timeout=5).open()
    try:
        [stuck] = [t for t in await db.list_tweets() if t.target_tweet_id == target]
        assert stuck.status is TweetStatus.POSTING and stuck.posted_tweet_id is None

        local_x.faults.clear()
        again = await BotProcess.start({**env, "TIMEOUT_HTTP": "1"})
        bots.append(again)
        await again.wait_for(r"recovered the reply \d+ to \d+ left by an interrupted post", timeout=60)

        async def settled_tweet() -> Tweet | None:
            tweet = await db.get_tweet(stuck.id)
            return tweet if tweet is not None and tweet.status is TweetStatus.POSTED else None

        settled = await eventually(settled_tweet, what="the tweet recorded as posted", timeout=30, interval=0.1)
        assert settled.posted_tweet_id == replies[0]["id"]
        assert local_x.replies_to(target) == replies  # still exactly one
        assert local_x.hits["post"] == 1
    finally:
        await db.close()


async def _replies(local_x: LocalX) -> list[dict]:
    return [t for t in local_x.state()["tweets"] if t["author_id"] == "1000"]


# --- python bot.py health ----------------------------------------------------------------------


@pytest.mark.slow
async def test_health_exit_codes_follow_the_bots_state(
    tmp_path: Path, bots: list[BotProcess], local_x: LocalX, local_ai: LocalAI, database_url: str
) -> None:
    token = "health-test-token"
    env = base_env(tmp_path, {
        "X_API_BASE": local_x.base_url, "AI_BASE_URL": f"{local_ai.base_url}/v1", "DATABASE_URL": database_url,
        "STATUS_TOKEN": token, "RETRY_BASE_DELAY": "0.1",  # the AI's three failures come 0.1 s apart, not 1 s
    })
    bot = await BotProcess.start(env)
    bots.append(bot)
    port = await bot.port()
    await bot.wait_for(r"draft for \d+ sent to the operators", count=3, timeout=60)
    health = [sys.executable, str(BOT_PY), "health", "--port", str(port)]

    # Two operators ask at once: one with the bot's token, one with a wrong one.
    (code, out), (wrong_code, wrong_out) = await asyncio.gather(
        run_cli(*health, env=env), run_cli(*health, env={**env, "STATUS_TOKEN": "wrong"})
    )
    assert code == 0 and "overall: healthy" in out, out
    assert wrong_code == 2 and "refused the token" in wrong_out

    # Degraded: X rate-limits the search (the breaker stays closed; we wait for the reset).
    local_x.faults.add("rate_limit", endpoint="search", reset_in=600)
    await eventually(lambda: _component(port, token, "twitter", "degraded"), what="twitter degraded", timeout=30, interval=0.1)
    code, out = await run_cli(*health, env=env)
    assert code == 1 and "overall: degraded" in out, out

    # Error: the AI fails until its breaker opens (3 failures).
    local_ai.faults.add("status", status=500)
    local_x.add_tweet("demo_news", "Breaking: a new tweet to draft a reply for.")
    await eventually(lambda: _component(port, token, "ai", "error"), what="ai error", timeout=30, interval=0.1)
    status, ready = await get_json(f"http://127.0.0.1:{port}/ready")
    assert status == 503 and ready["checks"]["ai"] != "ok" and ready["checks"]["database"] == "ok", ready
    code, out = await run_cli(*health, "--json", env=env)
    assert code == 2 and json.loads(out)["checks"]["ai"]["data"]["circuit_breaker"] == "open", out

    assert await bot.stop() == 0
    code, out = await run_cli(*health, env=env)
    assert code == 2 and "not answering" in out


async def _component(port: int, token: str, name: str, state: str) -> bool:
    status, body = await get_json(f"http://127.0.0.1:{port}/health/detailed", token=token)
    return status == 200 and body["checks"][name]["status"] == state


# --- settings and start-up failures ------------------------------------------------------------


async def test_bad_settings_exit_2_with_one_line(tmp_path: Path) -> None:
    (code, out), (partial_code, partial_out) = await asyncio.gather(
        run_cli(sys.executable, str(BOT_PY), env=base_env(tmp_path, {"POST_DELAY_MIN": "10", "POST_DELAY_MAX": "5"})),
        run_cli(sys.executable, str(BOT_PY), env=base_env(tmp_path, {"X_BEARER_TOKEN": "only-this-one"})),
    )
    assert code == 2 and out.strip().splitlines() == ["CONFIG ERROR: POST_DELAY_MAX must be at least POST_DELAY_MIN (10), got '5.0'"]
    assert partial_code == 2 and "X_CONSUMER_KEY" in partial_out and "only-this-one" not in partial_out


async def test_live_mode_needs_telegram_api_credentials_for_the_bot(tmp_path: Path) -> None:
    live = {name: "set" for name in ("X_BEARER_TOKEN", "X_CONSUMER_KEY", "X_CONSUMER_SECRET", "X_ACCESS_TOKEN",
                                     "X_ACCESS_TOKEN_SECRET", "AI_API_KEY")}
    live.update({"TELEGRAM_BOT_TOKEN": "123:abc", "OPERATOR_CHAT_ID": "-100123", "OPERATOR_IDS": "42", "REPLY_KEYWORDS": "bot"})

    code, out = await run_cli(sys.executable, str(BOT_PY), env=base_env(tmp_path, live))

    assert code == 2 and out.strip().startswith("CONFIG ERROR: TELEGRAM_API_ID"), out


@pytest.mark.slow
async def test_a_start_that_fails_alerts_initialization_failed_and_exits_1_with_one_line(
    tmp_path: Path, local_x: LocalX, database_url: str
) -> None:
    # A database that refuses (not one that is merely away: the bot waits for that one).
    missing = urlunsplit(urlsplit(database_url)._replace(path="/no_such_database"))
    env = base_env(tmp_path, {"X_API_BASE": local_x.base_url, "DATABASE_URL": missing, "TIMEOUT_DB": "2"})

    code, out = await run_cli(sys.executable, str(BOT_PY), env=env, timeout=90)

    assert code == 1, out
    assert "initialization_failed" in out and "bot could not start: the database" in out
    assert "Traceback" not in out
