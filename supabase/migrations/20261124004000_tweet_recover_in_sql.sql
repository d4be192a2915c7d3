-- Crash recovery of the Reply Guy's tweets in one statement.
--
-- Before, tweet_recover_stale moved every stale failed/posting tweet to
-- approved and the bot then corrected each one in Python: a crash between
-- the two left tweets that no operator ever approved in approved, where the
-- post step could take them. Now each stale tweet goes straight to where it
-- can safely continue, in the same statement that finds it:
--
--   * a dead letter (an exhausted retry_items row of p_bot whose
--     payload->>'tweet_id' is the tweet) stays failed: a failed one is left
--     untouched, a posting one goes back to failed;
--   * no draft yet: discovered (drafted again);
--   * a draft no operator approved (approved_at is null): drafted (the
--     operators are asked again);
--   * approved by an operator: approved (the post step looks for an earlier
--     reply before posting, since the tweet had an intent).
--
-- Only tweets stuck longer than p_minutes with fewer than p_max_attempts
-- posting intents are considered. Returns each one with where it was
-- (previous_status) and where it is now (status; failed for a dead letter).
-- p_bot null: a dead letter of any bot counts.

drop function if exists tweet_recover_stale(double precision, integer);

create or replace function tweet_recover_stale(
    p_minutes double precision default 30,
    p_max_attempts integer default 5,
    p_bot text default null
)
returns table (id uuid, previous_status text, status text)
language plpgsql volatile
set search_path = public, pg_temp
as $$
#variable_conflict use_column
begin
    return query
    with stale as (
        select t.id,
               t.status as previous_status,
               case
                   when exists (
                       select 1 from retry_items r
                       where r.status = 'exhausted'
                         and (p_bot is null or r.bot = p_bot)
                         and r.payload ->> 'tweet_id' = t.id::text
                   ) then 'failed'
                   when coalesce(t.draft, '') = '' then 'discovered'
                   when t.approved_at is null then 'drafted'
                   else 'approved'
               end as target
        from tweet_queue t
        where t.status in ('failed', 'posting')
          and t.updated_at < now() - make_interval(secs => p_minutes * 60)
          and t.attempts < p_max_attempts
        for update of t skip locked
    ),
    moved as (
        update tweet_queue t set
            status = s.target,
            last_error = 'recovered after ' || p_minutes || ' minutes in ' || s.previous_status
                         || coalesce('; before that: ' || t.last_error, ''),
            updated_at = now()
        from stale s
        where t.id = s.id
          and s.target <> s.previous_status
        returning t.id, s.previous_status, t.status
    )
    select m.id, m.previous_status, m.status from moved m
    union all
    select s.id, s.previous_status, s.target from stale s where s.target = s.previous_status;
end
$$;

revoke all on function tweet_recover_stale(double precision, integer, text) from public, anon, authenticated;
grant execute on function tweet_recover_stale(double precision, integer, text) to service_role;
