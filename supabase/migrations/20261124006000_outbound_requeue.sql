-- An operator puts outbound messages that ended failed or dead back in the
-- queue, after fixing what stopped them (a chat the account had to join, a
-- session logged in again). Each keeps its random_id, so if an earlier
-- attempt did reach Telegram, the resend is recognised as a duplicate
-- (RANDOM_ID_DUPLICATE: recorded as sent) as long as Telegram remembers the
-- id. The attempts start again from 0; the previous error is kept in
-- last_error. p_ids and p_account_id narrow the choice (null: any);
-- p_dry_run lists what would be requeued without changing anything.
create or replace function outbound_requeue(
    p_ids bigint[] default null,
    p_account_id bigint default null,
    p_statuses text[] default array['failed', 'dead'],
    p_dry_run boolean default false
)
returns table (id bigint, account_id bigint, peer text, previous_status text, last_error text)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
    if exists (select 1 from unnest(p_statuses) s where s not in ('failed', 'dead')) then
        raise exception 'only failed or dead messages can be requeued, not %', p_statuses
            using errcode = '22023';
    end if;
    -- One selection for both modes; the update leaves a dry run's rows as they are.
    return query
    with chosen as (
        select m.id, m.account_id, m.peer, m.status, m.last_error
        from messages m
        where m.direction = 'outbound' and m.status = any (p_statuses)
          and (p_ids is null or m.id = any (p_ids))
          and (p_account_id is null or m.account_id = p_account_id)
        for update
    ),
    moved as (
        update messages m set
            status = 'queued',
            attempts = 0,
            next_attempt_at = now(),
            lease_owner = null,
            lease_token = null,
            lease_expires_at = null,
            last_error = 'requeued by an operator; was ' || c.status || coalesce(': ' || c.last_error, ''),
            updated_at = now()
        from chosen c
        where m.id = c.id and not p_dry_run
    )
    select c.id, c.account_id, c.peer, c.status, c.last_error from chosen c order by c.id;
    if found and not p_dry_run then
        perform pg_notify('outbound', '');
    end if;
end
$$;

revoke all on function outbound_requeue(bigint[], bigint, text[], boolean) from public, anon, authenticated;
grant execute on function outbound_requeue(bigint[], bigint, text[], boolean) to service_role;
