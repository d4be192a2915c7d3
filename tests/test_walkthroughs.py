"""The first hour, as a newcomer lives it: sandbox and real state apart, the walk-throughs side by side.

Real processes on the embedded database under one DATA_DIR (no
DATABASE_URL), as a fresh clone runs them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from shared.config import DEFAULT_PORTS, IngestSettings, ReplyGuySettings, WorkerSettings, load_settings
from shared.db import embedded_dir
from shared.cipher import generate_key
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.process]  # they run our programs as real processes


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    drop = ("TELEGRAM_", "SUPABASE_", "DATABASE_URL", "BOT", "PORT", "SANDBOX", "SESSION_ENCRYPTION_KEY", "INGEST_", "WORKER_ACCOUNTS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "DATA_DIR": str(data_dir), **extra}


async def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode()


class Bot:
    """A bot process with its output in a file."""

    def __init__(self, env: dict[str, str], script: str, log: Path) -> None:
        self.env, self.script, self.log = env, script, log
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Bot:
        handle = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, self.script, cwd=ROOT, env=self.env, stdout=handle, stderr=handle
        )
        handle.close()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def gone(self) -> str | None:
        if self.proc is not None and self.proc.returncode is not None:
            return f"{self.script} exited with {self.proc.returncode}\n{self.output()[-3000:]}"
        return None

    async def wait_for(self, text: str, timeout: float = 90) -> None:
        await wait_until(lambda: text in self.output(), timeout=timeout, what=f"{self.script}: {text!r}", gone=self.gone,
                         context=lambda: self.output()[-3000:])


def test_each_bot_has_its_own_default_port_and_port_wins_when_set() -> None:
    assert (load_settings(WorkerSettings, {}).port, load_settings(IngestSettings, {}).port, load_settings(ReplyGuySettings, {}).port) == (
        DEFAULT_PORTS["worker"], DEFAULT_PORTS["ingest"], DEFAULT_PORTS["bot"]
    ) == (8080, 8081, 8082)
    assert load_settings(IngestSettings, {"PORT": "9000"}).port == 9000


def test_the_sandbox_keeps_its_embedded_database_apart_from_the_real_one(tmp_path: Path) -> None:
    sandbox = load_settings(WorkerSettings, {"DATA_DIR": str(tmp_path)})
    real = load_settings(
        WorkerSettings,
        {"DATA_DIR": str(tmp_path), "TELEGRAM_API_ID": "1", "TELEGRAM_API_HASH": "x", "SESSION_ENCRYPTION_KEY": generate_key()},
    )
    assert embedded_dir(sandbox) == tmp_path / "sandbox" / "postgres"
    assert embedded_dir(real) == tmp_path / "postgres"


async def test_a_real_mode_start_leaves_the_sandbox_accounts_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sandbox_env = clean_env(data, PORT="0")
    code, _, err = await run(sandbox_env, "worker.py", "send", "--account", "demo_one", "--to", "alice", "before")
    assert code == 0, err
    real_env = clean_env(
        data, PORT="0", TELEGRAM_API_ID="12345", TELEGRAM_API_HASH="0123456789abcdef0123456789abcdef",
        SESSION_ENCRYPTION_KEY=generate_key(),
    )
    async with Bot(real_env, "worker.py", tmp_path / "real.log") as real:
        await real.wait_for("status server on port")
        await real.wait_for("database backend: embedded")
    assert "demo_one" not in real.output(), "the real worker never sees the sandbox's accounts"
    code, out, err = await run(sandbox_env, "worker.py", "accounts", "--json")
    assert code == 0, err
    accounts = {a["label"]: a for a in json.loads(out)}
    assert accounts["demo_one"]["status"] == "active" and accounts["demo_two"]["status"] == "active"
    code, out, err = await run(real_env, "worker.py", "accounts", "--json")
    assert code == 0 and json.loads(out) == [], err


async def test_the_worker_and_ingest_walk_throughs_run_side_by_side(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(data, PORT="0")  # their own default ports (8080, 8081) may be taken on a shared test machine
    async with Bot(env, "worker.py", tmp_path / "worker.log") as worker:
        await worker.wait_for("account demo_one connected")
        async with Bot(env, "ingest.py", tmp_path / "ingest.log") as ingest:
            await ingest.wait_for("account demo_ingest connected")
            code, out, err = await run(env, "worker.py", "send", "--account", "demo_one", "--to", "alice", "--wait", "60", "side by side")
            assert code == 0 and out.startswith("sent: "), out + err
            assert worker.gone() is None and ingest.gone() is None
    assert "demo_ingest" not in worker.output(), "the worker leaves ingest's account alone"
