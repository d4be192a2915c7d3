-- Who may call what.
--
-- PostgreSQL lets every role execute a new function, and Supabase's HTTP API
-- exposes every function of the public schema. These functions are for the
-- bots only (the service role, or the database owner over DATABASE_URL), so
-- the public anon and authenticated roles may not execute them. They would
-- find nothing anyway: every table has row level security with no policy.
-- A later migration that adds a function adds its name here too (in its own
-- file, with the same loop).
do $$
declare
    f record;
begin
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        join pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'public'
          and p.proname = any (array[
              'db_ping', 'new_random_id', 'retry_delay',
              'account_upsert', 'account_list', 'account_get_session', 'account_save_session',
              'account_set_status', 'account_lease_acquire', 'account_lease_renew', 'account_lease_release',
              'chat_upsert', 'chat_get', 'chats_recent', 'messages_store',
              'outbound_enqueue', 'outbound_claim', 'outbound_mark_sent', 'outbound_mark_failed',
              'outbound_mark_dead', 'outbound_release', 'outbound_reschedule', 'outbound_requeue_expired',
              'outbound_get', 'outbound_counts',
              'worker_heartbeat_upsert', 'worker_heartbeats_list',
              'history_job_create', 'history_job_claim', 'history_job_save_cursor', 'history_job_complete',
              'history_job_fail', 'history_job_release', 'history_job_get',
              'message_job_create', 'message_job_claim', 'message_job_complete', 'message_job_fail',
              'message_job_release', 'message_job_get',
              'retry_item_upsert', 'retry_item_exhaust', 'retry_item_remove', 'retry_items_pending',
              'retry_items_exhausted', 'retry_items_count',
              'ingest_image_record', 'ingest_image_get', 'ingest_images_by_sha256', 'ingest_cursor_get',
              'ingest_cursor_advance',
              'tweet_insert', 'tweet_transition', 'tweet_get', 'tweets_list', 'tweet_counts', 'tweet_recover_stale'
          ])
    loop
        execute format('revoke execute on function %s from public, anon, authenticated', f.signature);
        execute format('grant execute on function %s to service_role', f.signature);
    end loop;
end
$$;

grant select, insert, update, delete on
    telegram_accounts, chats, messages, history_sync_jobs, message_jobs, worker_heartbeats,
    retry_items, ingest_images, ingest_cursors, tweet_queue
to service_role;
