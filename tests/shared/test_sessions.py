"""Sessions are encrypted at rest, survive a key rotation, and keep their update state and peers in the database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from telethon import events, types

from devkit.sandbox import SandboxClient
from shared.cipher import SessionCipher, SessionKeyError, generate_key
from shared.sessions import DatabaseSession
from tests.helpers import eventually

SESSION = "1BVtsOKABu" + "x" * 340


def test_a_session_round_trips_and_is_not_stored_in_clear() -> None:
    cipher = SessionCipher(generate_key())
    token = cipher.encrypt(SESSION)
    assert SESSION not in token
    assert cipher.decrypt(token) == SESSION


def test_the_wrong_key_gives_a_clear_error_not_garbage() -> None:
    token = SessionCipher(generate_key()).encrypt(SESSION)
    with pytest.raises(SessionKeyError, match="wrong key"):
        SessionCipher(generate_key()).decrypt(token)


@pytest.mark.parametrize("bad", ["", "not-a-key", "short=="])
def test_a_malformed_key_is_refused_with_how_to_make_one(bad: str) -> None:
    with pytest.raises(SessionKeyError):
        SessionCipher(bad)


def test_rotation_re_encrypts_under_the_newest_key_and_old_tokens_still_open() -> None:
    old, new = generate_key(), generate_key()
    token = SessionCipher(old).encrypt(SESSION)
    both = SessionCipher(f"{new},{old}")
    assert not both.is_current(token)
    rotated = both.rotate(token)
    assert both.is_current(rotated)
    assert SessionCipher(new).decrypt(rotated) == SESSION


# --- the session's state in the database --------------------------------------------------


async def _open(database, account_id: int, cipher: SessionCipher) -> DatabaseSession:
    stored = await database.get_account_session(account_id)
    return await DatabaseSession.load(cipher.decrypt(stored), db=database, account_id=account_id, cipher=cipher, flush_delay=0.01)


async def test_an_old_format_session_connects_and_is_upgraded_on_first_use(database, sandbox_world, sandbox_demo) -> None:
    cipher = SessionCipher(generate_key())
    old = sandbox_world.session_string(sandbox_demo.accounts[0].phone)  # what telegram_accounts held before: the key only
    account = (await database.upsert_account("one", session=cipher.encrypt(old))).id
    stranger = sandbox_world.create_user("stranger")
    sandbox_world.send_incoming(stranger, "demo_one", "hello")

    session = await _open(database, account, cipher)
    assert not session.had_state and len(session) == 0
    client = SandboxClient(sandbox_world, session=session, flood_sleep_threshold=0, catch_up=True)
    await client.connect()
    await client.get_dialogs()  # every answer teaches the session its peers
    await client.disconnect()  # hands the session its final update state
    assert await session.aclose()

    states = {s.entity_id: s for s in await database.get_update_states(account)}
    entities = {e.peer_id: e for e in await database.list_entities(account)}
    assert states[0].pts > 0 and states[0].date is not None
    assert entities[stranger.id].kind == "user" and entities[stranger.id].username == "stranger"
    assert entities[sandbox_demo.channel.marked_id].kind == "channel"
    assert cipher.decrypt(await database.get_account_session(account)) == old, "the auth key is kept as it was"

    again = await _open(database, account, cipher)
    assert again.had_state and again.state_date == states[0].date
    peer = again.get_input_entity(stranger.id)
    assert isinstance(peer, types.InputPeerUser)
    assert peer.access_hash == sandbox_world.access_hash(stranger, viewer=sandbox_demo.accounts[0])


async def test_a_restarted_client_catches_up_from_the_saved_state(database, sandbox_world, sandbox_demo) -> None:
    cipher = SessionCipher(generate_key())
    account = (await database.upsert_account("one", session=cipher.encrypt(
        sandbox_world.session_string(sandbox_demo.accounts[0].phone)))).id
    first = SandboxClient(sandbox_world, session=await _open(database, account, cipher), flood_sleep_threshold=0, catch_up=True)
    await first.connect()
    await first.disconnect()
    await first.session.aclose()
    sandbox_world.send_incoming(sandbox_world.create_user("while_away"), "demo_one", "sent while the client was away")

    received = asyncio.Queue()

    async def on_message(event: events.NewMessage.Event) -> None:
        await received.put(event.message.message)

    second = SandboxClient(sandbox_world, session=await _open(database, account, cipher), flood_sleep_threshold=0, catch_up=True)
    second.add_event_handler(on_message, events.NewMessage())
    await second.connect()
    try:
        assert await asyncio.wait_for(received.get(), 10) == "sent while the client was away"
    finally:
        await second.disconnect()
        await second.session.aclose()


async def test_an_empty_state_never_overwrites_a_saved_one(database) -> None:
    account = (await database.upsert_account("one")).id
    session = DatabaseSession(None, db=database, account_id=account, cipher=None, flush_delay=0.01)
    when = datetime(2026, 12, 1, tzinfo=UTC)
    session.set_update_state(0, types.updates.State(pts=5, qts=0, date=when, seq=1, unread_count=0))
    assert await session.aclose()
    session.set_update_state(0, types.updates.State(pts=0, qts=0, date=when, seq=0, unread_count=0))
    assert await session.aclose()
    assert [s.pts for s in await database.get_update_states(account)] == [5]


async def test_peers_reach_the_database_while_the_client_runs_not_only_at_disconnect(database, sandbox_world, sandbox_demo) -> None:
    cipher = SessionCipher(generate_key())
    account = (await database.upsert_account("one", session=cipher.encrypt(
        sandbox_world.session_string(sandbox_demo.accounts[0].phone)))).id
    sandbox_world.create_user("met_later")
    client = SandboxClient(sandbox_world, session=await _open(database, account, cipher), flood_sleep_threshold=0, catch_up=True)
    await client.connect()
    try:
        met = await client.get_entity("met_later")  # a resolved username: one answer Telethon hands the session

        async def saved() -> bool:
            return met.id in {e.peer_id for e in await database.list_entities(account)}

        await eventually(saved, what="the peer saved by the background writer")
    finally:
        await client.disconnect()
        await client.session.aclose()
