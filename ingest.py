"""ingest.py: the images posted in Telegram channels, stored once each in R2 (or a local directory).

It watches the channels of INGEST_CHANNELS with one Telegram user account.
Every photo or image document is checked against its metadata (too large:
skipped, never downloaded), downloaded under a deadline, validated and
downscaled with Pillow within a fixed memory budget (:mod:`shared.images`),
stored under a key made of its content hash (:mod:`shared.storage`), and
only then recorded in ``ingest_images`` (unique per channel and message).
With no Telegram credentials and no database configured it runs on the
local Telegram sandbox and an embedded PostgreSQL, and says so loudly.

The story, top to bottom:

1. what a message carries (:func:`media_of`), read from its metadata only;
2. one image, start to end (:meth:`Ingestor.handle`): the order of effects
   is *upload, then row*, so a crash in between leaves an orphan object
   (swept later), never a row without its object;
3. the channel reader (:meth:`Ingestor.read_cycle`): the only owner of each
   channel's cursor. The ``NewMessage`` handler wakes it; it reads the
   history after the cursor (so a missed update, downtime or a first run's
   backfill are the same code path), handles the messages in order with
   bounded concurrency, and moves the cursor only over messages that were
   handled: stored, skipped, failed with a reason, or durably queued;
4. the retry loop: transient failures (R2 or the database down, a timeout)
   wait in the durable retry queue (60 s doubling, 5 retries) and are
   re-fetched from Telegram when due; the orphan sweep (``gc``);
5. the process: account lease and reconnects (:mod:`shared.telegram`),
   runtime, loops, ``/status``; then the command line.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from telethon import TelegramClient, events, types, utils

from shared import metrics, tracing
from shared.alerts import AlertSink, AlertType
from shared.breaker import CircuitBreaker, CircuitOpenError, CircuitState
from shared.config import IngestSettings
from shared.db import Database, open_database
from shared.db.records import Account, AccountStatus, IngestStatus
from shared.db.retry_store import DbRetryStore
from shared.errors import ErrorKind, PermanentError, classify, describe
from shared.health import TEMP_SUBDIR
from shared.images import ImagePolicy, ImageRejected, OversizePolicy, ProcessedImage, process_image
from shared.retry_queue import JsonlRetryStore, RetryItem, RetryQueue
from shared.cli import ArgumentParser
from shared.runtime import BotRuntime, Stats, bot_main
from shared.sessions import SessionCipher
from shared.shutdown import GracefulShutdown
from shared.storage import ObjectInfo, Storage, open_storage
from shared.telegram import (
    SANDBOX_INGEST_ACCOUNT,
    SANDBOX_INGEST_PHONE,
    AccountConnection,
    ClientFactory,
    ConnectionPolicy,
    ConnectionState,
    client_factory,
    session_cipher,
)
from shared.timeouts import telegram_op

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
#: Key file of the sandbox's session key (the worker uses the same file).
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


# --- channels -------------------------------------------------------------------------


@dataclass
class ChannelState:
    """One watched channel: its entity on the current client and its cursor.

    ``cursor`` is the greatest message id up to which every message was
    handled (recorded or queued); it only moves forward. It is None until it
    has been loaded, or, for a channel never read, until the first run has
    saved where it starts.
    """

    ref: str
    id: int | None = None
    title: str | None = None
    entity: Any = None
    cursor: int | None = None
    last_message_id: int = 0
    last_read_at: float | None = None
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: Outcome) -> None:
        self.counts[outcome.value] = self.counts.get(outcome.value, 0) + 1

    def status(self) -> dict[str, Any]:
        cursor = self.cursor or 0
        return {
            "id": self.id,
            "title": self.title,
            "resolved": self.entity is not None,
            "cursor": self.cursor,
            "last_message_id": self.last_message_id or None,
            "lag": max(0, self.last_message_id - cursor) if self.cursor is not None else None,
            "last_read_at": self.last_read_at,
            "error": self.error,
            **self.counts,
        }


def parse_channel_ref(ref: str) -> str | int:
    """What Telethon resolves: a numeric id as an int, a username as text."""
    text = ref.strip()
    return int(text) if text.lstrip("-").isdigit() else text


@dataclass(frozen=True)
class SweepReport:
    """What an orphan sweep found and did."""

    scanned: int
    orphans: list[ObjectInfo]
    deleted: int
    dry_run: bool
    complete: bool


# --- 2-4. the ingestor ------------------------------------------------------------------


class Ingestor:
    """Channels in, objects and rows out: the handler, the reader, the retry loop and the sweep.

    Args:
        db: the database.
        storage: where images go.
        queue: the durable retry queue.
        stats: the runtime's counters (processed, failed, retried, skipped by reason).
        shutdown: in-flight work is registered here so SIGTERM lets it finish.
        policy: Pillow limits.
        channels: the INGEST_CHANNELS references.
        max_bytes: MAX_IMAGE_SIZE_BYTES.
        backfill_limit: messages read back on a channel's first run.
        media_timeout / entity_timeout / history_timeout: deadlines of downloads,
            entity lookups and history reads.
        cycle_budget: a reader or retry cycle stops starting new work after this long.
        tmp_dir: where large downloads are written.
        alerts: where exhausted items are reported.
        concurrency / image_workers: messages in flight / images decoded at once.
        reconcile_interval: seconds between reads of every channel without a wake-up.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        *,
        db: Database,
        storage: Storage,
        queue: RetryQueue,
        stats: Stats,
        shutdown: GracefulShutdown,
        policy: ImagePolicy,
        channels: Iterable[str],
        max_bytes: int,
        backfill_limit: int,
        media_timeout: float,
        entity_timeout: float,
        history_timeout: float,
        cycle_budget: float,
        tmp_dir: Path,
        alerts: AlertSink | None = None,
        concurrency: int = CONCURRENCY,
        image_workers: int = IMAGE_WORKERS,
        reconcile_interval: float = RECONCILE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.storage = storage
        self.queue = queue
        self.stats = stats
        self.shutdown = shutdown
        self.policy = policy
        self.channels: dict[str, ChannelState] = {ref: ChannelState(ref=ref) for ref in channels}
        self.max_bytes = max_bytes
        self.backfill_limit = backfill_limit
        self.media_timeout = media_timeout
        self.entity_timeout = entity_timeout
        self.history_timeout = history_timeout
        self.cycle_budget = cycle_budget
        self.tmp_dir = Path(tmp_dir)
        self.alerts = alerts
        self.concurrency = max(1, concurrency)
        self.reconcile_interval = reconcile_interval
        self._clock = clock
        self._images = asyncio.Semaphore(max(1, image_workers))
        self.wake = asyncio.Event()
        self.client: TelegramClient | None = None
        self.connection: AccountConnection | None = None
        self.ignored = 0
        self.duplicates = 0
        self.exhausted = 0
        self.handler_errors = 0
        self._queued: set[tuple[int, int]] = set()

    # --- wiring -------------------------------------------------------------------------

    def _by_id(self, channel_id: int) -> ChannelState | None:
        return next((c for c in self.channels.values() if c.id == channel_id), None)

    def _connected_client(self) -> TelegramClient | None:
        client = self.client
        if client is None or not client.is_connected():
            return None
        if self.connection is not None and self.connection.state is not ConnectionState.CONNECTED:
            return None
        return client

    async def on_connected(self, connection: AccountConnection) -> None:
        """After every (re)connect: resolve the channels, attach the handler, wake the reader.

        Raises:
            Exception: a transient failure resolving a channel (the connection backs off and retries).
        """
        client = connection.client
        assert client is not None
        self.connection = connection
        for channel in self.channels.values():
            try:
                entity = await telegram_op(
                    client.get_entity(parse_channel_ref(channel.ref)), self.entity_timeout, "get_entity", detail=channel.ref
                )
            except Exception as exc:
                verdict = classify(exc)
                if verdict.kind in (ErrorKind.TRANSIENT, ErrorKind.RATE_LIMITED, ErrorKind.UNKNOWN_OUTCOME):
                    raise
                channel.entity = None
                channel.error = f"cannot resolve {channel.ref}: {verdict.reason}"
                logger.error("channel %s cannot be watched: %s", channel.ref, verdict.reason)
                if self.alerts is not None:
                    self.alerts.alert(
                        AlertType.INITIALIZATION_FAILED,
                        f"Channel {channel.ref} cannot be watched: {verdict.reason}",
                        key=f"ingest-channel:{channel.ref}",
                        details={"channel": channel.ref, "fix": "check INGEST_CHANNELS and that the account is a member"},
                    )
                continue
            channel.entity = entity
            channel.id = utils.get_peer_id(entity)
            channel.title = getattr(entity, "title", None)
            channel.error = None
        client.add_event_handler(self.on_new_message, events.NewMessage())
        self.client = client
        logger.info(
            "watching %d channel(s): %s",
            sum(1 for c in self.channels.values() if c.entity is not None),
            ", ".join(c.ref for c in self.channels.values() if c.entity is not None) or "none",
        )
        self.wake.set()

    async def on_new_message(self, event: events.NewMessage.Event) -> None:
        """The ``NewMessage`` handler: note the message and wake the reader (which handles it in order).

        Telethon only logs a handler's exception, so nothing may escape here.
        """
        try:
            channel = self._by_id(event.chat_id) if event.chat_id is not None else None
            if channel is None:
                return
            channel.last_message_id = max(channel.last_message_id, int(event.message.id))
            self.wake.set()
        except Exception as exc:  # pragma: no cover - defensive: reading attributes of a TL object
            self.handler_errors += 1
            logger.warning("NewMessage handler failed: %s", describe(exc))

    # --- 2. one image, start to end ----------------------------------------------------

    async def handle(self, channel: ChannelState, message: Any) -> Outcome:
        """Take one message from metadata to a stored object and its row.

        Returns:
            What happened; deliberate skips and broken files are recorded as rows.

        Raises:
            Exception: operational failures (Telegram, storage or database
                unavailable, timeouts), for the caller to queue or retry.
        """
        assert channel.id is not None
        ref = media_of(message)
        if ref is None:
            if getattr(message, "media", None) is not None and not isinstance(message.media, types.MessageMediaWebPage):
                self.ignored += 1
                self.stats.skip("not_an_image")
                metrics.IMAGES_SKIPPED.labels("not_an_image").inc()
            return Outcome.IGNORED
        existing = await self.db.get_ingest_image(channel.id, message.id)
        if existing is not None and existing.status in (IngestStatus.STORED, IngestStatus.SKIPPED):
            self.duplicates += 1
            metrics.IMAGES_SKIPPED.labels("duplicate").inc()
            return Outcome.DUPLICATE
        if ref.size > self.max_bytes:
            return await self._record_rejection(
                channel,
                message.id,
                "too_large",
                f"{ref.size} bytes is more than MAX_IMAGE_SIZE_BYTES ({self.max_bytes})",
                ref.mime,
            )
        self._refuse_when_open(self.storage.breaker)
        try:
            source, temp = await metrics.timed(metrics.DOWNLOAD_SECONDS, self._download(message, ref))
        except DownloadTooLarge as exc:
            return await self._record_rejection(channel, message.id, "too_large", str(exc), ref.mime)
        try:
            try:
                async with self._images:
                    processing = metrics.timed(metrics.PROCESSING_SECONDS, asyncio.to_thread(process_image, source, policy=self.policy))
                    image = await tracing.traced("ingest.process", processing)
            except ImageRejected as rejected:
                return await self._record_rejection(
                    channel, message.id, rejected.reason.value, rejected.detail, ref.mime, failure=rejected.reason.is_failure
                )
        finally:
            source = b""
            if temp is not None:
                temp.unlink(missing_ok=True)
        key = object_key(image)
        await self.storage.put(key, image.data, content_type=image.mime)
        recorded = await self.db.record_ingest_image(
            channel.id,
            message.id,
            status=IngestStatus.STORED,
            storage_key=key,
            sha256=image.sha256,
            width=image.width,
            height=image.height,
            size_bytes=image.size,
            mime=image.mime,
        )
        if not recorded.applied:
            self.duplicates += 1
            metrics.IMAGES_SKIPPED.labels("duplicate").inc()
            return Outcome.DUPLICATE
        self.stats.processed += 1
        metrics.image_stored(image.size)
        tracing.annotate(outcome="stored", size_bytes=image.size)
        logger.info(
            "stored %s message %d as %s (%dx%d, %d bytes)",
            channel.ref,
            message.id,
            key,
            image.width,
            image.height,
            image.size,
            extra={"channel": channel.ref, "message_id": message.id, "key": key, "resized": image.resized},
        )
        return Outcome.STORED

    @staticmethod
    def _refuse_when_open(breaker: CircuitBreaker) -> None:
        """Fail fast (before downloading) while the store's breaker is open."""
        status = breaker.get_status()
        if status["state"] == CircuitState.OPEN.value:
            raise CircuitOpenError(breaker.name, float(status["retry_in_s"] or 0.0))

    async def _download(self, message: Any, ref: MediaRef) -> tuple[bytes | Path, Path | None]:
        """Download under TIMEOUT_TELEGRAM_MEDIA into memory (small) or a temporary file (large)."""
        client = self.client
        if client is None:
            raise ConnectionError("not connected to Telegram")
        limit = self.max_bytes

        def guard(received: int, total: int) -> None:
            if received > limit:
                raise DownloadTooLarge(f"more than {limit} bytes arrived although the metadata said {ref.size}")

        if ref.size <= MEMORY_DOWNLOAD_LIMIT:
            data = await telegram_op(
                client.download_media(message, file=bytes, progress_callback=guard),
                self.media_timeout,
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
                self.media_timeout,
                "download_media",
                detail=str(message.id),
            )
        except BaseException:
            await asyncio.to_thread(handle.close)
            temp.unlink(missing_ok=True)
            raise
        await asyncio.to_thread(handle.close)
        return temp, temp

    async def _record_rejection(
        self, channel: ChannelState, message_id: int, reason: str, detail: str, mime: str | None, *, failure: bool = False
    ) -> Outcome:
        assert channel.id is not None
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

    # --- a message from the reader: handled means recorded or queued --------------------

    async def ingest(self, channel: ChannelState, message: Any) -> bool:
        """Handle one message for the reader. True when it is recorded or durably queued."""
        channel.last_message_id = max(channel.last_message_id, int(message.id))
        try:
            outcome = await tracing.traced("ingest.image", self.handle(channel, message), attributes=tracing.of_image(channel, message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = await self._defer(channel, int(message.id), exc)
            if outcome is None:
                return False
        channel.count(outcome)
        return True

    async def _defer(self, channel: ChannelState, message_id: int, exc: BaseException) -> Outcome | None:
        """A failed attempt: a permanent error is recorded, anything else goes to the retry queue.

        Returns None when neither worked (the reader must not move past this message).
        """
        assert channel.id is not None
        verdict = classify(exc)
        where = f"{channel.ref} message {message_id}"
        self.stats.error(where, exc)
        if verdict.kind is ErrorKind.ACCOUNT_DEAD and self.connection is not None:
            await self.connection.handle_error(exc)
        if verdict.kind is ErrorKind.PERMANENT and not _refetch_fixes(exc):
            try:
                await self.db.record_ingest_image(channel.id, message_id, status=IngestStatus.FAILED, error=verdict.reason)
                self.stats.failed += 1
                metrics.IMAGES_FAILED.labels(verdict.kind.value).inc()
                logger.warning("failed %s: %s", where, verdict.reason)
                return Outcome.FAILED
            except Exception as record_error:
                logger.warning("could not record the failure of %s (%s); queueing it", where, describe(record_error))
        if (channel.id, message_id) in self._queued:
            return Outcome.QUEUED  # already waiting (the reader met it again before its retry)
        delay = max(self.queue.base_delay, verdict.retry_after or 0.0)
        try:
            await self.queue.put(
                RETRY_KIND, {"channel_id": channel.id, "channel": channel.ref, "message_id": message_id},
                error=verdict.reason, delay=delay,
            )
        except Exception as queue_error:
            logger.error("could not queue %s for a retry (%s); the reader will read it again", where, describe(queue_error))
            return None
        self._queued.add((channel.id, message_id))
        logger.warning("queued %s for a retry in %.0fs: %s", where, delay, verdict.reason)
        return Outcome.QUEUED

    # --- 3. the channel reader ------------------------------------------------------------

    async def read_cycle(self) -> float:
        """Read every channel after its cursor and handle what is there; the pause until the next cycle."""
        self.wake.clear()
        client = self._connected_client()
        if client is None or self.shutdown.stopping:
            return self.reconcile_interval
        wait = self._open_breaker_wait(getattr(self.db, "breaker", None))
        if wait is not None:
            return wait  # reading now would only queue every message again
        deadline = self._clock() + self.cycle_budget
        more = stalled = False
        for channel in list(self.channels.values()):
            if channel.entity is None or self.shutdown.stopping:
                continue
            try:
                state = await self._read_channel(client, channel, deadline)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                channel.error = describe(exc)
                self.stats.error(f"reading {channel.ref}", exc)
                logger.warning("reading %s failed: %s", channel.ref, describe(exc))
                if self.connection is not None:
                    await self.connection.handle_error(exc)
                stalled = True
                continue
            more = more or state == "more"
            stalled = stalled or state == "stalled"
        if more:
            return 0.0
        return STALL_PAUSE if stalled else self.reconcile_interval

    async def _read_channel(self, client: TelegramClient, channel: ChannelState, deadline: float) -> str:
        assert channel.id is not None
        if channel.cursor is None:  # not loaded yet, or a channel never read: its first run saves a start
            channel.cursor = await self.db.get_ingest_cursor(channel.id)
        if channel.cursor is None:
            await self._first_run(client, channel)
        cursor = channel.cursor
        assert cursor is not None
        messages = await self._history(client, channel.entity, min_id=cursor, limit=PAGE_SIZE)
        channel.last_read_at = time.time()
        channel.error = None
        messages = sorted((m for m in messages if m.id > cursor), key=lambda m: m.id)
        for start in range(0, len(messages), self.concurrency):
            if self.shutdown.stopping or self._clock() > deadline:
                return "more"
            chunk = messages[start : start + self.concurrency]
            async with self.shutdown.in_flight():
                handled = await asyncio.gather(*(self.ingest(channel, m) for m in chunk))
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

    async def _advance(self, channel: ChannelState, upto: int) -> None:
        """Move the cursor to ``upto``; while the database refuses, it moves in memory only."""
        assert channel.id is not None
        channel.cursor = max(channel.cursor or 0, upto)
        try:
            channel.cursor = max(channel.cursor, await self.db.advance_ingest_cursor(channel.id, upto))
        except Exception as exc:
            logger.warning(
                "could not save the cursor of %s (%s); it is kept in memory and saved with the next one",
                channel.ref,
                describe(exc),
            )

    async def _first_run(self, client: TelegramClient, channel: ChannelState) -> None:
        """A channel never read before: choose and save where reading starts, before handling anything.

        The start is just before the oldest of the last INGEST_BACKFILL_LIMIT
        messages (the channel's beginning when it has fewer), or after the
        latest message when the limit is 0. It is saved first, and a failure
        to save raises, so a stop at any point after it resumes from there:
        what is posted while ingest is down is caught up however much it is.
        """
        assert channel.id is not None
        latest_first = await self._history(client, channel.entity, limit=max(1, self.backfill_limit))
        if self.backfill_limit <= 0:
            start = latest_first[0].id if latest_first else 0
            how = f"starting after message {start} (INGEST_BACKFILL_LIMIT=0)"
        elif len(latest_first) < self.backfill_limit:
            start = 0
            how = f"reading back all {len(latest_first)} message(s)"
        else:
            start = min(m.id for m in latest_first) - 1
            how = f"reading back the last {len(latest_first)} message(s), after message {start}"
        channel.cursor = await self.db.advance_ingest_cursor(channel.id, start)
        logger.info("first run on %s: %s", channel.ref, how)

    async def _history(self, client: TelegramClient, entity: Any, *, limit: int, min_id: int | None = None) -> list[Any]:
        """Messages after ``min_id``, oldest first; without it, the latest ``limit``, newest first."""

        async def collect() -> list[Any]:
            if min_id is not None:
                return [m async for m in client.iter_messages(entity, min_id=min_id, reverse=True, limit=limit, wait_time=0)]
            return [m async for m in client.iter_messages(entity, limit=limit, wait_time=0)]

        return await telegram_op(collect(), self.history_timeout, "get_history")

    # --- 4. the retry loop ----------------------------------------------------------------

    async def retry_cycle(self) -> float:
        """Retry the items that are due (not while storage or the database is known to be down)."""
        client = self._connected_client()
        if client is None or self.shutdown.stopping:
            return 1.0
        for breaker in (self.storage.breaker, getattr(self.db, "breaker", None)):
            wait = self._open_breaker_wait(breaker)
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
                settled = await asyncio.gather(*(self._retry(client, item) for item in items))
            if not all(settled):
                return 1.0  # some items wait for their channel: they come back next cycle
        if took:
            return 0.0
        due_in = self.queue.next_due_in()
        return 5.0 if due_in is None else min(5.0, max(0.05, due_in))

    @staticmethod
    def _open_breaker_wait(breaker: Any) -> float | None:
        """Seconds until an open breaker admits a probe, or None when it is not open."""
        if not isinstance(breaker, CircuitBreaker):
            return None
        status = breaker.get_status()
        if status["state"] != CircuitState.OPEN.value:
            return None
        return max(0.05, float(status["retry_in_s"] or 0.0))

    async def _retry(self, client: TelegramClient, item: RetryItem) -> bool:
        """One due item; False when it was given back untouched (its channel is not resolved now)."""
        channel_id = int(item.payload.get("channel_id", 0))
        message_id = int(item.payload.get("message_id", 0))
        channel = self._by_id(channel_id)
        if channel is None or channel.entity is None:
            if channel is None:
                logger.warning("dropping retry of message %d: channel %s is no longer watched", message_id, channel_id)
                await self.queue.succeeded(item)
                return True
            await self.queue.release(item)
            return False
        self.stats.retried += 1
        try:
            message = await telegram_op(
                client.get_messages(channel.entity, ids=message_id), self.entity_timeout, "get_messages", detail=str(message_id)
            )
            image = tracing.of_image(channel, message, retry=True)
            outcome = Outcome.DELETED if message is None else await tracing.traced("ingest.image", self.handle(channel, message), attributes=image)
        except asyncio.CancelledError:
            await self.queue.release(item)
            raise
        except Exception as exc:
            await self._retry_failed(channel, item, message_id, exc)
            return True
        if outcome is Outcome.DELETED:
            self.stats.skip("deleted")
            metrics.IMAGES_SKIPPED.labels("deleted").inc()
            logger.info("message %d of %s was deleted before its retry", message_id, channel.ref)
        channel.count(outcome)
        self._queued.discard((channel_id, message_id))
        await self.queue.succeeded(item)
        return True

    async def _retry_failed(self, channel: ChannelState, item: RetryItem, message_id: int, exc: BaseException) -> None:
        verdict = classify(exc)
        if isinstance(exc, CircuitOpenError):
            # Refused before anything was tried (another item's failures opened the breaker):
            # not this item's attempt. It comes back after the wait, behind the trial calls.
            with contextlib.suppress(Exception):
                await self.queue.postpone(item, max(1.0, exc.retry_after), reason=verdict.reason)
            return
        self.stats.error(f"retry of {channel.ref} message {message_id}", exc)
        if verdict.kind is ErrorKind.ACCOUNT_DEAD and self.connection is not None:
            await self.connection.handle_error(exc)
        permanent = verdict.kind is ErrorKind.PERMANENT and not _refetch_fixes(exc)
        retry_after = verdict.retry_after if verdict.kind in (ErrorKind.RATE_LIMITED, ErrorKind.TRANSIENT) else None
        try:
            dead = await self.queue.failed(item, verdict.reason, permanent=permanent, retry_after=retry_after)
        except Exception as queue_error:
            logger.error("could not update retry item %s (%s); it comes back at the next start", item.id, describe(queue_error))
            return
        if not dead:
            return
        self._queued.discard((int(item.payload.get("channel_id", 0)), message_id))
        self.exhausted += 1
        self.stats.failed += 1
        metrics.IMAGES_FAILED.labels("exhausted").inc()
        channel.count(Outcome.FAILED)
        assert channel.id is not None
        with contextlib.suppress(Exception):
            await self.db.record_ingest_image(
                channel.id,
                message_id,
                status=IngestStatus.FAILED,
                error=f"gave up after {item.attempts + 1} retries: {verdict.reason}",
            )
        if self.alerts is not None:
            self.alerts.alert(
                AlertType.PROCESSING_FAILED,
                f"Ingest gave up on {channel.ref} message {message_id}: {verdict.reason}",
                key="ingest:exhausted",
                details={"channel": channel.ref, "message_id": message_id, "gave_up_total": self.exhausted},
            )

    # --- the orphan sweep -------------------------------------------------------------------

    async def sweep_orphans(
        self,
        *,
        older_than: float = ORPHAN_MIN_AGE,
        dry_run: bool = False,
        deadline: float | None = None,
        batch_size: int = SWEEP_BATCH,
    ) -> SweepReport:
        """Delete stored objects older than ``older_than`` seconds that no row points at.

        An object without a row is what a crash between upload and row leaves.
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

    async def gc_cycle(self) -> None:
        await self.sweep_orphans(deadline=self._clock() + self.cycle_budget)

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        connection = self.connection
        return {
            "connected": self._connected_client() is not None,
            "processed": self.stats.processed,
            "failed": self.stats.failed,
            "retried": self.stats.retried,
            "skipped": dict(self.stats.skipped),
            "duplicates": self.duplicates,
            "ignored": self.ignored,
            "gave_up": self.exhausted,
            "queue_size": len(self.queue),
            "last_error": self.stats.last_error,
            "channels": {c.ref: c.status() for c in self.channels.values()},
            "account": None if connection is None else {"label": connection.label, **connection.status()},
            "storage": self.storage.describe(),
            "limits": {
                "max_image_size_bytes": self.max_bytes,
                "max_image_dimension": self.policy.max_dimension,
                "oversize": self.policy.oversize.value,
                "keep_exif": self.policy.keep_exif,
            },
        }


def _refetch_fixes(exc: BaseException) -> bool:
    """Telegram's expired file references are permanent for a message object but not for a fresh fetch."""
    return type(exc).__name__ in ("FileReferenceExpiredError", "FileReferenceInvalidError", "FileReferenceEmptyError")


# --- 5. the process ------------------------------------------------------------------------


class AccountKeeper:
    """The one account ingest logs in with: chosen, leased, connected and supervised.

    The account is INGEST_ACCOUNT, else the first active one; in sandbox mode
    it is ingest's own sandbox account (``demo_ingest``, a member of the demo
    channel), so a worker running at the same time keeps the demo accounts.
    In sandbox mode the account is provisioned when there is none, and given
    a fresh session when its old one stopped working. Everything else (lease,
    reconnect with backoff, alert after RECONNECT_ALERT_AFTER failures, dead
    sessions) is :class:`shared.telegram.AccountConnection`.
    """

    def __init__(
        self,
        *,
        settings: IngestSettings,
        db: Database,
        cipher: SessionCipher,
        client_factory: ClientFactory,
        ingestor: Ingestor,
        alerts: AlertSink | None,
        world: Any | None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.cipher = cipher
        self.client_factory = client_factory
        self.ingestor = ingestor
        self.alerts = alerts
        self.world = world
        self.owner = f"ingest:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.policy = ConnectionPolicy(
            lease_seconds=settings.account_lease_seconds,
            connect_timeout=settings.timeout_telegram_connect,
            call_timeout=settings.timeout_telegram_entity,
            backoff_max=settings.reconnect_backoff_max,
            alert_after=settings.reconnect_alert_after,
        )
        self.connection: AccountConnection | None = None
        self.wake = asyncio.Event()
        self.problem: str | None = None
        self._key_alerted = False

    async def _choose(self) -> Account | None:
        accounts = sorted(await self.db.list_accounts(), key=lambda a: a.id)
        wanted = self.settings.ingest_account or (SANDBOX_INGEST_ACCOUNT if self.world is not None else None)
        if wanted:
            return next((a for a in accounts if a.label == wanted), None)
        return next((a for a in accounts if a.status is AccountStatus.ACTIVE), None)

    async def _provision_sandbox(self, label: str | None) -> Account:
        """Sandbox only: the demo account with a fresh session (encrypted like a real one)."""
        assert self.world is not None
        demo = await asyncio.to_thread(self.world.seed_demo)
        peer = demo.accounts[0]
        label = label or SANDBOX_INGEST_ACCOUNT
        if label == SANDBOX_INGEST_ACCOUNT:
            peer = await asyncio.to_thread(self._sandbox_ingest_peer, demo)
        elif label:
            with contextlib.suppress(Exception):
                peer = await asyncio.to_thread(self.world.peer, f"@{label}")
        session = await asyncio.to_thread(self.world.session_string, peer.phone)
        account = await self.db.upsert_account(
            label or peer.username or str(peer.id),
            phone=peer.phone,
            session=self.cipher.encrypt(session),
            status=AccountStatus.ACTIVE,
        )
        logger.info("sandbox: account %s provisioned with a fresh session", account.label)
        return account

    def _sandbox_ingest_peer(self, demo: Any) -> Any:
        """Ingest's own sandbox user, a member of the demo channel (created once)."""
        from devkit.sandbox import SandboxError

        try:
            peer = self.world.peer(f"@{SANDBOX_INGEST_ACCOUNT}")
        except (SandboxError, ValueError):
            peer = self.world.create_user(SANDBOX_INGEST_ACCOUNT, phone=SANDBOX_INGEST_PHONE, first_name="Demo", last_name="Ingest")
        self.world.add_member(demo.channel, peer)
        return peer

    async def cycle(self) -> float:
        """The accounts loop: pick the account once, then keep its lease and connection."""
        self.wake.clear()
        if self.connection is None:
            account = await self._choose()
            unusable = account is None or account.status is not AccountStatus.ACTIVE or not account.has_session
            if self.world is not None and unusable:
                account = await self._provision_sandbox(account.label if account else self.settings.ingest_account)
            if account is None or account.status is not AccountStatus.ACTIVE:
                self.problem = (
                    f"account {self.settings.ingest_account!r} not found or not active"
                    if self.settings.ingest_account
                    else "no active account in telegram_accounts (./start.sh worker login)"
                )
                logger.error("ingest cannot start reading: %s", self.problem)
                if self.alerts is not None:
                    self.alerts.alert(
                        AlertType.ACCOUNT_NEEDS_LOGIN,
                        f"ingest has no Telegram account to read with: {self.problem}",
                        key="ingest:no-account",
                        details={"fix": "./start.sh worker login, or set INGEST_ACCOUNT to an active account's label"},
                    )
                return self.settings.account_check_interval
            if self.problem is not None and self.alerts is not None:
                self.alerts.resolve(
                    AlertType.ACCOUNT_NEEDS_LOGIN, key="ingest:no-account", message=f"ingest found account {account.label}"
                )
            self.problem = None
            self.connection = AccountConnection(
                account,
                db=self.db,
                cipher=self.cipher,
                client_factory=self.client_factory,
                owner=self.owner,
                policy=self.policy,
                on_connected=self.ingestor.on_connected,
                on_change=self.wake.set,
                alerts=self.alerts,
            )
            self.ingestor.connection = self.connection
        await self.connection.step()
        if self.connection.state is ConnectionState.KEY_MISMATCH and self.alerts is not None and not self._key_alerted:
            self._key_alerted = True  # once: this process's key does not change while it runs
            self.alerts.alert(
                AlertType.SESSION_KEY_MISMATCH,
                f"ingest's SESSION_ENCRYPTION_KEY cannot decrypt the session of {self.connection.label}; "
                "the account is left as it is (not needs_login)",
                key=f"session-key:{self.owner}",
                details={"fix": "give ingest the SESSION_ENCRYPTION_KEY the session was stored with"},
            )
        if self.connection.state is ConnectionState.NEEDS_LOGIN and self.world is not None:
            # The sandbox can always log in again: a fresh session, then start over.
            label = self.connection.label
            await self.connection.close()
            self.connection = None
            await self._provision_sandbox(label)
            return 0.1
        return self.settings.account_check_interval

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def ready(self) -> None:
        """Raises unless the account is connected (for /ready)."""
        if self.connection is None or not self.connection.connected:
            state = self.connection.state.value if self.connection is not None else (self.problem or "starting")
            raise ConnectionError(f"Telegram not connected ({state})")


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


class IngestBot:
    """The ingest process: database, storage, retry queue, account, the loops.

    Args:
        settings: the bot's settings.
        runtime: the kit (tests pass their own; ``main`` makes one).
        db / storage / world: given ones are used and left open; otherwise
            they are opened from the settings and closed at the end.
        storage_breaker: the breaker for a storage opened here (default: ``r2``).
        concurrency / image_workers / reconcile_interval: see :class:`Ingestor`.
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
        self.db = db
        self.storage = storage
        self.world = world
        self.storage_breaker = storage_breaker
        self.concurrency = concurrency
        self.image_workers = image_workers
        self.reconcile_interval = reconcile_interval
        self.ingestor: Ingestor | None = None
        self.accounts: AccountKeeper | None = None
        self.ready = asyncio.Event()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or ``runtime.shutdown.request_stop()``), finish in-flight images, stop."""
        settings, runtime = self.settings, self.runtime
        async with runtime:
            self._register_status()
            if settings.sandbox:
                await self._announce_sandbox()
            db, storage = await self._open()  # waits while the database is away; a bad setting stops here
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
            runtime.add_queue(queue)
            ingestor = self.ingestor = Ingestor(
                db=db,
                storage=storage,
                queue=queue,
                stats=runtime.stats,
                shutdown=runtime.shutdown,
                policy=image_policy(settings),
                channels=channel_refs(settings),
                max_bytes=settings.max_image_size_bytes,
                backfill_limit=settings.ingest_backfill_limit,
                media_timeout=settings.timeout_telegram_media,
                entity_timeout=settings.timeout_telegram_entity,
                history_timeout=max(settings.timeout_telegram_entity, settings.timeout_db),
                cycle_budget=settings.timeout_loop_cycle * 0.5,
                tmp_dir=tmp_dir,
                alerts=runtime.alerts,
                concurrency=self.concurrency,
                image_workers=self.image_workers,
                reconcile_interval=self.reconcile_interval,
            )
            accounts = self.accounts = AccountKeeper(
                settings=settings,
                db=db,
                cipher=await asyncio.to_thread(session_cipher, settings),
                client_factory=client_factory(settings, self.world),
                ingestor=ingestor,
                alerts=runtime.alerts,
                world=self.world,
            )
            runtime.add_cleanup("telegram", accounts.close, timeout=settings.timeout_telegram_entity + 5)
            runtime.add_loop(
                "account",
                accounts.cycle,
                interval=settings.account_check_interval,
                wake=accounts.wake,
                max_silence=settings.watchdog_max_silence + settings.timeout_loop_cycle,
            )
            runtime.add_loop("channels", ingestor.read_cycle, interval=self.reconcile_interval, wake=ingestor.wake)
            runtime.add_loop("retry", ingestor.retry_cycle, interval=5.0)
            if settings.ingest_gc_interval > 0:
                runtime.add_loop("orphan_sweep", ingestor.gc_cycle, interval=settings.ingest_gc_interval)
            runtime.start_heartbeat(worker_id="ingest", store=db)
            self.ready.set()
            await runtime.run_until_stopped()

    def _register_status(self) -> None:
        """Every /status section and /ready check, registered before the first await.

        The runtime walks its sections and checks across awaits while answering a
        request, so none may be added while the process is already serving.
        """
        self.runtime.add_section("ingest", self._ingest_status)
        if self.settings.sandbox:
            self.runtime.add_section("sandbox_world", self._sandbox_status)
        self.runtime.add_ready_check("database", self._ready_database)
        self.runtime.add_ready_check("storage", self._ready_storage)
        self.runtime.add_ready_check("telegram", self._ready_telegram)

    def _ingest_status(self) -> dict[str, Any]:
        if self.ingestor is None:
            return {"starting": True, "connected": False}
        return self.ingestor.status()

    async def _sandbox_status(self) -> dict[str, Any]:
        from devkit.sandbox import describe as describe_sandbox

        if self.world is None:
            return {"mode": "sandbox", "starting": True}
        return await asyncio.to_thread(describe_sandbox, self.world)

    async def _ready_database(self) -> None:
        if self.db is None:
            raise ConnectionError("starting: the database is not open yet")
        await self.db.ping()

    async def _ready_storage(self) -> None:
        if self.storage is None:
            raise ConnectionError("starting: storage is not open yet")
        await self.storage.exists(f"{OBJECT_PREFIX}ready-probe")

    async def _ready_telegram(self) -> None:
        if self.accounts is None:
            raise ConnectionError("starting")
        await self.accounts.ready()

    async def _open(self) -> tuple[Database, Storage]:
        settings, runtime = self.settings, self.runtime
        if self.db is None:
            self.db = await runtime.open_database(settings)
        runtime.backend = self.db.backend.value
        if self.storage is None:
            self.storage = await runtime.until_started(
                "storage", lambda: open_storage(settings, breaker=self.storage_breaker), fix="check the R2_* settings"
            )
        return self.db, self.storage

    async def _announce_sandbox(self) -> None:
        from devkit.sandbox import World, banner

        directory = self.settings.sandbox_path
        if self.world is None:
            self.world = await asyncio.to_thread(World.open, directory)
        world = self.world
        self.runtime.sandbox = True
        for line in (
            "*" * 78,
            banner(world.directory),
            "No TELEGRAM_API_ID/TELEGRAM_API_HASH set: ingest reads the sandbox's @demo_photos channel.",
            "Try:  ./start.sh sandbox --help   (post images to the channel, then watch /status)",
            "*" * 78,
        ):
            logger.warning("%s", line)


# --- the command line ------------------------------------------------------------------------


async def cli_gc(settings: IngestSettings, *, dry_run: bool, older_than_hours: float, as_json: bool) -> int:
    """``python ingest.py gc [--dry-run]``: the orphan sweep, once, from the command line."""
    db = await open_database(settings)
    try:
        storage = await open_storage(settings)
        queue = RetryQueue(name="ingest-gc", store=JsonlRetryStore(Path(settings.data_dir) / "retry-ingest-gc.jsonl"))
        ingestor = Ingestor(
            db=db,
            storage=storage,
            queue=queue,
            stats=Stats(),
            shutdown=GracefulShutdown(),
            policy=image_policy(settings),
            channels=(),
            max_bytes=settings.max_image_size_bytes,
            backfill_limit=0,
            media_timeout=settings.timeout_telegram_media,
            entity_timeout=settings.timeout_telegram_entity,
            history_timeout=settings.timeout_db,
            cycle_budget=settings.timeout_loop_cycle,
            tmp_dir=Path(settings.data_dir) / TEMP_SUBDIR / "ingest",
        )
        report = await ingestor.sweep_orphans(older_than=older_than_hours * 3600.0, dry_run=dry_run)
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
    parser = ArgumentParser(
        prog="./start.sh ingest",
        description="Store the images of Telegram channels in R2.",
        epilog="Global flags: -v shows INFO logs, --debug shows a traceback on errors. Manual: docs/ingest.md",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the bot (the default)")
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
