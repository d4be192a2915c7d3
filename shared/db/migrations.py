"""Apply ``supabase/migrations/<YYYYMMDDHHMMSS>_<name>.sql`` in order, once each.

Applied versions are recorded where the Supabase CLI records them
(``supabase_migrations.schema_migrations``: version, name, statements), so
``supabase db push`` and ``python -m shared.db migrate`` agree on what is
applied. Each file runs in its own transaction under an advisory lock, so
two processes migrating at once apply each file once, and a failing file
leaves nothing half-applied. Running again applies nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from shared.db.errors import MigrationError
from shared.db.statements import statements
from shared.errors import describe
from shared.timeouts import db_op

logger = logging.getLogger(__name__)

#: Where the migration files live.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "supabase" / "migrations"

_FILE_NAME = re.compile(r"^(?P<version>\d{14})_(?P<name>[A-Za-z0-9_]+)\.sql$")

# Any constant: the key of the advisory lock migrators take.
_LOCK_KEY = 4_815_162_342

#: The bookkeeping's SQL (shared/db/sql/migrations.sql).
_SQL = statements("migrations")


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class MigrationReport:
    """What a run did: versions applied now and versions found applied already."""

    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)
    changed_since_applied: list[str] = field(default_factory=list)


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files of ``directory``, oldest first.

    Raises:
        MigrationError: a ``.sql`` file is not named ``<14 digits>_<name>.sql``,
            or two files share a version.
    """
    found: dict[str, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named <YYYYMMDDHHMMSS>_<name>.sql")
        version = match["version"]
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is used by {found[version].path.name} too")
        found[version] = Migration(version=version, name=match["name"], path=path)
    return [found[v] for v in sorted(found)]


async def applied_versions(conn: asyncpg.Connection, *, timeout: float = 30.0) -> dict[str, str | None]:
    """Applied versions and the SQL recorded for each (None when not recorded)."""
    exists = await db_op(
        conn.fetchval(_SQL["bookkeeping_exists"]), timeout, "migrations_check"
    )
    if not exists:
        return {}
    rows = await db_op(
        conn.fetch(_SQL["applied_versions"]),
        timeout,
        "migrations_list",
    )
    return {r["version"]: ("".join(r["statements"]) if r["statements"] else None) for r in rows}


async def apply_migrations(
    dsn: str,
    *,
    directory: Path = MIGRATIONS_DIR,
    timeout: float = 300.0,
    dry_run: bool = False,
) -> MigrationReport:
    """Apply every migration of ``directory`` not yet recorded in the database at ``dsn``.

    Args:
        dsn: a ``postgresql://`` URL with the right to create tables, roles and functions.
        directory: the migration files.
        timeout: the deadline of one file (and of connecting).
        dry_run: report what would be applied, change nothing.

    Raises:
        MigrationError: a file is misnamed, could not be applied (its SQL error
            is in the message; nothing of that file was kept), or the
            database could not be reached.
    """
    migrations = discover(directory)
    report = MigrationReport()
    try:
        conn = await db_op(asyncpg.connect(dsn, timeout=timeout, statement_cache_size=0), timeout + 1, "migrate_connect")
    except Exception as exc:
        raise MigrationError(f"cannot connect to the database to migrate: {describe(exc)}") from exc
    try:
        if not dry_run:
            async with conn.transaction():
                await db_op(conn.execute(_SQL["lock"], _LOCK_KEY), timeout, "migrate_lock")
                await db_op(conn.execute(_SQL["bookkeeping"]), timeout, "migrate_bookkeeping")
        recorded = await applied_versions(conn, timeout=timeout)
        for migration in migrations:
            if migration.version in recorded:
                report.already_applied.append(migration.version)
                if recorded[migration.version] not in (None, migration.sql):
                    report.changed_since_applied.append(migration.version)
                    logger.warning(
                        "migration %s_%s changed after it was applied; changes to applied files are not re-run",
                        migration.version,
                        migration.name,
                    )
                continue
            if dry_run:
                report.applied.append(migration.version)
                continue
            if await _apply_one(conn, migration, timeout):
                report.applied.append(migration.version)
                logger.info("applied migration %s_%s", migration.version, migration.name)
            else:
                report.already_applied.append(migration.version)
    finally:
        try:
            await db_op(conn.close(timeout=timeout), timeout + 1, "migrate_close")
        except Exception:
            conn.terminate()
    return report


async def _apply_one(conn: asyncpg.Connection, migration: Migration, timeout: float) -> bool:
    """Apply one file in its own transaction; False when another process applied it first."""
    sql = migration.sql
    try:
        async with conn.transaction():
            await db_op(conn.execute(_SQL["lock"], _LOCK_KEY), timeout, "migrate_lock")
            done = await db_op(
                conn.fetchval(_SQL["is_applied"], migration.version),
                timeout,
                "migrate_check",
            )
            if done:
                return False
            await db_op(conn.execute(sql), timeout, "migrate_apply")
            await db_op(
                conn.execute(
                    _SQL["record_applied"],
                    migration.version,
                    migration.name,
                    [sql],
                ),
                timeout,
                "migrate_record",
            )
    except asyncpg.PostgresError as exc:
        where = f" (line {exc.position})" if getattr(exc, "position", None) else ""
        raise MigrationError(f"migration {migration.path.name} failed{where}: {describe(exc)}") from exc
    return True


async def migration_status(dsn: str, *, directory: Path = MIGRATIONS_DIR, timeout: float = 30.0) -> list[tuple[Migration, bool]]:
    """Every migration file and whether it is applied.

    Raises:
        MigrationError: the database could not be reached.
    """
    migrations = discover(directory)
    try:
        conn = await db_op(asyncpg.connect(dsn, timeout=timeout, statement_cache_size=0), timeout + 1, "migrate_connect")
    except Exception as exc:
        raise MigrationError(f"cannot connect to the database: {describe(exc)}") from exc
    try:
        recorded = await applied_versions(conn, timeout=timeout)
    finally:
        conn.terminate()
    return [(m, m.version in recorded) for m in migrations]
