-- The sandbox world: one SQLite file shared by every process that uses it.
-- Telegram's model: every user has a "box" (own message ids and pts) holding
-- its copy of each private or basic-group message; a channel has one box.

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS peers (
    id             INTEGER PRIMARY KEY,
    kind           TEXT    NOT NULL,            -- user | bot | group | channel | megagroup
    access_hash    INTEGER NOT NULL,
    username       TEXT UNIQUE COLLATE NOCASE,
    phone          TEXT UNIQUE,                 -- digits only
    bot_token      TEXT UNIQUE,
    first_name     TEXT,
    last_name      TEXT,
    title          TEXT,
    about          TEXT,
    creator_id     INTEGER,
    deactivated    INTEGER NOT NULL DEFAULT 0,
    login_required INTEGER NOT NULL DEFAULT 0,
    last_msg_id    INTEGER NOT NULL DEFAULT 0,
    pts            INTEGER NOT NULL DEFAULT 1,
    created        REAL    NOT NULL
);

CREATE TABLE IF NOT EXISTS members (
    chat_id   INTEGER NOT NULL,
    user_id   INTEGER NOT NULL,
    role      TEXT    NOT NULL DEFAULT 'member', -- creator | admin | member
    can_write INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (chat_id, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_user ON members (user_id);

CREATE TABLE IF NOT EXISTS contacts (
    owner_id   INTEGER NOT NULL,
    contact_id INTEGER NOT NULL,
    PRIMARY KEY (owner_id, contact_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS blocks (
    user_id    INTEGER NOT NULL,   -- this user ...
    blocked_id INTEGER NOT NULL,   -- ... blocked this one
    PRIMARY KEY (user_id, blocked_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS auth_keys (
    key_id        INTEGER PRIMARY KEY,
    auth_key      BLOB    NOT NULL,
    account_id    INTEGER,          -- NULL: not logged in
    revoked_error TEXT,             -- e.g. AUTH_KEY_UNREGISTERED once logged out
    created       REAL    NOT NULL,
    connected_at  REAL
);
CREATE INDEX IF NOT EXISTS auth_keys_account ON auth_keys (account_id);

CREATE TABLE IF NOT EXISTS messages (
    box       INTEGER NOT NULL,     -- owner of this copy (user, bot, group or channel)
    id        INTEGER NOT NULL,     -- message id inside the box
    chat_id   INTEGER NOT NULL,     -- the other user, the group or the channel
    sender_id INTEGER NOT NULL,
    out       INTEGER NOT NULL,
    date      INTEGER NOT NULL,
    text      TEXT    NOT NULL DEFAULT '',
    random_id INTEGER,
    media_id  INTEGER,
    reply_to  INTEGER,
    origin    INTEGER NOT NULL,     -- the same for every copy of one message
    pts       INTEGER,
    edited    INTEGER NOT NULL DEFAULT 0,
    deleted   INTEGER NOT NULL DEFAULT 0,
    tl        BLOB    NOT NULL,     -- serialized types.Message as the box owner sees it
    PRIMARY KEY (box, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_random
    ON messages (box, chat_id, sender_id, random_id) WHERE random_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_chat ON messages (box, chat_id, id);
CREATE INDEX IF NOT EXISTS messages_origin ON messages (origin);

CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    box        INTEGER NOT NULL,
    pts        INTEGER,             -- NULL for updates outside the pts sequence
    pts_count  INTEGER NOT NULL DEFAULT 0,
    pushed     INTEGER NOT NULL,    -- 0: a gap, never pushed to clients
    origin_key INTEGER,             -- auth key whose request caused it (not echoed back)
    date       REAL    NOT NULL,
    msg_id     INTEGER,             -- a new message: (box, msg_id) in messages
    entity_ids TEXT    NOT NULL DEFAULT '',  -- users/chats to send along, comma separated
    payload    BLOB                 -- any other update: a serialized types.Update*
);
CREATE INDEX IF NOT EXISTS events_box ON events (box, pts);
CREATE INDEX IF NOT EXISTS events_box_date ON events (box, date);

CREATE TABLE IF NOT EXISTS media (
    id             INTEGER PRIMARY KEY,
    kind           TEXT    NOT NULL,   -- photo | document
    access_hash    INTEGER NOT NULL,
    file_reference BLOB    NOT NULL,
    mime_type      TEXT    NOT NULL,
    size           INTEGER NOT NULL,
    width          INTEGER NOT NULL DEFAULT 0,
    height         INTEGER NOT NULL DEFAULT 0,
    file_name      TEXT,
    label          TEXT,               -- the ImageKind it was made from, if any
    data           BLOB,               -- NULL when generated lazily
    lazy_seed      INTEGER,
    date           INTEGER NOT NULL,
    tl             BLOB    NOT NULL    -- serialized MessageMedia
);

CREATE TABLE IF NOT EXISTS uploads (
    account_id INTEGER NOT NULL,
    file_id    INTEGER NOT NULL,
    part       INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (account_id, file_id, part)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS faults (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT    NOT NULL,
    method     TEXT    NOT NULL DEFAULT '*',
    peer_id    INTEGER,
    account_id INTEGER,
    remaining  INTEGER,
    ms         REAL    NOT NULL DEFAULT 0,
    jitter_ms  REAL    NOT NULL DEFAULT 0,
    error      TEXT,
    error_code INTEGER,
    seconds    INTEGER NOT NULL DEFAULT 0,
    then_do    TEXT    NOT NULL DEFAULT 'hang',
    hits       INTEGER NOT NULL DEFAULT 0,
    created    REAL    NOT NULL
);

CREATE TABLE IF NOT EXISTS flood_limits (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    scope      TEXT    NOT NULL,    -- account | chat
    account_id INTEGER,             -- NULL: every account
    rate       REAL    NOT NULL,    -- messages per second
    burst      REAL    NOT NULL
);

CREATE TABLE IF NOT EXISTS flood_buckets (
    key     TEXT PRIMARY KEY,
    tokens  REAL NOT NULL,
    updated REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS callbacks (
    query_id       INTEGER PRIMARY KEY,
    bot_id         INTEGER NOT NULL,
    user_id        INTEGER NOT NULL,
    chat_id        INTEGER NOT NULL,
    user_msg_id    INTEGER NOT NULL,
    bot_msg_id     INTEGER NOT NULL,
    data           BLOB,
    created        REAL    NOT NULL,
    answered       INTEGER NOT NULL DEFAULT 0,
    answer_message TEXT,
    answer_alert   INTEGER NOT NULL DEFAULT 0,
    answer_url     TEXT
);
