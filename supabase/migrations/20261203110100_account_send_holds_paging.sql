-- The list of running send holds reads in pages, like every list the bots
-- read over Supabase's API (at most 1000 rows per answer): p_limit and the
-- keyset p_after (the account id of the previous page's last row); both
-- default to null, which means everything, as before. Dropped and created
-- again: a second overload would make PostgREST's choice ambiguous.

drop function if exists account_send_holds_list(bigint[]);
create or replace function account_send_holds_list(
    p_account_ids bigint[] default null,
    p_after bigint default null,
    p_limit integer default null
)
returns table (
    account_id bigint,
    label text,
    flood_until timestamptz,
    flood_reason text,
    limited_until timestamptz,
    limited_reason text
)
language sql stable
set search_path = public, pg_temp
as $$
    select h.account_id, a.label,
           case when h.flood_until > now() then h.flood_until end,
           case when h.flood_until > now() then h.flood_reason end,
           case when h.limited_until > now() then h.limited_until end,
           case when h.limited_until > now() then h.limited_reason end
    from account_send_holds h
    join telegram_accounts a on a.id = h.account_id
    where (p_account_ids is null or h.account_id = any (p_account_ids))
      and (p_after is null or h.account_id > p_after)
      and (h.flood_until > now() or h.limited_until > now())
    order by h.account_id
    limit p_limit;
$$;

revoke execute on function account_send_holds_list(bigint[], bigint, integer) from public;
do $$
begin
    if exists (select 1 from pg_roles where rolname = 'anon') then
        revoke execute on function account_send_holds_list(bigint[], bigint, integer) from anon, authenticated;
    end if;
    if exists (select 1 from pg_roles where rolname = 'service_role') then
        grant execute on function account_send_holds_list(bigint[], bigint, integer) to service_role;
    end if;
end
$$;
