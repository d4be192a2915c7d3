-- The claim's window of candidates (the p_limit * 4 soonest due rows) no longer
-- holds rows that wait behind an earlier row of their chat: one in flight, or
-- one rescheduled by a flood wait. Under a backlog with flood waits those rows
-- filled the whole window, every candidate was dropped by the per-chat order
-- check, and the claim returned nothing while other chats had due rows: the
-- queue stalled. Otherwise the function is unchanged.
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
           -- not behind an earlier row of its chat that is in flight or waiting (a flood wait):
           -- such rows can never be claimed now, and would fill the window and starve the rest
           and not exists (
               select 1 from messages e
               where e.account_id = m.account_id and e.peer = m.peer and e.id < m.id
                 and (e.status = 'sending' or (e.status = 'queued' and e.next_attempt_at > v_now)))
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
