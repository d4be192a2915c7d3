-- A channel's cursor is NULL until ingest has chosen where its first run
-- starts, and that start is saved before any message is handled. Before this
-- change a missing row read as 0 ("never read"), so a stop before the first
-- saved cursor made the next start a first run again, which reads back only
-- INGEST_BACKFILL_LIMIT messages and skipped what was posted in between.
create or replace function ingest_cursor_get(p_channel_id bigint) returns bigint
language sql stable
set search_path = public, pg_temp
as $$
    select last_message_id from ingest_cursors where channel_id = p_channel_id;
$$;
