"""Telegram's rules and limits, raised as the error classes Telethon raises."""

from __future__ import annotations

import pytest
from telethon import errors, functions, types

from devkit.sandbox import CAPTION_LIMIT, TEXT_LIMIT, ImageKind, utf16_len
from devkit.sandbox._media import generate


async def test_text_limit_is_4096_utf16_code_units(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    emoji = "\N{GRINNING FACE}"  # two UTF-16 code units

    await client.send_message("alice", emoji * (TEXT_LIMIT // 2))
    with pytest.raises(errors.MessageTooLongError):
        await client.send_message("alice", emoji * (TEXT_LIMIT // 2) + "x")
    with pytest.raises(errors.MessageTooLongError):
        await client.send_message("alice", "a" * (TEXT_LIMIT + 1))

    assert utf16_len(emoji) == 2 and len(sandbox_world.received("alice")) == 1


async def test_an_empty_message_raises_message_empty(sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    peer = await client.get_input_entity("alice")

    for text in ("", "   \n"):
        with pytest.raises(errors.MessageEmptyError):
            await client(functions.messages.SendMessageRequest(peer=peer, message=text))


async def test_a_caption_over_1024_raises_media_caption_too_long(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    image = generate(ImageKind.JPEG)

    with pytest.raises(errors.MediaCaptionTooLongError):
        await client.send_file("alice", image, caption="c" * (CAPTION_LIMIT + 1))
    await client.send_file("alice", image, caption="c" * CAPTION_LIMIT)

    assert len(sandbox_world.received("alice")) == 1


async def test_an_invalid_peer_raises_peer_id_invalid(sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    alice = sandbox_demo.contacts[0]

    with pytest.raises(errors.PeerIdInvalidError):
        await client(functions.messages.SendMessageRequest(
            peer=types.InputPeerUser(alice.id, alice.access_hash + 1), message="hi"))
    with pytest.raises(errors.PeerIdInvalidError):
        await client(functions.messages.SendMessageRequest(peer=types.InputPeerUser(987654321, 1), message="hi"))
    with pytest.raises(errors.ChannelInvalidError):
        await client(functions.messages.SendMessageRequest(peer=types.InputPeerChannel(987654321, 1), message="hi"))


async def test_a_user_who_blocked_us_raises_user_is_blocked(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.block("carol", "demo_one")

    with pytest.raises(errors.UserIsBlockedError):
        await client.send_message("carol", "hello?")
    sandbox_world.unblock("carol", "demo_one")
    await client.send_message("carol", "hello again")


async def test_a_deleted_account_raises_input_user_deactivated(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    await client.get_input_entity("bob")
    sandbox_world.deactivate("bob")

    with pytest.raises(errors.InputUserDeactivatedError):
        await client.send_message("bob", "are you there?")


async def test_chats_we_may_not_write_to_raise_chat_write_forbidden(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    group = sandbox_world.create_group("Readers", ["demo_one", "alice"], creator="alice")
    sandbox_world.set_can_write(group, "demo_one", False)

    with pytest.raises(errors.ChatWriteForbiddenError):
        await client.send_message("demo_photos", "I am only a member")  # broadcast channel, not an admin
    with pytest.raises(errors.ChatWriteForbiddenError):
        await client.send_message(group.marked_id, "muted")
    sandbox_world.set_can_write(group, "demo_one", True)
    await client.send_message(group.marked_id, "unmuted")

    assert [m.text for m in sandbox_world.received(group)] == ["unmuted"]
    assert [m.text for m in sandbox_world.history("alice", group)] == ["unmuted"]


async def test_a_private_channel_we_left_raises_channel_private(sandbox_world, sandbox_demo, sandbox_connect):
    secret = sandbox_world.create_channel("Secret", creator="operator", members=["demo_one"])
    client = await sandbox_connect(sandbox_demo.accounts[0])
    await client.get_dialogs()  # how an account learns a private channel's access hash
    entity = await client.get_input_entity(secret.marked_id)
    sandbox_world.remove_member(secret, "demo_one")

    with pytest.raises(errors.ChannelPrivateError):
        await client.get_messages(entity, limit=1)


async def test_flood_limit_per_chat_raises_flood_wait_with_seconds(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.set_flood_limit("chat", rate=0.1, burst=2)

    await client.send_message("alice", "1")
    await client.send_message("alice", "2")
    with pytest.raises(errors.FloodWaitError) as caught:
        await client.send_message("alice", "3")

    assert 1 <= caught.value.seconds <= 10
    assert len(sandbox_world.received("alice")) == 2


async def test_flood_limit_per_account_covers_every_chat(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[1])
    sandbox_world.set_flood_limit("account", rate=0.5, burst=1, account="demo_two")
    other = await sandbox_connect(sandbox_demo.accounts[0])

    await client.send_message("alice", "one")
    with pytest.raises(errors.FloodWaitError):
        await client(functions.messages.SendMessageRequest(peer=await client.get_input_entity("bob"), message="two"))
    await other.send_message("bob", "other account is fine")
    sandbox_world.clear_flood_limits()


async def test_an_account_wide_flood_limit_answers_every_chat_and_counts_its_answers(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.set_flood_limit("account", rate=0.01, burst=1, account="demo_one")

    await client.send_message("alice", "one")
    with pytest.raises(errors.FloodWaitError):  # another chat: the same account's bucket
        await client(functions.messages.SendMessageRequest(peer=await client.get_input_entity("bob"), message="more"))
    client._flood_waited_requests.clear()  # Telethon would refuse the next one locally: ask the server
    with pytest.raises(errors.FloodWaitError):
        await client(functions.messages.SendMessageRequest(peer=await client.get_input_entity("carol"), message="more"))

    assert sandbox_world.limit_answers("demo_one") == {"FLOOD_WAIT": 2}
    assert sandbox_world.limit_answers("demo_two") == {}
    summary = sandbox_world.summary()  # what /status shows in sandbox mode
    assert summary["limit_answers"] == {"FLOOD_WAIT": 2} and summary["flood_limits"] == 1


async def test_a_non_contacts_limit_answers_peer_flood_to_strangers_only(sandbox_world, sandbox_demo, sandbox_connect):
    stranger = sandbox_world.create_user("stranger", first_name="Stranger")
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.set_flood_limit("non_contacts", rate=0.001, burst=1, account="demo_one")

    assert stranger.username == "stranger"
    await client.send_message("stranger", "first cold message")
    with pytest.raises(errors.PeerFloodError):
        await client.send_message("stranger", "second cold message")
    await client.send_message("alice", "a contact is fine")  # @alice is demo_one's contact

    assert [m.text for m in sandbox_world.received("stranger")] == ["first cold message"]
    assert sandbox_world.limit_answers("demo_one") == {"PEER_FLOOD": 1}
    sandbox_world.clear_flood_limits()
    await client.send_message("stranger", "after the limit")


async def test_basic_group_messages_get_per_member_ids(sandbox_world, sandbox_demo, sandbox_connect):
    group = sandbox_world.create_group("Pair", ["demo_one", "demo_two"], creator="demo_one")
    sandbox_world.send_incoming("alice", "demo_two", "warm up")  # demo_two's box now has one more message
    one = await sandbox_connect(sandbox_demo.accounts[0])
    two = await sandbox_connect(sandbox_demo.accounts[1])

    sent = await one.send_message(group.marked_id, "hello group")
    [seen] = await two.get_messages(group.marked_id, limit=1)

    assert seen.text == "hello group" and seen.sender_id == sandbox_demo.accounts[0].id
    assert seen.id != sent.id  # each account has its own message id sequence, as in Telegram


async def test_search_and_get_messages_by_id(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    for text in ("apple pie", "banana", "apple tart"):
        sandbox_world.send_incoming("alice", "demo_one", text)

    found = [m.text async for m in client.iter_messages("alice", search="apple")]
    by_id = await client.get_messages("alice", ids=[2, 99])

    assert found == ["apple tart", "apple pie"]
    assert by_id[0].text == "banana" and by_id[1] is None


# --- access hashes and the update difference, as strict as Telegram ------------------------


async def test_a_user_who_is_not_a_contact_needs_the_hash_this_account_was_given(sandbox_world, sandbox_demo, sandbox_connect):
    stranger = sandbox_world.create_user("stranger")
    client = await sandbox_connect(sandbox_demo.accounts[0])
    mine = sandbox_world.access_hash(stranger, viewer=sandbox_demo.accounts[0])
    theirs = sandbox_world.access_hash(stranger, viewer=sandbox_demo.accounts[1])

    for wrong in (0, theirs):
        with pytest.raises(errors.PeerIdInvalidError):
            await client(functions.messages.SendMessageRequest(peer=types.InputPeerUser(stranger.id, wrong), message="hi"))
    await client(functions.messages.SendMessageRequest(peer=types.InputPeerUser(stranger.id, mine), message="hi"))

    assert [m.text for m in sandbox_world.received("stranger")] == ["hi"]
    assert mine != theirs


async def test_a_contact_is_taken_with_hash_zero_a_channel_never(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    alice = sandbox_world.peer("alice")

    await client(functions.messages.SendMessageRequest(peer=types.InputPeerUser(alice.id, 0), message="hi"))
    with pytest.raises(errors.ChannelInvalidError):
        await client(functions.channels.GetChannelsRequest([types.InputChannel(sandbox_demo.channel.id, 0)]))
    with pytest.raises(ValueError):  # Telethon's own fallback (GetUsers with hash 0) finds nothing either
        await client.get_input_entity(sandbox_world.create_user("nobody_yet").id)


async def test_get_difference_from_a_state_far_behind_answers_difference_too_long(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    state = await client(functions.updates.GetStateRequest())
    sandbox_world.set_difference_limits(max_pts=2)

    sandbox_world.send_incoming("alice", "demo_one", "one", gap=True)
    near = await client(functions.updates.GetDifferenceRequest(pts=state.pts, date=state.date, qts=0))
    for text in ("two", "three"):
        sandbox_world.send_incoming("alice", "demo_one", text, gap=True)
    far = await client(functions.updates.GetDifferenceRequest(pts=state.pts, date=state.date, qts=0))

    assert isinstance(near, types.updates.Difference) and [m.message for m in near.new_messages] == ["one"]
    assert isinstance(far, types.updates.DifferenceTooLong) and far.pts == state.pts + 3


async def test_a_very_old_state_is_too_long_and_so_is_a_channel_far_behind(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    state = await client(functions.updates.GetStateRequest())
    sandbox_world.set_difference_limits(max_age=60, max_pts=1)
    old = state.date.replace(year=state.date.year - 1)
    for text in ("a", "b"):
        sandbox_world.post_to_channel("demo_photos", text=text, gap=True)
    channel = await client.get_input_entity("demo_photos")

    account = await client(functions.updates.GetDifferenceRequest(pts=state.pts, date=old, qts=0))
    behind = await client(functions.updates.GetChannelDifferenceRequest(
        channel=channel, filter=types.ChannelMessagesFilterEmpty(), pts=1, limit=100))

    assert isinstance(account, types.updates.DifferenceTooLong)
    assert isinstance(behind, types.updates.ChannelDifferenceTooLong) and behind.final
    assert [m.message for m in behind.messages][:2] == ["b", "a"]


async def test_dialogs_come_in_pages_newest_first(sandbox_world, sandbox_demo, sandbox_connect):
    for name in ("pen_one", "pen_two", "pen_three"):
        sandbox_world.send_incoming(sandbox_world.create_user(name), "demo_one", f"from {name}")
    client = await sandbox_connect(sandbox_demo.accounts[0])

    first = await client(functions.messages.GetDialogsRequest(
        offset_date=None, offset_id=0, offset_peer=types.InputPeerEmpty(), limit=2, hash=0))
    every = await client.get_dialogs()

    assert isinstance(first, types.messages.DialogsSlice) and len(first.dialogs) == 2 and first.count >= 4
    names = [d.name for d in every]
    assert {"Pen_one", "Pen_two", "Pen_three", "Demo Photos"} <= set(names) and len(names) == len(set(names))
    assert names.index("Pen_three") < names.index("Pen_one")
