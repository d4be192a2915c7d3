"""``worker.py send`` and ``messages``: checked before queuing, split at boundaries, followed to the outcome.

A real in-process worker on PostgreSQL and the sandbox delivers; the command
line runs as a child process, as a user would run it.
"""

from __future__ import annotations

import json
import logging

import asyncpg
import pytest

from shared.db import DatabaseRejected
from shared.db.records import AccountStatus
from tests.test_worker import account_ids, running_worker, texts_received, worker_cli, worker_env, world_of  # noqa: F401 (worker_env is a fixture)
from worker import CAPTION_LIMIT, TEXT_LIMIT, split_text, utf16_len

pytestmark = [pytest.mark.slow, pytest.mark.process]  # they run our programs as real processes

PARAGRAPHS = "\n\n".join(
    " ".join(f"Sentence {p}.{s} says something 😀 about 👍🏽 flags 🇩🇪 and more." for s in range(20)) for p in range(8)
)
LONG = (PARAGRAPHS * 2)[:9990] + "é\u0301🇩🇪"  # about 10,000 characters, emoji and a combining mark at the end


def test_split_parts_fit_the_limit_join_to_the_original_and_never_cut_a_cluster() -> None:
    for text in (LONG, "😀" * 5000, "👍🏽" * 3000, "🇩🇪" * 3000, "e\u0301" * 5000, "word " * 2000, "x" * 9000):
        parts = split_text(text)
        assert "".join(parts) == text
        assert all(0 < utf16_len(p) <= TEXT_LIMIT for p in parts)
        for before, after in zip(parts, parts[1:]):
            assert not after.startswith(("\u0301", "\U0001f3fd", "\u200d")), "a cut inside a grapheme cluster"
            if after.startswith("\U0001f1e9"):
                assert before.endswith("\U0001f1ea"), "a flag's two regional indicators stay together"


def test_split_prefers_paragraphs_then_sentences_then_words() -> None:
    paragraphs = split_text("a" * 3000 + "\n\n" + "b" * 3000)
    assert paragraphs == ["a" * 3000 + "\n\n", "b" * 3000]
    sentences = split_text("One sentence. " * 300 + "x" * 2000, 4096)
    assert sentences[0].endswith(". ")
    words = split_text("word " * 1000, 100)
    assert all(p.endswith(" ") for p in words[:-1])
    assert split_text("short") == ["short"]
    caption_first = split_text("z " * 1000, TEXT_LIMIT, first_limit=CAPTION_LIMIT)
    assert utf16_len(caption_first[0]) <= CAPTION_LIMIT


async def test_split_delivers_consecutive_messages_in_order_that_join_to_the_original(worker_env: dict[str, str]) -> None:
    world = world_of(worker_env)
    async with running_worker(worker_env):
        code, out, err = await worker_cli(
            worker_env, "send", "--account", "demo_one", "--to", "alice", "--split", "--wait", "60", LONG
        )
        assert code == 0, err
        assert out.count("sent: message") == 3, out
        received = texts_received(world, "alice")
    assert len(received) == 3
    assert "".join(received) == LONG
    conn = await asyncpg.connect(worker_env["DATABASE_URL"])
    try:
        random_ids = await conn.fetch("select random_id from messages where direction = 'outbound' and status = 'sent'")
    finally:
        await conn.close()
    assert len({r["random_id"] for r in random_ids}) == 3, "each part has its own random_id"


async def test_send_wait_reports_sent_failed_and_still_queued_with_exit_codes_0_1_3(
    worker_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker")
    async with running_worker(worker_env) as worker:
        code, out, err = await worker_cli(worker_env, "send", "--account", "demo_one", "--to", "alice", "--wait", "private words")
        assert code == 0, err
        assert out.startswith("sent: message ") and " delivered as Telegram message " in out and out.strip().endswith(" ms")

        code, out, err = await worker_cli(worker_env, "send", "--account", "demo_one", "--to", "no_such_user_zz9", "--wait", "30", "hi")
        assert code == 1, out + err
        assert out.startswith("failed: message ") and "username" in out

        ids = await account_ids(worker)
        lines = [r.getMessage() for r in caplog.records if r.name == "worker" and r.levelno >= logging.INFO]
        assert any(line.startswith("message ") and " sent: account demo_one, chat " in line and "attempt 1" in line for line in lines)
        assert any(" failed: account demo_one, chat no_such_user_zz9, attempt 1" in line for line in lines)
        assert not any("private words" in line for line in lines), "never the text in the log"

    # No worker, and the account needs a login: the message waits, and the command says why.
    from shared.config import WorkerSettings, load_settings
    from shared.db import open_database

    db = await open_database(load_settings(WorkerSettings, worker_env))
    try:
        await db.set_account_status(ids["demo_two"], AccountStatus.NEEDS_LOGIN, last_error="session revoked")
    finally:
        await db.close()
    code, out, err = await worker_cli(worker_env, "send", "--account", "demo_two", "--to", "bob", "--wait", "1", "later")
    assert code == 3, out + err
    assert out.startswith("still queued after 1 s: message ") and "demo_two needs login" in out and "./start.sh worker login" in out


async def test_messages_lists_outbound_messages_with_status_and_reason(worker_env: dict[str, str]) -> None:
    async with running_worker(worker_env):
        await worker_cli(worker_env, "send", "--account", "demo_one", "--to", "alice", "--wait", "ok")
        await worker_cli(worker_env, "send", "--account", "demo_one", "--to", "no_such_user_zz9", "--wait", "bad")
    code, out, err = await worker_cli(worker_env, "messages", "--status", "failed", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [m["to"] for m in listed] == ["no_such_user_zz9"] and "username" in listed[0]["reason"]
    code, out, err = await worker_cli(worker_env, "messages", "--account", "demo_one")
    assert code == 0, err
    assert "sent" in out and "failed" in out and "alice" in out and "ok" not in out.split("\n", 1)[1].split()


@pytest.mark.parametrize(
    ("text", "attachments", "says"),
    [
        ("   \n ", [], "empty message"),
        ("x" * 4097, [], "text too long: 4097 UTF-16 code units, Telegram accepts at most 4096"),
        ("😀" * 2049, [], "4098 UTF-16 code units"),
        ("c" * 1025, ["/tmp/a.jpg"], "caption too long: 1025"),
        ("two", ["/tmp/a.jpg", "/tmp/b.jpg"], "2 attachments"),
    ],
)
async def test_the_enqueue_function_refuses_what_telegram_would_refuse_on_every_backend(
    backend_db, text: str, attachments: list[str], says: str
) -> None:
    account = await backend_db.upsert_account("limits")
    with pytest.raises(DatabaseRejected, match=says):
        await backend_db.enqueue_outbound(account.id, "alice", text, attachments=attachments)
    fits = await backend_db.enqueue_outbound(account.id, "alice", "😀" * 2048)
    assert fits.id > 0


async def test_send_wait_names_a_flood_wait_the_account_is_under(worker_env: dict[str, str]) -> None:
    from datetime import UTC, datetime, timedelta

    from shared.config import WorkerSettings, load_settings
    from shared.db import open_database
    from shared.db.records import SendHoldKind

    code, _, err = await worker_cli(worker_env, "accounts")  # seeds the sandbox accounts
    assert code == 0, err
    db = await open_database(load_settings(WorkerSettings, worker_env))
    try:
        demo_one = next(a for a in await db.list_accounts() if a.label == "demo_one")
        await db.hold_account_sends(demo_one.id, SendHoldKind.FLOOD, until=datetime.now(UTC) + timedelta(minutes=5), reason="FLOOD_WAIT_300")
    finally:
        await db.close()
    code, out, err = await worker_cli(worker_env, "send", "--account", "demo_one", "--to", "alice", "--wait", "1", "held")
    assert code == 3, out + err
    assert "still queued after 1 s" in out and "flood wait until" in out and "FLOOD_WAIT_300" in out
