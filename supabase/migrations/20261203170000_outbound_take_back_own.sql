-- After the database comes back from an outage, a worker takes back the rows
-- it had claimed for an account before the outage and no longer has in hand:
-- the sends of a cycle the outage cut, whose releases could not reach the
-- database. Without this they would wait out their message lease (two
-- minutes by default) although the worker is ready again in seconds.
--
-- Fenced by the account lease: it acts only while p_account_token is the
-- account's current, unexpired lease and p_owner holds it, so nobody else can
-- be working for the account. Rows whose lease token is in p_keep_tokens are
-- batches the worker still has in hand and are left alone. Rows keep their
-- random_id (a copy that did reach Telegram is dropped there) and lose their
-- lease token (a late mark of the cut attempt is refused). The attempt is not
-- counted, as in outbound_release.
create or replace function outbound_take_back_own(
    p_account_id bigint,
    p_owner text,
    p_account_token uuid,
    p_keep_tokens uuid[] default null
) returns integer
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_count integer;
begin
    if not exists (
        select 1 from telegram_accounts a
        where a.id = p_account_id and a.lease_owner = p_owner and a.lease_token = p_account_token
          and a.lease_expires_at > now()
    ) then
        return 0;
    end if;
    update messages set
        status = 'queued',
        attempts = greatest(attempts - 1, 0),
        lease_owner = null,
        lease_token = null,
        lease_expires_at = null,
        next_attempt_at = least(next_attempt_at, now()),
        updated_at = now()
    where account_id = p_account_id
      and status = 'sending'
      and lease_owner = p_owner
      and not (lease_token = any (coalesce(p_keep_tokens, '{}'::uuid[])));
    get diagnostics v_count = row_count;
    if v_count > 0 then
        perform pg_notify('outbound', '');
    end if;
    return v_count;
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
        where n.nspname = 'public' and p.proname = 'outbound_take_back_own'
    loop
        execute format('revoke execute on function %s from public, anon, authenticated', f.signature);
        execute format('grant execute on function %s to service_role', f.signature);
    end loop;
end
$$;
