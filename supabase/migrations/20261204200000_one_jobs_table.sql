-- One jobs table and one job lifecycle.
--
-- History sync jobs and scheduled message jobs lived in two tables with two
-- near-identical sets of functions. They are the same thing: work for one
-- account, due at run_at, claimed with FOR UPDATE SKIP LOCKED under a lease
-- (owner, a fresh token, an expiry), every later change fenced by the token,
-- failures retried with backoff until dead. So one table `jobs` with a `kind`
-- holds them all, and one set of functions runs them: job_create, job_claim
-- (by kinds), job_save_progress, job_complete, job_fail, job_release,
-- job_requeue, job_get, jobs_list.
--
-- A job's arguments are its payload (a history job's: chat_id and
-- target_count); a resumable job saves its progress in cursor,
-- fetched_count and stored_count (history: the next page starts below
-- `cursor`).
--
-- Existing rows move over. Message jobs keep their ids: a send job's
-- outbound row is keyed by 'job:<id>', so a moved job that runs again must
-- find the row it queued before. History jobs get new ids above every
-- message job's (id + the largest message job id); their ids only named them
-- on the status page and in alerts.

create table if not exists jobs (
    id                bigint generated always as identity primary key,
    account_id        bigint not null references telegram_accounts (id) on delete cascade,
    kind              text not null check (kind in ('history', 'send', 'edit', 'delete', 'mark_read')),
    payload           jsonb not null default '{}'::jsonb check (jsonb_typeof(payload) = 'object'),
    dedupe_key        text unique,
    run_at            timestamptz not null default now(),
    status            text not null default 'pending'
                      check (status in ('pending', 'running', 'done', 'failed', 'dead')),
    attempts          integer not null default 0,
    lease_owner       text,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    last_error        text,
    result            jsonb,
    -- Progress of a resumable job (history: the next page starts below this message id; 0: from the newest).
    cursor            bigint not null default 0,
    fetched_count     integer not null default 0,
    stored_count      integer not null default 0,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    finished_at       timestamptz,
    constraint jobs_history_has_a_chat check (kind <> 'history' or jsonb_typeof(payload -> 'chat_id') = 'number')
);

create index if not exists jobs_due_idx on jobs (run_at, id) where status = 'pending';
create index if not exists jobs_lease_idx on jobs (lease_expires_at) where status = 'running';
-- One open history job per chat: asking again returns it.
create unique index if not exists jobs_one_open_history_per_chat
    on jobs (account_id, ((payload ->> 'chat_id')::bigint))
    where kind = 'history' and status in ('pending', 'running');

alter table jobs enable row level security;

-- Move the rows ---------------------------------------------------------------------

do $$
declare
    v_offset bigint;
begin
    if to_regclass('public.message_jobs') is not null then
        insert into jobs (id, account_id, kind, payload, dedupe_key, run_at, status, attempts, lease_owner,
                          lease_token, lease_expires_at, last_error, result, created_at, updated_at, finished_at)
        overriding system value
        select id, account_id, kind, payload, dedupe_key, run_at, status, attempts, lease_owner,
               lease_token, lease_expires_at, last_error, result, created_at, updated_at, finished_at
        from message_jobs
        order by id;
    end if;
    if to_regclass('public.history_sync_jobs') is not null then
        select coalesce(max(id), 0) into v_offset from jobs;
        insert into jobs (id, account_id, kind, payload, run_at, status, attempts, lease_owner, lease_token,
                          lease_expires_at, last_error, cursor, fetched_count, stored_count,
                          created_at, updated_at, finished_at)
        overriding system value
        select id + v_offset, account_id, 'history',
               jsonb_strip_nulls(jsonb_build_object('chat_id', chat_id, 'target_count', target_count)),
               run_at, status, attempts, lease_owner, lease_token, lease_expires_at, last_error,
               cursor, fetched_count, stored_count, created_at, updated_at, finished_at
        from history_sync_jobs
        order by id;
    end if;
    -- New jobs are numbered after the moved ones.
    perform setval(pg_get_serial_sequence('jobs', 'id'), coalesce(max(id), 1), max(id) is not null) from jobs;
end
$$;

-- Drop what the two tables had --------------------------------------------------------

do $$
declare
    f record;
begin
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        where p.pronamespace = 'public'::regnamespace
          and p.proname in ('history_job_create', 'history_job_claim', 'history_job_save_cursor',
                            'history_job_complete', 'history_job_fail', 'history_job_release', 'history_job_get',
                            'history_jobs_list', 'message_job_create', 'message_job_claim', 'message_job_complete',
                            'message_job_fail', 'message_job_release', 'message_job_get', 'message_jobs_list',
                            'account_takeover')
    loop
        execute format('drop function %s', f.signature);
    end loop;
end
$$;

drop table if exists history_sync_jobs;
drop table if exists message_jobs;

-- The lifecycle -------------------------------------------------------------------------

-- New work. A repeated p_dedupe_key returns the job made the first time; a
-- history job for a chat that has one open returns the open one. A job due
-- now wakes the workers on channel 'jobs' (payload: the account id).
create or replace function job_create(
    p_account_id bigint,
    p_kind text,
    p_payload jsonb default '{}'::jsonb,
    p_run_at timestamptz default null,
    p_dedupe_key text default null
) returns setof jobs
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_id bigint;
    v_payload jsonb := coalesce(p_payload, '{}'::jsonb);
begin
    if jsonb_typeof(v_payload) <> 'object' then
        raise exception 'a job payload must be a JSON object' using errcode = '22023';
    end if;
    if p_kind = 'history' and jsonb_typeof(v_payload -> 'chat_id') is distinct from 'number' then
        raise exception 'a history job needs the chat_id in its payload' using errcode = '22023';
    end if;
    insert into jobs (account_id, kind, payload, run_at, dedupe_key)
    values (p_account_id, p_kind, v_payload, coalesce(p_run_at, now()), p_dedupe_key)
    on conflict do nothing
    returning id into v_id;
    if v_id is not null then
        if coalesce(p_run_at, now()) <= now() then
            perform pg_notify('jobs', p_account_id::text);
        end if;
        return query select * from jobs where id = v_id;
    elsif p_dedupe_key is not null then
        return query select * from jobs where dedupe_key = p_dedupe_key;
    else
        return query select * from jobs
                     where kind = 'history' and account_id = p_account_id
                       and (payload ->> 'chat_id')::bigint = (v_payload ->> 'chat_id')::bigint
                       and status in ('pending', 'running');
    end if;
end
$$;

-- Due jobs of these kinds and accounts, oldest run_at first, each under a
-- fresh lease token shared by the batch. A job whose lease expired (its
-- worker died) is due again, or dead once it had all its attempts.
create or replace function job_claim(
    p_account_ids bigint[],
    p_kinds text[],
    p_owner text,
    p_limit integer default 10,
    p_lease_seconds double precision default 120,
    p_max_retries integer default 5
) returns setof jobs
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_now timestamptz := now();
    v_token uuid := gen_random_uuid();
begin
    update jobs j set
        status = 'dead',
        last_error = 'lease expired after the last attempt' || coalesce('; before that: ' || j.last_error, ''),
        lease_expires_at = null, finished_at = v_now, updated_at = v_now
    where j.status = 'running' and j.lease_expires_at < v_now and j.attempts > p_max_retries
      and j.account_id = any (p_account_ids) and j.kind = any (p_kinds);

    return query
    with candidates as (
        (select j.id from jobs j
         where j.status = 'pending' and j.run_at <= v_now
           and j.account_id = any (p_account_ids) and j.kind = any (p_kinds)
         order by j.run_at, j.id limit p_limit)
        union
        (select j.id from jobs j
         where j.status = 'running' and j.lease_expires_at < v_now and j.attempts <= p_max_retries
           and j.account_id = any (p_account_ids) and j.kind = any (p_kinds)
         order by j.lease_expires_at limit p_limit)
    ), locked as (
        select j.id from jobs j
        where j.id in (select c.id from candidates c)
          and ((j.status = 'pending' and j.run_at <= v_now)
               or (j.status = 'running' and j.lease_expires_at < v_now and j.attempts <= p_max_retries))
        order by j.run_at, j.id
        limit p_limit
        for update skip locked
    ), claimed as (
        update jobs j set
            status = 'running', attempts = j.attempts + 1, lease_owner = p_owner, lease_token = v_token,
            lease_expires_at = v_now + make_interval(secs => p_lease_seconds), updated_at = v_now
        from locked l where j.id = l.id
        returning j.*
    )
    select * from claimed order by run_at, id;
end
$$;

-- Save a resumable job's progress and extend its lease. False when the lease was lost.
create or replace function job_save_progress(
    p_id bigint,
    p_token uuid,
    p_cursor bigint,
    p_fetched_delta integer default 0,
    p_stored_delta integer default 0,
    p_lease_seconds double precision default 300
) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update jobs set
        cursor = p_cursor,
        fetched_count = fetched_count + coalesce(p_fetched_delta, 0),
        stored_count = stored_count + coalesce(p_stored_delta, 0),
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        updated_at = now()
    where id = p_id and lease_token = p_token and status = 'running';
    return found;
end
$$;

-- Done, with its result. True also when it was done already under this token.
create or replace function job_complete(p_id bigint, p_token uuid, p_result jsonb default null) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update jobs set status = 'done', result = p_result, lease_expires_at = null, finished_at = now(), updated_at = now()
    where id = p_id and lease_token = p_token and status = 'running';
    if found then
        return true;
    end if;
    return exists (select 1 from jobs where id = p_id and lease_token = p_token and status = 'done');
end
$$;

-- Returns the new status (failed, pending, dead), or null when the lease was lost.
create or replace function job_fail(
    p_id bigint,
    p_token uuid,
    p_error text,
    p_permanent boolean default false,
    p_retry_at timestamptz default null,
    p_max_retries integer default 5,
    p_base_delay double precision default 60,
    p_max_delay double precision default 3600
) returns text
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v jobs;
    v_status text;
begin
    select * into v from jobs where id = p_id for update;
    if not found or v.lease_token is distinct from p_token then
        return null;
    end if;
    if v.status <> 'running' then
        return v.status;
    end if;
    v_status := case when p_permanent then 'failed' when v.attempts > p_max_retries then 'dead' else 'pending' end;
    update jobs set
        status = v_status,
        last_error = p_error,
        run_at = case when v_status = 'pending'
                      then coalesce(p_retry_at, now() + retry_delay(v.attempts, p_base_delay, p_max_delay))
                      else run_at end,
        lease_expires_at = null,
        finished_at = case when v_status = 'pending' then null else now() end,
        updated_at = now()
    where id = p_id;
    return v_status;
end
$$;

-- Hand running jobs back (shutdown, or a history job's turn is over) without
-- counting the attempt; a resumable job keeps its progress. Returns how many.
create or replace function job_release(p_ids bigint[], p_token uuid) returns integer
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_count integer;
begin
    update jobs set status = 'pending', attempts = greatest(attempts - 1, 0), lease_expires_at = null, updated_at = now()
    where id = any (p_ids) and lease_token = p_token and status = 'running';
    get diagnostics v_count = row_count;
    return v_count;
end
$$;

-- An operator's second chance: failed or dead jobs are due again now with
-- fresh attempts (progress kept). Returns the jobs requeued.
create or replace function job_requeue(p_ids bigint[]) returns setof jobs
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_account bigint;
begin
    for v_account in
        update jobs set status = 'pending', attempts = 0, run_at = now(), lease_owner = null, lease_token = null,
                        lease_expires_at = null, finished_at = null, updated_at = now()
        where id = any (p_ids) and status in ('failed', 'dead')
        returning account_id
    loop
        perform pg_notify('jobs', v_account::text);
    end loop;
    return query select * from jobs where id = any (p_ids) order by id;
end
$$;

create or replace function job_get(p_id bigint) returns setof jobs
language sql stable
set search_path = public, pg_temp
as $$
    select * from jobs where id = p_id;
$$;

-- Jobs newest first, read in pages: only the given statuses and kinds when
-- set; p_after is the id of the last row of the previous page.
create or replace function jobs_list(
    p_statuses text[] default null,
    p_kinds text[] default null,
    p_limit integer default null,
    p_after bigint default null
) returns setof jobs
language sql stable
set search_path = public, pg_temp
as $$
    select * from jobs
    where (p_statuses is null or status = any (p_statuses))
      and (p_kinds is null or kind = any (p_kinds))
      and (p_after is null or id < p_after)
    order by id desc
    limit p_limit;
$$;

-- The account functions that looked at both tables ------------------------------------

-- Taking over an account: its new lease holder takes back the work the
-- previous holder had in hand (see 20261124001000_account_takeover.sql).
create or replace function account_takeover(p_account_id bigint, p_owner text)
returns table (outbound integer, jobs integer)
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_outbound integer;
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

    update jobs j set
        status = 'pending',
        lease_owner = null,
        lease_token = null,
        lease_expires_at = null,
        run_at = now(),
        updated_at = now()
    where j.account_id = p_account_id
      and j.status = 'running'
      and j.lease_owner is distinct from p_owner;
    get diagnostics v_jobs = row_count;

    return query select v_outbound, v_jobs;
end
$$;

-- Work this process still has in hand for an account (what a clean handoff waits for).
create or replace function account_work_in_hand(p_account_id bigint, p_owner text) returns integer
language sql stable
set search_path = public, pg_temp
as $$
    select (select count(*) from messages
             where account_id = p_account_id and status = 'sending' and lease_owner = p_owner)::integer
         + (select count(*) from jobs
             where account_id = p_account_id and status = 'running' and lease_owner = p_owner)::integer;
$$;

-- Who may call what: the bots only (see 20261203120000_public_roles_and_paging.sql).

do $$
declare
    r text;
    f record;
begin
    foreach r in array array['anon', 'authenticated'] loop
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('revoke all on table jobs from %I', r);
            execute format('revoke all on sequence %s from %I', pg_get_serial_sequence('jobs', 'id'), r);
        end if;
    end loop;
    if exists (select 1 from pg_roles where rolname = 'service_role') then
        grant select, insert, update, delete on jobs to service_role;
    end if;
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        where p.pronamespace = 'public'::regnamespace
          and p.proname in ('job_create', 'job_claim', 'job_save_progress', 'job_complete', 'job_fail',
                            'job_release', 'job_requeue', 'job_get', 'jobs_list',
                            'account_takeover', 'account_work_in_hand')
    loop
        execute format('revoke execute on function %s from public', f.signature);
        foreach r in array array['anon', 'authenticated'] loop
            if exists (select 1 from pg_roles where rolname = r) then
                execute format('revoke execute on function %s from %I', f.signature, r);
            end if;
        end loop;
        if exists (select 1 from pg_roles where rolname = 'service_role') then
            execute format('grant execute on function %s to service_role', f.signature);
        end if;
    end loop;
end
$$;
