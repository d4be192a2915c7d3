"""``python -m devkit.sandbox``: the command line round trip."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from telethon import Button, errors, events

from devkit.sandbox.__main__ import main

ROOT = Path(__file__).resolve().parents[3]


def cli(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the sandbox CLI in a subprocess, like a person would."""
    return subprocess.run(
        [sys.executable, "-m", "devkit.sandbox", "--dir", str(directory), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.slow
def test_cli_round_trip_seed_send_and_inbox(tmp_path):
    directory = tmp_path / "world"

    seeded = cli(directory, "seed")
    sent = [cli(directory, "send", "alice", "@demo_one", "hello from the cli") for _ in range(2)]
    inbox = cli(directory, "inbox", "demo_one", "--json")

    assert seeded.returncode == 0 and "+15550100001" in seeded.stdout
    assert all(s.returncode == 0 and "sent #" in s.stdout for s in sent)
    messages = json.loads(inbox.stdout)
    assert [(m["sender"], m["text"]) for m in messages] == [("@alice", "hello from the cli")] * 2


@pytest.mark.slow
async def test_a_fault_set_from_the_cli_reaches_a_running_client(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])

    done = await asyncio.to_thread(cli, sandbox_world.directory, "fault", "set", "error", "--method", "SendMessage",
                                   "--error", "ChatWriteForbiddenError", "--count", "1")

    assert done.returncode == 0 and "fault 1 set" in done.stdout
    with pytest.raises(errors.ChatWriteForbiddenError):
        await client.send_message("alice", "blocked by the cli")
    await client.send_message("alice", "fine again")


def test_cli_inbox_marks_duplicates_and_lists_media(sandbox_world, sandbox_demo, capsys):
    directory = str(sandbox_world.directory)
    sandbox_world.send_incoming("bob", "demo_two", "twice")
    sandbox_world.send_incoming("bob", "demo_two", "twice")

    assert main(["--dir", directory, "post", "demo_photos", "--image", "webp", "--caption", "a picture"]) == 0
    assert main(["--dir", directory, "inbox", "demo_two"]) == 0
    assert main(["--dir", directory, "inbox", "@demo_photos"]) == 0

    out = capsys.readouterr().out
    assert "posted #1 to demo_photos" in out
    assert out.count("bob: twice") == 2 and out.count("DUPLICATE") == 1
    assert "'twice'" not in out, "the text as written, not a Python repr"
    assert "image/webp 640x480" in out


async def test_cli_press_reaches_the_bot_and_the_answer_is_stored(sandbox_world, sandbox_demo, sandbox_connect, capsys):
    bot = await sandbox_connect(sandbox_demo.reply_bot)
    answered = asyncio.Event()

    @bot.on(events.CallbackQuery)
    async def on_press(event: events.CallbackQuery.Event) -> None:
        await event.answer(f"got {event.data.decode()}")
        answered.set()

    await bot.send_message("alice", "pick", buttons=[Button.inline("Red", b"red"), Button.inline("Blue", b"blue")])
    code = main(["--dir", str(sandbox_world.directory), "press", "alice", "--chat", "demo_reply_bot", "--button", "Blue"])
    await asyncio.wait_for(answered.wait(), 5)

    out = capsys.readouterr().out
    assert code == 0 and "pressed: callback query" in out
    answer = sandbox_world.callback_answer(int(out.split()[-1]))
    assert answer is not None and answer.answered and answer.message == "got blue"


def test_cli_fault_list_clear_session_and_reset(sandbox_world, sandbox_demo, capsys):
    directory = str(sandbox_world.directory)

    assert main(["--dir", directory, "fault", "set", "latency", "--ms", "250", "--account", "demo_one"]) == 0
    assert main(["--dir", directory, "fault", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(["--dir", directory, "fault", "clear"]) == 0
    assert main(["--dir", directory, "session", "demo_two"]) == 0
    session = capsys.readouterr().out.splitlines()[-1]
    assert main(["--dir", directory, "reset"]) == 2
    assert main(["--dir", directory, "reset", "--yes"]) == 0

    assert listed[0]["kind"] == "latency" and listed[0]["ms"] == 250
    assert len(session) > 300
    assert sandbox_world.peers() == []


def test_cli_reports_unknown_peers_in_one_line(sandbox_world, capsys):
    code = main(["--dir", str(sandbox_world.directory), "inbox", "@ghost"])

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no peer") and err.count("\n") == 1
