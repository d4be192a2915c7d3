-- Nothing for the public roles, and lists read in pages.
--
-- 1. Privileges. The bots reach the database as its owner (DATABASE_URL) or
-- as service_role (Supabase's HTTP API); nobody else needs anything. But
-- Supabase grants every new table, sequence and function of the public
-- schema to anon and authenticated (the roles of its public keys) through
-- default privileges, and PostgreSQL lets PUBLIC execute every new function.
-- Row level security hides the rows, yet a privilege is enough for
-- pg_graphql to show the table, its columns (telegram_accounts.session_encrypted
-- among them) and its functions to anyone holding the anon key, and for
-- Supabase's linter to report each one. So: every privilege of anon and
-- authenticated on the tables, sequences and functions of the public schema
-- is revoked, as is PUBLIC's execute on our functions, and the default
-- privileges of the role running the migrations say the same for whatever a
-- later migration creates (service_role gets what the bots need).
--
-- 2. Paging. Supabase's API answers at most its max-rows setting (1000 by
-- default) rows per request, whatever the function returns, and says
-- nothing about the rows it left out. Every set-returning function whose
-- answer grows with the data therefore takes p_limit and a keyset p_after
-- (the sort key of the last row of the previous page); both default to
-- null, which means everything, as before. The bots read them page by page
-- (shared/db/base.py), on both backends.

-- 1. Privileges ---------------------------------------------------------------------

do $$
declare
    r text;
    f record;
begin
    -- Supabase has these roles; a plain PostgreSQL got them from the schema
    -- migration, but a database whose roles were dropped since must not fail here.
    foreach r in array array['anon', 'authenticated'] loop
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('revoke all on all tables in schema public from %I', r);
            execute format('revoke all on all sequences in schema public from %I', r);
            execute format('revoke all on all functions in schema public from %I', r);
            execute format('alter default privileges in schema public revoke all on tables from %I', r);
            execute format('alter default privileges in schema public revoke all on sequences from %I', r);
            execute format('alter default privileges in schema public revoke all on functions from %I', r);
        end if;
    end loop;

    -- PUBLIC (every role, anon included) may execute a function unless told
    -- otherwise. Functions that extensions installed in public keep their
    -- privileges: our functions call them as the caller.
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        where p.pronamespace = 'public'::regnamespace
          and not exists (select 1 from pg_depend d
                          where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
    loop
        execute format('revoke execute on function %s from public', f.signature);
        if exists (select 1 from pg_roles where rolname = 'service_role') then
            execute format('grant execute on function %s to service_role', f.signature);
        end if;
    end loop;
    -- Functions later migrations create: not for PUBLIC. This default is
    -- global (a per-schema default cannot take back what the global one
    -- gives), so it holds for the migrator's functions in any schema; the
    -- service role keeps them all.
    alter default privileges revoke execute on functions from public;

    if exists (select 1 from pg_roles where rolname = 'service_role') then
        alter default privileges grant execute on functions to service_role;
        alter default privileges in schema public grant select, insert, update, delete on tables to service_role;
        alter default privileges in schema public grant usage, select on sequences to service_role;
    end if;
end
$$;

-- 2. Paging -------------------------------------------------------------------------
-- Each function is dropped and created again with the new arguments (a
-- second overload would make PostgREST's choice ambiguous).

drop function if exists account_list(text[]);
create or replace function account_list(
    p_statuses text[] default null,
    p_after bigint default null,
    p_limit integer default null
)
returns table (
    id bigint, label text, phone text, status text, has_session boolean,
    lease_owner text, lease_expires_at timestamptz, last_error text,
    created_at timestamptz, updated_at timestamptz
)
language sql stable
set search_path = public, pg_temp
as $$
    select a.id, a.label, a.phone, a.status, a.session_encrypted is not null,
           a.lease_owner, a.lease_expires_at, a.last_error, a.created_at, a.updated_at
    from telegram_accounts a
    where (p_statuses is null or a.status = any (p_statuses))
      and (p_after is null or a.id > p_after)
    order by a.id
    limit p_limit;
$$;

-- Most recently active first; a chat that never had a message comes last.
-- p_after_at/p_after_id: last_message_at and id of the previous page's last chat.
drop function if exists chats_recent(bigint, timestamptz, integer);
create or replace function chats_recent(
    p_account_id bigint,
    p_since timestamptz default null,
    p_limit integer default 100,
    p_after_at timestamptz default null,
    p_after_id bigint default null
)
returns setof chats
language sql stable
set search_path = public, pg_temp
as $$
    select * from chats c
    where c.account_id = p_account_id and (p_since is null or c.last_message_at >= p_since)
      and (p_after_id is null
           or (p_after_at is not null
               and (c.last_message_at < p_after_at or c.last_message_at is null
                    or (c.last_message_at = p_after_at and c.id > p_after_id)))
           or (p_after_at is null and c.last_message_at is null and c.id > p_after_id))
    order by c.last_message_at desc nulls last, c.id
    limit p_limit;
$$;

-- Rows per account and status; p_after_account_id/p_after_status: the previous page's last row.
drop function if exists outbound_counts(bigint);
create or replace function outbound_counts(
    p_account_id bigint default null,
    p_after_account_id bigint default null,
    p_after_status text default null,
    p_limit integer default null
)
returns table (account_id bigint, status text, count bigint)
language sql stable
set search_path = public, pg_temp
as $$
    select m.account_id, m.status, count(*)
    from messages m
    where m.direction = 'outbound' and m.status is not null
      and (p_account_id is null or m.account_id = p_account_id)
      and (p_after_account_id is null or (m.account_id, m.status) > (p_after_account_id, coalesce(p_after_status, '')))
    group by m.account_id, m.status
    order by m.account_id, m.status
    limit p_limit;
$$;

drop function if exists worker_heartbeats_list();
create or replace function worker_heartbeats_list(p_after text default null, p_limit integer default null)
returns setof worker_heartbeats
language sql stable
set search_path = public, pg_temp
as $$
    select * from worker_heartbeats
    where p_after is null or worker_id > p_after
    order by worker_id
    limit p_limit;
$$;

-- Soonest first; p_after_*: the previous page's last item.
drop function if exists retry_items_pending(text, integer);
create or replace function retry_items_pending(
    p_bot text,
    p_limit integer default 100,
    p_after_next_attempt_at timestamptz default null,
    p_after_created_at timestamptz default null,
    p_after_id text default null
)
returns setof retry_items
language sql stable
set search_path = public, pg_temp
as $$
    select * from retry_items r
    where r.bot = p_bot and r.status in ('pending', 'retrying')
      and (p_after_id is null
           or (r.next_attempt_at, r.created_at, r.id) > (p_after_next_attempt_at, p_after_created_at, p_after_id))
    order by r.next_attempt_at, r.created_at, r.id
    limit p_limit;
$$;

-- Newest first; p_after_*: the previous page's last item.
drop function if exists retry_items_exhausted(text, integer);
create or replace function retry_items_exhausted(
    p_bot text,
    p_limit integer default 100,
    p_after_updated_at timestamptz default null,
    p_after_id text default null
)
returns setof retry_items
language sql stable
set search_path = public, pg_temp
as $$
    select * from retry_items r
    where r.bot = p_bot and r.status = 'exhausted'
      and (p_after_id is null
           or r.updated_at < p_after_updated_at
           or (r.updated_at = p_after_updated_at and r.id > p_after_id))
    order by r.updated_at desc, r.id
    limit p_limit;
$$;

drop function if exists ingest_images_by_sha256(text);
create or replace function ingest_images_by_sha256(p_sha256 text, p_after bigint default null, p_limit integer default null)
returns setof ingest_images
language sql stable
set search_path = public, pg_temp
as $$
    select * from ingest_images
    where sha256 = p_sha256 and status = 'stored' and (p_after is null or id > p_after)
    order by id
    limit p_limit;
$$;

-- Oldest first; p_after_*: the previous page's last tweet.
drop function if exists tweets_list(text[], integer);
create or replace function tweets_list(
    p_statuses text[] default null,
    p_limit integer default 100,
    p_after_created_at timestamptz default null,
    p_after_id uuid default null
)
returns setof tweet_queue
language sql stable
set search_path = public, pg_temp
as $$
    select * from tweet_queue t
    where (p_statuses is null or t.status = any (p_statuses))
      and (p_after_id is null or (t.created_at, t.id) > (p_after_created_at, p_after_id))
    order by t.created_at, t.id
    limit p_limit;
$$;

drop function if exists reply_cursors_list();
create or replace function reply_cursors_list(p_after text default null, p_limit integer default null)
returns table (source text, since_id text)
language sql stable
set search_path = public, pg_temp
as $$
    select c.source, c.since_id from reply_cursors c
    where p_after is null or c.source > p_after
    order by c.source
    limit p_limit
$$;

-- The crash recovery of 20261124004000_tweet_recover_in_sql.sql, a page at a
-- time: at most p_limit stale tweets with an id above p_after, by id. A call
-- moves only the tweets it returns, so the caller sees every move.
drop function if exists tweet_recover_stale(double precision, integer, text);
create or replace function tweet_recover_stale(
    p_minutes double precision default 30,
    p_max_attempts integer default 5,
    p_bot text default null,
    p_after uuid default null,
    p_limit integer default null
)
returns table (id uuid, previous_status text, status text)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
    return query
    with stale as (
        select t.id,
               t.status as previous_status,
               case
                   when exists (
                       select 1 from retry_items r
                       where r.status = 'exhausted'
                         and (p_bot is null or r.bot = p_bot)
                         and r.payload ->> 'tweet_id' = t.id::text
                   ) then 'failed'
                   when coalesce(t.draft, '') = '' then 'discovered'
                   when t.approved_at is null then 'drafted'
                   else 'approved'
               end as target
        from tweet_queue t
        where t.status in ('failed', 'posting')
          and t.updated_at < now() - make_interval(secs => p_minutes * 60)
          and t.attempts < p_max_attempts
          and (p_after is null or t.id > p_after)
        order by t.id
        limit p_limit
        for update of t skip locked
    ),
    moved as (
        update tweet_queue t set
            status = s.target,
            last_error = 'recovered after ' || p_minutes || ' minutes in ' || s.previous_status
                         || coalesce('; before that: ' || t.last_error, ''),
            updated_at = now()
        from stale s
        where t.id = s.id
          and s.target <> s.previous_status
        returning t.id, s.previous_status, t.status
    )
    select x.id, x.previous_status, x.status from (
        select m.id, m.previous_status, m.status from moved m
        union all
        select s.id, s.previous_status, s.target from stale s where s.target = s.previous_status
    ) x
    order by x.id;
end
$$;

-- The operator's requeue of 20261124006000_outbound_requeue.sql, a page at a
-- time: at most p_limit messages with an id above p_after, by id.
drop function if exists outbound_requeue(bigint[], bigint, text[], boolean);
create or replace function outbound_requeue(
    p_ids bigint[] default null,
    p_account_id bigint default null,
    p_statuses text[] default array['failed', 'dead'],
    p_dry_run boolean default false,
    p_after bigint default null,
    p_limit integer default null
)
returns table (id bigint, account_id bigint, peer text, previous_status text, last_error text)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
    if exists (select 1 from unnest(p_statuses) s where s not in ('failed', 'dead')) then
        raise exception 'only failed or dead messages can be requeued, not %', p_statuses
            using errcode = '22023';
    end if;
    -- One selection for both modes; the update leaves a dry run's rows as they are.
    return query
    with chosen as (
        select m.id, m.account_id, m.peer, m.status, m.last_error
        from messages m
        where m.direction = 'outbound' and m.status = any (p_statuses)
          and (p_ids is null or m.id = any (p_ids))
          and (p_account_id is null or m.account_id = p_account_id)
          and (p_after is null or m.id > p_after)
        order by m.id
        limit p_limit
        for update
    ),
    moved as (
        update messages m set
            status = 'queued',
            attempts = 0,
            next_attempt_at = now(),
            lease_owner = null,
            lease_token = null,
            lease_expires_at = null,
            last_error = 'requeued by an operator; was ' || c.status || coalesce(': ' || c.last_error, ''),
            updated_at = now()
        from chosen c
        where m.id = c.id and not p_dry_run
    )
    select c.id, c.account_id, c.peer, c.status, c.last_error from chosen c order by c.id;
    if found and not p_dry_run then
        perform pg_notify('outbound', '');
    end if;
end
$$;

-- The functions made again above: for the bots only (the default privileges
-- already say so for the migrator's new functions; this also covers a
-- migrator whose defaults were set differently).
do $$
declare
    f record;
begin
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        where p.pronamespace = 'public'::regnamespace
          and p.proname = any (array[
              'account_list', 'chats_recent', 'outbound_counts', 'worker_heartbeats_list', 'retry_items_pending',
              'retry_items_exhausted', 'ingest_images_by_sha256', 'tweets_list', 'reply_cursors_list',
              'tweet_recover_stale', 'outbound_requeue'
          ])
    loop
        execute format('revoke all on function %s from public', f.signature);
        if exists (select 1 from pg_roles where rolname = 'anon') then
            execute format('revoke all on function %s from anon', f.signature);
        end if;
        if exists (select 1 from pg_roles where rolname = 'authenticated') then
            execute format('revoke all on function %s from authenticated', f.signature);
        end if;
        if exists (select 1 from pg_roles where rolname = 'service_role') then
            execute format('grant execute on function %s to service_role', f.signature);
        end if;
    end loop;
end
$$;
