-- Taking over an account: its new lease holder takes back the work the
-- previous holder had in hand when it stopped (killed, or lost its lease).
--
-- Safe because the account lease says nobody else works for this account
-- now. Outbound rows keep their random_id, so a copy that did reach Telegram
-- is dropped there (RANDOM_ID_DUPLICATE); jobs are idempotent and resume at
-- their saved cursor; a late mark from the old holder is refused by the lease
-- token. Without this, the work would wait for its own leases to expire.
create or replace function account_takeover(p_account_id bigint, p_owner text)
returns table (outbound integer, history_jobs integer, message_jobs integer)
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_outbound integer;
    v_history integer;
    v_jobs integer;
begin
    update messages set
        status = 'queued',
        lease_owner = null,
        lease_token = null,
        lease_expires_at = null,
        next_attempt_at = now(),
        updated_at = now()
    where account_id = p_account_id
      and status = 'sending'
      and lease_owner is distinct from p_owner;
    get diagnostics v_outbound = row_count;

    update history_sync_jobs set
        status = 'pending',
        lease_owner = null,
        lease_token = null,
        lease_expires_at = null,
        run_at = now(),
        updated_at = now()
    where account_id = p_account_id
      and status = 'running'
      and lease_owner is distinct from p_owner;
    get diagnostics v_history = row_count;

    update message_jobs set
        status = 'pending',
        lease_owner = null,
        lease_token = null,
        lease_expires_at = null,
        run_at = now(),
        updated_at = now()
    where account_id = p_account_id
      and status = 'running'
      and lease_owner is distinct from p_owner;
    get diagnostics v_jobs = row_count;

    return query select v_outbound, v_history, v_jobs;
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
        where n.nspname = 'public' and p.proname = 'account_takeover'
    loop
        execute format('revoke execute on function %s from public, anon, authenticated', f.signature);
        execute format('grant execute on function %s to service_role', f.signature);
    end loop;
end
$$;
