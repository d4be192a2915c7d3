"""World: peers, ground truth, reset, seeding, and one world shared by several processes."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path

import pytest
from telethon import errors, functions

from devkit.sandbox import PeerKind, SandboxError, UnknownPeerError, World

ROOT = Path(__file__).resolve().parents[3]


def test_peers_are_found_by_username_phone_id_marked_id_and_title(sandbox_world, sandbox_demo):
    alice = sandbox_demo.contacts[0]
    channel = sandbox_demo.channel

    assert sandbox_world.peer("@alice") == sandbox_world.peer("alice") == sandbox_world.peer("+1 555 010 1001") == alice
    assert sandbox_world.peer(alice.id) == sandbox_world.peer(str(alice.id)) == alice
    assert sandbox_world.peer(channel.marked_id) == sandbox_world.peer("Demo Photos") == channel
    assert channel.marked_id == -1000000000000 - channel.id
    with pytest.raises(UnknownPeerError):
        sandbox_world.peer("@nobody")


def test_seed_demo_is_idempotent(sandbox_world):
    first = sandbox_world.seed_demo()
    second = sandbox_world.seed_demo()

    assert first == second
    assert [p.kind for p in sandbox_world.peers()].count(PeerKind.BOT) == 2
    assert first.alert_bot.bot_token == "1000001:SANDBOX-alert" and first.accounts[0].phone == "15550100001"


def test_bad_usernames_and_taken_phones_are_refused(sandbox_world, sandbox_demo):
    with pytest.raises(SandboxError, match="invalid username"):
        sandbox_world.create_user("x")
    with pytest.raises(SandboxError, match="taken"):
        sandbox_world.create_user("alice_two", phone="+15550101001")


def test_received_lists_every_copy_with_duplicates_visible(sandbox_world, sandbox_demo):
    sandbox_world.send_incoming("alice", "demo_one", "same text")
    sandbox_world.send_incoming("alice", "demo_one", "same text")
    sandbox_world.send_incoming("bob", "demo_one", "other")

    texts = [m.text for m in sandbox_world.received("demo_one")]
    from_alice = sandbox_world.received("demo_one", sender="alice")

    assert texts == ["same text", "same text", "other"]
    assert [m.id for m in from_alice] == [1, 2] and all(not m.out for m in from_alice)
    assert [m.text for m in sandbox_world.sent("alice")] == ["same text", "same text"]


def test_reset_empties_the_world(sandbox_world, sandbox_demo):
    sandbox_world.send_incoming("alice", "demo_one", "hi")
    sandbox_world.set_fault("hang")

    sandbox_world.reset()

    assert sandbox_world.peers() == [] and sandbox_world.faults() == []
    assert sandbox_world.seed_demo().accounts[0].username == "demo_one"


async def test_reset_invalidates_running_sessions(sandbox_world, sandbox_demo, sandbox_connect):
    client = await sandbox_connect(sandbox_demo.accounts[0])
    sandbox_world.reset()

    with pytest.raises(errors.AuthKeyUnregisteredError):
        await client.get_messages("alice", limit=1)


def test_world_open_shares_one_instance_per_directory(tmp_path):
    first = World.open(tmp_path / "w")
    try:
        assert World.open(tmp_path / "w") is first
        assert World.open(str(tmp_path / "w" / ".." / "w")) is first
    finally:
        first.close()


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from telethon import errors, functions
    from devkit.sandbox import SandboxClient

    async def main(directory: str, random_id: int) -> None:
        client = SandboxClient(directory, phone="+15550100001", flood_sleep_threshold=0,
                               raise_last_call_error=True, request_retries=0)
        await asyncio.wait_for(client.connect(), 20)
        try:
            peer = await client.get_input_entity("bob")
            await client(functions.messages.SendMessageRequest(peer=peer, message="once", random_id=random_id))
            print("SENT")
        except errors.RandomIdDuplicateError:
            print("DUPLICATE")
        finally:
            await client.disconnect()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


@pytest.mark.slow
async def test_random_id_dedupe_holds_across_two_processes(tmp_path, sandbox_world, sandbox_demo, sandbox_connect):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    client = await sandbox_connect(sandbox_demo.accounts[0])
    peer = await client.get_input_entity("bob")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(sandbox_world.directory), "5551212",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
    )

    try:
        await client(functions.messages.SendMessageRequest(peer=peer, message="once", random_id=5551212))
        mine = "SENT"
    except errors.RandomIdDuplicateError:
        mine = "DUPLICATE"
    stdout, stderr = await asyncio.wait_for(child.communicate(), 60)

    assert child.returncode == 0, stderr.decode()
    assert sorted([mine, stdout.decode().strip()]) == ["DUPLICATE", "SENT"]
    assert [m.text for m in sandbox_world.received("bob")] == ["once"]
