"""Chaos suite, ingest part: real ingest.py processes store a channel's images while things break.

    ./start.sh bench chaos_ingest [--quick] [--json] [--keep]

300 images (``--quick``: 60) are posted to the sandbox's @demo_photos channel
in waves, among them one decompression bomb and one corrupt JPEG, while real
``ingest.py`` processes store them in an S3 bucket (moto's S3 server on
127.0.0.1 standing in for Cloudflare R2) and record them in ``ingest_images``
(an embedded PostgreSQL). During the waves, in turn: kill -9 of ingest
mid-batch (twice; ``--quick``: once), R2 unreachable mid-batch (the S3
server stopped, connections refused, for 10 s; ``--quick``: 2 s, then
started again on the same port with its data) and SIGTERM mid-batch.
Downloads are slowed a little (a sandbox latency rule on GetFile) so every
fault finds images in flight.

The ground truth is the list of posted messages. Counted: posted, stored,
duplicated (more than one row for a message, or an object key shared by rows
of different images), missing (a posted message with no final row: none,
or still pending), not stored (an ordinary image that ended skipped or
failed), rows without their object in the bucket, orphans (objects under
``ingest/`` with no row: allowed, the 24 h sweep removes them, but
reported), skips and failures by reason, and hostile images refused without
a reason. With ``--json`` the last line is one JSON object with at least
``posted``, ``stored``, ``duplicated``, ``missing``, ``rows_without_object``,
``orphans`` and ``failed_by_reason``. Exit status 0 when nothing is
duplicated, missing, not stored or without its object; 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(ROOT))

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
from PIL import Image  # noqa: E402

from bench._chaos_faults import ChaosProcess  # noqa: E402
from bench._chaos_run import ChaosRun, Step, chaos_main, closing_lines, phase_table, process_lines, reason_lines  # noqa: E402
from bench._common import S3Server  # noqa: E402
from devkit.sandbox import FaultKind, ImageKind, World  # noqa: E402


CHANNEL = "@demo_photos"
OBJECT_PREFIX = "ingest/"
ACCESS_KEY = "chaos-access-key"
SECRET_KEY = "chaos-secret-key"


# --- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How many images, how many faults, how long the R2 outage lasts (seconds)."""

    images: int
    kills: int
    r2_outage: float
    download_latency_ms: float = 120.0
    download_jitter_ms: float = 80.0
    progress_share: float = 0.25
    progress_timeout: float = 20.0
    drain_timeout: float = 240.0
    shutdown_grace: float = 5.0
    breaker_probe_interval: float | None = None
    """BREAKER_PROBE_INTERVAL (how soon R2's open breaker finds it back); None: the default."""

    @property
    def waves(self) -> int:
        return self.kills + 3  # kills, R2 outage, SIGTERM, and a last quiet wave


FULL = Plan(images=300, kills=2, r2_outage=10.0)
QUICK = Plan(images=60, kills=1, r2_outage=2.0, progress_timeout=10.0, drain_timeout=90.0, breaker_probe_interval=0.5)

#: Hostile posts and the final statuses that are a correct answer to them (always with a reason).
HOSTILE: dict[ImageKind, frozenset[str]] = {
    ImageKind.BOMB: frozenset({"skipped", "failed"}),
    ImageKind.CORRUPT: frozenset({"skipped", "failed"}),
}


def ingest_env(plan: Plan) -> dict[str, str]:
    """Settings for ingest: short lease, retries that outlast the R2 outage by far.

    Transient failures wait 0.5 * 2^n s in the durable retry queue; with
    MAX_MESSAGE_RETRIES = 10 an image survives minutes of R2 being down.
    """
    return {
        "PORT": "0",
        "LOG_LEVEL": "INFO",
        "ACCOUNT_LEASE_SECONDS": "3",
        "ACCOUNT_CHECK_INTERVAL": "0.3",
        "WATCHDOG_CHECK_INTERVAL": "0.5",
        "WATCHDOG_MAX_SILENCE": "30",
        "WATCHDOG_STARTUP_GRACE": "5",
        "HEARTBEAT_INTERVAL": "0.5",
        "RETRY_BASE_DELAY": "0.5",
        "MAX_MESSAGE_RETRIES": "10",
        "RECONCILE_INTERVAL": "2",
        "TIMEOUT_TELEGRAM_ENTITY": "5",
        "TIMEOUT_TELEGRAM_CONNECT": "5",
        "TIMEOUT_TELEGRAM_MEDIA": "10",
        "TIMEOUT_STORAGE": "3",
        "TIMEOUT_DB": "5",
        "RECONNECT_BACKOFF_MAX": "0.5",
        "SHUTDOWN_GRACE": f"{plan.shutdown_grace:g}",
        "INGEST_GC_INTERVAL": "0",
        **({"BREAKER_PROBE_INTERVAL": f"{plan.breaker_probe_interval:g}"} if plan.breaker_probe_interval is not None else {}),
    }


# --- the ingest processes ------------------------------------------------------------------


class IngestProcess(ChaosProcess):
    """One ``python ingest.py`` with its output in a log file."""

    script = "ingest.py"

    def port(self) -> int | None:
        found = re.findall(r"status server on port (\d+)", self.output())
        return int(found[-1]) if found else None

    def connected(self) -> bool:
        port = self.port()
        if port is None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=3) as response:
                status = json.loads(response.read())
        except (OSError, ValueError):
            return False
        return bool(status.get("ingest", {}).get("connected"))


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Post:
    message_id: int
    kind: str  # "png", "jpeg", or a hostile ImageKind value
    hostile: bool = False


def unique_image(n: int) -> tuple[bytes, str, str]:
    """A small image no other post has (so every image is its own object): bytes, MIME type, file name."""
    fmt, mime, ext = ("PNG", "image/png", "png") if n % 2 == 0 else ("JPEG", "image/jpeg", "jpg")
    buffer = io.BytesIO()
    Image.new("RGB", (32 + n % 7, 20 + n % 5), (n % 256, (n * 7) % 256, (n // 256) % 256)).save(buffer, fmt)
    return buffer.getvalue(), mime, f"chaos_{n:04d}.{ext}"


class IngestChaos(ChaosRun[Plan, IngestProcess]):
    """One run: an embedded PostgreSQL, an S3 server, a sandbox world, ingest processes, faults."""

    name = "chaos_ingest"
    process_kind = "ingest"

    def __init__(self, plan: Plan, *, run_dir: Path) -> None:
        super().__init__(plan, run_dir=run_dir)
        self.s3 = S3Server(access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        self.bucket = ""
        self.dsn = ""
        self.env: dict[str, str] = {}
        self.waves: list[list[tuple[int, ImageKind | None]]] = []
        self.posts: list[Post] = []
        self.waited_out_r2 = 0

    # set-up --------------------------------------------------------------------------

    async def setup(self) -> None:
        await self.pg.start()
        self.dsn = await self.pg.create_database(f"chaos_ingest_{uuid.uuid4().hex[:8]}")
        await asyncio.to_thread(self.s3.start)
        self.bucket = await asyncio.to_thread(self.s3.create_bucket, "chaos")
        self.world = World(self.run_dir / "sandbox")
        await asyncio.to_thread(self.world.seed_demo)
        # The images, spread over the waves; the hostile ones in the middle waves.
        items: list[tuple[int, ImageKind | None]] = [(n, None) for n in range(self.plan.images - len(HOSTILE))]
        per_wave = max(1, len(items) // self.plan.waves)
        self.waves = [items[i * per_wave : (i + 1) * per_wave] for i in range(self.plan.waves)]
        self.waves[-1] += items[self.plan.waves * per_wave :]
        for i, kind in enumerate(HOSTILE):
            wave = self.waves[min(len(self.waves) - 1, 1 + i)]
            wave.insert(len(wave) // 2, (-1, kind))
        self.env = {
            **ingest_env(self.plan),
            **self.s3.env(self.bucket),
            "DATABASE_URL": self.dsn,
            "SANDBOX": "1",
            "SANDBOX_DIR": str(self.world.directory),
            "DATA_DIR": str(self.run_dir / "data"),
        }

    # helpers ----------------------------------------------------------------------------

    def new_process(self, number: int) -> IngestProcess:
        name = f"ingest-{number}"
        return IngestProcess(name, self.env, self.run_dir / f"{name}.log")

    async def final_rows(self) -> int:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return int(await conn.fetchval("select count(*) from ingest_images where status <> 'pending'"))
        finally:
            await conn.close()

    def _post_wave(self, wave: list[tuple[int, ImageKind | None]]) -> list[Post]:
        assert self.world is not None
        posts = []
        for n, kind in wave:
            if kind is None:
                data, mime, name = unique_image(n)
                message = self.world.post_to_channel(CHANNEL, data, as_document=True, mime_type=mime, file_name=name)
                posts.append(Post(message.id, mime.split("/")[1]))
            else:
                message = self.world.post_to_channel(CHANNEL, kind)
                posts.append(Post(message.id, kind.value, hostile=True))
        return posts

    async def wave_with_progress(self) -> int:
        """Post the next wave and wait until part of it is recorded (so the fault hits a batch in flight)."""
        if not self.waves:
            return 0
        before = await self.final_rows()
        posts = await asyncio.to_thread(self._post_wave, self.waves.pop(0))
        self.posts += posts
        target = before + max(1, int(len(posts) * self.plan.progress_share))

        async def progressed() -> bool:
            return await self.final_rows() >= target

        await self.wait_for(progressed, timeout=self.plan.progress_timeout, what="wave progress")
        return len(posts)

    # the faults ------------------------------------------------------------------------------

    def schedule(self) -> list[Step]:
        """The faults in order; the R2 outage comes last, since the ``r2`` breaker then stays open
        for its fixed 60 s and a kill or SIGTERM after it would find no batch in flight."""
        steps: list[Step] = [("kill -9 mid-batch", self.kill9)]
        steps.append(("SIGTERM mid-batch", self.sigterm))
        steps += [("kill -9 mid-batch", self.kill9) for _ in range(self.plan.kills - 1)]
        steps.append((f"R2 unreachable {self.plan.r2_outage:g}s mid-batch", self.r2_outage))
        return steps

    async def kill9(self) -> str:
        n = await self.wave_with_progress()
        victim = self.live()[-1]
        await victim.kill9()
        await self.start_process()
        return f"{n} posted; killed {victim.name}"

    async def r2_outage(self) -> str:
        n = await self.wave_with_progress()
        await asyncio.to_thread(self.s3.stop)
        try:
            await self.sleep_watching(self.plan.r2_outage)
            # Posts with no final row when R2 comes back: the outage met them (none could be stored).
            self.waited_out_r2 = len(self.posts) - await self.final_rows()
        finally:
            await asyncio.to_thread(self.s3.start)
        return f"{n} posted; S3 server stopped (connections refused), then back on port {self.s3.port}; {self.waited_out_r2} waited"

    async def sigterm(self) -> str:
        n = await self.wave_with_progress()
        victim = self.live()[0]
        # The successor starts as the SIGTERM is sent (a deploy's new container): its start-up overlaps the drain.
        successor = await self.start_process()
        code = await victim.terminate(timeout=self.plan.shutdown_grace + 20)
        self.sigterm_codes.append(code)
        return f"{n} posted; {victim.name} exited with {code}; {successor.name} started with it"

    # the run --------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        await self.setup()
        assert self.world is not None
        first = await self.start_process()

        async def connected() -> bool:
            return await asyncio.to_thread(first.connected)

        if not await self.wait_for(connected, timeout=60, what="ingest connected"):
            raise RuntimeError(f"ingest never connected; its log ends:\n{first.tail(3000)}")
        # Every download takes a little while, so a fault always finds images in flight.
        self.world.set_fault(
            FaultKind.LATENCY, method="GetFile", ms=self.plan.download_latency_ms, jitter_ms=self.plan.download_jitter_ms
        )
        await self.run_schedule()
        while self.waves:
            self.posts += await asyncio.to_thread(self._post_wave, self.waves.pop(0))

        await asyncio.to_thread(self.world.clear_faults)
        total = len(self.posts)

        async def drained() -> bool:
            return await self.final_rows() >= total

        return await self.finish(
            drained,
            timeout=self.plan.drain_timeout,
            what="every post recorded",
            grace=self.plan.shutdown_grace,
            started_key="processes_started",
            waited_out_r2=self.waited_out_r2,
        )

    async def verdict(self) -> dict[str, Any]:
        """Compare the posts with the rows and the bucket."""
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            rows = await conn.fetch("select message_id, status, storage_key, sha256, error from ingest_images order by id")
        finally:
            await conn.close()
        keys = await asyncio.to_thread(self.s3.keys, self.bucket, OBJECT_PREFIX)

        by_message: dict[int, list[asyncpg.Record]] = defaultdict(list)
        for row in rows:
            by_message[int(row["message_id"])].append(row)
        posted_ids = {p.message_id for p in self.posts}
        examples: dict[str, list[str]] = defaultdict(list)
        duplicated = sum(len(rs) - 1 for rs in by_message.values() if len(rs) > 1)
        unexpected_rows = sum(len(rs) for m, rs in by_message.items() if m not in posted_ids)
        # One object shared by rows of different images would mean two images were taken for one.
        key_owners: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            if row["status"] == "stored" and row["storage_key"]:
                key_owners[row["storage_key"]].add(row["sha256"] or "")
        shared_keys = sum(1 for owners in key_owners.values() if len(owners) > 1)

        stored = missing = not_stored = hostile_without_reason = hostile_wrong = 0
        failed_by_reason: Counter[str] = Counter()
        for post in self.posts:
            found = by_message.get(post.message_id, [])
            row = found[0] if found else None
            status = row["status"] if row is not None else None
            if status in (None, "pending"):
                missing += 1
                examples["missing"].append(f"{post.message_id} ({post.kind}, {status})")
                continue
            if status == "stored":
                stored += 1
                if post.hostile:
                    hostile_wrong += 1
                    examples["hostile_stored"].append(f"{post.message_id} ({post.kind})")
                continue
            reason = (row["error"] or "").strip() if row is not None else ""
            failed_by_reason[f"{status}: {reason[:120] or '(no reason)'}"] += 1
            if post.hostile:
                if not reason:
                    hostile_without_reason += 1
                if status not in HOSTILE[ImageKind(post.kind)]:
                    hostile_wrong += 1
            else:
                not_stored += 1
                examples["not_stored"].append(f"{post.message_id} ({post.kind}): {status} {reason[:80]}")
        stored_keys = {r["storage_key"] for r in rows if r["status"] == "stored" and r["storage_key"]}
        rows_without_object = sum(1 for r in rows if r["status"] == "stored" and r["storage_key"] not in keys)
        orphans = len(keys - stored_keys)
        ok = (
            duplicated == 0
            and shared_keys == 0
            and missing == 0
            and not_stored == 0
            and rows_without_object == 0
            and unexpected_rows == 0
            and hostile_without_reason == 0
            and hostile_wrong == 0
        )
        return {
            "ok": ok,
            "posted": len(self.posts),
            "hostile_posted": sum(1 for p in self.posts if p.hostile),
            "stored": stored,
            "duplicated": duplicated,
            "shared_object_keys": shared_keys,
            "missing": missing,
            "not_stored": not_stored,
            "rows_without_object": rows_without_object,
            "orphans": orphans,
            "objects": len(keys),
            "rows": len(rows),
            "unexpected_rows": unexpected_rows,
            "failed_by_reason": dict(failed_by_reason.most_common()),
            "hostile_without_reason": hostile_without_reason,
            "hostile_wrong_status": hostile_wrong,
            "examples": {k: v[:5] for k, v in examples.items()},
        }

    async def close(self) -> None:
        await self.kill_all()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.s3.stop)
        await super().close()


# --- the command line ---------------------------------------------------------------------------


def report(result: dict[str, Any], plan: Plan) -> str:
    lines = [
        f"chaos ingest: {result['posted']} images posted ({result['hostile_posted']} hostile) to {CHANNEL}, "
        f"{result.get('processes_started', 0)} ingest processes started",
        *phase_table(result, width=36),
        f"posted                   {result['posted']}",
        f"stored                   {result['stored']}",
        f"duplicated               {result['duplicated']} (+ {result['shared_object_keys']} object keys shared by different images)",
        f"missing                  {result['missing']}",
        f"ordinary, not stored     {result['not_stored']}",
        f"rows without object      {result['rows_without_object']}",
        f"orphans (no row)         {result['orphans']} of {result['objects']} objects (the 24 h sweep removes them)",
        f"skipped / failed         {sum(result['failed_by_reason'].values())}",
        *reason_lines(result["failed_by_reason"]),
        f"hostile without reason   {result['hostile_without_reason']}",
        f"hostile wrong status     {result['hostile_wrong_status']}",
        f"waited out R2            {result.get('waited_out_r2')} (posts with no final row when R2 came back)",
        *process_lines(result),
        *closing_lines(result),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quick_help = "60 images, one kill -9, a 3 s R2 outage (the CI form)"
    return chaos_main(
        argv, IngestChaos, doc=__doc__, plans=(FULL, QUICK), quick_help=quick_help, report=report, quiet_loggers=("werkzeug",)
    )


if __name__ == "__main__":
    sys.exit(main())
