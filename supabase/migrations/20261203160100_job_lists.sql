-- Reading jobs for the command line (`./start.sh worker jobs`) and finding a
-- chat the worker already knows by its username or title
-- (`./start.sh worker history --chat @name`).

-- History jobs, newest first; only the given statuses when p_statuses is set.
create or replace function history_jobs_list(p_statuses text[] default null, p_limit integer default 50)
returns setof history_sync_jobs
language sql stable
set search_path = public, pg_temp
as $$
    select * from history_sync_jobs
    where p_statuses is null or status = any (p_statuses)
    order by id desc
    limit greatest(coalesce(p_limit, 50), 1);
$$;

-- Message jobs, newest first; only the given statuses when p_statuses is set.
create or replace function message_jobs_list(p_statuses text[] default null, p_limit integer default 50)
returns setof message_jobs
language sql stable
set search_path = public, pg_temp
as $$
    select * from message_jobs
    where p_statuses is null or status = any (p_statuses)
    order by id desc
    limit greatest(coalesce(p_limit, 50), 1);
$$;

-- A chat of the account by username (with or without @, any case) or exact title;
-- the most recently active one when several match.
create or replace function chat_find(p_account_id bigint, p_ref text)
returns setof chats
language sql stable
set search_path = public, pg_temp
as $$
    select * from chats
    where account_id = p_account_id
      and (lower(username) = lower(ltrim(btrim(p_ref), '@')) or title = btrim(p_ref))
    order by last_message_at desc nulls last, id desc
    limit 1;
$$;

revoke all on function history_jobs_list(text[], integer) from public, anon, authenticated;
grant execute on function history_jobs_list(text[], integer) to service_role;
revoke all on function message_jobs_list(text[], integer) from public, anon, authenticated;
grant execute on function message_jobs_list(text[], integer) to service_role;
revoke all on function chat_find(bigint, text) from public, anon, authenticated;
grant execute on function chat_find(bigint, text) to service_role;
