-- One active process among replicas (bot.py): the active one holds a named
-- lease and renews it; the others stand by and take it when it is released
-- (SIGTERM) or lapses (kill -9). The token fences: a process whose lease was
-- taken cannot renew it, and stops.

create table if not exists process_leases (
    name         text primary key,
    owner        text not null,
    token        uuid not null,
    expires_at   timestamptz not null,
    acquired_at  timestamptz not null default now()
);

comment on table process_leases is
    'Named leases: the one active replica of a process that must not run twice (the Reply Guy).';

alter table process_leases enable row level security;

-- A fresh token, or null while another live owner holds the lease. The same
-- owner asking again keeps its token and extends the lease.
create or replace function process_lease_acquire(p_name text, p_owner text, p_lease_seconds double precision)
returns uuid
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_token uuid;
begin
    insert into process_leases as l (name, owner, token, expires_at, acquired_at)
    values (p_name, p_owner, gen_random_uuid(), now() + make_interval(secs => p_lease_seconds), now())
    on conflict (name) do update set
        token = case when l.owner = p_owner and l.expires_at > now() then l.token else excluded.token end,
        acquired_at = case when l.owner = p_owner and l.expires_at > now() then l.acquired_at else now() end,
        owner = excluded.owner,
        expires_at = excluded.expires_at
    where l.expires_at <= now() or l.owner = p_owner
    returning l.token into v_token;
    return v_token;
end
$$;

create or replace function process_lease_renew(p_name text, p_token uuid, p_lease_seconds double precision)
returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update process_leases set expires_at = now() + make_interval(secs => p_lease_seconds)
    where name = p_name and token = p_token;
    return found;
end
$$;

create or replace function process_lease_release(p_name text, p_token uuid) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    delete from process_leases where name = p_name and token = p_token;
    if found then
        perform pg_notify('process_leases', p_name);
    end if;
    return found;
end
$$;

-- Who holds the lease now (no token): for the standby's /status.
create or replace function process_lease_holder(p_name text)
returns table (owner text, expires_at timestamptz, acquired_at timestamptz)
language sql stable
set search_path = public, pg_temp
as $$
    select l.owner, l.expires_at, l.acquired_at from process_leases l
    where l.name = p_name and l.expires_at > now();
$$;

do $$
declare
    f record;
begin
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        join pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'public' and p.proname like 'process_lease_%'
    loop
        execute format('revoke execute on function %s from public, anon, authenticated', f.signature);
        execute format('grant execute on function %s to service_role', f.signature);
    end loop;
end
$$;

revoke all on table process_leases from anon, authenticated;
grant select, insert, update, delete on table process_leases to service_role;
