"""Object storage behind one async interface: Cloudflare R2 (any S3 API) or a local directory.

:class:`Storage` is what the bots use. Each of its calls runs the blocking
backend call in a thread (``asyncio.to_thread``), under a deadline
(TIMEOUT_STORAGE, :func:`shared.timeouts.bounded`) and through a circuit
breaker (``r2`` for S3, ``local_storage`` for the directory), so a hung or
failing store never blocks the event loop and stops being called while it is
down. Only transient failures (timeouts, 5xx, unreachable) count toward
opening the breaker; a missing object (:class:`ObjectNotFound`) does not.

Backends:

* :class:`S3Backend`: boto3's S3 client with botocore's own timeouts and a
  bounded number of retries ("standard" mode), path-style addressing and
  checksums only where required (what R2 expects). R2's endpoint is
  ``https://<R2_ACCOUNT_ID>.r2.cloudflarestorage.com``; R2_ENDPOINT points at
  any other S3 API (moto in the tests).
* :class:`LocalBackend`: files under a directory (``DATA_DIR/objects`` by
  default), written to a temporary file and renamed into place, so a reader
  never sees half an object. The content type is not kept.

``open_storage(settings)`` picks the backend from the settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from shared.breaker import CircuitBreaker, registry
from shared.errors import PermanentError
from shared.timeouts import bounded

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Where the local backend keeps objects, under DATA_DIR.
LOCAL_SUBDIR = "objects"

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as a listing shows it."""

    key: str
    size: int
    last_modified: datetime

    def age(self, now: float) -> float:
        """Seconds since the object was last written, at wall-clock ``now``."""
        return now - self.last_modified.timestamp()


class ObjectNotFound(PermanentError):
    """No object has this key."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no stored object with key {key!r}")


class InvalidKey(PermanentError):
    """The key cannot name an object (empty, absolute, or climbing out with ``..``)."""


def check_key(key: str) -> str:
    """Return ``key`` when it is a safe relative object key.

    Raises:
        InvalidKey: empty, absolute, with ``.``/``..`` parts, hidden parts or backslashes.
    """
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidKey(f"invalid object key {key!r}")
    parts = PurePosixPath(key).parts
    if any(part in (".", "..") or part.startswith(".") for part in parts) or key.endswith("/"):
        raise InvalidKey(f"invalid object key {key!r}")
    return key


class StorageBackend(Protocol):
    """The blocking primitives a backend implements (called in a thread by :class:`Storage`)."""

    kind: str

    def put(self, key: str, data: bytes | Path, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def download_to(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> list[ObjectInfo]: ...
    def check(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...


# --- the local directory --------------------------------------------------------


class LocalBackend:
    """Objects as files under ``root`` (the embedded default: ``DATA_DIR/objects``).

    Writes go to ``root/.tmp`` first and are renamed into place (atomic on one
    file system); leftovers of a crash there are removed at start when older
    than an hour.
    """

    kind = "local"

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root).expanduser().resolve()
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        for leftover in self.tmp.iterdir():
            try:
                if self._clock() - leftover.stat().st_mtime > 3600:
                    leftover.unlink()
            except OSError:
                pass

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(check_key(key)).parts)

    def _temp(self) -> Path:
        return self.tmp / f"{uuid.uuid4().hex}.part"

    @staticmethod
    def _commit(temp: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)

    def put(self, key: str, data: bytes | Path, content_type: str) -> None:
        target = self._path(key)
        temp = self._temp()
        try:
            if isinstance(data, Path):
                shutil.copyfile(data, temp)
                with temp.open("rb+") as handle:
                    os.fsync(handle.fileno())
            else:
                with temp.open("wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            self._commit(temp, target)
        finally:
            temp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def download_to(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        path = Path(path)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, path)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        finally:
            partial.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root:  # tidy empty directories; another writer may refill one at once
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            base = Path(dirpath)
            for name in filenames:
                if name.startswith("."):
                    continue
                path = base / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:  # deleted while listing
                    continue
                found.append(ObjectInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
        return sorted(found, key=lambda info: info.key)

    def check(self) -> None:
        """Raise OSError unless the directory is there (the breaker's probe)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"storage directory {self.root} is missing")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "root": str(self.root)}


# --- S3 / Cloudflare R2 ------------------------------------------------------------


def r2_endpoint(account_id: str) -> str:
    """Cloudflare R2's S3 endpoint for an account."""
    return f"https://{account_id}.r2.cloudflarestorage.com"


def _is_missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("NoSuchKey", "404", "NotFound") or status == 404


class S3Backend:
    """An S3 bucket through boto3 (Cloudflare R2, or any S3 API such as moto's server).

    Args:
        endpoint_url: the S3 endpoint (``r2_endpoint(account_id)`` for R2).
        bucket: the bucket (it must exist).
        access_key_id: the access key id.
        secret_access_key: the secret key.
        region: the signing region (R2 wants ``auto``).
        timeout: botocore's read timeout; connecting gets at most 10 s.
        max_attempts: botocore's attempts per call, retries included.
    """

    kind = "s3"

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        access_key_id: str,
        secret_access_key: str,
        region: str = "auto",
        timeout: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.max_attempts = max_attempts
        self.kind = "r2" if endpoint_url.rstrip("/").endswith(".r2.cloudflarestorage.com") else "s3"
        config = Config(
            region_name=region,
            signature_version="s3v4",
            connect_timeout=min(10.0, timeout),
            read_timeout=timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
            max_pool_connections=16,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    def put(self, key: str, data: bytes | Path, content_type: str) -> None:
        check_key(key)
        if isinstance(data, Path):
            with data.open("rb") as handle:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=handle, ContentType=content_type)
        else:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def _get_object(self, key: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=check_key(key))
        except Exception as exc:
            if _is_missing(exc):
                raise ObjectNotFound(key) from None
            raise

    def get(self, key: str) -> bytes:
        body = self._get_object(key)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def download_to(self, key: str, path: Path) -> None:
        path = Path(path)
        body = self._get_object(key)["Body"]
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with partial.open("wb") as handle:
                for chunk in body.iter_chunks(_CHUNK):
                    handle.write(chunk)
            os.replace(partial, path)
        finally:
            body.close()
            partial.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=check_key(key))
            return True
        except Exception as exc:
            if _is_missing(exc):
                return False
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=check_key(key))

    def check(self) -> None:
        """A HEAD of the bucket: the cheapest authenticated call (the breaker's probe)."""
        self.client.head_bucket(Bucket=self.bucket)

    def list(self, prefix: str) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                modified = item["LastModified"]
                if modified.tzinfo is None:
                    modified = modified.replace(tzinfo=UTC)
                found.append(ObjectInfo(str(item["Key"]), int(item["Size"]), modified))
        return found

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.kind,
            "endpoint": urlparse(self.endpoint_url).hostname,
            "bucket": self.bucket,
            "max_attempts": self.max_attempts,
        }


# --- the async interface -------------------------------------------------------------


class Storage:
    """Async object storage: every call in a thread, under a deadline, through a breaker.

    Args:
        backend: :class:`S3Backend` or :class:`LocalBackend` (or any :class:`StorageBackend`).
        timeout: deadline of one call in seconds (TIMEOUT_STORAGE).
        breaker: the circuit breaker; default the process-wide ``r2`` breaker
            (5 failures, open ``breaker_recovery`` seconds) for S3 and
            ``local_storage`` for the directory.
        breaker_recovery: seconds the default breaker stays open
            (STORAGE_BREAKER_RECOVERY).
        clock: wall-clock seconds, for ages in :meth:`list`.

    Every method may raise :class:`shared.timeouts.OperationTimeout` (past the
    deadline; the thread is abandoned), :class:`shared.breaker.CircuitOpenError`
    (the breaker is open) or what the backend raised (botocore errors,
    ``OSError``), besides the documented permanent errors.
    """

    def __init__(
        self,
        backend: StorageBackend,
        *,
        timeout: float = 30.0,
        breaker: CircuitBreaker | None = None,
        breaker_recovery: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.timeout = timeout
        if breaker is None:
            name = "local_storage" if backend.kind == "local" else "r2"
            breaker = registry.get_or_create_with_recovery(name, breaker_recovery, failure_threshold=5)
        self.breaker = breaker
        self._clock = clock
        breaker.set_probe(self.probe)

    async def probe(self) -> None:
        """The backend's :meth:`StorageBackend.check` past the breaker, under the deadline."""
        await bounded(asyncio.to_thread(self.backend.check), self.timeout, "storage.probe")

    async def _call(self, op: str, fn: Callable[..., T], *args: Any, outcome_unknown: bool = False, detail: str = "") -> T:
        async def run() -> T:
            return await bounded(
                asyncio.to_thread(fn, *args), self.timeout, f"storage.{op}", outcome_unknown=outcome_unknown, detail=detail
            )

        return await self.breaker.call(run)

    async def put(self, key: str, data: bytes | Path, *, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` (bytes, or a file's path) under ``key``, replacing any object there.

        Raises:
            InvalidKey: the key is not a safe relative key.
        """
        check_key(key)
        await self._call("put", self.backend.put, key, data, content_type, outcome_unknown=True, detail=key)

    async def get(self, key: str) -> bytes:
        """The whole object.

        Raises:
            ObjectNotFound: no object has this key.
        """
        return await self._call("get", self.backend.get, key, detail=key)

    async def download_to(self, key: str, path: Path) -> None:
        """Write the object to ``path`` (via a temporary file renamed into place).

        Raises:
            ObjectNotFound: no object has this key.
        """
        await self._call("download", self.backend.download_to, key, Path(path), detail=key)

    async def exists(self, key: str) -> bool:
        return await self._call("exists", self.backend.exists, key, detail=key)

    async def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""
        await self._call("delete", self.backend.delete, key, outcome_unknown=True, detail=key)

    async def list(self, prefix: str = "", *, older_than: float | None = None) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``; with ``older_than``, only those at least that many seconds old."""
        found = await self._call("list", self.backend.list, prefix, detail=prefix)
        if older_than is None:
            return found
        now = self._clock()
        return [info for info in found if info.age(now) >= older_than]

    def describe(self) -> dict[str, Any]:
        """Backend, target and breaker state for /status; never a key or secret."""
        return {**self.backend.describe(), "timeout_s": self.timeout, "breaker": self.breaker.state.value}


class StorageSettings(Protocol):
    """What :func:`open_storage` reads (``shared.config.IngestSettings`` and ``WorkerSettings`` have it)."""

    data_dir: Path
    r2_account_id: str | None
    r2_endpoint: str | None
    r2_bucket: str | None
    r2_access_key_id: str | None
    r2_secret_access_key: str | None
    timeout_storage: float
    storage_breaker_recovery: float


async def open_storage(
    settings: StorageSettings, *, breaker: CircuitBreaker | None = None, max_attempts: int = 3
) -> Storage:
    """R2 (or R2_ENDPOINT) when configured, else the local directory ``DATA_DIR/objects``.

    Raises:
        ValueError: R2 is configured without bucket or keys.
    """
    backend: StorageBackend
    if settings.r2_account_id or settings.r2_endpoint:
        if not (settings.r2_bucket and settings.r2_access_key_id and settings.r2_secret_access_key):
            raise ValueError("R2 needs R2_BUCKET, R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY")
        endpoint = settings.r2_endpoint or r2_endpoint(str(settings.r2_account_id))
        # Building a boto3 client reads files and takes a moment: not on the event loop.
        backend = await asyncio.to_thread(
            lambda: S3Backend(
                endpoint_url=endpoint,
                bucket=str(settings.r2_bucket),
                access_key_id=str(settings.r2_access_key_id),
                secret_access_key=str(settings.r2_secret_access_key),
                timeout=settings.timeout_storage,
                max_attempts=max_attempts,
            )
        )
    else:
        root = Path(settings.data_dir) / LOCAL_SUBDIR
        backend = await asyncio.to_thread(LocalBackend, root)
    storage = Storage(
        backend, timeout=settings.timeout_storage, breaker=breaker, breaker_recovery=settings.storage_breaker_recovery
    )
    logger.info("object storage: %s", backend.kind, extra={"storage": backend.describe()})
    return storage


__all__ = [
    "InvalidKey",
    "LOCAL_SUBDIR",
    "LocalBackend",
    "ObjectInfo",
    "ObjectNotFound",
    "S3Backend",
    "Storage",
    "StorageBackend",
    "StorageSettings",
    "check_key",
    "open_storage",
    "r2_endpoint",
]
