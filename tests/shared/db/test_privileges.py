"""Supabase's public roles (anon, authenticated) may touch nothing the migrations made, nor what later ones make.

On Supabase these roles hold the public API keys; a privilege alone is enough
for pg_graphql to show a table's columns to anyone with the anon key, row level
security notwithstanding. The bots use the database owner or service_role.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.db import apply_migrations
from tests.fixtures.postgres import PgServer

PUBLIC_ROLES = ("anon", "authenticated")

# What Supabase sets up before any migration of ours: its roles, and default
# privileges that hand every new table, sequence and function of the public
# schema to them (Supabase's own init scripts say exactly this for the
# postgres role, which runs the migrations). Roles are made when missing, as
# on a plain PostgreSQL.
_SUPABASE_SETUP = """
do $$
declare
    r text;
begin
    foreach r in array array['anon', 'authenticated', 'service_role'] loop
        if not exists (select 1 from pg_roles where rolname = r) then
            begin
                execute format('create role %I nologin', r);
            exception when duplicate_object or unique_violation then
                null;
            end;
        end if;
    end loop;
end
$$;
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
"""

_RELATIONS = """
select c.oid::regclass::text as name, c.relkind
from pg_class c
where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p', 'v', 'm', 'S', 'f')
order by 1
"""


@pytest.fixture(params=["embedded_pg", "local_pg"], ids=["embedded", "pg15"])
def server(request: pytest.FixtureRequest) -> PgServer:
    return request.getfixturevalue(request.param)


@pytest.fixture
async def conn(server: PgServer) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database set up like Supabase's, then migrated."""
    dsn = await server.create_database(migrated=False)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(_SUPABASE_SETUP)
        await apply_migrations(dsn)
        yield connection
    finally:
        await connection.close()
        if server.drop_after_test:
            await server.drop_database(dsn)


async def _denied(conn: asyncpg.Connection, role: str, statement: str) -> bool:
    """True when ``statement`` run as ``role`` is refused for lack of privilege."""
    try:
        async with conn.transaction():
            await conn.execute(f"set local role {role}")
            await conn.execute(statement)
    except asyncpg.InsufficientPrivilegeError:
        return True
    return False


async def test_anon_and_authenticated_can_select_from_no_table(conn: asyncpg.Connection) -> None:
    relations = await conn.fetch(_RELATIONS)
    tables = [r["name"] for r in relations if r["relkind"] != "S"]
    assert "telegram_accounts" in tables and "messages" in tables
    for role in PUBLIC_ROLES:
        allowed = [t for t in tables if not await _denied(conn, role, f"select * from {t} limit 1")]
        assert allowed == [], f"{role} may read {allowed}"
        writable = [t for t in tables if not await _denied(conn, role, f"delete from {t} where false")]
        assert writable == [], f"{role} may write {writable}"


async def test_the_public_roles_hold_no_privilege_on_any_table_sequence_or_function(conn: asyncpg.Connection) -> None:
    held = await conn.fetch(
        """
        select r.rolname, c.oid::regclass::text as object
        from pg_class c cross join pg_roles r
        where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p', 'v', 'm', 'f')
          and r.rolname = any ($1)
          and has_table_privilege(r.oid, c.oid, 'select, insert, update, delete, truncate, references, trigger')
        union all
        select r.rolname, c.oid::regclass::text
        from pg_class c cross join pg_roles r
        where c.relnamespace = 'public'::regnamespace and c.relkind = 'S'
          and r.rolname = any ($1) and has_sequence_privilege(r.oid, c.oid, 'usage, select, update')
        union all
        select r.rolname, p.oid::regprocedure::text
        from pg_proc p cross join pg_roles r
        where p.pronamespace = 'public'::regnamespace
          and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
          and r.rolname = any ($1) and has_function_privilege(r.oid, p.oid, 'execute')
        """,
        list(PUBLIC_ROLES),
    )
    assert [tuple(r) for r in held] == []
    sequences = await conn.fetchval("select count(*) from pg_class where relnamespace = 'public'::regnamespace and relkind = 'S'")
    assert sequences > 0  # the identity columns' sequences were among those checked


async def test_what_a_later_migration_creates_is_for_the_service_role_only(conn: asyncpg.Connection) -> None:
    # Created by the role that ran the migrations, as a later migration would be.
    await conn.execute("create table later_things (id bigint generated always as identity primary key, secret text)")
    await conn.execute("create function later_thing_count() returns bigint language sql as 'select count(*) from later_things'")
    for role in PUBLIC_ROLES:
        assert await _denied(conn, role, "select * from later_things")
        assert await _denied(conn, role, "select later_thing_count()")
    assert not await _denied(conn, "service_role", "insert into later_things (secret) values ('x')")
    assert not await _denied(conn, "service_role", "select later_thing_count()")

