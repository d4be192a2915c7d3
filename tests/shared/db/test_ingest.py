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


async def test_stored_keys_are_the_subset_of_the_asked_keys_that_a_row_points_at(backend_db: Database) -> None:
    odd = "ingest/ab/it's a \"key\", with {braces}, [brackets], commas; ümlauts\\and\nnewline.png"
    for message_id, key in enumerate(("ingest/aa/one.png", odd, "ingest/cc/other.png"), start=1):
        await backend_db.record_ingest_image(-1001, message_id, storage_key=key)
    await backend_db.record_ingest_image(-1001, 4, status=IngestStatus.FAILED, error="no key")
    await backend_db.record_ingest_image(-1002, 1, storage_key="ingest/aa/one.png")  # a second row, same object

    asked = ["ingest/aa/one.png", odd, "ingest/bb/orphan.png", "ingest/aa/one.png", "", "INGEST/AA/ONE.PNG"]
    assert await backend_db.ingest_stored_keys(asked) == {"ingest/aa/one.png", odd}
    assert await backend_db.ingest_stored_keys([]) == set()
    assert await backend_db.ingest_stored_keys(["ingest/bb/orphan.png"]) == set()


async def test_stored_keys_pick_the_referenced_keys_out_of_a_full_sweep_batch(backend_db: Database) -> None:
    keys = [f"ingest/{n:02x}/{n:064x}.png" for n in range(500)]
    for n in range(0, 500, 50):
        await backend_db.record_ingest_image(-1001, n, storage_key=keys[n])
    assert await backend_db.ingest_stored_keys(keys) == set(keys[::50])
