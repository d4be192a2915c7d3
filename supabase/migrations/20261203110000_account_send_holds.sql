-- Telegram's send limits bind the account, not one chat:
--
-- * FLOOD_WAIT_X (and FLOOD_PREMIUM_WAIT_X) on a send: every send of that
--   account must wait X seconds. Sending to another chat meanwhile draws a
--   new FLOOD_WAIT, and Telegram lengthens the waits of an account that keeps
--   trying.
-- * PEER_FLOOD (the spam limit): the account may not message people who are
--   not its contacts for a while; Telegram does not say how long.
--
-- The hold lives here, not only in the process that drew it, because an
-- account moves between worker processes (a restart, a deploy, a lease taken
-- over): the next holder must keep waiting rather than draw the next flood
-- wait. Slow mode (SLOWMODE_WAIT) is a setting of one group and is held per
-- chat by rescheduling that chat's rows; it needs nothing here.

create table if not exists account_send_holds (
    account_id      bigint primary key references telegram_accounts (id) on delete cascade,
    -- FLOOD_WAIT: no send of the account before this time.
    flood_until     timestamptz,
    flood_reason    text,
    -- PEER_FLOOD: no send to a non-contact before this time.
    limited_until   timestamptz,
    limited_reason  text,
    updated_at      timestamptz not null default now()
);

comment on table account_send_holds is
    'Per account: until when Telegram''s FLOOD_WAIT holds every send, and PEER_FLOOD sends to non-contacts.';

alter table account_send_holds enable row level security;

-- Record a hold. p_kind is 'flood' (every send waits) or 'limited' (sends to
-- non-contacts wait). A longer hold already stored is kept: two processes
-- that saw the same wait, or a late report of an older one, never shorten
-- it. Returns the end of the hold now in force.
create or replace function account_send_hold(
    p_account_id bigint,
    p_kind text,
    p_until timestamptz,
    p_reason text default null
) returns timestamptz
language plpgsql volatile
set search_path = public, pg_temp
as $$
declare
    v_until timestamptz;
begin
    if p_kind not in ('flood', 'limited') then
        raise exception 'a send hold is flood or limited, not %', p_kind using errcode = '22023';
    end if;
    if p_until is null then
        raise exception 'a send hold needs its end time' using errcode = '22023';
    end if;
    insert into account_send_holds as h (account_id, flood_until, flood_reason, limited_until, limited_reason)
    values (p_account_id,
            case when p_kind = 'flood' then p_until end, case when p_kind = 'flood' then p_reason end,
            case when p_kind = 'limited' then p_until end, case when p_kind = 'limited' then p_reason end)
    on conflict (account_id) do update set
        flood_until = case when p_kind = 'flood' and (h.flood_until is null or h.flood_until < p_until)
                           then p_until else h.flood_until end,
        flood_reason = case when p_kind = 'flood' and (h.flood_until is null or h.flood_until < p_until)
                            then p_reason else h.flood_reason end,
        limited_until = case when p_kind = 'limited' and (h.limited_until is null or h.limited_until < p_until)
                             then p_until else h.limited_until end,
        limited_reason = case when p_kind = 'limited' and (h.limited_until is null or h.limited_until < p_until)
                              then p_reason else h.limited_reason end,
        updated_at = now()
    returning case when p_kind = 'flood' then h.flood_until else h.limited_until end into v_until;
    return v_until;
end
$$;

-- The holds still running, of these accounts (null: every account), with
-- each account's label. At most one row per account, so it never nears an
-- HTTP row cap; an expired hold shows as null.
create or replace function account_send_holds_list(p_account_ids bigint[] default null)
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
      and (h.flood_until > now() or h.limited_until > now())
    order by h.account_id;
$$;

-- Who may call and read this (as in the grants migration): the bots only.
do $$
declare
    f record;
begin
    for f in
        select p.oid::regprocedure as signature
        from pg_proc p
        join pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'public' and p.proname = any (array['account_send_hold', 'account_send_holds_list'])
    loop
        execute format('revoke execute on function %s from public, anon, authenticated', f.signature);
        execute format('grant execute on function %s to service_role', f.signature);
    end loop;
end
$$;

revoke all on account_send_holds from anon, authenticated;
grant select, insert, update, delete on account_send_holds to service_role;
