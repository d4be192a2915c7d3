"""One typed interface over the SQL functions, on a single transport primitive.

:class:`Database` implements every typed method once, on top of
``call(function, args)``: run the SQL function of that name with named
arguments and return its rows as dicts. The transports (asyncpg in
:mod:`shared.db.postgres`, Supabase's HTTP API in :mod:`shared.db.supabase_http`)
only implement ``call``, wake-ups and ``close``; the SQL lives in
``supabase/migrations``. So both backends behave the same by construction.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from shared import tracing
from shared.metrics import TWEET_TRANSITIONS
from shared.db.records import (
    Account,
    AccountStatus,
    Backend,
    Chat,
    ChatKind,
    Enqueued,
    FleetReplica,
    Heartbeat,
    InboundMessage,
    IngestImage,
    IngestRecorded,
    IngestStatus,
    Job,
    JobKind,
    JobStatus,
    OutboundMessage,
    OutboundStatus,
    RecoveredTweet,
    Requeued,
    RequeueResult,
    RetryRow,
    RetryItemStatus,
    QueueStats,
    SendHold,
    SendHoldKind,
    StatusCount,
    StoredMessage,
    Takeover,
    KnownEntity,
    UpdateState,
    Tweet,
    TweetInserted,
    TweetStatus,
    from_row,
    parse_datetime,
)

from shared.db.errors import DatabaseRejected
from shared.text import storable, unstorable_reason

if TYPE_CHECKING:
    from shared.breaker import CircuitBreaker
    from shared.heartbeat import HeartbeatRecord

logger = logging.getLogger(__name__)

#: Channels the SQL functions notify on.
OUTBOUND_CHANNEL = "outbound"
JOBS_CHANNEL = "jobs"

#: Longest wait between two looks at the queue when notifications are not available.
DEFAULT_POLL_INTERVAL = 1.0

#: Rows asked for per call of a set-returning function whose answer grows with
#: the data. Supabase's API answers at most its "Max rows" (1000 by default)
#: per request and says nothing of the rows it leaves out, so lists are read in
#: pages below that, and claims and batches stay below it too.
DEFAULT_PAGE_SIZE = 500


def json_safe(value: Any) -> Any:
    """``value`` with datetimes, UUIDs, enums, tuples and dataclasses made JSON-ready."""
    if isinstance(value, datetime):
        return _aware(value).isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return json_safe(asdict(value))
    return value


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _when(value: datetime | None) -> datetime | None:
    return None if value is None else _aware(value)


def _value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


class Subscription:
    """Wake-ups for one consumer of one notification channel.

    Use: ``sub = await db.subscribe("outbound")`` once, then in the loop
    ``work = await claim(); if not work: await sub.wait(30)``. A notification
    that arrives while the consumer is busy is latched, so the next
    :meth:`wait` returns at once and nothing is missed. While notifications
    are not available (Supabase over HTTP, a transaction pooler, the LISTEN
    connection being down) :meth:`wait` returns after at most
    ``poll_interval`` seconds so the caller looks again.
    """

    def __init__(self, channel: str, *, poll_interval: float, live: Callable[[], bool], on_close: Callable[[Subscription], None] | None = None) -> None:
        self.channel = channel
        self.poll_interval = poll_interval
        self._live = live
        self._on_close = on_close
        self._event = asyncio.Event()
        self.closed = False

    @property
    def live(self) -> bool:
        """True while notifications are being delivered (not polling)."""
        return self._live()

    def notify(self) -> None:
        """Latch a wake-up (called by the transport)."""
        self._event.set()

    @property
    def event(self) -> asyncio.Event:
        """The latched wake-up as an event, for a loop that waits on it beside its own pause
        (``BotRuntime.add_loop(wake=...)``, which clears it). While notifications are not
        available it is never set, and the loop keeps its interval."""
        return self._event

    async def wait(self, timeout: float) -> bool:
        """Wait for a notification.

        Returns:
            True when woken by a notification (consumed by this call); False
            after ``timeout``, or after the poll interval while notifications
            are unavailable. Either way the caller should look for work.
        """
        if self._event.is_set():
            self._event.clear()
            return True
        limit = timeout if self._live() else min(timeout, self.poll_interval)
        try:
            await asyncio.wait_for(self._event.wait(), timeout=max(0.0, limit))
        except TimeoutError:
            return False
        self._event.clear()
        return True

    def close(self) -> None:
        """Stop receiving wake-ups."""
        if not self.closed:
            self.closed = True
            if self._on_close is not None:
                self._on_close(self)


class Database(abc.ABC):
    """Everything the bots keep in PostgreSQL, behind one typed interface.

    Subclasses implement :meth:`call`, :meth:`subscribe`, :meth:`close` and
    :meth:`describe`. Every method may raise
    :class:`shared.db.DatabaseUnavailable` (transient, nothing done),
    :class:`shared.db.DatabaseOutcomeUnknown` (connection lost mid-call),
    :class:`shared.db.DatabaseRejected` (permanent: bad arguments),
    :class:`shared.timeouts.OperationTimeout` (past TIMEOUT_DB) or
    :class:`shared.breaker.CircuitOpenError` (the ``database`` breaker is open).
    """

    backend: Backend
    #: True when the transport answers at most a fixed number of rows per call
    #: and drops the rest silently (Supabase's API: its "Max rows").
    rows_capped: bool = False

    def __init__(self, *, poll_interval: float = DEFAULT_POLL_INTERVAL, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        self.poll_interval = poll_interval
        self.page_size = page_size
        self._default_subscriptions: dict[str, Subscription] = {}
        self._subscriptions: list[Subscription] = []

    # --- transport ----------------------------------------------------------

    @abc.abstractmethod
    async def call(self, function: str, args: Mapping[str, Any], *, read_only: bool = False) -> list[dict[str, Any]]:
        """Run SQL function ``function`` with named arguments; its rows as dicts.

        A function returning a single value yields ``[{function: value}]``.
        ``read_only`` calls cannot have an unknown outcome (and may be retried
        by the transport after a dropped connection).
        """

    @property
    @abc.abstractmethod
    def breaker(self) -> CircuitBreaker:
        """The ``database`` circuit breaker every call goes through."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> Subscription:
        """A :class:`Subscription` to ``channel``, listening before this returns."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections (and stop an embedded server this object started)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Backend, target and health for logs and /status; never a password or key."""

    async def wait_for_wakeup(self, channel: str, timeout: float) -> bool:
        """Wait on a per-channel default :class:`Subscription` (one consumer per channel).

        Returns True when woken by a notification, False after ``timeout`` or a poll interval.
        """
        sub = self._default_subscriptions.get(channel)
        if sub is None or sub.closed:
            sub = await self.subscribe(channel)
            self._default_subscriptions[channel] = sub
        return await sub.wait(timeout)

    def wake(self, channel: str) -> None:
        """Wake this process's subscribers to ``channel`` (:meth:`wait_for_wakeup`, loops waiting on a
        :attr:`Subscription.event`) without a round trip.

        For work that became possible here rather than in the database, e.g. an
        account connected again after an outage: its queued messages and jobs may
        go at once instead of at the next poll.
        """
        for sub in self._subscriptions:
            if sub.channel == channel and not sub.closed:
                sub.notify()

    def _subscribed(self, sub: Subscription) -> Subscription:
        """Keep ``sub`` for :meth:`wake` until it is closed (each backend's :meth:`subscribe` ends here)."""
        self._subscriptions = [kept for kept in self._subscriptions if not kept.closed]
        self._subscriptions.append(sub)
        return sub

    async def _scalar(self, function: str, args: Mapping[str, Any], *, read_only: bool = False) -> Any:
        rows = await self.call(function, args, read_only=read_only)
        if not rows:
            return None
        row = rows[0]
        return row.get(function) if function in row else next(iter(row.values()), None)

    async def _pages(
        self,
        function: str,
        args: Mapping[str, Any],
        after: Callable[[dict[str, Any]], Mapping[str, Any]],
        *,
        limit: int | None = None,
        read_only: bool = True,
    ) -> list[dict[str, Any]]:
        """The rows of a paged function, read ``page_size`` at a time (at most ``limit``).

        The function takes ``p_limit`` and keyset arguments; ``after(row)``
        gives the keyset arguments that continue after ``row`` (its sort key).
        A page shorter than asked for is the last one.
        """
        rows: list[dict[str, Any]] = []
        position: Mapping[str, Any] = {}
        while limit is None or len(rows) < limit:
            want = self.page_size if limit is None else min(self.page_size, limit - len(rows))
            page = await self.call(function, {**args, **position, "p_limit": want}, read_only=read_only)
            rows.extend(page)
            if len(page) < want:
                break
            position = after(page[-1])
        return rows

    def batch_limit(self, limit: int) -> int:
        """The most rows one claim of ``limit`` returns on this backend.

        Where answers are capped (:attr:`rows_capped`), a claim asks for at
        most ``page_size``: a row claimed but cut from the answer would wait
        out its lease unseen.
        """
        return max(1, min(limit, self.page_size)) if self.rows_capped else limit

    async def ping(self) -> datetime:
        """The database's clock; raises like any call when it is unreachable."""
        value = await self._scalar("db_ping", {}, read_only=True)
        parsed = parse_datetime(value)
        assert parsed is not None
        return parsed

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- accounts ---------------------------------------------------------------

    async def upsert_account(
        self,
        label: str,
        *,
        phone: str | None = None,
        session: str | None = None,
        status: AccountStatus | None = None,
    ) -> Account:
        """Create an account or update it by ``label``; None keeps a stored value.

        ``session`` is the already encrypted session string; it is never returned by listings.
        """
        rows = await self.call(
            "account_upsert",
            {"p_label": label, "p_phone": phone, "p_session_encrypted": session, "p_status": _value(status)},
        )
        return from_row(Account, rows[0])

    async def list_accounts(self, *, statuses: Iterable[AccountStatus] | None = None) -> list[Account]:
        args = {"p_statuses": None if statuses is None else [_value(s) for s in statuses]}
        rows = await self._pages("account_list", args, lambda r: {"p_after": r["id"]})
        return [from_row(Account, r) for r in rows]

    async def get_account_session(self, account_id: int) -> str | None:
        """The encrypted session string of an account (None when it has none)."""
        return await self._scalar("account_get_session", {"p_account_id": account_id}, read_only=True)

    async def save_account_session(self, account_id: int, session: str | None) -> bool:
        return bool(await self._scalar("account_save_session", {"p_account_id": account_id, "p_session_encrypted": session}))

    async def set_account_status(self, account_id: int, status: AccountStatus, *, last_error: str | None = None) -> bool:
        args = {"p_account_id": account_id, "p_status": _value(status), "p_last_error": last_error}
        return bool(await self._scalar("account_set_status", args))

    async def acquire_account_lease(self, account_id: int, *, owner: str, seconds: float) -> str | None:
        """Take the account's lease for ``seconds``.

        Returns:
            The lease token, or None while another live owner holds it. The
            same ``owner`` asking again keeps its token and extends the lease.
        """
        args = {"p_account_id": account_id, "p_owner": owner, "p_lease_seconds": float(seconds)}
        token = await self._scalar("account_lease_acquire", args)
        return None if token is None else str(token)

    async def renew_account_lease(self, account_id: int, token: str, *, seconds: float) -> bool:
        """Extend our lease; False means it was lost (stop using the account now)."""
        args = {"p_account_id": account_id, "p_token": token, "p_lease_seconds": float(seconds)}
        return bool(await self._scalar("account_lease_renew", args))

    async def release_account_lease(self, account_id: int, token: str) -> bool:
        return bool(await self._scalar("account_lease_release", {"p_account_id": account_id, "p_token": token}))

    # --- a Telegram session's state beyond its auth key ---------------------------

    async def get_update_states(self, account_id: int) -> list[UpdateState]:
        """The account's saved update state (entity 0) and its channels' pts, read in pages."""
        rows = await self._pages("telegram_state_get", {"p_account_id": account_id}, lambda r: {"p_after": r["entity_id"]})
        return [from_row(UpdateState, r) for r in rows]

    async def save_update_states(self, account_id: int, states: Sequence[UpdateState]) -> int:
        if not states:
            return 0
        payload = [json_safe(s) for s in states]
        return int(await self._scalar("telegram_state_save", {"p_account_id": account_id, "p_states": payload}) or 0)

    async def clear_update_states(self, account_id: int) -> int:
        """Forget the update state: the next connect starts from now and relies on the dialog scan."""
        return int(await self._scalar("telegram_state_clear", {"p_account_id": account_id}) or 0)

    async def save_entities(self, account_id: int, entities: Sequence[KnownEntity]) -> int:
        if not entities:
            return 0
        payload = [json_safe(e) for e in entities]
        return int(await self._scalar("telegram_entities_save", {"p_account_id": account_id, "p_entities": payload}) or 0)

    async def list_entities(self, account_id: int) -> list[KnownEntity]:
        """Every entity the account has seen, read in pages."""
        rows = await self._pages("telegram_entities_page", {"p_account_id": account_id}, lambda r: {"p_after": r["peer_id"]})
        return [from_row(KnownEntity, r) for r in rows]

    # --- named process leases (one active replica) -----------------------------------------

    async def acquire_process_lease(self, name: str, *, owner: str, seconds: float) -> str | None:
        """Take the lease ``name`` for ``seconds``: its token, or None while another live owner holds it."""
        args = {"p_name": name, "p_owner": owner, "p_lease_seconds": float(seconds)}
        token = await self._scalar("process_lease_acquire", args)
        return str(token) if token else None

    async def renew_process_lease(self, name: str, token: str, *, seconds: float) -> bool:
        """Extend our lease; False means it was lost (stop acting as the active one now)."""
        args = {"p_name": name, "p_token": token, "p_lease_seconds": float(seconds)}
        return bool(await self._scalar("process_lease_renew", args))

    async def release_process_lease(self, name: str, token: str) -> bool:
        return bool(await self._scalar("process_lease_release", {"p_name": name, "p_token": token}))

    async def process_lease_holder(self, name: str) -> str | None:
        """The owner holding the lease ``name`` now, if any."""
        rows = await self.call("process_lease_holder", {"p_name": name}, read_only=True)
        return str(rows[0]["owner"]) if rows else None

    async def recover_account_from_key_mismatch(self, account_id: int) -> bool:
        """Back to active an account an older process marked needs_login only because its key could not decrypt
        the session; False (and unchanged) for any other account, a real logout included."""
        return bool(await self._scalar("account_key_recovered", {"p_account_id": account_id}))

    # --- chats and inbound messages ------------------------------------------------

    async def upsert_chat(
        self,
        account_id: int,
        telegram_chat_id: int,
        *,
        kind: ChatKind | None = None,
        title: str | None = None,
        username: str | None = None,
    ) -> Chat:
        args = {
            "p_account_id": account_id,
            "p_telegram_chat_id": telegram_chat_id,
            "p_kind": _value(kind),
            "p_title": title,
            "p_username": username,
        }
        return from_row(Chat, (await self.call("chat_upsert", args))[0])

    async def find_chat(self, account_id: int, ref: str) -> Chat | None:
        """A chat of the account known by username (``@name``) or title, or None."""
        rows = await self.call("chat_find", {"p_account_id": account_id, "p_ref": ref}, read_only=True)
        return from_row(Chat, rows[0]) if rows else None

    async def get_chat(self, account_id: int, telegram_chat_id: int) -> Chat | None:
        args = {"p_account_id": account_id, "p_telegram_chat_id": telegram_chat_id}
        rows = await self.call("chat_get", args, read_only=True)
        return from_row(Chat, rows[0]) if rows else None

    async def chat_cursors(self, account_id: int, telegram_chat_ids: Sequence[int]) -> dict[int, int]:
        """Stored cursors (last message id) of these chats; chats never stored are absent."""
        cursors: dict[int, int] = {}
        ids = list(dict.fromkeys(telegram_chat_ids))
        for start in range(0, len(ids), self.page_size):
            args = {"p_account_id": account_id, "p_telegram_chat_ids": ids[start : start + self.page_size]}
            for row in await self.call("chats_cursors", args, read_only=True):
                cursors[int(row["telegram_chat_id"])] = int(row["last_message_id"])
        return cursors

    async def recent_chats(self, account_id: int, *, since: datetime | None = None, limit: int = 100) -> list[Chat]:
        """Chats of an account with their cursors, most recently active first."""
        args = {"p_account_id": account_id, "p_since": _when(since)}
        rows = await self._pages(
            "chats_recent", args, lambda r: {"p_after_at": r["last_message_at"], "p_after_id": r["id"]}, limit=limit
        )
        return [from_row(Chat, r) for r in rows]

    async def store_messages(
        self, account_id: int, messages: Sequence[InboundMessage], *, advance_cursor: bool = True
    ) -> list[StoredMessage]:
        """Store messages once each (by account, chat, Telegram id), upsert their
        chats and move each chat's cursor up to the greatest id stored.

        Returns one :class:`StoredMessage` per input, in order.
        """
        if not messages:
            return []
        payload = [
            {
                "chat_id": m.chat_id,
                "telegram_message_id": m.telegram_message_id,
                "direction": _value(m.direction),
                "sender_id": m.sender_id,
                "text": storable(m.text),
                "attachments": json_safe(list(m.attachments)),
                "reply_to": m.reply_to,
                "sent_at": json_safe(m.sent_at),
                "chat_kind": _value(m.chat_kind),
                "chat_title": storable(m.chat_title),
                "chat_username": m.chat_username,
            }
            for m in messages
        ]
        if len(payload) <= self.page_size:
            args = {"p_account_id": account_id, "p_messages": payload, "p_advance_cursor": advance_cursor}
            return [from_row(StoredMessage, r) for r in await self.call("messages_store", args)]
        # One answer row per message: a long list goes in batches, and the
        # cursors move only once every batch is stored (storing a chat's
        # newest message again stores nothing and moves its cursor).
        stored: list[StoredMessage] = []
        for start in range(0, len(payload), self.page_size):
            args = {"p_account_id": account_id, "p_messages": payload[start : start + self.page_size], "p_advance_cursor": False}
            stored.extend(from_row(StoredMessage, r) for r in await self.call("messages_store", args))
        if advance_cursor:
            newest: dict[Any, dict[str, Any]] = {}
            for item in payload:
                known = newest.get(item["chat_id"])
                if known is None or item["telegram_message_id"] > known["telegram_message_id"]:
                    newest[item["chat_id"]] = item
            heads = list(newest.values())
            for start in range(0, len(heads), self.page_size):
                args = {"p_account_id": account_id, "p_messages": heads[start : start + self.page_size], "p_advance_cursor": True}
                await self.call("messages_store", args)
        return stored

    async def store_message(self, account_id: int, message: InboundMessage, *, advance_cursor: bool = True) -> bool:
        """Store one message; True when it was new."""
        stored = await self.store_messages(account_id, [message], advance_cursor=advance_cursor)
        return stored[0].inserted

    # --- outbound queue ---------------------------------------------------------------

    async def enqueue_outbound(
        self,
        account_id: int,
        peer: str | int,
        text: str | None = None,
        *,
        attachments: Sequence[Any] = (),
        reply_to: int | None = None,
        chat_id: int | None = None,
        dedupe_key: str | None = None,
        send_at: datetime | None = None,
    ) -> Enqueued:
        """Queue a message and wake the claimers (NOTIFY ``outbound``).

        Args:
            peer: the recipient as the user gave it (username, phone or
                numeric id); rows of one (account, peer) go out in order.
            attachments: storage keys or paths (JSON values).
            chat_id: the resolved Telegram chat id, when known.
            dedupe_key: makes a repeated enqueue return the first row instead
                of queueing a duplicate (use it when the caller may retry).
            send_at: not before this time.

        Raises:
            DatabaseRejected: no peer, or neither text nor attachments, or
                text PostgreSQL cannot store ("the text contains a NUL
                character at position N"): a message goes out exactly as
                written or not at all, never silently changed.
        """
        refused = unstorable_reason(text)
        if refused is not None:
            raise DatabaseRejected(refused)
        # The trace of this message starts here; the row carries it to the worker that sends it.
        with tracing.span("outbound.enqueue", attributes={"account_id": account_id}, kind=tracing.SpanKind.PRODUCER):
            args = {
                "p_account_id": account_id,
                "p_peer": str(peer),
                "p_text": text,
                "p_attachments": json_safe(list(attachments)),
                "p_reply_to": reply_to,
                "p_chat_id": chat_id,
                "p_dedupe_key": dedupe_key,
                "p_send_at": _when(send_at),
                "p_traceparent": tracing.current_traceparent(),
            }
            enqueued = from_row(Enqueued, (await self.call("outbound_enqueue", args))[0])
            tracing.annotate(message_id=enqueued.id, created=enqueued.created)
            return enqueued

    async def claim_outbound(
        self,
        account_ids: Sequence[int],
        *,
        owner: str,
        limit: int = 50,
        lease_seconds: float = 60.0,
        per_chat_limit: int = 10,
        max_retries: int = 5,
    ) -> list[OutboundMessage]:
        """Claim due rows of these accounts (see ``outbound_claim`` in the migrations).

        Rows come back in (account, peer, id) order, all with one fresh lease
        token; within a chat they are consecutive from its oldest unfinished
        row. Rows whose lease expired are claimed again (their ``attempts``
        shows it; ``random_id`` is unchanged).
        """
        if not account_ids:
            return []
        args = {
            "p_account_ids": list(account_ids),
            "p_owner": owner,
            "p_limit": self.batch_limit(limit),
            "p_lease_seconds": float(lease_seconds),
            "p_per_chat_limit": per_chat_limit,
            "p_max_retries": max_retries,
        }
        return [from_row(OutboundMessage, r) for r in await self.call("outbound_claim", args)]

    async def mark_sent(self, message_id: int, token: str, *, telegram_message_id: int, chat_id: int | None = None) -> bool:
        """Record a send. False when the lease was lost to another claimer (do not report it as ours)."""
        args = {
            "p_id": message_id,
            "p_token": token,
            "p_telegram_message_id": telegram_message_id,
            "p_chat_id": chat_id,
        }
        return bool(await self._scalar("outbound_mark_sent", args))

    async def mark_sent_many(self, marks: Sequence[tuple[int, str, int, int | None]]) -> list[bool]:
        """Record several sends in one statement (one commit): ``(message_id, token,
        telegram_message_id, chat_id)`` each; per mark, what :meth:`mark_sent` would return.

        The commit does not wait for the disk (see worker.SentMarks for why a mark lost in a
        crash of the database server is safe); the marks are visible to every claimer at once."""
        if not marks:
            return []
        args = {
            "p_ids": [m[0] for m in marks],
            "p_tokens": [m[1] for m in marks],
            "p_telegram_message_ids": [m[2] for m in marks],
            "p_chat_ids": [m[3] for m in marks],
        }
        rows = await self.call("outbound_mark_sent_many", args)
        marked = {int(r["id"]): bool(r["marked"]) for r in rows}
        return [marked.get(m[0], False) for m in marks]

    async def mark_failed(
        self,
        message_id: int,
        token: str,
        error: str,
        *,
        permanent: bool,
        retry_at: datetime | None = None,
        max_retries: int = 5,
        base_delay: float = 60.0,
        max_delay: float = 3600.0,
    ) -> OutboundStatus | None:
        """Record a failed attempt.

        Returns:
            FAILED for a permanent error; QUEUED with the next attempt at
            ``retry_at`` or after ``base_delay * 2**(attempts-1)`` (capped);
            DEAD once ``max_retries`` retries are used up; None when the
            lease was lost.
        """
        args = {
            "p_id": message_id,
            "p_token": token,
            "p_error": error,
            "p_permanent": permanent,
            "p_retry_at": _when(retry_at),
            "p_max_retries": max_retries,
            "p_base_delay": float(base_delay),
            "p_max_delay": float(max_delay),
        }
        status = await self._scalar("outbound_mark_failed", args)
        return None if status is None else OutboundStatus(status)

    async def mark_dead(self, message_id: int, token: str, error: str) -> bool:
        args = {"p_id": message_id, "p_token": token, "p_error": error}
        return bool(await self._scalar("outbound_mark_dead", args))

    async def release_outbound(self, message_ids: Sequence[int], token: str) -> int:
        """Put claimed rows back without counting the attempt; how many went back."""
        if not message_ids:
            return 0
        return int(await self._scalar("outbound_release", {"p_ids": list(message_ids), "p_token": token}) or 0)

    async def take_back_own_outbound(
        self, account_id: int, *, owner: str, account_token: str, keep_tokens: Sequence[str] = ()
    ) -> int:
        """Put back the rows ``owner`` claimed for this account and no longer has in hand
        (those of a cycle an outage cut); how many went back.

        Fenced by the account lease: nothing happens unless ``account_token``
        is the account's current lease and ``owner`` holds it. Rows claimed
        under ``keep_tokens`` (batches still being sent) stay as they are.
        """
        args = {"p_account_id": account_id, "p_owner": owner, "p_account_token": account_token, "p_keep_tokens": list(keep_tokens)}
        return int(await self._scalar("outbound_take_back_own", args) or 0)

    async def reschedule_outbound(self, message_id: int, token: str, *, at: datetime, reason: str | None = None) -> bool:
        """Back to the queue until ``at`` without counting the attempt (a flood wait)."""
        args = {"p_id": message_id, "p_token": token, "p_at": _aware(at), "p_reason": reason}
        return bool(await self._scalar("outbound_reschedule", args))

    async def requeue_expired_outbound(self, *, max_retries: int = 5) -> RequeueResult:
        """Take back rows whose worker died while sending (a sweeper; claims do it too)."""
        rows = await self.call("outbound_requeue_expired", {"p_max_retries": max_retries})
        return from_row(RequeueResult, rows[0])

    async def hold_account_sends(
        self, account_id: int, kind: SendHoldKind, *, until: datetime, reason: str | None = None
    ) -> datetime:
        """Hold the account's sends (``flood``: all; ``limited``: to non-contacts) until ``until``.

        A longer hold already stored is kept. Returns the end now in force.
        """
        args = {"p_account_id": account_id, "p_kind": _value(kind), "p_until": _aware(until), "p_reason": reason}
        parsed = parse_datetime(await self._scalar("account_send_hold", args))
        assert parsed is not None
        return parsed

    async def account_send_holds(self, account_ids: Sequence[int] | None = None) -> list[SendHold]:
        """The send holds still running, of these accounts (None: every account)."""
        args = {"p_account_ids": None if account_ids is None else list(account_ids)}
        rows = await self._pages("account_send_holds_list", args, lambda r: {"p_after": r["account_id"]})
        return [from_row(SendHold, r) for r in rows]

    async def take_over_account(self, account_id: int, *, owner: str) -> Takeover:
        """Take back the work another holder of this account had in hand (call it
        right after acquiring the account's lease): its sending outbound rows and
        running jobs go back to the queue at once.

        Safe because the lease says nobody else works for the account now; rows
        keep their ``random_id`` and lose their lease token, so the old
        holder's late marks are refused.
        """
        rows = await self.call("account_takeover", {"p_account_id": account_id, "p_owner": owner})
        return from_row(Takeover, rows[0])

    async def get_outbound(self, message_id: int) -> OutboundMessage | None:
        rows = await self.call("outbound_get", {"p_id": message_id}, read_only=True)
        return from_row(OutboundMessage, rows[0]) if rows else None

    async def list_outbound(
        self, *, statuses: Iterable[OutboundStatus] | None = None, account_id: int | None = None, limit: int = 50
    ) -> list[OutboundMessage]:
        """Outbound messages, newest first (the operator's ``messages``)."""
        args = {
            "p_statuses": [s.value for s in statuses] if statuses is not None else None,
            "p_account_id": account_id,
            "p_limit": limit,
        }
        rows = await self.call("outbound_list", args, read_only=True)
        return [from_row(OutboundMessage, r) for r in rows]

    async def outbound_counts(self, account_id: int | None = None) -> list[StatusCount]:
        """Outbound rows per account and status (for /status)."""
        rows = await self._pages(
            "outbound_counts",
            {"p_account_id": account_id},
            lambda r: {"p_after_account_id": r["account_id"], "p_after_status": r["status"]},
        )
        return [from_row(StatusCount, r) for r in rows]

    async def outbound_queue_stats(self) -> list[QueueStats]:
        """Per account with rows to send: depth, due now, and the oldest due row's seconds since enqueue."""
        rows = await self._pages("outbound_queue_stats", {}, lambda r: {"p_after": r["account_id"]})
        return [from_row(QueueStats, r) for r in rows]

    async def requeue_outbound(
        self,
        *,
        ids: Sequence[int] | None = None,
        account_id: int | None = None,
        statuses: Sequence[OutboundStatus] = (OutboundStatus.FAILED, OutboundStatus.DEAD),
        dry_run: bool = False,
    ) -> list[Requeued]:
        """Put failed or dead outbound messages back in the queue (the operator's ``requeue``).

        Each keeps its random_id (a resend of something that did arrive is a
        duplicate Telegram recognises) and starts its attempts again. ``ids``
        and ``account_id`` narrow the choice; ``dry_run`` only lists it.
        Done a page at a time (each page is committed on its own): a run cut
        short leaves the rest failed or dead, for the next run.
        """
        args = {
            "p_ids": list(ids) if ids is not None else None,
            "p_account_id": account_id,
            "p_statuses": [s.value for s in statuses],
            "p_dry_run": dry_run,
        }
        rows = await self._pages("outbound_requeue", args, lambda r: {"p_after": r["id"]}, read_only=False)
        return [from_row(Requeued, r) for r in rows]

    async def queue_depth(self, account_id: int) -> int:
        """Rows of an account still to send (queued or being sent)."""
        counts = await self.outbound_counts(account_id)
        return sum(c.count for c in counts if c.status in (OutboundStatus.QUEUED, OutboundStatus.SENDING))

    # --- heartbeats -----------------------------------------------------------------------

    async def write_heartbeat(self, record: HeartbeatRecord) -> None:
        """Upsert a worker's heartbeat (the ``shared.heartbeat.HeartbeatStore`` protocol)."""
        args = {
            "p_worker_id": record.worker_id,
            "p_status": record.status,
            "p_loops": json_safe(record.loops),
            "p_version": record.version,
            "p_host": record.host,
            "p_pid": record.pid,
        }
        if record.fleet is not None:
            args["p_fleet"] = json_safe(record.fleet)
        await self.call("worker_heartbeat_upsert", args)

    async def remove_heartbeat(self, worker_id: str) -> bool:
        """Delete a heartbeat row: a worker replica leaving the fleet on purpose."""
        return bool(await self._scalar("worker_heartbeat_remove", {"p_worker_id": worker_id}))

    async def worker_fleet(self, *, live_seconds: float) -> list[FleetReplica]:
        """Every worker replica's heartbeat row, live (younger than ``live_seconds``) or not, with its held leases."""
        rows = await self.call("worker_fleet", {"p_live_seconds": float(live_seconds)})
        return [from_row(FleetReplica, r) for r in rows]

    async def account_work_in_hand(self, account_id: int, *, owner: str) -> int:
        """Rows ``owner`` is still sending or running for the account (a clean handoff waits for none)."""
        return int(await self._scalar("account_work_in_hand", {"p_account_id": account_id, "p_owner": owner}, read_only=True) or 0)

    async def list_heartbeats(self) -> list[Heartbeat]:
        rows = await self._pages("worker_heartbeats_list", {}, lambda r: {"p_after": r["worker_id"]})
        return [from_row(Heartbeat, r) for r in rows]

    # --- jobs (history sync and scheduled message work) ---------------------------------------

    async def create_job(
        self,
        account_id: int,
        kind: JobKind,
        payload: Mapping[str, Any],
        *,
        run_at: datetime | None = None,
        dedupe_key: str | None = None,
    ) -> Job:
        """Schedule work; a repeated ``dedupe_key`` returns the first job, and a
        history job for a chat that has one open returns the open one.

        A history job's payload is ``{"chat_id": ..., "target_count": ...}``
        (no target: the whole history).

        Raises:
            DatabaseRejected: the payload's text cannot be stored (a send or an
                edit goes out exactly as written or not at all).
        """
        refused = unstorable_reason(payload.get("text") if isinstance(payload.get("text"), str) else None)
        if refused is not None:
            raise DatabaseRejected(refused)
        args = {
            "p_account_id": account_id,
            "p_kind": _value(kind),
            "p_payload": json_safe(dict(payload)),
            "p_run_at": _when(run_at),
            "p_dedupe_key": dedupe_key,
        }
        return from_row(Job, (await self.call("job_create", args))[0])

    async def claim_jobs(
        self,
        account_ids: Sequence[int],
        kinds: Iterable[JobKind],
        *,
        owner: str,
        limit: int = 10,
        lease_seconds: float = 120.0,
        max_retries: int = 5,
    ) -> list[Job]:
        """Due jobs of these kinds and accounts, oldest first, under one fresh lease token."""
        if not account_ids:
            return []
        args = {
            "p_account_ids": list(account_ids),
            "p_kinds": [_value(k) for k in kinds],
            "p_owner": owner,
            "p_limit": self.batch_limit(limit),
            "p_lease_seconds": float(lease_seconds),
            "p_max_retries": max_retries,
        }
        return [from_row(Job, r) for r in await self.call("job_claim", args)]

    async def save_job_progress(
        self,
        job_id: int,
        token: str,
        *,
        cursor: int,
        fetched: int = 0,
        stored: int = 0,
        lease_seconds: float = 300.0,
    ) -> bool:
        """Save a resumable job's progress (a history page) and extend the lease; False when the lease was lost."""
        args = {
            "p_id": job_id,
            "p_token": token,
            "p_cursor": cursor,
            "p_fetched_delta": fetched,
            "p_stored_delta": stored,
            "p_lease_seconds": float(lease_seconds),
        }
        return bool(await self._scalar("job_save_progress", args))

    async def complete_job(self, job_id: int, token: str, *, result: Any = None) -> bool:
        """Done (with ``result``); False when the lease was lost."""
        args = {"p_id": job_id, "p_token": token, "p_result": json_safe(result)}
        return bool(await self._scalar("job_complete", args))

    async def fail_job(
        self,
        job_id: int,
        token: str,
        error: str,
        *,
        permanent: bool,
        retry_at: datetime | None = None,
        max_retries: int = 5,
        base_delay: float = 60.0,
        max_delay: float = 3600.0,
    ) -> JobStatus | None:
        """Record a failure: the new status (pending again, failed, dead), or None when the lease was lost."""
        args = _fail_args(job_id, token, error, permanent, retry_at, max_retries, base_delay, max_delay)
        status = await self._scalar("job_fail", args)
        return None if status is None else JobStatus(status)

    async def release_jobs(self, job_ids: Sequence[int], token: str) -> int:
        """Hand running jobs back without counting the attempt (progress kept); how many were released."""
        if not job_ids:
            return 0
        return int(await self._scalar("job_release", {"p_ids": list(job_ids), "p_token": token}) or 0)

    async def requeue_jobs(self, job_ids: Sequence[int]) -> list[Job]:
        """Failed or dead jobs due again now with fresh attempts; returns the named jobs as they are now."""
        if not job_ids:
            return []
        return [from_row(Job, r) for r in await self.call("job_requeue", {"p_ids": list(job_ids)})]

    async def get_job(self, job_id: int) -> Job | None:
        rows = await self.call("job_get", {"p_id": job_id}, read_only=True)
        return from_row(Job, rows[0]) if rows else None

    async def list_jobs(
        self, *, statuses: Iterable[JobStatus] | None = None, kinds: Iterable[JobKind] | None = None, limit: int = 50
    ) -> list[Job]:
        """Jobs, newest first (the operator's ``jobs``), read in pages."""
        args = {
            "p_statuses": [s.value for s in statuses] if statuses is not None else None,
            "p_kinds": [_value(k) for k in kinds] if kinds is not None else None,
        }
        rows = await self._pages("jobs_list", args, lambda r: {"p_after": r["id"]}, limit=limit)
        return [from_row(Job, r) for r in rows]

    # --- retry queue rows (see shared.db.retry_store for the RetryStore protocol) ------------

    async def upsert_retry_item(
        self,
        bot: str,
        *,
        item_id: str,
        kind: str,
        payload: Mapping[str, Any],
        attempts: int,
        next_attempt_at: datetime,
        last_error: str | None,
        created_at: datetime | None = None,
    ) -> RetryItemStatus:
        args = {
            "p_bot": bot,
            "p_id": item_id,
            "p_kind": kind,
            "p_payload": json_safe(dict(payload)),
            "p_attempts": attempts,
            "p_next_attempt_at": _aware(next_attempt_at),
            "p_last_error": last_error,
            "p_created_at": _when(created_at),
        }
        return RetryItemStatus(await self._scalar("retry_item_upsert", args))

    async def exhaust_retry_item(
        self,
        bot: str,
        *,
        item_id: str,
        kind: str,
        payload: Mapping[str, Any],
        attempts: int,
        last_error: str | None,
        created_at: datetime | None = None,
    ) -> None:
        args = {
            "p_bot": bot,
            "p_id": item_id,
            "p_kind": kind,
            "p_payload": json_safe(dict(payload)),
            "p_attempts": attempts,
            "p_last_error": last_error,
            "p_created_at": _when(created_at),
        }
        await self.call("retry_item_exhaust", args)

    async def remove_retry_item(self, bot: str, item_id: str) -> bool:
        return bool(await self._scalar("retry_item_remove", {"p_bot": bot, "p_id": item_id}))

    async def pending_retry_items(self, bot: str, *, limit: int = 100) -> list[RetryRow]:
        rows = await self._pages(
            "retry_items_pending",
            {"p_bot": bot},
            lambda r: {"p_after_next_attempt_at": r["next_attempt_at"], "p_after_created_at": r["created_at"], "p_after_id": r["id"]},
            limit=limit,
        )
        return [from_row(RetryRow, r) for r in rows]

    async def exhausted_retry_items(self, bot: str, *, limit: int = 100) -> list[RetryRow]:
        rows = await self._pages(
            "retry_items_exhausted", {"p_bot": bot}, lambda r: {"p_after_updated_at": r["updated_at"], "p_after_id": r["id"]}, limit=limit
        )
        return [from_row(RetryRow, r) for r in rows]

    async def count_retry_items(self, bot: str, statuses: Iterable[RetryItemStatus]) -> int:
        args = {"p_bot": bot, "p_statuses": [_value(s) for s in statuses]}
        return int(await self._scalar("retry_items_count", args, read_only=True) or 0)

    # --- ingest ----------------------------------------------------------------------------

    async def record_ingest_image(
        self,
        channel_id: int,
        message_id: int,
        *,
        status: IngestStatus = IngestStatus.STORED,
        storage_key: str | None = None,
        sha256: str | None = None,
        width: int | None = None,
        height: int | None = None,
        size_bytes: int | None = None,
        mime: str | None = None,
        error: str | None = None,
    ) -> IngestRecorded:
        """Record an image once per (channel, message); a pending or failed record
        may be replaced, a stored or skipped one is final (``applied`` False)."""
        args = {
            "p_channel_id": channel_id,
            "p_message_id": message_id,
            "p_status": _value(status),
            "p_storage_key": storage_key,
            "p_sha256": sha256,
            "p_width": width,
            "p_height": height,
            "p_bytes": size_bytes,
            "p_mime": mime,
            "p_error": storable(error),
        }
        row = (await self.call("ingest_image_record", args))[0]
        return IngestRecorded(applied=bool(row["applied"]), image=from_row(IngestImage, row))

    async def get_ingest_image(self, channel_id: int, message_id: int) -> IngestImage | None:
        rows = await self.call("ingest_image_get", {"p_channel_id": channel_id, "p_message_id": message_id}, read_only=True)
        return from_row(IngestImage, rows[0]) if rows else None

    async def ingest_images_by_sha256(self, sha256: str) -> list[IngestImage]:
        rows = await self._pages("ingest_images_by_sha256", {"p_sha256": sha256}, lambda r: {"p_after": r["id"]})
        return [from_row(IngestImage, r) for r in rows]

    async def ingest_stored_keys(self, keys: Sequence[str]) -> set[str]:
        """The storage keys among ``keys`` that some ingest row points at (one call for the whole batch)."""
        found: set[str] = set()
        keys = list(keys)
        # At most one answer row per key: batches below the API's row cap.
        for start in range(0, len(keys), self.page_size):
            rows = await self.call("ingest_stored_keys", {"p_keys": keys[start : start + self.page_size]}, read_only=True)
            found.update(str(next(iter(r.values()))) for r in rows)
        return found

    async def get_ingest_cursor(self, channel_id: int) -> int | None:
        """The channel's cursor, or None when ingest has never chosen where the channel starts."""
        value = await self._scalar("ingest_cursor_get", {"p_channel_id": channel_id}, read_only=True)
        return None if value is None else int(value)

    async def advance_ingest_cursor(self, channel_id: int, message_id: int) -> int:
        """Move the channel's cursor forward (never back); the cursor after the call."""
        args = {"p_channel_id": channel_id, "p_message_id": message_id}
        return int(await self._scalar("ingest_cursor_advance", args))

    # --- Reply Guy tweets -------------------------------------------------------------------

    async def insert_tweet(self, target_tweet_id: str, *, author: str | None = None, text: str | None = None) -> TweetInserted:
        """Queue a discovered tweet once per target tweet id."""
        args = {"p_target_tweet_id": target_tweet_id, "p_author": storable(author), "p_tweet_text": storable(text)}
        row = (await self.call("tweet_insert", args))[0]
        if row["created"]:
            TWEET_TRANSITIONS.labels("discovered").inc()
        return TweetInserted(created=bool(row["created"]), tweet=from_row(Tweet, row))

    async def tweet_transition(
        self,
        tweet_id: str,
        from_statuses: Iterable[TweetStatus],
        to_status: TweetStatus,
        *,
        draft: str | None = None,
        approval_message_id: int | None = None,
        posted_tweet_id: str | None = None,
        last_error: str | None = None,
    ) -> bool:
        """Move a tweet from one of ``from_statuses`` to ``to_status`` (setting the
        given fields); False when it was elsewhere (someone moved it first)."""
        fields = {
            key: value
            for key, value in (
                ("draft", storable(draft)),
                ("approval_message_id", approval_message_id),
                ("posted_tweet_id", posted_tweet_id),
                ("last_error", storable(last_error)),
            )
            if value is not None
        }
        args = {
            "p_id": str(tweet_id),
            "p_from": [_value(s) for s in from_statuses],
            "p_to": _value(to_status),
            "p_fields": fields,
        }
        moved = bool(await self._scalar("tweet_transition", args))
        if moved:
            TWEET_TRANSITIONS.labels(_value(to_status)).inc()
        return moved

    async def get_tweet(self, tweet_id: str) -> Tweet | None:
        rows = await self.call("tweet_get", {"p_id": str(tweet_id)}, read_only=True)
        return from_row(Tweet, rows[0]) if rows else None

    async def list_tweets(self, *, statuses: Iterable[TweetStatus] | None = None, limit: int = 100) -> list[Tweet]:
        args = {"p_statuses": None if statuses is None else [_value(s) for s in statuses]}
        rows = await self._pages(
            "tweets_list", args, lambda r: {"p_after_created_at": r["created_at"], "p_after_id": r["id"]}, limit=limit
        )
        return [from_row(Tweet, r) for r in rows]

    async def tweet_counts(self) -> dict[TweetStatus, int]:
        rows = await self.call("tweet_counts", {}, read_only=True)
        return {TweetStatus(r["status"]): int(r["count"]) for r in rows}

    async def recover_stale_tweets(
        self, *, minutes: float = 30.0, max_attempts: int = 5, bot: str | None = None
    ) -> list[RecoveredTweet]:
        """Seed 001's crash recovery, in one statement: each tweet stuck in failed or
        posting longer than ``minutes`` with fewer than ``max_attempts`` posting
        intents goes where it can safely continue: a dead letter (an exhausted
        retry item of ``bot``, any bot when None, whose payload names the tweet)
        stays ``failed``; no draft: ``discovered``; never approved by an operator:
        ``drafted``; approved: ``approved``. Returns each with both statuses."""
        args = {"p_minutes": float(minutes), "p_max_attempts": max_attempts, "p_bot": bot}
        rows = await self._pages("tweet_recover_stale", args, lambda r: {"p_after": r["id"]}, read_only=False)
        return [from_row(RecoveredTweet, r) for r in rows]

    async def reply_cursors(self) -> dict[str, str]:
        """The Reply Guy's ``since_id`` per discovery source."""
        rows = await self._pages("reply_cursors_list", {}, lambda r: {"p_after": r["source"]})
        return {str(r["source"]): str(r["since_id"]) for r in rows}

    async def advance_reply_cursor(self, source: str, since_id: str) -> str:
        """Move a source's cursor forward (never back); the cursor now stored."""
        return str(await self._scalar("reply_cursor_advance", {"p_source": source, "p_since_id": since_id}))

    async def count_tweets_posted_since(self, since: datetime) -> int:
        """Replies posted since ``since`` (the daily cap)."""
        return int(await self._scalar("tweets_posted_since", {"p_since": _aware(since)}, read_only=True) or 0)


def _fail_args(
    job_id: int,
    token: str,
    error: str,
    permanent: bool,
    retry_at: datetime | None,
    max_retries: int,
    base_delay: float,
    max_delay: float,
) -> dict[str, Any]:
    return {
        "p_id": job_id,
        "p_token": token,
        "p_error": error,
        "p_permanent": permanent,
        "p_retry_at": _when(retry_at),
        "p_max_retries": max_retries,
        "p_base_delay": float(base_delay),
        "p_max_delay": float(max_delay),
    }


def utc_now() -> datetime:
    """Now, aware and in UTC (for callers building ``retry_at`` / ``send_at``)."""
    return datetime.now(timezone.utc)


__all__ = [
    "Database",
    "Subscription",
    "OUTBOUND_CHANNEL",
    "JOBS_CHANNEL",
    "json_safe",
    "utc_now",
]
