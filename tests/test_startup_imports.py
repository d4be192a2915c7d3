"""Our commands start without the heavy libraries only a running bot needs.

A start of worker.py, ingest.py or bot.py is someone waiting: a command, its
``--help``, a typo refused, a supervisor's restart. Importing Telethon costs
about half a second of CPU (aiohttp, which it pulls in, a fifth of that),
httpx (only the Supabase HTTP backend's) a tenth. Each command below runs as
the real program with ``-X importtime``; the list of what it imported must
not name those libraries. A module-level import of one of them in our code
fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cipher import generate_key

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.process  # they run our programs as real processes

#: What only a running bot (or the one backend, or the one check) needs.
HEAVY = frozenset({"telethon", "aiohttp", "httpx", "supabase", "boto3", "botocore", "PIL"})

#: One command per program; each goes as far as its program's module-level imports and more:
#: the refused send loads the settings (the session key's check too), sets up logging and tracing.
CASES = {
    "worker send refused before it is queued": (("worker.py", "send", "--account", "demo_one", "--to", "alice", ""), 2, HEAVY),
    "config check": (("-m", "shared.config", "check"), 0, HEAVY),
    "ingest --help": (("ingest.py", "--help"), 0, HEAVY),
    # `bot.py health` asks the bot's status server over HTTP: aiohttp is its own.
    "bot health --help": (("bot.py", "health", "--help"), 0, HEAVY - {"aiohttp"}),
}


def imported_packages(importtime: str) -> set[str]:
    """The top-level packages named by ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    found = set()
    for line in importtime.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            found.add(name.split(".", 1)[0])
    return found


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_command_starts_without_the_libraries_only_a_running_bot_needs(case: str, tmp_path: Path) -> None:
    argv, code, heavy = CASES[case]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "SUPABASE_", "DATABASE_URL", "BOT"))}
    env.update(
        SANDBOX="1",
        SANDBOX_DIR=str(tmp_path / "sandbox"),
        DATA_DIR=str(tmp_path / "data"),
        SESSION_ENCRYPTION_KEY=generate_key(),  # a key to check: its cipher needs no Telethon either
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == code, done.stderr[-2000:]
    packages = imported_packages(done.stderr)
    assert "shared" in packages, "the import list was not read (no -X importtime output?)"
    assert not packages & heavy, f"{case} imported {sorted(packages & heavy)}"
