"""Account-wide send holds (Telegram's FLOOD_WAIT and PEER_FLOOD), on every backend."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.db import Database, DatabaseRejected, utc_now
from shared.db.records import SendHoldKind


async def test_a_flood_hold_is_listed_until_it_ends_and_a_shorter_one_never_shortens_it(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("held")).id
    other = (await backend_db.upsert_account("free")).id
    until = utc_now() + timedelta(seconds=60)
    stored = await backend_db.hold_account_sends(account, SendHoldKind.FLOOD, until=until, reason="FLOOD_WAIT_60")
    assert abs((stored - until).total_seconds()) < 0.01
    shorter = await backend_db.hold_account_sends(account, SendHoldKind.FLOOD, until=utc_now() + timedelta(seconds=5))
    assert shorter == stored, "a shorter (or late) report keeps the longer hold"

    holds = await backend_db.account_send_holds([account, other])
    assert [(h.account_id, h.label, h.flood_reason, h.limited_until) for h in holds] == [(account, "held", "FLOOD_WAIT_60", None)]
    assert holds[0].flood_until == stored
    assert await backend_db.account_send_holds([other]) == []


async def test_a_limit_and_a_flood_hold_are_kept_apart_and_expired_ones_vanish(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("limited")).id
    await backend_db.hold_account_sends(account, SendHoldKind.LIMITED, until=utc_now() + timedelta(hours=1), reason="PEER_FLOOD")
    await backend_db.hold_account_sends(account, SendHoldKind.FLOOD, until=utc_now() - timedelta(seconds=1))
    (hold,) = await backend_db.account_send_holds()
    assert hold.limited_reason == "PEER_FLOOD" and hold.flood_until is None
    await backend_db.hold_account_sends(account, SendHoldKind.LIMITED, until=utc_now() + timedelta(hours=2))
    (longer,) = await backend_db.account_send_holds()
    assert longer.limited_until is not None and longer.limited_until > hold.limited_until  # type: ignore[operator]


async def test_an_unknown_hold_kind_is_refused_with_a_reason(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("odd")).id
    with pytest.raises(DatabaseRejected, match="flood or limited"):
        await backend_db.hold_account_sends(account, "forever", until=utc_now())  # type: ignore[arg-type]


async def test_the_holds_are_read_in_pages(backend_db: Database) -> None:
    ids = [(await backend_db.upsert_account(f"acct{n}")).id for n in range(5)]
    for account in ids:
        await backend_db.hold_account_sends(account, SendHoldKind.FLOOD, until=utc_now() + timedelta(minutes=5))
    backend_db.page_size = 2  # three pages, the last one short
    assert [h.account_id for h in await backend_db.account_send_holds()] == sorted(ids)
    assert [h.account_id for h in await backend_db.account_send_holds(ids[1:3])] == sorted(ids[1:3])
