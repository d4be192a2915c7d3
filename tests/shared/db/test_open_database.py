"""open_database picks the backend from the settings and logs it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shared.config import CommonSettings, load_settings
from shared.db import Backend, PostgresDatabase, SchemaMissing, SupabaseDatabase, database_breaker, open_database
from tests.fixtures.postgres import PgServer, fresh_breaker
from tests.fixtures.postgrest import PostgrestEndpoint


def _settings(tmp_path: Path, **env: str) -> CommonSettings:
    return load_settings(CommonSettings, env={"DATA_DIR": str(tmp_path), **env})


async def test_database_url_opens_postgres_and_migrates_only_when_asked(
    embedded_pg: PgServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = await embedded_pg.create_database(migrated=False)
    # Without DB_AUTO_MIGRATE an empty database is named as such at once, with what to run.
    with pytest.raises(SchemaMissing, match="the database has no schema yet .*db migrate.*DB_AUTO_MIGRATE=1"):
        await open_database(_settings(tmp_path, DATABASE_URL=empty), breaker=fresh_breaker())
    caplog.set_level(logging.INFO, logger="shared.db")
    migrated = await open_database(_settings(tmp_path, DATABASE_URL=empty, DB_AUTO_MIGRATE="1"), breaker=fresh_breaker())
    try:
        assert await migrated.list_accounts() == []
    finally:
        await migrated.close()
    assert any(r.getMessage() == "database backend: postgres" for r in caplog.records)


async def test_supabase_url_and_key_open_the_http_backend(postgrest: PostgrestEndpoint, tmp_path: Path) -> None:
    settings = _settings(tmp_path, SUPABASE_URL=postgrest.url, SUPABASE_SERVICE_ROLE_KEY=postgrest.service_key)
    db = await open_database(settings, breaker=fresh_breaker())
    try:
        assert isinstance(db, SupabaseDatabase) and db.backend is Backend.SUPABASE
        assert (await db.upsert_account("main")).label == "main"
    finally:
        await db.close()


async def test_supabase_url_without_its_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SUPABASE_SERVICE_ROLE_KEY"):
        await open_database(_settings(tmp_path, SUPABASE_URL="https://example.supabase.co"))


async def test_db_breaker_recovery_sets_how_long_the_process_wide_database_breaker_stays_open(
    embedded_pg: PgServer, tmp_path: Path
) -> None:
    breaker = database_breaker()
    before = breaker.recovery_timeout
    url = await embedded_pg.create_database()
    try:
        db = await open_database(_settings(tmp_path, DATABASE_URL=url, DB_BREAKER_RECOVERY="7"))
        try:
            assert db.breaker is breaker and breaker.recovery_timeout == 7.0
        finally:
            await db.close()
    finally:
        breaker.recovery_timeout = before
