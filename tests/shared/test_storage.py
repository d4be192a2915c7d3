"""Object storage: the local directory and S3 (moto's server on 127.0.0.1 standing in for R2)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.breaker import CircuitBreaker, CircuitOpenError, CircuitState, registry
from shared.config import IngestSettings, load_settings
from shared.storage import InvalidKey, LocalBackend, ObjectNotFound, S3Backend, Storage, open_storage
from shared.timeouts import OperationTimeout
from tests.ingest.s3_server import ACCESS_KEY, SECRET_KEY, S3Server, s3_bucket, s3_outage, s3_server  # noqa: F401


def breaker(**kwargs: float) -> CircuitBreaker:
    return CircuitBreaker("test-storage", **{"failure_threshold": 5, "recovery_timeout": 60.0, **kwargs})


def s3_storage(url: str, bucket: str, *, timeout: float = 5.0, read_timeout: float = 5.0, **kwargs: float) -> Storage:
    backend = S3Backend(
        endpoint_url=url, bucket=bucket, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
        region="us-east-1", timeout=read_timeout, max_attempts=1,
    )
    return Storage(backend, timeout=timeout, breaker=breaker(**kwargs))


@pytest.fixture
def local(tmp_path: Path) -> Storage:
    return Storage(LocalBackend(tmp_path / "objects"), timeout=5.0, breaker=breaker())


async def test_local_store_round_trips_bytes_and_files(local: Storage, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"from a file")
    await local.put("ingest/aa/one.jpg", b"hello", content_type="image/jpeg")
    await local.put("ingest/bb/two.png", source, content_type="image/png")

    assert await local.get("ingest/aa/one.jpg") == b"hello"
    assert await local.exists("ingest/bb/two.png")
    target = tmp_path / "out" / "copy.png"
    await local.download_to("ingest/bb/two.png", target)
    assert target.read_bytes() == b"from a file"
    assert [info.key for info in await local.list("ingest/")] == ["ingest/aa/one.jpg", "ingest/bb/two.png"]

    await local.put("ingest/aa/one.jpg", b"replaced", content_type="image/jpeg")
    assert await local.get("ingest/aa/one.jpg") == b"replaced"
    await local.delete("ingest/aa/one.jpg")
    await local.delete("ingest/aa/one.jpg")  # deleting twice is fine
    assert not await local.exists("ingest/aa/one.jpg")
    assert not (tmp_path / "objects" / "ingest" / "aa").exists()  # emptied directories are tidied
    assert list((tmp_path / "objects" / ".tmp").iterdir()) == []  # no temporary files left behind


async def test_missing_objects_raise_not_found_without_counting_against_the_breaker(local: Storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        await local.get("ingest/none.jpg")
    with pytest.raises(ObjectNotFound):
        await local.download_to("ingest/none.jpg", tmp_path / "x")
    assert not await local.exists("ingest/none.jpg")
    assert local.breaker.get_status()["total_failures"] == 0


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../escape", "ingest/../../escape", "ingest/.hidden", "a\\b", "dir/"])
async def test_keys_cannot_leave_the_store_or_hide_in_it(local: Storage, key: str) -> None:
    with pytest.raises(InvalidKey):
        await local.put(key, b"x", content_type="text/plain")


async def test_listing_filters_by_prefix_and_age(local: Storage, tmp_path: Path) -> None:
    for key in ("ingest/old.jpg", "ingest/new.jpg", "other/old.jpg"):
        await local.put(key, b"x", content_type="image/jpeg")
    day_ago = time.time() - 25 * 3600
    for key in ("ingest/old.jpg", "other/old.jpg"):
        os.utime(tmp_path / "objects" / key, (day_ago, day_ago))

    old = await local.list("ingest/", older_than=24 * 3600)

    assert [info.key for info in old] == ["ingest/old.jpg"]
    assert old[0].age(time.time()) > 24 * 3600


async def test_s3_store_round_trips_against_an_s3_server(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    storage = s3_storage(s3_server.url, s3_bucket)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024))

    await storage.put("ingest/ab/photo.jpg", b"jpeg bytes", content_type="image/jpeg")
    await storage.put("ingest/cd/big.bin", source, content_type="application/octet-stream")

    assert await storage.get("ingest/ab/photo.jpg") == b"jpeg bytes"
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="ingest/ab/photo.jpg")
    assert head["ContentType"] == "image/jpeg"
    target = tmp_path / "copy.bin"
    await storage.download_to("ingest/cd/big.bin", target)
    assert target.read_bytes() == source.read_bytes()
    listed = {info.key: info.size for info in await storage.list("ingest/")}
    assert listed == {"ingest/ab/photo.jpg": 10, "ingest/cd/big.bin": 3 * 1024 * 1024}
    assert await storage.list("ingest/", older_than=3600) == []
    assert await storage.exists("ingest/ab/photo.jpg") and not await storage.exists("ingest/none.jpg")
    with pytest.raises(ObjectNotFound):
        await storage.get("ingest/none.jpg")
    await storage.delete("ingest/ab/photo.jpg")
    assert not await storage.exists("ingest/ab/photo.jpg")
    assert storage.breaker.get_status()["total_failures"] == 0
    described = storage.describe()
    assert described["bucket"] == s3_bucket and SECRET_KEY not in str(described)


async def test_unreachable_store_opens_the_breaker_and_later_calls_are_refused_at_once(s3_outage: S3Server) -> None:
    bucket = s3_outage.create_bucket()
    storage = s3_storage(s3_outage.url, bucket, failure_threshold=3, recovery_timeout=0.2)
    s3_outage.stop()

    for _ in range(3):
        with pytest.raises(Exception) as failed:
            await storage.put("ingest/x.jpg", b"x", content_type="image/jpeg")
        assert not isinstance(failed.value, CircuitOpenError)
    assert storage.breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await storage.put("ingest/x.jpg", b"x", content_type="image/jpeg")

    s3_outage.start()
    deadline = time.monotonic() + 10
    while storage.breaker.state is CircuitState.OPEN and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for _ in range(2):  # two successful trials close it
        await storage.put("ingest/x.jpg", b"x", content_type="image/jpeg")
    assert storage.breaker.state is CircuitState.CLOSED
    assert await storage.get("ingest/x.jpg") == b"x"


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers (a hung R2)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        listener.close()


async def test_a_hung_store_call_times_out_instead_of_blocking(silent_server: int) -> None:
    storage = s3_storage(f"http://127.0.0.1:{silent_server}", "images", timeout=0.3, read_timeout=0.8)

    with pytest.raises(OperationTimeout) as timed_out:
        await storage.get("ingest/x.jpg")

    assert timed_out.value.name == "storage.get"
    assert storage.breaker.get_status()["total_failures"] == 1


async def test_open_storage_is_local_without_r2_settings_and_s3_with_them(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    local_settings = load_settings(IngestSettings, {"DATA_DIR": str(tmp_path), "SANDBOX_DIR": str(tmp_path / "sb")})
    local = await open_storage(local_settings, breaker=breaker())
    assert local.describe()["backend"] == "local"
    assert local.describe()["root"] == str((tmp_path / "objects").resolve())

    r2_settings = load_settings(IngestSettings, {"DATA_DIR": str(tmp_path), **s3_server.env(s3_bucket)})
    remote = await open_storage(r2_settings, breaker=breaker())
    await remote.put("ingest/ok.jpg", b"ok", content_type="image/jpeg")
    assert s3_server.keys(s3_bucket) == {"ingest/ok.jpg"}
    assert remote.describe()["backend"] == "s3"


async def test_storage_breaker_recovery_sets_how_long_the_r2_breaker_stays_open(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    r2 = registry.get_or_create("r2", failure_threshold=5, recovery_timeout=60.0)
    before = r2.recovery_timeout
    env = {"DATA_DIR": str(tmp_path), "STORAGE_BREAKER_RECOVERY": "4", **s3_server.env(s3_bucket)}
    try:
        storage = await open_storage(load_settings(IngestSettings, env))
        assert storage.breaker is r2 and r2.recovery_timeout == 4.0
    finally:
        r2.recovery_timeout = before


async def test_after_an_outage_the_head_of_the_bucket_closes_the_breaker_without_any_real_call(s3_outage: S3Server) -> None:
    bucket = s3_outage.create_bucket()
    storage = s3_storage(s3_outage.url, bucket, failure_threshold=3, recovery_timeout=3600)
    storage.breaker.probe_interval = 0.1
    s3_outage.stop()
    for _ in range(3):
        with pytest.raises(Exception):
            await storage.put("ingest/x.jpg", b"x", content_type="image/jpeg")
    assert storage.breaker.state is CircuitState.OPEN
    s3_outage.start()
    # Only the probe (a HEAD of the bucket) runs while the breaker is open; the hour-long
    # recovery timeout is not waited out.
    deadline = time.monotonic() + 15
    while storage.breaker.state is not CircuitState.CLOSED and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert storage.breaker.state is CircuitState.CLOSED
    assert storage.breaker.get_status()["probes_run"] >= 2
    await storage.put("ingest/x.jpg", b"x", content_type="image/jpeg")
