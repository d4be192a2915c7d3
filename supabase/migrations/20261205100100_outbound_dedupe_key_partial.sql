-- The dedupe key's unique index holds only the rows that have a key.
--
-- Most outbound rows have no dedupe key, and inbound rows never do; a B-tree
-- stores NULLs, so the full unique constraint held an entry for every row and
-- got a new one at every status change (queued -> sending -> sent are not HOT
-- updates). A partial unique index keeps the same guarantee (one row per key:
-- NULL keys never conflicted) with entries only for rows that have a key;
-- `dedupe_key = p_dedupe_key` lookups still use it (the equality implies the
-- key is not null). With messages_chat_idx gone (20261205100000), a message
-- without a key writes 4 index entries at enqueue, 4 at its claim and 2 at its
-- mark, against 6, 6 and 4 before. Backend CPU per claim and mark of 20 rows
-- (the queue benchmark's setting, issue 20) went from about 2.0 to 1.5 ms with
-- this index alone, in a run on a loaded machine (noisy).
--
-- outbound_enqueue is unchanged but for its ON CONFLICT clause, which names
-- the index's predicate (ON CONFLICT infers a partial index only so).
create unique index if not exists messages_dedupe_key_idx
    on messages (dedupe_key) where dedupe_key is not null;
alter table messages drop constraint if exists messages_dedupe_key_key;

-- The same arguments as before (20261203160000), so no second overload appears.
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
    on conflict (dedupe_key) where dedupe_key is not null do nothing
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
