"""Text PostgreSQL cannot store never turns into an unreadable database error.

Kept text (tweets, AI drafts, incoming messages and their chat titles, ingest
reasons) is stored without NUL characters and lone surrogates; outbound
text, which must go out exactly as written, is refused with the position of
the first bad character; and a client that sends such text straight to the
SQL functions gets the database's refusal classified with a readable reason.
"""

from __future__ import annotations

import asyncpg
import pytest

from shared.db import Database, DatabaseRejected, JobKind, PostgresDatabase
from shared.db.records import InboundMessage, TweetStatus
from shared.errors import NUL_IN_TEXT, ErrorKind, classify, classify_sqlstate

BAD = "one\x00two\ud83dthree"


async def test_tweet_texts_and_ai_drafts_are_stored_without_the_characters_postgresql_refuses(backend_db: Database) -> None:
    inserted = await backend_db.insert_tweet("1880000000000000001", author="some\x00one", text=BAD)
    assert await backend_db.tweet_transition(inserted.tweet.id, [TweetStatus.DISCOVERED], TweetStatus.DRAFTED, draft=f"draft {BAD}")

    tweet = await backend_db.get_tweet(inserted.tweet.id)
    assert tweet is not None
    assert (tweet.tweet_text, tweet.author, tweet.draft) == ("onetwothree", "someone", "draft onetwothree")


async def test_an_outbound_message_with_a_nul_is_refused_with_its_position(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id

    with pytest.raises(DatabaseRejected) as refused:
        await backend_db.enqueue_outbound(account, "alice", "hello\x00world")
    assert classify(refused.value).reason == "the text contains a NUL character at position 5, which PostgreSQL cannot store"
    assert classify(refused.value).kind is ErrorKind.PERMANENT

    with pytest.raises(DatabaseRejected, match="lone surrogate"):
        await backend_db.create_job(account, JobKind.SEND, {"peer": "alice", "text": "cut \ud83d"})


async def test_a_client_calling_the_enqueue_function_directly_gets_a_readable_reason(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    args = {"p_account_id": account, "p_peer": "alice", "p_text": "hello\x00world", "p_attachments": []}

    with pytest.raises(DatabaseRejected) as refused:
        await backend_db.call("outbound_enqueue", args)  # what a client skipping our Python check sends

    assert classify(refused.value).reason == NUL_IN_TEXT


async def test_incoming_messages_and_chat_titles_are_stored_clean(database: PostgresDatabase, database_url: str) -> None:
    account = (await database.upsert_account("main")).id
    await database.store_messages(account, [InboundMessage(chat_id=9, telegram_message_id=1, text=BAD, chat_title="Cha\x00t")])

    conn = await asyncpg.connect(database_url)
    try:
        text = await conn.fetchval("select text from messages where telegram_message_id = 1")
        title = await conn.fetchval("select title from chats where telegram_chat_id = 9")
    finally:
        await conn.close()
    assert text == "onetwothree" and title == "Chat"


def test_the_nul_errors_of_postgresql_and_postgrest_are_classified_readably() -> None:
    assert classify_sqlstate("22P05", "unsupported Unicode escape sequence").reason == NUL_IN_TEXT
    assert classify_sqlstate("22021", 'invalid byte sequence for encoding "UTF8": 0x00').reason == NUL_IN_TEXT
    assert classify(DatabaseRejected("database rejected the call (22P05: unsupported ...)", code="22P05")).reason == NUL_IN_TEXT
    assert "database refused" in classify_sqlstate("23505", "duplicate key").reason
