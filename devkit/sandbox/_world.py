"""The sandbox world: one SQLite file that several processes share.

``World`` is what tests, benchmarks and the CLI use to arrange and inspect
the world (create users and channels, push incoming messages, post images,
press buttons, set faults, read what each peer received). Clients made with
``SandboxClient`` talk to the same file through ``World.process``, which
runs Telegram's rules in ``_server``.

Blocking SQLite work for clients runs on one worker thread per ``World``
(never on the event loop); write transactions are short and use
``BEGIN IMMEDIATE`` with a busy timeout, so another process writing at the
same moment only delays a request, it never fails it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import random
import re
import sqlite3
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from telethon.crypto import AuthKey
from telethon.extensions import BinaryReader
from telethon.sessions import StringSession
from telethon.tl import types

from . import _faults, _media
from ._faults import AfterLoss, Fault, FaultKind
from ._server import AwaitCallback, Caller, Server, encode_result, method_name, request_peer_id
from ._store import (
    LOGIN_CODE,
    MediaInfo,
    Peer,
    PeerKind,
    RpcFailure,
    SandboxError,
    Store,
    UnknownPeerError,
    WorldMessage,
    new_auth_key,
    view_hash,
)

if TYPE_CHECKING:
    from ._client import SandboxSender

logger = logging.getLogger(__name__)

T = TypeVar("T")

DB_NAME = "world.sqlite3"
"""File name of the world database inside the world directory."""
DEFAULT_POLL_INTERVAL = 0.15
"""Seconds between checks for updates written by other processes."""
BUSY_TIMEOUT_MS = 15000
"""How long a write waits for another process's transaction."""
SCHEMA_VERSION = 1
"""Bump when schema.sql changes incompatibly."""

PeerRef = Peer | int | str


@dataclass(frozen=True)
class CallbackAnswer:
    """A bot's answer to an inline button press (``event.answer(...)``)."""

    query_id: int
    answered: bool
    message: str | None
    alert: bool
    url: str | None


@dataclass(frozen=True)
class DemoWorld:
    """What ``World.seed_demo`` created (idempotent)."""

    accounts: list[Peer]
    contacts: list[Peer]
    channel: Peer
    alert_bot: Peer
    reply_bot: Peer
    operators: Peer
    operator: Peer


@dataclass
class SessionInfo:
    """A client's auth key as the world knows it (returned on connect)."""

    auth_key: bytes
    key_id: int
    account_id: int | None
    fault: Fault | None
    min_seq: int


@dataclass
class Outcome:
    """What the world answered to one request."""

    result: Any = None
    error: tuple[int, str] | None = None
    fault: Fault | None = None
    callback_query: int | None = None
    account_id: int | None = None
    internal_error: BaseException | None = None


def key_id_of(auth_key: bytes) -> int:
    """The auth key id Telegram uses, as a signed 64-bit integer (SQLite's INTEGER)."""
    return struct.unpack("<q", struct.pack("<Q", AuthKey(auth_key).key_id))[0]


def _schema() -> str:
    return resources.files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")


def _resolve_all(items: list[tuple[asyncio.Future[Outcome], Outcome | BaseException]]) -> None:
    for future, outcome in items:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class _Poller:
    """One per world and event loop: pushes new update events to connected clients.

    Checks the world's event sequence every ``interval`` seconds (other
    processes) and at once when this process writes (``wake``). Cost when
    idle: one indexed SQLite read per interval for all clients together.
    """

    def __init__(self, world: World, loop: asyncio.AbstractEventLoop) -> None:
        self.world = world
        self.loop = loop
        self.senders: set[SandboxSender] = set()
        self.cursor = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, sender: SandboxSender, min_seq: int) -> None:
        """Start pushing updates to a sender (only events after ``min_seq``)."""
        self.senders.add(sender)
        if self._task is None or self._task.done():
            self.cursor = min_seq  # a running poller's cursor never moves back (no double delivery)
            self._task = self.loop.create_task(self._run(), name="sandbox-update-poller")

    def discard(self, sender: SandboxSender) -> None:
        self.senders.discard(sender)
        if not self.senders:
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        interval = self.world.poll_interval
        try:
            while self.senders:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
                self._wake.clear()
                if not self.senders or self.world.closed:
                    break
                accounts = {s.account_id for s in self.senders if s.account_id is not None}
                if not accounts:
                    continue
                try:
                    cursor, rows = await self.world.run(self.world._fetch_events, self.cursor, sorted(accounts))
                except Exception:  # noqa: BLE001 - keep delivering; the world may be busy or reset
                    logger.exception("sandbox: could not read updates from the world")
                    continue
                self.cursor = max(self.cursor, cursor)
                for seq, target, origin_key, payload in rows:
                    for sender in list(self.senders):
                        if sender.account_id == target and sender.key_id != origin_key and seq > sender.min_seq:
                            sender.deliver(payload)
        finally:
            self._task = None



#: Answers of Telegram's limits, counted per account (see World.limit_answers).
_LIMIT_ANSWERS = re.compile(r"^(FLOOD_WAIT|FLOOD_PREMIUM_WAIT|SLOWMODE_WAIT|PEER_FLOOD)(_\d+)?$")


def _count_limit_answer(store: Store, account_id: int | None, message: str) -> None:
    match = _LIMIT_ANSWERS.match(message or "")
    if match is not None:
        store.bump(f"limit_answers:{account_id or 0}:{match.group(1)}")

class World:
    """A sandbox Telegram world stored in ``<directory>/world.sqlite3``.

    The public methods are synchronous and take a few milliseconds (one short
    SQLite transaction); tests call them directly, production async code
    should wrap them in ``asyncio.to_thread``. Clients never block the event
    loop: their requests run on the world's own thread.

    Args:
        directory: Where the world lives; created when missing.
        clock: Wall clock for message dates and flood buckets.
        poll_interval: Seconds between checks for updates from other processes.

    Raises:
        SandboxError: When the directory cannot be used.
    """

    _open_worlds: weakref.WeakValueDictionary[Path, World] = weakref.WeakValueDictionary()
    _open_lock = threading.Lock()

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.directory = Path(directory).expanduser().resolve()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SandboxError(f"cannot create sandbox directory {self.directory}: {exc}") from exc
        self.path = self.directory / DB_NAME
        self.clock = clock
        self.poll_interval = poll_interval
        self._lock = threading.RLock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue_lock = threading.Lock()
        self._queue: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Outcome], int, Any, bool]] = []
        self._draining = False
        self._pollers: dict[asyncio.AbstractEventLoop, _Poller] = {}
        self._faults_version: str | None = None
        self._faults: list[Fault] = []
        self._closed = False
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                         timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise SandboxError(f"cannot open the sandbox world {self.path}: {exc}") from exc
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            with self._lock:
                self._conn.executescript(f"BEGIN IMMEDIATE;\n{_schema()}\nCOMMIT;")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._conn.close()
            raise SandboxError(f"cannot open the sandbox world {self.path}: {exc}") from exc
        with self._write() as store:
            version = store.meta("schema_version")
            if version is None:
                store.set_meta("schema_version", SCHEMA_VERSION)
            elif version != str(SCHEMA_VERSION):
                self._conn.close()
                raise SandboxError(f"the world in {self.directory} was made by another sandbox version "
                                   f"(schema {version}, need {SCHEMA_VERSION}); delete that directory")

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> World:
        """The shared ``World`` for a directory in this process (created on first use)."""
        path = Path(directory).expanduser().resolve()
        with cls._open_lock:
            world = cls._open_worlds.get(path)
            if world is None or world._closed:
                world = cls(path)
                cls._open_worlds[path] = world
            return world

    def close(self) -> None:
        """Close the database and the worker thread (clients must be disconnected first)."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._lock:
            self._conn.close()

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    def __repr__(self) -> str:
        return f"World({str(self.directory)!r})"

    # ------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _write(self) -> Iterator[Store]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            store = Store(self._conn, self.clock)
            try:
                yield store
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        if store.events_written:
            self._notify()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Store]:
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield Store(self._conn, self.clock)
            finally:
                self._conn.execute("COMMIT")

    def _ensure_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sandbox-world")
        return self._executor

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking world function on the world's worker thread.

        Raises:
            ConnectionError: When the world was closed.
        """
        if self._closed:
            raise ConnectionError("the sandbox world was closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._ensure_executor(), functools.partial(fn, *args, **kwargs))

    def poller(self) -> _Poller:
        """The update poller of the running event loop."""
        loop = asyncio.get_running_loop()
        for known in [p for p in self._pollers if p.is_closed()]:
            del self._pollers[known]
        poller = self._pollers.get(loop)
        if poller is None:
            poller = self._pollers[loop] = _Poller(self, loop)
        return poller

    def _notify(self) -> None:
        for loop, poller in list(self._pollers.items()):
            if not loop.is_closed() and poller.senders:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(poller.wake)

    def _fetch_events(self, cursor: int, accounts: list[int]) -> tuple[int, list[tuple[int, int, int | None, bytes]]]:
        """New pushed events for these accounts: (latest seq, [(seq, account, origin key, Updates bytes)])."""
        marks = ",".join("?" * len(accounts))
        columns = "e.seq, e.box, e.pts, e.pts_count, e.date, e.msg_id, e.entity_ids, e.payload, e.origin_key"
        with self._read() as store:
            conn = store.conn
            latest = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
            if latest <= cursor:
                return cursor, []
            rows = conn.execute(
                f"SELECT {columns}, e.box FROM events e WHERE e.seq > ? AND e.seq <= ? AND e.pushed = 1"
                f" AND e.box IN ({marks})"
                f" UNION ALL"
                f" SELECT {columns}, m.user_id FROM events e"
                f" JOIN members m ON m.chat_id = e.box JOIN peers p ON p.id = e.box"
                f" WHERE e.seq > ? AND e.seq <= ? AND e.pushed = 1 AND p.kind IN ('channel', 'megagroup')"
                f" AND m.user_id IN ({marks}) ORDER BY 1",
                (cursor, latest, *accounts, cursor, latest, *accounts),
            ).fetchall()
            out = []
            for row in rows:
                payload = store.render_event(row[1:8], row[9])
                if payload is not None:
                    out.append((row[0], row[9], row[8], payload))
        return latest, out

    # ----------------------------------------------------- client sessions

    def _open_session(self, auth_key: bytes | None, phone: str | None, bot_token: str | None) -> SessionInfo:
        """Find or register a client's auth key; log it in from phone/bot token when allowed."""
        with self._write() as store:
            conn = store.conn
            account: Peer | None = None
            if phone:
                account = store.peer_by_phone(phone)
                if account is None:
                    raise SandboxError(f"no sandbox account with phone {phone}")
            elif bot_token:
                account = store.peer_by_token(bot_token)
                if account is None:
                    raise SandboxError("no sandbox bot with that token")
            row = None
            if auth_key:
                key_id = key_id_of(auth_key)
                row = conn.execute("SELECT account_id FROM auth_keys WHERE key_id = ?", (key_id,)).fetchone()
            else:
                auth_key = new_auth_key()
                key_id = key_id_of(auth_key)
            if row is None:
                bound = account.id if account is not None and not account.login_required else None
                conn.execute(
                    "INSERT INTO auth_keys (key_id, auth_key, account_id, created) VALUES (?,?,?,?)",
                    (key_id, auth_key, bound, self.clock()),
                )
                account_id = bound
            else:
                account_id = row[0]
                if account is not None and account_id is not None and account_id != account.id:
                    logger.warning("sandbox: session belongs to account %s, not %s; using the session's", account_id, account.id)
            conn.execute("UPDATE auth_keys SET connected_at = ? WHERE key_id = ?", (self.clock(), key_id))
            fault = self._match_fault(store, "connect", None, account_id)
            min_seq = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        return SessionInfo(auth_key=auth_key, key_id=key_id, account_id=account_id, fault=fault, min_seq=min_seq)

    def _caller(self, store: Store, key_id: int) -> Caller:
        row = store.conn.execute("SELECT account_id, revoked_error FROM auth_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            return Caller(key_id=key_id, account_id=None, revoked="AUTH_KEY_UNREGISTERED")
        return Caller(key_id=key_id, account_id=row[0], revoked=row[1])

    def _bind_key(self, store: Store, key_id: int, account_id: int | None) -> None:
        if account_id is None:
            store.conn.execute(
                "UPDATE auth_keys SET account_id = NULL, revoked_error = 'AUTH_KEY_UNREGISTERED' WHERE key_id = ?",
                (key_id,),
            )
        else:
            store.conn.execute("UPDATE auth_keys SET account_id = ?, revoked_error = NULL WHERE key_id = ?",
                               (account_id, key_id))

    def process(self, key_id: int, request: Any, *, check_faults: bool = True) -> Outcome:
        """Answer one client request (blocking; for tools and tests without an event loop)."""
        return self._process_batch([(key_id, request, check_faults)])[0]

    async def submit(self, key_id: int, request: Any, *, check_faults: bool = True) -> Outcome:
        """Answer one client request on the world thread.

        Requests that arrive while the thread is busy are answered together in
        one transaction (one commit for the batch), which is what lets one
        process drive thousands of sends per second. A cancelled caller does
        not cancel the request: like a real network, it may still be done.
        """
        if self._closed:
            raise ConnectionError("the sandbox world was closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        with self._queue_lock:
            self._queue.append((loop, future, key_id, request, check_faults))
            start = not self._draining
            self._draining = True
        if start:
            self._ensure_executor().submit(self._drain)
        return await future

    def _drain(self) -> None:
        while True:
            with self._queue_lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._draining = False
                    return
            try:
                outcomes: list[Outcome | BaseException] = list(
                    self._process_batch([(key, request, check) for _, _, key, request, check in batch]))
            except BaseException as exc:  # noqa: BLE001 - hand the failure to every caller
                outcomes = [exc] * len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Outcome], Outcome | BaseException]]] = {}
            for (loop, future, *_), outcome in zip(batch, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, items in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(_resolve_all, items)

    def _process_batch(self, batch: list[tuple[int, Any, bool]]) -> list[Outcome]:
        raw: list[tuple[Any, Outcome]] = []
        with self._write() as store:
            for key_id, request, check_faults in batch:
                request_store = Store(store.conn, self.clock)
                raw.append(self._process_one(request_store, key_id, request, check_faults))
                store.events_written += request_store.events_written
        outcomes = []
        for (result, outcome), (_, request, _) in zip(raw, batch, strict=True):
            if result is not None:
                try:
                    data = encode_result(result)
                    with BinaryReader(data) as reader:
                        outcome.result = request.read_result(reader)
                except Exception as exc:  # noqa: BLE001 - a sandbox bug must reach the caller, not the thread
                    outcome.internal_error = exc
            outcomes.append(outcome)
        return outcomes

    def _process_one(self, store: Store, key_id: int, request: Any, check_faults: bool) -> tuple[Any, Outcome]:
        caller = self._caller(store, key_id)
        bound: list[int | None] = []

        def bind_key(key: int, account_id: int | None) -> None:
            self._bind_key(store, key, account_id)
            bound.append(account_id)

        server = Server(store, caller, bind_key=bind_key)
        fault = None
        if check_faults:
            try:
                fault = self._match_fault(store, method_name(request), None, caller.account_id,
                                          peer_of=lambda: request_peer_id(server, request))
            except Exception:  # noqa: BLE001 - a broken rule must not break every request
                logger.exception("sandbox: could not evaluate fault rules")
            if fault is not None and fault.kind is not FaultKind.ANSWER_LOST:
                if fault.error:
                    _count_limit_answer(store, caller.account_id, fault.error)
                return None, Outcome(fault=fault, account_id=caller.account_id)
        store.conn.execute("SAVEPOINT request")
        try:
            result = server.handle(request)
        except RpcFailure as failure:
            store.conn.execute("ROLLBACK TO request")
            store.conn.execute("RELEASE request")
            _count_limit_answer(store, caller.account_id, failure.message)
            return None, Outcome(error=(failure.code, failure.message), fault=fault, account_id=caller.account_id)
        except Exception as exc:  # noqa: BLE001 - isolate a sandbox bug to its request
            logger.exception("sandbox: internal error answering %s", type(request).__name__)
            store.conn.execute("ROLLBACK TO request")
            store.conn.execute("RELEASE request")
            return None, Outcome(internal_error=exc, account_id=caller.account_id)
        store.conn.execute("RELEASE request")
        account_id = bound[-1] if bound else caller.account_id
        if isinstance(result, AwaitCallback):
            return None, Outcome(callback_query=result.query_id, fault=fault, account_id=account_id)
        return result, Outcome(fault=fault, account_id=account_id)

    # --------------------------------------------------------------- faults

    def _load_faults(self, store: Store) -> list[Fault]:
        version = store.meta("faults_version", "0")
        if version != self._faults_version:
            rows = store.conn.execute(
                "SELECT id, kind, method, peer_id, account_id, remaining, ms, jitter_ms, error, error_code, seconds,"
                " then_do FROM faults WHERE remaining IS NULL OR remaining > 0 ORDER BY id"
            ).fetchall()
            self._faults = [
                Fault(id=r[0], kind=FaultKind(r[1]), method=r[2], peer_id=r[3], account_id=r[4], remaining=r[5],
                      ms=r[6], jitter_ms=r[7], error=r[8], error_code=r[9], seconds=r[10], then=AfterLoss(r[11]))
                for r in rows
            ]
            self._faults_version = version
        return self._faults

    def _match_fault(
        self, store: Store, method: str, peer_id: int | None, account_id: int | None,
        *, peer_of: Callable[[], int | None] | None = None,
    ) -> Fault | None:
        faults = self._load_faults(store)
        if not faults:
            return None
        if peer_of is not None and any(f.peer_id is not None for f in faults):
            peer_id = peer_of()
        for fault in faults:
            if not fault.matches(method, peer_id, account_id):
                continue
            if fault.remaining is not None:
                taken = store.conn.execute(
                    "UPDATE faults SET remaining = remaining - 1, hits = hits + 1 WHERE id = ? AND remaining > 0",
                    (fault.id,),
                ).rowcount
                if not taken:
                    continue
                store.bump("faults_version")
            else:
                store.conn.execute("UPDATE faults SET hits = hits + 1 WHERE id = ?", (fault.id,))
            return fault
        return None

    def set_fault(
        self,
        kind: FaultKind | str,
        *,
        method: str = "*",
        peer: PeerRef | None = None,
        account: PeerRef | None = None,
        count: int | None = None,
        ms: float = 0.0,
        jitter_ms: float = 0.0,
        error: str | None = None,
        error_code: int | None = None,
        seconds: int = 0,
        then: AfterLoss | str = AfterLoss.HANG,
    ) -> Fault:
        """Add a fault rule; it applies to running clients in every process at once.

        Args:
            kind: latency, hang, drop, error, flood or answer_lost.
            method: ``SendMessage``, ``send_message``, a glob like ``send*``, ``connect``, or ``*`` (all but connect).
            peer: Only requests aimed at this peer.
            account: Only requests from this account.
            count: How many requests it hits (None: until cleared).
            ms: Latency, milliseconds.
            jitter_ms: Extra random latency, 0..jitter_ms milliseconds.
            error: For ``error``: an RPC message (``RPC_CALL_FAIL``) or Telethon class (``ChatWriteForbiddenError``).
            error_code: Override the RPC error code (derived from the error otherwise).
            seconds: For ``flood``: the wait Telegram asks for.
            then: For ``answer_lost``: ``hang`` or ``drop`` after storing the message.

        Returns:
            The stored rule.

        Raises:
            SandboxError: For a bad combination (an error fault without an error...).
            UnknownPeerError: When peer or account does not exist.
        """
        kind = FaultKind(kind)
        then = AfterLoss(then)
        message: str | None = None
        if kind is FaultKind.ERROR:
            if not error:
                raise SandboxError("an error fault needs error=... (e.g. RPC_CALL_FAIL or ChatWriteForbiddenError)")
            message = _faults.error_message_for(error, seconds=seconds)
        elif kind is FaultKind.FLOOD:
            message = f"FLOOD_WAIT_{int(seconds)}"
        if message is not None and error_code is None:
            error_code = _faults.error_code_for(message)
        if count is not None and count < 1:
            raise SandboxError("count must be at least 1 (or None for unlimited)")
        with self._write() as store:
            peer_id = store.find_peer(peer).id if peer not in (None, "*") else None
            account_id = store.find_peer(account).id if account not in (None, "*") else None
            cursor = store.conn.execute(
                "INSERT INTO faults (kind, method, peer_id, account_id, remaining, ms, jitter_ms, error, error_code,"
                " seconds, then_do, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (kind.value, _faults.normalize_method(method), peer_id, account_id, count, float(ms),
                 float(jitter_ms), message, error_code, int(seconds), then.value, self.clock()),
            )
            fault_id = cursor.lastrowid
            store.bump("faults_version")
        return Fault(id=int(fault_id or 0), kind=kind, method=_faults.normalize_method(method), peer_id=peer_id,
                     account_id=account_id, remaining=count, ms=float(ms), jitter_ms=float(jitter_ms), error=message,
                     error_code=error_code, seconds=int(seconds), then=then)

    def clear_faults(self, fault_id: int | None = None) -> int:
        """Remove one fault rule, or all of them. Returns how many were removed."""
        with self._write() as store:
            if fault_id is None:
                removed = store.conn.execute("DELETE FROM faults").rowcount
            else:
                removed = store.conn.execute("DELETE FROM faults WHERE id = ?", (fault_id,)).rowcount
            store.bump("faults_version")
        return removed

    def faults(self) -> list[dict[str, Any]]:
        """Every fault rule with its hit count (including used-up ones)."""
        with self._read() as store:
            rows = store.conn.execute(
                "SELECT id, kind, method, peer_id, account_id, remaining, ms, jitter_ms, error, error_code, seconds,"
                " then_do, hits FROM faults ORDER BY id"
            ).fetchall()
        keys = ("id", "kind", "method", "peer_id", "account_id", "remaining", "ms", "jitter_ms", "error",
                "error_code", "seconds", "then", "hits")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def set_flood_limit(self, scope: str, *, rate: float, burst: float = 1.0, account: PeerRef | None = None) -> int:
        """Add a flood limit on sends (SendMessage, SendMedia): a token bucket.

        ``account`` and ``chat`` buckets answer FLOOD_WAIT_<seconds> when empty,
        as Telegram's flood limits do; a ``non_contacts`` bucket answers
        PEER_FLOOD (Telegram's spam limit), for sends to users who are not the
        account's contacts only.

        Args:
            scope: ``account`` (all sends of an account, to any chat), ``chat`` (an
                account's sends to one chat) or ``non_contacts`` (an account's sends
                to users outside its contacts).
            rate: Messages per second refilled.
            burst: Bucket size.
            account: Only this account (default: every account).

        Returns:
            The limit's id.

        Raises:
            SandboxError: For a bad scope or rate.
        """
        if scope not in ("account", "chat", "non_contacts"):
            raise SandboxError("scope must be 'account', 'chat' or 'non_contacts'")
        if rate <= 0 or burst < 1:
            raise SandboxError("rate must be > 0 and burst >= 1")
        with self._write() as store:
            account_id = store.find_peer(account).id if account is not None else None
            cursor = store.conn.execute(
                "INSERT INTO flood_limits (scope, account_id, rate, burst) VALUES (?,?,?,?)",
                (scope, account_id, float(rate), float(burst)),
            )
            return int(cursor.lastrowid or 0)

    def set_difference_limits(self, *, max_pts: int | None = None, max_age: float | None = None) -> None:
        """When GetDifference answers differenceTooLong (channelDifferenceTooLong for a channel).

        Args:
            max_pts: a client state more than this many pts behind is too long (default 100000).
            max_age: an account state older than this many seconds is too long (default 7 days).
        """
        with self._write() as store:
            if max_pts is not None:
                store.set_meta("difference_too_long_pts", int(max_pts))
            if max_age is not None:
                store.set_meta("difference_too_long_seconds", float(max_age))

    def access_hash(self, peer: PeerRef, *, viewer: PeerRef) -> int:
        """The access hash ``viewer`` is given for ``peer`` (hashes are per account, as on Telegram)."""
        with self._read() as store:
            target = store.find_peer(peer)
            seen_by = store.find_peer(viewer)
        return view_hash(target.access_hash, seen_by.id)

    def limit_answers(self, account: PeerRef | None = None) -> dict[str, int]:
        """How often Telegram's limits answered a request, by error: ``FLOOD_WAIT``,
        ``FLOOD_PREMIUM_WAIT``, ``SLOWMODE_WAIT``, ``PEER_FLOOD`` (of one account, or all).

        Every such answer counts, from a flood limit or a fault rule alike: a
        client that keeps trying during a wait shows here.
        """
        with self._read() as store:
            rows = store.conn.execute("SELECT key, value FROM meta WHERE key LIKE 'limit_answers:%'").fetchall()
            account_id = store.find_peer(account).id if account is not None else None
        counts: dict[str, int] = {}
        for key, value in rows:
            _, owner, error = key.split(":", 2)
            if account_id is None or owner == str(account_id):
                counts[error] = counts.get(error, 0) + int(value)
        return counts

    def clear_flood_limits(self) -> None:
        """Remove every flood limit and empty the buckets."""
        with self._write() as store:
            store.conn.execute("DELETE FROM flood_limits")
            store.conn.execute("DELETE FROM flood_buckets")

    # ---------------------------------------------------------------- peers

    def peer(self, ref: PeerRef) -> Peer:
        """Find a peer by ``@username``, username, ``+phone``, id, marked id or exact title.

        Raises:
            UnknownPeerError: When nothing matches.
        """
        with self._read() as store:
            return store.find_peer(ref)

    def has_account(self, phone: str | None) -> bool:
        """Whether ``phone`` belongs to a user of this world (an account a client can log into)."""
        if not phone:
            return False
        with self._read() as store:
            peer = store.peer_by_phone(phone)
        return peer is not None and peer.kind is PeerKind.USER

    def peers(self, kind: PeerKind | str | None = None) -> list[Peer]:
        """All peers, optionally of one kind."""
        with self._read() as store:
            return store.all_peers(PeerKind(kind) if kind else None)

    def create_user(
        self,
        username: str | None = None,
        *,
        phone: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
        about: str | None = None,
        login_required: bool = False,
    ) -> Peer:
        """Create a user. A user with a phone is an account a client can log into.

        Args:
            login_required: The account starts logged out: clients must ``sign_in`` (code ``12345``).

        Raises:
            SandboxError: When the username or phone is taken.
        """
        with self._write() as store:
            peer = store.create_peer(PeerKind.USER, username=username, phone=phone,
                                     first_name=first_name or (username or "User").capitalize(),
                                     last_name=last_name, about=about)
            if login_required:
                peer = store.update_peer(peer, login_required=1)
            return peer

    def create_bot(self, username: str, *, token: str | None = None, first_name: str | None = None) -> Peer:
        """Create a bot account; clients log in with its token (generated unless given)."""
        with self._write() as store:
            next_id = int(store.meta("next_peer_id", "1000001") or 1000001)
            token = token or f"{next_id}:SANDBOX{random.getrandbits(64):016x}"
            return store.create_peer(PeerKind.BOT, username=username, bot_token=token,
                                     first_name=first_name or username)

    def create_group(self, title: str, members: Iterable[PeerRef] = (), *, creator: PeerRef | None = None) -> Peer:
        """Create a basic group (``types.Chat``) with these members."""
        with self._write() as store:
            creator_peer = store.find_peer(creator) if creator is not None else None
            group = store.create_peer(PeerKind.GROUP, title=title, creator_id=creator_peer.id if creator_peer else None)
            if creator_peer:
                store.add_member(group.id, creator_peer.id, role="creator")
            for member in members:
                user = store.find_peer(member)
                if user.id != (creator_peer.id if creator_peer else None):
                    store.add_member(group.id, user.id)
            return group

    def create_channel(
        self,
        title: str,
        *,
        username: str | None = None,
        members: Iterable[PeerRef] = (),
        admins: Iterable[PeerRef] = (),
        creator: PeerRef | None = None,
        megagroup: bool = False,
    ) -> Peer:
        """Create a broadcast channel (or a supergroup with ``megagroup=True``)."""
        with self._write() as store:
            creator_peer = store.find_peer(creator) if creator is not None else None
            channel = store.create_peer(PeerKind.MEGAGROUP if megagroup else PeerKind.CHANNEL, username=username,
                                        title=title, creator_id=creator_peer.id if creator_peer else None)
            if creator_peer:
                store.add_member(channel.id, creator_peer.id, role="creator")
            for admin in admins:
                store.add_member(channel.id, store.find_peer(admin).id, role="admin")
            for member in members:
                user = store.find_peer(member)
                if store.membership(channel.id, user.id) is None:
                    store.add_member(channel.id, user.id)
            return channel

    def add_member(self, chat: PeerRef, user: PeerRef, *, role: str = "member", can_write: bool = True) -> None:
        """Add (or update) a member of a group or channel."""
        with self._write() as store:
            chat_peer = store.find_peer(chat)
            if chat_peer.kind.is_user:
                raise SandboxError(f"{chat_peer.ref} is not a group or channel")
            store.add_member(chat_peer.id, store.find_peer(user).id, role=role, can_write=can_write)

    def remove_member(self, chat: PeerRef, user: PeerRef) -> None:
        """Remove a member from a group or channel."""
        with self._write() as store:
            store.conn.execute("DELETE FROM members WHERE chat_id = ? AND user_id = ?",
                               (store.find_peer(chat).id, store.find_peer(user).id))

    def set_can_write(self, chat: PeerRef, user: PeerRef, allowed: bool) -> None:
        """Allow or forbid a member to write (CHAT_WRITE_FORBIDDEN when forbidden)."""
        with self._write() as store:
            chat_peer = store.find_peer(chat)
            user_peer = store.find_peer(user)
            member = store.membership(chat_peer.id, user_peer.id)
            store.add_member(chat_peer.id, user_peer.id, role=member[0] if member else "member", can_write=allowed)

    def add_contact(self, owner: PeerRef, contact: PeerRef, *, mutual: bool = True) -> None:
        """Put ``contact`` into ``owner``'s contacts (both ways when mutual)."""
        with self._write() as store:
            a, b = store.find_peer(owner), store.find_peer(contact)
            pairs = [(a.id, b.id)] + ([(b.id, a.id)] if mutual else [])
            store.conn.executemany("INSERT OR IGNORE INTO contacts (owner_id, contact_id) VALUES (?, ?)", pairs)

    def block(self, user: PeerRef, blocked: PeerRef) -> None:
        """``user`` blocks ``blocked``: sends from ``blocked`` to ``user`` fail with USER_IS_BLOCKED."""
        with self._write() as store:
            store.conn.execute("INSERT OR IGNORE INTO blocks (user_id, blocked_id) VALUES (?, ?)",
                               (store.find_peer(user).id, store.find_peer(blocked).id))

    def unblock(self, user: PeerRef, blocked: PeerRef) -> None:
        """Undo ``block``."""
        with self._write() as store:
            store.conn.execute("DELETE FROM blocks WHERE user_id = ? AND blocked_id = ?",
                               (store.find_peer(user).id, store.find_peer(blocked).id))

    def deactivate(self, user: PeerRef) -> None:
        """Delete a user's account: sends to it fail with INPUT_USER_DEACTIVATED, its own clients are banned."""
        with self._write() as store:
            store.update_peer(store.find_peer(user), deactivated=1)

    # ------------------------------------------------------------- sessions

    def session_string(self, account: PeerRef) -> str:
        """A Telethon ``StringSession`` string already logged into ``account``."""
        with self._write() as store:
            peer = store.find_peer(account)
            if not peer.kind.is_user:
                raise SandboxError(f"{peer.ref} is not an account")
            key = new_auth_key()
            store.conn.execute(
                "INSERT INTO auth_keys (key_id, auth_key, account_id, created) VALUES (?,?,?,?)",
                (key_id_of(key), key, peer.id, self.clock()),
            )
        session = StringSession()
        session.set_dc(2, "127.0.0.1", 443)
        session.auth_key = AuthKey(key)
        return session.save()

    def logout(self, account: PeerRef, *, error: str = "AUTH_KEY_UNREGISTERED", require_login: bool = True) -> int:
        """Kill every session of an account: its clients' requests fail with ``error``.

        Args:
            error: The RPC error those clients get: AUTH_KEY_UNREGISTERED, SESSION_REVOKED,
                AUTH_KEY_DUPLICATED, USER_DEACTIVATED_BAN...
            require_login: New clients must ``sign_in`` again (no automatic login from the phone).

        Returns:
            How many sessions were killed.
        """
        message = _faults.error_message_for(error)
        with self._write() as store:
            peer = store.find_peer(account)
            killed = store.conn.execute(
                "UPDATE auth_keys SET revoked_error = ? WHERE account_id = ? AND revoked_error IS NULL",
                (message, peer.id),
            ).rowcount
            if require_login:
                store.update_peer(peer, login_required=1)
            return killed

    def require_login(self, account: PeerRef, required: bool = True) -> None:
        """Whether new clients of this account start logged out (``get_me()`` is None until ``sign_in``)."""
        with self._write() as store:
            store.update_peer(store.find_peer(account), login_required=int(required))

    @property
    def login_code(self) -> str:
        """The code ``sign_in`` accepts for every sandbox account."""
        return LOGIN_CODE

    # ------------------------------------------------------------- messages

    def _media_for(
        self, store: Store, image: _media.ImageKind | str | bytes | None, *, as_document: bool | None,
        mime_type: str | None, file_name: str | None,
    ) -> tuple[int | None, Any]:
        if image is None:
            return None, None
        if isinstance(image, (bytes, bytearray, memoryview)):
            return store.media_from_bytes(bytes(image), as_document=as_document, mime_type=mime_type,
                                          file_name=file_name)
        seed = int(store.bump("media_seed"))
        return store.media_from_kind(_media.ImageKind(image), as_document=as_document, seed=seed % 7)

    def send_incoming(
        self,
        sender: PeerRef,
        to: PeerRef,
        text: str = "",
        *,
        gap: bool = False,
        reply_to: int | None = None,
        image: _media.ImageKind | str | bytes | None = None,
        as_document: bool | None = None,
        buttons: Iterable[tuple[str, bytes | str]] | None = None,
    ) -> WorldMessage:
        """A world user sends a message (to an account, a user, a group or a channel).

        Args:
            sender: The world user or bot who writes.
            to: Who receives it: a user/bot (private chat), a group or a channel.
            gap: Store it but never push the update (only catch_up/GetDifference or history finds it).
            reply_to: Id of the replied message in the sender's view of the chat.
            image: Attach a generated image kind or raw bytes.
            buttons: Inline callback buttons, (text, data) pairs.

        Returns:
            The copy in the receiver's box (the group's or channel's own copy for chats).

        Raises:
            UnknownPeerError: For unknown peers.
            SandboxError: When the sender is not a member of the group or channel.
        """
        with self._write() as store:
            sender_peer = store.find_peer(sender)
            chat = store.find_peer(to)
            if not chat.kind.is_user and store.membership(chat.id, sender_peer.id) is None:
                raise SandboxError(f"{sender_peer.ref} is not a member of {chat.ref}")
            media_id, media = self._media_for(store, image, as_document=as_document, mime_type=None, file_name=None)
            markup = None
            if buttons:
                markup = types.ReplyInlineMarkup(rows=[types.KeyboardButtonRow(buttons=[
                    types.KeyboardInlineButton(text, types.InlineButtonTypeCallback(
                        data.encode() if isinstance(data, str) else bytes(data)))
                    for text, data in buttons
                ])])
            copies = store.send_message(sender_peer, chat, text=text, media=media, media_id=media_id,
                                        reply_to=reply_to, reply_markup=markup, pushed=not gap)
            mine = next((c for c in copies if c.box == chat.id), copies[-1])
            row = store.message_row(mine.box, mine.id)
            assert row is not None
            return store.world_message(row)

    def post_to_channel(
        self,
        channel: PeerRef,
        image: _media.ImageKind | str | bytes | None = None,
        *,
        text: str = "",
        gap: bool = False,
        as_document: bool | None = None,
        mime_type: str | None = None,
        file_name: str | None = None,
        author: PeerRef | None = None,
    ) -> WorldMessage:
        """Post to a channel: a text, a generated image kind or raw bytes, with a caption.

        Args:
            image: An ``ImageKind`` (jpeg, png, webp, large, bomb, corrupt, pdf, huge) or bytes.
            as_document: Force a document (True) or a compressed photo (False); default per kind.
            author: Who posts (default: the channel's creator, or the channel itself).
            gap: Store it but never push the update.

        Returns:
            The channel's message.
        """
        with self._write() as store:
            chat = store.find_peer(channel)
            if not chat.kind.is_channel:
                raise SandboxError(f"{chat.ref} is not a channel")
            poster = store.find_peer(author) if author is not None else (store.peer(chat.creator_id) if chat.creator_id else chat)
            assert poster is not None
            media_id, media = self._media_for(store, image, as_document=as_document, mime_type=mime_type,
                                              file_name=file_name)
            copies = store.send_message(poster, chat, text=text, media=media, media_id=media_id, pushed=not gap)
            row = store.message_row(copies[0].box, copies[0].id)
            assert row is not None
            return store.world_message(row)

    def press(
        self,
        user: PeerRef,
        *,
        chat: PeerRef | None = None,
        message_id: int | None = None,
        data: bytes | str | None = None,
        text: str | None = None,
    ) -> int:
        """A user presses an inline button; the bot receives ``events.CallbackQuery``.

        Args:
            user: Who presses.
            chat: Where the message is: the bot (private chat), a group or a channel. Default: the
                chat of the user's latest message with buttons.
            message_id: The message id in the user's view; default: the latest one with buttons there.
            data: The button's callback data; or give ``text``, the button label. Default: the first button.

        Returns:
            The callback query id (see ``callback_answer``).

        Raises:
            SandboxError: When there is no such message or button.
        """
        with self._write() as store:
            presser = store.find_peer(user)
            chat_peer = store.find_peer(chat) if chat is not None else None
            candidates = self._button_messages(store, presser, chat_peer, message_id)
            if not candidates:
                raise SandboxError(f"{presser.ref} has no message with inline buttons"
                                   + (f" in {chat_peer.ref}" if chat_peer else ""))
            row = candidates[0]
            message = store.world_message(row)
            wanted: bytes | None = data.encode() if isinstance(data, str) else data
            if text is not None:
                match = [b for b in message.buttons if b[0] == text]
                if not match:
                    raise SandboxError(f"no button labelled {text!r}; buttons: {[b[0] for b in message.buttons]}")
                wanted = match[0][1]
            holder = store.peer(row[2])
            assert holder is not None
            try:
                return store.create_callback(presser, holder, row[1], wanted)
            except RpcFailure as failure:
                raise SandboxError(f"cannot press that button: {failure.message}") from failure

    def _button_messages(self, store: Store, user: Peer, chat: Peer | None, message_id: int | None) -> list[tuple]:
        columns = ("box, id, chat_id, sender_id, out, date, text, random_id, media_id, reply_to, origin, pts, edited,"
                   " deleted, tl")
        boxes = [user.id] + [c.id for c in store.channels_of(user.id)]
        found = []
        for box in boxes:
            where = "box = ? AND deleted = 0 AND out = 0"
            args: list[Any] = [box]
            if chat is not None:
                where += " AND chat_id = ?"
                args.append(chat.id)
            if message_id is not None:
                where += " AND id = ?"
                args.append(message_id)
            for row in store.conn.execute(f"SELECT {columns} FROM messages WHERE {where} ORDER BY date DESC, id DESC",
                                          args).fetchall():
                if store.world_message(row).buttons:
                    found.append(row)
                    break
        found.sort(key=lambda r: (r[5], r[1]), reverse=True)
        return found

    def callback_answer(self, query_id: int) -> CallbackAnswer | None:
        """The bot's answer to a press, or None for an unknown query."""
        with self._read() as store:
            row = store.callback_answer(query_id)
        if row is None:
            return None
        return CallbackAnswer(query_id=query_id, answered=bool(row[0]), message=row[1], alert=bool(row[2]), url=row[3])

    def _messages(self, where: str, args: tuple) -> list[WorldMessage]:
        with self._read() as store:
            rows = store.conn.execute(
                "SELECT box, id, chat_id, sender_id, out, date, text, random_id, media_id, reply_to, origin, pts,"
                f" edited, deleted, tl FROM messages WHERE {where} ORDER BY box, id",
                args,
            ).fetchall()
            return [store.world_message(r) for r in rows]

    def received(self, peer: PeerRef, *, sender: PeerRef | None = None, include_deleted: bool = True) -> list[WorldMessage]:
        """Everything a peer received, in order, duplicates visible: the ground truth.

        For a user or bot: the incoming messages in its box. For a group or
        channel: every message posted there.
        """
        with self._read() as store:
            target = store.find_peer(peer)
            sender_id = store.find_peer(sender).id if sender is not None else None
        where = "box = ?" + (" AND out = 0" if target.kind.is_user else "")
        args: tuple = (target.id,)
        if sender_id is not None:
            where += " AND sender_id = ?"
            args += (sender_id,)
        if not include_deleted:
            where += " AND deleted = 0"
        return self._messages(where, args)

    def sent(self, account: PeerRef, *, to: PeerRef | None = None) -> list[WorldMessage]:
        """What an account sent (its own copies), optionally to one chat."""
        with self._read() as store:
            peer = store.find_peer(account)
            chat_id = store.find_peer(to).id if to is not None else None
        if chat_id is not None and self.peer(chat_id).kind.is_channel:
            return self._messages("box = ? AND sender_id = ?", (chat_id, peer.id))
        where = "box = ? AND out = 1" + (" AND chat_id = ?" if chat_id is not None else "")
        return self._messages(where, (peer.id,) + ((chat_id,) if chat_id is not None else ()))

    def history(self, viewer: PeerRef, chat: PeerRef) -> list[WorldMessage]:
        """The messages of a chat as ``viewer`` sees them (its box), oldest first."""
        with self._read() as store:
            viewer_peer = store.find_peer(viewer)
            chat_peer = store.find_peer(chat)
        if chat_peer.kind.is_channel:
            return self._messages("box = ?", (chat_peer.id,))
        return self._messages("box = ? AND chat_id = ?", (viewer_peer.id, chat_peer.id))

    def file_bytes(self, media_id: int) -> bytes:
        """The whole stored file of a photo or document (generated for lazy ones), for comparisons.

        Raises:
            SandboxError: For an unknown media id.
        """
        with self._read() as store:
            row = store.media_row(media_id)
            if row is None:
                raise SandboxError(f"no media {media_id}")
            data, _, _ = store.read_file(media_id, row[2], 0, row[5])
        return data

    def media(self, media_id: int) -> MediaInfo | None:
        """Metadata of a stored photo or document."""
        with self._read() as store:
            return store.media_info(media_id)

    # -------------------------------------------------------------- world

    def reset(self) -> None:
        """Empty the world. Running clients' sessions become unknown (AUTH_KEY_UNREGISTERED)."""
        with self._write() as store:
            for table in ("peers", "members", "contacts", "blocks", "auth_keys", "messages", "events", "media",
                          "uploads", "faults", "flood_limits", "flood_buckets", "callbacks"):
                store.conn.execute(f"DELETE FROM {table}")
            store.conn.execute("DELETE FROM meta WHERE key NOT IN ('faults_version', 'schema_version')")
            store.bump("faults_version")
            store.bump("epoch")

    def seed_demo(self) -> DemoWorld:
        """Create the demo world (idempotent): two accounts, contacts, a channel, two bots, an operator chat.

        Accounts: ``+15550100001`` (@demo_one) and ``+15550100002`` (@demo_two), login code ``12345``.
        Contacts: @alice, @bob, @carol. Channel: @demo_photos. Bots: @demo_alert_bot
        (token ``1000001:SANDBOX-alert``) and @demo_reply_bot (token ``1000002:SANDBOX-reply``).
        Operator chat: the group "Demo Operators" with @operator and the alert bot.
        """

        def get_or(ref: str, make: Callable[[], Peer]) -> Peer:
            try:
                return self.peer(ref)
            except UnknownPeerError:
                return make()

        accounts = [
            get_or("@demo_one", lambda: self.create_user("demo_one", phone="+15550100001", first_name="Demo",
                                                         last_name="One")),
            get_or("@demo_two", lambda: self.create_user("demo_two", phone="+15550100002", first_name="Demo",
                                                         last_name="Two")),
        ]
        contacts = [
            get_or(f"@{name}", lambda name=name, phone=phone: self.create_user(name, phone=phone))
            for name, phone in (("alice", "+15550101001"), ("bob", "+15550101002"), ("carol", "+15550101003"))
        ]
        for account in accounts:
            for contact in contacts:
                self.add_contact(account, contact)
        operator = get_or("@operator", lambda: self.create_user("operator", phone="+15550109999",
                                                                first_name="Operator"))
        alert_bot = get_or("@demo_alert_bot", lambda: self.create_bot("demo_alert_bot", token="1000001:SANDBOX-alert",
                                                                      first_name="Demo Alerts"))
        reply_bot = get_or("@demo_reply_bot", lambda: self.create_bot("demo_reply_bot", token="1000002:SANDBOX-reply",
                                                                      first_name="Demo Reply Guy"))
        channel = get_or("@demo_photos", lambda: self.create_channel(
            "Demo Photos", username="demo_photos", creator=operator, members=[*accounts, *contacts]))
        operators = get_or("Demo Operators", lambda: self.create_group(
            "Demo Operators", [alert_bot, reply_bot, accounts[0]], creator=operator))
        return DemoWorld(accounts=accounts, contacts=contacts, channel=channel, alert_bot=alert_bot,
                         reply_bot=reply_bot, operators=operators, operator=operator)

    def summary(self) -> dict[str, Any]:
        """Counts for status pages: peers by kind, messages, active faults and flood limits, limit answers."""
        with self._read() as store:
            conn = store.conn
            kinds = dict(conn.execute("SELECT kind, count(*) FROM peers GROUP BY kind").fetchall())
            messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            faults = conn.execute("SELECT count(*) FROM faults WHERE remaining IS NULL OR remaining > 0").fetchone()[0]
            flood_limits = conn.execute("SELECT count(*) FROM flood_limits").fetchone()[0]
            accounts = conn.execute(
                "SELECT count(*) FROM peers WHERE (phone IS NOT NULL AND kind = 'user') OR kind = 'bot'"
            ).fetchone()[0]
        return {"directory": str(self.directory), "peers": kinds, "accounts": accounts, "messages": messages,
                "active_faults": faults, "flood_limits": flood_limits, "limit_answers": self.limit_answers()}

    def dump(self) -> str:
        """A JSON summary (for the CLI)."""
        return json.dumps(self.summary(), indent=2, sort_keys=True)


__all__ = ["CallbackAnswer", "DemoWorld", "Outcome", "SessionInfo", "World"]
