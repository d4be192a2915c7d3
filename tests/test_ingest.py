"""ingest.py in-process: sandbox channels post real images, moto's S3 server stands in for R2,
rows go to a fresh PostgreSQL database. Nothing of ours is mocked."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from prometheus_client import REGISTRY
from PIL import Image
from telethon.tl import types

from bench._common import TcpProxy, free_port
from ingest import IngestBot, OrphanSweep, media_of, object_key, sha256_of_key
from shared.alerts import AlertType
from shared.breaker import CircuitBreaker, CircuitState
from shared.config import IngestSettings, load_settings
from shared.db import PostgresDatabase, SupabaseDatabase
from shared.db.records import AccountStatus, IngestImage, IngestStatus, from_row
from shared.runtime import BotRuntime
from devkit.sandbox import FaultKind, ImageKind, World
from shared.storage import LocalBackend, S3Backend, Storage
from shared.telegram import AccountPool, ConnectionPolicy, client_factory, session_cipher
from tests.fixtures.postgrest import PostgrestEndpoint
from tests.helpers import RecordingAlerts
from tests.helpers import wait_until as shared_wait_until
from tests.ingest.s3_server import ACCESS_KEY, SECRET_KEY, S3Server, s3_bucket, s3_outage, s3_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
CHANNEL = "@demo_photos"

FAST = {
    "PORT": "0",
    "SANDBOX": "1",
    "ACCOUNT_CHECK_INTERVAL": "0.2",
    "ACCOUNT_LEASE_SECONDS": "5",
    "WATCHDOG_CHECK_INTERVAL": "0.2",
    "WATCHDOG_MAX_SILENCE": "10",
    "WATCHDOG_STARTUP_GRACE": "0",
    "HEARTBEAT_INTERVAL": "0.5",
    "RETRY_BASE_DELAY": "0.2",
    "TIMEOUT_TELEGRAM_ENTITY": "5",
    "TIMEOUT_TELEGRAM_CONNECT": "5",
    "TIMEOUT_TELEGRAM_MEDIA": "30",
    "TIMEOUT_STORAGE": "5",
    "RECONNECT_BACKOFF_MAX": "0.5",
    "SHUTDOWN_GRACE": "5",
    "INGEST_GC_INTERVAL": "0",
}


def png(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    """A small PNG whose bytes differ per seed."""
    image = Image.new("RGB", size, (seed % 256, (seed // 256) % 256, 77))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def wait_until(condition: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition") -> None:
    await shared_wait_until(condition, timeout=timeout, what=what, poll=0.05)


async def images(database_url: str) -> list[IngestImage]:
    """Every row of ``ingest_images``, read straight from the table."""
    conn = await asyncpg.connect(database_url)
    try:
        records = await conn.fetch("select * from ingest_images order by message_id")
    finally:
        await conn.close()
    return [from_row(IngestImage, dict(r)) for r in records]


async def count_rows(database_url: str, n: int, status: str = "stored") -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("select count(*) from ingest_images where status = $1", status)) >= n
    finally:
        await conn.close()


def s3_storage(server: S3Server, bucket: str, *, recovery_timeout: float = 60.0) -> Storage:
    """Storage on the S3 server with a breaker of the test's own and no botocore retries."""
    backend = S3Backend(
        endpoint_url=server.url, bucket=bucket, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
        region="us-east-1", timeout=5.0, max_attempts=1,
    )
    breaker = CircuitBreaker("r2", failure_threshold=5, recovery_timeout=recovery_timeout)
    return Storage(backend, timeout=5.0, breaker=breaker)


@dataclass
class Harness:
    """Everything one in-process ingest needs: the sandbox world, a fresh database, an S3 bucket."""

    world: World
    db: PostgresDatabase
    database_url: str
    s3: S3Server
    bucket: str
    env: dict[str, str]

    def post_png(self, seed: int, *, gap: bool = False) -> Any:
        return self.world.post_to_channel(
            CHANNEL, png(seed), gap=gap, as_document=True, mime_type="image/png", file_name=f"{seed}.png"
        )

    async def rows(self) -> list[IngestImage]:
        return await images(self.database_url)

    async def count(self, n: int, status: str = "stored") -> bool:
        return await count_rows(self.database_url, n, status)

    @asynccontextmanager
    async def running(
        self,
        *,
        env: dict[str, str] | None = None,
        storage: Storage | None = None,
        alerts: Any = None,
        db: PostgresDatabase | None = None,
        **options: Any,
    ) -> AsyncIterator[IngestBot]:
        settings = load_settings(IngestSettings, {**self.env, **(env or {})})
        runtime = BotRuntime(bot="ingest", settings=settings, host="127.0.0.1", alerts=alerts)
        storage = storage or s3_storage(self.s3, self.bucket)
        bot = IngestBot(settings, runtime=runtime, db=db or self.db, storage=storage, world=self.world, **options)
        task = asyncio.create_task(bot.run())
        try:
            await wait_until(lambda: bot.ready.is_set() or task.done(), what="ingest ready")
            if task.done():
                task.result()
            await wait_until(lambda: connected(bot), what="connected to the sandbox")
            yield bot
        finally:
            runtime.shutdown.request_stop("test over")
            await asyncio.wait_for(task, 30)


async def ingest_status(bot: IngestBot) -> dict[str, Any]:
    """The ``ingest`` section of /status, as an operator reads it."""
    return (await bot.runtime.status())["ingest"]


async def connected(bot: IngestBot) -> bool:
    return bool((await ingest_status(bot))["connected"])


async def cursor_is(bot: IngestBot, message_id: int) -> bool:
    return (await ingest_status(bot))["channels"][CHANNEL]["cursor"] == message_id


@pytest.fixture
def h(
    tmp_path: Path, sandbox_world: World, sandbox_demo: Any, database: PostgresDatabase, database_url: str,
    s3_server: S3Server, s3_bucket: str,
) -> Harness:
    env = {**FAST, **s3_server.env(s3_bucket), "DATA_DIR": str(tmp_path / "data"), "SANDBOX_DIR": str(tmp_path / "sandbox")}
    return Harness(sandbox_world, database, database_url, s3_server, s3_bucket, env)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_jpeg_png_and_webp_are_stored_with_rows_pointing_at_their_objects(h: Harness) -> None:
    before = {n: _metric(n) for n in ("ingest_images_stored_total", "ingest_stored_bytes_total", "ingest_download_seconds_count")}
    async with h.running() as bot:
        posted = [h.world.post_to_channel(CHANNEL, kind) for kind in (ImageKind.JPEG, ImageKind.PNG, ImageKind.WEBP)]
        h.world.post_to_channel(CHANNEL, text="just words")
        await wait_until(lambda: h.count(3), what="three rows stored")
        # The cursor moves once the whole batch is handled, just after its last row.
        await wait_until(lambda: cursor_is(bot, max(m.id for m in posted) + 1), what="the cursor past the text message")
        status = bot.runtime.status
        body = await status()

    rows = await h.rows()
    assert [r.message_id for r in rows] == [m.id for m in posted]
    assert [r.mime for r in rows] == ["image/jpeg", "image/png", "image/webp"]
    assert [(r.width, r.height) for r in rows] == [(1280, 960), (800, 600), (640, 480)]
    client = h.s3.client()
    for row in rows:
        assert row.status is IngestStatus.STORED and row.error is None
        assert row.storage_key == f"ingest/{row.sha256[:2]}/{row.sha256}{Path(row.storage_key).suffix}"
        obj = client.get_object(Bucket=h.bucket, Key=row.storage_key)
        data = obj["Body"].read()
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.bytes
        assert obj["ContentType"] == row.mime
    channel = body["ingest"]["channels"][CHANNEL]
    last = max(m.id for m in posted) + 1
    assert channel["cursor"] == last and channel["lag"] == 0 and channel["stored"] == 3
    assert body["counters"]["processed"] == 3 and body["ingest"]["queue_size"] == 0
    assert body["breakers"] is not None and body["sandbox"] is True and "sandbox_world" in body
    moved = {n: _metric(n) - v for n, v in before.items()}
    assert moved == {
        "ingest_images_stored_total": 3, "ingest_stored_bytes_total": sum(r.bytes for r in rows), "ingest_download_seconds_count": 3,
    }


async def test_a_60_mb_document_is_skipped_from_its_metadata_without_downloading_a_byte(h: Harness) -> None:
    # Any download would fail loudly and be counted: the rule must never be hit.
    h.world.set_fault(FaultKind.ERROR, method="GetFile", error="FILE_PART_INVALID")
    async with h.running() as bot:
        huge = h.world.post_to_channel(CHANNEL, ImageKind.HUGE)
        await wait_until(lambda: h.count(1, "skipped"), what="the huge document skipped")
        skipped = dict(bot.runtime.stats.skipped)

    (row,) = await h.rows()
    assert row.message_id == huge.id and row.status is IngestStatus.SKIPPED
    assert row.error.startswith("too_large: 62914560 bytes")
    assert row.storage_key is None
    assert h.world.faults()[0]["hits"] == 0
    assert skipped == {"too_large": 1}
    assert h.s3.keys(h.bucket) == set()


async def test_a_20000x20000_bomb_is_skipped_a_truncated_file_fails_with_its_reason_and_a_pdf_is_ignored(
    h: Harness,
) -> None:
    async with h.running() as bot:
        bomb = h.world.post_to_channel(CHANNEL, ImageKind.BOMB)
        corrupt = h.world.post_to_channel(CHANNEL, ImageKind.CORRUPT)
        pdf = h.world.post_to_channel(CHANNEL, ImageKind.PDF)
        marker = h.world.post_to_channel(CHANNEL, ImageKind.PNG)
        await wait_until(lambda: h.count(1), what="the marker after them stored")
        counters = bot.runtime.stats.as_dict()
        channel = (await ingest_status(bot))["channels"][CHANNEL]

    rows = {r.message_id: r for r in await h.rows()}
    assert rows[bomb.id].status is IngestStatus.SKIPPED and rows[bomb.id].error.startswith("decompression_bomb: ")
    assert rows[corrupt.id].status is IngestStatus.FAILED
    assert rows[corrupt.id].error.startswith("corrupt: image file is truncated")
    assert pdf.id not in rows
    assert rows[marker.id].status is IngestStatus.STORED
    assert counters["skipped"] == {"decompression_bomb": 1, "not_an_image": 1}
    assert counters["failed"] == 1 and counters["processed"] == 1
    assert channel["cursor"] == marker.id and channel["ignored"] == 1
    assert h.s3.keys(h.bucket) == {rows[marker.id].storage_key}


async def test_a_9000x6000_photo_is_stored_at_most_8192_on_its_long_side(h: Harness) -> None:
    # Keeping 8192 of a 9000 px side takes the decoded photo plus its downscaled copy
    # (about 380 MB): a budget that allows it. The default 256 MB decodes it at 1/2 scale.
    async with h.running(env={"INGEST_MEMORY_BUDGET_MB": "512"}):
        h.world.post_to_channel(CHANNEL, ImageKind.LARGE)
        await wait_until(lambda: h.count(1), timeout=60, what="the large photo stored")

    (row,) = await h.rows()
    data = h.s3.client().get_object(Bucket=h.bucket, Key=row.storage_key)["Body"].read()
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (8192, 5461) == (row.width, row.height)


async def test_the_same_image_posted_twice_is_one_object_with_two_rows(h: Harness) -> None:
    async with h.running():
        for _ in range(2):
            h.post_png(7)
        await wait_until(lambda: h.count(2), what="both stored")

    first, second = await h.rows()
    assert first.storage_key == second.storage_key
    assert h.s3.keys(h.bucket) == {first.storage_key}


async def test_an_r2_outage_opens_the_breaker_and_every_queued_image_is_stored_once_after_it_closes(
    h: Harness, s3_outage: S3Server
) -> None:
    bucket = s3_outage.create_bucket()
    storage = s3_storage(s3_outage, bucket, recovery_timeout=1.0)
    async with h.running(env=s3_outage.env(bucket), storage=storage) as bot:
        s3_outage.stop()
        posted = [h.post_png(n) for n in range(7)]
        queue = bot.runtime.queues["ingest"]
        await wait_until(lambda: storage.breaker.get_status()["times_opened"] >= 1, what="the r2 breaker opened")
        await wait_until(lambda: queue.get_status()["queued"] == 7, what="all seven queued")
        # Queued counts as handled: the reader moves on (its cursor is saved right after the batch).
        await wait_until(
            lambda: cursor_is(bot, posted[-1].id),
            what="the cursor past the queued images",
        )
        assert await h.rows() == []  # no row without its object
        s3_outage.start()
        await wait_until(lambda: h.count(7), timeout=30, what="all seven stored after the outage")
        await wait_until(lambda: len(queue) == 0, what="the queue drained")
        assert storage.breaker.state is CircuitState.CLOSED

    rows = await h.rows()
    assert [r.message_id for r in rows] == [m.id for m in posted]
    assert all(r.status is IngestStatus.STORED for r in rows)
    assert s3_outage.keys(bucket) == {r.storage_key for r in rows}
    assert len({r.storage_key for r in rows}) == 7


async def test_an_image_refused_in_a_short_r2_outage_is_stored_as_soon_as_r2_answers_not_after_its_retry_delay(
    h: Harness, s3_outage: S3Server
) -> None:
    """Too short to open the breaker: the probe of the suspect storage sees it down, then back, and the
    image queued for RETRY_BASE_DELAY (60 s) goes at once."""
    bucket = s3_outage.create_bucket()
    storage = s3_storage(s3_outage, bucket)
    storage.breaker.probe_interval = 0.1
    async with h.running(env={**s3_outage.env(bucket), "RETRY_BASE_DELAY": "60"}, storage=storage) as bot:
        s3_outage.stop()
        posted = h.post_png(1)
        queue = bot.runtime.queues["ingest"]
        await wait_until(lambda: queue.get_status()["queued"] == 1, what="queued for a retry")
        assert queue.next_due_in() is not None and queue.next_due_in() > 30, "its retry is a minute away"
        await wait_until(lambda: (storage.breaker.get_status()["last_error"] or "").startswith("probe:"), what="a probe saw R2 down")
        s3_outage.start()
        await wait_until(lambda: h.count(1), timeout=20, what="stored within seconds of R2's return")
        assert storage.breaker.times_back >= 1

    (row,) = await h.rows()
    assert row.message_id == posted.id and row.status is IngestStatus.STORED


async def test_a_download_telegram_never_answers_times_out_and_the_image_is_stored_on_retry(h: Harness) -> None:
    h.world.set_fault(FaultKind.HANG, method="GetFile", count=1)  # the first download request never gets an answer
    async with h.running(env={"TIMEOUT_TELEGRAM_MEDIA": "1"}) as bot:
        posted = h.post_png(7)
        await wait_until(lambda: h.count(1), what="stored by the retry after the timeout")
        retried, last_error = bot.runtime.stats.retried, bot.runtime.stats.last_error

    (row,) = await h.rows()
    assert row.message_id == posted.id and row.status is IngestStatus.STORED
    assert h.world.faults()[0]["hits"] == 1
    assert retried == 1 and last_error is not None and "timed out" in last_error


async def test_a_database_outage_mid_stream_loses_and_duplicates_no_image(h: Harness) -> None:
    # Ingest reaches PostgreSQL through a relay the test can cut (connections reset, new ones refused).
    url = urlsplit(h.database_url)
    query = parse_qs(url.query)
    socket_path = Path(query["host"][0]) / f".s.PGSQL.{query.get('port', ['5432'])[0]}"
    proxy = await TcpProxy(socket_path, free_port()).start()
    user = url.username or "postgres"
    relayed = PostgresDatabase(
        f"postgresql://{user}@127.0.0.1:{proxy.port}{url.path}",
        timeout=2.0,
        breaker=CircuitBreaker("database", failure_threshold=5, recovery_timeout=1.0),
        poll_interval=0.2,
    )
    await relayed.open()
    try:
        async with h.running(db=relayed, reconcile_interval=0.3) as bot:
            before = [h.post_png(n) for n in range(3)]
            await wait_until(lambda: h.count(3), what="the first three stored")
            await proxy.cut()
            during = [h.post_png(100 + n) for n in range(5)]
            await wait_until(lambda: relayed.breaker.state is not CircuitState.CLOSED, what="the database breaker open")
            await proxy.restore()
            await wait_until(lambda: h.count(8), timeout=60, what="every image stored once the database is back")
            channel = (await ingest_status(bot))["channels"][CHANNEL]
    finally:
        await relayed.close()
        await proxy.close()

    rows = await h.rows()
    assert [r.message_id for r in rows] == [m.id for m in before + during]  # one row each, none twice
    assert {r.storage_key for r in rows} <= h.s3.keys(h.bucket)  # no row without its object
    assert channel["cursor"] == during[-1].id


async def test_an_item_that_keeps_failing_is_recorded_as_failed_and_the_operator_is_alerted(
    h: Harness, s3_outage: S3Server
) -> None:
    bucket = s3_outage.create_bucket()
    s3_outage.stop()
    alerts = RecordingAlerts()
    fragile = {**s3_outage.env(bucket), "MAX_MESSAGE_RETRIES": "2"}
    async with h.running(env=fragile, storage=s3_storage(s3_outage, bucket), alerts=alerts) as bot:
        posted = h.post_png(3)
        await wait_until(lambda: h.count(1, "failed"), what="given up and recorded")
        queue_status = bot.runtime.queues["ingest"].get_status()

    (row,) = await h.rows()
    assert row.message_id == posted.id and row.error.startswith("gave up after 2 retries: storage unreachable")
    assert queue_status["dead"] == 1 and queue_status["size"] == 0
    gave_up = [key for kind, _, key in alerts.alerts if kind is AlertType.PROCESSING_FAILED]
    assert gave_up == ["ingest:exhausted"]


async def test_first_run_reads_back_only_the_backfill_limit_and_later_catches_up_on_everything(h: Harness) -> None:
    before = [h.post_png(n) for n in range(5)]
    limited = {"INGEST_BACKFILL_LIMIT": "2"}
    async with h.running(env=limited):
        await wait_until(lambda: h.count(2), what="the last two stored")
    assert [r.message_id for r in await h.rows()] == [m.id for m in before[-2:]]

    # While it is down: posts whose updates are never pushed are found from the cursor.
    during = [h.post_png(90 + n, gap=True) for n in range(3)]
    async with h.running(env=limited):
        await wait_until(lambda: h.count(5), what="everything posted while down stored")
    assert [r.message_id for r in await h.rows()] == [m.id for m in before[-2:] + during]


async def test_a_first_run_stopped_before_it_handled_anything_resumes_from_its_saved_start(h: Harness) -> None:
    before = [h.post_png(n) for n in range(4)]
    limited = {"INGEST_BACKFILL_LIMIT": "2", "SHUTDOWN_GRACE": "0.5", "TIMEOUT_TELEGRAM_MEDIA": "60"}
    h.world.set_fault(FaultKind.HANG, method="GetFile")  # stuck on the first download, so no message is handled
    async with h.running(env=limited):
        await wait_until(lambda: h.world.faults()[0]["hits"] >= 1, what="the first download in flight")
    assert await h.rows() == []
    conn = await asyncpg.connect(h.database_url)
    try:
        saved = await conn.fetchval("select last_message_id from ingest_cursors")
    finally:
        await conn.close()
    assert saved == before[-2].id - 1  # the start of the first run, saved before its first message
    h.world.clear_faults()

    # More than INGEST_BACKFILL_LIMIT posted while it is down: none of it is taken for a new first run.
    during = [h.post_png(90 + n, gap=True) for n in range(5)]
    async with h.running(env=limited):
        await wait_until(lambda: h.count(7), what="the backfill window and everything posted while down stored")
    assert [r.message_id for r in await h.rows()] == [m.id for m in before[-2:] + during]


async def test_updates_that_never_arrive_are_found_by_the_periodic_reader(h: Harness) -> None:
    async with h.running(reconcile_interval=0.3):
        silent = h.post_png(5, gap=True)
        await wait_until(lambda: h.count(1), what="the silent post stored")

    (row,) = await h.rows()
    assert row.message_id == silent.id


async def test_a_dropped_connection_is_reconnected_and_reading_goes_on(h: Harness) -> None:
    async with h.running() as bot:
        h.post_png(1)
        await wait_until(lambda: h.count(1), what="the first stored")
        h.world.set_fault(FaultKind.DROP, method="GetHistory", count=1)
        h.post_png(2)
        await wait_until(lambda: h.count(2), what="the second stored after a reconnect")
        account = (await ingest_status(bot))["account"]

    assert h.world.faults()[0]["hits"] == 1
    assert account["reconnects"] >= 1 and account["connected"]


async def test_without_ingest_account_the_first_active_account_is_read_with_and_kept_once_taken(h: Harness) -> None:
    """AccountPool.single without a label: one account, the lowest active id; a lower one coming back does not take over."""
    settings = load_settings(IngestSettings, h.env)
    cipher = session_cipher(settings)
    demo = h.world.seed_demo()
    first, second = [
        await h.db.upsert_account(
            peer.username, phone=peer.phone, session=cipher.encrypt(h.world.session_string(peer.phone)),
            status=AccountStatus.ACTIVE,
        )
        for peer in demo.accounts[:2]
    ]
    await h.db.set_account_status(first.id, AccountStatus.NEEDS_LOGIN)
    pool = AccountPool.single(
        db=h.db, cipher=cipher, client_factory=client_factory(settings, h.world), owner="ingest:test",
        policy=ConnectionPolicy(lease_seconds=5, connect_timeout=5, call_timeout=5),
    )

    async def serving() -> list[str]:
        await pool.refresh()
        return [c.label for c in pool.connected()]

    try:
        await wait_until(serving, what="an account connected")
        assert await serving() == [second.label]
        await h.db.set_account_status(first.id, AccountStatus.ACTIVE)
        assert await serving() == [second.label]
        assert list(pool.connections) == [second.id]
    finally:
        await pool.close()


def test_media_is_judged_from_metadata_alone() -> None:
    sizes = [
        types.PhotoSize(type="m", w=320, h=240, size=9000),
        types.PhotoSizeProgressive(type="y", w=1280, h=960, sizes=[1000, 50000, 120000]),
    ]
    photo = types.Photo(id=1, access_hash=2, file_reference=b"", date=None, dc_id=2, sizes=sizes)
    ref = media_of(message_with(types.MessageMediaPhoto(photo=photo)))
    assert ref is not None and (ref.kind, ref.size, ref.width, ref.height) == ("photo", 120000, 1280, 960)

    def document(mime: str, *attributes: Any) -> types.Message:
        doc = types.Document(
            id=1, access_hash=2, file_reference=b"", date=None, mime_type=mime, size=4242, dc_id=2, attributes=list(attributes)
        )
        return message_with(types.MessageMediaDocument(document=doc))

    sticker = types.DocumentAttributeSticker(alt="x", stickerset=types.InputStickerSetEmpty())
    assert media_of(document("image/png", types.DocumentAttributeImageSize(w=10, h=20))).size == 4242  # type: ignore[union-attr]
    assert media_of(document("application/pdf", types.DocumentAttributeFilename("r.pdf"))) is None
    assert media_of(document("application/octet-stream", types.DocumentAttributeFilename("IMG_1.JPG"))) is not None
    assert media_of(document("image/webp", sticker)) is None
    assert media_of(document("video/mp4")) is None
    assert media_of(message_with(None)) is None


def message_with(media: Any) -> types.Message:
    return types.Message(id=1, peer_id=types.PeerChannel(5), date=None, message="", media=media)


def test_object_keys_are_content_hashes_under_the_ingest_prefix() -> None:
    from shared.images import ImagePolicy, process_image

    image = process_image(png(1), policy=ImagePolicy())
    key = object_key(image)
    assert key == f"ingest/{image.sha256[:2]}/{image.sha256}.png"
    assert sha256_of_key(key) == image.sha256
    assert sha256_of_key("attachments/x.png") is None and sha256_of_key("ingest/ab/not-a-hash.png") is None


@pytest.mark.slow
async def test_gc_dry_run_lists_old_orphans_and_the_real_run_deletes_only_them(
    tmp_path: Path, database: PostgresDatabase, database_url: str
) -> None:
    objects = tmp_path / "data" / "objects"
    local = Storage(LocalBackend(objects), timeout=5.0, breaker=CircuitBreaker("gc-test"))
    kept_sha, orphan_sha, young_sha = (hashlib.sha256(bytes([n])).hexdigest() for n in range(3))
    shas = {"kept": kept_sha, "orphan": orphan_sha, "young": young_sha}
    keys = {name: f"ingest/{sha[:2]}/{sha}.png" for name, sha in shas.items()}
    for key in keys.values():
        await local.put(key, b"png", content_type="image/png")
    await local.put("attachments/not-ours.png", b"x", content_type="image/png")
    day_ago = time.time() - 25 * 3600
    for name in ("kept", "orphan"):
        os.utime(objects / keys[name], (day_ago, day_ago))
    os.utime(objects / "attachments/not-ours.png", (day_ago, day_ago))
    await database.record_ingest_image(-100123, 1, storage_key=keys["kept"], sha256=kept_sha)

    env = {**os.environ, "SANDBOX": "1", "DATABASE_URL": database_url, "DATA_DIR": str(tmp_path / "data"), "SANDBOX_DIR": str(tmp_path / "sb")}

    def gc(*args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "ingest.py", "gc", "--json", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    dry = gc("--dry-run")
    assert [o["key"] for o in dry["orphans"]] == [keys["orphan"]] and dry["deleted"] == 0
    assert (objects / keys["orphan"]).exists()

    real = gc()
    assert real["deleted"] == 1
    assert not (objects / keys["orphan"]).exists()
    assert all((objects / keys[name]).exists() for name in ("kept", "young"))
    assert (objects / "attachments/not-ours.png").exists()


async def test_gc_checks_keys_in_batches_and_keeps_every_object_a_row_points_at(
    tmp_path: Path, supabase_database: SupabaseDatabase, postgrest: PostgrestEndpoint
) -> None:
    """Seven old objects, batches of three: three database calls (none per object) over the Supabase
    HTTP backend; the objects with a row in any batch stay, the others are the orphans."""
    objects = tmp_path / "objects"
    local = Storage(LocalBackend(objects), timeout=5.0, breaker=CircuitBreaker("gc-batch-test"))
    keys = sorted(f"ingest/{sha[:2]}/{sha}.png" for sha in (hashlib.sha256(bytes([n])).hexdigest() for n in range(7)))
    day_ago = time.time() - 25 * 3600
    for key in keys:
        await local.put(key, b"png", content_type="image/png")
        os.utime(objects / key, (day_ago, day_ago))
    kept = {keys[0], keys[3], keys[6]}  # one in each batch of the sorted listing
    for message_id, key in enumerate(sorted(kept), start=1):
        await supabase_database.record_ingest_image(-100123, message_id, storage_key=key)
    sweep = OrphanSweep(storage=local, db=supabase_database)
    orphans = sorted(set(keys) - kept)

    dry = await sweep.sweep(dry_run=True, batch_size=3)
    real = await sweep.sweep(batch_size=3)

    calls = [r.function for r in postgrest.requests if r.function.startswith("ingest_")]
    assert calls.count("ingest_stored_keys") == 6, "ceil(7 / 3) calls per sweep, two sweeps"
    assert "ingest_images_by_sha256" not in calls
    assert [o.key for o in dry.orphans] == orphans and dry.deleted == 0 and dry.scanned == 7 and dry.complete
    assert [o.key for o in real.orphans] == orphans and real.deleted == 4 and real.complete
    assert sorted(p.relative_to(objects).as_posix() for p in objects.rglob("*.png")) == sorted(kept)
