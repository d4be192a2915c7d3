"""shared/telegram.py: what a loop gets when it asks an account for its client."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from telethon import errors, functions, types

from devkit.sandbox import DemoWorld, World
from shared.config import WorkerSettings, load_settings
from shared.db import Database
from shared.db.records import Account, AccountStatus
from shared.errors import ErrorKind, classify
from shared.telegram import AccountConnection, AccountDisconnected, AccountPool, ConnectionPolicy, client_factory
from tests.helpers import wait_until


def _no_client(account: Account, session: object) -> object:
    raise AssertionError("an account that is never connected builds no client")


async def test_a_loop_asking_an_unconnected_account_for_its_client_gets_a_transient_error(database: Database) -> None:
    now = datetime.now(UTC)
    account = Account(
        id=7, label="demo_one", phone=None, status=AccountStatus.ACTIVE, has_session=True,
        lease_owner=None, lease_expires_at=None, last_error=None, created_at=now, updated_at=now,
    )
    connection = AccountConnection(
        account, db=database, cipher=None, client_factory=_no_client, owner="test", policy=ConnectionPolicy()
    )

    with pytest.raises(AccountDisconnected, match="demo_one is not connected") as raised:
        connection.live_client()

    assert isinstance(raised.value, ConnectionError)
    assert classify(raised.value).kind is ErrorKind.TRANSIENT, "the loops retry it, as any dropped connection"


async def test_random_id_duplicate_comes_back_at_once_not_after_telethons_sleep_for_internal_errors(
    sandbox_world: World, sandbox_demo: DemoWorld, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RANDOM_ID_DUPLICATE is a 500, which Telethon sleeps 2 s on before raising; for us it is an answer
    (an earlier attempt was delivered), so the worker's client raises it without that sleep."""
    settings = load_settings(WorkerSettings, {"SANDBOX": "1", "SANDBOX_DIR": str(tmp_path / "sandbox"), "DATA_DIR": str(tmp_path)})
    now = datetime.now(UTC)
    demo_one = sandbox_demo.accounts[0]
    account = Account(
        id=1, label="demo_one", phone=demo_one.phone, status=AccountStatus.ACTIVE, has_session=False,
        lease_owner=None, lease_expires_at=None, last_error=None, created_at=now, updated_at=now,
    )
    client = client_factory(settings, sandbox_world)(account, None)
    await asyncio.wait_for(client.connect(), 10)
    try:
        peer = await client.get_input_entity("bob")
        first = await client(functions.messages.SendMessageRequest(peer=peer, message="exactly once", random_id=515151))
        caplog.set_level(logging.WARNING, logger="telethon")
        with pytest.raises(errors.RandomIdDuplicateError) as again:
            await client(functions.messages.SendMessageRequest(peer=peer, message="exactly once", random_id=515151))
    finally:
        await client.disconnect()
    assert isinstance(first, types.UpdateShortSentMessage)
    assert classify(again.value).kind is ErrorKind.ALREADY_DONE
    assert "internal issues" not in caplog.text, "it came through Telethon's retry loop, which sleeps 2 s on a 5xx"
    assert [m.text for m in sandbox_world.received("bob")] == ["exactly once"]


async def test_the_pool_says_when_an_account_counts_as_connected(
    database: Database, sandbox_world: World, sandbox_demo: DemoWorld, tmp_path: Path
) -> None:
    """``on_ready`` is how the worker wakes its outbound loop when an account is back (after a database
    outage its lease lapsed): called once the connection counts as connected, not before."""
    settings = load_settings(WorkerSettings, {"SANDBOX": "1", "SANDBOX_DIR": str(tmp_path / "sandbox"), "DATA_DIR": str(tmp_path)})
    demo_one = sandbox_demo.accounts[0]
    await database.upsert_account(
        "demo_one", phone=demo_one.phone, session=sandbox_world.session_string(demo_one.phone), status=AccountStatus.ACTIVE
    )
    ready: list[tuple[str, bool]] = []
    pool = AccountPool(
        db=database, cipher=None, client_factory=client_factory(settings, sandbox_world), owner="test",
        policy=ConnectionPolicy(lease_seconds=5, connect_timeout=5, call_timeout=5),
        on_ready=lambda connection: ready.append((connection.label, connection.connected)),
    )

    async def connected() -> bool:
        await pool.refresh()
        return bool(pool.connected())

    try:
        await wait_until(connected, what="demo_one connected")
        assert ready == [("demo_one", True)]
    finally:
        await pool.close()
