"""The data layer: everything that must survive a crash, in PostgreSQL.

``await open_database(settings)`` picks the backend:

* ``DATABASE_URL`` set: PostgreSQL through asyncpg (:class:`PostgresDatabase`),
  LISTEN/NOTIFY for wake-ups unless it is a transaction pooler (port 6543);
  migrations applied at start only with ``DB_AUTO_MIGRATE=1``.
* else ``SUPABASE_URL`` + ``SUPABASE_SERVICE_ROLE_KEY``: Supabase's HTTP API
  (:class:`SupabaseDatabase`), polling at most 1 s apart; migrations are
  applied with the Supabase CLI or ``python -m shared.db migrate`` against
  the database's connection string.
* neither: an embedded PostgreSQL with its data in ``DATA_DIR/postgres``,
  migrated at every start, stopped on close.

Every backend implements the same typed :class:`Database` on the same SQL
functions (``supabase/migrations``). ``python -m shared.db migrate`` applies
the migrations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shared.breaker import CircuitBreaker
from shared.db.base import (
    JOBS_CHANNEL,
    OUTBOUND_CHANNEL,
    Database,
    Subscription,
    utc_now,
)
from shared.db.embedded import EmbeddedPostgres
from shared.db.errors import DatabaseOutcomeUnknown, DatabaseRejected, DatabaseUnavailable, MigrationError, SchemaMissing
from shared.db.errors import MIGRATE_FIX
from shared.db.migrations import MIGRATIONS_DIR, MigrationReport, apply_migrations, discover, migration_status
from shared.db.postgres import PostgresDatabase, database_breaker
from shared.db.records import (
    Account,
    AccountStatus,
    Backend,
    Chat,
    ChatKind,
    Direction,
    Enqueued,
    Heartbeat,
    InboundMessage,
    IngestImage,
    IngestRecorded,
    IngestStatus,
    Job,
    JobKind,
    JobStatus,
    MESSAGE_JOB_KINDS,
    KnownEntity,
    OutboundMessage,
    OutboundStatus,
    RecoveredTweet,
    Requeued,
    RequeueResult,
    RetryItemStatus,
    RetryRow,
    StatusCount,
    StoredMessage,
    Takeover,
    Tweet,
    TweetInserted,
    TweetStatus,
    UpdateState,
)

if TYPE_CHECKING:
    from shared.db.supabase_http import SupabaseDatabase

logger = logging.getLogger(__name__)

#: Where the embedded server keeps its data, under DATA_DIR (or the sandbox's directory).
EMBEDDED_SUBDIR = "postgres"


def embedded_dir(settings: Any, *, sandbox: bool | None = None) -> Path:
    """The embedded server's data directory: the sandbox's own under its world, else DATA_DIR/postgres.

    Sandbox and real mode never share state: a start with real Telegram
    credentials cannot mark the sandbox's accounts needs_login, and the
    sandbox's demo accounts never appear among the real ones. ``sandbox``
    overrides the settings' own mode (the migration command reads no
    Telegram settings and decides from the environment).
    """
    if sandbox is None:
        sandbox = bool(getattr(settings, "sandbox", False))
    if not sandbox:
        return Path(settings.data_dir) / EMBEDDED_SUBDIR
    world = getattr(settings, "sandbox_dir", None) or Path(settings.data_dir) / "sandbox"
    return Path(world) / EMBEDDED_SUBDIR


class DatabaseSettings(Protocol):
    """The settings :func:`open_database` reads (``shared.config.CommonSettings`` has them)."""

    data_dir: Path
    database_url: str | None
    supabase_url: str | None
    supabase_service_role_key: str | None
    db_auto_migrate: bool
    timeout_db: float
    db_breaker_recovery: float


async def open_database(
    settings: DatabaseSettings,
    *,
    breaker: CircuitBreaker | None = None,
    migrate: bool | None = None,
) -> Database:
    """Open the configured backend (see the module docstring) and log which one.

    Args:
        settings: DATABASE_URL, SUPABASE_URL/SUPABASE_SERVICE_ROLE_KEY, DATA_DIR,
            DB_AUTO_MIGRATE and TIMEOUT_DB.
        breaker: the breaker for calls (default: the process-wide ``database``,
            open for DB_BREAKER_RECOVERY seconds after failures in a row).
        migrate: force (True) or skip (False) migrations at start; default:
            always for the embedded server, DB_AUTO_MIGRATE elsewhere.

    Raises:
        ValueError: SUPABASE_URL without SUPABASE_SERVICE_ROLE_KEY.
        MigrationError: migrating at start failed (the database is closed again).
        OperationTimeout: the embedded server did not start in time.
    """
    timeout = float(settings.timeout_db)
    if breaker is None:
        breaker = database_breaker(recovery_timeout=float(settings.db_breaker_recovery))
    db: Database
    if settings.database_url:
        postgres = PostgresDatabase(settings.database_url, timeout=timeout, breaker=breaker)
        await postgres.open()
        db = postgres
        if migrate if migrate is not None else settings.db_auto_migrate:
            await _migrate_or_close(postgres, postgres.dsn)
        else:
            await _check_schema(postgres, dsn=postgres.dsn)
    elif settings.supabase_url:
        key = settings.supabase_service_role_key
        if not key:
            raise ValueError("SUPABASE_URL is set but SUPABASE_SERVICE_ROLE_KEY is not")
        if migrate if migrate is not None else settings.db_auto_migrate:
            logger.warning(
                "DB_AUTO_MIGRATE is ignored over Supabase's HTTP API: apply supabase/migrations with "
                "`supabase db push` or `DATABASE_URL=... ./start.sh db migrate`"
            )
        from shared.db.supabase_http import SupabaseDatabase  # httpx and supabase: only for this backend

        db = await SupabaseDatabase(settings.supabase_url, key, timeout=timeout, breaker=breaker).open()
        await _check_schema(db, dsn=None)
    else:
        embedded = EmbeddedPostgres(embedded_dir(settings))
        dsn = await embedded.start()
        postgres = PostgresDatabase(
            dsn,
            timeout=timeout,
            backend=Backend.EMBEDDED,
            breaker=breaker,
            on_close=embedded.stop,
            details=embedded.describe(),
        )
        await postgres.open()
        db = postgres
        if migrate is None or migrate:
            await _migrate_or_close(postgres, dsn)
    logger.info("database backend: %s", db.backend.value, extra={"database": db.describe()})
    return db


async def _check_schema(db: Database, *, dsn: str | None) -> None:
    """Name a database without our schema at once, instead of at the first call that needs it.

    Raises:
        SchemaMissing: ``db_ping`` does not exist: never migrated (the database is closed again).
    Over SQL (``dsn``) pending migrations are named in a warning. A database
    that does not answer now is left to the caller, who waits for it.
    """
    try:
        await db.ping()
    except SchemaMissing:
        await db.close()
        raise
    except Exception:
        return
    if dsn is None:
        return
    try:
        pending = [f"{m.version}_{m.name}" for m, applied in await migration_status(dsn, timeout=db.timeout) if not applied]
    except Exception as exc:
        logger.debug("could not list the applied migrations: %s", exc)
        return
    if pending:
        logger.warning(
            "the database misses %d migration(s): %s (%s)", len(pending), ", ".join(pending), MIGRATE_FIX
        )


async def _migrate_or_close(db: PostgresDatabase, dsn: str) -> None:
    try:
        report = await apply_migrations(dsn, timeout=max(60.0, db.timeout))
    except BaseException:
        await db.close()
        raise
    if report.applied:
        logger.info("migrations applied: %s", ", ".join(report.applied))


def __getattr__(name: str) -> Any:
    """``SupabaseDatabase`` on first use: its module imports httpx, which no other backend needs."""
    if name == "SupabaseDatabase":
        from shared.db.supabase_http import SupabaseDatabase

        return SupabaseDatabase
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Account",
    "AccountStatus",
    "Backend",
    "Chat",
    "ChatKind",
    "Database",
    "DatabaseOutcomeUnknown",
    "DatabaseRejected",
    "DatabaseSettings",
    "DatabaseUnavailable",
    "Direction",
    "EmbeddedPostgres",
    "Enqueued",
    "JOBS_CHANNEL",
    "Heartbeat",
    "InboundMessage",
    "IngestImage",
    "IngestRecorded",
    "IngestStatus",
    "Job",
    "JobKind",
    "JobStatus",
    "MESSAGE_JOB_KINDS",
    "KnownEntity",
    "MIGRATIONS_DIR",
    "MigrationError",
    "embedded_dir",
    "SchemaMissing",
    "MigrationReport",
    "OUTBOUND_CHANNEL",
    "OutboundMessage",
    "OutboundStatus",
    "PostgresDatabase",
    "RecoveredTweet",
    "Requeued",
    "RequeueResult",
    "RetryItemStatus",
    "RetryRow",
    "StatusCount",
    "StoredMessage",
    "Subscription",
    "SupabaseDatabase",
    "Takeover",
    "Tweet",
    "TweetInserted",
    "TweetStatus",
    "UpdateState",
    "apply_migrations",
    "database_breaker",
    "discover",
    "migration_status",
    "open_database",
    "utc_now",
]
