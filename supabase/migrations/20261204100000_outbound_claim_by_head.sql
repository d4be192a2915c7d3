-- The claim no longer scans the whole backlog. Before, its candidate query
-- walked every unfinished row of the accounts (the planner picked the per-chat
-- index for `account_id = any(...)`) and ran the per-chat order check on each,
-- then sorted: its cost grew with the backlog (about 20 ms per claim at 3000
-- queued rows), and concurrent claimers all locked the same window, so most
-- of them came back empty.
--
-- Now, per account, an index scan in due order finds the heads of chats (the
-- oldest unfinished row of its chat, claimable now: the order check is one
-- index probe: the first entry of the chat's unfinished rows) and locks them as
-- it finds them (FOR UPDATE SKIP LOCKED), stopping at p_limit: concurrent
-- claimers take the next heads instead of colliding. With room left, each
-- head brings the consecutive claimable rows that follow it in its chat (at
-- most p_per_chat_limit in all), as before. The guarantees are unchanged: a
-- chat's row is claimed only together with, or after, every earlier row of its
-- chat; one lease token per claim fences the marks; rows whose worker died on
-- the last attempt become dead; a row whose lease expired is claimed again.
create index if not exists messages_account_due_idx
    on messages (account_id, next_attempt_at, id) where status = 'queued';
create index if not exists messages_account_lease_idx
    on messages (account_id, lease_expires_at) where status = 'sending';
-- They replace the indexes without the account (every change of a row's state rewrites
-- each index that holds it, so an index nobody needs costs every send).
drop index if exists messages_due_idx;
drop index if exists messages_lease_idx;

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
    v_accounts bigint[];
    v_heads bigint[];
    v_follow bigint[] := '{}';
begin
    select coalesce(array_agg(distinct a), '{}') into v_accounts from unnest(p_account_ids) a where a is not null;

    update messages m set
        status = 'dead',
        last_error = 'lease expired after the last attempt (the worker stopped while sending)'
                     || coalesce('; before that: ' || m.last_error, ''),
        lease_expires_at = null,
        updated_at = v_now
    where m.status = 'sending' and m.account_id = any (v_accounts) and m.lease_expires_at < v_now
      and m.attempts > p_max_retries;

    -- Heads of chats, soonest due first, locked as found.
    with candidates as (
        select c.id, c.due_at from unnest(v_accounts) a(id)
        cross join lateral (
            select m.id, m.next_attempt_at as due_at from messages m
            where m.account_id = a.id and m.status = 'queued' and m.next_attempt_at <= v_now
              -- the oldest unfinished row of its chat (a scalar probe: the first index entry)
              and m.id = (
                  select e.id from messages e
                  where e.account_id = m.account_id and e.peer = m.peer
                    and e.status in ('queued', 'sending')
                  order by e.id
                  limit 1)
            order by m.next_attempt_at, m.id
            limit p_limit
            for update of m skip locked
        ) c
        union all
        -- rows whose lease expired (their worker stopped) and that head their chat
        select c.id, c.due_at from unnest(v_accounts) a(id)
        cross join lateral (
            select m.id, m.lease_expires_at as due_at from messages m
            where m.account_id = a.id and m.status = 'sending' and m.lease_expires_at < v_now
              and m.attempts <= p_max_retries
              -- the oldest unfinished row of its chat (a scalar probe: the first index entry)
              and m.id = (
                  select e.id from messages e
                  where e.account_id = m.account_id and e.peer = m.peer
                    and e.status in ('queued', 'sending')
                  order by e.id
                  limit 1)
            order by m.lease_expires_at
            limit p_limit
            for update of m skip locked
        ) c
    )
    select coalesce(array_agg(h.id order by h.due_at, h.id), '{}') into v_heads
    from (select id, due_at from candidates order by due_at, id limit p_limit) h;

    -- With room left: the claimable rows that follow each head in its chat, consecutive
    -- (the first row that cannot be claimed now, or is locked elsewhere, ends its chat's run).
    if cardinality(v_heads) > 0 and cardinality(v_heads) < p_limit and p_per_chat_limit > 1 then
        with heads as (
            select m.id, m.account_id, m.peer, array_position(v_heads, m.id) as pos
            from messages m where m.id = any (v_heads)
        ), after as (
            select f.id, h.id as head_id, h.pos, f.rn, f.ok
            from heads h
            cross join lateral (
                select e.id,
                       row_number() over (order by e.id) as rn,
                       bool_and((e.status = 'queued' and e.next_attempt_at <= v_now)
                                or (e.status = 'sending' and e.lease_expires_at < v_now
                                    and e.attempts <= p_max_retries)) over (order by e.id) as ok
                from (select e.id, e.status, e.next_attempt_at, e.lease_expires_at, e.attempts
                      from messages e
                      where e.account_id = h.account_id and e.peer = h.peer
                        and e.status in ('queued', 'sending') and e.id > h.id
                      order by e.id
                      limit p_per_chat_limit - 1) e
            ) f
        ), locked as (
            select m.id from messages m
            where m.id in (select a.id from after a where a.ok)
            for update skip locked
        ), runs as (
            select a.id, a.pos, a.rn,
                   bool_and(l.id is not null) over (partition by a.head_id order by a.rn) as unbroken
            from after a left join locked l on l.id = a.id
            where a.ok
        )
        select coalesce(array_agg(r.id order by r.rn, r.pos), '{}') into v_follow
        from (select id, pos, rn from runs where unbroken order by rn, pos limit p_limit - cardinality(v_heads)) r;
    end if;

    return query
    with claimed as (
        update messages m set
            status = 'sending',
            attempts = m.attempts + 1,
            lease_owner = p_owner,
            lease_token = v_token,
            lease_expires_at = v_now + make_interval(secs => p_lease_seconds),
            updated_at = v_now
        where m.id = any (v_heads || v_follow)
        returning m.*
    )
    select * from claimed order by account_id, peer, id;
end
$$;

-- The marks of a batch in one UPDATE (one subtransaction for the batch instead of
-- one per row); if a copy of one of our sends stored from its NewMessage event
-- collides, the batch falls back to outbound_mark_sent row by row, which drops
-- that copy. What each row gets and returns is unchanged.
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
    v_done bigint[];
begin
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
            where m.id = i.id and m.lease_token = i.token and m.status in ('sending', 'queued', 'dead')
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
