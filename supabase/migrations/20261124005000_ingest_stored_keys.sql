-- The orphan sweep asks, for a batch of object keys, which of them a row
-- points at: one call per batch instead of one per object (a bucket of
-- 100k images was 100k calls). Any row with the key counts, whatever its
-- status: an object a row names is never an orphan.
create index if not exists ingest_images_storage_key_idx on ingest_images (storage_key);

-- The keys of p_keys that some ingest_images row has as storage_key, each
-- once (NULL elements and an empty or NULL array give nothing).
create or replace function ingest_stored_keys(p_keys text[])
returns setof text
language sql stable
set search_path = public, pg_temp
as $$
    select distinct k.key
    from unnest(p_keys) as k(key)
    where exists (select 1 from ingest_images i where i.storage_key = k.key)
$$;

revoke all on function ingest_stored_keys(text[]) from public, anon, authenticated;
grant execute on function ingest_stored_keys(text[]) to service_role;
