"""Hostile outbound messages through a real in-process worker (PostgreSQL, the Telegram sandbox).

Every bad item fails on its own with a reason a person can act on (what
Telegram's limits forbid is refused at enqueue already, by the SQL
function; the rest fails at send); the good
messages queued around them are delivered exactly once, in order; the
worker keeps running.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.db import DatabaseRejected
from shared.errors import ErrorKind, classify
from tests.test_worker import outbound_rows, running_worker, texts_received, wait_until, worker_env, world_of  # noqa: F401 (worker_env is a fixture)

pytestmark = pytest.mark.slow

RTL_AND_EMOJI = "שלום עולם · مرحبا بالعالم · 👋🏽👨‍👩‍👧‍👦 \u202etxet desrever\u202c · ＦＵＬＬＷＩＤＴＨ · 𝕄𝕒𝕥𝕙"
SURROGATE_HEAVY_FITS = "😀" * 2048  # 4096 UTF-16 units: exactly the limit
SURROGATE_HEAVY_TOO_LONG = "😀" * 2049  # 2049 code points, 4098 UTF-16 units
COMBINING = "e" + "\u0301" * 4000  # one visible character, 4001 code units


@dataclass(frozen=True)
class Case:
    """One hostile outbound item: what is queued and how it must end."""

    name: str
    text: str | None
    attachments: tuple[str, ...] = ()
    peer: str = "alice"
    delivered: bool = False
    reason: str = ""  # a fragment of last_error, when it must fail
    refused_at_enqueue: bool = False  # the SQL function refuses it: it never enters the queue


def make_files(root: Path) -> dict[str, str]:
    """Real files for the attachment cases (the 3 GB one is sparse: no disk is used)."""
    root.mkdir(parents=True, exist_ok=True)
    small = root / "note.txt"
    small.write_text("a small attachment\n")
    empty = root / "empty.bin"
    empty.write_bytes(b"")
    huge = root / "huge.bin"
    with huge.open("wb") as handle:
        handle.truncate(3 * 1024**3)
    return {"small": str(small), "empty": str(empty), "huge": str(huge), "dir": str(root), "missing": str(root / "nope.jpg")}


def cases(files: dict[str, str]) -> list[Case]:
    return [
        Case("whitespace only", "   \n\t  ", reason="empty message", refused_at_enqueue=True),
        Case("4097 UTF-16 units of ASCII", "a" * 4097, reason="too long", refused_at_enqueue=True),
        Case("exactly 4096 UTF-16 units of ASCII", "b" * 4096, delivered=True),
        Case("2049 emoji = 4098 UTF-16 units", SURROGATE_HEAVY_TOO_LONG, reason="4098 UTF-16", refused_at_enqueue=True),
        Case("2048 emoji = exactly 4096 UTF-16 units", SURROGATE_HEAVY_FITS, delivered=True),
        Case("right-to-left, emoji, bidi overrides", RTL_AND_EMOJI, delivered=True),
        Case("4000 combining marks on one letter", COMBINING, delivered=True),
        Case("a 3 GB attachment", "caption", (files["huge"],), reason="too large"),
        Case("a missing attachment", "caption", (files["missing"],), reason="not found"),
        Case("a directory as attachment", "caption", (files["dir"],), reason="not found"),
        Case("an empty attachment", "caption", (files["empty"],), reason="empty"),
        Case("two attachments", "caption", (files["small"], files["small"]), reason="at most 1 attachment", refused_at_enqueue=True),
        Case("a 1025-unit caption", "c" * 1025, (files["small"],), reason="caption too long", refused_at_enqueue=True),
        Case("a small attachment", "with a file", (files["small"],), delivered=True),
        Case("an unknown username", "hello?", peer="no_such_user_zz9", reason=""),
        Case("a username with spaces and symbols", "hello?", peer="@@ !! ;drop table", reason=""),
        Case("a numeric id nobody has", "hello?", peer="999999999999", reason=""),
    ]


async def test_each_hostile_outbound_item_fails_alone_with_a_reason_and_the_rest_is_delivered(
    worker_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    files = make_files(tmp_path / "files")
    table = cases(files)
    world = world_of(worker_env)
    world.seed_demo()
    async with running_worker(worker_env) as worker:
        ids = {a.label: a.id for a in await worker.db.list_accounts()}
        queued: dict[int, Case] = {}
        good: list[str] = []
        problems: list[str] = []
        for n, case in enumerate(table):
            marker = f"good {n:02d} after {case.name}"
            try:
                row = await worker.db.enqueue_outbound(ids["demo_one"], case.peer, case.text, attachments=list(case.attachments))
            except DatabaseRejected as exc:
                if not case.refused_at_enqueue or case.reason not in str(exc):
                    problems.append(f"{case.name}: refused at enqueue with {exc}")
            else:
                queued[row.id] = case
                if case.refused_at_enqueue:
                    problems.append(f"{case.name}: queued, though Telegram would refuse it")
            await worker.db.enqueue_outbound(ids["demo_one"], "bob", marker)
            good.append(marker)
        assert not problems, "\n".join(problems)

        async def settled() -> bool:
            rows = await outbound_rows(database_url)
            return all(r["status"] in ("sent", "failed", "dead") for r in rows) and len(rows) == len(queued) + len(table)

        await wait_until(settled, timeout=60, what="every item settled")
        rows = {r["id"]: r for r in await outbound_rows(database_url)}
        for row_id, case in queued.items():
            row = rows[row_id]
            if case.delivered:
                if row["status"] != "sent":
                    problems.append(f"{case.name}: {row['status']} ({row['last_error']})")
            else:
                error = row["last_error"] or ""
                if row["status"] not in ("failed", "dead") or not error.strip():
                    problems.append(f"{case.name}: {row['status']} with reason {error!r}")
                elif case.reason and case.reason not in error:
                    problems.append(f"{case.name}: reason {error!r} lacks {case.reason!r}")
        assert not problems, "\n".join(problems)

        assert texts_received(world, "bob") == good, "every good message, once, in order"
        delivered_texts = [m.text for m in world.received("alice")]
        for case in table:
            if case.delivered and case.peer == "alice":
                assert delivered_texts.count(case.text) == 1, f"{case.name}: delivered {delivered_texts.count(case.text)} times"
        assert world.received("alice") and all(m.text != SURROGATE_HEAVY_TOO_LONG for m in world.received("alice"))
        assert not worker.runtime.shutdown.stopping, "the worker still runs"
        assert len(worker.pool.connected()) == 2, "the accounts stayed connected"


REFUSED_AT_ENQUEUE: list[tuple[str, str | None, Any, str]] = [
    ("no text and no attachment", None, [], "alice"),
    ("an empty string", "", [], "alice"),
    ("a NUL byte in the text", "a\x00b", [], "alice"),
    ("an empty peer", "hi", [], "  "),
]


@pytest.mark.parametrize(("case", "text", "attachments", "peer"), REFUSED_AT_ENQUEUE, ids=[c[0] for c in REFUSED_AT_ENQUEUE])
async def test_an_impossible_message_is_refused_at_enqueue_with_a_permanent_error(
    database: Any, case: str, text: str | None, attachments: Any, peer: str
) -> None:
    account = (await database.upsert_account("main")).id
    with pytest.raises(Exception) as caught:
        await database.enqueue_outbound(account, peer, text, attachments=attachments)
    assert classify(caught.value).kind is ErrorKind.PERMANENT, f"{case}: {type(caught.value).__name__}: {caught.value}"
    assert str(caught.value).strip(), "a readable reason"
    # Nothing half-written: the queue is empty and the next message goes in.
    assert (await database.enqueue_outbound(account, "alice", "fine")).created


def test_the_3gb_file_is_sparse_so_the_corpus_costs_no_disk(tmp_path: Path) -> None:
    files = make_files(tmp_path / "f")
    stat = os.stat(files["huge"])
    assert stat.st_size == 3 * 1024**3 and stat.st_blocks * 512 < 1024**2
