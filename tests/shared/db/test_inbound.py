"""Inbound messages are stored once, chats keep their cursors; on every backend."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from shared.db import ChatKind, Database, DatabaseRejected, Direction, InboundMessage, OutboundStatus


async def test_inbound_message_is_stored_once_whatever_path_brought_it(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    live = InboundMessage(chat_id=777, telegram_message_id=41, sender_id=777, text="hi", chat_kind=ChatKind.USER, chat_title="Alice")
    assert await backend_db.store_message(account, live) is True
    # The reconciler reads the chat again (min_id below 41) and finds 41 and a missed 42.
    stored = await backend_db.store_messages(account, [live, InboundMessage(chat_id=777, telegram_message_id=42, text="missed")])
    assert [(s.telegram_message_id, s.inserted) for s in stored] == [(41, False), (42, True)]
    assert stored[0].id is not None
    # Twice in one batch still counts once.
    twice = await backend_db.store_messages(account, [InboundMessage(777, 43), InboundMessage(777, 43)])
    assert [s.inserted for s in twice] == [True, False]


async def test_chat_cursor_moves_to_the_greatest_stored_id_and_never_back(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    await backend_db.store_messages(account, [InboundMessage(5, 10, sent_at=when), InboundMessage(5, 12, sent_at=when + timedelta(seconds=1))])
    await backend_db.store_messages(account, [InboundMessage(5, 11)])
    chat = await backend_db.get_chat(account, 5)
    assert chat is not None and chat.last_message_id == 12
    assert chat.last_message_at == when + timedelta(seconds=1)
    await backend_db.store_messages(account, [InboundMessage(5, 20)], advance_cursor=False)
    chat = await backend_db.get_chat(account, 5)
    assert chat is not None and chat.last_message_id == 12


async def test_our_own_send_seen_as_an_event_is_a_no_op(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    await backend_db.enqueue_outbound(account, "alice", "hello")
    (row,) = await backend_db.claim_outbound([account], owner="w")
    assert row.lease_token
    assert await backend_db.mark_sent(row.id, row.lease_token, telegram_message_id=900, chat_id=555)
    echo = InboundMessage(chat_id=555, telegram_message_id=900, direction=Direction.OUTBOUND, text="hello")
    assert await backend_db.store_message(account, echo) is False
    sent = await backend_db.get_outbound(row.id)
    assert sent is not None and sent.status is OutboundStatus.SENT


async def test_event_stored_before_the_send_is_marked_is_merged_into_the_queue_row(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    await backend_db.enqueue_outbound(account, "alice", "hello")
    (row,) = await backend_db.claim_outbound([account], owner="w")
    assert row.lease_token
    # Telethon's NewMessage for our send arrives before mark_sent commits.
    echo = InboundMessage(chat_id=555, telegram_message_id=901, direction=Direction.OUTBOUND, text="hello")
    assert await backend_db.store_message(account, echo) is True
    assert await backend_db.mark_sent(row.id, row.lease_token, telegram_message_id=901, chat_id=555)
    again = await backend_db.store_messages(account, [echo])
    assert again[0].inserted is False and again[0].id == row.id, "one row for the message: the queue row"


async def test_recent_chats_come_most_recent_first_with_their_cursors(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    base = datetime(2026, 5, 1, tzinfo=timezone.utc)
    await backend_db.store_messages(account, [InboundMessage(1, 5, sent_at=base)])
    await backend_db.store_messages(account, [InboundMessage(2, 9, sent_at=base + timedelta(hours=2), chat_username="bob")])
    await backend_db.upsert_chat(account, 3, kind=ChatKind.CHANNEL, title="News")
    chats = await backend_db.recent_chats(account)
    assert [(c.telegram_chat_id, c.last_message_id) for c in chats] == [(2, 9), (1, 5), (3, 0)]
    assert chats[0].username == "bob" and chats[2].kind is ChatKind.CHANNEL
    since = await backend_db.recent_chats(account, since=base + timedelta(hours=1))
    assert [c.telegram_chat_id for c in since] == [2]


async def test_message_without_its_ids_is_rejected(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    with pytest.raises(DatabaseRejected):
        await backend_db.call("messages_store", {"p_account_id": account, "p_messages": [{"chat_id": 1}]})
