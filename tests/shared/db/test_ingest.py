"""The ingest bot's image records and channel cursors, on every backend."""

from __future__ import annotations

from shared.db import Database, IngestStatus


async def test_image_is_recorded_once_per_channel_message(backend_db: Database) -> None:
    first = await backend_db.record_ingest_image(-1001, 7, storage_key="ch/7.jpg", sha256="ab" * 32, width=800, height=600, size_bytes=51200, mime="image/jpeg")
    assert first.applied and first.image.status is IngestStatus.STORED
    again = await backend_db.record_ingest_image(-1001, 7, storage_key="ch/7-copy.jpg")
    assert not again.applied and again.image.storage_key == "ch/7.jpg", "a stored record is final"
    fetched = await backend_db.get_ingest_image(-1001, 7)
    assert fetched == first.image
    assert [i.message_id for i in await backend_db.ingest_images_by_sha256("ab" * 32)] == [7]
    assert await backend_db.get_ingest_image(-1001, 8) is None


async def test_failed_image_is_replaced_by_a_later_success(backend_db: Database) -> None:
    failed = await backend_db.record_ingest_image(-1001, 9, status=IngestStatus.FAILED, error="download timed out")
    assert failed.applied and failed.image.error == "download timed out"
    stored = await backend_db.record_ingest_image(-1001, 9, storage_key="ch/9.png", mime="image/png")
    assert stored.applied and stored.image.status is IngestStatus.STORED and stored.image.error is None
    assert stored.image.id == failed.image.id


async def test_channel_cursor_only_moves_forward(backend_db: Database) -> None:
    assert await backend_db.get_ingest_cursor(-1001) is None
    assert await backend_db.advance_ingest_cursor(-1001, 50) == 50
    assert await backend_db.advance_ingest_cursor(-1001, 40) == 50
    assert await backend_db.get_ingest_cursor(-1001) == 50
    assert await backend_db.get_ingest_cursor(-1002) is None
    assert await backend_db.advance_ingest_cursor(-1002, 0) == 0
    assert await backend_db.get_ingest_cursor(-1002) == 0
