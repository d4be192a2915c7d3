"""Records and states of the data layer, and the mapping from database rows.

Both backends hand rows over as dicts: asyncpg with native values
(``datetime``, ``UUID``, ``int``), Supabase's HTTP API with JSON values
(ISO 8601 strings, UUIDs as strings). :func:`from_row` turns either into the
same frozen dataclass, so code above the database cannot tell the backends
apart.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar, Union

# --- states -----------------------------------------------------------------


class Backend(str, enum.Enum):
    """Where the data lives."""

    POSTGRES = "postgres"
    SUPABASE = "supabase"
    EMBEDDED = "embedded"


class AccountStatus(str, enum.Enum):
    ACTIVE = "active"
    NEEDS_LOGIN = "needs_login"
    DISABLED = "disabled"


class ChatKind(str, enum.Enum):
    USER = "user"
    BOT = "bot"
    GROUP = "group"
    SUPERGROUP = "supergroup"
    CHANNEL = "channel"
    UNKNOWN = "unknown"


class Direction(str, enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class OutboundStatus(str, enum.Enum):
    """Life of a queued outbound message."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    """A permanent error: never retried."""
    DEAD = "dead"
    """Retries exhausted (or given up on): kept with its last error."""


class JobStatus(str, enum.Enum):
    """Life of a job (every kind)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"


class JobKind(str, enum.Enum):
    """What a job does: fetch a chat's history, or scheduled message work."""

    HISTORY = "history"
    SEND = "send"
    EDIT = "edit"
    DELETE = "delete"
    MARK_READ = "mark_read"


#: The kinds the jobs loop runs (everything but history, which has its own loop).
MESSAGE_JOB_KINDS: tuple[JobKind, ...] = (JobKind.SEND, JobKind.EDIT, JobKind.DELETE, JobKind.MARK_READ)


class RetryItemStatus(str, enum.Enum):
    PENDING = "pending"
    RETRYING = "retrying"
    EXHAUSTED = "exhausted"


class IngestStatus(str, enum.Enum):
    PENDING = "pending"
    STORED = "stored"
    SKIPPED = "skipped"
    FAILED = "failed"


class TweetStatus(str, enum.Enum):
    DISCOVERED = "discovered"
    DRAFTED = "drafted"
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    POSTING = "posting"
    POSTED = "posted"
    REJECTED = "rejected"
    FAILED = "failed"


# --- records ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Account:
    """A Telegram account, without its session."""

    id: int
    label: str
    phone: str | None
    status: AccountStatus
    has_session: bool
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime


@dataclasses.dataclass(frozen=True)
class Chat:
    """A chat of an account, with its sync cursor (``last_message_id``)."""

    id: int
    account_id: int
    telegram_chat_id: int
    kind: ChatKind
    title: str | None
    username: str | None
    last_message_id: int
    last_message_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclasses.dataclass(frozen=True)
class OutboundMessage:
    """A row of the outbound queue.

    ``random_id`` was fixed at enqueue: every (re)send of this row uses it, so
    Telegram drops a duplicate. ``lease_token`` is the claim's fencing token:
    pass it back to every mark.
    """

    id: int
    account_id: int
    peer: str
    chat_id: int | None
    text: str | None
    attachments: tuple[Any, ...]
    reply_to: int | None
    status: OutboundStatus
    attempts: int
    next_attempt_at: datetime | None
    random_id: int
    dedupe_key: str | None
    lease_owner: str | None
    lease_token: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    telegram_message_id: int | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    #: W3C trace context of the enqueue (None when the enqueuing process did not trace).
    traceparent: str | None = None


@dataclasses.dataclass(frozen=True)
class Enqueued:
    """The answer to an enqueue: the row's id and ``random_id``; ``created`` is
    False when the dedupe key was seen before and the first row is returned."""

    id: int
    random_id: int
    status: OutboundStatus
    created: bool
    next_attempt_at: datetime
    created_at: datetime


@dataclasses.dataclass(frozen=True)
class InboundMessage:
    """A message seen on Telegram, to be stored once.

    ``direction`` is OUTBOUND for our own sends seen as events (Telethon's
    ``NewMessage`` with ``out=True``); the stored queue row of that send has
    the same key, so storing it again changes nothing.
    """

    chat_id: int
    telegram_message_id: int
    direction: Direction = Direction.INBOUND
    sender_id: int | None = None
    text: str | None = None
    attachments: tuple[Any, ...] = ()
    reply_to: int | None = None
    sent_at: datetime | None = None
    chat_kind: ChatKind | None = None
    chat_title: str | None = None
    chat_username: str | None = None


@dataclasses.dataclass(frozen=True)
class StoredMessage:
    """What storing one :class:`InboundMessage` did; ``inserted`` is False for a
    message that was stored before (``id`` may be None when a concurrent
    writer stored it in the same instant)."""

    chat_id: int
    telegram_message_id: int
    id: int | None
    inserted: bool


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """The outbound queue of one account: rows still to send, those due now, the oldest due one's wait."""

    account_id: int
    depth: int
    due: int
    oldest_due_age_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class StatusCount:
    """Outbound rows of one account in one status."""

    account_id: int
    status: OutboundStatus
    count: int


@dataclasses.dataclass(frozen=True)
class RequeueResult:
    """What taking back expired leases did."""

    requeued: int
    dead: int


@dataclasses.dataclass(frozen=True)
class Requeued:
    """An outbound message an operator put back in the queue (or would, in a dry run)."""

    id: int
    account_id: int
    peer: str
    previous_status: OutboundStatus
    last_error: str | None


@dataclasses.dataclass(frozen=True)
class Takeover:
    """What taking over an account handed back to the queue."""

    outbound: int
    jobs: int


class SendHoldKind(str, enum.Enum):
    """What Telegram's limit holds: every send of the account, or its sends to non-contacts."""

    FLOOD = "flood"
    LIMITED = "limited"


@dataclasses.dataclass(frozen=True)
class SendHold:
    """An account's send holds still running (None: that hold is not in force)."""

    account_id: int
    label: str
    flood_until: datetime | None
    flood_reason: str | None
    limited_until: datetime | None
    limited_reason: str | None


@dataclasses.dataclass(frozen=True)
class UpdateState:
    """Telegram's update state of an account (``entity_id`` 0) or the pts of one channel."""

    entity_id: int
    pts: int
    qts: int = 0
    date: datetime | None = None
    seq: int = 0


@dataclasses.dataclass(frozen=True)
class KnownEntity:
    """A peer an account has seen: its marked id and the access hash Telegram gave this account."""

    peer_id: int
    access_hash: int
    kind: str
    username: str | None = None
    phone: str | None = None
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """A worker's last heartbeat."""

    worker_id: str
    status: str
    last_heartbeat_at: datetime
    loops: dict[str, Any]
    version: str | None
    host: str | None
    pid: int | None
    started_at: datetime


@dataclasses.dataclass(frozen=True)
class FleetReplica:
    """A worker replica as its heartbeat row shows it, with the account leases it holds."""

    replica: str
    status: str
    host: str | None
    pid: int | None
    version: str | None
    last_heartbeat_at: datetime
    started_at: datetime
    pinned: tuple[str, ...]
    alive: bool
    held: int
    age_s: float
    cannot: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Job:
    """A row of ``jobs``: work for one account, due at ``run_at``, run under a lease.

    ``payload`` holds the job's arguments (a history job's ``chat_id`` and
    ``target_count``); a resumable job keeps its progress in ``cursor``,
    ``fetched_count`` and ``stored_count`` (history: the next page starts below
    message id ``cursor``; 0: from the newest).
    """

    id: int
    account_id: int
    kind: JobKind
    payload: dict[str, Any]
    dedupe_key: str | None
    run_at: datetime
    status: JobStatus
    attempts: int
    lease_owner: str | None
    lease_token: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    result: Any
    cursor: int
    fetched_count: int
    stored_count: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @property
    def chat_id(self) -> int | None:
        """A history job's chat (None for other kinds that do not name one)."""
        value = self.payload.get("chat_id")
        return None if value is None else int(value)

    @property
    def target_count(self) -> int | None:
        """A history job's stop after this many messages (None: the whole history)."""
        value = self.payload.get("target_count")
        return None if value is None else int(value)


@dataclasses.dataclass(frozen=True)
class RetryRow:
    """A row of ``retry_items`` (the durable retry queue / dead letters of one bot)."""

    id: str
    bot: str
    kind: str
    payload: dict[str, Any]
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    status: RetryItemStatus
    created_at: datetime
    updated_at: datetime


@dataclasses.dataclass(frozen=True)
class IngestImage:
    """What happened to the image of one channel message."""

    id: int
    channel_id: int
    message_id: int
    storage_key: str | None
    sha256: str | None
    width: int | None
    height: int | None
    bytes: int | None
    mime: str | None
    status: IngestStatus
    error: str | None
    created_at: datetime
    updated_at: datetime


@dataclasses.dataclass(frozen=True)
class IngestRecorded:
    """The answer to recording an image: ``applied`` is False when a final
    record (stored or skipped) already existed and was kept."""

    applied: bool
    image: IngestImage


@dataclasses.dataclass(frozen=True)
class Tweet:
    """A tweet of the Reply Guy bot, from discovery to posting."""

    id: str
    target_tweet_id: str
    author: str | None
    tweet_text: str | None
    draft: str | None
    status: TweetStatus
    approval_message_id: int | None
    posted_tweet_id: str | None
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    drafted_at: datetime | None
    approved_at: datetime | None
    posted_at: datetime | None


@dataclasses.dataclass(frozen=True)
class TweetInserted:
    created: bool
    tweet: Tweet


@dataclasses.dataclass(frozen=True)
class RecoveredTweet:
    """A stale tweet crash recovery found: where it was and where it is now."""

    id: str
    previous_status: TweetStatus
    status: TweetStatus


# --- row mapping ----------------------------------------------------------------

R = TypeVar("R")


def parse_datetime(value: Any) -> datetime | None:
    """A native or ISO 8601 timestamp as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        parsed = datetime.fromisoformat(text.replace(" ", "T", 1) if "T" not in text else text)
    else:
        raise TypeError(f"not a timestamp: {value!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _identity(value: Any) -> Any:
    return value


def _to_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime) and value.tzinfo is timezone.utc:
        return value
    return parse_datetime(value)


def _to_str(value: Any) -> Any:
    return str(value) if isinstance(value, uuid.UUID) else value


def _to_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(json.loads(value) if isinstance(value, str) else value)


def _to_dict(value: Any) -> dict[str, Any]:
    return dict(json.loads(value) if isinstance(value, str) else value)


def _converter(hint: Any) -> Callable[[Any], Any]:
    """The function turning a column value of either backend into a field of type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _converter(inner[0]) if len(inner) == 1 else _identity
    if hint is datetime:
        return _to_datetime
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    if hint is bool:
        return bool
    if hint is int:
        return int
    if hint is str:
        return _to_str
    if origin is tuple:
        return _to_tuple
    if origin is dict or hint is dict:
        return _to_dict
    return _identity


@functools.cache
def _plan(cls: type) -> tuple[tuple[str, Callable[[Any], Any], bool], ...]:
    """Per field of ``cls``: its name, its converter, and whether the row must have it."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            field.name,
            _converter(hints[field.name]),
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING,
        )
        for field in dataclasses.fields(cls)
    )


def from_row(cls: type[R], row: Mapping[str, Any], **overrides: Any) -> R:
    """Build dataclass ``cls`` from a row of either backend; extra columns are ignored.

    Raises:
        KeyError: the row lacks a field that has no default.
    """
    values: dict[str, Any] = {}
    for name, convert, required in _plan(cls):
        if name in overrides:
            values[name] = overrides[name]
        elif name in row:
            value = row[name]
            values[name] = None if value is None else convert(value)
        elif required:
            raise KeyError(f"{cls.__name__}: the row has no column {name!r}")
    return cls(**values)
