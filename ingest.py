"""ingest.py: the images posted in Telegram channels, stored once each in R2 (or a local directory).

It watches the channels of INGEST_CHANNELS with one Telegram user account.
Every photo or image document is checked against its metadata (too large:
skipped, never downloaded), downloaded under a deadline, validated and
downscaled with Pillow within a fixed memory budget (:mod:`shared.images`),
stored under a key made of its content hash (:mod:`shared.storage`), and
only then recorded in ``ingest_images`` (unique per channel and message).
With no Telegram credentials and no database configured it runs on the
local Telegram sandbox and an embedded PostgreSQL, and says so loudly.

The story, top to bottom, one class per loop or step:

1. what a message carries (:func:`media_of`), read from its metadata only;
2. the channels (:class:`Channels`): resolved after every connect; the
   ``NewMessage`` handler only notes the message and wakes the reader;
3. one image, start to end (:class:`ImageHandler` with its
   :class:`Downloader` and :class:`ImageStore`): the order of effects is
   *upload, then row*, so a crash in between leaves an orphan object (swept
   later), never a row without its object;
4. the channel reader (:class:`ChannelReader`): the only owner of each
   channel's cursor. It reads the history after the cursor (so a missed
   update, downtime or a first run's backfill are the same code path),
   handles the messages in order with bounded concurrency, and moves the
   cursor only over messages that were handled: stored, skipped, failed with
   a reason, or durably queued;
5. the retry drain (:class:`RetryDrain`): transient failures (R2 or the
   database down, a timeout) wait in the durable retry queue (60 s doubling,
   5 retries) and are re-fetched from Telegram when due;
6. the orphan sweep (:class:`OrphanSweep`), which needs only storage and the
   database (``gc`` runs it alone);
7. the account (:class:`IngestAccount`): the one-account case of
   :class:`shared.telegram.AccountPool` (lease, reconnects, dead sessions);
8. the process: :meth:`Ingest.assemble` builds every part complete, in one
   place, once the database and storage are open (:class:`IngestBot`); then
   the command line.

Exactly once, in short: the row's (channel, message) key is unique and a
stored or skipped row is final, the object key is the content hash (a second
upload of the same image is the same object), and the cursor never passes a
message that is neither recorded nor queued.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from shared import metrics, tracing
from shared.alerts import AlertSink, AlertType
from shared.breaker import CircuitBreaker, CircuitOpenError, CircuitState
from shared.config import IngestSettings
from shared.db import Database, open_database
from shared.db.records import AccountStatus, IngestStatus
from shared.db.retry_store import DbRetryStore
from shared.errors import ErrorKind, PermanentError, classify, describe
from shared.health import TEMP_SUBDIR
from shared.images import ImagePolicy, ImageRejected, OversizePolicy, ProcessedImage, process_image
from shared.retry_queue import JsonlRetryStore, RetryItem, RetryQueue
from shared.cli import bot_parser
from shared.runtime import BotRuntime, Stats, bot_main
from shared.cipher import SessionCipher
from shared.shutdown import GracefulShutdown
from shared.storage import ObjectInfo, Storage, open_storage
from shared.telegram import (
    SANDBOX_INGEST_ACCOUNT,
    SANDBOX_INGEST_PHONE,
    AccountConnection,
    AccountPool,
    ClientFactory,
    ConnectionPolicy,
    client_factory,
    session_cipher,
)
from shared.timeouts import telegram_op

if TYPE_CHECKING:  # Telethon is imported where a Telegram object is made or looked at: the commands start without it
    from telethon import TelegramClient, events

logger = logging.getLogger("ingest")

#: Every object ingest stores lives under this prefix (the orphan sweep looks nowhere else).
OBJECT_PREFIX = "ingest/"
#: An object without a row is an orphan only after this long (a row follows its upload within seconds).
ORPHAN_MIN_AGE = 24 * 3600.0
#: Object keys the orphan sweep checks against the rows per database call.
SWEEP_BATCH = 500
#: Messages handled at once (downloads and uploads overlap; Pillow work is limited separately).
CONCURRENCY = 4
#: Images decoded at once: decoding is CPU and memory bound.
IMAGE_WORKERS = 1
#: Downloads up to this size go to memory, larger ones to a temporary file.
MEMORY_DOWNLOAD_LIMIT = 8 * 1024 * 1024
#: Seconds between two reads of every channel when no update woke the reader (updates can silently stop).
RECONCILE_INTERVAL = 60.0
#: Messages read per history request.
PAGE_SIZE = 100
#: Retry queue item kind.
RETRY_KIND = "ingest_message"
#: Pause of the reader after a page it could not finish (Telegram or the database failing).
STALL_PAUSE = 5.0
#: Formats a document may declare and still be taken for an image (Pillow decides in the end).
IMAGE_MIME_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff"}
)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


# --- 1. what a message carries --------------------------------------------------------


class Outcome(str, enum.Enum):
    """What happened to one message."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # already stored or skipped earlier (by us or another process)
    SKIPPED = "skipped"  # refused on purpose, with a reason (too large, bomb, oversize ...)
    FAILED = "failed"  # broken (corrupt, truncated): recorded with the reason
    IGNORED = "ignored"  # no image at all (text, PDF, video ...): nothing recorded
    QUEUED = "queued"  # a transient failure: waiting in the retry queue
    DELETED = "deleted"  # the message is gone (seen by a retry)


@dataclass(frozen=True)
class MediaRef:
    """An image as the message's metadata describes it (nothing downloaded)."""

    kind: str  # "photo" or "document"
    size: int
    mime: str
    width: int | None = None
    height: int | None = None
    file_name: str | None = None


def _photo_size_bytes(size: Any) -> int:
    from telethon import types

    if isinstance(size, types.PhotoSize):
        return int(size.size)
    if isinstance(size, types.PhotoSizeProgressive):
        return int(max(size.sizes or [0]))
    if isinstance(size, (types.PhotoCachedSize, types.PhotoStrippedSize)):
        return len(size.bytes)
    return 0


def media_of(message: Any) -> MediaRef | None:
    """The message's image as its metadata describes it, or None when it carries no image.

    A photo's size is that of its largest version (the one Telethon downloads);
    a document is an image when its MIME type (or, for a generic type, its
    file name) says so and it is not a sticker.
    """
    from telethon import types

    media = getattr(message, "media", None)
    if isinstance(media, types.MessageMediaPhoto) and isinstance(media.photo, types.Photo):
        sizes = [s for s in media.photo.sizes if _photo_size_bytes(s) > 0]
        if not sizes:
            return None
        largest = max(sizes, key=_photo_size_bytes)
        return MediaRef(
            kind="photo",
            size=_photo_size_bytes(largest),
            mime="image/jpeg",
            width=getattr(largest, "w", None),
            height=getattr(largest, "h", None),
        )
    if isinstance(media, types.MessageMediaDocument) and isinstance(media.document, types.Document):
        document = media.document
        attributes = document.attributes or []
        if any(isinstance(a, types.DocumentAttributeSticker) for a in attributes):
            return None
        name = next((a.file_name for a in attributes if isinstance(a, types.DocumentAttributeFilename)), None)
        mime = (document.mime_type or "").lower()
        looks_like_image = mime in IMAGE_MIME_TYPES or (
            mime in ("", "application/octet-stream") and bool(name) and name.lower().endswith(_IMAGE_EXTENSIONS)
        )
        if not looks_like_image:
            return None
        dims = next((a for a in attributes if isinstance(a, types.DocumentAttributeImageSize)), None)
        return MediaRef(
            kind="document",
            size=int(document.size or 0),
            mime=mime or "application/octet-stream",
            width=dims.w if dims else None,
            height=dims.h if dims else None,
            file_name=name,
        )
    return None


def object_key(image: ProcessedImage) -> str:
    """The storage key of an image: its content hash, so the same image is always the same object."""
    return f"{OBJECT_PREFIX}{image.sha256[:2]}/{image.sha256}{image.extension}"


def sha256_of_key(key: str) -> str | None:
    """The content hash an ingest key was made from (None for a key that is not ours)."""
    if not key.startswith(OBJECT_PREFIX):
        return None
    stem = key.rsplit("/", 1)[-1].split(".", 1)[0]
    return stem if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) else None


class DownloadTooLarge(PermanentError):
    """More bytes arrived than the limit allows (the metadata understated the size)."""


# --- 2. the channels: resolved on every connect, woken by new messages ----------------


@dataclass
class ChannelState:
    """One watched channel as it stands: its peer once resolved, its cursor and counters.

    ``peer_id`` is known once the channel was resolved (it never changes);
    ``entity`` belongs to the current client and is None while the channel
    cannot be resolved. ``cursor`` is the greatest message id up to which every
    message was handled (recorded or queued); it only moves forward. It is None
    until it has been loaded, or, for a channel never read, until the first
    run has saved where it starts.
    """

    ref: str
    peer_id: int | None = None
    title: str | None = None
    entity: Any = None
    cursor: int | None = None
    last_message_id: int = 0
    last_read_at: float | None = None
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def resolved(self) -> ResolvedChannel | None:
        """The channel as the loops use it, or None while it is not resolved on the current client."""
        if self.peer_id is None or self.entity is None:
            return None
        return ResolvedChannel(self, self.peer_id, self.entity)

    def count(self, outcome: Outcome) -> None:
        self.counts[outcome.value] = self.counts.get(outcome.value, 0) + 1

    def status(self) -> dict[str, Any]:
        cursor = self.cursor or 0
        return {
            "id": self.peer_id,
            "title": self.title,
            "resolved": self.entity is not None,
            "cursor": self.cursor,
            "last_message_id": self.last_message_id or None,
            "lag": max(0, self.last_message_id - cursor) if self.cursor is not None else None,
            "last_read_at": self.last_read_at,
            "error": self.error,
            **self.counts,
        }


@dataclass(frozen=True)
class ResolvedChannel:
    """A channel resolved on the current client: its id and entity are known."""

    state: ChannelState
    id: int
    entity: Any

    @property
    def ref(self) -> str:
        return self.state.ref

    def count(self, outcome: Outcome) -> None:
        self.state.count(outcome)


def parse_channel_ref(ref: str) -> str | int:
    """What Telethon resolves: a numeric id as an int, a username as text."""
    text = ref.strip()
    return int(text) if text.lstrip("-").isdigit() else text


@dataclass
class Counters:
    """What the loops count together, and the messages waiting in the retry queue."""

    ignored: int = 0
    duplicates: int = 0
    exhausted: int = 0
    handler_errors: int = 0
    queued: set[tuple[int, int]] = field(default_factory=set)


class Channels:
    """The INGEST_CHANNELS: resolved after every (re)connect, woken by the ``NewMessage`` handler.

    Args:
        refs: the channel references.
        entity_timeout: deadline of one entity lookup.
        counters: shared counters (handler errors).
        alerts: told about a channel that cannot be watched.
    """

    def __init__(
        self, refs: Iterable[str], *, entity_timeout: float, counters: Counters, alerts: AlertSink | None = None
    ) -> None:
        self.states: dict[str, ChannelState] = {ref: ChannelState(ref=ref) for ref in refs}
        self.entity_timeout = entity_timeout
        self.counters = counters
        self.alerts = alerts
        #: Set when there may be something new to read; the reader waits on it.
        self.wake = asyncio.Event()

    def resolved(self) -> list[ResolvedChannel]:
        return [r for r in (c.resolved() for c in self.states.values()) if r is not None]

    def find(self, channel_id: int) -> ChannelState | None:
        return next((c for c in self.states.values() if c.peer_id == channel_id), None)

    async def on_connected(self, connection: AccountConnection) -> None:
        """After every (re)connect: resolve the channels, attach the handler, wake the reader.

        Raises:
            Exception: a transient failure resolving a channel (the connection backs off and retries).
        """
        from telethon import events, utils

        client = connection.client
        if client is None:
            raise ConnectionError("the connection has no client")
        for channel in self.states.values():
            try:
                entity = await telegram_op(
                    client.get_entity(parse_channel_ref(channel.ref)), self.entity_timeout, "get_entity", detail=channel.ref
                )
            except Exception as exc:
                verdict = classify(exc)
                if verdict.kind in (ErrorKind.TRANSIENT, ErrorKind.RATE_LIMITED, ErrorKind.UNKNOWN_OUTCOME):
                    raise
                self._unwatchable(channel, verdict.reason)
                continue
            channel.entity = entity
            channel.peer_id = utils.get_peer_id(entity)
            channel.title = getattr(entity, "title", None)
            channel.error = None
        client.add_event_handler(self.on_new_message, events.NewMessage())
        watched = [c.ref for c in self.resolved()]
        logger.info("watching %d channel(s): %s", len(watched), ", ".join(watched) or "none")
        self.wake.set()

    def _unwatchable(self, channel: ChannelState, reason: str) -> None:
        channel.entity = None
        channel.error = f"cannot resolve {channel.ref}: {reason}"
        logger.error("channel %s cannot be watched: %s", channel.ref, reason)
        if self.alerts is not None:
            self.alerts.alert(
                AlertType.INITIALIZATION_FAILED,
                f"Channel {channel.ref} cannot be watched: {reason}",
                key=f"ingest-channel:{channel.ref}",
                details={"channel": channel.ref, "fix": "check INGEST_CHANNELS and that the account is a member"},
            )

    async def on_new_message(self, event: events.NewMessage.Event) -> None:
        """The ``NewMessage`` handler: note the message and wake the reader (which handles it in order).

        Telethon only logs a handler's exception, so nothing may escape here.
        """
        try:
            channel = self.find(event.chat_id) if event.chat_id is not None else None
            if channel is None:
                return
            channel.last_message_id = max(channel.last_message_id, int(event.message.id))
            self.wake.set()
        except Exception as exc:  # pragma: no cover - defensive: reading attributes of a TL object
            self.counters.handler_errors += 1
            logger.warning("NewMessage handler failed: %s", describe(exc))

    def status(self) -> dict[str, Any]:
        return {c.ref: c.status() for c in self.states.values()}


# --- 3. one image, start to end ---------------------------------------------------------


class Downloader:
    """A message's media, under TIMEOUT_TELEGRAM_MEDIA, into memory (small) or a temporary file (large)."""

    def __init__(self, *, max_bytes: int, timeout: float, tmp_dir: Path) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.tmp_dir = Path(tmp_dir)

    async def download(self, client: TelegramClient, message: Any, ref: MediaRef) -> tuple[bytes | Path, Path | None]:
        """The bytes (or the temporary file holding them) and the temporary file to remove, if any.

        Raises:
            DownloadTooLarge: more bytes arrived than MAX_IMAGE_SIZE_BYTES.
        """
        limit = self.max_bytes

        def guard(received: int, total: int) -> None:
            if received > limit:
                raise DownloadTooLarge(f"more than {limit} bytes arrived although the metadata said {ref.size}")

        if ref.size <= MEMORY_DOWNLOAD_LIMIT:
            data = await telegram_op(
                client.download_media(message, file=bytes, progress_callback=guard),
                self.timeout,
                "download_media",
                detail=str(message.id),
            )
            if not isinstance(data, bytes):
                raise PermanentError("the message has no downloadable media")
            return data, None
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        temp = self.tmp_dir / f"{uuid.uuid4().hex}.download"
        handle: BinaryIO = await asyncio.to_thread(temp.open, "wb")
        try:
            await telegram_op(
                client.download_media(message, file=handle, progress_callback=guard),
                self.timeout,
                "download_media",
                detail=str(message.id),
            )
        except BaseException:
            await asyncio.to_thread(handle.close)
            temp.unlink(missing_ok=True)
            raise
        await asyncio.to_thread(handle.close)
        return temp, temp


class ImageStore:
    """Where an image's fate is written: the object in storage, then its row (or a row with the reason)."""

    def __init__(self, *, db: Database, storage: Storage, stats: Stats, counters: Counters) -> None:
        self.db = db
        self.storage = storage
        self.stats = stats
        self.counters = counters

    async def store(self, channel: ResolvedChannel, message_id: int, image: ProcessedImage) -> Outcome:
        """Upload under the content hash, then record the row; a row already there makes it a duplicate."""
        key = object_key(image)
        await self.storage.put(key, image.data, content_type=image.mime)
        recorded = await self.db.record_ingest_image(
            channel.id,
            message_id,
            status=IngestStatus.STORED,
            storage_key=key,
            sha256=image.sha256,
            width=image.width,
            height=image.height,
            size_bytes=image.size,
            mime=image.mime,
        )
        if not recorded.applied:
            return self.duplicate()
        self.stats.processed += 1
        metrics.image_stored(image.size)
        tracing.annotate(outcome="stored", size_bytes=image.size)
        logger.info(
            "stored %s message %d as %s (%dx%d, %d bytes)",
            channel.ref,
            message_id,
            key,
            image.width,
            image.height,
            image.size,
            extra={"channel": channel.ref, "message_id": message_id, "key": key, "resized": image.resized},
        )
        return Outcome.STORED

    def duplicate(self) -> Outcome:
        self.counters.duplicates += 1
        metrics.IMAGES_SKIPPED.labels("duplicate").inc()
        return Outcome.DUPLICATE

    async def reject(
        self, channel: ResolvedChannel, message_id: int, reason: str, detail: str, mime: str | None, *, failure: bool = False
    ) -> Outcome:
        """A deliberate skip or a broken file: a final row with the reason."""
        status = IngestStatus.FAILED if failure else IngestStatus.SKIPPED
        await self.db.record_ingest_image(channel.id, message_id, status=status, mime=mime, error=f"{reason}: {detail}")
        (metrics.IMAGES_FAILED if failure else metrics.IMAGES_SKIPPED).labels(reason).inc()
        if failure:
            self.stats.failed += 1
            self.stats.error(f"{channel.ref} message {message_id}", f"{reason}: {detail}")
        else:
            self.stats.skip(reason)
        logger.info(
            "%s %s message %d: %s: %s",
            "failed" if failure else "skipped",
            channel.ref,
            message_id,
            reason,
            detail,
            extra={"channel": channel.ref, "message_id": message_id, "reason": reason},
        )
        return Outcome.FAILED if failure else Outcome.SKIPPED


class ImageHandler:
    """One message from its metadata to a stored object and its row.

    Args:
        db: where earlier rows are looked up.
        store: uploads and records.
        downloader: fetches the media.
        policy: Pillow limits.
        max_bytes: MAX_IMAGE_SIZE_BYTES, checked against the metadata before any download.
        stats / counters: what was skipped or ignored.
        image_workers: images decoded at once.
    """

    def __init__(
        self,
        *,
        db: Database,
        store: ImageStore,
        downloader: Downloader,
        policy: ImagePolicy,
        max_bytes: int,
        stats: Stats,
        counters: Counters,
        image_workers: int = IMAGE_WORKERS,
    ) -> None:
        self.db = db
        self.store = store
        self.downloader = downloader
        self.policy = policy
        self.max_bytes = max_bytes
        self.stats = stats
        self.counters = counters
        self._images = asyncio.Semaphore(max(1, image_workers))

    def times_back(self) -> int:
        """How often storage or the database was seen back (:attr:`CircuitBreaker.times_back`): changed
        across a failed attempt, the service returned while the attempt was still failing."""
        return self.store.storage.breaker.times_back + self.db.breaker.times_back

    async def handle(self, client: TelegramClient, channel: ResolvedChannel, message: Any) -> Outcome:
        """Take one message from metadata to a stored object and its row.

        Returns:
            What happened; deliberate skips and broken files are recorded as rows.

        Raises:
            Exception: operational failures (Telegram, storage or database
                unavailable, timeouts), for the caller to queue or retry.
        """
        from telethon import types

        ref = media_of(message)
        if ref is None:
            if getattr(message, "media", None) is not None and not isinstance(message.media, types.MessageMediaWebPage):
                self.counters.ignored += 1
                self.stats.skip("not_an_image")
                metrics.IMAGES_SKIPPED.labels("not_an_image").inc()
            return Outcome.IGNORED
        existing = await self.db.get_ingest_image(channel.id, message.id)
        if existing is not None and existing.status in (IngestStatus.STORED, IngestStatus.SKIPPED):
            return self.store.duplicate()
        if ref.size > self.max_bytes:
            detail = f"{ref.size} bytes is more than MAX_IMAGE_SIZE_BYTES ({self.max_bytes})"
            return await self.store.reject(channel, message.id, "too_large", detail, ref.mime)
        refuse_when_open(self.store.storage.breaker)
        try:
            source, temp = await metrics.timed(metrics.DOWNLOAD_SECONDS, self.downloader.download(client, message, ref))
        except DownloadTooLarge as exc:
            return await self.store.reject(channel, message.id, "too_large", str(exc), ref.mime)
        try:
            try:
                async with self._images:
                    processing = metrics.timed(metrics.PROCESSING_SECONDS, asyncio.to_thread(process_image, source, policy=self.policy))
                    image = await tracing.traced("ingest.process", processing)
            except ImageRejected as rejected:
                return await self.store.reject(
                    channel, message.id, rejected.reason.value, rejected.detail, ref.mime, failure=rejected.reason.is_failure
                )
        finally:
            source = b""
            if temp is not None:
                temp.unlink(missing_ok=True)
        return await self.store.store(channel, message.id, image)


def refuse_when_open(breaker: CircuitBreaker) -> None:
    """Fail fast (before downloading) while the store's breaker is open."""
    status = breaker.get_status()
    if status["state"] == CircuitState.OPEN.value:
        raise CircuitOpenError(breaker.name, float(status["retry_in_s"] or 0.0))


def open_breaker_wait(breaker: CircuitBreaker) -> float | None:
    """Seconds until an open breaker admits a probe, or None when it is not open."""
    status = breaker.get_status()
    if status["state"] != CircuitState.OPEN.value:
        return None
    return max(0.05, float(status["retry_in_s"] or 0.0))


def refetch_fixes(exc: BaseException) -> bool:
    """Telegram's expired file references are permanent for a message object but not for a fresh fetch."""
    return type(exc).__name__ in ("FileReferenceExpiredError", "FileReferenceInvalidError", "FileReferenceEmptyError")


async def history(client: TelegramClient, entity: Any, *, timeout: float, limit: int, min_id: int | None = None) -> list[Any]:
    """Messages after ``min_id``, oldest first; without it, the latest ``limit``, newest first."""

    async def collect() -> list[Any]:
        if min_id is not None:
            return [m async for m in client.iter_messages(entity, min_id=min_id, reverse=True, limit=limit, wait_time=0)]
        return [m async for m in client.iter_messages(entity, limit=limit, wait_time=0)]

    return await telegram_op(collect(), timeout, "get_history")


# --- 4. the channel reader: handled means recorded or queued ----------------------------------


class ChannelReader:
    """The only owner of each channel's cursor: reads after it, handles in order, moves it over what was handled.

    Args:
        account: the connected account (nothing is read without one).
        channels: the watched channels; their ``wake`` starts a cycle at once.
        handler: one message to its row.
        queue: where transient failures wait.
        db: cursors and failure rows.
        stats / counters: the runtime's counters and ours.
        shutdown: in-flight work is registered here so SIGTERM lets it finish.
        backfill_limit: messages read back on a channel's first run.
        history_timeout: deadline of one history read.
        cycle_budget: a cycle stops starting new work after this long.
        concurrency: messages in flight.
        reconcile_interval: seconds between reads of every channel without a wake-up.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        *,
        account: IngestAccount,
        channels: Channels,
        handler: ImageHandler,
        queue: RetryQueue,
        db: Database,
        stats: Stats,
        counters: Counters,
        shutdown: GracefulShutdown,
        backfill_limit: int,
        history_timeout: float,
        cycle_budget: float,
        concurrency: int = CONCURRENCY,
        reconcile_interval: float = RECONCILE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.account = account
        self.channels = channels
        self.handler = handler
        self.queue = queue
        self.db = db
        self.stats = stats
        self.counters = counters
        self.shutdown = shutdown
        self.backfill_limit = backfill_limit
        self.history_timeout = history_timeout
        self.cycle_budget = cycle_budget
        self.concurrency = max(1, concurrency)
        self.reconcile_interval = reconcile_interval
        self._clock = clock

    async def cycle(self) -> float:
        """Read every channel after its cursor and handle what is there; the pause until the next cycle."""
        self.channels.wake.clear()
        session = self.account.session()
        if session is None or self.shutdown.stopping:
            return self.reconcile_interval
        wait = open_breaker_wait(self.db.breaker)
        if wait is not None:
            return wait  # reading now would only queue every message again
        deadline = self._clock() + self.cycle_budget
        more = stalled = False
        for channel in self.channels.resolved():
            if self.shutdown.stopping:
                break
            try:
                state = await self._read(session, channel, deadline)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                channel.state.error = describe(exc)
                self.stats.error(f"reading {channel.ref}", exc)
                logger.warning("reading %s failed: %s", channel.ref, describe(exc))
                await session.connection.handle_error(exc)
                stalled = True
                continue
            more = more or state == "more"
            stalled = stalled or state == "stalled"
        if more:
            return 0.0
        return STALL_PAUSE if stalled else self.reconcile_interval

    async def _read(self, session: Session, channel: ResolvedChannel, deadline: float) -> str:
        state = channel.state
        cursor = state.cursor
        if cursor is None:  # not loaded yet, or a channel never read: its first run saves a start
            cursor = await self.db.get_ingest_cursor(channel.id)
        if cursor is None:
            cursor = await self._first_run(session.client, channel)
        state.cursor = cursor
        messages = await history(session.client, channel.entity, timeout=self.history_timeout, min_id=cursor, limit=PAGE_SIZE)
        state.last_read_at = time.time()
        state.error = None
        messages = sorted((m for m in messages if m.id > cursor), key=lambda m: m.id)
        for start in range(0, len(messages), self.concurrency):
            if self.shutdown.stopping or self._clock() > deadline:
                return "more"
            chunk = messages[start : start + self.concurrency]
            async with self.shutdown.in_flight():
                handled = await asyncio.gather(*(self.ingest(session, channel, m) for m in chunk))
            upto = None
            for message, ok in zip(chunk, handled, strict=True):
                if not ok:
                    break
                upto = message.id
            if upto is not None:
                await self._advance(channel, upto)
            if not all(handled):
                return "stalled"
        return "more" if len(messages) >= PAGE_SIZE else "done"

    async def _advance(self, channel: ResolvedChannel, upto: int) -> None:
        """Move the cursor to ``upto``; while the database refuses, it moves in memory only."""
        state = channel.state
        state.cursor = max(state.cursor or 0, upto)
        try:
            state.cursor = max(state.cursor, await self.db.advance_ingest_cursor(channel.id, upto))
        except Exception as exc:
            logger.warning(
                "could not save the cursor of %s (%s); it is kept in memory and saved with the next one",
                channel.ref,
                describe(exc),
            )

    async def _first_run(self, client: TelegramClient, channel: ResolvedChannel) -> int:
        """A channel never read before: choose and save where reading starts, before handling anything.

        The start is just before the oldest of the last INGEST_BACKFILL_LIMIT
        messages (the channel's beginning when it has fewer), or after the
        latest message when the limit is 0. It is saved first, and a failure
        to save raises, so a stop at any point after it resumes from there:
        what is posted while ingest is down is caught up however much it is.
        """
        latest_first = await history(client, channel.entity, timeout=self.history_timeout, limit=max(1, self.backfill_limit))
        if self.backfill_limit <= 0:
            start = latest_first[0].id if latest_first else 0
            how = f"starting after message {start} (INGEST_BACKFILL_LIMIT=0)"
        elif len(latest_first) < self.backfill_limit:
            start = 0
            how = f"reading back all {len(latest_first)} message(s)"
        else:
            start = min(m.id for m in latest_first) - 1
            how = f"reading back the last {len(latest_first)} message(s), after message {start}"
        saved = await self.db.advance_ingest_cursor(channel.id, start)
        logger.info("first run on %s: %s", channel.ref, how)
        return saved

    async def ingest(self, session: Session, channel: ResolvedChannel, message: Any) -> bool:
        """Handle one message for the reader. True when it is recorded or durably queued."""
        channel.state.last_message_id = max(channel.state.last_message_id, int(message.id))
        seen_back = self.handler.times_back()
        try:
            handling = self.handler.handle(session.client, channel, message)
            outcome = await tracing.traced("ingest.image", handling, attributes=tracing.of_image(channel, message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            back = self.handler.times_back() != seen_back
            deferred = await self._defer(session, channel, int(message.id), exc, service_back=back)
            if deferred is None:
                return False
            outcome = deferred
        channel.count(outcome)
        return True

    async def _defer(
        self, session: Session, channel: ResolvedChannel, message_id: int, exc: BaseException, *, service_back: bool = False
    ) -> Outcome | None:
        """A failed attempt: a permanent error is recorded, anything else goes to the retry queue
        (due at once when ``service_back``: storage or the database returned while it failed).

        Returns None when neither worked (the reader must not move past this message).
        """
        verdict = classify(exc)
        where = f"{channel.ref} message {message_id}"
        self.stats.error(where, exc)
        if verdict.kind is ErrorKind.ACCOUNT_DEAD:
            await session.connection.handle_error(exc)
        if verdict.kind is ErrorKind.PERMANENT and not refetch_fixes(exc):
            try:
                await self.db.record_ingest_image(channel.id, message_id, status=IngestStatus.FAILED, error=verdict.reason)
                self.stats.failed += 1
                metrics.IMAGES_FAILED.labels(verdict.kind.value).inc()
                logger.warning("failed %s: %s", where, verdict.reason)
                return Outcome.FAILED
            except Exception as record_error:
                logger.warning("could not record the failure of %s (%s); queueing it", where, describe(record_error))
        if (channel.id, message_id) in self.counters.queued:
            return Outcome.QUEUED  # already waiting (the reader met it again before its retry)
        delay = 0.0 if service_back and verdict.kind is not ErrorKind.RATE_LIMITED else max(self.queue.base_delay, verdict.retry_after or 0.0)
        try:
            await self.queue.put(
                RETRY_KIND, {"channel_id": channel.id, "channel": channel.ref, "message_id": message_id},
                error=verdict.reason, delay=delay,
            )
        except Exception as queue_error:
            logger.error("could not queue %s for a retry (%s); the reader will read it again", where, describe(queue_error))
            return None
        self.counters.queued.add((channel.id, message_id))
        logger.warning("queued %s for a retry in %.0fs: %s", where, delay, verdict.reason)
        return Outcome.QUEUED


# --- 5. the retry drain: transient failures, fetched again when due ---------------------------


class RetryDrain:
    """Retries the queued messages when due: fetched again from Telegram, handled again.

    Nothing is retried while storage or the database is known to be down (its
    breaker is open), so an outage does not spend the items' attempts.
    """

    def __init__(
        self,
        *,
        account: IngestAccount,
        channels: Channels,
        handler: ImageHandler,
        queue: RetryQueue,
        db: Database,
        storage: Storage,
        stats: Stats,
        counters: Counters,
        shutdown: GracefulShutdown,
        entity_timeout: float,
        cycle_budget: float,
        concurrency: int = CONCURRENCY,
        alerts: AlertSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.account = account
        self.channels = channels
        self.handler = handler
        self.queue = queue
        self.db = db
        self.storage = storage
        self.stats = stats
        self.counters = counters
        self.shutdown = shutdown
        self.entity_timeout = entity_timeout
        self.cycle_budget = cycle_budget
        self.concurrency = max(1, concurrency)
        self.alerts = alerts
        self._clock = clock

    async def cycle(self) -> float:
        """Retry the items that are due; the pause until the next cycle."""
        session = self.account.session()
        if session is None or self.shutdown.stopping:
            return 1.0
        for breaker in (self.storage.breaker, self.db.breaker):
            wait = open_breaker_wait(breaker)
            if wait is not None:
                return wait  # a retry now would only spend one of the item's attempts
        deadline = self._clock() + self.cycle_budget
        took = 0
        while not self.shutdown.stopping and self._clock() < deadline:
            items = await self.queue.due(limit=self.concurrency)
            if not items:
                break
            took += len(items)
            async with self.shutdown.in_flight():
                settled = await asyncio.gather(*(self._retry(session, item) for item in items))
            if not all(settled):
                return 1.0  # some items wait for their channel: they come back next cycle
        if took:
            return 0.0
        due_in = self.queue.next_due_in()
        return 5.0 if due_in is None else min(5.0, max(0.05, due_in))

    async def _retry(self, session: Session, item: RetryItem) -> bool:
        """One due item; False when it was given back untouched (its channel is not resolved now)."""
        channel_id = int(item.payload.get("channel_id", 0))
        message_id = int(item.payload.get("message_id", 0))
        state = self.channels.find(channel_id)
        if state is None:
            logger.warning("dropping retry of message %d: channel %s is no longer watched", message_id, channel_id)
            await self.queue.succeeded(item)
            return True
        channel = state.resolved()
        if channel is None:
            await self.queue.release(item)
            return False
        self.stats.retried += 1
        seen_back = self.handler.times_back()
        try:
            message = await telegram_op(
                session.client.get_messages(channel.entity, ids=message_id),
                self.entity_timeout,
                "get_messages",
                detail=str(message_id),
            )
            if message is None:
                outcome = Outcome.DELETED
            else:
                handling = self.handler.handle(session.client, channel, message)
                outcome = await tracing.traced("ingest.image", handling, attributes=tracing.of_image(channel, message, retry=True))
        except asyncio.CancelledError:
            await self.queue.release(item)
            raise
        except Exception as exc:
            await self._failed(session, channel, item, message_id, exc, service_back=self.handler.times_back() != seen_back)
            return True
        if outcome is Outcome.DELETED:
            self.stats.skip("deleted")
            metrics.IMAGES_SKIPPED.labels("deleted").inc()
            logger.info("message %d of %s was deleted before its retry", message_id, channel.ref)
        channel.count(outcome)
        self.counters.queued.discard((channel_id, message_id))
        await self.queue.succeeded(item)
        return True

    async def _failed(
        self, session: Session, channel: ResolvedChannel, item: RetryItem, message_id: int, exc: BaseException,
        *, service_back: bool = False,
    ) -> None:
        verdict = classify(exc)
        if isinstance(exc, CircuitOpenError):
            # Refused before anything was tried (another item's failures opened the breaker):
            # not this item's attempt. It comes back after the wait, behind the trial calls.
            with contextlib.suppress(Exception):
                await self.queue.postpone(item, max(1.0, exc.retry_after), reason=verdict.reason)
            return
        self.stats.error(f"retry of {channel.ref} message {message_id}", exc)
        if verdict.kind is ErrorKind.ACCOUNT_DEAD:
            await session.connection.handle_error(exc)
        permanent = verdict.kind is ErrorKind.PERMANENT and not refetch_fixes(exc)
        retry_after = verdict.retry_after if verdict.kind in (ErrorKind.RATE_LIMITED, ErrorKind.TRANSIENT) else None
        if service_back and verdict.kind is not ErrorKind.RATE_LIMITED:
            retry_after = 0.0  # storage or the database came back while this attempt failed: again now
        try:
            dead = await self.queue.failed(item, verdict.reason, permanent=permanent, retry_after=retry_after)
        except Exception as queue_error:
            logger.error("could not update retry item %s (%s); it comes back at the next start", item.id, describe(queue_error))
            return
        if dead:
            await self._give_up(channel, item, message_id, verdict.reason)

    async def _give_up(self, channel: ResolvedChannel, item: RetryItem, message_id: int, reason: str) -> None:
        """The last retry failed: a ``failed`` row and an alert."""
        self.counters.queued.discard((channel.id, message_id))
        self.counters.exhausted += 1
        self.stats.failed += 1
        metrics.IMAGES_FAILED.labels("exhausted").inc()
        channel.count(Outcome.FAILED)
        with contextlib.suppress(Exception):
            await self.db.record_ingest_image(
                channel.id, message_id, status=IngestStatus.FAILED, error=f"gave up after {item.attempts + 1} retries: {reason}"
            )
        if self.alerts is not None:
            self.alerts.alert(
                AlertType.PROCESSING_FAILED,
                f"Ingest gave up on {channel.ref} message {message_id}: {reason}",
                key="ingest:exhausted",
                details={"channel": channel.ref, "message_id": message_id, "gave_up_total": self.counters.exhausted},
            )


# --- 6. the orphan sweep: objects no row points at -------------------------------------------


@dataclass(frozen=True)
class SweepReport:
    """What an orphan sweep found and did."""

    scanned: int
    orphans: list[ObjectInfo]
    deleted: int
    dry_run: bool
    complete: bool


class OrphanSweep:
    """Deletes the stored objects no row points at: what a crash between upload and row leaves.

    It needs only the storage and the database, so ``./start.sh ingest gc`` runs it alone.

    Args:
        storage: where the objects are.
        db: where the rows are.
        cycle_budget: a periodic sweep starts nothing new after this long.
        clock: monotonic seconds.
    """

    def __init__(
        self, *, storage: Storage, db: Database, cycle_budget: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.storage = storage
        self.db = db
        self.cycle_budget = cycle_budget
        self._clock = clock

    async def cycle(self) -> None:
        """The periodic sweep (INGEST_GC_INTERVAL), within one cycle's budget."""
        await self.sweep(deadline=self._clock() + self.cycle_budget)

    async def sweep(
        self,
        *,
        older_than: float = ORPHAN_MIN_AGE,
        dry_run: bool = False,
        deadline: float | None = None,
        batch_size: int = SWEEP_BATCH,
    ) -> SweepReport:
        """Delete stored objects older than ``older_than`` seconds that no row points at.

        The keys are checked ``batch_size`` at a time, one database call per
        batch; an image shared by several messages is one object and stays
        while any of them has a row. Past ``deadline`` (monotonic seconds) no
        new batch or deletion starts and the report says ``complete=False``.
        """
        objects = await self.storage.list(OBJECT_PREFIX, older_than=older_than)
        ours = [info for info in objects if sha256_of_key(info.key) is not None]
        orphans: list[ObjectInfo] = []
        deleted = 0
        complete = True
        step = max(1, batch_size)
        for start in range(0, len(ours), step):
            if deadline is not None and self._clock() > deadline:
                complete = False
                break
            batch = ours[start : start + step]
            referenced = await self.db.ingest_stored_keys([info.key for info in batch])
            for info in batch:
                if info.key in referenced:
                    continue
                if not dry_run and deadline is not None and self._clock() > deadline:
                    complete = False
                    break
                orphans.append(info)
                if dry_run:
                    continue
                await self.storage.delete(info.key)
                deleted += 1
                metrics.ORPHANS_SWEPT.inc()
                logger.info("deleted orphan object %s (%d bytes, no row)", info.key, info.size, extra={"key": info.key})
            if not complete:
                break
        if orphans:
            logger.info(
                "orphan sweep: %d of %d object(s) had no row; %s",
                len(orphans),
                len(objects),
                "dry run, nothing deleted" if dry_run else f"{deleted} deleted",
            )
        return SweepReport(scanned=len(objects), orphans=orphans, deleted=deleted, dry_run=dry_run, complete=complete)


# --- 7. the account: the one-account case of the worker's pool --------------------------------


@dataclass(frozen=True)
class Session:
    """The account while it is connected: its connection and that connection's client."""

    connection: AccountConnection
    client: TelegramClient


class SandboxAccount:
    """Sandbox only: ingest's own demo account, provisioned when missing and given a fresh session when dead.

    ``demo_ingest`` is a member of the demo channel, so a worker running at the
    same time keeps the demo accounts.
    """

    def __init__(self, *, world: Any, db: Database, cipher: SessionCipher) -> None:
        self.world = world
        self.db = db
        self.cipher = cipher

    async def ensure(self, label: str) -> None:
        """Provision ``label`` when it is missing, not active or has no session (a sandbox can always log in again)."""
        account = next((a for a in await self.db.list_accounts() if a.label == label), None)
        if account is not None and account.status is AccountStatus.ACTIVE and account.has_session:
            return
        demo = await asyncio.to_thread(self.world.seed_demo)
        peer = demo.accounts[0]
        if label == SANDBOX_INGEST_ACCOUNT:
            peer = await asyncio.to_thread(self._ingest_peer, demo)
        else:
            with contextlib.suppress(Exception):
                peer = await asyncio.to_thread(self.world.peer, f"@{label}")
        session = await asyncio.to_thread(self.world.session_string, peer.phone)
        await self.db.upsert_account(label, phone=peer.phone, session=self.cipher.encrypt(session), status=AccountStatus.ACTIVE)
        logger.info("sandbox: account %s provisioned with a fresh session", label)

    def _ingest_peer(self, demo: Any) -> Any:
        """Ingest's own sandbox user, a member of the demo channel (created once)."""
        from devkit.sandbox import SandboxError

        try:
            peer = self.world.peer(f"@{SANDBOX_INGEST_ACCOUNT}")
        except (SandboxError, ValueError):
            peer = self.world.create_user(SANDBOX_INGEST_ACCOUNT, phone=SANDBOX_INGEST_PHONE, first_name="Demo", last_name="Ingest")
        self.world.add_member(demo.channel, peer)
        return peer


class IngestAccount:
    """The one account ingest reads with: :meth:`AccountPool.single` plus what only ingest needs.

    The account is INGEST_ACCOUNT, else the first active one; in sandbox mode it
    is ``demo_ingest`` (see :class:`SandboxAccount`). The pool keeps its lease
    and connection (reconnect with backoff, alerts, dead sessions, a session
    key that does not fit); this class alerts while there is no account to use.
    """

    def __init__(self, *, pool: AccountPool, label: str | None, interval: float, sandbox: SandboxAccount | None = None) -> None:
        self.pool = pool
        self.label = label
        self.interval = interval
        self.sandbox = sandbox
        self.problem: str | None = None

    @classmethod
    def from_settings(
        cls,
        settings: IngestSettings,
        *,
        db: Database,
        cipher: SessionCipher,
        factory: ClientFactory,
        on_connected: Callable[[AccountConnection], Awaitable[None]],
        alerts: AlertSink | None,
        world: Any | None,
    ) -> IngestAccount:
        label = settings.ingest_account or (SANDBOX_INGEST_ACCOUNT if world is not None else None)
        pool = AccountPool.single(
            label=label,
            db=db,
            cipher=cipher,
            client_factory=factory,
            owner=f"ingest:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            policy=ConnectionPolicy(
                lease_seconds=settings.account_lease_seconds,
                connect_timeout=settings.timeout_telegram_connect,
                call_timeout=settings.timeout_telegram_entity,
                backoff_max=settings.reconnect_backoff_max,
                alert_after=settings.reconnect_alert_after,
            ),
            on_connected=on_connected,
            alerts=alerts,
        )
        sandbox = SandboxAccount(world=world, db=db, cipher=cipher) if world is not None and label is not None else None
        return cls(pool=pool, label=label, interval=settings.account_check_interval, sandbox=sandbox)

    @property
    def wake(self) -> asyncio.Event:
        return self.pool.wake

    async def cycle(self) -> float:
        """The accounts loop: (sandbox) make sure the account can log in, then keep its lease and connection."""
        self.pool.wake.clear()
        if self.sandbox is not None and self.label is not None:
            await self.sandbox.ensure(self.label)
        await self.pool.refresh()
        self._watch_for_none()
        return self.interval

    def _watch_for_none(self) -> None:
        alerts = self.pool.alerts
        if self.pool.connections:
            if self.problem is not None and alerts is not None:
                label = next(iter(self.pool.connections.values())).label
                alerts.resolve(AlertType.ACCOUNT_NEEDS_LOGIN, key="ingest:no-account", message=f"ingest found account {label}")
            self.problem = None
            return
        first = self.problem is None
        self.problem = (
            f"account {self.label!r} not found or not active"
            if self.label
            else "no active account in telegram_accounts (./start.sh worker login)"
        )
        if first:
            logger.error("ingest cannot start reading: %s", self.problem)
        if alerts is not None:
            alerts.alert(
                AlertType.ACCOUNT_NEEDS_LOGIN,
                f"ingest has no Telegram account to read with: {self.problem}",
                key="ingest:no-account",
                details={"fix": "./start.sh worker login, or set INGEST_ACCOUNT to an active account's label"},
            )

    def session(self) -> Session | None:
        """The connected account, or None while there is none."""
        for connection in self.pool.connected():
            if connection.client is not None:
                return Session(connection, connection.client)
        return None

    async def ready(self) -> None:
        """Raises unless the account is connected (for /ready)."""
        if self.session() is None:
            connection = next(iter(self.pool.connections.values()), None)
            state = connection.state.value if connection is not None else (self.problem or "starting")
            raise ConnectionError(f"Telegram not connected ({state})")

    def status(self) -> dict[str, Any] | None:
        connection = next(iter(self.pool.connections.values()), None)
        return None if connection is None else {"label": connection.label, **connection.status()}

    async def close(self) -> None:
        await self.pool.close()


# --- 8. the process: assembled in one place, then run ----------------------------------------


def image_policy(settings: IngestSettings) -> ImagePolicy:
    return ImagePolicy(
        max_dimension=settings.max_image_dimension,
        oversize=OversizePolicy(settings.ingest_oversize),
        keep_exif=settings.ingest_keep_exif,
        memory_budget=settings.ingest_memory_budget_mb * 1024 * 1024,
    )


def channel_refs(settings: IngestSettings) -> tuple[str, ...]:
    """INGEST_CHANNELS, or the sandbox's demo channel in sandbox mode."""
    if settings.ingest_channels:
        return settings.ingest_channels
    return ("@demo_photos",)


@dataclass(frozen=True)
class Tuning:
    """Numbers tests and benchmarks change; the defaults are production's."""

    concurrency: int = CONCURRENCY
    image_workers: int = IMAGE_WORKERS
    reconcile_interval: float = RECONCILE_INTERVAL


@dataclass(frozen=True)
class Ingest:
    """Every part of a running ingest, complete: made by :meth:`assemble`, started by :meth:`attach`."""

    settings: IngestSettings
    stats: Stats
    counters: Counters
    queue: RetryQueue
    storage: Storage
    policy: ImagePolicy
    channels: Channels
    account: IngestAccount
    reader: ChannelReader
    retries: RetryDrain
    sweep: OrphanSweep

    @classmethod
    async def assemble(
        cls, settings: IngestSettings, runtime: BotRuntime, *, db: Database, storage: Storage, world: Any | None, tuning: Tuning
    ) -> Ingest:
        """Build every part from the settings and the opened database and storage."""
        tmp_dir = Path(settings.data_dir) / TEMP_SUBDIR / "ingest"
        await asyncio.to_thread(shutil.rmtree, tmp_dir, True)  # leftovers of a killed process
        queue = RetryQueue(
            name="ingest",
            store=DbRetryStore(db, "ingest"),
            fallback=JsonlRetryStore(Path(settings.data_dir) / "retry-ingest.jsonl"),
            capacity=settings.retry_queue_capacity,
            base_delay=settings.retry_base_delay,
            max_retries=settings.max_message_retries,
            store_timeout=settings.timeout_db,
        )
        await queue.load()
        stats, counters, policy = runtime.stats, Counters(), image_policy(settings)
        channels = Channels(
            channel_refs(settings), entity_timeout=settings.timeout_telegram_entity, counters=counters, alerts=runtime.alerts
        )
        account = IngestAccount.from_settings(
            settings,
            db=db,
            cipher=await asyncio.to_thread(session_cipher, settings),
            factory=client_factory(settings, world),
            on_connected=channels.on_connected,
            alerts=runtime.alerts,
            world=world,
        )
        handler = ImageHandler(
            db=db,
            store=ImageStore(db=db, storage=storage, stats=stats, counters=counters),
            downloader=Downloader(max_bytes=settings.max_image_size_bytes, timeout=settings.timeout_telegram_media, tmp_dir=tmp_dir),
            policy=policy,
            max_bytes=settings.max_image_size_bytes,
            stats=stats,
            counters=counters,
            image_workers=tuning.image_workers,
        )
        budget = settings.timeout_loop_cycle * 0.5
        reader = ChannelReader(
            account=account, channels=channels, handler=handler, queue=queue, db=db, stats=stats, counters=counters,
            shutdown=runtime.shutdown,
            backfill_limit=settings.ingest_backfill_limit,
            history_timeout=max(settings.timeout_telegram_entity, settings.timeout_db),
            cycle_budget=budget,
            concurrency=tuning.concurrency,
            reconcile_interval=tuning.reconcile_interval,
        )
        retries = RetryDrain(
            account=account, channels=channels, handler=handler, queue=queue, db=db, stats=stats, counters=counters,
            storage=storage,
            shutdown=runtime.shutdown,
            entity_timeout=settings.timeout_telegram_entity,
            cycle_budget=budget,
            concurrency=tuning.concurrency,
            alerts=runtime.alerts,
        )
        sweep = OrphanSweep(storage=storage, db=db, cycle_budget=budget)
        return cls(settings, stats, counters, queue, storage, policy, channels, account, reader, retries, sweep)

    def attach(self, runtime: BotRuntime) -> None:
        """Hand the loops, the queue, the ``ingest`` section and the /ready checks to the runtime."""
        settings = self.settings
        runtime.add_queue(self.queue)
        runtime.add_section("ingest", self.status)
        runtime.add_ready_check("storage", self.storage_answers)
        runtime.add_ready_check("telegram", self.account.ready)
        runtime.add_cleanup("telegram", self.account.close, timeout=settings.timeout_telegram_entity + 5)
        runtime.add_loop(
            "account",
            self.account.cycle,
            interval=settings.account_check_interval,
            wake=self.account.wake,
            max_silence=settings.watchdog_max_silence + settings.timeout_loop_cycle,
        )
        runtime.add_loop("channels", self.reader.cycle, interval=self.reader.reconcile_interval, wake=self.channels.wake)
        runtime.add_loop("retry", self.retries.cycle, interval=5.0, wake=self.queue.changed)
        # Images that failed while storage or the database was down go again as soon as it is back
        # (brought forward, they wake the retry loop: it waits on the queue's `changed`).
        event_loop = asyncio.get_running_loop()
        for breaker in (self.storage.breaker, self.reader.db.breaker):
            breaker.on_close(lambda: event_loop.call_soon_threadsafe(self.queue.retry_now))
        if settings.ingest_gc_interval > 0:
            runtime.add_loop("orphan_sweep", self.sweep.cycle, interval=settings.ingest_gc_interval)

    async def storage_answers(self) -> None:
        await self.storage.exists(f"{OBJECT_PREFIX}ready-probe")

    def status(self) -> dict[str, Any]:
        stats, counters = self.stats, self.counters
        return {
            "connected": self.account.session() is not None,
            "processed": stats.processed,
            "failed": stats.failed,
            "retried": stats.retried,
            "skipped": dict(stats.skipped),
            "duplicates": counters.duplicates,
            "ignored": counters.ignored,
            "gave_up": counters.exhausted,
            "queue_size": len(self.queue),
            "last_error": stats.last_error,
            "channels": self.channels.status(),
            "account": self.account.status(),
            "storage": self.storage.describe(),
            "limits": {
                "max_image_size_bytes": self.settings.max_image_size_bytes,
                "max_image_dimension": self.policy.max_dimension,
                "oversize": self.policy.oversize.value,
                "keep_exif": self.policy.keep_exif,
            },
        }


class IngestBot:
    """The ingest process: start-up (database, storage, sandbox), then :class:`Ingest`, then the loops.

    Until start-up is over, /status and /ready answer "starting"; once the
    parts are assembled, :meth:`Ingest.attach` puts the real ones in their place.

    Args:
        settings: the bot's settings.
        runtime: the kit (tests pass their own; ``main`` makes one).
        db / storage / world: given ones are used and left open; otherwise
            they are opened from the settings and closed at the end.
        storage_breaker: the breaker for a storage opened here (default: ``r2``).
        concurrency / image_workers / reconcile_interval: see :class:`Tuning`.
    """

    def __init__(
        self,
        settings: IngestSettings,
        *,
        runtime: BotRuntime | None = None,
        db: Database | None = None,
        storage: Storage | None = None,
        world: Any | None = None,
        storage_breaker: CircuitBreaker | None = None,
        concurrency: int = CONCURRENCY,
        image_workers: int = IMAGE_WORKERS,
        reconcile_interval: float = RECONCILE_INTERVAL,
    ) -> None:
        self.settings = settings
        self.runtime = runtime or BotRuntime(bot="ingest", settings=settings)
        self.given_db = db
        self.given_storage = storage
        self.given_world = world
        self.storage_breaker = storage_breaker
        self.tuning = Tuning(concurrency=concurrency, image_workers=image_workers, reconcile_interval=reconcile_interval)
        #: Set once every loop runs.
        self.ready = asyncio.Event()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or ``runtime.shutdown.request_stop()``), finish in-flight images, stop."""
        settings, runtime = self.settings, self.runtime
        async with runtime:
            self._register_starting()
            world = await self._open_sandbox() if settings.sandbox else self.given_world
            db = self.given_db or await runtime.open_database(settings)  # waits while the database is away
            runtime.backend = db.backend.value
            storage = self.given_storage or await runtime.until_started(
                "storage", lambda: open_storage(settings, breaker=self.storage_breaker), fix="check the R2_* settings"
            )
            runtime.add_ready_check("database", db.ping)
            ingest = await Ingest.assemble(settings, runtime, db=db, storage=storage, world=world, tuning=self.tuning)
            ingest.attach(runtime)
            runtime.start_heartbeat(worker_id="ingest", store=db)
            self.ready.set()
            await runtime.run_until_stopped()

    def _register_starting(self) -> None:
        """Every /status section and /ready check, answering "starting", registered before the first await.

        The runtime walks its sections and checks across awaits while answering a
        request; later registrations only replace these, never add a name.
        """

        def starting(what: str) -> Callable[[], Awaitable[None]]:
            async def check() -> None:
                raise ConnectionError(f"starting: {what}")

            return check

        self.runtime.add_section("ingest", lambda: {"starting": True, "connected": False})
        if self.settings.sandbox:
            self.runtime.add_section("sandbox_world", lambda: {"mode": "sandbox", "starting": True})
        self.runtime.add_ready_check("database", starting("the database is not open yet"))
        self.runtime.add_ready_check("storage", starting("storage is not open yet"))
        self.runtime.add_ready_check("telegram", starting("Telegram is not connected yet"))

    async def _open_sandbox(self) -> Any:
        """The sandbox world, announced loudly, with its /status section."""
        from devkit.sandbox import World, banner
        from devkit.sandbox import describe as describe_sandbox

        world = self.given_world or await asyncio.to_thread(World.open, self.settings.sandbox_path)
        self.runtime.sandbox = True
        self.runtime.add_section("sandbox_world", lambda: asyncio.to_thread(describe_sandbox, world))
        for line in (
            "*" * 78,
            banner(world.directory),
            "No TELEGRAM_API_ID/TELEGRAM_API_HASH set: ingest reads the sandbox's @demo_photos channel.",
            "Try:  ./start.sh sandbox --help   (post images to the channel, then watch /status)",
            "*" * 78,
        ):
            logger.warning("%s", line)
        return world


# --- the command line ------------------------------------------------------------------------


async def cli_gc(settings: IngestSettings, *, dry_run: bool, older_than_hours: float, as_json: bool) -> int:
    """``python ingest.py gc [--dry-run]``: the orphan sweep, once, from the command line."""
    db = await open_database(settings)
    try:
        sweep = OrphanSweep(storage=await open_storage(settings), db=db)
        report = await sweep.sweep(older_than=older_than_hours * 3600.0, dry_run=dry_run)
    finally:
        await db.close()
    if as_json:
        print(json.dumps({
            "scanned": report.scanned,
            "orphans": [{"key": o.key, "size": o.size, "last_modified": o.last_modified.isoformat()} for o in report.orphans],
            "deleted": report.deleted,
            "dry_run": report.dry_run,
        }))
        return 0
    for orphan in report.orphans:
        when = f"{orphan.last_modified:%Y-%m-%d %H:%M} UTC"
        print(f"{'would delete' if dry_run else 'deleted'} {orphan.key} ({orphan.size} bytes, {when})")
    verb = "would be deleted (dry run)" if dry_run else "deleted"
    print(f"{report.scanned} object(s) older than {older_than_hours:g} h scanned; {len(report.orphans)} orphan(s) {verb}")
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser, sub = bot_parser("ingest", "Store the images of Telegram channels in R2.", "docs/ingest.md")
    gc = sub.add_parser("gc", help="delete stored objects that no row points at (try --dry-run first)")
    gc.add_argument("--dry-run", action="store_true", help="list the orphans, delete nothing")
    gc.add_argument(
        "--older-than-hours", type=float, default=ORPHAN_MIN_AGE / 3600, help="only objects at least this old (default 24)"
    )
    gc.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the ingest bot, or ``gc``; bad input ends as one line, never a traceback."""
    return bot_main(
        argv,
        parse_args=parse_args,
        settings_type=IngestSettings,
        serve=lambda settings: IngestBot(settings, reconcile_interval=settings.reconcile_interval).run(),
        commands={
            "gc": lambda settings, args: cli_gc(
                settings, dry_run=args.dry_run, older_than_hours=args.older_than_hours, as_json=args.json
            ),
        },
        # one INFO line per download otherwise
        after_logging=lambda command: logging.getLogger("telethon.client.downloads").setLevel(logging.WARNING),
    )


if __name__ == "__main__":
    sys.exit(main())
