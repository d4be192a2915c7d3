"""Accounts, their leases (one live process per Telegram session) and worker heartbeats, on every backend."""

from __future__ import annotations

from shared.db import AccountStatus, Database
from shared.heartbeat import HeartbeatRecord
from tests.shared.db.polling import eventually


async def test_one_account_is_held_by_one_live_process(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main", phone="+15550001", session="enc:abc")).id
    token = await backend_db.acquire_account_lease(account, owner="process-a", seconds=60)
    assert token is not None
    assert await backend_db.acquire_account_lease(account, owner="process-b", seconds=60) is None
    assert await backend_db.renew_account_lease(account, token, seconds=60)
    # The same process asking again keeps its token (its renewals keep working).
    assert await backend_db.acquire_account_lease(account, owner="process-a", seconds=60) == token


async def test_lapsed_lease_lets_another_process_take_over_and_the_old_holder_learns_on_renewal(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    old = await backend_db.acquire_account_lease(account, owner="old-deploy", seconds=0.05)
    assert old is not None
    new = await eventually(lambda: backend_db.acquire_account_lease(account, owner="new-deploy", seconds=60))
    assert new != old
    assert await backend_db.renew_account_lease(account, old, seconds=60) is False
    assert await backend_db.release_account_lease(account, old) is False, "a lost lease cannot release the new holder's"
    assert await backend_db.renew_account_lease(account, new, seconds=60) is True


async def test_released_lease_is_free_for_the_next_process_at_once(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main")).id
    token = await backend_db.acquire_account_lease(account, owner="old", seconds=600)
    assert token is not None
    assert await backend_db.release_account_lease(account, token)
    assert await backend_db.acquire_account_lease(account, owner="new", seconds=600) is not None


async def test_listings_never_carry_the_session_which_is_read_by_id(backend_db: Database) -> None:
    created = await backend_db.upsert_account("main", phone="+15550001", session="enc:first")
    assert created.has_session and created.status is AccountStatus.NEEDS_LOGIN
    updated = await backend_db.upsert_account("main", status=AccountStatus.ACTIVE)
    assert updated.id == created.id and updated.phone == "+15550001", "None keeps the stored value"
    assert await backend_db.get_account_session(created.id) == "enc:first"
    assert await backend_db.save_account_session(created.id, "enc:second")
    assert await backend_db.get_account_session(created.id) == "enc:second"
    listed = await backend_db.list_accounts()
    assert [a.label for a in listed] == ["main"]
    assert not hasattr(listed[0], "session")
    assert await backend_db.list_accounts(statuses=[AccountStatus.DISABLED]) == []


async def test_account_status_keeps_the_last_error(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main", status=AccountStatus.ACTIVE)).id
    assert await backend_db.set_account_status(account, AccountStatus.NEEDS_LOGIN, last_error="AuthKeyUnregisteredError")
    (listed,) = await backend_db.list_accounts(statuses=[AccountStatus.NEEDS_LOGIN])
    assert listed.last_error == "AuthKeyUnregisteredError"
    assert await backend_db.set_account_status(10_000, AccountStatus.DISABLED) is False


async def test_heartbeat_keeps_one_row_per_worker_with_its_loops(backend_db: Database) -> None:
    first = HeartbeatRecord(worker_id="telegram-main", status="online", loops={"outbound": {"alive": True}}, version="1.0", host="h1", pid=10)
    await backend_db.write_heartbeat(first)
    (row,) = await backend_db.list_heartbeats()
    second = HeartbeatRecord(worker_id="telegram-main", status="degraded", loops={"outbound": {"alive": False}}, version="1.0", host="h1", pid=10)
    await backend_db.write_heartbeat(second)
    (again,) = await backend_db.list_heartbeats()
    assert again.status == "degraded" and again.loops == {"outbound": {"alive": False}}
    assert again.last_heartbeat_at >= row.last_heartbeat_at
    assert again.started_at == row.started_at, "same process: start time kept"
    await backend_db.write_heartbeat(HeartbeatRecord(worker_id="telegram-main", status="online", loops={}, version="1.1", host="h2", pid=11))
    (restarted,) = await backend_db.list_heartbeats()
    assert restarted.started_at > row.started_at and restarted.pid == 11


async def test_fleet_members_are_the_replica_rows_younger_than_the_window_and_a_removed_one_is_gone(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main", status=AccountStatus.ACTIVE)).id
    for replica, pinned in (("telegram-main:a:1:x", []), ("telegram-main:b:2:y", ["main"])):
        await backend_db.write_heartbeat(
            HeartbeatRecord(worker_id=replica, status="online", loops={}, version="1", host=replica.split(":")[1], pid=1, fleet={"pinned": pinned})
        )
    await backend_db.write_heartbeat(HeartbeatRecord(worker_id="ingest", status="online", loops={}, version="1", host="c", pid=3))
    assert await backend_db.acquire_account_lease(account, owner="telegram-main:b:2:y", seconds=60)
    fleet = {r.replica: r for r in await backend_db.worker_fleet(live_seconds=60)}
    assert set(fleet) == {"telegram-main:a:1:x", "telegram-main:b:2:y"}, "other processes' heartbeats are not replicas"
    assert fleet["telegram-main:b:2:y"].pinned == ("main",) and fleet["telegram-main:b:2:y"].held == 1
    assert all(r.alive for r in fleet.values())
    assert await backend_db.remove_heartbeat("telegram-main:a:1:x")
    assert [r.replica for r in await backend_db.worker_fleet(live_seconds=60)] == ["telegram-main:b:2:y"]
    assert [r.alive for r in await backend_db.worker_fleet(live_seconds=0.000001)] == [False], "older than the window"


async def test_work_in_hand_counts_what_one_owner_is_sending_for_an_account(backend_db: Database) -> None:
    account = (await backend_db.upsert_account("main", status=AccountStatus.ACTIVE)).id
    await backend_db.enqueue_outbound(account, "alice", "one")
    assert await backend_db.account_work_in_hand(account, owner="me") == 0
    claimed = await backend_db.claim_outbound([account], owner="me", limit=10, lease_seconds=60, max_retries=3)
    assert len(claimed) == 1
    assert await backend_db.account_work_in_hand(account, owner="me") == 1
    assert await backend_db.account_work_in_hand(account, owner="someone-else") == 0


async def test_only_a_needs_login_for_a_key_that_could_not_decrypt_is_undone(backend_db: Database) -> None:
    from shared.cipher import DECRYPT_FAILURE

    by_key = (await backend_db.upsert_account("by-key", status=AccountStatus.ACTIVE)).id
    logged_out = (await backend_db.upsert_account("logged-out", status=AccountStatus.ACTIVE)).id
    await backend_db.set_account_status(by_key, AccountStatus.NEEDS_LOGIN, last_error=DECRYPT_FAILURE)
    await backend_db.set_account_status(logged_out, AccountStatus.NEEDS_LOGIN, last_error="AUTH_KEY_UNREGISTERED")
    assert await backend_db.recover_account_from_key_mismatch(by_key)
    assert not await backend_db.recover_account_from_key_mismatch(logged_out)
    statuses = {a.label: a.status for a in await backend_db.list_accounts()}
    assert statuses == {"by-key": AccountStatus.ACTIVE, "logged-out": AccountStatus.NEEDS_LOGIN}


async def test_a_process_lease_has_one_live_holder_and_a_released_one_is_free_at_once(backend_db: Database) -> None:
    token = await backend_db.acquire_process_lease("reply-guy", owner="a", seconds=60)
    assert token is not None
    assert await backend_db.acquire_process_lease("reply-guy", owner="b", seconds=60) is None, "one active replica"
    assert await backend_db.acquire_process_lease("reply-guy", owner="a", seconds=60) == token, "asking again keeps the token"
    assert await backend_db.process_lease_holder("reply-guy") == "a"
    assert await backend_db.renew_process_lease("reply-guy", token, seconds=60)
    assert await backend_db.release_process_lease("reply-guy", token)
    assert await backend_db.process_lease_holder("reply-guy") is None
    taken = await backend_db.acquire_process_lease("reply-guy", owner="b", seconds=60)
    assert taken is not None and taken != token
    assert await backend_db.renew_process_lease("reply-guy", token, seconds=60) is False, "the old token is fenced off"


async def test_a_lapsed_process_lease_goes_to_the_standby(backend_db: Database) -> None:
    old = await backend_db.acquire_process_lease("reply-guy", owner="killed", seconds=0.05)
    assert old is not None
    new = await eventually(lambda: backend_db.acquire_process_lease("reply-guy", owner="standby", seconds=60))
    assert new != old and await backend_db.process_lease_holder("reply-guy") == "standby"
