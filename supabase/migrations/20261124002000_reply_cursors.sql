-- The Reply Guy's discovery cursors (X's since_id per source) and the count
-- of replies posted since a time (the daily cap), in the database so that a
-- redeploy on an ephemeral disk forgets nothing.
create table if not exists reply_cursors (
    source      text primary key,
    since_id    text not null,
    updated_at  timestamptz not null default now()
);
alter table reply_cursors enable row level security;
grant select, insert, update, delete on reply_cursors to service_role;

create or replace function reply_cursors_list()
returns table (source text, since_id text)
language sql stable
set search_path = public, pg_temp
as $$
    select c.source, c.since_id from reply_cursors c order by c.source
$$;

-- Tweet ids only grow: a cursor never moves back (ids compared as numbers,
-- by length then text, since they exceed bigint on some APIs).
create or replace function reply_cursor_advance(p_source text, p_since_id text)
returns text
language sql volatile
set search_path = public, pg_temp
as $$
    insert into reply_cursors as c (source, since_id) values (p_source, p_since_id)
    on conflict (source) do update set
        since_id = case
            when (length(excluded.since_id), excluded.since_id) > (length(c.since_id), c.since_id)
            then excluded.since_id else c.since_id end,
        updated_at = now()
    returning since_id
$$;

create or replace function tweets_posted_since(p_since timestamptz)
returns bigint
language sql stable
set search_path = public, pg_temp
as $$
    select count(*) from tweet_queue where status = 'posted' and posted_at >= p_since
$$;

do $$
declare
    f record;
begin
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        join pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'public'
          and p.proname = any (array['reply_cursors_list', 'reply_cursor_advance', 'tweets_posted_since'])
    loop
        execute format('revoke execute on function %s from public, anon, authenticated', f.signature);
        execute format('grant execute on function %s to service_role', f.signature);
    end loop;
end
$$;
