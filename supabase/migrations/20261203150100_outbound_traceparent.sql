-- One trace per outbound message, from enqueue to mark-sent, across processes:
-- the enqueuing side stores its W3C trace context (the `traceparent` header
-- value, 55 characters) with the row, and the worker that claims the row
-- continues that trace. Null when the enqueuing process does not trace.
-- Tracing must never stop a message: a malformed value is stored as null.
alter table messages add column if not exists traceparent text;

drop function if exists outbound_enqueue(bigint, text, text, jsonb, bigint, bigint, text, timestamptz);

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

revoke all on function outbound_enqueue(bigint, text, text, jsonb, bigint, bigint, text, timestamptz, text) from public, anon, authenticated;
grant execute on function outbound_enqueue(bigint, text, text, jsonb, bigint, bigint, text, timestamptz, text) to service_role;
