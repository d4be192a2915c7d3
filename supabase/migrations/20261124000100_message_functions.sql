-- State changes of accounts, chats and messages.
--
-- Both backends (asyncpg and Supabase's HTTP API) call these functions by
-- name with named arguments, so both behave the same. Numbers that are
-- configuration (retries, delays, lease lengths) are parameters, never
-- constants here. Times come from the database clock (now()), the one clock
-- every process shares.
--
-- Errors a caller can fix are raised with SQLSTATE 22023
-- (invalid_parameter_value); the Python side reports them as permanent.

-- The database clock: a cheap call that proves the database answers.
create or replace function db_ping() returns timestamptz
language sql stable
set search_path = public, pg_temp
as $$
    select now();
$$;

-- A random non-zero 64-bit id for Telegram's send deduplication.
create or replace function new_random_id() returns bigint
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v bigint;
begin
    loop
        v := ('x' || translate(gen_random_uuid()::text, '-', ''))::bit(64)::bigint;
        exit when v <> 0;
    end loop;
    return v;
end
$$;

-- The delay before retry number p_attempt (1-based): base, 2*base, 4*base ... capped.
create or replace function retry_delay(p_attempt integer, p_base_delay double precision, p_max_delay double precision)
returns interval
language sql immutable
set search_path = public, pg_temp
as $$
    select make_interval(secs => least(p_max_delay, p_base_delay * power(2, greatest(p_attempt - 1, 0))));
$$;

-- Accounts ------------------------------------------------------------------------

-- Create an account or update it by label. Null arguments keep the stored value.
create or replace function account_upsert(
    p_label text,
    p_phone text default null,
    p_session_encrypted text default null,
    p_status text default null
) returns table (
    id bigint, label text, phone text, status text, has_session boolean,
    lease_owner text, lease_expires_at timestamptz, last_error text,
    created_at timestamptz, updated_at timestamptz
)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
    if p_label is null or btrim(p_label) = '' then
        raise exception 'account label is required' using errcode = '22023';
    end if;
    return query
    insert into telegram_accounts as a (label, phone, session_encrypted, status)
    values (btrim(p_label), p_phone, p_session_encrypted, coalesce(p_status, 'needs_login'))
    on conflict (label) do update set
        phone = coalesce(excluded.phone, a.phone),
        session_encrypted = coalesce(p_session_encrypted, a.session_encrypted),
        status = coalesce(p_status, a.status),
        updated_at = now()
    returning a.id, a.label, a.phone, a.status, a.session_encrypted is not null,
              a.lease_owner, a.lease_expires_at, a.last_error, a.created_at, a.updated_at;
end
$$;

-- Accounts without their sessions, optionally only some statuses.
create or replace function account_list(p_statuses text[] default null)
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
    where p_statuses is null or a.status = any (p_statuses)
    order by a.id;
$$;

create or replace function account_get_session(p_account_id bigint) returns text
language sql stable
set search_path = public, pg_temp
as $$
    select session_encrypted from telegram_accounts where id = p_account_id;
$$;

create or replace function account_save_session(p_account_id bigint, p_session_encrypted text) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update telegram_accounts set session_encrypted = p_session_encrypted, updated_at = now()
    where id = p_account_id;
    return found;
end
$$;

create or replace function account_set_status(p_account_id bigint, p_status text, p_last_error text default null)
returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update telegram_accounts set status = p_status, last_error = p_last_error, updated_at = now()
    where id = p_account_id;
    return found;
end
$$;

-- Take the account's lease: a fresh token, or null while another live owner holds it.
-- The same owner asking again keeps its token and extends the lease.
create or replace function account_lease_acquire(p_account_id bigint, p_owner text, p_lease_seconds double precision)
returns uuid
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_token uuid;
begin
    update telegram_accounts a set
        lease_token = case when a.lease_owner = p_owner and a.lease_expires_at > now() and a.lease_token is not null
                           then a.lease_token else gen_random_uuid() end,
        lease_owner = p_owner,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        updated_at = now()
    where a.id = p_account_id
      and (a.lease_token is null or a.lease_expires_at <= now() or a.lease_owner = p_owner)
    returning a.lease_token into v_token;
    return v_token;
end
$$;

-- Extend a lease we hold; false means it was lost (lapsed and taken, or released).
create or replace function account_lease_renew(p_account_id bigint, p_token uuid, p_lease_seconds double precision)
returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update telegram_accounts set lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    where id = p_account_id and lease_token = p_token;
    return found;
end
$$;

create or replace function account_lease_release(p_account_id bigint, p_token uuid) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update telegram_accounts set lease_token = null, lease_owner = null, lease_expires_at = null, updated_at = now()
    where id = p_account_id and lease_token = p_token;
    return found;
end
$$;

-- Chats ---------------------------------------------------------------------------

create or replace function chat_upsert(
    p_account_id bigint,
    p_telegram_chat_id bigint,
    p_kind text default null,
    p_title text default null,
    p_username text default null
) returns setof chats
language sql volatile
set search_path = public, pg_temp
as $$
    insert into chats as c (account_id, telegram_chat_id, kind, title, username)
    values (p_account_id, p_telegram_chat_id, coalesce(p_kind, 'unknown'), p_title, p_username)
    on conflict (account_id, telegram_chat_id) do update set
        kind = case when p_kind is null or p_kind = 'unknown' then c.kind else p_kind end,
        title = coalesce(p_title, c.title),
        username = coalesce(p_username, c.username),
        updated_at = now()
    returning *;
$$;

create or replace function chat_get(p_account_id bigint, p_telegram_chat_id bigint) returns setof chats
language sql stable
set search_path = public, pg_temp
as $$
    select * from chats where account_id = p_account_id and telegram_chat_id = p_telegram_chat_id;
$$;

-- Chats of an account with their cursors, most recently active first.
create or replace function chats_recent(p_account_id bigint, p_since timestamptz default null, p_limit integer default 100)
returns setof chats
language sql stable
set search_path = public, pg_temp
as $$
    select * from chats
    where account_id = p_account_id and (p_since is null or last_message_at >= p_since)
    order by last_message_at desc nulls last, id
    limit p_limit;
$$;

-- Inbound (and our own sends seen as events) --------------------------------------

-- Store messages once each, whatever path brought them (live event, catch-up,
-- reconciler, history), upsert their chats and advance each chat's cursor to
-- the greatest stored id. p_messages is a JSON array of objects with keys
-- chat_id, telegram_message_id, direction, sender_id, text, attachments,
-- reply_to, sent_at, chat_kind, chat_title, chat_username.
create or replace function messages_store(
    p_account_id bigint,
    p_messages jsonb,
    p_advance_cursor boolean default true
) returns table (chat_id bigint, telegram_message_id bigint, id bigint, inserted boolean)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
    if jsonb_typeof(p_messages) is distinct from 'array' then
        raise exception 'p_messages must be a JSON array' using errcode = '22023';
    end if;
    if exists (select 1 from jsonb_array_elements(p_messages) e
               where jsonb_typeof(e) <> 'object'
                  or coalesce(jsonb_typeof(e -> 'chat_id'), 'null') = 'null'
                  or coalesce(jsonb_typeof(e -> 'telegram_message_id'), 'null') = 'null') then
        raise exception 'every message needs chat_id and telegram_message_id' using errcode = '22023';
    end if;

    return query
    with input as (
        select e.ord::integer as ord, x.chat_id, x.telegram_message_id, coalesce(x.direction, 'inbound') as direction,
               x.sender_id, x.text, coalesce(x.attachments, '[]'::jsonb) as attachments, x.reply_to, x.sent_at,
               x.chat_kind, x.chat_title, x.chat_username,
               row_number() over (partition by x.chat_id, x.telegram_message_id order by e.ord) as dup_rank
        from jsonb_array_elements(p_messages) with ordinality as e(elem, ord),
             jsonb_to_record(e.elem) as x(
                 chat_id bigint, telegram_message_id bigint, direction text, sender_id bigint, text text,
                 attachments jsonb, reply_to bigint, sent_at timestamptz, chat_kind text, chat_title text,
                 chat_username text)
    ), chat_rows as (
        insert into chats as c (account_id, telegram_chat_id, kind, title, username, last_message_id, last_message_at)
        select p_account_id, g.chat_id, coalesce(g.kind, 'unknown'), g.title, g.username,
               case when p_advance_cursor then g.max_id else 0 end, g.max_at
        from (
            select i.chat_id,
                   (array_agg(i.chat_kind order by i.ord desc)
                        filter (where i.chat_kind is not null and i.chat_kind <> 'unknown'))[1] as kind,
                   (array_agg(i.chat_title order by i.ord desc) filter (where i.chat_title is not null))[1] as title,
                   (array_agg(i.chat_username order by i.ord desc) filter (where i.chat_username is not null))[1] as username,
                   max(i.telegram_message_id) as max_id,
                   max(i.sent_at) as max_at
            from input i
            group by i.chat_id
            order by i.chat_id
        ) g
        on conflict (account_id, telegram_chat_id) do update set
            kind = case when excluded.kind = 'unknown' then c.kind else excluded.kind end,
            title = coalesce(excluded.title, c.title),
            username = coalesce(excluded.username, c.username),
            last_message_id = case when p_advance_cursor then greatest(c.last_message_id, excluded.last_message_id)
                                   else c.last_message_id end,
            last_message_at = greatest(c.last_message_at, excluded.last_message_at),
            updated_at = now()
        returning c.id
    ), ins as (
        insert into messages as m (account_id, direction, chat_id, telegram_message_id, sender_id, text,
                                   attachments, reply_to, sent_at)
        select p_account_id, i.direction, i.chat_id, i.telegram_message_id, i.sender_id, i.text,
               i.attachments, i.reply_to, i.sent_at
        from input i
        order by i.ord
        on conflict (account_id, chat_id, telegram_message_id) do nothing
        returning m.id, m.chat_id, m.telegram_message_id
    )
    select i.chat_id, i.telegram_message_id, coalesce(ins.id, m.id), ins.id is not null and i.dup_rank = 1
    from input i
    left join ins on ins.chat_id = i.chat_id and ins.telegram_message_id = i.telegram_message_id
    left join messages m on ins.id is null and m.account_id = p_account_id
                        and m.chat_id = i.chat_id and m.telegram_message_id = i.telegram_message_id
    order by i.ord;
end
$$;

-- Outbound queue ------------------------------------------------------------------

-- Queue a message. random_id is fixed here, once, so every resend reuses it.
-- A repeated p_dedupe_key returns the row queued the first time (created = false).
create or replace function outbound_enqueue(
    p_account_id bigint,
    p_peer text,
    p_text text default null,
    p_attachments jsonb default '[]'::jsonb,
    p_reply_to bigint default null,
    p_chat_id bigint default null,
    p_dedupe_key text default null,
    p_send_at timestamptz default null
) returns table (created boolean, id bigint, random_id bigint, status text, next_attempt_at timestamptz, created_at timestamptz)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
    v_id bigint;
begin
    if p_peer is null or btrim(p_peer) = '' then
        raise exception 'a peer is required' using errcode = '22023';
    end if;
    if jsonb_typeof(coalesce(p_attachments, '[]'::jsonb)) <> 'array' then
        raise exception 'attachments must be a JSON array' using errcode = '22023';
    end if;
    if coalesce(p_text, '') = '' and jsonb_array_length(coalesce(p_attachments, '[]'::jsonb)) = 0 then
        raise exception 'a message needs text or attachments' using errcode = '22023';
    end if;

    insert into messages (account_id, direction, chat_id, peer, text, attachments, reply_to,
                          status, next_attempt_at, random_id, dedupe_key)
    values (p_account_id, 'outbound', p_chat_id, btrim(p_peer), p_text, coalesce(p_attachments, '[]'::jsonb), p_reply_to,
            'queued', coalesce(p_send_at, now()), new_random_id(), p_dedupe_key)
    on conflict (dedupe_key) do nothing
    returning messages.id into v_id;

    if v_id is not null then
        perform pg_notify('outbound', p_account_id::text);
        return query select true, m.id, m.random_id, m.status, m.next_attempt_at, m.created_at
                     from messages m where m.id = v_id;
    else
        return query select false, m.id, m.random_id, m.status, m.next_attempt_at, m.created_at
                     from messages m where m.dedupe_key = p_dedupe_key;
    end if;
end
$$;

-- Claim due outbound rows of the given accounts.
--
-- A row is due when it is queued and its time has come, or when it is being
-- sent under a lease that expired (its worker died). Within one (account,
-- peer) rows go out in enqueue order: a row is claimed only together with
-- every earlier unfinished row of its chat, so one batch may carry several
-- consecutive rows of a chat. FOR UPDATE SKIP LOCKED keeps concurrent
-- claimers apart; every claimed row gets this call's lease token, one more
-- attempt and a lease expiry. Rows whose lease expired after their last
-- permitted attempt become dead instead of being claimed again.
create or replace function outbound_claim(
    p_account_ids bigint[],
    p_owner text,
    p_limit integer default 50,
    p_lease_seconds double precision default 60,
    p_per_chat_limit integer default 10,
    p_max_retries integer default 5
) returns setof messages
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_now timestamptz := now();
    v_token uuid := gen_random_uuid();
begin
    update messages m set
        status = 'dead',
        last_error = 'lease expired after the last attempt (the worker stopped while sending)'
                     || coalesce('; before that: ' || m.last_error, ''),
        lease_expires_at = null,
        updated_at = v_now
    where m.status = 'sending' and m.lease_expires_at < v_now
      and m.attempts > p_max_retries and m.account_id = any (p_account_ids);

    return query
    with due as (
        (select m.id, m.account_id, m.peer from messages m
         where m.status = 'queued' and m.next_attempt_at <= v_now and m.account_id = any (p_account_ids)
         order by m.next_attempt_at, m.id
         limit p_limit * 4)
        union
        (select m.id, m.account_id, m.peer from messages m
         where m.status = 'sending' and m.lease_expires_at < v_now
           and m.attempts <= p_max_retries and m.account_id = any (p_account_ids)
         order by m.lease_expires_at
         limit p_limit)
    ), ranked as (
        select d.id, d.account_id, d.peer,
               row_number() over (partition by d.account_id, d.peer order by d.id) as rn
        from due d
    ), heads as (
        -- keep a row only if every earlier unfinished row of its chat is a candidate too
        select r.* from ranked r
        where r.rn <= p_per_chat_limit
          and (select count(*) from (
                   select 1 from messages e
                   where e.account_id = r.account_id and e.peer = r.peer
                     and e.status in ('queued', 'sending') and e.id < r.id
                   limit r.rn) earlier) = r.rn - 1
    ), locked as (
        select m.id from messages m
        where m.id in (select h.id from heads h)
          and ((m.status = 'queued' and m.next_attempt_at <= v_now)
               or (m.status = 'sending' and m.lease_expires_at < v_now and m.attempts <= p_max_retries))
        for update skip locked
    ), chosen as (
        -- a row locked by another claimer breaks its chat's sequence: drop what follows it
        select h.id from heads h
        where h.id in (select l.id from locked l)
          and (select count(*) from heads h2
               where h2.account_id = h.account_id and h2.peer = h.peer and h2.id < h.id
                 and h2.id in (select l.id from locked l)) = h.rn - 1
        order by h.rn, h.id
        limit p_limit
    ), claimed as (
        update messages m set
            status = 'sending',
            attempts = m.attempts + 1,
            lease_owner = p_owner,
            lease_token = v_token,
            lease_expires_at = v_now + make_interval(secs => p_lease_seconds),
            updated_at = v_now
        from chosen c
        where m.id = c.id
        returning m.*
    )
    select * from claimed order by account_id, peer, id;
end
$$;

-- Record a send. False when the lease token no longer matches (another worker
-- took the row back): a zombie cannot double-report. Repeating the call with
-- the same token is harmless.
create or replace function outbound_mark_sent(
    p_id bigint,
    p_token uuid,
    p_telegram_message_id bigint,
    p_chat_id bigint default null
) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    for attempt in 1 .. 3 loop
        begin
            update messages set
                status = 'sent',
                telegram_message_id = p_telegram_message_id,
                chat_id = coalesce(p_chat_id, chat_id),
                sent_at = now(),
                lease_expires_at = null,
                updated_at = now()
            where id = p_id and lease_token = p_token and status in ('sending', 'queued', 'dead');
            if found then
                return true;
            end if;
            -- Nothing changed: already marked with this token (a repeated call), or fenced off.
            return exists (select 1 from messages where id = p_id and lease_token = p_token and status = 'sent');
        exception when unique_violation then
            -- Our own send is already stored from Telethon's NewMessage event:
            -- drop that copy and keep the queue row (one row per message).
            delete from messages d
            using messages q
            where q.id = p_id and d.account_id = q.account_id
              and d.chat_id = coalesce(p_chat_id, q.chat_id)
              and d.telegram_message_id = p_telegram_message_id
              and d.id <> p_id and d.status is null;
        end;
    end loop;
    raise exception 'message % collides with another stored message', p_id using errcode = '40001';
end
$$;

-- Record a failed attempt. Returns the new status: failed (permanent error),
-- queued (retry at p_retry_at, or after the backoff of this attempt), dead
-- (retries exhausted); null when the lease token no longer matches. Called
-- again on a row that is no longer being sent, it changes nothing and
-- returns the current status.
create or replace function outbound_mark_failed(
    p_id bigint,
    p_token uuid,
    p_error text,
    p_permanent boolean default false,
    p_retry_at timestamptz default null,
    p_max_retries integer default 5,
    p_base_delay double precision default 60,
    p_max_delay double precision default 3600
) returns text
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v messages;
    v_status text;
begin
    select * into v from messages where id = p_id for update;
    if not found or v.lease_token is distinct from p_token then
        return null;
    end if;
    if v.status <> 'sending' then
        return v.status;
    end if;
    if p_permanent then
        v_status := 'failed';
    elsif v.attempts > p_max_retries then
        v_status := 'dead';
    else
        v_status := 'queued';
    end if;
    update messages set
        status = v_status,
        last_error = p_error,
        next_attempt_at = case when v_status = 'queued'
                               then coalesce(p_retry_at, now() + retry_delay(v.attempts, p_base_delay, p_max_delay))
                               else next_attempt_at end,
        lease_expires_at = null,
        updated_at = now()
    where id = p_id;
    return v_status;
end
$$;

-- Give up on a row now (e.g. its account is dead). False when the token no longer matches.
create or replace function outbound_mark_dead(p_id bigint, p_token uuid, p_error text) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update messages set status = 'dead', last_error = p_error, lease_expires_at = null, updated_at = now()
    where id = p_id and lease_token = p_token and status in ('sending', 'queued');
    if found then
        return true;
    end if;
    return exists (select 1 from messages where id = p_id and lease_token = p_token and status = 'dead');
end
$$;

-- Put claimed rows back without counting the attempt (rows behind a failed
-- head of their chat, or a shutdown). Returns how many went back.
create or replace function outbound_release(p_ids bigint[], p_token uuid) returns integer
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_count integer;
begin
    update messages set
        status = 'queued',
        attempts = greatest(attempts - 1, 0),
        lease_expires_at = null,
        updated_at = now()
    where id = any (p_ids) and lease_token = p_token and status = 'sending';
    get diagnostics v_count = row_count;
    if v_count > 0 then
        perform pg_notify('outbound', '');
    end if;
    return v_count;
end
$$;

-- Back to the queue until p_at without counting the attempt (a flood wait).
create or replace function outbound_reschedule(p_id bigint, p_token uuid, p_at timestamptz, p_reason text default null)
returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update messages set
        status = 'queued',
        attempts = greatest(attempts - 1, 0),
        next_attempt_at = p_at,
        last_error = coalesce(p_reason, last_error),
        lease_expires_at = null,
        updated_at = now()
    where id = p_id and lease_token = p_token and status = 'sending';
    return found;
end
$$;

-- Take back rows whose lease expired (their worker was killed): queued again,
-- or dead when that was their last permitted attempt. For a sweeper; claims
-- take such rows back by themselves.
create or replace function outbound_requeue_expired(p_max_retries integer default 5)
returns table (requeued integer, dead integer)
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_requeued integer;
    v_dead integer;
begin
    update messages set
        status = 'dead',
        last_error = 'lease expired after the last attempt (the worker stopped while sending)'
                     || coalesce('; before that: ' || last_error, ''),
        lease_expires_at = null,
        updated_at = now()
    where status = 'sending' and lease_expires_at < now() and attempts > p_max_retries;
    get diagnostics v_dead = row_count;
    update messages set status = 'queued', lease_expires_at = null, updated_at = now()
    where status = 'sending' and lease_expires_at < now();
    get diagnostics v_requeued = row_count;
    if v_requeued > 0 then
        perform pg_notify('outbound', '');
    end if;
    return query select v_requeued, v_dead;
end
$$;

create or replace function outbound_get(p_id bigint) returns setof messages
language sql stable
set search_path = public, pg_temp
as $$
    select * from messages where id = p_id;
$$;

-- Outbound rows per account and status (for /status and queue depth).
create or replace function outbound_counts(p_account_id bigint default null)
returns table (account_id bigint, status text, count bigint)
language sql stable
set search_path = public, pg_temp
as $$
    select m.account_id, m.status, count(*)
    from messages m
    where m.direction = 'outbound' and m.status is not null
      and (p_account_id is null or m.account_id = p_account_id)
    group by m.account_id, m.status
    order by m.account_id, m.status;
$$;

-- Heartbeats ----------------------------------------------------------------------

create or replace function worker_heartbeat_upsert(
    p_worker_id text,
    p_status text,
    p_loops jsonb default '{}'::jsonb,
    p_version text default null,
    p_host text default null,
    p_pid integer default null
) returns timestamptz
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_at timestamptz;
begin
    insert into worker_heartbeats as h (worker_id, status, last_heartbeat_at, loops, version, host, pid)
    values (p_worker_id, p_status, now(), coalesce(p_loops, '{}'::jsonb), p_version, p_host, p_pid)
    on conflict (worker_id) do update set
        status = excluded.status,
        last_heartbeat_at = excluded.last_heartbeat_at,
        loops = excluded.loops,
        version = excluded.version,
        host = excluded.host,
        started_at = case when h.pid is distinct from excluded.pid or h.host is distinct from excluded.host
                          then now() else h.started_at end,
        pid = excluded.pid
    returning h.last_heartbeat_at into v_at;
    return v_at;
end
$$;

create or replace function worker_heartbeats_list() returns setof worker_heartbeats
language sql stable
set search_path = public, pg_temp
as $$
    select * from worker_heartbeats order by worker_id;
$$;
