-- Telegram's limits, refused at enqueue: a client writing straight to the
-- database (Supabase's HTTP API, another service) gets the same clear error
-- as `./start.sh worker send`, instead of an id whose message fails later.
--
-- Telegram counts text in UTF-16 code units: a character outside the Basic
-- Multilingual Plane (most emoji) counts twice.

create or replace function utf16_length(p_text text)
returns integer
language sql immutable parallel safe
set search_path = public, pg_temp
as $$
    select coalesce(char_length(p_text), 0)
         + coalesce((select count(*)::integer from regexp_matches(p_text, '[\U00010000-\U0010FFFF]', 'g')), 0)
$$;

-- The same arguments as before (with the trace context), so no second overload appears.
create or replace function outbound_enqueue(
    p_account_id bigint,
    p_peer text,
    p_text text default null,
    p_attachments jsonb default '[]'::jsonb,
    p_reply_to bigint default null,
    p_chat_id bigint default null,
    p_dedupe_key text default null,
    p_send_at timestamptz default null,
    p_traceparent text default null
) returns table (created boolean, id bigint, random_id bigint, status text, next_attempt_at timestamptz, created_at timestamptz)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
    v_id bigint;
    v_attachments integer;
    v_length integer;
    v_limit integer;
begin
    if p_peer is null or btrim(p_peer) = '' then
        raise exception 'a peer is required' using errcode = '22023';
    end if;
    if jsonb_typeof(coalesce(p_attachments, '[]'::jsonb)) <> 'array' then
        raise exception 'attachments must be a JSON array' using errcode = '22023';
    end if;
    v_attachments := jsonb_array_length(coalesce(p_attachments, '[]'::jsonb));
    if coalesce(p_text, '') ~ '^[[:space:]]*$' and v_attachments = 0 then
        raise exception 'empty message: no text (or only whitespace) and no attachment' using errcode = '22023';
    end if;
    if v_attachments > 1 then
        raise exception '% attachments: Telegram sends at most 1 attachment per message', v_attachments
            using errcode = '22023';
    end if;
    v_length := utf16_length(p_text);
    v_limit := case when v_attachments = 1 then 1024 else 4096 end;
    if v_length > v_limit then
        raise exception '% too long: % UTF-16 code units, Telegram accepts at most %',
            case when v_attachments = 1 then 'caption' else 'text' end, v_length, v_limit
            using errcode = '22023';
    end if;

    insert into messages (account_id, direction, chat_id, peer, text, attachments, reply_to,
                          status, next_attempt_at, random_id, dedupe_key, traceparent)
    values (p_account_id, 'outbound', p_chat_id, btrim(p_peer), p_text, coalesce(p_attachments, '[]'::jsonb), p_reply_to,
            'queued', coalesce(p_send_at, now()), new_random_id(), p_dedupe_key,
            case when p_traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' then p_traceparent end)
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

revoke all on function utf16_length(text) from public, anon, authenticated;
grant execute on function utf16_length(text) to service_role;

-- Outbound messages, newest first, for `./start.sh worker messages`: by status
-- and account when given. Reads only outbound rows that are in the queue's
-- life cycle (our own sends seen again as events have no status).
create or replace function outbound_list(
    p_statuses text[] default null,
    p_account_id bigint default null,
    p_limit integer default 50
) returns setof messages
language sql stable
set search_path = public, pg_temp
as $$
    select * from messages
    where direction = 'outbound'
      and status is not null
      and (p_statuses is null or status = any (p_statuses))
      and (p_account_id is null or account_id = p_account_id)
    order by id desc
    limit greatest(coalesce(p_limit, 50), 1);
$$;

revoke all on function outbound_list(text[], bigint, integer) from public, anon, authenticated;
grant execute on function outbound_list(text[], bigint, integer) to service_role;
