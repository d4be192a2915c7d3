"""The asyncpg transport: outages, restarts, deadlines, the breaker, LISTEN reconnects, poolers."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from shared.breaker import CircuitBreaker, CircuitOpenError
from shared.db import DatabaseOutcomeUnknown, DatabaseRejected, DatabaseUnavailable, PostgresDatabase
from shared.db.postgres import describe_dsn, parse_dsn
from shared.errors import ErrorKind, TransientError, classify
from shared.timeouts import OperationTimeout
from tests.fixtures.postgres import PgServer, fresh_breaker
from tests.shared.db.polling import eventually

OTHERS = "select count(pg_terminate_backend(pid)) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()"


async def _answers(db: PostgresDatabase) -> bool:
    try:
        await db.ping()
    except TransientError:
        return False
    return True


async def test_pool_recovers_after_its_connections_are_terminated(database: PostgresDatabase, database_url: str) -> None:
    account = (await database.upsert_account("main")).id
    await asyncio.gather(*(database.ping() for _ in range(4)))
    admin = await asyncpg.connect(database_url)
    try:
        assert await admin.fetchval(OTHERS) >= 1
        await database.ping()  # read-only: retried once on a fresh connection, no error
        assert await admin.fetchval(OTHERS) >= 1
        try:
            await database.enqueue_outbound(account, "alice", "hi")
        except DatabaseOutcomeUnknown as exc:  # the statement may have reached the server
            assert classify(exc).kind is ErrorKind.UNKNOWN_OUTCOME
        assert (await database.enqueue_outbound(account, "alice", "again")).created
    finally:
        await admin.close()
    assert database.breaker.state.value == "closed"


async def test_outage_raises_transient_errors_then_pool_and_listener_recover_after_restart(
    database: PostgresDatabase, embedded_pg: PgServer, database_url: str
) -> None:
    assert embedded_pg.embedded is not None
    account = (await database.upsert_account("main")).id
    subscription = await database.subscribe("outbound")
    assert subscription.live
    await embedded_pg.embedded.stop()
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            await database.ping()
        assert classify(caught.value).kind is ErrorKind.TRANSIENT
        # The dead pooled connections are gone now: a change is refused before it is sent.
        with pytest.raises(DatabaseUnavailable) as refused:
            await database.enqueue_outbound(account, "alice", "during outage")
        assert classify(refused.value).kind is ErrorKind.TRANSIENT
        await eventually(lambda: _not(subscription.live))
        # Waiters fall back to polling instead of sleeping until the timeout.
        assert await asyncio.wait_for(subscription.wait(timeout=3600), timeout=10) in (True, False)
    finally:
        await embedded_pg.embedded.start()
    await eventually(lambda: _answers(database))
    await eventually(lambda: _true(subscription.live), timeout=30)
    while await subscription.wait(timeout=0):
        pass  # the reconnect wakes everyone once; consume that
    waiter = asyncio.create_task(subscription.wait(timeout=60))
    other = await PostgresDatabase(database_url, breaker=fresh_breaker()).open()
    try:
        await other.enqueue_outbound(account, "alice", "after the restart")
    finally:
        await other.close()
    assert await asyncio.wait_for(waiter, timeout=10) is True
    (row,) = await database.claim_outbound([account], owner="w")
    assert row.text == "after the restart", "nothing was stored for the call that failed"


async def _not(value: bool) -> bool:
    return not value


async def _true(value: bool) -> bool:
    return value


async def test_listener_reconnects_after_its_connection_is_killed(database: PostgresDatabase, database_url: str) -> None:
    subscription = await database.subscribe("outbound")
    account = (await database.upsert_account("main")).id
    admin = await asyncpg.connect(database_url)
    try:
        killed = await admin.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where datname = current_database() and pid <> pg_backend_pid() and query ilike 'listen%'"
        )
        assert killed == 1
        await eventually(lambda: _true(database._listener.reconnects >= 1 and subscription.live))
        while await subscription.wait(timeout=0):
            pass
        waiter = asyncio.create_task(subscription.wait(timeout=60))
        await admin.execute("select outbound_enqueue(p_account_id => $1, p_peer => 'alice', p_text => 'hi')", account)
        assert await asyncio.wait_for(waiter, timeout=10) is True
    finally:
        await admin.close()


async def test_unreachable_database_raises_transient_errors_until_the_breaker_opens() -> None:
    breaker = CircuitBreaker("database", failure_threshold=3, recovery_timeout=60)
    db = await PostgresDatabase("postgresql://postgres@127.0.0.1:1/nothing", timeout=2, breaker=breaker).open()
    try:
        for _ in range(3):
            with pytest.raises(DatabaseUnavailable):
                await db.upsert_account("main")
        with pytest.raises(CircuitOpenError) as caught:
            await db.upsert_account("main")
        assert classify(caught.value).kind is ErrorKind.TRANSIENT
        assert db.describe()["breaker"] == "open"
    finally:
        await db.close()


async def test_caller_mistakes_raise_permanent_errors_and_leave_the_breaker_closed(database: PostgresDatabase) -> None:
    for _ in range(6):
        with pytest.raises(DatabaseRejected) as caught:
            await database.enqueue_outbound(1, " ", "no peer")
        assert classify(caught.value).kind is ErrorKind.PERMANENT
    with pytest.raises(DatabaseRejected) as missing:
        await database.call("no_such_function", {})
    assert missing.value.code == "42883"
    with pytest.raises(DatabaseRejected):
        await database.call("outbound_get", {"p_id": "not a number"}, read_only=True)
    assert database.breaker.state.value == "closed"


async def test_call_past_its_deadline_times_out_with_an_unknown_outcome_and_commits_nothing(database_url: str) -> None:
    db = await PostgresDatabase(database_url, timeout=0.3, breaker=fresh_breaker()).open()
    admin = await asyncpg.connect(database_url)
    try:
        account = (await db.upsert_account("main")).id
        await db.enqueue_outbound(account, "alice", "hi")
        (row,) = await db.claim_outbound([account], owner="w")
        assert row.lease_token
        async with admin.transaction():
            await admin.execute("select 1 from messages where id = $1 for update", row.id)
            with pytest.raises(OperationTimeout) as caught:
                await db.mark_sent(row.id, row.lease_token, telegram_message_id=1, chat_id=2)
        assert caught.value.outcome_unknown is True
        assert classify(caught.value).kind is ErrorKind.UNKNOWN_OUTCOME
        still = await db.get_outbound(row.id)
        assert still is not None and still.status.value == "sending", "the cancelled statement did not commit"
        assert await db.mark_sent(row.id, row.lease_token, telegram_message_id=1, chat_id=2)
    finally:
        await admin.close()
        await db.close()


async def test_transaction_pooler_urls_turn_off_statement_cache_and_listen() -> None:
    assert parse_dsn("postgresql://u:secret@pooler.supabase.com:6543/postgres") == (
        "postgresql://u:secret@pooler.supabase.com:6543/postgres",
        True,
    )
    assert parse_dsn("postgresql://u:p@db.example:5432/postgres?pgbouncer=true&sslmode=require") == (
        "postgresql://u:p@db.example:5432/postgres?sslmode=require",
        True,
    )
    assert parse_dsn("postgresql://u:p@db.example:5432/postgres")[1] is False
    db = PostgresDatabase("postgresql://u:secret@pooler.supabase.com:6543/postgres", breaker=fresh_breaker())
    assert db.transaction_pooler and not db.listen_enabled
    subscription = await db.subscribe("outbound")
    assert subscription.live is False and subscription.poll_interval <= 1.0
    described = db.describe()
    assert "secret" not in repr(described)
    assert described["notifications"] == "polling" and described["port"] == 6543


def test_describe_shows_where_but_never_the_password() -> None:
    assert describe_dsn("postgresql://bot:hunter2@db.abc.supabase.co:5432/postgres") == {
        "host": "db.abc.supabase.co",
        "port": 5432,
        "database": "postgres",
        "user": "bot",
    }
    assert describe_dsn("postgresql://postgres:@/postgres?host=/tmp/pg")["host"] == "/tmp/pg"


async def test_the_open_breaker_probes_with_db_ping_and_closes_as_soon_as_the_database_is_back(
    embedded_pg: PgServer, database_url: str
) -> None:
    assert embedded_pg.embedded is not None
    breaker = CircuitBreaker("database-probed", failure_threshold=2, recovery_timeout=3600, probe_interval=0.2)
    db = await PostgresDatabase(database_url, timeout=2, breaker=breaker).open()
    try:
        await db.ping()
        await embedded_pg.embedded.stop()
        try:
            for _ in range(2):
                with pytest.raises(TransientError):
                    await db.ping()
            assert breaker.state.value == "open"
            with pytest.raises(CircuitOpenError) as refused:
                await db.ping()
            assert refused.value.retry_after < 1, "callers wait for the next probe, not the hour-long recovery timeout"
        finally:
            await embedded_pg.embedded.start()
        await eventually(lambda: _true(breaker.state.value == "closed"), timeout=20)
        await db.ping()
        assert breaker.get_status()["probes_run"] >= 2
    finally:
        await db.close()
    assert breaker._probe_task is None or breaker._probe_task.done()
