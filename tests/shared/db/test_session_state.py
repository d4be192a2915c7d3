"""A Telegram session's update state and entity cache, saved and read back, on every backend."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.db import Database, InboundMessage, KnownEntity, UpdateState


async def test_update_states_are_saved_replaced_and_cleared(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    other = (await backend_db.upsert_account("other")).id
    when = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert await backend_db.get_update_states(account) == []
    await backend_db.save_update_states(account, [UpdateState(0, pts=10, qts=1, date=when, seq=3), UpdateState(-1001, pts=7)])
    await backend_db.save_update_states(account, [UpdateState(0, pts=12, qts=1, date=when, seq=4)])
    states = await backend_db.get_update_states(account)
    assert states == [UpdateState(-1001, pts=7), UpdateState(0, pts=12, qts=1, date=when, seq=4)]
    assert await backend_db.get_update_states(other) == []
    assert await backend_db.clear_update_states(account) == 2
    assert await backend_db.get_update_states(account) == []


async def test_entities_keep_the_newest_hash_and_known_names(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    await backend_db.save_entities(account, [
        KnownEntity(42, 111, "user", username="Alice", phone="15550101001", name="Alice A"),
        KnownEntity(-1001234, 222, "megagroup", name="Group"),
    ])
    # A later sighting without a username (a min-less update) keeps the one known.
    await backend_db.save_entities(account, [KnownEntity(42, 333, "user")])
    entities = {e.peer_id: e for e in await backend_db.list_entities(account)}
    assert entities[42] == KnownEntity(42, 333, "user", username="alice", phone="15550101001", name="Alice A")
    assert entities[-1001234].kind == "megagroup"


async def test_entities_are_read_in_pages_beyond_one_answer(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    many = [KnownEntity(i, i * 7, "user") for i in range(1, 1502)]
    await backend_db.save_entities(account, many)
    got = await backend_db.list_entities(account)
    assert [e.peer_id for e in got] == list(range(1, 1502))


async def test_state_and_entities_read_the_same_in_tiny_pages(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    await backend_db.save_update_states(account, [UpdateState(i, pts=i + 1) for i in range(0, 7)])
    await backend_db.save_entities(account, [KnownEntity(-i, i, "channel") for i in range(1, 8)])
    whole = (await backend_db.get_update_states(account), await backend_db.list_entities(account))
    backend_db.page_size = 2
    assert (await backend_db.get_update_states(account), await backend_db.list_entities(account)) == whole
    assert len(whole[0]) == 7 and len(whole[1]) == 7


async def test_chat_cursors_name_only_stored_chats(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    message = InboundMessage(chat_id=5, telegram_message_id=9, sent_at=datetime.now(UTC))
    await backend_db.store_messages(account, [message])
    assert await backend_db.chat_cursors(account, [5, 6]) == {5: 9}
