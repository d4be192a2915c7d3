-- Record several sends in one statement (one commit): the marks of sends that
-- finished together. Each row gets exactly outbound_mark_sent's treatment
-- (fenced by its own lease token; a copy stored from our own NewMessage event
-- gives way), in the order given. Returns one (id, marked) per input row.
create or replace function outbound_mark_sent_many(
    p_ids bigint[],
    p_tokens uuid[],
    p_telegram_message_ids bigint[],
    p_chat_ids bigint[]
) returns table (id bigint, marked boolean)
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    i integer;
begin
    if coalesce(array_length(p_ids, 1), 0) <> coalesce(array_length(p_tokens, 1), 0)
       or coalesce(array_length(p_ids, 1), 0) <> coalesce(array_length(p_telegram_message_ids, 1), 0)
       or coalesce(array_length(p_ids, 1), 0) <> coalesce(array_length(p_chat_ids, 1), 0) then
        raise exception 'outbound_mark_sent_many: the four arrays must have the same length' using errcode = '22023';
    end if;
    for i in 1 .. coalesce(array_length(p_ids, 1), 0) loop
        id := p_ids[i];
        marked := outbound_mark_sent(p_ids[i], p_tokens[i], p_telegram_message_ids[i], p_chat_ids[i]);
        return next;
    end loop;
end
$$;

do $$
declare
    f record;
begin
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        join pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'public' and p.proname = 'outbound_mark_sent_many'
    loop
        execute format('revoke execute on function %s from public, anon, authenticated', f.signature);
        execute format('grant execute on function %s to service_role', f.signature);
    end loop;
end
$$;
