"""Fault rules: each fault surfaces exactly as Telethon surfaces it from Telegram."""

from __future__ import annotations

import asyncio

import pytest
from telethon import errors, events, functions

from devkit.sandbox import FaultKind, SandboxError, World
from devkit.sandbox._faults import error_code_for, error_message_for, normalize_method

from ._helpers import eventually


def test_method_names_are_normalised():
    assert normalize_method("messages.SendMessageRequest") == "sendmessage"
    assert normalize_method("send_message") == "sendmessage"
    assert normalize_method("Send*") == "send*"
    assert normalize_method("") == "*"


def test_error_names_map_to_telegram_messages_and_codes():
    assert error_message_for("ChatWriteForbiddenError") == "CHAT_WRITE_FORBIDDEN"
    assert error_message_for("FloodWaitError", seconds=9) == "FLOOD_WAIT_9"
    assert error_message_for("rpc_call_fail") == "RPC_CALL_FAIL"
    assert error_code_for("CHAT_WRITE_FORBIDDEN") == 403
    assert error_code_for("RPC_CALL_FAIL") == 500
    assert error_code_for("FLOOD_WAIT_3") == 420


def test_an_error_fault_needs_an_error(sandbox_world):
    with pytest.raises(SandboxError):
        sandbox_world.set_fault(FaultKind.ERROR)


async def test_hang_never_answers_and_disconnect_cancels_the_call(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    await client.get_input_entity("alice")
    sandbox_world.set_fault("hang", method="SendMessage")
    call = asyncio.ensure_future(client.send_message("alice", "hello?"))

    done, _ = await asyncio.wait({call}, timeout=0.3)
    await client.disconnect()

    assert not done and sandbox_world.received("alice") == []
    with pytest.raises(asyncio.CancelledError):  # Telethon cancels pending requests on disconnect
        await call


async def test_hang_once_then_the_retry_goes_through(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    await client.get_input_entity("alice")
    sandbox_world.set_fault("hang", method="SendMessage", count=1)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.send_message("alice", "first"), 0.3)
    await client.send_message("alice", "second")

    assert [m.text for m in sandbox_world.received("alice")] == ["second"]


async def test_drop_raises_connection_error_and_resolves_disconnected(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.set_fault("drop", method="GetHistory", count=1)

    with pytest.raises(ConnectionError):
        await client.get_messages("alice", limit=1)

    assert not client.is_connected()
    with pytest.raises(ConnectionError):
        await client.disconnected
    with pytest.raises(ConnectionError):
        await client.send_message("alice", "while down")
    await client.connect()
    assert client.is_connected() and await client.get_messages("alice", limit=1) == []


async def test_after_a_drop_and_reconnect_missed_and_new_updates_arrive(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    seen: list[str] = []

    @client.on(events.NewMessage(incoming=True))
    async def on_message(event: events.NewMessage.Event) -> None:
        seen.append(event.raw_text)

    sandbox_world.set_fault("drop", method="GetHistory", count=1)
    with pytest.raises(ConnectionError):
        await client.get_messages("alice", limit=1)
    sandbox_world.send_incoming("alice", "demo_one", "while disconnected")
    await client.connect()
    sandbox_world.send_incoming("alice", "demo_one", "after reconnect")

    # The new update shows a pts gap, so Telethon fetches the difference and finds the missed one too.
    await eventually(lambda: sorted(seen) == ["after reconnect", "while disconnected"])


async def test_error_once_then_success(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.set_fault("error", method="send_message", error="ChatWriteForbiddenError", count=1)

    with pytest.raises(errors.ChatWriteForbiddenError):
        await client.send_message("bob", "one")
    await client.send_message("bob", "two")

    assert [m.text for m in sandbox_world.received("bob")] == ["two"]
    assert sandbox_world.faults()[0]["hits"] == 1


async def test_error_n_times_with_an_rpc_message(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.set_fault("error", method="GetHistory", error="CHANNEL_PRIVATE", count=2)

    for _ in range(2):
        with pytest.raises(errors.ChannelPrivateError):
            await client.get_messages("demo_photos", limit=1)
    assert await client.get_messages("demo_photos", limit=1) == []


async def test_a_server_error_is_retried_by_telethon_then_raised(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.set_fault("error", method="GetHistory", error="RPC_CALL_FAIL")

    with pytest.raises(errors.RpcCallFailError):  # after Telethon's own 2 s back-off
        await client.get_messages("alice", limit=1)

    assert sandbox_world.faults()[0]["hits"] == 1  # request_retries=0: one attempt


async def test_flood_fault_raises_flood_wait_with_seconds(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.set_fault("flood", method="SendMessage", seconds=42, count=1)

    with pytest.raises(errors.FloodWaitError) as caught:
        await client.send_message("carol", "too fast")

    assert caught.value.seconds == 42
    with pytest.raises(errors.FloodWaitError):  # Telethon remembers the wait and refuses locally
        await client.send_message("carol", "again")
    assert sandbox_world.received("carol") == []


async def test_latency_delays_the_answer_but_the_message_is_delivered(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    await client.get_input_entity("alice")
    sandbox_world.set_fault("latency", method="SendMessage", ms=400, jitter_ms=50, count=1)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.send_message("alice", "slow"), 0.05)

    # Timed out on our side, delivered anyway: the outcome was unknown, not failed.
    await eventually(lambda: [m.text for m in sandbox_world.received("alice")] == ["slow"])


async def test_answer_lost_with_drop_stores_the_message_and_the_retry_is_a_duplicate(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    peer = await client.get_input_entity("bob")
    sandbox_world.set_fault("answer_lost", method="SendMessage", count=1, then="drop")

    with pytest.raises(ConnectionError):
        await client(functions.messages.SendMessageRequest(peer=peer, message="did it go?", random_id=99))
    await client.connect()
    with pytest.raises(errors.RandomIdDuplicateError):
        await client(functions.messages.SendMessageRequest(peer=peer, message="did it go?", random_id=99))

    assert [m.text for m in sandbox_world.received("bob")] == ["did it go?"]


async def test_answer_lost_with_hang_stores_the_message_but_never_answers(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    await client.get_input_entity("bob")
    sandbox_world.set_fault("answer_lost", method="SendMessage", count=1)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.send_message("bob", "sent twice?"), 0.3)
    await client.send_message("bob", "sent twice?")

    assert [m.text for m in sandbox_world.received("bob")] == ["sent twice?", "sent twice?"]  # the duplicate


async def test_a_fault_scoped_to_a_peer_hits_only_that_peer(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.set_fault("error", method="SendMessage", peer="@alice", error="USER_IS_BLOCKED")

    await client.send_message("bob", "fine")
    with pytest.raises(errors.UserIsBlockedError):
        await client.send_message("alice", "not fine")


async def test_a_fault_scoped_to_an_account_spares_other_accounts(sandbox_world, sandbox_demo, sandbox_connect):
    one = await sandbox_connect(sandbox_demo.accounts[0])
    two = await sandbox_connect(sandbox_demo.accounts[1])
    sandbox_world.set_fault("flood", method="send*", account="demo_two", seconds=5)

    await one.send_message("alice", "from one")
    with pytest.raises(errors.FloodWaitError):
        await two.send_message("alice", "from two")


async def test_connect_faults_hang_or_fail_the_connection(sandbox_world, sandbox_demo, sandbox_connect):
    sandbox_world.set_fault("hang", method="connect", count=1)
    hanging = await sandbox_connect(sandbox_demo.accounts[0], connect=False)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(hanging.connect(), 0.3)

    sandbox_world.set_fault("error", method="connect", error="RPC_CALL_FAIL", count=1)
    failing = await sandbox_connect(sandbox_demo.accounts[0], connect=False)
    with pytest.raises(ConnectionError):
        await failing.connect()
    await failing.connect()
    assert (await failing.get_me()).username == "demo_one"


async def test_a_fault_set_by_another_process_applies_at_once(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    other = World(sandbox_world.directory)
    try:
        rule = other.set_fault("error", method="SendMessage", error="RPC_CALL_FAIL", error_code=500, count=1)
        other.clear_faults(rule.id)
        other.set_fault("error", method="SendMessage", error="PEER_FLOOD", count=1)
    finally:
        other.close()

    with pytest.raises(errors.PeerFloodError):
        await client.send_message("alice", "spam?")
    await client.send_message("alice", "ok now")
    assert sandbox_world.faults()[-1]["remaining"] == 0
