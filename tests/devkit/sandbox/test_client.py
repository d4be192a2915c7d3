"""SandboxClient: real Telethon flows against the sandbox world."""

from __future__ import annotations

import asyncio
import io

import pytest
from telethon import Button, errors, events, functions, types
from telethon.sessions import StringSession

from devkit.sandbox import ImageKind, SandboxClient, World
from devkit.sandbox._media import generate

from ._helpers import eventually


async def test_get_me_returns_the_logged_in_user(sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])

    me = await client.get_me()

    assert isinstance(me, types.User)
    assert me.is_self and me.username == "demo_one" and me.phone == "15550100001"


async def test_get_entity_resolves_a_username_to_a_real_user(sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])

    alice = await client.get_entity("alice")
    channel = await client.get_entity("@demo_photos")
    again = await client.get_input_entity(alice.id)

    assert isinstance(alice, types.User) and alice.username == "alice" and alice.contact
    assert isinstance(channel, types.Channel) and channel.broadcast
    assert isinstance(again, types.InputPeerUser) and again.access_hash == alice.access_hash


async def test_unknown_username_raises_value_error_like_telethon(sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])

    with pytest.raises(ValueError, match="No user has"):
        await client.get_entity("nobody_here")


async def test_send_message_reaches_the_recipient_and_returns_a_message(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])

    sent = await client.send_message("alice", "**hello** alice")

    assert isinstance(sent, types.Message) and sent.out and sent.text == "**hello** alice"
    [received] = sandbox_world.received("alice")
    assert received.text == "hello alice" and received.sender == "@demo_one" and received.box == sandbox_demo.contacts[0].id


async def test_raw_send_with_the_same_random_id_twice_stores_one_message(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    peer = await client.get_input_entity("bob")
    request = functions.messages.SendMessageRequest(peer=peer, message="exactly once", random_id=424242)

    first = await client(request)
    with pytest.raises(errors.RandomIdDuplicateError):  # Telethon retries 5xx once after 2 s, then raises it
        await client(functions.messages.SendMessageRequest(peer=peer, message="exactly once", random_id=424242))

    assert isinstance(first, types.UpdateShortSentMessage)
    assert [m.text for m in sandbox_world.received("bob")] == ["exactly once"]
    assert sandbox_world.sent("demo_one", to="bob")[0].random_id == 424242


async def test_send_media_with_random_id_maps_back_through_get_response_message(sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    peer = await client.get_input_entity("carol")
    uploaded = await client.upload_file(generate(ImageKind.JPEG), file_name="photo.jpg")
    request = functions.messages.SendMediaRequest(
        peer=peer, media=types.InputMediaUploadedPhoto(file=uploaded), message="caption", random_id=777
    )

    result = await client(request)
    message = client._get_response_message(request, result, peer)

    assert isinstance(result, types.Updates)
    assert isinstance(message, types.Message) and message.text == "caption" and message.photo is not None


async def test_send_file_uploads_an_image_the_recipient_can_download(sandbox_world, sandbox_demo, sandbox_connect):
    sender = await sandbox_connect(sandbox_demo.accounts[0])
    data = generate(ImageKind.JPEG, 3)
    upload = io.BytesIO(data)
    upload.name = "photo.jpg"  # Telethon sends nameless bytes as an octet-stream document, as Telegram would keep it

    sent = await sender.send_file("demo_two", upload, caption="look")
    receiver = await sandbox_connect(sandbox_demo.accounts[1])
    [message] = await receiver.get_messages("demo_one", limit=1)

    assert sent.photo is not None and message.photo is not None and message.text == "look"
    assert await receiver.download_media(message, file=bytes) == data
    assert sandbox_world.received("demo_two")[-1].media.kind == "photo"


async def test_download_media_fetches_a_large_photo_in_chunks(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    posted = sandbox_world.post_to_channel("demo_photos", ImageKind.LARGE)
    [message] = await client.get_messages("demo_photos", ids=[posted.id])
    size = message.photo.sizes[-1]

    data = await client.download_media(message, file=bytes)

    assert (size.w, size.h) == (9000, 6000) and size.size == len(data) > 512 * 1024
    assert data == sandbox_world.file_bytes(posted.media.id)


async def test_huge_document_size_is_known_before_any_download(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.post_to_channel("demo_photos", ImageKind.HUGE)

    [message] = await client.get_messages("demo_photos", limit=1)
    head = b"".join([chunk async for chunk in client.iter_download(message.media, request_size=64 * 1024, limit=1)])

    assert message.document.size == 60 * 1024 * 1024 and message.file.mime_type == "image/jpeg"
    assert len(head) == 64 * 1024 and head[:2] == b"\xff\xd8"


async def test_get_messages_with_offset_id_and_iter_messages_with_min_id(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    for index in range(1, 8):
        sandbox_world.send_incoming("alice", "demo_one", f"m{index}")

    older = await client.get_messages("alice", limit=3, offset_id=5)
    newer = [m.text async for m in client.iter_messages("alice", min_id=4)]
    # With no limit Telethon waits 1 s between chunks; a limit keeps the test quick.
    oldest_first = [m.id async for m in client.iter_messages("alice", min_id=2, reverse=True, limit=100)]

    assert [m.text for m in older] == ["m4", "m3", "m2"]
    assert newer == ["m7", "m6", "m5"]
    assert oldest_first == [3, 4, 5, 6, 7]


async def test_new_message_handler_receives_an_incoming_message(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    seen: asyncio.Queue[events.NewMessage.Event] = asyncio.Queue()

    @client.on(events.NewMessage(incoming=True))
    async def on_message(event: events.NewMessage.Event) -> None:
        await seen.put(event)

    sandbox_world.send_incoming("bob", "demo_one", "ping")
    event = await asyncio.wait_for(seen.get(), 5)

    sender = await event.get_sender()
    assert event.raw_text == "ping" and sender.username == "bob" and event.is_private


async def test_an_update_gap_is_found_by_catch_up(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    seen: asyncio.Queue[str] = asyncio.Queue()

    @client.on(events.NewMessage(incoming=True))
    async def on_message(event: events.NewMessage.Event) -> None:
        await seen.put(event.raw_text)

    sandbox_world.send_incoming("bob", "demo_one", "never pushed", gap=True)
    await client.catch_up()

    assert await asyncio.wait_for(seen.get(), 5) == "never pushed"


async def test_an_update_gap_is_found_by_iter_messages_min_id(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    first = sandbox_world.send_incoming("carol", "demo_one", "seen")
    sandbox_world.send_incoming("carol", "demo_one", "missed", gap=True)

    found = [m.text async for m in client.iter_messages("carol", min_id=first.id)]

    assert found == ["missed"]


async def test_a_pts_gap_makes_telethon_fetch_the_difference(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    seen: list[str] = []

    @client.on(events.NewMessage(incoming=True))
    async def on_message(event: events.NewMessage.Event) -> None:
        seen.append(event.raw_text)

    sandbox_world.send_incoming("alice", "demo_one", "lost in transit", gap=True)
    sandbox_world.send_incoming("alice", "demo_one", "arrives")

    await eventually(lambda: len(seen) == 2)
    assert sorted(seen) == ["arrives", "lost in transit"]


async def test_channel_posts_are_pushed_and_a_channel_gap_is_filled(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    seen: list[types.Message] = []

    @client.on(events.NewMessage(chats=["demo_photos"]))
    async def on_post(event: events.NewMessage.Event) -> None:
        seen.append(event.message)

    sandbox_world.post_to_channel("demo_photos", text="first")
    await eventually(lambda: len(seen) == 1)
    sandbox_world.post_to_channel("demo_photos", ImageKind.PNG, gap=True)
    sandbox_world.post_to_channel("demo_photos", text="third")

    await eventually(lambda: len(seen) == 3)
    by_text = {m.text: m for m in seen}
    assert set(by_text) == {"first", "", "third"} and by_text[""].document.mime_type == "image/png"
    assert by_text["first"].post and isinstance(by_text["first"].peer_id, types.PeerChannel)


async def test_a_bot_gets_callback_queries_and_its_answer_is_recorded(sandbox_world, sandbox_demo, sandbox_connect):
    bot = await sandbox_connect(sandbox_demo.reply_bot)
    presses: asyncio.Queue[bytes] = asyncio.Queue()

    @bot.on(events.CallbackQuery)
    async def on_press(event: events.CallbackQuery.Event) -> None:
        await event.answer("noted", alert=True)
        await presses.put(event.data)

    sent = await bot.send_message("demo_one", "approve?", buttons=[Button.inline("Yes", b"yes"), Button.inline("No", b"no")])
    query_id = sandbox_world.press("demo_one", chat="demo_reply_bot", text="No")

    assert await asyncio.wait_for(presses.get(), 5) == b"no"
    answer = await eventually(lambda: (a := sandbox_world.callback_answer(query_id)) and a.answered and a)
    assert answer.message == "noted" and answer.alert
    assert sent.buttons[0][0].text == "Yes"
    assert sandbox_world.received("demo_one")[-1].buttons == [("Yes", b"yes"), ("No", b"no")]


async def test_a_user_click_waits_for_the_bot_answer(sandbox_demo, sandbox_connect):
    bot = await sandbox_connect(sandbox_demo.reply_bot)
    user = await sandbox_connect(sandbox_demo.accounts[0])

    @bot.on(events.CallbackQuery(data=b"go"))
    async def on_press(event: events.CallbackQuery.Event) -> None:
        await event.answer("going")

    await bot.send_message("demo_one", "ready", buttons=[Button.inline("Go", b"go")])
    [message] = await user.get_messages("demo_reply_bot", limit=1)

    answer = await message.click(0)

    assert isinstance(answer, types.messages.BotCallbackAnswer) and answer.message == "going"


async def test_a_user_reply_to_the_bot_arrives_with_reply_to(sandbox_world, sandbox_demo, sandbox_connect):
    bot = await sandbox_connect(sandbox_demo.reply_bot)
    replies: asyncio.Queue[events.NewMessage.Event] = asyncio.Queue()

    @bot.on(events.NewMessage(incoming=True))
    async def on_reply(event: events.NewMessage.Event) -> None:
        await replies.put(event)

    question = await bot.send_message("demo_two", "what do you think?")
    user_copy = sandbox_world.received("demo_two")[-1]
    sandbox_world.send_incoming("demo_two", "demo_reply_bot", "looks good", reply_to=user_copy.id)
    event = await asyncio.wait_for(replies.get(), 5)

    assert event.raw_text == "looks good" and event.message.reply_to.reply_to_msg_id == question.id


async def test_a_string_session_logs_in_again_in_a_new_client(sandbox_world, sandbox_demo, sandbox_connect):
    first = await sandbox_connect(sandbox_demo.accounts[1])
    saved = first.session.save()
    await first.disconnect()

    again = await sandbox_connect(session=StringSession(saved))
    made = await sandbox_connect(session=sandbox_world.session_string("demo_one"))

    assert saved and (await again.get_me()).username == "demo_two"
    assert (await made.get_me()).username == "demo_one"


async def test_a_logged_out_account_needs_sign_in(sandbox_world, sandbox_demo, sandbox_connect):
    old = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.logout("demo_one")

    with pytest.raises(errors.AuthKeyUnregisteredError):
        await old.send_message("alice", "still there?")
    fresh = await sandbox_connect(sandbox_demo.accounts[0])
    assert await fresh.get_me() is None and not await fresh.is_user_authorized()
    await fresh.send_code_request(sandbox_demo.accounts[0].phone)
    await fresh.sign_in(phone=sandbox_demo.accounts[0].phone, code=sandbox_world.login_code)
    assert (await fresh.get_me()).username == "demo_one"


async def test_a_revoked_session_surfaces_the_chosen_error(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[1])
    sandbox_world.logout("demo_two", error="AuthKeyDuplicatedError")

    with pytest.raises(errors.AuthKeyDuplicatedError):
        await client.get_messages("alice", limit=1)


async def test_a_bot_logs_in_with_its_token_and_cannot_read_history(sandbox_demo, sandbox_connect):
    bot = await sandbox_connect(connect=True)
    await bot.start(bot_token=sandbox_demo.alert_bot.bot_token)

    assert (await bot.get_me()).username == "demo_alert_bot" and await bot.is_bot()
    with pytest.raises(errors.BotMethodInvalidError):
        await bot.get_messages("demo_one", limit=1)


async def test_edit_and_delete_change_every_copy(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sent = await client.send_message("alice", "draft")

    await client.edit_message("alice", sent.id, "final")
    await client.delete_messages("alice", [sent.id], revoke=True)

    [copy] = sandbox_world.received("alice")
    assert copy.text == "final" and copy.edited and copy.deleted
    assert await client.get_messages("alice", limit=5) == []


async def test_get_dialogs_lists_chats_and_channels(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.send_incoming("alice", "demo_one", "hi")
    sandbox_world.post_to_channel("demo_photos", text="news")

    names = {dialog.name async for dialog in client.iter_dialogs()}

    assert {"Alice", "Demo Photos"} <= names


async def test_two_processes_worth_of_world_objects_share_updates(tmp_path, sandbox_demo, sandbox_world, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    seen: asyncio.Queue[str] = asyncio.Queue()

    @client.on(events.NewMessage(incoming=True))
    async def on_message(event: events.NewMessage.Event) -> None:
        await seen.put(event.raw_text)

    other = World(sandbox_world.directory)  # another writer, like a test process next to a worker
    try:
        other.send_incoming("alice", "demo_one", "from elsewhere")
    finally:
        other.close()

    assert await asyncio.wait_for(seen.get(), 5) == "from elsewhere"


async def test_client_accepts_the_worker_options_and_a_world_directory(sandbox_world, sandbox_demo):
    client = SandboxClient(str(sandbox_world.directory), phone="+15550100002", flood_sleep_threshold=0,
                           raise_last_call_error=True, session=None)
    await asyncio.wait_for(client.connect(), 10)
    try:
        assert client.is_connected() and (await client.get_me()).username == "demo_two"
        assert isinstance(client.session, StringSession) and client.session.save()
    finally:
        await client.disconnect()
        client.world.close()
    assert not client.is_connected() and client.world is not sandbox_world
