"""``python -m shared.db migrate | status``: apply or list the migrations.

Targets DATABASE_URL (or ``--database-url``); with neither it and
SUPABASE_URL unset, the embedded server under DATA_DIR (started for the
command and stopped after). Supabase's HTTP API cannot run DDL: with only
SUPABASE_URL set, pass the project's connection string (the direct one or
the session pooler, port 5432) as ``--database-url``, or use
``supabase db push``.

Exit codes: 0 done, 1 a migration failed or the database is unreachable,
2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from shared.cli import ArgumentParser, run_cli
from shared.config import CommonSettings, load_or_exit, read_environment
from shared.db import embedded_dir
from shared.db.embedded import EmbeddedPostgres
from shared.db.errors import MigrationError
from shared.db.migrations import MIGRATIONS_DIR, apply_migrations, migration_status
from shared.db.postgres import parse_dsn
from shared.runtime import configure_logging


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="./start.sh db",
        description="Database migrations.",
        epilog="Example: ./start.sh db migrate --dry-run. Manual: docs/architecture.md#data-postgresql-and-supabase",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("migrate", "apply pending migrations"), ("status", "list migrations and whether each is applied")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--database-url", help="PostgreSQL URL (default: DATABASE_URL, else the embedded server)")
        command.add_argument("--dir", type=Path, default=MIGRATIONS_DIR, help="migrations directory")
        if name == "migrate":
            command.add_argument("--dry-run", action="store_true", help="show what would be applied")
    return parser


async def _run(args: argparse.Namespace, settings: CommonSettings) -> int:
    url = args.database_url or settings.database_url
    embedded: EmbeddedPostgres | None = None
    if not url:
        if settings.supabase_url:
            sys.stderr.write(
                "shared.db: SUPABASE_URL is set but migrations need SQL access: pass --database-url "
                "(the project's direct or session-pooler connection string) or run `supabase db push`\n"
            )
            return 2
        env = read_environment()
        sandbox = not (env.get("TELEGRAM_API_ID") or env.get("TELEGRAM_API_HASH"))
        embedded = EmbeddedPostgres(embedded_dir(settings, sandbox=sandbox))
        url = await embedded.start()
        print(f"embedded PostgreSQL in {embedded.data_dir}")
    else:
        url, pooler = parse_dsn(url)
        if pooler:
            print("note: this is a transaction pooler (port 6543); the direct or session connection is safer for DDL")
    try:
        if args.command == "status":
            for migration, applied in await migration_status(url, directory=args.dir, timeout=settings.timeout_db):
                print(f"{'applied' if applied else 'pending'}  {migration.version}_{migration.name}")
            return 0
        report = await apply_migrations(url, directory=args.dir, dry_run=args.dry_run)
        verb = "would apply" if args.dry_run else "applied"
        for version in report.applied:
            print(f"{verb} {version}")
        for version in report.changed_since_applied:
            print(f"warning: {version} changed after it was applied (not re-run)")
        print(f"{len(report.applied)} {verb}, {len(report.already_applied)} already applied")
        return 0
    except MigrationError as exc:
        sys.stderr.write(f"shared.db: {exc}\n")
        return 1
    finally:
        if embedded is not None:
            await embedded.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors end as one line (see shared.cli), never a traceback."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    settings = load_or_exit(CommonSettings)
    configure_logging(settings, stream=sys.stderr, quiet=True)
    return asyncio.run(_run(args, settings))


if __name__ == "__main__":
    raise SystemExit(main())
