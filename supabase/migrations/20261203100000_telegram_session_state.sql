-- A Telegram session's state beyond its auth key, so a restarted or
-- reconnected client resumes where it stopped.
--
-- telegram_accounts.session_encrypted keeps what it always kept: the
-- encrypted StringSession (data centre and auth key). Next to it:
--
-- * telegram_update_state: the account's update state (pts, qts, date, seq;
--   entity_id 0) and each channel's pts (entity_id = the channel's id), so
--   catch_up() asks Telegram for the difference since the last saved state.
-- * telegram_entities: every peer the account has seen, by its marked id
--   (users > 0, basic groups -id, channels -100...), with the access hash
--   Telegram gave this account for it. Without the hash, Telegram refuses a
--   user who is not a contact and every channel and supergroup.
--
-- Both are written by the worker in batches as Telethon learns them and read
-- once per connect, in pages.

create table if not exists telegram_update_state (
    account_id  bigint not null references telegram_accounts (id) on delete cascade,
    -- 0: the account's own state; otherwise a channel id (only pts is used).
    entity_id   bigint not null,
    pts         integer not null,
    qts         integer not null default 0,
    date        timestamptz,
    seq         integer not null default 0,
    updated_at  timestamptz not null default now(),
    primary key (account_id, entity_id)
);

comment on table telegram_update_state is
    'Per account: Telegram''s update state (entity 0) and each channel''s pts, for catch_up() after a restart.';

create table if not exists telegram_entities (
    account_id   bigint not null references telegram_accounts (id) on delete cascade,
    peer_id      bigint not null,
    access_hash  bigint not null,
    kind         text not null check (kind in ('user', 'bot', 'chat', 'channel', 'megagroup')),
    username     text,
    phone        text,
    name         text,
    updated_at   timestamptz not null default now(),
    primary key (account_id, peer_id)
);

comment on table telegram_entities is
    'Per account: peers seen (marked id, access hash, kind, username, phone), so any chat seen once resolves again.';

alter table telegram_update_state enable row level security;
alter table telegram_entities enable row level security;

-- One page of an account's update state, by entity id after p_after (null
-- p_limit: every row).
create or replace function telegram_state_get(p_account_id bigint, p_after bigint default null, p_limit integer default null)
returns table (entity_id bigint, pts integer, qts integer, date timestamptz, seq integer)
language sql stable
set search_path = public, pg_temp
as $$
    select s.entity_id, s.pts, s.qts, s.date, s.seq
    from telegram_update_state s
    where s.account_id = p_account_id and (p_after is null or s.entity_id > p_after)
    order by s.entity_id
    limit p_limit;
$$;

-- Save update states (a JSON array of {entity_id, pts, qts, date, seq});
-- returns how many rows were written.
create or replace function telegram_state_save(p_account_id bigint, p_states jsonb) returns integer
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    n integer;
begin
    if jsonb_typeof(p_states) is distinct from 'array' then
        raise exception 'p_states must be a JSON array' using errcode = '22023';
    end if;
    insert into telegram_update_state as t (account_id, entity_id, pts, qts, date, seq, updated_at)
    select p_account_id, (e ->> 'entity_id')::bigint, (e ->> 'pts')::integer,
           coalesce((e ->> 'qts')::integer, 0), (e ->> 'date')::timestamptz, coalesce((e ->> 'seq')::integer, 0), now()
    from jsonb_array_elements(p_states) e
    on conflict (account_id, entity_id) do update set
        pts = excluded.pts, qts = excluded.qts, date = excluded.date, seq = excluded.seq, updated_at = now();
    get diagnostics n = row_count;
    return n;
end
$$;

-- Forget the update state of an account (the next connect starts from "now"
-- and the worker's dialog scan reads what was missed). Returns rows removed.
create or replace function telegram_state_clear(p_account_id bigint) returns integer
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    n integer;
begin
    delete from telegram_update_state where account_id = p_account_id;
    get diagnostics n = row_count;
    return n;
end
$$;

-- Save entities (a JSON array of {peer_id, access_hash, kind, username,
-- phone, name}); a known peer gets its newest hash and names. Returns how
-- many rows were written.
create or replace function telegram_entities_save(p_account_id bigint, p_entities jsonb) returns integer
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    n integer;
begin
    if jsonb_typeof(p_entities) is distinct from 'array' then
        raise exception 'p_entities must be a JSON array' using errcode = '22023';
    end if;
    insert into telegram_entities as t (account_id, peer_id, access_hash, kind, username, phone, name, updated_at)
    select distinct on ((e ->> 'peer_id')::bigint)
           p_account_id, (e ->> 'peer_id')::bigint, (e ->> 'access_hash')::bigint, e ->> 'kind',
           nullif(lower(e ->> 'username'), ''), nullif(e ->> 'phone', ''), nullif(e ->> 'name', ''), now()
    from jsonb_array_elements(p_entities) e
    order by (e ->> 'peer_id')::bigint
    on conflict (account_id, peer_id) do update set
        access_hash = excluded.access_hash,
        kind = excluded.kind,
        username = coalesce(excluded.username, t.username),
        phone = coalesce(excluded.phone, t.phone),
        name = coalesce(excluded.name, t.name),
        updated_at = now();
    get diagnostics n = row_count;
    return n;
end
$$;

-- One page of an account's entities, by peer id after p_after (null p_limit:
-- every row).
create or replace function telegram_entities_page(p_account_id bigint, p_after bigint default null, p_limit integer default null)
returns table (peer_id bigint, access_hash bigint, kind text, username text, phone text, name text)
language sql stable
set search_path = public, pg_temp
as $$
    select e.peer_id, e.access_hash, e.kind, e.username, e.phone, e.name
    from telegram_entities e
    where e.account_id = p_account_id and (p_after is null or e.peer_id > p_after)
    order by e.peer_id
    limit p_limit;
$$;

-- The stored cursors of some chats of an account (the dialog scan compares
-- each dialog's newest message with them); chats never stored are absent.
-- At most one row per input id: callers send at most a page of ids.
create or replace function chats_cursors(p_account_id bigint, p_telegram_chat_ids bigint[])
returns table (telegram_chat_id bigint, last_message_id bigint)
language sql stable
set search_path = public, pg_temp
as $$
    select c.telegram_chat_id, c.last_message_id
    from chats c
    where c.account_id = p_account_id and c.telegram_chat_id = any (p_telegram_chat_ids)
    order by c.telegram_chat_id;
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
          and p.proname = any (array[
              'telegram_state_get', 'telegram_state_save', 'telegram_state_clear',
              'telegram_entities_save', 'telegram_entities_page', 'chats_cursors'
          ])
    loop
        execute format('revoke execute on function %s from public, anon, authenticated', f.signature);
        execute format('grant execute on function %s to service_role', f.signature);
    end loop;
end
$$;

grant select, insert, update, delete on telegram_update_state, telegram_entities to service_role;
