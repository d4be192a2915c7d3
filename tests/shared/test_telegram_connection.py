"""shared/telegram.py: what a loop gets when it asks an account for its client."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.db import Database
from shared.db.records import Account, AccountStatus
from shared.errors import ErrorKind, classify
from shared.telegram import AccountConnection, AccountDisconnected, ConnectionPolicy


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
