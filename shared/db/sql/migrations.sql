-- The migrator's own bookkeeping (shared/db/migrations.py). It cannot be a
-- migration: it is what records the migrations. Where the Supabase CLI keeps
-- it, so `supabase db push` and `./start.sh db migrate` agree.
-- Each statement starts with a `-- name: <name>` line.

-- name: bookkeeping
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
    version text primary key,
    statements text[],
    name text
);

-- name: lock
-- $1: the advisory lock key every migrator takes (released at commit).
select pg_advisory_xact_lock($1);

-- name: bookkeeping_exists
select to_regclass('supabase_migrations.schema_migrations') is not null;

-- name: applied_versions
select version, statements from supabase_migrations.schema_migrations order by version;

-- name: is_applied
select 1 from supabase_migrations.schema_migrations where version = $1;

-- name: record_applied
insert into supabase_migrations.schema_migrations (version, name, statements) values ($1, $2, $3);
