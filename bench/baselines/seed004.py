"""The baseline of the outbound benchmark: seed 004's design, written small.

Seed 004 ("Plano de Reestruturação: Worker Telegram Resiliente") keeps the
original worker's outbound loop and adds a timeout around each call::

    while True:
        watchdog.ping("outbound")
        await process_outbound_messages()   # every queued row, one at a time
        await asyncio.sleep(2)

and each message is ``get_entity`` + ``send_message`` under
``TIMEOUT_TELEGRAM_SEND``, then the row is marked sent. That is what this
class does, on the same database rows (``messages`` with status
``queued``), through ``SandboxClient``s (real Telethon clients on the sandbox
world), so the benchmark compares designs, not environments.

It is a baseline for measurement only: no leases, no retries, no ordering
guarantees, nothing exactly-once. Not for production.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

POLL_INTERVAL = 2.0
"""Seconds the seed's loop sleeps between two passes."""

TIMEOUT_TELEGRAM_SEND = 30.0
"""The seed's deadline of one send (its TIMEOUT_TELEGRAM_SEND)."""


class Seed004Outbound:
    """Seed 004's outbound loop: poll every 2 s, send each queued row in turn.

    Args:
        dsn: the database holding ``messages`` and ``telegram_accounts``.
        world_dir: the sandbox world the accounts live in.
        sessions: account id -> plain Telethon session string.
        phones: account id -> phone (the sandbox logs the client in by it).
        poll_interval: the seed's sleep between passes.
    """

    def __init__(
        self,
        dsn: str,
        world_dir: Path,
        sessions: dict[int, str],
        *,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.dsn = dsn
        self.world_dir = world_dir
        self.sessions = sessions
        self.poll_interval = poll_interval
        self.clients: dict[int, Any] = {}
        self.sent = 0
        self.failed = 0
        self._conn: asyncpg.Connection | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Connect one Telethon client per account (as the seed's ``start`` does)."""
        from devkit.sandbox import SandboxClient, World

        world = World.open(self.world_dir)
        for account_id, session in self.sessions.items():
            client = SandboxClient(world, session=session, flood_sleep_threshold=0, request_retries=0)
            await asyncio.wait_for(client.connect(), 15)
            self.clients[account_id] = client
        self._conn = await asyncpg.connect(self.dsn, timeout=10)

    async def stop(self) -> None:
        self._stopping.set()
        for client in self.clients.values():
            try:
                await asyncio.wait_for(client.disconnect(), 10)
            except Exception as exc:  # noqa: BLE001 - best effort at the end of a benchmark
                logger.debug("disconnect failed: %s", exc)
        if self._conn is not None:
            await self._conn.close()

    async def run(self) -> None:
        """The seed's loop, until :meth:`stop`."""
        while not self._stopping.is_set():
            try:
                await self.process_outbound_messages()
            except Exception as exc:  # noqa: BLE001 - the seed logs and sleeps 5 s
                logger.warning("[OUTBOUND] error: %s", exc)
                await asyncio.sleep(5)
                continue
            try:
                await asyncio.wait_for(self._stopping.wait(), self.poll_interval)
            except TimeoutError:
                pass

    async def process_outbound_messages(self) -> None:
        """One pass: every queued row, oldest first, sent one at a time."""
        assert self._conn is not None
        rows = await asyncio.wait_for(
            self._conn.fetch(
                "select id, account_id, peer, text from messages where status = 'queued' "
                "and direction = 'outbound' order by id"
            ),
            30,
        )
        for row in rows:
            if self._stopping.is_set():
                return
            client = self.clients.get(row["account_id"])
            if client is None:
                continue
            try:
                entity = await asyncio.wait_for(client.get_entity(row["peer"]), TIMEOUT_TELEGRAM_SEND)
                sent = await asyncio.wait_for(client.send_message(entity, row["text"]), TIMEOUT_TELEGRAM_SEND)
            except Exception as exc:  # noqa: BLE001 - the seed marks the row failed and goes on
                self.failed += 1
                await self._conn.execute(
                    "update messages set status = 'failed', last_error = $2, updated_at = now() where id = $1",
                    row["id"],
                    str(exc)[:500],
                )
                continue
            await self._conn.execute(
                "update messages set status = 'sent', sent_at = now(), telegram_message_id = $2, updated_at = now() "
                "where id = $1",
                row["id"],
                sent.id,
            )
            self.sent += 1
