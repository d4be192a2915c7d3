-- Tables of everything that must survive a crash.
--
-- Applied by `python -m shared.db migrate` (or the Supabase CLI). Every
-- statement is idempotent, so applying this file twice changes nothing.
-- State changes go through the SQL functions of the later migrations; the
-- bots never write these tables directly.

-- Supabase has these roles; a plain PostgreSQL gets them so that the grants
-- and row level security below mean the same thing everywhere. Like
-- Supabase's, service_role bypasses row level security (when the migrator
-- may grant that; otherwise it is created without).
do $$
declare
    r text;
begin
    foreach r in array array['anon', 'authenticated', 'service_role'] loop
        if not exists (select 1 from pg_roles where rolname = r) then
            begin
                if r = 'service_role' then
                    begin
                        execute 'create role service_role nologin bypassrls';
                    exception when insufficient_privilege then
                        execute 'create role service_role nologin';
                    end;
                else
                    execute format('create role %I nologin', r);
                end if;
            exception when duplicate_object or unique_violation then
                null; -- created concurrently by another migrator
            end;
        end if;
    end loop;
end
$$;

grant usage on schema public to anon, authenticated, service_role;

-- Telegram accounts -----------------------------------------------------------

create table if not exists telegram_accounts (
    id                bigint generated always as identity primary key,
    label             text not null unique,
    phone             text,
    session_encrypted text,
    status            text not null default 'needs_login'
                      check (status in ('active', 'needs_login', 'disabled')),
    lease_owner       text,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    last_error        text,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now()
);

comment on table telegram_accounts is
    'Telegram accounts; the lease makes sure one live process uses a session at a time.';

-- Chats and their sync cursor --------------------------------------------------

create table if not exists chats (
    id                bigint generated always as identity primary key,
    account_id        bigint not null references telegram_accounts (id) on delete cascade,
    telegram_chat_id  bigint not null,
    kind              text not null default 'unknown'
                      check (kind in ('user', 'bot', 'group', 'supergroup', 'channel', 'unknown')),
    title             text,
    username          text,
    last_message_id   bigint not null default 0,
    last_message_at   timestamptz,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    unique (account_id, telegram_chat_id)
);

create index if not exists chats_recent_idx on chats (account_id, last_message_at desc nulls last);

-- Messages, inbound and outbound ---------------------------------------------

create table if not exists messages (
    id                   bigint generated always as identity primary key,
    account_id           bigint not null references telegram_accounts (id) on delete cascade,
    direction            text not null check (direction in ('inbound', 'outbound')),
    -- Telegram's chat id: known for inbound rows, filled at enqueue or on send for outbound.
    chat_id              bigint,
    -- Outbound: the peer as the user gave it (username, phone or numeric id).
    peer                 text,
    telegram_message_id  bigint,
    sender_id            bigint,
    text                 text,
    attachments          jsonb not null default '[]'::jsonb,
    reply_to             bigint,
    -- Outbound only (null for inbound rows and for our own sends seen as events).
    status               text check (status in ('queued', 'sending', 'sent', 'failed', 'dead')),
    attempts             integer not null default 0,
    next_attempt_at      timestamptz,
    random_id            bigint,
    dedupe_key           text unique,
    lease_owner          text,
    lease_token          uuid,
    lease_expires_at     timestamptz,
    last_error           text,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now(),
    sent_at              timestamptz,
    -- An inbound message is stored once whatever path brought it; our own
    -- send seen again as an event hits the same key.
    constraint messages_telegram_key unique (account_id, chat_id, telegram_message_id),
    constraint messages_outbound_shape check (
        direction = 'inbound'
        or status is null
        or (peer is not null and random_id is not null and random_id <> 0)
    )
);

-- Due queued rows, soonest first (the claim's entry point).
create index if not exists messages_due_idx
    on messages (next_attempt_at, id) where status = 'queued';
-- Rows being sent, by lease expiry (taking back leases of killed workers).
create index if not exists messages_lease_idx
    on messages (lease_expires_at) where status = 'sending';
-- Unfinished rows of one chat in enqueue order (the per-chat ordering check).
create index if not exists messages_unfinished_chat_idx
    on messages (account_id, peer, id) where status in ('queued', 'sending');
create index if not exists messages_chat_idx
    on messages (account_id, chat_id, telegram_message_id desc);

-- History sync jobs ------------------------------------------------------------

create table if not exists history_sync_jobs (
    id                bigint generated always as identity primary key,
    account_id        bigint not null references telegram_accounts (id) on delete cascade,
    chat_id           bigint not null,
    -- Next page starts below this message id (0: from the newest message).
    cursor            bigint not null default 0,
    -- Stop after this many messages (null: the whole history).
    target_count      integer,
    fetched_count     integer not null default 0,
    stored_count      integer not null default 0,
    status            text not null default 'pending'
                      check (status in ('pending', 'running', 'done', 'failed', 'dead')),
    attempts          integer not null default 0,
    run_at            timestamptz not null default now(),
    lease_owner       text,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    last_error        text,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    finished_at       timestamptz
);

create index if not exists history_sync_jobs_due_idx
    on history_sync_jobs (run_at, id) where status = 'pending';
create index if not exists history_sync_jobs_lease_idx
    on history_sync_jobs (lease_expires_at) where status = 'running';
create unique index if not exists history_sync_jobs_one_open_per_chat
    on history_sync_jobs (account_id, chat_id) where status in ('pending', 'running');

-- Scheduled message work (send later, edit, delete, mark read) -----------------

create table if not exists message_jobs (
    id                bigint generated always as identity primary key,
    account_id        bigint not null references telegram_accounts (id) on delete cascade,
    kind              text not null check (kind in ('send', 'edit', 'delete', 'mark_read')),
    payload           jsonb not null default '{}'::jsonb,
    dedupe_key        text unique,
    run_at            timestamptz not null default now(),
    status            text not null default 'pending'
                      check (status in ('pending', 'running', 'done', 'failed', 'dead')),
    attempts          integer not null default 0,
    lease_owner       text,
    lease_token       uuid,
    lease_expires_at  timestamptz,
    last_error        text,
    result            jsonb,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    finished_at       timestamptz
);

create index if not exists message_jobs_due_idx
    on message_jobs (run_at, id) where status = 'pending';
create index if not exists message_jobs_lease_idx
    on message_jobs (lease_expires_at) where status = 'running';

-- Worker heartbeats --------------------------------------------------------------

create table if not exists worker_heartbeats (
    worker_id          text primary key,
    status             text not null,
    last_heartbeat_at  timestamptz not null default now(),
    loops              jsonb not null default '{}'::jsonb,
    version            text,
    host               text,
    pid                integer,
    started_at         timestamptz not null default now()
);

-- Durable retry queue and dead letters of every bot ------------------------------

create table if not exists retry_items (
    id               text not null,
    bot              text not null,
    kind             text not null,
    payload          jsonb not null default '{}'::jsonb,
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    last_error       text,
    status           text not null default 'pending'
                     check (status in ('pending', 'retrying', 'exhausted')),
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    primary key (bot, id)
);

create index if not exists retry_items_pending_idx
    on retry_items (bot, next_attempt_at) where status in ('pending', 'retrying');

-- Ingest: images taken from channels, and a cursor per channel -----------------

create table if not exists ingest_images (
    id           bigint generated always as identity primary key,
    channel_id   bigint not null,
    message_id   bigint not null,
    storage_key  text,
    sha256       text,
    width        integer,
    height       integer,
    bytes        bigint,
    mime         text,
    status       text not null default 'stored'
                 check (status in ('pending', 'stored', 'skipped', 'failed')),
    error        text,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now(),
    unique (channel_id, message_id)
);

create index if not exists ingest_images_sha256_idx on ingest_images (sha256);

create table if not exists ingest_cursors (
    channel_id       bigint primary key,
    last_message_id  bigint not null default 0,
    updated_at       timestamptz not null default now()
);

-- Reply Guy: tweets from discovery to posting ------------------------------------

create table if not exists tweet_queue (
    id                   uuid primary key default gen_random_uuid(),
    target_tweet_id      text not null unique,
    author               text,
    tweet_text           text,
    draft                text,
    status               text not null default 'discovered'
                         check (status in ('discovered', 'drafted', 'pending_approval', 'approved',
                                           'posting', 'posted', 'rejected', 'failed')),
    approval_message_id  bigint,
    posted_tweet_id      text,
    attempts             integer not null default 0,
    last_error           text,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now(),
    drafted_at           timestamptz,
    approved_at          timestamptz,
    posted_at            timestamptz
);

create index if not exists tweet_queue_status_idx on tweet_queue (status, updated_at);

-- Row level security: on for every table, with no policy, so the anon and
-- authenticated roles (Supabase's public keys) read and write nothing. The
-- service role bypasses it.
alter table telegram_accounts enable row level security;
alter table chats enable row level security;
alter table messages enable row level security;
alter table history_sync_jobs enable row level security;
alter table message_jobs enable row level security;
alter table worker_heartbeats enable row level security;
alter table retry_items enable row level security;
alter table ingest_images enable row level security;
alter table ingest_cursors enable row level security;
alter table tweet_queue enable row level security;
