-- The outbound queue's two hot calls, made cheaper (issue 20, item 4). Found
-- with auto_explain (nested statements) and the backend's CPU time per claim:
--
-- * outbound_claim and outbound_mark_sent_many were planned afresh on every
--   call. PL/pgSQL caches a statement's plan, but for a statement with
--   parameters it uses a "custom" plan (planned for the values at hand) until
--   the generic plan looks no dearer; the claim's statements (LIMIT p_limit,
--   arrays of ids) never pass that test, so each call planned its four
--   statements again: about 0.5 ms of a 1.7 ms claim, and 0.2 ms of a mark.
--   Their plans do not depend on the values (an index scan in due order
--   stopped at the limit; lookups by primary key), so the generic plan is the
--   same plan, made once per connection. A plan is still made again when the
--   table's statistics or indexes change (the plan cache is invalidated then).
--   The marks' UPDATE also names its rows as `m.id = any (p_ids)`: a generic
--   plan made while the table's statistics were still empty (a fresh
--   database) could otherwise join the input to a sequential scan of the
--   table and keep that plan; by primary key it is an index lookup at any size.
--
-- * The marks' transaction commits without waiting for its WAL flush
--   (synchronous_commit off for that transaction only, set inside
--   outbound_mark_sent_many). A commit that waits for the disk took about
--   3.5 ms here, and the claim that follows a batch's marks queued behind it.
--   What this gives up: after a crash of the server itself (not of a worker,
--   not a restart, which flushes), the marks of the last fraction of a second
--   may be gone. Those rows are then in the state a worker killed between the
--   send and its mark leaves them (sending, under a lease that runs out): they
--   are claimed again and sent with the same random_id, which Telegram drops
--   as a duplicate, as it always did for that case (see worker.SentMarks).
--   Claims, enqueues and the other marks still wait for the disk.
--
-- * messages_chat_idx (account_id, chat_id, telegram_message_id desc) repeats
--   the unique constraint messages_telegram_key on the same columns (a B-tree
--   is read in both directions), and every query on these columns is an
--   equality that the constraint's index answers. A change of a row's status
--   is not a HOT update (status is in the partial indexes' predicates), so
--   each index gets a new entry at queued -> sending -> sent: one index less
--   is one entry less per row and step.
alter function outbound_claim(bigint[], text, integer, double precision, integer, integer)
    set plan_cache_mode = force_generic_plan;

drop index if exists messages_chat_idx;

-- As in 20261204100000, with the generic plan, the rows named by primary key and an
-- asynchronous commit (above).
create or replace function outbound_mark_sent_many(
    p_ids bigint[],
    p_tokens uuid[],
    p_telegram_message_ids bigint[],
    p_chat_ids bigint[]
) returns table (id bigint, marked boolean)
language plpgsql volatile
set search_path = public, pg_temp
set plan_cache_mode = force_generic_plan
as $$
declare
    i integer;
    v_done bigint[];
begin
    -- This transaction's commit does not wait for the disk (see the top of this file).
    perform set_config('synchronous_commit', 'off', true);
    if coalesce(array_length(p_ids, 1), 0) <> coalesce(array_length(p_tokens, 1), 0)
       or coalesce(array_length(p_ids, 1), 0) <> coalesce(array_length(p_telegram_message_ids, 1), 0)
       or coalesce(array_length(p_ids, 1), 0) <> coalesce(array_length(p_chat_ids, 1), 0) then
        raise exception 'outbound_mark_sent_many: the four arrays must have the same length' using errcode = '22023';
    end if;
    begin
        with input as (
            select distinct on (x.id) x.id, x.token, x.tg, x.chat
            from unnest(p_ids, p_tokens, p_telegram_message_ids, p_chat_ids) as x(id, token, tg, chat)
            order by x.id
        ), updated as (
            update messages m set
                status = 'sent',
                telegram_message_id = i.tg,
                chat_id = coalesce(i.chat, m.chat_id),
                sent_at = now(),
                lease_expires_at = null,
                updated_at = now()
            from input i
            where m.id = any (p_ids) and m.id = i.id and m.lease_token = i.token
              and m.status in ('sending', 'queued', 'dead')
            returning m.id
        )
        select coalesce(array_agg(u.id), '{}') into v_done from updated u;
    exception when unique_violation then
        for i in 1 .. coalesce(array_length(p_ids, 1), 0) loop
            id := p_ids[i];
            marked := outbound_mark_sent(p_ids[i], p_tokens[i], p_telegram_message_ids[i], p_chat_ids[i]);
            return next;
        end loop;
        return;
    end;
    return query
    select x.id,
           (x.id = any (v_done) or exists (
               select 1 from messages s where s.id = x.id and s.lease_token = x.token and s.status = 'sent'))
    from unnest(p_ids, p_tokens) with ordinality as x(id, token, ord)
    order by x.ord;
end
$$;
