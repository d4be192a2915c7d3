-- A session that this process cannot decrypt is the process's problem (a
-- wrong SESSION_ENCRYPTION_KEY), not the account's: the account is left as
-- it is. Older versions marked such accounts needs_login with the error text
-- below; a process whose key opens the session puts them back to active.
--
-- Only that recorded reason is undone: an account Telegram logged out
-- (AUTH_KEY_UNREGISTERED, SESSION_REVOKED ...) has another last_error and
-- stays needs_login until someone logs it in again.
create or replace function account_key_recovered(p_account_id bigint)
returns boolean
language plpgsql volatile
set search_path = public, pg_temp
as $$
begin
    update telegram_accounts set
        status = 'active',
        last_error = 'back to active: the session opens with this SESSION_ENCRYPTION_KEY (it was marked needs_login by a process with another key)',
        updated_at = now()
    where id = p_account_id
      and status = 'needs_login'
      and last_error like 'the session cannot be decrypted%';
    return found;
end
$$;

revoke all on function account_key_recovered(bigint) from public, anon, authenticated;
grant execute on function account_key_recovered(bigint) to service_role;
