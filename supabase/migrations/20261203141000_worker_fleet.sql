-- Worker replicas share the accounts by themselves.
--
-- Membership is the worker_heartbeats rows that carry a `fleet` document
-- (one row per replica, keyed by the replica's lease owner name) and are
-- younger than a few heartbeat intervals. A replica stopping cleanly removes
-- its row; a killed one's row ages out. Every replica reads the same rows and
-- computes the same assignment from them (rendezvous hashing, in the code).
--
-- Notifications on 'accounts' wake the other replicas at once when a replica
-- joins or leaves and when an account's lease is released, so a planned move
-- takes a round trip, not a check interval.

alter table worker_heartbeats add column if not exists fleet jsonb;

comment on column worker_heartbeats.fleet is
    'Worker replicas only: {"pinned": [WORKER_ACCOUNTS labels], "cannot": [labels its key cannot decrypt]}; null for other processes.';

drop function if exists worker_heartbeat_upsert(text, text, jsonb, text, text, integer);

create or replace function worker_heartbeat_upsert(
    p_worker_id text,
    p_status text,
    p_loops jsonb default '{}'::jsonb,
    p_version text default null,
    p_host text default null,
    p_pid integer default null,
    p_fleet jsonb default null
) returns timestamptz
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_at timestamptz;
    v_new boolean;
begin
    insert into worker_heartbeats as h (worker_id, status, last_heartbeat_at, loops, version, host, pid, fleet)
    values (p_worker_id, p_status, now(), coalesce(p_loops, '{}'::jsonb), p_version, p_host, p_pid, p_fleet)
    on conflict (worker_id) do update set
        status = excluded.status,
        last_heartbeat_at = excluded.last_heartbeat_at,
        loops = excluded.loops,
        version = excluded.version,
        host = excluded.host,
        started_at = case when h.pid is distinct from excluded.pid or h.host is distinct from excluded.host
                          then now() else h.started_at end,
        pid = excluded.pid,
        fleet = excluded.fleet
    returning h.last_heartbeat_at, (h.xmax = 0) into v_at, v_new;
    if v_new and p_fleet is not null then
        perform pg_notify('accounts', 'join');
    end if;
    return v_at;
end
$$;

-- A replica leaving on purpose (SIGTERM): gone from the fleet at once.
create or replace function worker_heartbeat_remove(p_worker_id text) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    delete from worker_heartbeats where worker_id = p_worker_id;
    if found then
        perform pg_notify('accounts', 'leave');
    end if;
    return found;
end
$$;

-- Every worker replica's row, live or not, with the account leases it holds.
-- Rows of replicas silent for an hour (killed, never to return) are dropped.
create or replace function worker_fleet(p_live_seconds double precision)
returns table (
    replica text, status text, host text, pid integer, version text,
    last_heartbeat_at timestamptz, started_at timestamptz, pinned text[],
    alive boolean, held integer, age_s double precision, cannot text[]
)
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    delete from worker_heartbeats h
    where h.fleet is not null and h.last_heartbeat_at < now() - interval '1 hour';
    return query
    select h.worker_id, h.status, h.host, h.pid, h.version, h.last_heartbeat_at, h.started_at,
           coalesce(array(select jsonb_array_elements_text(coalesce(h.fleet -> 'pinned', '[]'::jsonb))), '{}'::text[]),
           (h.status <> 'stopped' and h.last_heartbeat_at > now() - make_interval(secs => p_live_seconds)),
           (select count(*)::integer from telegram_accounts a
             where a.lease_owner = h.worker_id and a.lease_expires_at > now()),
           extract(epoch from now() - h.last_heartbeat_at)::double precision,
           coalesce(array(select jsonb_array_elements_text(coalesce(h.fleet -> 'cannot', '[]'::jsonb))), '{}'::text[])
    from worker_heartbeats h
    where h.fleet is not null
    order by h.worker_id;
end
$$;

-- Releasing a lease wakes the replica the account belongs to now.
create or replace function account_lease_release(p_account_id bigint, p_token uuid) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update telegram_accounts set lease_token = null, lease_owner = null, lease_expires_at = null, updated_at = now()
    where id = p_account_id and lease_token = p_token;
    if found then
        perform pg_notify('accounts', p_account_id::text);
    end if;
    return found;
end
$$;

-- Work this process still has in hand for an account (what a clean handoff waits for).
create or replace function account_work_in_hand(p_account_id bigint, p_owner text) returns integer
language sql stable
set search_path = public, pg_temp
as $$
    select (select count(*) from messages
             where account_id = p_account_id and status = 'sending' and lease_owner = p_owner)::integer
         + (select count(*) from history_sync_jobs
             where account_id = p_account_id and status = 'running' and lease_owner = p_owner)::integer
         + (select count(*) from message_jobs
             where account_id = p_account_id and status = 'running' and lease_owner = p_owner)::integer;
$$;

do $$
declare
    f record;
begin
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        join pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'public'
          and p.proname in ('worker_heartbeat_upsert', 'worker_heartbeat_remove', 'worker_fleet',
                            'account_lease_release', 'account_work_in_hand')
    loop
        execute format('revoke execute on function %s from public, anon, authenticated', f.signature);
        execute format('grant execute on function %s to service_role', f.signature);
    end loop;
end
$$;
