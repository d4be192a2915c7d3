-- State changes of the durable retry queue, the ingest bot and the Reply Guy bot.

-- Retry queue (every bot) -----------------------------------------------------------

-- Insert or update an item by (bot, id). Status follows the attempts:
-- pending before the first retry, retrying after.
create or replace function retry_item_upsert(
    p_bot text,
    p_id text,
    p_kind text,
    p_payload jsonb,
    p_attempts integer,
    p_next_attempt_at timestamptz,
    p_last_error text default null,
    p_created_at timestamptz default null
) returns text
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_status text := case when coalesce(p_attempts, 0) = 0 then 'pending' else 'retrying' end;
begin
    insert into retry_items as r (id, bot, kind, payload, attempts, next_attempt_at, last_error, status, created_at)
    values (p_id, p_bot, p_kind, coalesce(p_payload, '{}'::jsonb), coalesce(p_attempts, 0),
            coalesce(p_next_attempt_at, now()), p_last_error, v_status, coalesce(p_created_at, now()))
    on conflict (bot, id) do update set
        kind = excluded.kind,
        payload = excluded.payload,
        attempts = excluded.attempts,
        next_attempt_at = excluded.next_attempt_at,
        last_error = excluded.last_error,
        status = excluded.status,
        updated_at = now();
    return v_status;
end
$$;

-- Keep an item as a dead letter: status exhausted with its last error.
create or replace function retry_item_exhaust(
    p_bot text,
    p_id text,
    p_kind text,
    p_payload jsonb,
    p_attempts integer,
    p_last_error text default null,
    p_created_at timestamptz default null
) returns text
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    insert into retry_items as r (id, bot, kind, payload, attempts, next_attempt_at, last_error, status, created_at)
    values (p_id, p_bot, p_kind, coalesce(p_payload, '{}'::jsonb), coalesce(p_attempts, 0), now(),
            p_last_error, 'exhausted', coalesce(p_created_at, now()))
    on conflict (bot, id) do update set
        kind = excluded.kind,
        payload = excluded.payload,
        attempts = excluded.attempts,
        last_error = coalesce(excluded.last_error, r.last_error),
        status = 'exhausted',
        updated_at = now();
    return 'exhausted';
end
$$;

create or replace function retry_item_remove(p_bot text, p_id text) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    delete from retry_items where bot = p_bot and id = p_id;
    return found;
end
$$;

-- Items still to retry, soonest first.
create or replace function retry_items_pending(p_bot text, p_limit integer default 100)
returns setof retry_items
language sql stable
set search_path = public, pg_temp
as $$
    select * from retry_items
    where bot = p_bot and status in ('pending', 'retrying')
    order by next_attempt_at, created_at, id
    limit p_limit;
$$;

-- Dead letters, newest first.
create or replace function retry_items_exhausted(p_bot text, p_limit integer default 100)
returns setof retry_items
language sql stable
set search_path = public, pg_temp
as $$
    select * from retry_items
    where bot = p_bot and status = 'exhausted'
    order by updated_at desc, id
    limit p_limit;
$$;

create or replace function retry_items_count(p_bot text, p_statuses text[]) returns bigint
language sql stable
set search_path = public, pg_temp
as $$
    select count(*) from retry_items where bot = p_bot and status = any (p_statuses);
$$;

-- Ingest ----------------------------------------------------------------------------

-- Record what happened to one channel message's image, once per (channel,
-- message). A later call replaces a pending or failed record (a retry that
-- worked); a stored or skipped record is final. applied tells whether this
-- call wrote.
create or replace function ingest_image_record(
    p_channel_id bigint,
    p_message_id bigint,
    p_status text default 'stored',
    p_storage_key text default null,
    p_sha256 text default null,
    p_width integer default null,
    p_height integer default null,
    p_bytes bigint default null,
    p_mime text default null,
    p_error text default null
) returns table (
    applied boolean, id bigint, channel_id bigint, message_id bigint, storage_key text, sha256 text,
    width integer, height integer, bytes bigint, mime text, status text, error text,
    created_at timestamptz, updated_at timestamptz
)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
    v_id bigint;
begin
    insert into ingest_images as i (channel_id, message_id, storage_key, sha256, width, height, bytes, mime, status, error)
    values (p_channel_id, p_message_id, p_storage_key, p_sha256, p_width, p_height, p_bytes, p_mime, p_status, p_error)
    on conflict (channel_id, message_id) do update set
        storage_key = excluded.storage_key, sha256 = excluded.sha256, width = excluded.width,
        height = excluded.height, bytes = excluded.bytes, mime = excluded.mime,
        status = excluded.status, error = excluded.error, updated_at = now()
    where i.status in ('pending', 'failed')
    returning i.id into v_id;
    return query
    select v_id is not null, g.id, g.channel_id, g.message_id, g.storage_key, g.sha256, g.width, g.height,
           g.bytes, g.mime, g.status, g.error, g.created_at, g.updated_at
    from ingest_images g
    where g.channel_id = p_channel_id and g.message_id = p_message_id;
end
$$;

create or replace function ingest_image_get(p_channel_id bigint, p_message_id bigint) returns setof ingest_images
language sql stable
set search_path = public, pg_temp
as $$
    select * from ingest_images where channel_id = p_channel_id and message_id = p_message_id;
$$;

-- Images already stored with this content hash (duplicates across messages).
create or replace function ingest_images_by_sha256(p_sha256 text) returns setof ingest_images
language sql stable
set search_path = public, pg_temp
as $$
    select * from ingest_images where sha256 = p_sha256 and status = 'stored' order by id;
$$;

create or replace function ingest_cursor_get(p_channel_id bigint) returns bigint
language sql stable
set search_path = public, pg_temp
as $$
    select coalesce((select last_message_id from ingest_cursors where channel_id = p_channel_id), 0);
$$;

-- Move a channel's cursor forward (never back); returns the cursor after the call.
create or replace function ingest_cursor_advance(p_channel_id bigint, p_message_id bigint) returns bigint
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v bigint;
begin
    insert into ingest_cursors as c (channel_id, last_message_id)
    values (p_channel_id, p_message_id)
    on conflict (channel_id) do update set
        last_message_id = greatest(c.last_message_id, excluded.last_message_id),
        updated_at = now()
    returning c.last_message_id into v;
    return v;
end
$$;

-- Reply Guy tweets -------------------------------------------------------------------

-- Queue a discovered tweet once per target tweet; created = false when it was known.
create or replace function tweet_insert(p_target_tweet_id text, p_author text default null, p_tweet_text text default null)
returns table (
    created boolean, id uuid, target_tweet_id text, author text, tweet_text text, draft text, status text,
    approval_message_id bigint, posted_tweet_id text, attempts integer, last_error text,
    created_at timestamptz, updated_at timestamptz, drafted_at timestamptz, approved_at timestamptz,
    posted_at timestamptz
)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
declare
    v_id uuid;
begin
    if p_target_tweet_id is null or btrim(p_target_tweet_id) = '' then
        raise exception 'target tweet id is required' using errcode = '22023';
    end if;
    insert into tweet_queue (target_tweet_id, author, tweet_text)
    values (p_target_tweet_id, p_author, p_tweet_text)
    on conflict (target_tweet_id) do nothing
    returning tweet_queue.id into v_id;
    return query
    select v_id is not null, t.id, t.target_tweet_id, t.author, t.tweet_text, t.draft, t.status,
           t.approval_message_id, t.posted_tweet_id, t.attempts, t.last_error, t.created_at, t.updated_at,
           t.drafted_at, t.approved_at, t.posted_at
    from tweet_queue t where t.target_tweet_id = p_target_tweet_id;
end
$$;

-- Move a tweet from one of p_from to p_to, setting p_fields (draft,
-- approval_message_id, posted_tweet_id, last_error). False when the tweet
-- was not in one of p_from: someone else moved it first.
create or replace function tweet_transition(
    p_id uuid,
    p_from text[],
    p_to text,
    p_fields jsonb default '{}'::jsonb
) returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_unknown text;
    v_fields jsonb := coalesce(p_fields, '{}'::jsonb);
begin
    select string_agg(k, ', ') into v_unknown
    from jsonb_object_keys(v_fields) k
    where k not in ('draft', 'approval_message_id', 'posted_tweet_id', 'last_error');
    if v_unknown is not null then
        raise exception 'unknown tweet fields: %', v_unknown using errcode = '22023';
    end if;
    update tweet_queue set
        status = p_to,
        draft = case when v_fields ? 'draft' then v_fields ->> 'draft' else draft end,
        approval_message_id = case when v_fields ? 'approval_message_id'
                                   then (v_fields ->> 'approval_message_id')::bigint else approval_message_id end,
        posted_tweet_id = case when v_fields ? 'posted_tweet_id' then v_fields ->> 'posted_tweet_id' else posted_tweet_id end,
        last_error = case when v_fields ? 'last_error' then v_fields ->> 'last_error' else last_error end,
        attempts = case when p_to = 'posting' then attempts + 1 else attempts end,
        drafted_at = case when p_to = 'drafted' then now() else drafted_at end,
        approved_at = case when p_to = 'approved' then now() else approved_at end,
        posted_at = case when p_to = 'posted' then now() else posted_at end,
        updated_at = now()
    where id = p_id and status = any (p_from);
    return found;
end
$$;

create or replace function tweet_get(p_id uuid) returns setof tweet_queue
language sql stable
set search_path = public, pg_temp
as $$
    select * from tweet_queue where id = p_id;
$$;

create or replace function tweets_list(p_statuses text[] default null, p_limit integer default 100)
returns setof tweet_queue
language sql stable
set search_path = public, pg_temp
as $$
    select * from tweet_queue
    where p_statuses is null or status = any (p_statuses)
    order by created_at, id
    limit p_limit;
$$;

create or replace function tweet_counts() returns table (status text, count bigint)
language sql stable
set search_path = public, pg_temp
as $$
    select t.status, count(*) from tweet_queue t group by t.status order by t.status;
$$;

-- Crash recovery (seed 001): tweets stuck in failed or posting for longer
-- than p_minutes go back to approved for another try, while they have
-- attempts left. Returns the recovered tweets and where they were.
create or replace function tweet_recover_stale(p_minutes double precision default 30, p_max_attempts integer default 5)
returns table (id uuid, previous_status text)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
    return query
    with stale as (
        select t.id, t.status from tweet_queue t
        where t.status in ('failed', 'posting')
          and t.updated_at < now() - make_interval(secs => p_minutes * 60)
          and t.attempts < p_max_attempts
        for update skip locked
    )
    update tweet_queue t set
        status = 'approved',
        last_error = 'recovered after ' || p_minutes || ' minutes in ' || s.status
                     || coalesce('; before that: ' || t.last_error, ''),
        updated_at = now()
    from stale s
    where t.id = s.id
    returning t.id, s.status;
end
$$;
