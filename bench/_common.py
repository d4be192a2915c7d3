"""Helpers shared by the benchmarks: the command line, a database, sandbox accounts, worker processes.

Each benchmark is a CLI (``./start.sh bench NAME [--quick] [--json]``) that
prints a table and, with ``--json``, ends with one JSON object on its last
line. Nothing here asserts on time: benchmarks measure, tests prove.

What is here:

* :func:`parser` / :func:`emit`: the ``--quick`` / ``--json`` convention.
* :func:`percentile`, :func:`fixed_rate`: statistics and an offered load on schedule.
* :func:`machine`: where the figures come from (commit, CPU, load average).
* :class:`BenchDatabase`: an embedded PostgreSQL (default settings, fsync on)
  under a temporary directory, with fresh migrated databases on demand.
* :func:`make_accounts`: N sandbox accounts with phones, stored in
  ``telegram_accounts`` with sessions encrypted under a fresh key (the
  sandbox demo accounts are stored disabled so the worker leaves them alone).
* :class:`WorkerProcess`: ``python worker.py`` (or any command) as a child
  with its output in a file; SIGTERM, kill -9, RSS/CPU via psutil.
* :class:`TcpProxy`: a TCP port on 127.0.0.1 relaying to the embedded
  server's unix socket, which can be cut (a database outage) and restored.
* :class:`S3Server`: moto's S3 server on 127.0.0.1 standing in for Cloudflare
  R2, which can be stopped (connections refused) and started again, data kept.
  The tests' S3 fixtures (``tests/ingest/s3_server.py``) use it too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import asyncpg

from devkit.polling import eventually

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parent.parent

#: The worker settings every benchmark run starts from: quick loops, no alerts, quiet logs.
WORKER_BASE_ENV: dict[str, str] = {
    "PORT": "0",
    "LOG_LEVEL": "WARNING",
    "LOG_FORMAT": "text",
    "ALERT_BOT_TOKEN": "",
    "ALERT_CHAT_ID": "",
    "STATUS_TOKEN": "",
    "TELEGRAM_API_ID": "",
    "TELEGRAM_API_HASH": "",
    "SUPABASE_URL": "",
    "SUPABASE_SERVICE_ROLE_KEY": "",
    "WATCHDOG_STARTUP_GRACE": "0",
}

#: Send limits raised far above the offered load, so the load test measures the
#: pipeline and not the (deliberate) token buckets of SEND_RATE_PER_ACCOUNT/CHAT.
UNLIMITED_SENDS: dict[str, str] = {
    "SEND_RATE_PER_ACCOUNT": "100000",
    "SEND_BURST_PER_ACCOUNT": "100000",
    "SEND_RATE_PER_CHAT": "100000",
    "SEND_BURST_PER_CHAT": "100000",
}


# --- command line -------------------------------------------------------------


def parser(
    prog: str, doc: str | None, *, quick_help: str = "a short run (seconds per case) for smoke tests"
) -> argparse.ArgumentParser:
    """An argument parser with the common ``--quick`` and ``--json`` flags (``quick_help`` says what quick means here)."""
    first = (doc or "").strip().split("\n\n")[0]
    result = argparse.ArgumentParser(prog=f"./start.sh bench {prog}", description=first)
    result.add_argument("--quick", action="store_true", help=quick_help)
    result.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    return result


def emit(table: str, result: dict[str, Any], *, as_json: bool) -> None:
    """Print the table, then (with --json) the result as the last line."""
    print(table, flush=True)
    if as_json:
        print(json.dumps(result, default=str), flush=True)


def progress(message: str) -> None:
    """A progress line on stderr (stdout stays table + JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rounded(value: float | None, digits: int = 1) -> float | None:
    """``round`` that keeps None and turns NaN into None (valid JSON)."""
    if value is None or value != value:
        return None
    return round(value, digits)


async def fixed_rate(count: int, rate: float, send: Callable[[int], Awaitable[None]], *, max_in_flight: int = 64) -> float:
    """Call ``send(i)`` ``count`` times at ``rate`` per second, on schedule.

    Returns the rate actually achieved (lower than ``rate`` when ``send``
    cannot keep up with ``max_in_flight`` calls at once).
    """
    start = time.perf_counter()
    slots = asyncio.Semaphore(max_in_flight)
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        try:
            await send(i)
        finally:
            slots.release()

    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    elapsed = time.perf_counter() - start
    return count / elapsed if elapsed > 0 else float("inf")


async def wait_until(
    condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.02, check: Callable[[], None] | None = None
) -> float:
    """Poll ``condition`` (sync or async) until true (:func:`devkit.polling.eventually`); the monotonic time it became true.

    ``check`` is called on every poll that finds the condition false (it raises to stop early).

    Raises:
        TimeoutError: not true within ``timeout`` (the message names ``what``).
    """

    def gone() -> None:
        if check is not None:
            check()
        return None

    await eventually(condition, timeout=timeout, interval=interval, what=what, gone=gone, error=TimeoutError)
    return time.monotonic()


# --- where the figures come from -------------------------------------------------


def machine() -> dict[str, Any]:
    """Commit, CPU, cores, memory, Python and the load average at this moment."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:  # pragma: no cover - psutil is a runtime dependency
        memory_gb = None
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": (commit + ("+dirty" if dirty else "")) or "unknown",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def machine_line(info: dict[str, Any]) -> str:
    load = " ".join(f"{v:.2f}" for v in info["load_average"])
    return (
        f"{info['date']}, commit {info['commit']}, {info['cores']} cores ({info['cpu']}), "
        f"{info['memory_gb']} GB, Python {info['python']}, load average {load}"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the database --------------------------------------------------------------


class BenchDatabase:
    """An embedded PostgreSQL under a temporary directory; fresh migrated databases on demand.

    Default server settings (fsync on), as a user of the embedded default gets.
    """

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.server: Any = None
        self.admin_dsn = ""
        self.version = ""
        self._template = ""

    async def __aenter__(self) -> BenchDatabase:
        from shared.db import apply_migrations
        from shared.db.embedded import EmbeddedPostgres

        self.server = EmbeddedPostgres(self.root / "data")
        self.admin_dsn = await self.server.start()
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            self.version = str(await conn.fetchval("show server_version"))
            self._template = "bench_template"
            await conn.execute(f"create database {self._template}")
        finally:
            await conn.close()
        await apply_migrations(self.server.dsn(self._template), timeout=120)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.discard()
        shutil.rmtree(self.root, ignore_errors=True)

    async def create(self, name: str) -> str:
        """A fresh migrated database ``name`` (a copy of the template); its DSN."""
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            await conn.execute(f'drop database if exists "{name}" with (force)')
            await conn.execute(f'create database "{name}" template "{self._template}"')
        finally:
            await conn.close()
        return str(self.server.dsn(name))

    @property
    def socket_path(self) -> Path:
        """The server's unix socket file."""
        data = Path(self.server.server.pgdata) if hasattr(self.server.server, "pgdata") else self.root / "data"
        found = sorted(data.glob(".s.PGSQL.*"))
        found = [p for p in found if not p.name.endswith(".lock")]
        if not found:
            raise RuntimeError(f"no PostgreSQL socket in {data}")
        return found[0]

    def tcp_dsn(self, name: str, port: int) -> str:
        """A DSN for database ``name`` through a TCP port (see :class:`TcpProxy`)."""
        user = str(self.server.dsn(name)).split("://", 1)[1].split(":", 1)[0].split("@", 1)[0]
        return f"postgresql://{user}@127.0.0.1:{port}/{name}"


async def fetchval(dsn: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def leased_accounts(dsn: str) -> int:
    """How many accounts a live worker holds a lease on."""
    return int(
        await fetchval(dsn, "select count(*) from telegram_accounts where lease_owner is not null and lease_expires_at > now()")
    )


# --- sandbox accounts --------------------------------------------------------------


@dataclass
class Accounts:
    """Accounts stored in the database and the world, and the key their sessions are under."""

    world_dir: Path
    key: str
    ids: list[int]
    labels: list[str]
    recipients: list[str]
    world: Any = field(repr=False, default=None)


async def make_accounts(dsn: str, world_dir: Path, count: int, *, recipients: int = 10) -> Accounts:
    """``count`` sandbox accounts (with phones) plus ``recipients`` users to write to.

    Sessions are encrypted with a fresh key (pass it as SESSION_ENCRYPTION_KEY).
    The sandbox demo accounts are stored ``disabled``, so the worker serves
    exactly ``count`` accounts.
    """
    from shared.db import PostgresDatabase
    from shared.db.records import AccountStatus
    from devkit.sandbox import World
    from shared.cipher import SessionCipher, generate_key

    key = generate_key()
    cipher = SessionCipher(key)
    world = World.open(world_dir)

    def build() -> tuple[list[tuple[str, str, str]], list[str]]:
        world.seed_demo()
        made = []
        for i in range(count):
            label = f"bench{i:03d}"
            phone = f"+1555030{i:04d}"
            world.create_user(label, phone=phone)
            made.append((label, phone, cipher.encrypt(world.session_string(phone))))
        names = []
        for j in range(recipients):
            name = f"rcpt{j:03d}"
            world.create_user(name)
            names.append(name)
        return made, names

    made, names = await asyncio.to_thread(build)
    from shared.breaker import CircuitBreaker

    db = await PostgresDatabase(dsn, timeout=30, breaker=CircuitBreaker("bench-setup")).open()
    try:
        for label in ("demo_one", "demo_two"):
            await db.upsert_account(label, status=AccountStatus.DISABLED)
        ids = []
        for label, phone, session in made:
            ids.append((await db.upsert_account(label, phone=phone, session=session, status=AccountStatus.ACTIVE)).id)
    finally:
        await db.close()
    return Accounts(world_dir=world_dir, key=key, ids=ids, labels=[m[0] for m in made], recipients=names, world=world)


# --- processes ---------------------------------------------------------------------


def die_with_parent() -> None:
    """``preexec_fn`` for a benchmark's child process: it gets SIGTERM when the benchmark dies.

    A benchmark killed from outside (a test's timeout, Ctrl-C twice, the OOM killer) would
    otherwise leave its bots running against a deleted database, orphaned, until the machine
    reboots. Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class WorkerProcess:
    """A child process (``python worker.py`` by default) with its output in a file."""

    def __init__(self, env: dict[str, str], log: Path, *, argv: Sequence[str] | None = None) -> None:
        self.env = env
        self.log = log
        self.argv = list(argv) if argv is not None else [sys.executable, "worker.py"]
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0

    async def start(self) -> WorkerProcess:
        handle = self.log.open("ab")
        try:
            self.started_at = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=ROOT, env={**os.environ, **self.env}, stdout=handle, stderr=handle,
                preexec_fn=die_with_parent,
            )
        finally:
            handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise with the output's tail when the process has exited."""
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"{self.argv[-1]} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode

    async def reap(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


# --- a cuttable TCP path to the database ---------------------------------------------


class TcpProxy:
    """127.0.0.1:``port`` relayed to a unix socket; :meth:`cut` drops every connection and refuses new ones."""

    def __init__(self, socket_path: Path, port: int) -> None:
        self.socket_path = socket_path
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def cut(self) -> None:
        """The outage begins: stop listening (new connections are refused) and reset the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                transport = writer.transport
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()

    async def restore(self) -> None:
        """The outage ends: listen again."""
        await self.start()

    async def close(self) -> None:
        await self.cut()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.socket_path)), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        for task in (asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def worker_env(
    *, dsn: str, accounts: Accounts, data_dir: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a sandbox ``worker.py`` on ``dsn`` serving ``accounts``."""
    return {
        **WORKER_BASE_ENV,
        "DATABASE_URL": dsn,
        "SANDBOX": "1",
        "SANDBOX_DIR": str(accounts.world_dir),
        "DATA_DIR": str(data_dir),
        "SESSION_ENCRYPTION_KEY": accounts.key,
        **(extra or {}),
    }


# --- R2 that can go away -----------------------------------------------------------


class S3Server:
    """moto's S3 server on 127.0.0.1 that can be stopped and started again on its port (its data lives in the process).

    Args:
        access_key: the access key id clients use (moto accepts any).
        secret_key: the secret access key clients use.
        region: the region clients name.
    """

    def __init__(self, *, access_key: str, secret_key: str, region: str = "us-east-1") -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.port = 0
        self._server: ThreadedMotoServer | None = None

    def start(self) -> Self:
        """Serve on the port it had before (an ephemeral one the first time)."""
        from moto.server import ThreadedMotoServer  # a dev/bench requirement: imported only when used

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket: new connections are refused."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        inner = getattr(server, "_server", None)
        if inner is not None:
            inner.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, prefix: str = "ingest") -> str:
        """A new bucket named ``<prefix>-<12 hex digits>``; its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str) -> dict[str, str]:
        """The R2_* settings pointing at this server."""
        return {
            "R2_ENDPOINT": self.url,
            "R2_BUCKET": bucket,
            "R2_ACCESS_KEY_ID": self.access_key,
            "R2_SECRET_ACCESS_KEY": self.secret_key,
        }

    def keys(self, bucket: str, prefix: str = "") -> set[str]:
        """The object keys in ``bucket`` under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}
