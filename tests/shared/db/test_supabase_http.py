"""The Supabase HTTP transport against the PostgREST-compatible test endpoint."""

from __future__ import annotations

import asyncio

import pytest

from shared.db import DatabaseRejected, DatabaseUnavailable, SupabaseDatabase
from shared.errors import ErrorKind, classify
from tests.fixtures.postgres import fresh_breaker
from tests.fixtures.postgrest import PostgrestEndpoint


async def test_every_call_carries_the_service_role_key(supabase_database: SupabaseDatabase, postgrest: PostgrestEndpoint) -> None:
    await supabase_database.upsert_account("main")
    seen = postgrest.requests[-1]
    assert seen.function == "account_upsert" and seen.body["p_label"] == "main"
    assert seen.apikey == postgrest.service_key
    assert seen.authorization == f"Bearer {postgrest.service_key}"
    assert postgrest.service_key not in repr(supabase_database.describe())


async def test_gateway_outage_raises_transient_errors_and_calls_work_again_after(
    supabase_database: SupabaseDatabase, postgrest: PostgrestEndpoint
) -> None:
    postgrest.fail_with(503, "<html>upstream unavailable</html>")
    with pytest.raises(DatabaseUnavailable) as caught:
        await supabase_database.upsert_account("main")
    assert classify(caught.value).kind is ErrorKind.TRANSIENT
    postgrest.fail_with(503, {"code": "PGRST001", "message": "Database client error. Retrying the connection."})
    with pytest.raises(DatabaseUnavailable):
        await supabase_database.list_accounts()
    postgrest.fail_with(None)
    assert (await supabase_database.upsert_account("main")).label == "main"


async def test_unreachable_endpoint_raises_database_unavailable(postgrest: PostgrestEndpoint) -> None:
    db = await SupabaseDatabase(postgrest.url, postgrest.service_key, timeout=5, breaker=fresh_breaker()).open()
    try:
        await postgrest.stop()
        with pytest.raises(DatabaseUnavailable):
            await db.list_accounts()
    finally:
        await db.close()


async def test_database_errors_keep_their_code_and_permanence(supabase_database: SupabaseDatabase) -> None:
    with pytest.raises(DatabaseRejected) as bad_argument:
        await supabase_database.enqueue_outbound(1, "alice", "")
    assert bad_argument.value.code == "22023"
    with pytest.raises(DatabaseRejected) as missing:
        await supabase_database.call("no_such_function", {"p_x": 1})
    assert missing.value.code == "PGRST202"
    assert classify(missing.value).kind is ErrorKind.PERMANENT
    assert supabase_database.breaker.state.value == "closed"


async def test_public_anon_key_can_call_no_function(postgrest: PostgrestEndpoint) -> None:
    anon = await SupabaseDatabase(postgrest.url, postgrest.anon_key, breaker=fresh_breaker()).open()
    try:
        with pytest.raises(DatabaseRejected) as caught:
            await anon.list_accounts()
        assert caught.value.code == "42501"
    finally:
        await anon.close()
    wrong = await SupabaseDatabase(postgrest.url, "not-a-key", breaker=fresh_breaker()).open()
    try:
        with pytest.raises(DatabaseRejected):
            await wrong.list_accounts()
    finally:
        await wrong.close()


async def test_waiters_poll_because_notify_does_not_cross_http(supabase_database: SupabaseDatabase) -> None:
    subscription = await supabase_database.subscribe("outbound")
    assert subscription.live is False
    assert await asyncio.wait_for(subscription.wait(timeout=3600), timeout=10) is False
    assert supabase_database.describe()["notifications"] == "polling"
