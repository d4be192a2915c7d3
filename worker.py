"""worker.py: the Telegram account worker.

It logs in the Telegram user accounts of ``telegram_accounts``, stores their
incoming messages, sends the queued outbound messages exactly once, pages
through chat histories on request and runs scheduled message jobs. With no
Telegram credentials and no database configured it runs on an embedded
PostgreSQL and the local Telegram sandbox, and says so loudly.

The story, top to bottom:

1. settings and the Telegram clients (real or sandbox);
2. sync: a ``NewMessage`` handler plus a reconciler for updates that never came;
3. outbound: claim under lease, send with the row's own ``random_id``, mark;
4. history: page through ``get_messages(offset_id=...)``, saving the cursor;
5. jobs: scheduled sends, edits, deletes, mark-read;
6. the process: runtime, loops, heartbeat, shutdown;
7. the command line: run, login, accounts, fleet, send, messages, history,
   schedule, jobs, requeue, rotate-key.

Exactly once, in short: every message is in the database before anything is
sent; its ``random_id`` is fixed at enqueue; every attempt, including one
after a timeout whose outcome is unknown, uses that ``random_id``, so Telegram
drops a second copy (RANDOM_ID_DUPLICATE means "already sent"); a claim is
fenced by its lease token, so a worker that lost its lease cannot report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import re
import socket
import sys
import time
import unicodedata
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.alerts import AlertType
from shared.breaker import CircuitOpenError
from shared import metrics, tracing
from shared.cli import CliError, bot_parser
from shared.config import WorkerSettings
from shared.db import JOBS_CHANNEL, Database, open_database
from shared.db.records import (
    Account,
    AccountStatus,
    ChatKind,
    Direction,
    InboundMessage,
    MESSAGE_JOB_KINDS,
    Job,
    JobKind,
    JobStatus,
    OutboundMessage,
    OutboundStatus,
    SendHold,
    SendHoldKind,
)
from shared.errors import ErrorKind, LimitScope, PermanentError, UnresolvedPeerError, classify, describe, is_unresolved_peer
from shared.health import TEMP_SUBDIR, run_checks
from shared.logs import mask_phone
from shared.ratelimit import KeyedBuckets
from shared.retry_queue import doubling_delay
from shared.runtime import BotRuntime, StartupFailed, bot_main
from shared.cipher import SessionCipher
from shared.storage import Storage, open_storage
from shared.telegram import (
    SANDBOX_INGEST_ACCOUNT,
    AccountConnection,
    AccountPool,
    ConnectionPolicy,
    FleetPolicy,
    KeyCheck,
    check_session_key,
    client_factory,
    difference_watch,
    session_cipher,
)
from shared.text import unstorable_reason
from shared.timeouts import OperationTimeout, telegram_op

if TYPE_CHECKING:  # Telethon is imported where a Telegram object is made or looked at: the commands start without it
    from telethon import types

logger = logging.getLogger("worker")

#: How long a cycle waits for its claimed batch before it claims again (chats go on in the background).
CHAT_PATIENCE = 1.0

#: A send (or lookup) pending this long is suspect: the account's connection check decides whether it is lost.
STUCK_SEND_AFTER = 5.0

#: How often the outbound loop re-reads every account's stored flood holds (new connections: at once).
HOLDS_REFRESH = 10.0

#: Telegram's limits, checked before a message is sent so bad input fails at once with a clear reason.
TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
FILE_LIMIT = 2 * 1024**3


# --- 1. settings and Telegram clients ----------------------------------------------


def utf16_len(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def storage_key(attachment: Any) -> str | None:
    """The storage key of an attachment given as ``{"key": ...}`` or ``"storage:KEY"``; None for a path."""
    if isinstance(attachment, dict) and attachment.get("key"):
        return str(attachment["key"])
    if isinstance(attachment, str) and attachment.startswith("storage:"):
        return attachment.removeprefix("storage:")
    return None


def check_attachment(path: Path, attachment: Any) -> None:
    """Refuse, with a reason, a file Telegram would refuse."""
    if not path.is_file():
        raise PermanentError(f"attachment not found: {attachment}")
    size = path.stat().st_size
    if size > FILE_LIMIT:
        raise PermanentError(f"attachment too large: {size} bytes, Telegram accepts at most {FILE_LIMIT}")
    if size == 0:
        raise PermanentError(f"attachment is empty: {attachment}")


def check_message(text: str | None, attachments: Sequence[Any]) -> None:
    """Refuse, naming the limit and the measured length, a message Telegram would refuse.

    The same checks run at enqueue (the ``outbound_enqueue`` SQL function and
    ``send``) and before each send, so bad input never waits in the queue.
    """
    text = text or ""
    refused = unstorable_reason(text)  # a NUL or a lone surrogate: first, it cannot even be measured
    if refused is not None:
        raise PermanentError(refused)
    if not text.strip() and not attachments:
        raise PermanentError("empty message: no text (or only whitespace) and no attachment")
    if len(attachments) > 1:
        raise PermanentError(f"{len(attachments)} attachments: Telegram sends at most 1 attachment per message")
    limit = CAPTION_LIMIT if attachments else TEXT_LIMIT
    length = utf16_len(text)
    if length > limit:
        what = "caption" if attachments else "text"
        raise PermanentError(f"{what} too long: {length} UTF-16 code units, Telegram accepts at most {limit}")


def _joins_previous(char: str) -> bool:
    """True when ``char`` belongs to the grapheme cluster before it (a cut before it would split one)."""
    code = ord(char)
    return (
        unicodedata.combining(char) != 0
        or unicodedata.category(char) in ("Mn", "Me", "Mc")
        or code == 0x200D  # zero-width joiner
        or 0xFE00 <= code <= 0xFE0F  # variation selectors
        or 0x1F3FB <= code <= 0x1F3FF  # skin tone modifiers
        or 0xE0020 <= code <= 0xE007F  # tag characters (subdivision flags)
    )


def _is_regional_indicator(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF


def _cluster_boundary(text: str, index: int) -> bool:
    """True when cutting ``text`` before ``index`` splits no grapheme cluster."""
    if index <= 0 or index >= len(text):
        return True
    if _joins_previous(text[index]) or text[index - 1] == "\u200d":
        return False
    if _is_regional_indicator(text[index]) and _is_regional_indicator(text[index - 1]):
        # A flag is a pair of regional indicators: cut only after an even run of them.
        run = 0
        while index - 1 - run >= 0 and _is_regional_indicator(text[index - 1 - run]):
            run += 1
        return run % 2 == 0
    return True


_SENTENCE_END = re.compile(r"[.!?…。！？]['\")\]]*\s+|\n")


def split_text(text: str, limit: int = TEXT_LIMIT, *, first_limit: int | None = None) -> list[str]:
    """``text`` in consecutive parts of at most ``limit`` UTF-16 code units; joined, they are ``text``.

    Each cut is at the last paragraph break that fits, else the last sentence
    end, else the last space, else the last grapheme-cluster boundary (never
    inside a surrogate pair, an emoji sequence or a letter with its marks).
    The break's whitespace stays at the end of the part before it.
    ``first_limit`` caps the first part (a caption).
    """
    parts: list[str] = []
    rest = text
    cap = first_limit or limit
    while utf16_len(rest) > cap:
        # The longest prefix that fits, in code points.
        fit, units = 0, 0
        for char in rest:
            units += 2 if ord(char) > 0xFFFF else 1
            if units > cap:
                break
            fit += 1
        window = rest[:fit]
        cut = 0
        paragraph = window.rfind("\n\n")
        if paragraph > 0:
            cut = paragraph + 2
            while cut < fit and rest[cut] == "\n":
                cut += 1
        if not cut:
            ends = [m.end() for m in _SENTENCE_END.finditer(window)]
            cut = ends[-1] if ends else 0
        if not cut:
            space = max(window.rfind(" "), window.rfind("\t"), window.rfind("\n"))
            cut = space + 1 if space >= 0 else 0
        if not cut:
            cut = fit
            while cut > 1 and not _cluster_boundary(rest, cut):
                cut -= 1
        parts.append(rest[:cut])
        rest = rest[cut:]
        cap = limit
    if rest or not parts:
        parts.append(rest)
    return parts


async def seed_sandbox_accounts(db: Database, world: Any, cipher: SessionCipher) -> list[str]:
    """Put the sandbox's demo accounts into ``telegram_accounts`` (once)."""
    demo = world.seed_demo()
    existing = {a.label for a in await db.list_accounts()}
    labels = []
    for peer in demo.accounts:
        label = peer.username or str(peer.id)
        labels.append(label)
        if label not in existing:
            session = cipher.encrypt(world.session_string(peer.phone))
            await db.upsert_account(label, phone=peer.phone, session=session, status=AccountStatus.ACTIVE)
    return labels


def parse_peer(peer: str | int) -> str | int:
    """What Telethon resolves: a numeric id as an int, a username or phone as text."""
    text = str(peer).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def chat_kind(entity: Any) -> ChatKind:
    from telethon import types

    if isinstance(entity, types.User):
        return ChatKind.BOT if entity.bot else ChatKind.USER
    if isinstance(entity, (types.Chat, types.ChatForbidden)):
        return ChatKind.GROUP
    if isinstance(entity, (types.Channel, types.ChannelForbidden)):
        return ChatKind.SUPERGROUP if getattr(entity, "megagroup", False) else ChatKind.CHANNEL
    return ChatKind.UNKNOWN


def media_descriptor(message: types.Message) -> list[dict[str, Any]]:
    """What an incoming message carries, without downloading it."""
    from telethon import types

    media = message.media
    if media is None:
        return []
    if isinstance(media, types.MessageMediaPhoto) and media.photo is not None:
        return [{"type": "photo", "id": media.photo.id}]
    if isinstance(media, types.MessageMediaDocument) and media.document is not None:
        doc = media.document
        return [{"type": "document", "id": doc.id, "mime_type": doc.mime_type, "size": doc.size}]
    return [{"type": type(media).__name__}]


def inbound_from(message: types.Message, chat: Any | None) -> InboundMessage:
    from telethon import utils

    title = getattr(chat, "title", None) or " ".join(
        part for part in (getattr(chat, "first_name", None), getattr(chat, "last_name", None)) if part
    )
    reply = message.reply_to
    return InboundMessage(
        chat_id=utils.get_peer_id(message.peer_id),
        telegram_message_id=message.id,
        direction=Direction.OUTBOUND if message.out else Direction.INBOUND,
        sender_id=message.sender_id,
        text=message.message or None,
        attachments=tuple(media_descriptor(message)),
        reply_to=getattr(reply, "reply_to_msg_id", None),
        sent_at=message.date,
        chat_kind=chat_kind(chat) if chat is not None else None,
        chat_title=title or None,
        chat_username=getattr(chat, "username", None),
    )


class EntityCache:
    """Resolved peers per account (an LRU), so a send costs no resolve round trip.

    A peer is resolved from the account's session, which keeps every chat the
    account has ever seen (in the database, across restarts). A numeric id it
    has not seen is not refused at once: ``refresh`` (the dialog scan) runs
    first, since the chat may be a dialog the session has not read yet, and
    only when the id is still unknown after it does the peer fail, with
    :class:`UnresolvedPeerError` saying what to do.
    """

    def __init__(
        self, *, timeout: float, size: int = 10_000, refresh: Callable[[AccountConnection], Awaitable[None]] | None = None
    ) -> None:
        self.timeout = timeout
        self.size = size
        self.refresh = refresh
        self._cache: OrderedDict[tuple[int, str], Any] = OrderedDict()

    async def resolve(self, connection: AccountConnection, peer: str | int) -> Any:
        key = (connection.id, str(peer))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        target = parse_peer(peer)
        try:
            entity = await self._lookup(connection, target)
        except ValueError as exc:
            if not isinstance(target, int) or not is_unresolved_peer(exc):
                raise
            if self.refresh is not None:
                logger.info("chat %s is not known to %s yet; reading the dialogs first", peer, connection.label)
                await self.refresh(connection)
            try:
                entity = await self._lookup(connection, target)
            except ValueError as again:
                if is_unresolved_peer(again):
                    raise UnresolvedPeerError(peer) from again
                raise
        self._cache[key] = entity
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return entity

    async def _lookup(self, connection: AccountConnection, target: str | int) -> Any:
        return await telegram_op(connection.live_client().get_input_entity(target), self.timeout, "get_input_entity", detail=str(target))

    def forget(self, account_id: int, peer: str | int) -> None:
        self._cache.pop((account_id, str(peer)), None)


# --- 2. sync: store what arrives, and what never arrived as an update ----------------


class Sync:
    """Inbound messages into the database, idempotently.

    The ``NewMessage`` handler stores what Telegram pushes; because pushed
    updates can silently stop (see docs on Telethon), the reconciler re-reads
    recently active chats from their cursor with ``iter_messages(min_id=...)``.
    The unique (account, chat, message id) key makes every path store a
    message once.

    After every (re)connect, ``catch_up()`` asks Telegram for the difference
    since the update state the session saved in the database. When there is
    no saved state, or Telegram answers that the gap is too long to fill, the
    dialog scan reads every dialog whose newest message is past its stored
    cursor (a chat never stored included), page by page under deadlines.
    """

    #: Messages read from a chat that was never stored, newest first (its older past is a history job).
    NEW_CHAT_MESSAGES = 100
    #: Pages of 100 messages read per chat in one scan; the reconciler goes on from the cursor.
    SCAN_PAGES_PER_CHAT = 10
    #: The longest the peer refresh waits between two scans of one account.
    PEER_REFRESH_INTERVAL = 60.0
    #: Dialogs the peer refresh walks at most (it runs inside a send, which has a deadline too).
    PEER_REFRESH_DIALOGS = 2000
    #: Dialogs older than the saved state by more than this had nothing new (clock margin).
    SCAN_MARGIN = timedelta(minutes=5)

    def __init__(self, *, db: Database, runtime: BotRuntime, settings: WorkerSettings) -> None:
        self.db = db
        self.runtime = runtime
        self.settings = settings
        self.handler_errors = 0
        self.reconciled = 0
        self.scans = 0
        self.scanned = 0
        self._last_reconcile: dict[int, float] = {}
        self._scan_locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._scanned_at: dict[int, float] = {}
        self._scan_due: dict[int, datetime | None] = {}
        self._scan_not_before: dict[int, float] = {}

    async def after_connect(self, connection: AccountConnection) -> None:
        """``catch_up()`` from the saved state, then the dialog scan when needed, then a reconcile pass.

        The handler is already attached (:meth:`attach` runs before the client
        connects, since Telethon catches up as it connects).
        """
        client = connection.live_client()
        watch = difference_watch(client)
        try:
            await telegram_op(client.catch_up(), self.settings.timeout_telegram_entity, "catch_up")
        except Exception as exc:
            logger.warning("catch_up failed for %s (%s); the dialog scan covers it", connection.label, describe(exc))
        settled = await watch.wait(self.settings.timeout_loop_cycle / 2)
        session = client.session
        had_state = bool(getattr(session, "had_state", False))
        reason = None
        if not had_state:
            reason = "no saved update state"
        elif watch.too_long:
            reason = "Telegram answered that the gap is too long"
        elif not settled:
            reason = "the catch-up did not finish in time"
        watch.too_long = False
        if reason is not None:
            state_date = getattr(session, "state_date", None) if had_state else None
            self._scan_due[connection.id] = state_date - self.SCAN_MARGIN if state_date else None
            logger.info("%s: %s; reading the dialogs for what was missed", connection.label, reason, extra={"account": connection.label})
            await self._run_due_scan(connection)
        await self.reconcile_account(connection)

    async def _run_due_scan(self, connection: AccountConnection) -> None:
        if connection.id not in self._scan_due or time.monotonic() < self._scan_not_before.get(connection.id, 0.0):
            return
        since = self._scan_due[connection.id]
        try:
            await self.scan_dialogs(connection, since=since)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = classify(exc)
            if verdict.kind is ErrorKind.ACCOUNT_DEAD:
                await connection.handle_error(exc)
                return
            # Chats already read moved their cursors: the next attempt goes on where this one stopped.
            wait = verdict.retry_after or 0.0
            self._scan_not_before[connection.id] = time.monotonic() + wait
            logger.warning(
                "dialog scan of %s stopped (%s); it goes on in %.0fs", connection.label, verdict.reason, max(wait, 10.0)
            )
            return
        self._scan_due.pop(connection.id, None)

    async def scan_dialogs(
        self, connection: AccountConnection, *, since: datetime | None = None, read: bool = True, limit: int | None = None
    ) -> int:
        """Walk the account's dialogs (``get_dialogs``, 100 a page, each page under a deadline).

        Every dialog teaches the session its chat's access hash. With ``read``,
        each dialog whose newest message is past its stored cursor is read from
        the cursor (a chat never stored: its newest ``NEW_CHAT_MESSAGES``).
        Dialogs older than ``since`` (pinned ones aside), or ``limit`` dialogs,
        end the walk. Returns how many messages were new.
        """
        async with self._scan_locks[connection.id]:
            client = connection.live_client()
            self.scans += 1
            dialogs = client.iter_dialogs(limit=limit)
            page: list[Any] = []
            stored = walked = 0
            while True:
                self.runtime.watchdog.ping("sync")
                try:
                    dialog = await telegram_op(anext(dialogs), self.settings.timeout_telegram_entity, "get_dialogs")
                except StopAsyncIteration:
                    break
                walked += 1
                if since is not None and not dialog.pinned and dialog.date is not None and dialog.date < since:
                    break
                page.append(dialog)
                if len(page) >= 100:
                    stored += await self._read_dialogs(connection, page) if read else 0
                    page = []
            stored += await self._read_dialogs(connection, page) if read and page else 0
            self._scanned_at[connection.id] = time.monotonic()
            session = client.session
            if hasattr(session, "flush"):
                await session.flush()  # the chats just learned resolve after a restart too
        self.scanned += stored
        logger.info(
            "dialog scan of %s: %d dialog(s), %d new message(s)", connection.label, walked, stored, extra={"account": connection.label}
        )
        return stored

    async def _read_dialogs(self, connection: AccountConnection, dialogs: list[Any]) -> int:
        cursors = await self.db.chat_cursors(connection.id, [d.id for d in dialogs])
        stored = 0
        for dialog in dialogs:
            top = dialog.message.id if dialog.message is not None else 0
            cursor = cursors.get(dialog.id)
            if top <= (cursor or 0):
                continue
            self.runtime.watchdog.ping("sync")
            stored += await self._read_chat(connection, dialog.input_entity, dialog.entity, cursor)
        return stored

    async def _read_chat(self, connection: AccountConnection, peer: Any, entity: Any, cursor: int | None) -> int:
        """Store a chat's messages after ``cursor`` (None: its newest few). Returns how many were new."""
        from telethon import types

        client = connection.live_client()
        stored = 0
        for _ in range(self.SCAN_PAGES_PER_CHAT):
            if cursor is None:
                call = client.get_messages(peer, limit=self.NEW_CHAT_MESSAGES, wait_time=0)
            else:
                call = client.get_messages(peer, min_id=cursor, limit=100, reverse=True, wait_time=0)
            messages = await telegram_op(call, self.settings.timeout_telegram_send, "get_messages")
            fresh = [m for m in messages if isinstance(m, types.Message) and m.id > (cursor or 0)]
            if not fresh:
                break
            results = await self.db.store_messages(connection.id, [inbound_from(m, entity) for m in fresh])
            new = sum(1 for r in results if r.inserted)
            stored += new
            if new:
                connection.received += new
                self.runtime.stats.processed += new
            if cursor is None or len(messages) < 100:
                break
            cursor = max(m.id for m in fresh)
        return stored

    async def refresh_peers(self, connection: AccountConnection) -> None:
        """Learn the chats of every dialog (for a numeric id not resolved), at most once a minute per account.

        A scan already running is waited for rather than repeated.
        """
        lock = self._scan_locks[connection.id]
        if lock.locked():
            async with lock:
                return
        last = self._scanned_at.get(connection.id)
        if last is not None and time.monotonic() - last < self.PEER_REFRESH_INTERVAL:
            return
        await self.scan_dialogs(connection, read=False, limit=self.PEER_REFRESH_DIALOGS)

    def attach(self, connection: AccountConnection) -> None:
        """Register the handler on a fresh client, before it connects."""
        from telethon import events

        async def on_message(event: events.NewMessage.Event) -> None:
            # Telethon only logs a handler's exception: catch, record and count our own.
            try:
                chat = await event.get_chat() if event.chat is None else event.chat
                stored = await self.db.store_message(connection.id, inbound_from(event.message, chat))
                if stored and not event.message.out:
                    connection.received += 1
                    metrics.inbound_stored(connection.label)
                    self.runtime.stats.processed += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.handler_errors += 1
                self.runtime.stats.error(f"sync handler ({connection.label})", exc)
                logger.warning(
                    "could not store an incoming message; the reconciler will pick it up",
                    extra={"account": connection.label, "error": describe(exc)},
                )

        connection.live_client().add_event_handler(on_message, events.NewMessage())

    async def reconcile_account(self, connection: AccountConnection) -> int:
        """Store every message after each active chat's cursor. Returns how many were new."""
        from telethon import types

        if connection.client is None:
            return 0
        since = datetime.now(UTC) - timedelta(seconds=self.settings.reconcile_window)
        chats = await self.db.recent_chats(connection.id, since=since, limit=50)
        stored = 0
        for chat in chats:
            self.runtime.watchdog.ping("sync")
            try:
                client = connection.live_client()  # the account may have reconnected since the last chat
                entity = await telegram_op(
                    client.get_input_entity(chat.telegram_chat_id),
                    self.settings.timeout_telegram_entity,
                    "get_input_entity",
                )
                messages = await telegram_op(
                    # Oldest first from the cursor, so a busy chat is read in order, never skipped.
                    client.get_messages(entity, min_id=chat.last_message_id, limit=100, reverse=True, wait_time=0),
                    self.settings.timeout_telegram_send,
                    "get_messages",
                )
            except Exception as exc:
                if classify(exc).kind is ErrorKind.ACCOUNT_DEAD:
                    await connection.handle_error(exc)
                    return stored
                logger.info("reconcile of chat %s skipped: %s", chat.telegram_chat_id, describe(exc))
                continue
            fresh = [m for m in messages if isinstance(m, types.Message) and m.id > chat.last_message_id]
            if not fresh:
                continue
            peer_entity = await self._chat_entity(connection, chat.telegram_chat_id)
            results = await self.db.store_messages(connection.id, [inbound_from(m, peer_entity) for m in fresh])
            new = sum(1 for r in results if r.inserted)
            if new:
                logger.info("reconciler stored %d message(s) whose update never came", new, extra={"account": connection.label})
                connection.received += new
                metrics.inbound_stored(connection.label, new)
                self.runtime.stats.processed += new
            stored += new
        self.reconciled += stored
        return stored

    async def _chat_entity(self, connection: AccountConnection, chat_id: int) -> Any:
        try:
            return await telegram_op(connection.live_client().get_entity(chat_id), self.settings.timeout_telegram_entity, "get_entity")
        except Exception:
            return None

    async def cycle(self, connected: Sequence[AccountConnection]) -> float:
        """The sync loop: reconcile each connected account whose turn has come."""
        now = time.monotonic()
        for connection in connected:
            watch = difference_watch(connection.live_client())
            if watch.too_long:  # a channel's gap, found after the connect's catch-up
                watch.too_long = False
                self._scan_due.setdefault(connection.id, None)
            await self._run_due_scan(connection)
            if now - self._last_reconcile.get(connection.id, 0.0) < self.settings.reconcile_interval:
                continue
            self._last_reconcile[connection.id] = now
            await self.reconcile_account(connection)
        return min(self.settings.reconcile_interval, 10.0)

    def status(self) -> dict[str, Any]:
        return {
            "handler_errors": self.handler_errors,
            "reconciled": self.reconciled,
            "dialog_scans": self.scans,
            "scanned": self.scanned,
        }


# --- 3. outbound: exactly once, in order per chat --------------------------------------


class Outbound:
    """The outbound loop: claim a batch under lease, send each chat's rows in order, in a task of its own.

    See the module docstring for why nothing goes out twice. The parts, in the
    order a message meets them: :class:`MessageSender` sends one row with its
    own ``random_id`` and marks it sent (:class:`SentMarks`);
    :class:`SendLimits` keeps Telegram's limits on the account;
    :class:`SendWatch` cuts a send Telegram will never answer.
    """

    def __init__(
        self,
        *,
        db: Database,
        runtime: BotRuntime,
        settings: WorkerSettings,
        owner: str,
        pool: AccountPool,
        sender: MessageSender,
        limits: SendLimits,
        watch: SendWatch,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.settings = settings
        self.owner = owner
        self.pool = pool
        self.sender = sender
        self.limits = limits
        self.watch = watch
        self.lease_seconds = settings.timeout_telegram_send + settings.timeout_telegram_media + 30
        self._in_hand: dict[asyncio.Task[None], list[OutboundMessage]] = {}
        self._finished = asyncio.Event()
        self._late_error: BaseException | None = None
        self._take_back: set[int] = set()  # accounts whose claimed rows a failure may have left behind

    async def cycle(self) -> float:
        if self.runtime.shutdown.stopping:
            return 1.0
        try:
            return await self._claim_and_send()
        except asyncio.CancelledError:
            await self._cut()
            raise
        except Exception:
            # A database failure may have left claimed rows whose release could not reach it.
            self._take_back |= set(self.pool.connections)
            raise

    async def _claim_and_send(self) -> float:
        self._raise_late_error()
        await self.watch.cut_stuck_sends(self._in_hand)
        if self._take_back:
            await self._take_back_own_rows()
        self._finished.clear()  # a chat finishing from here on wakes the idle wait below
        connected = self.pool.connected()
        await self.limits.read_holds(connected)
        self.limits.end_pauses()
        accounts = [c.id for c in connected if not self.limits.flood_held(c.id)]
        rows = await self.db.claim_outbound(
            accounts,
            owner=self.owner,
            limit=self.settings.outbound_batch_size,
            lease_seconds=self.lease_seconds,
            max_retries=self.settings.max_message_retries,
        ) if accounts else []
        if rows:
            chats: dict[tuple[int, str], list[OutboundMessage]] = defaultdict(list)
            for row in rows:
                chats[(row.account_id, row.peer)].append(row)
            # Each chat in a task of its own; the cycle waits for the batch only so long, so one
            # slow chat (a hung lookup) never holds the other chats' next messages. The claim
            # never hands out a chat's later rows while an earlier one is still being sent.
            patience = min(CHAT_PATIENCE, self.settings.watchdog_max_silence / 4)  # the loop never looks silent
            await asyncio.wait([self._start_chat(group) for group in chats.values()], timeout=patience)
            self._raise_late_error()
            if len(rows) >= self.db.batch_limit(self.settings.outbound_batch_size):
                return 0.0
        await self._idle()
        return 0.0

    async def _idle(self) -> None:
        """Sleep until an enqueue NOTIFYs us, a chat in hand finishes, or the poll interval passes."""
        wakeup = asyncio.ensure_future(self.db.wait_for_wakeup("outbound", self.settings.outbound_poll_interval))
        if not self._in_hand:
            await wakeup
            return
        finished = asyncio.ensure_future(self._finished.wait())
        try:
            await asyncio.wait({wakeup, finished}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (wakeup, finished):
                waiter.cancel()

    def _start_chat(self, rows: list[OutboundMessage]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._send_chat(rows), name=f"outbound-chat-{rows[0].account_id}")
        self._in_hand[task] = rows
        task.add_done_callback(self._chat_done)
        return task

    def _chat_done(self, task: asyncio.Task[None]) -> None:
        self._in_hand.pop(task, None)
        self.watch.forget(task)
        self._finished.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._take_back |= set(self.pool.connections)
            if self._late_error is None:
                self._late_error = exc

    async def _send_chat(self, rows: list[OutboundMessage]) -> None:
        """Send one chat's rows in order; stop at the first that must wait."""
        index = 0
        try:
            for index, row in enumerate(rows):
                connection = self.pool.get(row.account_id)
                if connection is None or not connection.connected or self.runtime.shutdown.stopping:
                    await release(self.db, rows[index:])
                    return
                proceed = await tracing.traced(
                    "outbound.send", self.sender.send(connection, row), **tracing.of_outbound(row, connection.label)
                )
                if not proceed:
                    await release(self.db, rows[index + 1 :])
                    return
        except asyncio.CancelledError:
            # Cut mid-batch: the rows not yet tried go back now (the sender gave back its own row).
            await release_quietly(self.db, rows[index + 1 :])
            raise
        except Exception:
            # The database failed mid-batch: give back what is left, or the take-back will.
            await release_quietly(self.db, rows[index:])
            raise

    def _raise_late_error(self) -> None:
        """A chat that failed after its cycle moved on reports through the next cycle (the watchdog backs off)."""
        exc, self._late_error = self._late_error, None
        if exc is not None:
            raise exc

    async def _cut(self) -> None:
        """The loop was cancelled (shutdown, restart): cut the chats in hand; each gives its rows back."""
        tasks = list(self._in_hand)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    async def _take_back_own_rows(self) -> None:
        """After a failure, take back at once the rows we claimed and no longer have in hand (fenced by the
        account lease in SQL), instead of letting them wait out their message lease."""
        keep = sorted({r.lease_token for rows in self._in_hand.values() for r in rows if r.lease_token})
        total = 0
        # An account whose lease lapsed in the outage is owed its take-back until it is leased again.
        for connection in list(self.pool.connections.values()):
            if connection.id in self._take_back and connection.lease_token:
                total += await self.db.take_back_own_outbound(
                    connection.id, owner=self.owner, account_token=connection.lease_token, keep_tokens=keep
                )
                self._take_back.discard(connection.id)
        if total:
            logger.info("took back %d claimed message(s) a failure had left behind", total)

    def status(self) -> dict[str, Any]:
        return self.sender.status()


async def release(db: Database, rows: Sequence[OutboundMessage]) -> None:
    """Give claimed rows back to the queue (fenced by their lease token)."""
    if rows:
        await db.release_outbound([r.id for r in rows], rows[0].lease_token or "")


async def release_quietly(db: Database, rows: Sequence[OutboundMessage]) -> None:
    """:func:`release` on the way out of a cut or a failure: at most 2 s, never raising."""
    if not rows:
        return
    task = asyncio.ensure_future(release(db, rows))
    # The shield lets the release outlive the wait; its late failure is expected, not "never retrieved".
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        await asyncio.wait_for(asyncio.shield(task), 2.0)
    except BaseException:  # cancelled again or the database is away: the take-back or the lease does it
        logger.debug("could not release %d message(s) at once; they are taken back later", len(rows))


class MessageSender:
    """One row, exactly once: paced, checked, sent with its own ``random_id``, marked sent;
    a failure is settled as the classifier says (retried, held, failed or dead-lettered)."""

    def __init__(
        self,
        *,
        db: Database,
        runtime: BotRuntime,
        settings: WorkerSettings,
        storage: Storage,
        entities: EntityCache,
        limits: SendLimits,
        watch: SendWatch,
        marks: SentMarks,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.settings = settings
        self.storage = storage
        self.entities = entities
        self.limits = limits
        self.watch = watch
        self.marks = marks
        self.sent = 0
        self.failed = 0
        self.dead = 0

    async def send(self, connection: AccountConnection, row: OutboundMessage) -> bool:
        """Send ``row``; True when the next row of its chat may go now."""
        self.runtime.watchdog.ping("outbound")  # progress, even within a long batch
        self.watch.clock(running=True)  # the recipient's lookup counts
        token = row.lease_token or ""
        wait = self.limits.pace(row)
        if wait > 0:
            if wait > 1.0:
                # Behind the account's flood wait the row says so; a full token bucket is no news.
                reason = "waiting for the account's flood wait to end" if self.limits.flood_held(row.account_id) else None
                await self.db.reschedule_outbound(row.id, token, at=datetime.now(UTC) + timedelta(seconds=wait), reason=reason)
                return False
            await asyncio.sleep(wait)
        self.limits.spend(row)
        async with self.runtime.shutdown.in_flight():
            try:
                self._validate(row)
                telegram_id, chat_id = await self._deliver(connection, row)
            except SendsHeld as held:
                # Not an attempt: the row goes back to the queue until the hold ends, with the reason.
                await self.db.reschedule_outbound(row.id, token, at=datetime.fromtimestamp(held.until, UTC), reason=held.reason)
                return False
            except asyncio.CancelledError:
                # A restart or shutdown cut the send: give the row back now rather than
                # when its lease expires. The retry reuses its random_id, and a late
                # answer to this attempt is fenced out by the lease token.
                await release_quietly(self.db, [row])
                raise
            except Exception as exc:
                return await self._failed(connection, row, exc)
            if await self.marks.mark(row.id, token, telegram_message_id=telegram_id, chat_id=chat_id):
                self._count_sent(connection, row)
                # One line per message, never its text: what an operator greps for.
                logger.info(
                    "message %d sent: account %s, chat %s, attempt %d, Telegram message %d",
                    row.id, connection.label, chat_id, row.attempts, telegram_id,
                    extra={"message_id": row.id, "account": connection.label, "chat": chat_id, "attempt": row.attempts},
                )
            else:
                logger.warning("lease of message %d was lost before it was marked sent", row.id)
        return True

    def _validate(self, row: OutboundMessage) -> None:
        """Bad input fails here, with a reason a person can act on, before any network call."""
        check_message(row.text, row.attachments)
        if row.attachments and storage_key(row.attachments[0]) is None:
            check_attachment(self._attachment_path(row.attachments[0]), row.attachments[0])

    def _attachment_path(self, attachment: Any) -> Path:
        name = attachment.get("path") if isinstance(attachment, dict) else str(attachment)
        path = Path(str(name)).expanduser()
        return path if path.is_absolute() else Path(self.settings.data_dir) / "attachments" / path

    @asynccontextmanager
    async def _attachment_file(self, row: OutboundMessage) -> AsyncIterator[Path]:
        """The attachment as a local file: a path as given, or a storage object fetched to a temporary file."""
        attachment = row.attachments[0]
        key = storage_key(attachment)
        if key is None:
            yield self._attachment_path(attachment)
            return
        tmp = Path(self.settings.data_dir) / TEMP_SUBDIR / f"outbound-{row.id}-{Path(key).name}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self.storage.download_to(key, tmp)
            check_attachment(tmp, attachment)
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    async def _deliver(self, connection: AccountConnection, row: OutboundMessage) -> tuple[int, int]:
        """One raw request carrying the row's ``random_id``; returns (message id, chat id)."""
        from telethon import functions, types, utils

        client = connection.live_client()
        self.limits.check_flood(connection)
        entity = await self.entities.resolve(connection, row.peer)
        self.watch.clock(running=False)  # waiting for the account's turn is not a stuck send
        await self.limits.check_limited(connection, entity)
        chat_id = utils.get_peer_id(entity)
        reply_to = types.InputReplyToMessage(reply_to_msg_id=row.reply_to) if row.reply_to else None
        request: Any
        if row.attachments:
            async with self._attachment_file(row) as path:
                _, media, _ = await telegram_op(
                    client._file_to_media(str(path)), self.settings.timeout_telegram_media, "upload_media", detail=path.name
                )
            request = functions.messages.SendMediaRequest(
                peer=entity, media=media, message=row.text or "", random_id=row.random_id, reply_to=reply_to
            )
            timeout = self.settings.timeout_telegram_media
        else:
            request = functions.messages.SendMessageRequest(
                peer=entity, message=row.text or "", random_id=row.random_id, reply_to=reply_to
            )
            timeout = self.settings.timeout_telegram_send
        async with self.limits.turn(connection):
            self.watch.clock(running=True)
            self.runtime.watchdog.ping("outbound")  # a turn is progress, however many chats wait for theirs
            # Checked again in turn: the send before this one may have drawn a limit.
            self.limits.check_flood(connection)
            await self.limits.check_limited(connection, entity)
            try:
                result = await telegram_op(client(request), timeout, "send_message", outcome_unknown=True, detail=str(row.id))
            except Exception as exc:
                self.limits.note_send_limit(connection, exc)  # before the next send of the account takes its turn
                raise
        message = client._get_response_message(request, result, entity)
        message_id = getattr(message, "id", None) or getattr(result, "id", None)
        if not isinstance(message_id, int):
            raise PermanentError(f"Telegram's answer carried no message id ({type(result).__name__})")
        return message_id, chat_id

    async def _failed(self, connection: AccountConnection, row: OutboundMessage, exc: BaseException) -> bool:
        """Decide the row's fate from the classifier. True when the chat's next row may go."""
        token = row.lease_token or ""
        verdict = classify(exc)
        kind = verdict.kind
        if kind is ErrorKind.ALREADY_DONE:
            # An earlier attempt whose answer was lost did arrive; Telegram dropped this copy.
            message_id = await self._find_sent_id(connection, row)
            logger.info("message %d was already delivered (duplicate random_id)", row.id)
            await self.db.mark_sent(row.id, token, telegram_message_id=message_id, chat_id=row.chat_id)  # type: ignore[arg-type]
            self._count_sent(connection, row)
            return True
        if kind is ErrorKind.RATE_LIMITED:
            seconds = verdict.retry_after or 30.0
            until = datetime.now(UTC) + timedelta(seconds=seconds)
            metrics.flood_wait(connection.label, seconds)
            if verdict.scope is LimitScope.ACCOUNT and self.limits.flood_held(row.account_id):
                # The send itself drew it (see note_send_limit): every send of the account waits, here and elsewhere.
                await self.limits.store_hold(connection, SendHoldKind.FLOOD, until, verdict.reason)
            else:
                # Slow mode, or a wait on resolving or uploading for this row: only this chat waits.
                self.limits.hold_chat(row, seconds)
                logger.warning("%s: chat %s of %s waits %.0fs; the account's other chats go on", verdict.reason, row.peer, connection.label, seconds)
            await self.db.reschedule_outbound(row.id, token, at=until, reason=verdict.reason)
            return False
        if kind is ErrorKind.ACCOUNT_LIMITED:
            until = self.limits.limit_account(connection, exc)
            await self.limits.store_hold(connection, SendHoldKind.LIMITED, until, verdict.reason)
            self.limits.alert_limited(connection, until)
            await self.db.reschedule_outbound(row.id, token, at=until, reason=verdict.reason)
            return False
        if kind is ErrorKind.ACCOUNT_DEAD:
            await self.db.release_outbound([row.id], token)
            await connection.handle_error(exc)
            return False
        if isinstance(exc, CircuitOpenError):
            # Refused before anything was tried (storage's breaker, opened by some other
            # row's failures): no attempt of this row is spent; it comes back after the wait.
            at = datetime.now(UTC) + timedelta(seconds=max(1.0, exc.retry_after))
            await self.db.reschedule_outbound(row.id, token, at=at, reason=verdict.reason)
            return False
        if kind is ErrorKind.PERMANENT:
            self.entities.forget(row.account_id, row.peer)
            await self.db.mark_failed(row.id, token, verdict.reason, permanent=True)
            metrics.message_failed(connection.label, kind.value)
            self._count_failure(connection, row, verdict.reason)
            return True  # this row is settled; the chat goes on
        # Transient or unknown outcome: retry with the same random_id.
        retry_at = None
        if kind is ErrorKind.UNKNOWN_OUTCOME or isinstance(exc, (ConnectionError, OperationTimeout)):
            # Telegram did not answer in time (a send, or the recipient's lookup before it) or the
            # connection broke: try again soon, as the connection checks bring it back within seconds.
            retry_at = datetime.now(UTC) + timedelta(seconds=min(2.0, self.settings.retry_base_delay))
        status = await self.db.mark_failed(
            row.id,
            token,
            verdict.reason,
            permanent=False,
            retry_at=retry_at,
            max_retries=self.settings.max_message_retries,
            base_delay=self.settings.retry_base_delay,
        )
        self.runtime.stats.retried += 1
        if status is OutboundStatus.DEAD:
            metrics.message_failed(connection.label, kind.value, dead=True)
            self.dead += 1
            self._count_failure(connection, row, verdict.reason, dead=True)
            return True
        metrics.message_retry(connection.label, kind.value)
        await connection.handle_error(exc)
        return False

    async def _find_sent_id(self, connection: AccountConnection, row: OutboundMessage) -> int | None:
        """Best effort: the id of our earlier copy, from the chat's latest messages."""
        try:
            entity = await self.entities.resolve(connection, row.peer)
            client = connection.live_client()
            recent = await telegram_op(client.get_messages(entity, limit=20), self.settings.timeout_telegram_send, "get_messages")
            for message in recent:
                if getattr(message, "out", False) and (message.message or "") == (row.text or ""):
                    return int(message.id)
        except Exception as exc:
            logger.debug("could not look up the earlier copy of message %d: %s", row.id, describe(exc))
        return None

    def _count_sent(self, connection: AccountConnection, row: OutboundMessage) -> None:
        metrics.message_sent(connection.label, row.created_at)
        self.sent += 1
        connection.sent += 1
        self.runtime.stats.processed += 1

    def _count_failure(self, connection: AccountConnection, row: OutboundMessage, reason: str, *, dead: bool = False) -> None:
        self.failed += 1
        connection.failed += 1
        self.runtime.stats.failed += 1
        self.runtime.stats.error(f"message {row.id}", reason)
        log = logger.error if dead else logger.warning
        log(
            "message %d %s: account %s, chat %s, attempt %d: %s",
            row.id,
            "is dead after its retries" if dead else "failed",
            connection.label,
            row.chat_id or row.peer,
            row.attempts,
            reason,
            extra={"message_id": row.id, "account": connection.label, "chat": row.chat_id or row.peer, "attempt": row.attempts},
        )
        if dead:
            self.runtime.alerts.alert(
                AlertType.MESSAGE_DEAD,
                f"Message {row.id} from {connection.label} to {row.peer} is dead after {self.settings.max_message_retries} retries",
                key=f"dead:{connection.label}",
                details={"message_id": row.id, "error": reason, "fix": f"once the cause is fixed: ./start.sh worker requeue {row.id}"},
            )

    def status(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "dead": self.dead}


class SendsHeld(Exception):
    """Telegram's limit holds this send until ``until`` (wall time): the row waits, nothing failed."""

    def __init__(self, until: float, reason: str) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason


class SendLimits:
    """Telegram's limits on sending, as Telegram applies them (docs/flood-limits.md), and our own pace.

    FLOOD_WAIT (and FLOOD_PREMIUM_WAIT) holds every send of the account for
    the time asked, SLOWMODE_WAIT only that chat, PEER_FLOOD the account's
    sends to non-contacts for PEER_FLOOD_PAUSE. The account holds are stored
    (``account_send_holds``) and read when an account connects here, so
    whichever process holds the account next keeps to them. At most
    SEND_IN_FLIGHT_PER_ACCOUNT sends of an account wait for Telegram at once
    (:meth:`turn`); each checks the account's holds when its turn comes, so
    no send starts after a flood wait is known (with 1, none is even on its way).
    """

    def __init__(self, *, db: Database, runtime: BotRuntime, settings: WorkerSettings, pool: AccountPool) -> None:
        self.db = db
        self.runtime = runtime
        self.settings = settings
        self.pool = pool
        self.per_account = KeyedBuckets(rate=settings.send_rate_per_account, burst=settings.send_burst_per_account)
        self.per_chat = KeyedBuckets(rate=settings.send_rate_per_chat, burst=settings.send_burst_per_chat)
        #: PEER_FLOOD: account id -> wall time its sends to non-contacts may start again.
        self.limited: dict[int, float] = {}
        self._contacts: dict[int, frozenset[int]] = {}
        self._alerted_limits: set[int] = set()
        self._holds_read: dict[int, float | None] = {}  # account id -> its connected_since when its holds were read
        self._holds_read_at = float("-inf")
        self._turns: defaultdict[int, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(settings.send_in_flight_per_account)
        )

    # Our pace ---------------------------------------------------------------------------

    def pace(self, row: OutboundMessage) -> float:
        """Seconds ``row`` must wait for its account's and its chat's token buckets."""
        # A token or two in reserve: Telegram counts on its own clock, and network jitter must not
        # make a send that our bucket allows arrive early enough to provoke a FloodWait.
        return max(
            self.per_account.delay(row.account_id, reserve=2.0), self.per_chat.delay((row.account_id, row.peer), reserve=1.0)
        )

    def spend(self, row: OutboundMessage) -> None:
        self.per_account.take(row.account_id)
        self.per_chat.take((row.account_id, row.peer))

    def turn(self, connection: AccountConnection) -> asyncio.Semaphore:
        """The account's SEND_IN_FLIGHT_PER_ACCOUNT turns: hold one while a send waits for Telegram."""
        return self._turns[connection.id]

    def hold_chat(self, row: OutboundMessage, seconds: float) -> None:
        """Slow mode (or a wait drawn for this row alone): only this chat waits."""
        self.per_chat.hold((row.account_id, row.peer), seconds)

    def flood_held(self, account_id: int) -> bool:
        """Whether a flood wait holds every send of the account now."""
        return self.per_account.held_until(account_id) is not None

    # A send drew a limit ---------------------------------------------------------------

    def note_send_limit(self, connection: AccountConnection, exc: BaseException) -> None:
        """A send drew a limit of the account: hold it in this process at once (no await before the next send)."""
        verdict = classify(exc)
        if verdict.kind is ErrorKind.RATE_LIMITED and verdict.scope is LimitScope.ACCOUNT:
            seconds = verdict.retry_after or 30.0
            self.per_account.hold(connection.id, seconds)
            connection.flood_wait_until = max(connection.flood_wait_until or 0.0, time.time() + seconds)
            self._forget_local_flood(connection)
            logger.warning(
                "flood wait of %.0fs for %s: every send of the account waits (other accounts go on)",
                seconds, connection.label, extra={"account": connection.label},
            )
        elif verdict.kind is ErrorKind.ACCOUNT_LIMITED:
            until = time.time() + self.settings.peer_flood_pause
            if self.limited.get(connection.id, 0.0) >= until - 1.0:
                return
            self.limited[connection.id] = until
            connection.limited_until = until
            self._contacts.pop(connection.id, None)  # read them afresh for this pause
            logger.warning(
                "%s is limited by Telegram (PEER_FLOOD): no messages to non-contacts for %.0fs; they wait in the queue",
                connection.label, self.settings.peer_flood_pause, extra={"account": connection.label},
            )

    def limit_account(self, connection: AccountConnection, exc: BaseException) -> datetime:
        """PEER_FLOOD: the account's pause (noted now unless the send already did); returns when it ends."""
        self.note_send_limit(connection, exc)
        return datetime.fromtimestamp(self.limited[connection.id], UTC)

    async def store_hold(self, connection: AccountConnection, kind: SendHoldKind, until: datetime, reason: str) -> None:
        """Store the hold, so the next process that holds this account keeps to it too."""
        try:
            await self.db.hold_account_sends(connection.id, kind, until=until, reason=reason)
        except Exception as exc:
            logger.warning("could not store the %s hold of %s (%s); this process keeps to it", kind.value, connection.label, describe(exc))

    def alert_limited(self, connection: AccountConnection, until: datetime) -> None:
        """``account_limited``, once per pause (``resolved`` follows when it ends)."""
        if connection.id in self._alerted_limits:
            return
        self._alerted_limits.add(connection.id)
        self.runtime.alerts.alert(
            AlertType.ACCOUNT_LIMITED,
            f"Account {connection.label} is limited by Telegram (PEER_FLOOD): its messages to non-contacts "
            f"wait in the queue until {until.strftime('%Y-%m-%d %H:%M UTC')}; messages to contacts go on",
            key=f"limited:{connection.label}",
            details={"account": connection.label, "until": until.isoformat(), "runbook": "docs/flood-limits.md"},
        )

    @staticmethod
    def _forget_local_flood(connection: AccountConnection) -> None:
        from telethon import functions

        # After a FloodWaitError Telethon refuses further requests of that type
        # locally, until its own record lapses. Our hold (per account, stored,
        # covering text and media alike) is the one authority on when sends
        # resume: drop Telethon's copy so the two never disagree.
        flooded = getattr(connection.client, "_flood_waited_requests", None)
        if isinstance(flooded, dict):
            flooded.pop(functions.messages.SendMessageRequest.CONSTRUCTOR_ID, None)
            flooded.pop(functions.messages.SendMediaRequest.CONSTRUCTOR_ID, None)

    # Holds from before, and holds that end ----------------------------------------------

    async def read_holds(self, connected: Sequence[AccountConnection]) -> None:
        """Read the stored holds of accounts that (re)connected here, and of all every HOLDS_REFRESH seconds.

        A hold drawn in this process is known at once; one drawn by the
        account's previous holder (before a restart, a deploy or a lease
        takeover) is read before this process claims anything for it.
        """
        now = time.monotonic()
        due = now - self._holds_read_at >= HOLDS_REFRESH
        ids = [c.id for c in connected if due or self._holds_read.get(c.id) != c.connected_since]
        if not ids:
            return
        self._apply_holds(await self.db.account_send_holds(ids))
        for connection in connected:
            if connection.id in ids:
                self._holds_read[connection.id] = connection.connected_since
        if due:
            self._holds_read_at = now

    def _apply_holds(self, holds: Sequence[SendHold]) -> None:
        """Take over the stored holds (another process may have drawn them before the account moved here)."""
        now = time.time()
        for hold in holds:
            connection = self.pool.get(hold.account_id)
            if hold.flood_until is not None:
                until = hold.flood_until.timestamp()
                self.per_account.hold(hold.account_id, until - now)
                if connection is not None:
                    connection.flood_wait_until = max(connection.flood_wait_until or 0.0, until)
            if hold.limited_until is not None:
                until = max(self.limited.get(hold.account_id, 0.0), hold.limited_until.timestamp())
                self.limited[hold.account_id] = until
                if connection is not None:
                    connection.limited_until = until

    def end_pauses(self) -> None:
        """A PEER_FLOOD pause that ran out: sends to non-contacts go again, and the alert resolves."""
        now = time.time()
        for account_id, until in list(self.limited.items()):
            if until > now:
                continue
            del self.limited[account_id]
            self._contacts.pop(account_id, None)
            self._alerted_limits.discard(account_id)
            connection = self.pool.get(account_id)
            label = connection.label if connection is not None else str(account_id)
            if connection is not None:
                connection.limited_until = None
            logger.info("%s may message non-contacts again (the PEER_FLOOD pause ended)", label, extra={"account": label})
            self.runtime.alerts.resolve(
                AlertType.ACCOUNT_LIMITED, key=f"limited:{label}", message=f"Account {label} may message non-contacts again"
            )

    # Before each send ----------------------------------------------------------------------

    def check_flood(self, connection: AccountConnection) -> None:
        """Raise :class:`SendsHeld` while a flood wait holds every send of the account."""
        flood = self.per_account.held_until(connection.id)
        if flood is not None:
            raise SendsHeld(time.time() + (flood - time.monotonic()), "waiting for the account's flood wait to end")

    async def check_limited(self, connection: AccountConnection, entity: Any) -> None:
        """Raise :class:`SendsHeld` while PEER_FLOOD holds this account's sends to ``entity`` (a non-contact)."""
        limited = self.limited.get(connection.id)
        if limited is not None and limited > time.time() and not await self._is_contact(connection, entity):
            raise SendsHeld(limited, "waiting: Telegram limits this account's messages to non-contacts (PEER_FLOOD)")

    async def _is_contact(self, connection: AccountConnection, entity: Any) -> bool:
        """Whether Telegram's spam limit spares this chat: a contact, the account itself, or a group it is in."""
        from telethon import functions, types

        if isinstance(entity, types.InputPeerSelf):
            return True
        user_id = getattr(entity, "user_id", None)
        if not isinstance(entity, types.InputPeerUser) or user_id is None:
            return True  # groups and channels the account writes in are not "strangers"
        contacts = self._contacts.get(connection.id)
        if contacts is None:
            try:
                answer = await telegram_op(
                    connection.live_client()(functions.contacts.GetContactsRequest(hash=0)),
                    self.settings.timeout_telegram_entity,
                    "get_contacts",
                )
                contacts = frozenset(c.user_id for c in getattr(answer, "contacts", ()))
            except Exception as exc:
                # Unknown contacts: everyone waits, which is safe; read again next time.
                logger.info("could not read the contacts of %s (%s); all its private chats wait", connection.label, describe(exc))
                return False
            self._contacts[connection.id] = contacts
        return user_id in contacts


class SendWatch:
    """The clock on each chat's current request, to cut a send (or its recipient's lookup) that Telegram
    will never answer; its row goes back and is tried again at once with its random_id (a copy that
    did arrive is dropped by Telegram).

    Two signs: the send has been silent past WATCHDOG_MAX_SILENCE (as the watchdog cut the whole
    loop when chats were sent inside the cycle), or it has waited longer than STUCK_SEND_AFTER
    while the account's connection check (a ping, at most every BREAKER_PROBE_INTERVAL) is
    answered: after an outage Telegram answers new requests but never the ones it lost.
    """

    def __init__(self, *, settings: WorkerSettings, pool: AccountPool) -> None:
        self.settings = settings
        self.pool = pool
        self._started: dict[asyncio.Task[Any], float] = {}
        self._pinged_at: dict[int, float] = {}

    def clock(self, *, running: bool) -> None:
        """Start (or stop) the clock on the current chat task's request."""
        task = asyncio.current_task()
        if task is None:
            return
        if running:
            self._started[task] = time.monotonic()
        else:
            self._started.pop(task, None)

    def forget(self, task: asyncio.Task[Any]) -> None:
        self._started.pop(task, None)

    async def cut_stuck_sends(self, in_hand: Mapping[asyncio.Task[None], Sequence[OutboundMessage]]) -> None:
        """Cut the chat tasks whose current request shows either sign."""
        now = time.monotonic()
        suspects: dict[int, list[asyncio.Task[Any]]] = defaultdict(list)
        for task, since in list(self._started.items()):
            rows = in_hand.get(task)
            if rows is None or task.done():
                continue
            if now - since > self.settings.watchdog_max_silence:
                self._cut(task, now - since, "silent")
            elif now - since > STUCK_SEND_AFTER:
                suspects[rows[0].account_id].append(task)

        async def check(account_id: int, tasks: list[asyncio.Task[Any]]) -> None:
            connection = self.pool.get(account_id)
            if connection is None or now - self._pinged_at.get(account_id, 0.0) < self.settings.breaker_probe_interval:
                return
            self._pinged_at[account_id] = now
            if await connection.answers(min(2.0, self.settings.timeout_telegram_send)):
                for task in tasks:
                    if not task.done():
                        self._cut(task, now - self._started.get(task, now), "unanswered while Telegram answers")

        if suspects:
            await asyncio.gather(*(check(account_id, tasks) for account_id, tasks in suspects.items()))

    def _cut(self, task: asyncio.Task[Any], waited: float, why: str) -> None:
        logger.warning("a send waited %.0fs (%s); cutting it, its message is tried again", waited, why)
        self._started.pop(task, None)
        task.cancel()


class SentMarks:
    """Marks of sent messages, written together: one statement (one commit) for every send that
    finished while the previous write was under way, with no added wait (group commit).

    A mark still comes after its send, as before; a crash between the two leaves the row to be
    sent again with its random_id, which Telegram drops as a duplicate. A batch's commit does not
    wait for the disk (``outbound_mark_sent_many`` turns synchronous_commit off for its own
    transaction): a crash of the database server itself may lose the last marks, which leaves
    their rows as that crash between send and mark does. If a batch fails, its marks are
    written one by one, so one bad row never fails the others.
    """

    def __init__(self, db: Database, *, max_batch: int = 100) -> None:
        self.db = db
        self.max_batch = max_batch
        self._pending: list[tuple[tuple[int, str, int, int | None], asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.writes = 0

    async def mark(self, message_id: int, token: str, *, telegram_message_id: int, chat_id: int | None) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(((message_id, token, telegram_message_id, chat_id), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="outbound-marks")
        return await asyncio.shield(future)

    async def _write_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self.writes += 1
            try:
                results = await self.db.mark_sent_many([marks for marks, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    continue
                for (message_id, token, telegram_id, chat_id), future in batch:
                    try:
                        _settle(future, await self.db.mark_sent(message_id, token, telegram_message_id=telegram_id, chat_id=chat_id))
                    except Exception as one:
                        _settle(future, one)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, result)


def _settle(future: asyncio.Future[bool], outcome: bool | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


# --- 4. history: page by page, the cursor saved after each page ---------------------------


async def fail_job(
    db: Database, job: Job, exc: BaseException, connection: AccountConnection, settings: WorkerSettings
) -> tuple[str, JobStatus | None]:
    """Record a failed job (any kind) as the classifier says; returns the reason and its new status.

    A dead session also stops its account; a rate limit retries after the wait
    Telegram asked for; other transient errors back off from RETRY_BASE_DELAY,
    so a job that keeps failing waits longer each time and never holds up the
    jobs after it, until after MAX_MESSAGE_RETRIES it is ``dead``.
    """
    verdict = classify(exc)
    if verdict.kind is ErrorKind.ACCOUNT_DEAD:
        await connection.handle_error(exc)
    retry_at = datetime.now(UTC) + timedelta(seconds=verdict.retry_after) if verdict.retry_after else None
    status = await db.fail_job(
        job.id,
        job.lease_token or "",
        verdict.reason,
        permanent=verdict.kind is ErrorKind.PERMANENT,
        retry_at=retry_at,
        max_retries=settings.max_message_retries,
        base_delay=settings.retry_base_delay,
    )
    return verdict.reason, status


class SoonestRetry:
    """When a job this loop failed may be due again, so the loop looks then instead of a whole
    interval later (a retry 0.2 s away would otherwise wait the loop's 5 s).

    A lower bound of the delay ``job_fail`` sets (``retry_delay``: RETRY_BASE_DELAY doubling per
    attempt). The time is kept until it has passed: a loop woken before it (a ``job_create``
    NOTIFY) still comes back for the retry; once it has passed and nothing was due, the loop falls
    back to its interval, as before.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at: float | None = None

    def note(self, *, attempts: int, base_delay: float, status: JobStatus | None) -> None:
        """A job failed after ``attempts`` earlier attempts and is now ``status``."""
        if status is not JobStatus.PENDING:
            return  # done with it: dead or failed for good
        now = self._clock()
        at = now + doubling_delay(base_delay, attempts)
        if self._at is None or self._at <= now or at < self._at:  # a time already passed counts no more
            self._at = at

    def pause(self, interval: float) -> float:
        """The loop's pause when it found nothing to claim: its interval, or less when a retry is due sooner."""
        if self._at is None:
            return interval
        left = self._at - self._clock()
        if left <= 0:
            self._at = None  # looked after it was due: nothing left to come back for
            return interval
        return interval if left >= interval else max(0.05, left)


@dataclass
class HistoryProgress:
    job_id: int
    account: str
    chat_id: int
    fetched: int
    stored: int
    target: int | None
    done: bool = False

    def as_dict(self) -> dict[str, Any]:
        percent = None
        if self.target:
            percent = round(min(100.0, 100.0 * self.fetched / self.target), 1)
        elif self.done:
            percent = 100.0
        return {**self.__dict__, "percent": percent}


class History:
    """History jobs (``jobs`` of kind ``history``): fetch a chat's past, resumable at its cursor."""

    PAGES_PER_CYCLE = 20

    def __init__(
        self,
        *,
        db: Database,
        runtime: BotRuntime,
        settings: WorkerSettings,
        owner: str,
        pool: AccountPool,
        entities: EntityCache,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.settings = settings
        self.owner = owner
        self.pool = pool
        self.entities = entities
        self.progress: dict[int, HistoryProgress] = {}
        self.retries = SoonestRetry()

    async def cycle(self) -> float:
        connected = {c.id: c for c in self.pool.connected()}
        if not connected or self.runtime.shutdown.stopping:
            return 5.0
        jobs = await self.db.claim_jobs(list(connected), [JobKind.HISTORY], owner=self.owner, limit=1, lease_seconds=300)
        for job in jobs:
            await self._run(connected[job.account_id], job)
        return 0.0 if jobs else self.retries.pause(5.0)

    async def _run(self, connection: AccountConnection, job: Job) -> None:
        from telethon import types

        token = job.lease_token or ""
        chat_id = int(job.payload["chat_id"])
        progress = self.progress.setdefault(
            job.id, HistoryProgress(job.id, connection.label, chat_id, job.fetched_count, job.stored_count, job.target_count)
        )
        cursor = job.cursor
        try:
            client = connection.live_client()
            entity = await self.entities.resolve(connection, chat_id)
            chat = await telegram_op(client.get_entity(entity), self.settings.timeout_telegram_entity, "get_entity")
            for _ in range(self.PAGES_PER_CYCLE):
                self.runtime.watchdog.ping("history")
                if self.runtime.shutdown.stopping:
                    break
                page = await telegram_op(
                    client.get_messages(entity, limit=self.settings.history_page_size, offset_id=cursor),
                    self.settings.timeout_telegram_send,
                    "get_messages",
                )
                messages = [m for m in page if isinstance(m, types.Message)]
                if not messages:
                    await self.db.complete_job(job.id, token)
                    progress.done = True
                    metrics.HISTORY_JOBS.labels("done").inc()
                    return
                results = await self.db.store_messages(connection.id, [inbound_from(m, chat) for m in messages], advance_cursor=False)
                new = sum(1 for r in results if r.inserted)
                cursor = min(m.id for m in messages)
                if not await self.db.save_job_progress(job.id, token, cursor=cursor, fetched=len(messages), stored=new):
                    logger.warning("history job %d: lease lost; another worker goes on", job.id)
                    return
                metrics.HISTORY_PAGES.labels(connection.label).inc()
                progress.fetched += len(messages)
                progress.stored += new
                if cursor <= 1 or (job.target_count and progress.fetched >= job.target_count):
                    await self.db.complete_job(job.id, token)
                    progress.done = True
                    metrics.HISTORY_JOBS.labels("done").inc()
                    return
            await self.db.release_jobs([job.id], token)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason, status = await fail_job(self.db, job, exc, connection, self.settings)
            self.retries.note(attempts=job.attempts, base_delay=self.settings.retry_base_delay, status=status)
            metrics.HISTORY_JOBS.labels("failed").inc()
            self.runtime.stats.error(f"history job {job.id}", reason)
            if status is JobStatus.DEAD:
                self.runtime.alerts.alert(
                    AlertType.PROCESSING_FAILED,
                    f"History job {job.id} of {connection.label} is dead after {self.settings.max_message_retries} retries: {reason}",
                    key=f"history-dead:{job.id}",
                    details={"job_id": job.id, "chat_id": chat_id, "error": reason},
                )

    def status(self) -> list[dict[str, Any]]:
        return [p.as_dict() for p in self.progress.values()]


# --- 5. jobs: scheduled sends, edits, deletes, mark-read -----------------------------------


class Jobs:
    """Scheduled message work (``jobs`` of kinds send, edit, delete, mark_read) at its run time. Each kind is idempotent."""

    def __init__(
        self,
        *,
        db: Database,
        runtime: BotRuntime,
        settings: WorkerSettings,
        owner: str,
        pool: AccountPool,
        entities: EntityCache,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.settings = settings
        self.owner = owner
        self.pool = pool
        self.entities = entities
        self.done = 0
        self.failed = 0
        self.retries = SoonestRetry()

    async def cycle(self) -> float:
        connected = {c.id: c for c in self.pool.connected()}
        if not connected or self.runtime.shutdown.stopping:
            return 2.0
        jobs = await self.db.claim_jobs(list(connected), MESSAGE_JOB_KINDS, owner=self.owner, limit=20)
        for job in jobs:
            self.runtime.watchdog.ping("jobs")
            await self._run(connected[job.account_id], job)
        return 0.0 if jobs else self.retries.pause(2.0)

    async def _run(self, connection: AccountConnection, job: Job) -> None:
        token = job.lease_token or ""
        try:
            result = await self._do(connection, job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason, status = await fail_job(self.db, job, exc, connection, self.settings)
            self.retries.note(attempts=job.attempts, base_delay=self.settings.retry_base_delay, status=status)
            self.failed += 1
            metrics.MESSAGE_JOBS.labels(job.kind.value, "failed").inc()
            self.runtime.stats.error(f"job {job.id} ({job.kind.value})", reason)
            if status is JobStatus.DEAD:
                self.runtime.alerts.alert(
                    AlertType.MESSAGE_DEAD,
                    f"Job {job.id} ({job.kind.value}) of {connection.label} is dead after "
                    f"{self.settings.max_message_retries} retries: {reason}",
                    key=f"job-dead:{job.id}",
                    details={"job_id": job.id, "kind": job.kind.value, "error": reason},
                )
            return
        await self.db.complete_job(job.id, token, result=result)
        self.done += 1
        metrics.MESSAGE_JOBS.labels(job.kind.value, "done").inc()

    async def _do(self, connection: AccountConnection, job: Job) -> Any:
        payload = job.payload
        if job.kind is JobKind.SEND:
            # Into the outbound queue, keyed by the job: running it twice queues one message.
            enqueued = await self.db.enqueue_outbound(
                job.account_id,
                payload["peer"],
                payload.get("text"),
                attachments=payload.get("attachments") or (),
                reply_to=payload.get("reply_to"),
                dedupe_key=f"job:{job.id}",
            )
            return {"message_id": enqueued.id}
        from telethon import functions

        client = connection.live_client()
        entity = await self.entities.resolve(connection, payload["peer"])
        timeout = self.settings.timeout_telegram_send
        if job.kind is JobKind.EDIT:
            try:
                await telegram_op(
                    client(functions.messages.EditMessageRequest(peer=entity, id=int(payload["message_id"]), message=payload["text"])),
                    timeout,
                    "edit_message",
                )
            except Exception as exc:
                if type(exc).__name__ != "MessageNotModifiedError":  # already edited: done
                    raise
            return {"edited": payload["message_id"]}
        if job.kind is JobKind.DELETE:
            ids = [int(i) for i in payload.get("message_ids") or [payload["message_id"]]]
            await telegram_op(client.delete_messages(entity, ids, revoke=bool(payload.get("revoke", True))), timeout, "delete_messages")
            return {"deleted": ids}
        if job.kind is JobKind.MARK_READ:
            await telegram_op(client.send_read_acknowledge(entity, max_id=payload.get("max_id")), timeout, "mark_read")
            return {"read": payload.get("max_id")}
        raise PermanentError(f"unknown job kind {job.kind}")

    def status(self) -> dict[str, Any]:
        return {"done": self.done, "failed": self.failed}


# --- 6. the process ---------------------------------------------------------------


def owner_name(settings: WorkerSettings) -> str:
    """This replica's name: its account leases' owner and its heartbeat row (WORKER_ID:host:pid:random)."""
    return f"{settings.worker_id}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def fleet_beat_interval(settings: WorkerSettings) -> float:
    """A replica beats often enough that a killed one leaves the fleet by the time its leases lapse."""
    return min(settings.heartbeat_interval, settings.account_lease_seconds / settings.fleet_liveness_beats)


def fleet_live_seconds(settings: WorkerSettings) -> float:
    """A replica is live while its heartbeat is younger than this."""
    return fleet_beat_interval(settings) * settings.fleet_liveness_beats


async def run_worker(
    settings: WorkerSettings, runtime: BotRuntime | None = None, *, started: Callable[[Worker], None] | None = None
) -> None:
    """The worker process: assemble it (waiting while the database is away), serve until SIGTERM/SIGINT
    (or ``runtime.shutdown.request_stop()``), then drain and stop.

    Args:
        settings: the worker's settings.
        runtime: the kit (tests pass their own; ``main`` makes one).
        started: called with the assembled worker once its loops run (tests wait for it).
    """
    runtime = runtime or BotRuntime(bot="worker", settings=settings)
    async with runtime:
        worker = await assemble_worker(settings, runtime)
        await worker.serve(started)


async def assemble_worker(settings: WorkerSettings, runtime: BotRuntime) -> Worker:
    """Every part of the worker, built once, in the order each needs the others; nothing is wired later."""
    world = open_sandbox(settings, runtime) if settings.sandbox else None
    db = await runtime.open_database(settings)  # waits while the database is away
    runtime.set_detailed_health(lambda: run_checks(settings, database=db, timeout=4))
    cipher = session_cipher(settings)
    if world is not None:
        labels = await runtime.until_started(
            "the sandbox accounts", lambda: seed_sandbox_accounts(db, world, cipher), fix="check the database"
        )
        logger.info("sandbox accounts: %s", ", ".join(labels))
    accepts = sandbox_accepts(settings, world)
    key_check = await check_worker_key(settings, runtime, db, cipher, accepts)

    owner = owner_name(settings)
    sync = Sync(db=db, runtime=runtime, settings=settings)
    # One resolver for every loop: a numeric id not known yet waits for one dialog scan.
    entities = EntityCache(timeout=settings.timeout_telegram_entity, refresh=sync.refresh_peers)

    async def on_connected(connection: AccountConnection) -> None:
        # Work a previous holder of this account had in hand comes back now (see the migration).
        taken = await db.take_over_account(connection.id, owner=owner)
        if taken.outbound or taken.jobs:
            logger.info("took over the previous holder's work for %s: %s", connection.label, taken)
        metrics.account_seen(connection.label)
        await sync.after_connect(connection)

    def account_ready() -> None:
        db.wake("outbound")  # its queued messages go now, not at the next poll
        db.wake(JOBS_CHANNEL)  # and its jobs start now, not after the history loop's 5 s or the jobs loop's 2 s

    pool = AccountPool(
        db=db,
        cipher=cipher,
        client_factory=client_factory(settings, world),
        owner=owner,
        policy=ConnectionPolicy(
            lease_seconds=settings.account_lease_seconds,
            connect_timeout=settings.timeout_telegram_connect,
            call_timeout=settings.timeout_telegram_entity,
            backoff_max=settings.reconnect_backoff_max,
            alert_after=settings.reconnect_alert_after,
        ),
        on_connected=on_connected,
        alerts=runtime.alerts,
        labels=set(settings.worker_accounts) if settings.worker_accounts else None,
        on_client=sync.attach,
        on_ready=lambda connection: account_ready(),
        accepts=accepts,
        fleet=FleetPolicy(live_seconds=fleet_live_seconds(settings), handoff_grace=settings.account_handoff_grace),
    )
    pool.cannot_decrypt(key_check.failed)  # said in our heartbeat: the other replicas take those
    if settings.worker_accounts:
        await check_worker_accounts(db, settings.worker_accounts)

    limits = SendLimits(db=db, runtime=runtime, settings=settings, pool=pool)
    watch = SendWatch(settings=settings, pool=pool)
    sender = MessageSender(
        db=db,
        runtime=runtime,
        settings=settings,
        storage=await open_storage(settings),
        entities=entities,
        limits=limits,
        watch=watch,
        marks=SentMarks(db),
    )
    return Worker(
        settings=settings,
        runtime=runtime,
        db=db,
        pool=pool,
        sync=sync,
        outbound=Outbound(
            db=db, runtime=runtime, settings=settings, owner=owner, pool=pool, sender=sender, limits=limits, watch=watch
        ),
        history=History(db=db, runtime=runtime, settings=settings, owner=owner, pool=pool, entities=entities),
        jobs=Jobs(db=db, runtime=runtime, settings=settings, owner=owner, pool=pool, entities=entities),
    )


def open_sandbox(settings: WorkerSettings, runtime: BotRuntime) -> Any:
    """The local Telegram sandbox's world, announced loudly: no real account is touched."""
    from devkit.sandbox import World, banner
    from devkit.sandbox import describe as describe_sandbox

    directory = settings.sandbox_path
    world = World.open(directory)
    runtime.sandbox = True
    runtime.add_section("sandbox_world", lambda: describe_sandbox(world))
    for line in (
        "*" * 78,
        banner(directory),
        "No TELEGRAM_API_ID/TELEGRAM_API_HASH set: the worker runs on the local sandbox.",
        "Try:  ./start.sh worker send --account demo_one --to alice --wait 'hello'",
        "Then: ./start.sh sandbox inbox alice",
        "*" * 78,
    ):
        logger.warning("%s", line)
    return world


def sandbox_accepts(settings: WorkerSettings, world: Any | None) -> Callable[[Account], bool] | None:
    """The sandbox serves only its own accounts: a real one would be logged out by it (None: every account)."""
    if world is None:
        return None
    # Ingest's own sandbox account is ingest's, so the two walk-throughs run side by side.
    exclude = set() if settings.worker_accounts else {SANDBOX_INGEST_ACCOUNT}
    return lambda account: world.has_account(account.phone) and account.label not in exclude


async def check_worker_key(
    settings: WorkerSettings,
    runtime: BotRuntime,
    db: Database,
    cipher: SessionCipher,
    accepts: Callable[[Account], bool] | None,
) -> KeyCheck:
    """A key that opens none of the sessions this worker should serve is a configuration error: exit 2.

    Nothing is changed on the way out: the accounts are fine, this
    process's SESSION_ENCRYPTION_KEY is not, and a replica with the right
    key goes on serving them.
    """
    labels = set(settings.worker_accounts) if settings.worker_accounts else None
    check = await runtime.until_started(
        "the session key check",
        lambda: check_session_key(db, cipher, labels=labels, accepts=accepts),
        fix="check the database",
    )
    if check.opens_none:
        line = (
            f"CONFIG ERROR: SESSION_ENCRYPTION_KEY decrypts none of the {len(check.failed)} stored "
            "session(s) this worker should serve (a different key from the one that encrypted them); "
            "no account was changed: set the key they were stored with"
        )
        runtime.alerts.alert(AlertType.SESSION_KEY_MISMATCH, line, key="session-key:start")
        raise StartupFailed(line, exit_code=2)
    if check.failed:
        logger.error(
            "SESSION_ENCRYPTION_KEY cannot decrypt the session of %s; those accounts are left as they are (key_mismatch)",
            ", ".join(check.failed),
        )
    return check


async def check_worker_accounts(db: Database, labels: Sequence[str]) -> None:
    """WORKER_ACCOUNTS: say which accounts this worker serves, and which named ones do not exist (yet)."""
    try:
        known = {a.label for a in await db.list_accounts()}
    except Exception as exc:
        logger.warning("could not check WORKER_ACCOUNTS (%s); the accounts loop will", describe(exc))
        return
    missing = [label for label in labels if label not in known]
    logger.info("serving the accounts named by WORKER_ACCOUNTS: %s", ", ".join(labels))
    if missing:
        logger.warning(
            "WORKER_ACCOUNTS names %s, not in telegram_accounts (yet): added later, they are picked up",
            ", ".join(missing),
        )


class Worker:
    """The assembled worker (see :func:`assemble_worker`): one database, one account pool, the loops.

    :meth:`serve` hands the loops, checks and status sections to the runtime
    and runs until shutdown; :meth:`leave` hands the accounts over.
    """

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        runtime: BotRuntime,
        db: Database,
        pool: AccountPool,
        sync: Sync,
        outbound: Outbound,
        history: History,
        jobs: Jobs,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.db = db
        self.pool = pool
        self.sync = sync
        self.outbound = outbound
        self.history = history
        self.jobs = jobs

    async def serve(self, started: Callable[[Worker], None] | None = None) -> None:
        """Run the loops until shutdown, then leave the fleet; ``started(self)`` once they run."""
        settings, runtime, db, pool = self.settings, self.runtime, self.db, self.pool
        runtime.add_ready_check("session_key", pool.check_key)
        runtime.add_section("session_key", pool.key_status)
        runtime.add_cleanup("accounts", pool.close, timeout=settings.timeout_telegram_entity + 5)

        async def accounts_cycle() -> float:
            if runtime.shutdown.stopping:
                return 1.0  # leaving: the accounts are being handed over
            await pool.refresh()
            pool.wake.clear()
            # Until the next check, a joining or leaving replica or a released lease wakes us early.
            await pool.idle(settings.account_check_interval)
            return 0.0

        # Connecting an account (connect, catch_up, a reconciliation pass) may take
        # longer than a plain cycle: the accounts loop gets that much more silence.
        runtime.add_loop(
            "accounts",
            accounts_cycle,
            interval=settings.account_check_interval,
            wake=pool.wake,
            max_silence=settings.watchdog_max_silence + settings.timeout_loop_cycle,
        )
        runtime.add_loop("sync", lambda: self.sync.cycle(pool.connected()), interval=10.0)
        runtime.add_loop("outbound", self.outbound.cycle, interval=settings.outbound_poll_interval)
        # A job created (job_create notifies "jobs") starts at once, not at the next look; so do the
        # jobs of an account that just connected (assemble_worker's account_ready wakes the channel here).
        runtime.add_loop("history", self.history.cycle, interval=5.0, wake=(await db.subscribe(JOBS_CHANNEL)).event)
        runtime.add_loop("jobs", self.jobs.cycle, interval=2.0, wake=(await db.subscribe(JOBS_CHANNEL)).event)
        runtime.gauges.add("outbound_queue", lambda: metrics.refresh_worker_gauges(db, pool), timeout=settings.timeout_db)
        runtime.add_section("accounts", self.accounts_status)
        runtime.add_ready_check("accounts", self.can_send)
        runtime.add_section("fleet", pool.fleet_status)
        runtime.add_section("outbound", self.outbound.status)
        runtime.add_section("sync", self.sync.status)
        runtime.add_section("history_jobs", self.history.status)
        runtime.add_section("jobs", self.jobs.status)
        # One heartbeat row per replica, keyed by its lease owner name: the fleet's membership.
        pinned = sorted(settings.worker_accounts or ())
        runtime.start_heartbeat(
            worker_id=pool.owner,
            store=db,
            interval=fleet_beat_interval(settings),
            fleet=lambda: {"pinned": pinned, "cannot": pool.key_mismatched()},
            remove_on_stop=True,
        )
        if started is not None:
            started(self)
        await runtime.run_until_stopped()
        await self.leave()

    async def leave(self) -> None:
        """SIGTERM: out of the fleet at once (the heartbeat row goes), then every account handed over cleanly."""
        if self.runtime.heartbeat is not None:
            await self.runtime.heartbeat.stop()
        await self.pool.leave()

    async def accounts_status(self) -> dict[str, Any]:
        """Per account: connection, lease, queue depth, counts, flood wait, last error.

        Accounts the pool does not connect (needs_login, disabled) are listed
        too, with the command that fixes them: they are why messages wait.
        """
        depth: dict[int, int] = {}
        for count in await self.db.outbound_counts():
            if count.status in (OutboundStatus.QUEUED, OutboundStatus.SENDING):
                depth[count.account_id] = depth.get(count.account_id, 0) + count.count
        status = self.pool.status()
        for account in await self.db.list_accounts():
            if account.label in status or not self._serves(account.label):
                continue
            status[account.label] = {
                "id": account.id,
                "state": account.status.value,
                "connected": False,
                "last_error": account.last_error,
            }
        for label, entry in status.items():
            entry["queue_depth"] = depth.get(entry["id"], 0)
            if entry.get("state") == AccountStatus.NEEDS_LOGIN.value:
                entry["fix"] = f"./start.sh worker login --label {label}"
        return status

    def _serves(self, label: str) -> bool:
        return not self.settings.worker_accounts or label in self.settings.worker_accounts

    async def can_send(self) -> None:
        """The ``/ready`` check: at least one account is connected.

        Raises:
            PermanentError: none is, naming the accounts that need a login.
        """
        if self.pool.connected():
            return
        waiting = [c.label for c in self.pool.connections.values() if c.state.value == AccountStatus.NEEDS_LOGIN.value]
        with contextlib.suppress(Exception):
            waiting += [
                a.label for a in await self.db.list_accounts(statuses=[AccountStatus.NEEDS_LOGIN])
                if self._serves(a.label) and a.label not in waiting
            ]
        if waiting:
            raise PermanentError(f"no account can send: {', '.join(waiting)} need(s) a login (./start.sh worker login --label LABEL)")
        raise PermanentError("no account can send: none is connected yet")


# --- 7. the command line ----------------------------------------------------------


async def open_cli_database(settings: WorkerSettings) -> Database:
    """The database for a command; in sandbox mode with the sandbox's demo accounts in it (once)."""
    db = await open_database(settings)
    if settings.sandbox:
        from devkit.sandbox import World

        try:
            await seed_sandbox_accounts(db, World.open(settings.sandbox_path), session_cipher(settings))
        except BaseException:
            await db.close()
            raise
    return db


async def cli_accounts(settings: WorkerSettings, as_json: bool) -> int:
    db = await open_cli_database(settings)
    try:
        accounts = await db.list_accounts()
    finally:
        await db.close()
    rows = [
        {
            "label": a.label,
            "phone": mask_phone(a.phone) if a.phone else None,
            "status": a.status.value,
            "has_session": a.has_session,
            "lease_owner": a.lease_owner,
            "lease_expires_at": a.lease_expires_at.isoformat() if a.lease_expires_at else None,
            "last_error": a.last_error,
        }
        for a in accounts
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no accounts (./start.sh worker login adds one)")
    else:
        print(f"{'label':<20} {'status':<12} {'session':<8} {'phone':<16} lease / last error")
        for r in rows:
            lease = f"held by {r['lease_owner']}" if r["lease_owner"] else "-"
            print(f"{r['label']:<20} {r['status']:<12} {'yes' if r['has_session'] else 'no':<8} {r['phone'] or '-':<16} {lease} {r['last_error'] or ''}")
    return 0


async def cli_fleet(settings: WorkerSettings, as_json: bool) -> int:
    """The worker replicas from the database: heartbeat, accounts held and target share of each."""
    from shared.fleet import Member, assign, fleet_rows

    db = await open_database(settings)
    try:
        replicas = await db.worker_fleet(live_seconds=fleet_live_seconds(settings))
        active = await db.list_accounts(statuses=[AccountStatus.ACTIVE])
    finally:
        await db.close()
    live = [Member(r.replica, frozenset(r.pinned), frozenset(r.cannot)) for r in replicas if r.alive]
    assignment = assign([(a.id, a.label) for a in active], live)
    rows = fleet_rows(replicas, assignment)
    held = sum(r.held for r in replicas if r.alive)
    summary = {"replicas": len(live), "active_accounts": len(active), "held": held, "unheld": max(0, len(active) - held)}
    if as_json:
        print(json.dumps({**summary, "fleet": [{"replica": name, **row} for name, row in rows.items()]}, indent=2))
        return 0
    if not rows:
        print(f"no worker replica has a heartbeat row; {len(active)} active account(s) wait for one")
        return 0
    print(f"{'replica':<44} {'state':<8} {'host':<16} {'pid':>7} {'version':<14} {'heartbeat':>10} {'held':>5} {'target':>6}")
    for name, r in rows.items():
        target = "-" if r["target"] is None else str(r["target"])
        pinned = f"  pinned: {', '.join(r['pinned'])}" if r["pinned"] else ""
        print(
            f"{name:<44} {r['state']:<8} {(r['host'] or '-'):<16} {r['pid'] or '-':>7} {(r['version'] or '-'):<14} "
            f"{r['heartbeat_age_s']:>8.1f}s {r['held']:>5} {target:>6}{pinned}"
        )
    print(
        f"{summary['replicas']} live replica(s), {summary['active_accounts']} active account(s), "
        f"{summary['held']} held, {summary['unheld']} not held"
    )
    return 0


async def account_by_label(db: Database, label: str) -> Account:
    """The account labelled ``label``.

    Raises:
        CliError: no such account (the message lists the labels that exist).
    """
    accounts = {a.label: a for a in await db.list_accounts()}
    if label not in accounts:
        known = ", ".join(sorted(accounts)) or "none"
        raise CliError(f"no account labelled {label!r}", f"known: {known}; ./start.sh worker accounts lists them")
    return accounts[label]


def _attachments_of(args: argparse.Namespace) -> list[Any]:
    """The send's attachment list, each local file checked now: missing, empty or too large is bad input."""
    attachments: list[Any] = []
    if args.file:
        path = Path(args.file).expanduser().resolve()
        try:
            check_attachment(path, args.file)
        except PermanentError as exc:
            raise CliError(str(exc), "check the path given to --file") from None
        attachments.append(str(path))
    if args.storage_key:
        attachments.append({"key": args.storage_key})
    return attachments


def _message_parts(args: argparse.Namespace, attachments: Sequence[Any]) -> list[str | None]:
    """The text of each message to queue: one, or several with ``--split``; refused at once when Telegram would refuse it."""
    text = args.text
    if args.split and text and not (not text.strip() and not attachments):
        parts: list[str | None] = list(split_text(text, TEXT_LIMIT, first_limit=CAPTION_LIMIT if attachments else None))
    else:
        parts = [text]
    for index, part in enumerate(parts):
        try:
            check_message(part, attachments if index == 0 else ())
        except PermanentError as exc:
            hint = "use --split to send it as several messages" if "too long" in str(exc) else "give a text, --file or --storage-key"
            if len(attachments) > 1:
                hint = "send one attachment per message"
            raise CliError(str(exc), hint) from None
    return parts


async def cli_send(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """Queue a message (checked now against Telegram's limits); with ``--wait``, report its outcome."""
    attachments = _attachments_of(args)
    parts = _message_parts(args, attachments)
    db = await open_cli_database(settings)
    try:
        account = await account_by_label(db, args.account)
        ids = []
        for index, part in enumerate(parts):
            # Each part is its own row with its own random_id; enqueue order is send order within the chat.
            key = args.key if args.key is None or len(parts) == 1 else f"{args.key}:{index + 1}/{len(parts)}"
            enqueued = await db.enqueue_outbound(
                account.id,
                args.to,
                part,
                attachments=attachments if index == 0 else (),
                reply_to=args.reply_to if index == 0 else None,
                dedupe_key=key,
            )
            ids.append(enqueued.id)
        if args.wait is None:
            for message_id in ids:
                print(message_id)
            return 0
        return await wait_for_outcome(db, account, ids, timeout=args.wait)
    finally:
        await db.close()
        await tracing.shutdown()


#: ``send --wait``: exit 3 when the message is still queued when the wait ends.
EXIT_STILL_QUEUED = 3


async def wait_for_outcome(db: Database, account: Account, ids: Sequence[int], *, timeout: float) -> int:
    """Follow queued messages until each is sent or failed, or ``timeout`` passes; print each outcome.

    Exit code: 0 all sent, 1 any failed (or dead), 3 any still queued.
    """
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    pending = list(ids)
    code = 0
    while pending:
        row = await db.get_outbound(pending[0])
        if row is None:
            print(f"failed: message {pending[0]} is no longer in the database")
            return 1
        if row.status is OutboundStatus.SENT:
            took = (row.sent_at - row.created_at).total_seconds() * 1000 if row.sent_at else 0.0
            print(f"sent: message {row.id} delivered as Telegram message {row.telegram_message_id} in {took:.0f} ms")
            pending.pop(0)
            continue
        if row.status in (OutboundStatus.FAILED, OutboundStatus.DEAD):
            print(f"failed: message {row.id}: {row.last_error or row.status.value} (after {row.attempts} attempt(s))")
            pending.pop(0)
            code = 1
            continue
        if time.monotonic() >= deadline:
            why = await _why_queued(db, account, row)
            for message_id in pending:
                print(f"still queued after {time.monotonic() - started:.0f} s: message {message_id}: {why}")
            return EXIT_STILL_QUEUED
        # The worker NOTIFYs nothing for "sent": poll, gently.
        await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    return code


async def _why_queued(db: Database, account: Account, row: OutboundMessage) -> str:
    """Why a message is still waiting, in words the operator can act on."""
    current = next((a for a in await db.list_accounts() if a.id == account.id), account)
    if current.status is AccountStatus.NEEDS_LOGIN:
        return f"account {current.label} needs login (run: ./start.sh worker login --label {current.label})"
    if current.status is AccountStatus.DISABLED:
        return f"account {current.label} is disabled"
    now = datetime.now(UTC)
    try:
        holds = await db.account_send_holds([current.id])
    except Exception:  # an older schema without send holds: the row's own times still tell
        holds = []
    for hold in holds:
        if hold.flood_until and hold.flood_until > now:
            return f"flood wait until {hold.flood_until:%H:%M:%S} UTC ({hold.flood_reason or 'Telegram asked to wait'})"
        if hold.limited_until and hold.limited_until > now:
            return (f"account limited until {hold.limited_until:%H:%M:%S} UTC: Telegram's spam limit (PEER_FLOOD) "
                    "holds messages to non-contacts")
    if row.next_attempt_at and row.next_attempt_at > now + timedelta(seconds=1):
        reason = row.last_error or "a retry is scheduled"
        if "flood" in reason.lower() or "wait" in reason.lower():
            return f"flood wait until {row.next_attempt_at:%H:%M:%S} UTC ({reason})"
        return f"account limited: next attempt at {row.next_attempt_at:%H:%M:%S} UTC ({reason})"
    if current.lease_owner is None or (current.lease_expires_at and current.lease_expires_at < now):
        return f"no worker is serving account {current.label} (start one: ./start.sh worker)"
    if row.last_error:
        return f"retrying after: {row.last_error}"
    return "the worker has not sent it yet"


async def cli_messages(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """List outbound messages with their status and reason, newest first."""
    db = await open_cli_database(settings)
    try:
        account_id = (await account_by_label(db, args.account)).id if args.account else None
        labels = {a.id: a.label for a in await db.list_accounts()}
        statuses = [OutboundStatus(s) for s in args.status] if args.status else None
        rows = await db.list_outbound(statuses=statuses, account_id=account_id, limit=args.limit)
    finally:
        await db.close()
    listed = [
        {
            "id": r.id,
            "account": labels.get(r.account_id, str(r.account_id)),
            "to": r.peer,
            "status": r.status.value,
            "attempts": r.attempts,
            "telegram_message_id": r.telegram_message_id,
            "created_at": r.created_at.isoformat(),
            "sent_at": r.sent_at.isoformat() if r.sent_at else None,
            "next_attempt_at": r.next_attempt_at.isoformat() if r.next_attempt_at else None,
            "reason": r.last_error,
        }
        for r in rows
    ]
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    if not listed:
        print("no outbound messages" + (" with that status" if statuses else ""))
        return 0
    print(f"{'id':>8}  {'account':<14} {'to':<18} {'status':<8} {'tries':>5}  reason")
    for m in listed:
        reason = m["reason"] or (f"Telegram message {m['telegram_message_id']}" if m["status"] == "sent" else "")
        print(f"{m['id']:>8}  {m['account']:<14} {m['to']:<18} {m['status']:<8} {m['attempts']:>5}  {reason}")
    return 0


async def cli_requeue(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """Put failed or dead outbound messages back in the queue, after the cause is fixed."""
    if not (args.ids or args.account or args.all):
        print("name message ids, --account LABEL or --all (try --dry-run first)", file=sys.stderr)
        return 2
    db = await open_cli_database(settings)
    try:
        account_id = None
        if args.account:
            account_id = (await account_by_label(db, args.account)).id
        statuses = [OutboundStatus(s) for s in args.status] if args.status else [OutboundStatus.FAILED, OutboundStatus.DEAD]
        rows = await db.requeue_outbound(ids=args.ids or None, account_id=account_id, statuses=statuses, dry_run=args.dry_run)
    finally:
        await db.close()
    if args.json:
        print(json.dumps([
            {"id": r.id, "account_id": r.account_id, "peer": r.peer, "was": r.previous_status.value, "last_error": r.last_error}
            for r in rows
        ], indent=2))
        return 0
    verb, outcome = ("would requeue", "would be requeued") if args.dry_run else ("requeued", "requeued")
    for r in rows:
        print(f"{verb} {r.id} to {r.peer} (was {r.previous_status.value}: {r.last_error or 'no error recorded'})")
    print(f"{len(rows)} message(s) {outcome}")
    return 0


async def chat_id_of(db: Database, settings: WorkerSettings, account: Account, peer: str) -> int:
    """The numeric chat id of ``peer`` for a job: a number as given, else a chat the worker already stored.

    A job cannot resolve a username itself without logging in a second copy
    of a session a running worker holds; the sandbox can answer directly.
    """
    text = peer.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    chat = await db.find_chat(account.id, text)
    if chat is not None:
        return chat.telegram_chat_id
    if settings.sandbox:
        from devkit.sandbox import World, SandboxError
        from telethon import types, utils

        try:
            found = World.open(settings.sandbox_path).peer(text)
        except (SandboxError, ValueError):
            found = None
        if found is not None:
            if found.kind.is_user:
                return utils.get_peer_id(types.PeerUser(found.id))
            if found.kind.is_channel:
                return utils.get_peer_id(types.PeerChannel(found.id))
            return utils.get_peer_id(types.PeerChat(found.id))
    raise CliError(
        f"account {account.label} knows no chat {peer!r}",
        "give the numeric chat id, or let the worker receive a message from that chat first",
    )


_RELATIVE = re.compile(r"^\+?(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)$")


def parse_when(raw: str, *, now: datetime | None = None) -> datetime:
    """``--at``: ``now``, ``+30s`` / ``+10m`` / ``+2h`` / ``+1d``, or an ISO 8601 time (UTC when no zone is given)."""
    now = now or datetime.now(UTC)
    text = raw.strip().lower()
    if text == "now":
        return now
    relative = _RELATIVE.match(text)
    if relative:
        unit = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}[relative.group(2)]
        return now + timedelta(seconds=float(relative.group(1)) * unit)
    try:
        when = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise CliError(f"--at {raw!r} is not a time", "use now, +10m, +2h, +1d or 2026-12-24T18:00 (UTC unless a zone is given)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def cli_history(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """Ask the worker to fetch a chat's past messages (a history job)."""
    if args.limit is not None and args.limit <= 0:
        raise CliError(f"--limit must be above 0, got {args.limit}", "leave it out for the whole history")
    db = await open_cli_database(settings)
    try:
        account = await account_by_label(db, args.account)
        chat_id = await chat_id_of(db, settings, account, args.chat)
        payload = {"chat_id": chat_id} if args.limit is None else {"chat_id": chat_id, "target_count": args.limit}
        job = await db.create_job(account.id, JobKind.HISTORY, payload)
    finally:
        await db.close()
    what = f"the last {args.limit} messages" if args.limit else "the whole history"
    print(f"history job {job.id} ({job.status.value}): {what} of chat {chat_id} for {account.label}; "
          "follow it with ./start.sh worker jobs")
    return 0


async def cli_schedule(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """Schedule a send (or an edit, a delete) for a later time (a message job)."""
    when = parse_when(args.at)
    payload: dict[str, Any] = {"peer": args.to}
    if args.delete is not None:
        kind = JobKind.DELETE
        payload["message_ids"] = [args.delete]
    elif args.edit is not None:
        kind = JobKind.EDIT
        if not (args.text or "").strip():
            raise CliError("an edit needs the new text", "give it after the options")
        payload.update(message_id=args.edit, text=args.text)
    else:
        kind = JobKind.SEND
        payload["text"] = args.text
    if kind is not JobKind.DELETE:
        try:
            check_message(args.text, ())
        except PermanentError as exc:
            raise CliError(str(exc), "shorten it, or schedule several messages") from None
    db = await open_cli_database(settings)
    try:
        account = await account_by_label(db, args.account)
        job = await db.create_job(account.id, kind, payload, run_at=when, dedupe_key=args.key)
    finally:
        await db.close()
    print(f"{kind.value} job {job.id} for {account.label} to {args.to} at {job.run_at:%Y-%m-%d %H:%M:%S} UTC; "
          "follow it with ./start.sh worker jobs")
    return 0


async def cli_jobs(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """History and message jobs with their progress, newest first."""
    statuses = [JobStatus(s) for s in args.status] if args.status else None
    db = await open_cli_database(settings)
    try:
        labels = {a.id: a.label for a in await db.list_accounts()}
        history = await db.list_jobs(statuses=statuses, kinds=[JobKind.HISTORY], limit=args.limit)
        scheduled = await db.list_jobs(statuses=statuses, kinds=MESSAGE_JOB_KINDS, limit=args.limit)
    finally:
        await db.close()
    rows: list[dict[str, Any]] = []
    for h in history:
        percent = round(min(100.0, 100.0 * h.fetched_count / h.target_count), 1) if h.target_count else (
            100.0 if h.status is JobStatus.DONE else None
        )
        rows.append({
            "id": h.id, "type": "history", "account": labels.get(h.account_id, str(h.account_id)), "status": h.status.value,
            "chat_id": h.chat_id, "fetched": h.fetched_count, "stored": h.stored_count, "target": h.target_count,
            "percent": percent, "run_at": h.run_at.isoformat(), "attempts": h.attempts, "reason": h.last_error,
        })
    for m in scheduled:
        rows.append({
            "id": m.id, "type": m.kind.value, "account": labels.get(m.account_id, str(m.account_id)), "status": m.status.value,
            "to": m.payload.get("peer"), "run_at": m.run_at.isoformat(), "attempts": m.attempts, "result": m.result,
            "reason": m.last_error,
        })
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no jobs (./start.sh worker history ... or ./start.sh worker schedule ... adds one)")
        return 0
    print(f"{'id':>6}  {'type':<9} {'account':<14} {'status':<8} progress / when")
    for r in rows:
        if r["type"] == "history":
            target = f"/{r['target']}" if r["target"] else ""
            percent = f" ({r['percent']:g}%)" if r["percent"] is not None else ""
            detail = f"chat {r['chat_id']}: {r['fetched']}{target} fetched, {r['stored']} new{percent}"
        else:
            detail = f"to {r['to']} at {r['run_at'][:19].replace('T', ' ')} UTC"
            if r["result"]:
                detail += f" -> {json.dumps(r['result'])}"
        if r["reason"]:
            detail += f"; {r['reason']}"
        print(f"{r['id']:>6}  {r['type']:<9} {r['account']:<14} {r['status']:<8} {detail}")
    return 0


async def cli_login(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """Interactive login: phone, code, 2FA password; stores the encrypted session."""
    phone = args.phone or input("Phone number (international format, e.g. +15551234567): ").strip()
    label = args.label or phone
    world = None
    if settings.sandbox:
        from devkit.sandbox import LOGIN_CODE, World

        world = World.open(settings.sandbox_path)
        world.seed_demo()
        print(f"sandbox mode: the login code is {LOGIN_CODE}")
    client = client_factory(settings, world)(
        Account(0, label, phone, AccountStatus.ACTIVE, False, None, None, None, datetime.now(UTC), datetime.now(UTC)), None
    )
    await telegram_op(client.connect(), settings.timeout_telegram_connect, "connect")
    try:
        await client.start(phone=lambda: phone, code_callback=lambda: input("Login code: ").strip(), password=lambda: getpass.getpass("2FA password: "))
        session = client.session.save()
    finally:
        await client.disconnect()
    db = await open_database(settings)
    try:
        account = await db.upsert_account(label, phone=phone, session=session_cipher(settings).encrypt(session), status=AccountStatus.ACTIVE)
    finally:
        await db.close()
    print(f"account {account.label} logged in; its session is stored encrypted")
    return 0


async def cli_rotate_key(settings: WorkerSettings) -> int:
    """Re-encrypt every session under the newest key (SESSION_ENCRYPTION_KEY="new,old").

    Each row is rewritten on its own: an interruption leaves some rows under
    the old key, which the key list still opens, and running it again
    finishes the job. Nothing is lost.
    """
    if not settings.session_encryption_key or "," not in settings.session_encryption_key:
        print('set SESSION_ENCRYPTION_KEY="NEW_KEY,OLD_KEY" (newest first) to rotate', file=sys.stderr)
        return 2
    cipher = SessionCipher(settings.session_encryption_key)
    db = await open_database(settings)
    rotated = 0
    try:
        for account in await db.list_accounts():
            stored = await db.get_account_session(account.id)
            if stored and not cipher.is_current(stored):
                await db.save_account_session(account.id, cipher.rotate(stored))
                rotated += 1
    finally:
        await db.close()
    print(f"{rotated} session(s) re-encrypted under the new key; drop the old key from SESSION_ENCRYPTION_KEY now")
    return 0


def _seconds(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0 seconds, got {raw}")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser, sub = bot_parser("worker", "The Telegram account worker.", "docs/worker.md")
    login = sub.add_parser("login", help="log in an account and store its encrypted session")
    login.add_argument("--label")
    login.add_argument("--phone")
    accounts = sub.add_parser("accounts", help="list accounts and their state (no secrets)")
    accounts.add_argument("--json", action="store_true")
    send = sub.add_parser(
        "send",
        help="queue an outbound message and print its id",
        epilog="Refused at once (exit 2) when Telegram would refuse it: empty text, text over 4096 "
        "or caption over 1024 UTF-16 units, a missing file. With --wait: exit 0 sent, 1 failed, "
        "3 still queued. Example: ./start.sh worker send --account demo_one --to alice --wait 'hello'",
    )
    send.add_argument("--account", required=True, help="the sending account's label")
    send.add_argument("--to", required=True, help="username, phone or numeric chat id")
    send.add_argument("text", nargs="?", default=None)
    send.add_argument("--file", help="attach this local file")
    send.add_argument("--storage-key", help="attach this object from storage (R2, or DATA_DIR/objects)")
    send.add_argument("--reply-to", type=int)
    send.add_argument("--key", help="dedupe key: the same key never queues twice")
    send.add_argument(
        "--split", action="store_true", help="a text over Telegram's limit goes as several messages, cut at paragraphs, sentences or words"
    )
    send.add_argument(
        "--wait", nargs="?", const="30", default=None, metavar="SECONDS",
        help="wait up to SECONDS (default 30) for the outcome and print it",
    )
    history = sub.add_parser("history", help="fetch a chat's past messages into the database (a history job)")
    history.add_argument("--account", required=True, help="the account whose chat it is")
    history.add_argument("--chat", required=True, help="numeric chat id, or a username / title the worker has seen")
    history.add_argument("--limit", type=int, help="only the newest N messages (default: the whole history)")
    schedule = sub.add_parser(
        "schedule",
        help="send (or edit, delete) a message at a later time (a message job)",
        epilog="--at takes now, +30s, +10m, +2h, +1d or an ISO time such as 2026-12-24T18:00 (UTC unless a zone is given). "
        "Example: ./start.sh worker schedule --account demo_one --to alice --at +1m 'see you'",
    )
    schedule.add_argument("--account", required=True, help="the sending account's label")
    schedule.add_argument("--to", required=True, help="username, phone or numeric chat id")
    schedule.add_argument("--at", required=True, metavar="TIME", help="when to run it")
    change = schedule.add_mutually_exclusive_group()
    change.add_argument("--edit", type=int, metavar="MESSAGE_ID", help="edit this Telegram message to TEXT instead of sending")
    change.add_argument("--delete", type=int, metavar="MESSAGE_ID", help="delete this Telegram message instead of sending")
    schedule.add_argument("--key", help="dedupe key: the same key never schedules twice")
    schedule.add_argument("text", nargs="?", default=None)
    jobs = sub.add_parser("jobs", help="list history and message jobs with their progress")
    jobs.add_argument("--status", action="append", choices=[s.value for s in JobStatus], help="only this status (repeatable)")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many of each type, newest first (default 50)")
    jobs.add_argument("--json", action="store_true")
    messages = sub.add_parser("messages", help="list outbound messages with their status and reason")
    messages.add_argument(
        "--status", action="append", choices=[s.value for s in OutboundStatus], help="only this status (repeatable)"
    )
    messages.add_argument("--account", help="only this account's messages")
    messages.add_argument("--limit", type=int, default=50, help="at most this many, newest first (default 50)")
    messages.add_argument("--json", action="store_true")
    sub.add_parser("rotate-key", help="re-encrypt all sessions under the newest SESSION_ENCRYPTION_KEY")
    fleet = sub.add_parser("fleet", help="list the worker replicas: heartbeat, accounts held, target share")
    fleet.add_argument("--json", action="store_true")
    requeue = sub.add_parser("requeue", help="put failed or dead outbound messages back in the queue")
    requeue.add_argument("ids", nargs="*", type=int, help="message ids (default: every one the other options pick)")
    requeue.add_argument("--account", help="only this account's messages")
    requeue.add_argument("--all", action="store_true", help="every failed or dead message (no ids or account needed)")
    requeue.add_argument("--status", action="append", choices=["failed", "dead"], help="only this status (repeatable)")
    requeue.add_argument("--dry-run", action="store_true", help="list what would be requeued, change nothing")
    requeue.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if getattr(args, "wait", None) is not None:
        # `--wait 'hello'`: a word after --wait is the text, not the seconds.
        try:
            args.wait = _seconds(args.wait)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            if args.text is not None or isinstance(exc, argparse.ArgumentTypeError):
                parser.error(f"argument --wait: {exc}" if isinstance(exc, argparse.ArgumentTypeError) else f"argument --wait: not a number of seconds: {args.wait!r}")
            args.text, args.wait = args.wait, 30.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the worker, or one of its commands; bad input ends as one line, never a traceback."""
    return bot_main(
        argv,
        parse_args=parse_args,
        settings_type=WorkerSettings,
        serve=run_worker,
        commands={
            "accounts": lambda settings, args: cli_accounts(settings, args.json),
            "send": cli_send,
            "messages": cli_messages,
            "history": cli_history,
            "schedule": cli_schedule,
            "jobs": cli_jobs,
            "login": cli_login,
            "rotate-key": lambda settings, args: cli_rotate_key(settings),
            "fleet": lambda settings, args: cli_fleet(settings, args.json),
            "requeue": cli_requeue,
        },
        # only when OTEL_EXPORTER_OTLP_ENDPOINT is set: `send` starts a message's trace
        after_logging=lambda command: tracing.setup("worker"),
    )


if __name__ == "__main__":
    sys.exit(main())
