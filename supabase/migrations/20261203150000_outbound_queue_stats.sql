-- What an operator watches of the outbound queue, per account, in one cheap
-- read: how many rows are still to send (queued or being sent), how many of
-- them are due now, and how long the oldest due one has waited since it was
-- enqueued (null when none is due). The worker's /metrics reads this at most
-- every few seconds; rows scheduled for later are not due and do not age.
-- Paged like every list (p_after: the previous page's last account id).
create or replace function outbound_queue_stats(p_after bigint default null, p_limit integer default null)
returns table (account_id bigint, depth bigint, due bigint, oldest_due_age_seconds double precision)
language sql stable
set search_path = public, pg_temp
as $$
    select m.account_id,
           count(*) as depth,
           count(*) filter (where m.status = 'sending' or m.next_attempt_at <= now()) as due,
           extract(epoch from now() - min(m.created_at) filter (
               where m.status = 'sending' or m.next_attempt_at <= now()
           ))::double precision as oldest_due_age_seconds
    from messages m
    where m.status in ('queued', 'sending')
      and (p_after is null or m.account_id > p_after)
    group by m.account_id
    order by m.account_id
    limit p_limit;
$$;

revoke all on function outbound_queue_stats(bigint, integer) from public, anon, authenticated;
grant execute on function outbound_queue_stats(bigint, integer) to service_role;
