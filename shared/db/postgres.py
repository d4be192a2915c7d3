"""The asyncpg transport: a pool for calls, one extra connection for LISTEN.

Every call runs ``select * from <schema>.<function>(p_a => $1, ...)`` on a
pooled connection under TIMEOUT_DB (:func:`shared.timeouts.db_op`) and
through the ``database`` circuit breaker. A statement runs in its own
implicit transaction and asyncpg returns only after the server's
ReadyForQuery, so a result means the change is committed.

* A transaction pooler (Supabase's port 6543, or ``?pgbouncer=true``) keeps
  no session state: prepared statements are not cached
  (``statement_cache_size=0``) and LISTEN is not used; waiters poll.
* After PostgreSQL restarts, the pool's connections are dead: the first call
  that meets one expires every pooled connection so the next calls connect
  afresh (a read-only call is retried once at once), and while the server
  is down calls raise :class:`DatabaseUnavailable` until the breaker opens.
* The LISTEN connection is watched (termination callback and a periodic
  ``select 1``) and re-established with exponential backoff; while it is
  down, subscriptions poll at most ``poll_interval`` apart and all of them
  are woken when it comes back (notifications may have been missed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from shared.breaker import CircuitBreaker, registry
from shared.db.base import DEFAULT_POLL_INTERVAL, Database, Subscription, json_safe
from shared.db.errors import DatabaseOutcomeUnknown, DatabaseRejected, DatabaseUnavailable, schema_missing
from shared.db.records import Backend
from shared.errors import ErrorKind, classify_sqlstate, describe
from shared.retry import exponential_delay
from shared.timeouts import bounded, db_op

logger = logging.getLogger(__name__)

#: Supabase's transaction-mode pooler port.
TRANSACTION_POOLER_PORT = 6543

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")

# SQLSTATEs after which the connection itself is gone.
_CONNECTION_LOST_STATES = ("08", "57P01", "57P02", "57P03")


def database_breaker(*, recovery_timeout: float | None = None) -> CircuitBreaker:
    """The process-wide ``database`` breaker (shown in /status).

    Created on first use with 5 failures in a row and 30 s open (a bot may
    create it first with its own numbers); ``recovery_timeout``
    (DB_BREAKER_RECOVERY) replaces how long it stays open.
    """
    if recovery_timeout is None:
        return registry.get_or_create("database", failure_threshold=5, recovery_timeout=30.0)
    return registry.get_or_create_with_recovery("database", recovery_timeout, failure_threshold=5)


def parse_dsn(dsn: str) -> tuple[str, bool]:
    """Normalise a DATABASE_URL for asyncpg.

    Returns:
        The DSN without options asyncpg does not know (``pgbouncer``), and
        whether it points at a transaction pooler (port 6543 or
        ``pgbouncer=true``).
    """
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query, keep_blank_values=True)
    pooler = False
    kept = []
    for key, value in query:
        if key.lower() == "pgbouncer":
            pooler = pooler or value.lower() in ("1", "true", "yes", "on")
            continue
        kept.append((key, value))
    try:
        port = parts.port
    except ValueError:
        port = None
    if port == TRANSACTION_POOLER_PORT:
        pooler = True
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))
    return clean, pooler


def describe_dsn(dsn: str) -> dict[str, Any]:
    """Host, port, database and user of a DSN; never the password."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = parts.hostname or query.get("host") or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    return {
        "host": unquote(host),
        "port": port or (int(query["port"]) if query.get("port", "").isdigit() else 5432),
        "database": unquote(parts.path.lstrip("/")) or query.get("dbname") or "",
        "user": unquote(parts.username or query.get("user") or ""),
    }


def _dumps(value: Any) -> str:
    return json.dumps(json_safe(value), separators=(",", ":"), ensure_ascii=False)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_dumps, decoder=json.loads, schema="pg_catalog")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Our calls leave no session state behind: skip asyncpg's reset round trip."""


def _lost(exc: BaseException) -> bool:
    """True when ``exc`` says the connection itself broke (not the statement)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state.startswith(_CONNECTION_LOST_STATES)
    if isinstance(exc, (asyncpg.exceptions.DataError, asyncpg.exceptions.ClientConfigurationError)):
        return False
    return isinstance(exc, (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, ConnectionError, OSError))


def translate_postgres_error(exc: asyncpg.PostgresError) -> DatabaseUnavailable | DatabaseRejected:
    """A server error as our typed error: transient SQLSTATE classes are unavailable, the rest rejected."""
    state = getattr(exc, "sqlstate", None)
    message = getattr(exc, "message", None) or str(exc)
    if classify_sqlstate(state, message).kind is ErrorKind.TRANSIENT:
        return DatabaseUnavailable(f"database unavailable ({state}: {message})", code=state)
    missing = schema_missing(state, message)
    if missing is not None:
        return missing
    return DatabaseRejected(
        f"database rejected the call ({state}: {message})",
        code=state,
        detail=getattr(exc, "detail", None),
        hint=getattr(exc, "hint", None),
    )


def _not_sent(exc: BaseException) -> bool:
    """True when asyncpg refused to start the statement on a connection it found
    broken, so nothing reached the server (the statement may be re-run)."""
    text = str(exc)
    if type(exc) is asyncpg.exceptions.InternalClientError:
        return "another operation" in text
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in text


class _Stale(Exception):
    """Internal: the pooled connection broke; ``sent`` tells whether the statement may have run."""

    def __init__(self, *, sent: bool) -> None:
        super().__init__("stale connection")
        self.sent = sent


class PostgresDatabase(Database):
    """:class:`Database` on asyncpg (DATABASE_URL, or the embedded server).

    Args:
        dsn: a ``postgresql://`` URL (a unix socket via ``?host=/dir``).
        timeout: TIMEOUT_DB, the deadline of one call (also the connect timeout).
        backend: how /status names it (POSTGRES, or EMBEDDED for the local server).
        breaker: the circuit breaker calls go through (default: the
            process-wide ``database`` breaker).
        max_size: the pool's largest size.
        listen: use LISTEN/NOTIFY (default: unless a transaction pooler).
        poll_interval: longest wait between looks when notifications are down.
        schema: where the SQL functions live.
        keepalive_interval: how often the LISTEN connection is checked.
        reconnect_base_delay: first backoff of the LISTEN reconnects (doubles, capped).
        reconnect_max_delay: cap of that backoff.
        on_close: awaited after the pool is closed (stops an embedded server).
        details: extra fields for :meth:`describe` (e.g. the data directory).
    """

    def __init__(
        self,
        dsn: str,
        *,
        timeout: float = 10.0,
        backend: Backend = Backend.POSTGRES,
        breaker: CircuitBreaker | None = None,
        max_size: int = 10,
        listen: bool | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        schema: str = "public",
        keepalive_interval: float = 30.0,
        reconnect_base_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        on_close: Callable[[], Awaitable[None]] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(poll_interval=poll_interval)
        if not _IDENTIFIER.match(schema):
            raise ValueError(f"not a plain schema name: {schema!r}")
        self.backend = backend
        self.dsn, self.transaction_pooler = parse_dsn(dsn)
        self.timeout = timeout
        self.schema = schema
        self.max_size = max_size
        self.listen_enabled = (not self.transaction_pooler) if listen is None else listen
        self._breaker = breaker if breaker is not None else database_breaker()
        self._on_close = on_close
        self._details = dict(details or {})
        self._pool: asyncpg.Pool | None = None
        self._statements: dict[tuple[str, tuple[str, ...]], str] = {}
        self._listener = _Listener(
            self.dsn,
            timeout=timeout,
            keepalive_interval=keepalive_interval,
            base_delay=reconnect_base_delay,
            max_delay=reconnect_max_delay,
            poll_interval=poll_interval,
        )
        self._closed = False

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def open(self) -> PostgresDatabase:
        """Create the pool. Connections are made on first use, so this does not
        fail while the database is down (calls will, with DatabaseUnavailable)."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=0,
                max_size=self.max_size,
                init=_init_connection,
                reset=_no_reset,
                timeout=self.timeout,
                statement_cache_size=0 if self.transaction_pooler else 100,
                max_inactive_connection_lifetime=60.0,
            )
        self._breaker.set_probe(self.probe)
        return self

    async def probe(self) -> None:
        """``db_ping`` past the breaker: how the open breaker learns that the database is back."""
        await self._run("db_ping", self._statement("db_ping", ()), [], True)

    # --- the primitive -----------------------------------------------------

    def _statement(self, function: str, names: tuple[str, ...]) -> str:
        key = (function, names)
        sql = self._statements.get(key)
        if sql is None:
            for identifier in (function, *names):
                if not _IDENTIFIER.match(identifier):
                    raise DatabaseRejected(f"not a plain SQL identifier: {identifier!r}", code="42602")
            params = ", ".join(f"{name} => ${i}" for i, name in enumerate(names, start=1))
            sql = f"select * from {self.schema}.{function}({params})"
            self._statements[key] = sql
        return sql

    async def call(self, function: str, args: Mapping[str, Any], *, read_only: bool = False) -> list[dict[str, Any]]:
        """See :meth:`Database.call`.

        Raises:
            DatabaseUnavailable: cannot connect, or a transient server error.
            DatabaseOutcomeUnknown: the connection broke during a state-changing call.
            DatabaseRejected: the server refused the call (bad argument, constraint).
            OperationTimeout: past ``timeout``.
            CircuitOpenError: the breaker is open.
        """
        if self._closed:
            raise DatabaseUnavailable("the database object is closed")
        sql = self._statement(function, tuple(args))
        values = list(args.values())
        return await self._breaker.call(self._run, function, sql, values, read_only)

    async def _run(self, function: str, sql: str, values: list[Any], read_only: bool) -> list[dict[str, Any]]:
        for attempt in (1, 2):
            try:
                return await db_op(self._fetch(sql, values), self.timeout, function, outcome_unknown=not read_only)
            except _Stale as stale:
                if attempt == 1 and (read_only or not stale.sent):
                    logger.info("database connection was dead; retrying %s on a fresh one", function)
                    continue
                cause = stale.__cause__ or stale
                if read_only:
                    raise DatabaseUnavailable(f"database connection lost: {describe(cause)}") from cause
                raise DatabaseOutcomeUnknown(f"database connection lost during {function}: {describe(cause)}") from cause
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch(self, sql: str, values: list[Any]) -> list[dict[str, Any]]:
        pool = self._pool
        if pool is None:
            await self.open()
            pool = self._pool
            assert pool is not None
        try:
            conn = await pool.acquire()
        except asyncpg.PostgresError as exc:
            raise translate_postgres_error(exc) from exc
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {describe(exc)}") from exc
        try:
            rows = await conn.fetch(sql, *values)
        except Exception as exc:
            if _lost(exc):
                await pool.expire_connections()
                raise _Stale(sent=not _not_sent(exc)) from exc
            if isinstance(exc, asyncpg.PostgresError):
                raise translate_postgres_error(exc) from exc
            if isinstance(exc, (asyncpg.exceptions.DataError, asyncpg.exceptions.ClientConfigurationError, TypeError, ValueError)):
                raise DatabaseRejected(f"invalid arguments: {describe(exc)}") from exc
            raise
        finally:
            await self._release(pool, conn, self.timeout)  # asyncpg shields the release from cancellation
        return [dict(row) for row in rows]

    @staticmethod
    async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection, timeout: float) -> None:
        try:
            await pool.release(conn, timeout=timeout)
        except Exception:  # a broken connection is dropped by the pool anyway
            logger.debug("releasing a database connection failed", exc_info=True)

    # --- notifications -------------------------------------------------------

    async def subscribe(self, channel: str) -> Subscription:
        """A subscription to ``channel``; LISTEN is active when this returns
        (unless notifications are disabled or the database is unreachable,
        in which case the subscription polls)."""
        if not _IDENTIFIER.match(channel):
            raise ValueError(f"not a plain channel name: {channel!r}")
        sub = Subscription(
            channel,
            poll_interval=self.poll_interval,
            live=self._listener.is_live if self.listen_enabled else (lambda: False),
            on_close=self._listener.remove,
        )
        if self.listen_enabled:
            await self._listener.add(sub)
        return self._subscribed(sub)

    # --- lifecycle -------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._breaker.clear_probe(self.probe)
        for sub in self._default_subscriptions.values():
            sub.close()
        await self._listener.stop()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await bounded(pool.close(), self.timeout, "db.pool_close")
            except Exception:
                logger.warning("database pool did not close in time; terminating it")
                pool.terminate()
        if self._on_close is not None:
            await self._on_close()

    def describe(self) -> dict[str, Any]:
        pool = self._pool
        info: dict[str, Any] = {
            "backend": self.backend.value,
            **describe_dsn(self.dsn),
            "transaction_pooler": self.transaction_pooler,
            "notifications": self._listener.state if self.listen_enabled else "polling",
            "pool": {
                "size": pool.get_size() if pool is not None else 0,
                "idle": pool.get_idle_size() if pool is not None else 0,
                "max": self.max_size,
            },
            "breaker": self._breaker.state.value,
        }
        info.update(self._details)
        return info


class _Listener:
    """One connection that LISTENs for every subscribed channel, kept alive."""

    def __init__(
        self,
        dsn: str,
        *,
        timeout: float,
        keepalive_interval: float,
        base_delay: float,
        max_delay: float,
        poll_interval: float,
    ) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._keepalive = keepalive_interval
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._poll_interval = poll_interval
        self._subs: dict[str, set[Subscription]] = {}
        self._conn: asyncpg.Connection | None = None
        self._listening: set[str] = set()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self.reconnects = 0

    @property
    def state(self) -> str:
        if self._task is None:
            return "idle"
        return "listening" if self.is_live() else "reconnecting"

    def is_live(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.is_closed() and self._connected.is_set()

    async def add(self, sub: Subscription) -> None:
        self._subs.setdefault(sub.channel, set()).add(sub)
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="db-listener")
        # Wait (bounded) for the connection, then make sure this channel is listened to.
        try:
            await asyncio.wait_for(self._connected.wait(), timeout=self._timeout)
        except TimeoutError:
            logger.warning("LISTEN connection not ready; %s waiters poll until it is", sub.channel)
            return
        try:
            await self._listen(sub.channel)
        except Exception as exc:  # the run loop reconnects and listens again
            logger.warning("LISTEN %s failed: %s", sub.channel, describe(exc))
            self._lost.set()

    def remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is not None:
            subs.discard(sub)

    async def _listen(self, channel: str) -> None:
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed() or channel in self._listening:
                return
            await db_op(conn.add_listener(channel, self._on_notify), self._timeout, "listen")
            self._listening.add(channel)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        for sub in list(self._subs.get(channel, ())):
            sub.notify()

    def _on_terminate(self, conn: object) -> None:
        self._lost.set()

    def _wake_all(self) -> None:
        for subs in self._subs.values():
            for sub in list(subs):
                sub.notify()

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                await self._connect()
                attempt = 0
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    break
                attempt += 1
                self.reconnects += 1
                delay = exponential_delay(attempt, base=self._base_delay, cap=self._max_delay)
                logger.warning(
                    "LISTEN connection lost (%s); reconnecting in %.1fs, waiters poll meanwhile",
                    describe(exc),
                    delay,
                    extra={"attempt": attempt},
                )
                await self._drop()
                self._wake_all()
                await asyncio.sleep(delay)
        await self._drop()

    async def _connect(self) -> None:
        try:
            conn = await db_op(asyncpg.connect(self._dsn, timeout=self._timeout), self._timeout + 1, "listen_connect")
        except asyncpg.PostgresError as exc:
            raise translate_postgres_error(exc) from exc
        self._lost.clear()
        conn.add_termination_listener(self._on_terminate)
        async with self._lock:
            self._conn = conn
            self._listening = set()
        for channel in list(self._subs):
            await self._listen(channel)
        self._connected.set()
        # Notifications sent while we were away are lost: everyone looks again.
        self._wake_all()
        logger.info("LISTEN connection up", extra={"channels": sorted(self._listening)})

    async def _watch(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=self._keepalive)
            except TimeoutError:
                async with self._lock:
                    conn = self._conn
                    if conn is None:
                        raise DatabaseUnavailable("LISTEN connection is gone")
                    await db_op(conn.fetchval("select 1"), self._timeout, "listen_keepalive")
                continue
            raise DatabaseUnavailable("LISTEN connection terminated")

    async def _drop(self) -> None:
        self._connected.clear()
        async with self._lock:
            conn, self._conn = self._conn, None
            self._listening = set()
        if conn is not None and not conn.is_closed():
            try:
                await bounded(conn.close(timeout=self._timeout), self._timeout + 1, "db.listen_close")
            except Exception:
                conn.terminate()

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        await self._drop()
        self._wake_all()
