-- State changes of history sync jobs and scheduled message jobs.
--
-- Both kinds are claimed like outbound messages: due rows of the given
-- accounts, FOR UPDATE SKIP LOCKED, a fresh lease token and expiry; a row
-- whose lease expired (its worker died) is due again. Every later change is
-- fenced by the lease token, so a worker that lost its lease cannot report.

-- History sync jobs ------------------------------------------------------------------

-- Ask for a chat's history. One open (pending or running) job per chat:
-- asking again returns the open job.
create or replace function history_job_create(
    p_account_id bigint,
    p_chat_id bigint,
    p_target_count integer default null,
    p_run_at timestamptz default null
) returns setof history_sync_jobs
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_id bigint;
begin
    insert into history_sync_jobs (account_id, chat_id, target_count, run_at)
    values (p_account_id, p_chat_id, p_target_count, coalesce(p_run_at, now()))
    on conflict (account_id, chat_id) where status in ('pending', 'running') do nothing
    returning id into v_id;
    if v_id is not null then
        perform pg_notify('history_jobs', p_account_id::text);
        return query select * from history_sync_jobs where id = v_id;
    else
        return query select * from history_sync_jobs
                     where account_id = p_account_id and chat_id = p_chat_id and status in ('pending', 'running');
    end if;
end
$$;

create or replace function history_job_claim(
    p_account_ids bigint[],
    p_owner text,
    p_limit integer default 1,
    p_lease_seconds double precision default 300,
    p_max_retries integer default 5
) returns setof history_sync_jobs
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_now timestamptz := now();
    v_token uuid := gen_random_uuid();
begin
    update history_sync_jobs j set
        status = 'dead',
        last_error = 'lease expired after the last attempt' || coalesce('; before that: ' || j.last_error, ''),
        lease_expires_at = null, finished_at = v_now, updated_at = v_now
    where j.status = 'running' and j.lease_expires_at < v_now and j.attempts > p_max_retries
      and j.account_id = any (p_account_ids);

    return query
    with candidates as (
        (select j.id from history_sync_jobs j
         where j.status = 'pending' and j.run_at <= v_now and j.account_id = any (p_account_ids)
         order by j.run_at, j.id limit p_limit)
        union
        (select j.id from history_sync_jobs j
         where j.status = 'running' and j.lease_expires_at < v_now and j.attempts <= p_max_retries
           and j.account_id = any (p_account_ids)
         order by j.lease_expires_at limit p_limit)
    ), locked as (
        select j.id from history_sync_jobs j
        where j.id in (select c.id from candidates c)
          and ((j.status = 'pending' and j.run_at <= v_now)
               or (j.status = 'running' and j.lease_expires_at < v_now and j.attempts <= p_max_retries))
        order by j.id
        limit p_limit
        for update skip locked
    ), claimed as (
        update history_sync_jobs j set
            status = 'running', attempts = j.attempts + 1, lease_owner = p_owner, lease_token = v_token,
            lease_expires_at = v_now + make_interval(secs => p_lease_seconds), updated_at = v_now
        from locked l where j.id = l.id
        returning j.*
    )
    select * from claimed order by id;
end
$$;

-- Save progress (and extend the lease). False when the lease was lost.
create or replace function history_job_save_cursor(
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
    update history_sync_jobs set
        cursor = p_cursor,
        fetched_count = fetched_count + coalesce(p_fetched_delta, 0),
        stored_count = stored_count + coalesce(p_stored_delta, 0),
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        updated_at = now()
    where id = p_id and lease_token = p_token and status = 'running';
    return found;
end
$$;

create or replace function history_job_complete(p_id bigint, p_token uuid) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update history_sync_jobs set status = 'done', lease_expires_at = null, finished_at = now(), updated_at = now()
    where id = p_id and lease_token = p_token and status = 'running';
    if found then
        return true;
    end if;
    return exists (select 1 from history_sync_jobs where id = p_id and lease_token = p_token and status = 'done');
end
$$;

-- Returns the new status (failed, pending, dead), or null when the lease was lost.
create or replace function history_job_fail(
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
    v history_sync_jobs;
    v_status text;
begin
    select * into v from history_sync_jobs where id = p_id for update;
    if not found or v.lease_token is distinct from p_token then
        return null;
    end if;
    if v.status <> 'running' then
        return v.status;
    end if;
    v_status := case when p_permanent then 'failed' when v.attempts > p_max_retries then 'dead' else 'pending' end;
    update history_sync_jobs set
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

-- Hand a running job back (shutdown) without counting the attempt; the cursor stays.
create or replace function history_job_release(p_id bigint, p_token uuid) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update history_sync_jobs set status = 'pending', attempts = greatest(attempts - 1, 0),
                                 lease_expires_at = null, updated_at = now()
    where id = p_id and lease_token = p_token and status = 'running';
    return found;
end
$$;

create or replace function history_job_get(p_id bigint) returns setof history_sync_jobs
language sql stable
set search_path = public, pg_temp
as $$
    select * from history_sync_jobs where id = p_id;
$$;

-- Message jobs ---------------------------------------------------------------------

-- Schedule work (send, edit, delete, mark_read). A repeated p_dedupe_key
-- returns the job scheduled the first time.
create or replace function message_job_create(
    p_account_id bigint,
    p_kind text,
    p_payload jsonb default '{}'::jsonb,
    p_run_at timestamptz default null,
    p_dedupe_key text default null
) returns setof message_jobs
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_id bigint;
begin
    if jsonb_typeof(coalesce(p_payload, '{}'::jsonb)) <> 'object' then
        raise exception 'a job payload must be a JSON object' using errcode = '22023';
    end if;
    insert into message_jobs (account_id, kind, payload, run_at, dedupe_key)
    values (p_account_id, p_kind, coalesce(p_payload, '{}'::jsonb), coalesce(p_run_at, now()), p_dedupe_key)
    on conflict (dedupe_key) do nothing
    returning id into v_id;
    if v_id is not null then
        if coalesce(p_run_at, now()) <= now() then
            perform pg_notify('message_jobs', p_account_id::text);
        end if;
        return query select * from message_jobs where id = v_id;
    else
        return query select * from message_jobs where dedupe_key = p_dedupe_key;
    end if;
end
$$;

create or replace function message_job_claim(
    p_account_ids bigint[],
    p_owner text,
    p_limit integer default 10,
    p_lease_seconds double precision default 120,
    p_max_retries integer default 5
) returns setof message_jobs
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_now timestamptz := now();
    v_token uuid := gen_random_uuid();
begin
    update message_jobs j set
        status = 'dead',
        last_error = 'lease expired after the last attempt' || coalesce('; before that: ' || j.last_error, ''),
        lease_expires_at = null, finished_at = v_now, updated_at = v_now
    where j.status = 'running' and j.lease_expires_at < v_now and j.attempts > p_max_retries
      and j.account_id = any (p_account_ids);

    return query
    with candidates as (
        (select j.id from message_jobs j
         where j.status = 'pending' and j.run_at <= v_now and j.account_id = any (p_account_ids)
         order by j.run_at, j.id limit p_limit)
        union
        (select j.id from message_jobs j
         where j.status = 'running' and j.lease_expires_at < v_now and j.attempts <= p_max_retries
           and j.account_id = any (p_account_ids)
         order by j.lease_expires_at limit p_limit)
    ), locked as (
        select j.id from message_jobs j
        where j.id in (select c.id from candidates c)
          and ((j.status = 'pending' and j.run_at <= v_now)
               or (j.status = 'running' and j.lease_expires_at < v_now and j.attempts <= p_max_retries))
        order by j.run_at, j.id
        limit p_limit
        for update skip locked
    ), claimed as (
        update message_jobs j set
            status = 'running', attempts = j.attempts + 1, lease_owner = p_owner, lease_token = v_token,
            lease_expires_at = v_now + make_interval(secs => p_lease_seconds), updated_at = v_now
        from locked l where j.id = l.id
        returning j.*
    )
    select * from claimed order by run_at, id;
end
$$;

create or replace function message_job_complete(p_id bigint, p_token uuid, p_result jsonb default null) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update message_jobs set status = 'done', result = p_result, lease_expires_at = null,
                            finished_at = now(), updated_at = now()
    where id = p_id and lease_token = p_token and status = 'running';
    if found then
        return true;
    end if;
    return exists (select 1 from message_jobs where id = p_id and lease_token = p_token and status = 'done');
end
$$;

create or replace function message_job_fail(
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
    v message_jobs;
    v_status text;
begin
    select * into v from message_jobs where id = p_id for update;
    if not found or v.lease_token is distinct from p_token then
        return null;
    end if;
    if v.status <> 'running' then
        return v.status;
    end if;
    v_status := case when p_permanent then 'failed' when v.attempts > p_max_retries then 'dead' else 'pending' end;
    update message_jobs set
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

-- Hand running jobs back (shutdown) without counting the attempt.
create or replace function message_job_release(p_ids bigint[], p_token uuid) returns integer
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_count integer;
begin
    update message_jobs set status = 'pending', attempts = greatest(attempts - 1, 0),
                            lease_expires_at = null, updated_at = now()
    where id = any (p_ids) and lease_token = p_token and status = 'running';
    get diagnostics v_count = row_count;
    return v_count;
end
$$;

create or replace function message_job_get(p_id bigint) returns setof message_jobs
language sql stable
set search_path = public, pg_temp
as $$
    select * from message_jobs where id = p_id;
$$;
