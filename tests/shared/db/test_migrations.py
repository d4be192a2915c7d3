"""Migrations: in order, once, safe to run twice, on the embedded server and the machine's PostgreSQL 15."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from shared.db import MIGRATIONS_DIR, MigrationError, apply_migrations, discover, migration_status
from tests.fixtures.postgres import PgServer

CATALOG = """
select 'table ' || c.relname || ' rls=' || c.relrowsecurity
from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'public' and c.relkind = 'r'
union all
select 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull
from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and c.relkind = 'r' and a.attnum > 0 and not a.attisdropped
union all
select 'function ' || p.oid::regprocedure::text || ' ' || md5(p.prosrc) || ' ' || coalesce(p.proacl::text, '')
from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'public'
union all
select 'index ' || indexdef from pg_indexes where schemaname = 'public'
union all
select 'constraint ' || conname || ' ' || pg_get_constraintdef(oid)
from pg_constraint where connamespace = 'public'::regnamespace
union all
select 'policy ' || policyname from pg_policies where schemaname = 'public'
order by 1
"""


async def _catalog(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(CATALOG)]
    finally:
        await conn.close()


@pytest.fixture(params=["embedded_pg", "local_pg"], ids=["embedded", "pg15"])
def server(request: pytest.FixtureRequest) -> PgServer:
    return request.getfixturevalue(request.param)


async def test_migrations_apply_to_an_empty_database_and_again_without_change(server: PgServer) -> None:
    dsn = await server.create_database(migrated=False)
    try:
        first = await apply_migrations(dsn)
        assert first.applied == [m.version for m in discover()]
        before = await _catalog(dsn)
        second = await apply_migrations(dsn)
        assert second.applied == [] and second.already_applied == first.applied
        assert await _catalog(dsn) == before
        assert all(applied for _, applied in await migration_status(dsn))
    finally:
        if server.drop_after_test:
            await server.drop_database(dsn)


async def test_every_table_has_row_level_security_and_no_policy_for_the_public_roles(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch(
            "select c.relname, c.relrowsecurity from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = 'public' and c.relkind = 'r'"
        )
        policies = await conn.fetchval("select count(*) from pg_policies where schemaname = 'public'")
        anon_may_call = await conn.fetchval(
            "select bool_or(has_function_privilege('anon', p.oid, 'execute')) "
            "from pg_proc p where p.pronamespace = 'public'::regnamespace"
        )
        roles = {r[0] for r in await conn.fetch("select rolname from pg_roles where rolname in ('anon', 'authenticated', 'service_role')")}
    finally:
        await conn.close()
    assert len(tables) == 14  # the ten of the schema (its two job tables now one, jobs), reply_cursors, account_send_holds, telegram_update_state, telegram_entities and process_leases
    assert all(row["relrowsecurity"] for row in tables), [r["relname"] for r in tables if not r["relrowsecurity"]]
    assert policies == 0
    assert anon_may_call is False
    assert roles == {"anon", "authenticated", "service_role"}


async def test_concurrent_migrators_apply_each_file_once(embedded_pg: PgServer) -> None:
    dsn = await embedded_pg.create_database(migrated=False)
    reports = await asyncio.gather(apply_migrations(dsn), apply_migrations(dsn))
    applied = [v for r in reports for v in r.applied]
    assert sorted(applied) == [m.version for m in discover()]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("select count(*) from supabase_migrations.schema_migrations") == len(applied)
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_behind(embedded_pg: PgServer, tmp_path: Path) -> None:
    for migration in discover():
        shutil.copy(migration.path, tmp_path / migration.path.name)
    (tmp_path / "20991231000000_broken.sql").write_text("create table half_done (id int);\nselect 1 / 0;\n")
    dsn = await embedded_pg.create_database(migrated=False)
    with pytest.raises(MigrationError, match="20991231000000_broken.sql"):
        await apply_migrations(dsn, directory=tmp_path)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("select to_regclass('public.half_done')") is None
        versions = [r[0] for r in await conn.fetch("select version from supabase_migrations.schema_migrations")]
    finally:
        await conn.close()
    assert "20991231000000" not in versions and len(versions) == len(discover())


def test_migration_files_follow_the_supabase_cli_layout(tmp_path: Path) -> None:
    found = discover()
    assert found and [m.version for m in found] == sorted(m.version for m in found)
    assert all(m.path.parent == MIGRATIONS_DIR for m in found)
    (tmp_path / "001_init.sql").write_text("select 1;")
    with pytest.raises(MigrationError, match="YYYYMMDDHHMMSS"):
        discover(tmp_path)
