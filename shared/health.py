"""Health checks of a bot's dependencies, and the ``python -m shared.health`` command.

::

    python -m shared.health [database|telegram|storage|alerts|resources|all ...] [--json]

Each check runs under its own deadline and answers ``healthy``, ``degraded``
or ``error`` with a one-line detail:

* ``database``: opens the configured backend (``open_database``; for the
  embedded default this starts or attaches to the local server) and pings it.
* ``telegram``: never connects a Telegram session (the running worker holds
  it under a lease, and a second connection can kill it). It reads the
  worker's heartbeat row (fresh within 3 x HEARTBEAT_INTERVAL: healthy;
  stale or stopped: error; none: degraded) and the accounts
  (``needs_login``: degraded) from the database.
* ``storage``: writes and deletes a tiny probe object in R2 (or any S3 API)
  or in the local object directory under DATA_DIR.
* ``alerts``: Bot API ``getMe`` for ALERT_BOT_TOKEN; without a token alerts
  are only logged (degraded).
* ``resources``: CPU, memory and the disk holding DATA_DIR against
  RESOURCE_WARN_PERCENT (70) and RESOURCE_CRITICAL_PERCENT (90). CPU and
  memory are the container's (its cgroup's use against its limits, see
  :mod:`shared.cgroup`) when there is one, else the host's (psutil); the
  answer's ``source`` says which (``cgroup v2``, ``cgroup v1`` or ``host``).

The command prints a table (or one JSON object with ``--json``) and exits 0
when everything is healthy, 1 when something is degraded, 2 on any error
(a bad setting included). Bots call :func:`run_checks` for
``/health/detailed`` and :func:`resources_status` for a ``resources``
section in ``/status``. Every detail is redacted (no token, password or
phone number reaches the output).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import json
import logging
import os
import stat
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from shared.breaker import CircuitBreaker
from shared.cgroup import DEFAULT_CGROUP_ROOT, CpuMemoryReader, ResourceSource
from shared.config import (
    CommonSettings,
    ConfigError,
    IngestSettings,
    ReplyGuySettings,
    TelegramSettings,
    WorkerSettings,
    load_settings,
    read_environment,
)
from shared.cli import ArgumentParser
from shared.errors import describe
from shared.logs import redact, register_secret, setup_logging
from shared.timeouts import OperationTimeout, bounded, deadline

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

#: The checks, in the order they are shown.
CHECK_NAMES: tuple[str, ...] = ("database", "telegram", "storage", "alerts", "resources")

#: Seconds one check may take (the database gets more while an embedded server starts).
DEFAULT_CHECK_TIMEOUT = 10.0
#: Extra seconds for starting the embedded PostgreSQL (initdb on first use).
EMBEDDED_START_ALLOWANCE = 120.0
#: A heartbeat older than this many intervals is stale.
HEARTBEAT_STALE_INTERVALS = 3.0
#: Seconds psutil measures the CPU over in a check.
CPU_SAMPLE_SECONDS = 0.2

RESOURCE_WARN_VARIABLE = "RESOURCE_WARN_PERCENT"
RESOURCE_CRITICAL_VARIABLE = "RESOURCE_CRITICAL_PERCENT"


class HealthStatus(str, enum.Enum):
    """The verdict of one check, and of all of them (the worst one)."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def exit_code(self) -> int:
        """0 healthy, 1 degraded, 2 error."""
        return _RANK[self]

    @classmethod
    def worst(cls, statuses: Iterable[HealthStatus]) -> HealthStatus:
        """The worst of ``statuses``; healthy when there are none."""
        return max(statuses, key=lambda s: s.rank, default=cls.HEALTHY)


_RANK = {HealthStatus.HEALTHY: 0, HealthStatus.DEGRADED: 1, HealthStatus.ERROR: 2}


@dataclass(frozen=True)
class CheckResult:
    """What one check found.

    Attributes:
        name: the check (``database``, ``telegram`` ...).
        status: healthy, degraded or error.
        detail: one line for a person (already redacted).
        seconds: how long the check took.
        data: machine-readable facts (ages, percentages, names).
    """

    name: str
    status: HealthStatus
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)
    checked_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self.status.value,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
            "checked_at": _iso(self.checked_at),
        }
        if self.data:
            body["data"] = self.data
        return body


@dataclass(frozen=True)
class HealthReport:
    """The results of a run of checks and their overall verdict."""

    checks: dict[str, CheckResult]
    checked_at: float

    @property
    def overall(self) -> HealthStatus:
        return HealthStatus.worst(r.status for r in self.checks.values())

    @property
    def exit_code(self) -> int:
        return self.overall.exit_code

    def as_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.value,
            "checked_at": _iso(self.checked_at),
            "checks": {name: result.as_dict() for name, result in self.checks.items()},
        }


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).isoformat(timespec="seconds")


def report_of(components: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Components a bot judged itself (``{"status": ..., facts...}``) in the one ``/health/detailed`` shape.

    Every bot answers ``{"overall", "checked_at", "checks": {dependency:
    {"status", "detail", "seconds", "checked_at", "data"}}}``, whether its
    verdicts come from :func:`run_checks` or from its own clients' state.
    """
    now = time.time()
    results: dict[str, CheckResult] = {}
    for name, component in components.items():
        status = HealthStatus(component.get("status", HealthStatus.ERROR.value))
        facts = {k: v for k, v in component.items() if k not in ("status", "detail")}
        detail = component.get("detail") or component.get("error") or component.get("last_error") or {
            HealthStatus.HEALTHY: "ok", HealthStatus.DEGRADED: "degraded", HealthStatus.ERROR: "failing",
        }[status]
        results[name] = CheckResult(name, status, redact(str(detail)), float(component.get("seconds", 0.0)),
                                    _redacted_data(facts), now)
    return HealthReport(results, now).as_dict()


# --- resources -----------------------------------------------------------------------------


def _percent(variable: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(variable, "a percentage above 0 and at most 100", raw) from None
    if not 0 < value <= 100:
        raise ConfigError(variable, "a percentage above 0 and at most 100", raw)
    return value


@dataclass(frozen=True)
class ResourceThresholds:
    """Percentages at which CPU, memory or disk use is degraded (warn) or an error (critical).

    Raises:
        ConfigError: a percentage outside (0, 100], or warn above critical.
    """

    warn_percent: float = 70.0
    critical_percent: float = 90.0

    def __post_init__(self) -> None:
        _percent(RESOURCE_WARN_VARIABLE, str(self.warn_percent))
        _percent(RESOURCE_CRITICAL_VARIABLE, str(self.critical_percent))
        if self.warn_percent > self.critical_percent:
            raise ConfigError(
                RESOURCE_CRITICAL_VARIABLE,
                f"at least {RESOURCE_WARN_VARIABLE} ({self.warn_percent:g})",
                f"{self.critical_percent:g}",
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ResourceThresholds:
        """RESOURCE_WARN_PERCENT / RESOURCE_CRITICAL_PERCENT (environment over ``.env``).

        Raises:
            ConfigError: a value is not a percentage, or warn is above critical.
        """
        source = read_environment() if env is None else env
        values: dict[str, float] = {}
        for variable, name in ((RESOURCE_WARN_VARIABLE, "warn_percent"), (RESOURCE_CRITICAL_VARIABLE, "critical_percent")):
            raw = source.get(variable)
            if raw is not None and raw.strip():
                values[name] = _percent(variable, raw.strip())
        return cls(**values)

    @classmethod
    def resolve(cls, settings: object | None = None, env: Mapping[str, str] | None = None) -> ResourceThresholds:
        """From the settings when they carry ``resource_warn_percent`` / ``resource_critical_percent``, else the environment."""
        warn = getattr(settings, "resource_warn_percent", None)
        critical = getattr(settings, "resource_critical_percent", None)
        if warn is not None and critical is not None:
            return cls(float(warn), float(critical))
        return cls.from_env(env) if env is not None else default_thresholds()

    def judge(self, percent: float) -> HealthStatus:
        if percent >= self.critical_percent:
            return HealthStatus.ERROR
        if percent >= self.warn_percent:
            return HealthStatus.DEGRADED
        return HealthStatus.HEALTHY


@functools.cache
def default_thresholds() -> ResourceThresholds:
    """The thresholds of the process environment (and ``.env``), read once.

    Raises:
        ConfigError: a malformed value (not cached: the next call reads again).
    """
    return ResourceThresholds.from_env()


@dataclass(frozen=True)
class ResourceSample:
    """CPU, memory and disk use in percent, the path whose disk was measured,
    and what temporary files under ``DATA_DIR/tmp`` hold (they are watched because downloads and uploads land there:
    a download or attachment left by a killed process stays there). ``source``
    says where CPU and memory were read (``cgroup v2``, ``cgroup v1``, ``host``)
    and the limits they are percentages of."""

    cpu_percent: float
    memory_percent: float
    disk_percent: float
    disk_path: str
    temp_bytes: int = 0
    temp_files: int = 0
    source: str = ResourceSource.HOST.value
    memory_limit_bytes: int | None = None
    cpu_limit_cores: float | None = None


TEMP_SUBDIR = "tmp"
"""Where bots put temporary files, under DATA_DIR."""

TEMP_WARN_BYTES = 500 * 1024 * 1024
"""Temporary files above this total make the resources degraded (downloads that were never cleaned up)."""


def temp_files(data_dir: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Each file under ``DATA_DIR/tmp`` with its stat (blocking; files vanishing meanwhile are skipped)."""
    root = Path(data_dir) / TEMP_SUBDIR
    if not root.is_dir():
        return
    for path in root.rglob("*"):
        try:
            info = path.stat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            yield path, info


def temp_usage(data_dir: Path) -> tuple[int, int]:
    """Bytes and number of files under ``DATA_DIR/tmp`` (blocking)."""
    sizes = [info.st_size for _, info in temp_files(data_dir)]
    return sum(sizes), len(sizes)


ResourceSampler = Callable[[Path], ResourceSample]
"""Measures resource use for a directory's disk; blocking (runs in a thread)."""


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (DATA_DIR may not exist yet)."""
    current = Path(path).expanduser().absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


class PsutilSampler:
    """The service's resource use: CPU and memory of its container's cgroup when
    there is one, else the host's (psutil); the disk of ``path`` through psutil.

    Args:
        cpu_interval: seconds to measure the CPU over (blocking); None compares
            with the previous call instead (instant, for ``/status``, which is
            polled; the very first call reads 0).
        cgroup_root: the cgroup file system (a test hands it a fake tree).
        reader: reads CPU and memory (default: a :class:`CpuMemoryReader` on
            ``cgroup_root`` with ``cpu_interval``).
    """

    def __init__(
        self,
        *,
        cpu_interval: float | None = CPU_SAMPLE_SECONDS,
        cgroup_root: Path | str = DEFAULT_CGROUP_ROOT,
        reader: CpuMemoryReader | None = None,
    ) -> None:
        self.cpu_interval = cpu_interval
        self.reader = reader or CpuMemoryReader(cgroup_root=cgroup_root, cpu_interval=cpu_interval)

    def __call__(self, path: Path) -> ResourceSample:
        disk_path = _existing(path)
        temp_bytes, temp_files = temp_usage(path)
        figures = self.reader.read()
        return ResourceSample(
            cpu_percent=figures.cpu_percent,
            memory_percent=figures.memory_percent,
            disk_percent=float(psutil.disk_usage(str(disk_path)).percent),
            disk_path=str(disk_path),
            temp_bytes=temp_bytes,
            temp_files=temp_files,
            source=figures.source.value,
            memory_limit_bytes=figures.memory_limit_bytes,
            cpu_limit_cores=figures.cpu_limit_cores,
        )


_STATUS_SAMPLER = PsutilSampler(cpu_interval=None)


def judge_resources(sample: ResourceSample, thresholds: ResourceThresholds) -> tuple[HealthStatus, str, dict[str, Any]]:
    """Status, one-line detail and the numbers of a sample against the thresholds."""
    parts = {"cpu": sample.cpu_percent, "memory": sample.memory_percent, "disk": sample.disk_percent}
    verdicts = {name: thresholds.judge(value) for name, value in parts.items()}
    temp_verdict = HealthStatus.DEGRADED if sample.temp_bytes > TEMP_WARN_BYTES else HealthStatus.HEALTHY
    status = HealthStatus.worst([*verdicts.values(), temp_verdict])
    words = []
    for name, value in parts.items():
        mark = "" if verdicts[name] is HealthStatus.HEALTHY else f" ({'critical' if verdicts[name] is HealthStatus.ERROR else 'high'})"
        words.append(f"{name} {value:.0f}%{mark}")
    detail = ", ".join(words) + f" (warn {thresholds.warn_percent:g}%, critical {thresholds.critical_percent:g}%)"
    if temp_verdict is not HealthStatus.HEALTHY:
        detail += (
            f"; temporary files {sample.temp_bytes / 1024**2:.0f} MB in {sample.temp_files} file(s) (high,"
            f" warn {TEMP_WARN_BYTES // 1024**2} MB)"
        )
    data: dict[str, Any] = {
        "status": status.value,
        "cpu_percent": round(sample.cpu_percent, 1),
        "memory_percent": round(sample.memory_percent, 1),
        "disk_percent": round(sample.disk_percent, 1),
        "disk_path": sample.disk_path,
        "temp_bytes": sample.temp_bytes,
        "temp_files": sample.temp_files,
        "source": sample.source,
        "memory_limit_bytes": sample.memory_limit_bytes,
        "cpu_limit_cores": sample.cpu_limit_cores,
        "warn_percent": thresholds.warn_percent,
        "critical_percent": thresholds.critical_percent,
    }
    return status, detail, data


async def resources_status(
    data_dir: Path | str,
    *,
    thresholds: ResourceThresholds | None = None,
    sampler: ResourceSampler | None = None,
    timeout: float = 2.0,
) -> dict[str, Any]:
    """CPU, memory and disk for a ``resources`` section of ``/status``.

    Instant (the CPU is compared with the previous call), measured in a thread.

    Args:
        data_dir: DATA_DIR; its file system is the disk measured.
        thresholds: default from RESOURCE_WARN_PERCENT / RESOURCE_CRITICAL_PERCENT.
        sampler: default: the cgroup's figures, else the host's (psutil).
        timeout: seconds the measurement may take.

    Raises:
        ConfigError: the thresholds in the environment are malformed.
        OperationTimeout: the measurement took longer than ``timeout``.
    """
    limits = thresholds or default_thresholds()
    measure = sampler or _STATUS_SAMPLER
    sample = await bounded(asyncio.to_thread(measure, Path(data_dir)), timeout, "health.resources")
    status, detail, data = judge_resources(sample, limits)
    return {**data, "detail": detail}


class ResourceMonitor:
    """CPU and memory judged by their moving average over ``window`` seconds.

    A single sample at 100 % (a garbage collection, a burst of image work, the
    platform's own agent) must neither turn the status page red nor wake an
    operator; use that stays high for the window does, with one
    ``resources_critical`` alert and a ``resolved`` once the average is back
    below RESOURCE_CRITICAL_PERCENT. Disk and temporary files are judged by
    the latest sample: they do not spike. The runtime samples every
    ``interval`` seconds in the background; ``/status`` shows the verdict.

    Args:
        data_dir: DATA_DIR; its file system is the disk measured.
        thresholds: warn and critical percentages.
        window: seconds averaged (RESOURCE_AVERAGE_WINDOW); 0 judges the latest sample alone.
        sampler: measures one sample (blocking; runs in a thread). Default psutil,
            with the CPU measured since the previous sample.
        interval: seconds between background samples.
        timeout: deadline of one measurement.
        clock: monotonic seconds (tests drive it).
        alerts: where the alert and its ``resolved`` go; None: no alerts.
        bot: names the process in the alert.
    """

    def __init__(
        self,
        *,
        data_dir: Path | str,
        thresholds: ResourceThresholds,
        window: float = 60.0,
        sampler: ResourceSampler | None = None,
        interval: float = 5.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        alerts: Any | None = None,
        bot: str = "bot",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.thresholds = thresholds
        self.window = max(0.0, float(window))
        self.sampler = sampler or _STATUS_SAMPLER
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self.alerts = alerts
        self.bot = bot
        self._samples: deque[tuple[float, ResourceSample]] = deque()
        self.alerting = False
        self._task: asyncio.Task[None] | None = None

    def record(self, sample: ResourceSample) -> None:
        """Add a sample taken now, and forget those older than the window."""
        now = self._clock()
        self._samples.append((now, sample))
        while len(self._samples) > 1 and self._samples[0][0] < now - self.window:
            self._samples.popleft()

    @property
    def samples_taken(self) -> int:
        return len(self._samples)

    def averaged(self) -> ResourceSample | None:
        """CPU and memory averaged over the window, disk and temporary files as last measured."""
        if not self._samples:
            return None
        latest = self._samples[-1][1]
        recent = [s for t, s in self._samples if t >= self._clock() - self.window] or [latest]
        return dataclasses.replace(
            latest,
            cpu_percent=sum(s.cpu_percent for s in recent) / len(recent),
            memory_percent=sum(s.memory_percent for s in recent) / len(recent),
        )

    def _critical_without_average(self, sample: ResourceSample) -> bool:
        """Disk and temporary files are not averaged: critical disk needs no window."""
        return sample.disk_percent >= self.thresholds.critical_percent

    def status(self) -> dict[str, Any]:
        """The ``resources`` section of /status: the averaged verdict, with the latest figures beside it."""
        sample = self.averaged()
        if sample is None:
            return {"status": HealthStatus.HEALTHY.value, "detail": "not measured yet", "samples": 0}
        status, detail, data = judge_resources(sample, self.thresholds)
        latest = self._samples[-1][1]
        if self.window:
            detail = detail.replace(" (warn", f" over {self.window:g}s (warn", 1)
            covered = self._clock() - self._samples[0][0]
            if status is HealthStatus.ERROR and covered < self.window and not self._critical_without_average(sample):
                # Right after the start one sample is the whole average: not yet "sustained".
                data["status"] = HealthStatus.DEGRADED.value
                detail += f"; measured for {covered:.0f}s of the {self.window:g}s window so far"
        return {
            **data,
            "detail": detail,
            "cpu_now_percent": round(latest.cpu_percent, 1),
            "memory_now_percent": round(latest.memory_percent, 1),
            "average_window_s": self.window,
            "samples": len(self._samples),
        }

    async def sample(self) -> dict[str, Any]:
        """Measure once, then alert or resolve when the averaged verdict crossed critical; the status."""
        measured = await bounded(asyncio.to_thread(self.sampler, self.data_dir), self.timeout, "health.resources")
        self.record(measured)
        status = self.status()
        critical = status["status"] == HealthStatus.ERROR.value
        if critical != self.alerting and self.alerts is not None:
            from shared.alerts import AlertType

            key = f"{self.bot}:resources"
            if critical:
                self.alerts.alert(AlertType.RESOURCES_CRITICAL, f"{self.bot}: resources critical: {status['detail']}", key=key)
            else:
                self.alerts.resolve(AlertType.RESOURCES_CRITICAL, key=key, message=f"{self.bot}: resources back to normal: {status['detail']}")
        self.alerting = critical
        return status

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="resource-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed measurement skips one sample, never the monitor
                logger.debug("resource sample failed: %s", describe(exc))
            await asyncio.sleep(self.interval)


# --- the checks ------------------------------------------------------------------------------


class _CheckFailed(Exception):
    """A check's own verdict of error, with the detail to show."""


def _fmt_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


class HealthChecker:
    """Runs the health checks for one bot's settings.

    Args:
        settings: the bot's settings (any CommonSettings; storage and Telegram
            fields are used when present).
        database: an open database to use (a bot's own); when None the
            checker opens one with ``open_database`` and closes it in :meth:`close`.
        thresholds: resource thresholds (default: :meth:`ResourceThresholds.resolve`).
        sampler: resource measurement (default: the cgroup's or the host's figures, CPU over 0.2 s).
        timeout: seconds each check may take.
        heartbeat_ids: the heartbeat rows the telegram check judges (default:
            WORKER_ID when the settings have it, else every row).
        http: an aiohttp session for the alerts check (default: one per check).
        clock: a monotonic clock for the time each check takes.
    """

    def __init__(
        self,
        settings: CommonSettings,
        *,
        database: Any | None = None,
        thresholds: ResourceThresholds | None = None,
        sampler: ResourceSampler | None = None,
        timeout: float = DEFAULT_CHECK_TIMEOUT,
        heartbeat_ids: Sequence[str] | None = None,
        http: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.settings = settings
        self.timeout = float(timeout)
        self._given_db = database
        self._thresholds = thresholds
        self._sampler = sampler or PsutilSampler()
        worker_id = getattr(settings, "worker_id", None)
        self.heartbeat_ids: tuple[str, ...] | None = (
            tuple(heartbeat_ids) if heartbeat_ids is not None else ((worker_id,) if worker_id else None)
        )
        self._http = http
        self._clock = clock
        self._db_task: asyncio.Task[Any] | None = None
        for secret in settings.secrets():
            register_secret(secret)

    # --- running -----------------------------------------------------------------------

    async def run(self, names: Iterable[str] | None = None) -> HealthReport:
        """Run the named checks (all when None or ``all``) concurrently.

        Raises:
            ValueError: an unknown check name.
        """
        wanted = expand_names(names)
        results = await asyncio.gather(*(self.run_one(name) for name in wanted))
        return HealthReport(checks={r.name: r for r in results}, checked_at=time.time())

    async def run_one(self, name: str) -> CheckResult:
        """Run one check under its deadline; never raises except on cancellation or an unknown name."""
        checks: dict[str, Callable[[], Awaitable[tuple[HealthStatus, str, dict[str, Any]]]]] = {
            "database": self.check_database,
            "telegram": self.check_telegram,
            "storage": self.check_storage,
            "alerts": self.check_alerts,
            "resources": self.check_resources,
        }
        if name not in checks:
            raise ValueError(f"unknown check {name!r} (use {', '.join(CHECK_NAMES)} or all)")
        limit = self._limit(name)
        started = self._clock()
        try:
            async with deadline(limit, f"health.{name}"):
                status, detail, data = await checks[name]()
        except asyncio.CancelledError:
            raise
        except OperationTimeout:
            status, detail, data = HealthStatus.ERROR, f"no answer within {limit:g}s", {}
        except _CheckFailed as exc:
            status, detail, data = HealthStatus.ERROR, str(exc), {}
        except Exception as exc:  # noqa: BLE001 - any failure is this check's verdict
            status, detail, data = HealthStatus.ERROR, describe(exc), {}
        elapsed = self._clock() - started
        result = CheckResult(name, status, redact(detail), elapsed, _redacted_data(data))
        # Debug only: a bot answering /health/detailed every few seconds must not fill its log.
        logger.debug("health %s: %s (%s)", name, status.value, result.detail, extra={"check": name, "seconds": round(elapsed, 3)})
        return result

    def _embedded(self) -> bool:
        return self._given_db is None and not (self.settings.database_url or self.settings.supabase_url)

    def _limit(self, name: str) -> float:
        if name in ("database", "telegram") and self._embedded():
            return self.timeout + EMBEDDED_START_ALLOWANCE
        return self.timeout

    async def close(self) -> None:
        """Close the database this checker opened (not one it was given)."""
        task, self._db_task = self._db_task, None
        if task is None:
            return
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return
        if task.cancelled() or task.exception() is not None:
            return
        db = task.result()
        try:
            await bounded(db.close(), max(self.timeout, 30.0), "health.database_close")
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            logger.warning("health: could not close the database (%s)", describe(exc))

    async def __aenter__(self) -> HealthChecker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- database ------------------------------------------------------------------------

    async def _database(self) -> Any:
        """The database, opened once for the database and telegram checks together."""
        if self._given_db is not None:
            return self._given_db
        if self._db_task is None:
            self._db_task = asyncio.create_task(self._open_database())
        # Shielded: one check's deadline must not cancel the other's open.
        return await asyncio.shield(self._db_task)

    async def _open_database(self) -> Any:
        from shared.db import open_database

        settings = self.settings
        # A private breaker: failures of a health probe say nothing to the bot's own breaker.
        breaker = CircuitBreaker("health.database", failure_threshold=1_000_000, recovery_timeout=0.0)
        migrate = None if self._embedded() else False  # a probe never migrates a real database
        return await open_database(settings, breaker=breaker, migrate=migrate)

    async def check_database(self) -> tuple[HealthStatus, str, dict[str, Any]]:
        db = await self._database()
        started = time.perf_counter()
        await db.ping()
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        backend = getattr(getattr(db, "backend", None), "value", "database")
        return HealthStatus.HEALTHY, f"{backend} reachable (ping {latency_ms:g} ms)", {"backend": backend, "latency_ms": latency_ms}

    # --- telegram (from the database only) -----------------------------------------------------

    async def check_telegram(self) -> tuple[HealthStatus, str, dict[str, Any]]:
        sandbox = isinstance(self.settings, TelegramSettings) and self.settings.sandbox
        prefix = "sandbox: " if sandbox else ""
        try:
            db = await self._database()
            now = await db.ping()
            beats = await db.list_heartbeats()
            accounts = await db.list_accounts()
            holds = {h.account_id: h for h in await db.account_send_holds()}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _CheckFailed(f"{prefix}cannot read worker heartbeats and accounts from the database ({type(exc).__name__})") from exc

        interval = float(self.settings.heartbeat_interval)
        stale_after = HEARTBEAT_STALE_INTERVALS * interval
        mine = [b for b in beats if self.heartbeat_ids is None or _beat_of(b.worker_id, self.heartbeat_ids)]
        data: dict[str, Any] = {"sandbox": sandbox, "stale_after_s": stale_after, "heartbeats": {}, "accounts": {}}
        verdicts: list[HealthStatus] = []
        words: list[str] = []
        for beat in beats:
            age = (now - beat.last_heartbeat_at).total_seconds()
            data["heartbeats"][beat.worker_id] = {"status": beat.status, "age_s": round(age, 1), "host": beat.host}
        if not mine:
            verdicts.append(HealthStatus.DEGRADED)
            expected = " or ".join(self.heartbeat_ids) if self.heartbeat_ids else "any worker"
            words.append(f"no worker heartbeat yet ({expected})")
        else:
            beat = max(mine, key=lambda b: b.last_heartbeat_at)
            age = (now - beat.last_heartbeat_at).total_seconds()
            if beat.status == "stopped":
                verdicts.append(HealthStatus.ERROR)
                words.append(f"worker {beat.worker_id} stopped {_fmt_age(age)} ago")
            elif age > stale_after:
                verdicts.append(HealthStatus.ERROR)
                words.append(f"worker {beat.worker_id} silent for {_fmt_age(age)} (stale after {_fmt_age(stale_after)})")
            elif beat.status != "online":
                verdicts.append(HealthStatus.DEGRADED)
                words.append(f"worker {beat.worker_id} reports {beat.status} ({_fmt_age(age)} ago)")
            else:
                verdicts.append(HealthStatus.HEALTHY)
                words.append(f"worker {beat.worker_id} alive ({_fmt_age(age)} ago)")

        by_status: dict[str, list[str]] = {}
        limited: list[str] = []
        for account in accounts:
            by_status.setdefault(account.status.value, []).append(account.label)
            entry: dict[str, Any] = {"status": account.status.value, "has_session": account.has_session}
            hold = holds.get(account.id)
            if hold is not None and hold.flood_until is not None:
                entry["flood_wait_until"] = hold.flood_until.isoformat()
            if hold is not None and hold.limited_until is not None:
                # Telegram's spam limit (PEER_FLOOD): its messages to non-contacts wait in the queue.
                entry["limited_until"] = hold.limited_until.isoformat()
                if account.status.value == "active":
                    entry["status"] = "limited"
                    limited.append(f"{account.label} until {hold.limited_until.strftime('%H:%M UTC')}")
            data["accounts"][account.label] = entry
        needs_login = sorted(by_status.get("needs_login", []))
        active = by_status.get("active", [])
        if needs_login:
            verdicts.append(HealthStatus.DEGRADED)
            words.append(f"needs login: {', '.join(needs_login)}")
        if limited:
            verdicts.append(HealthStatus.DEGRADED)
            words.append(f"limited by Telegram (PEER_FLOOD, messages to non-contacts wait): {', '.join(sorted(limited))}")
        if not accounts:
            verdicts.append(HealthStatus.DEGRADED)
            words.append("no Telegram accounts (./start.sh worker login)")
        else:
            words.append(f"{len(active)} of {len(accounts)} accounts active")
        return HealthStatus.worst(verdicts), prefix + "; ".join(words), data

    # --- storage -------------------------------------------------------------------------

    async def check_storage(self) -> tuple[HealthStatus, str, dict[str, Any]]:
        probe = f"health/probe-{uuid.uuid4().hex}"
        payload = b"health probe\n"
        if hasattr(self.settings, "r2_bucket") and hasattr(self.settings, "timeout_storage"):
            from shared.storage import open_storage

            breaker = CircuitBreaker("health.storage", failure_threshold=1_000_000, recovery_timeout=0.0)
            storage = await open_storage(self.settings, breaker=breaker, max_attempts=1)  # type: ignore[arg-type]
            storage.timeout = min(storage.timeout, self.timeout)
            await storage.put(probe, payload, content_type="text/plain")
            try:
                if await storage.get(probe) != payload:
                    raise _CheckFailed("the probe object read back differs from what was written")
            finally:
                await storage.delete(probe)
            info = storage.describe()
            if storage.backend.kind == "local":
                label = f"local storage {info.get('root', '')}"
            else:
                label = f"{info.get('backend', 's3')} bucket {info.get('bucket', '?')} at {info.get('endpoint', '?')}"
            return HealthStatus.HEALTHY, f"{label}: write, read and delete ok", {
                "backend": storage.backend.kind,
                "where": str(info.get("bucket") or info.get("root") or ""),
            }
        directory = Path(self.settings.data_dir).expanduser()
        await asyncio.to_thread(_probe_directory, directory, probe.replace("/", "-"), payload)
        return HealthStatus.HEALTHY, f"local storage: DATA_DIR {directory} is writable", {"backend": "local", "where": str(directory)}

    # --- alerts --------------------------------------------------------------------------

    async def check_alerts(self) -> tuple[HealthStatus, str, dict[str, Any]]:
        import aiohttp  # only this check speaks HTTP: the other checks and the CLI start without it

        token = self.settings.alert_bot_token
        chat = self.settings.alert_chat_id
        if not token:
            return HealthStatus.DEGRADED, "no ALERT_BOT_TOKEN: alerts are only logged", {"mode": "log_only"}
        base = self.settings.alert_api_base.rstrip("/")
        url = f"{base}/bot{token}/getMe"
        session = self._http
        own = session is None
        if session is None:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                    status = response.status
                    try:
                        body = await response.json(content_type=None)
                    except (ValueError, aiohttp.ContentTypeError):
                        body = None
            except aiohttp.ClientError as exc:
                # aiohttp's message may hold the URL, and so the token: name the error only.
                raise _CheckFailed(f"Bot API at {base} unreachable ({type(exc).__name__})") from None
        finally:
            if own:
                await session.close()
        if status == 401:
            return HealthStatus.ERROR, "ALERT_BOT_TOKEN was rejected by the Bot API (401)", {"http_status": status}
        if status != 200 or not isinstance(body, dict) or not body.get("ok"):
            return HealthStatus.ERROR, f"getMe answered HTTP {status}", {"http_status": status}
        result = body.get("result") or {}
        username = str(result.get("username") or result.get("id") or "?")
        data = {"bot": username, "chat_configured": bool(chat)}
        if not chat:
            return HealthStatus.DEGRADED, f"alert bot @{username} reachable, but ALERT_CHAT_ID is not set: alerts are only logged", data
        return HealthStatus.HEALTHY, f"alert bot @{username} reachable", data

    # --- resources -----------------------------------------------------------------------

    async def check_resources(self) -> tuple[HealthStatus, str, dict[str, Any]]:
        thresholds = self._thresholds or ResourceThresholds.resolve(self.settings)
        sample = await asyncio.to_thread(self._sampler, Path(self.settings.data_dir))
        return judge_resources(sample, thresholds)


def _probe_directory(directory: Path, name: str, payload: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".{name}"
    try:
        path.write_bytes(payload)
        if path.read_bytes() != payload:
            raise _CheckFailed(f"DATA_DIR {directory}: the probe file read back differs")
    finally:
        path.unlink(missing_ok=True)


def _redacted_data(data: dict[str, Any]) -> dict[str, Any]:
    from shared.logs import redact_obj

    return redact_obj(data) if data else {}


def expand_names(names: Iterable[str] | None) -> list[str]:
    """The checks to run, in display order; None, empty or ``all`` mean every check.

    Raises:
        ValueError: an unknown name.
    """
    wanted = [n.strip().lower() for n in (names or ()) if n.strip()]
    if not wanted or "all" in wanted:
        return list(CHECK_NAMES)
    unknown = [n for n in wanted if n not in CHECK_NAMES]
    if unknown:
        raise ValueError(f"unknown check {unknown[0]!r} (use {', '.join(CHECK_NAMES)} or all)")
    return [n for n in CHECK_NAMES if n in wanted]


async def run_checks(
    settings: CommonSettings,
    names: Iterable[str] | None = None,
    *,
    database: Any | None = None,
    thresholds: ResourceThresholds | None = None,
    sampler: ResourceSampler | None = None,
    timeout: float = DEFAULT_CHECK_TIMEOUT,
    heartbeat_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run checks and return ``{"overall": ..., "checked_at": ..., "checks": {name: {...}}}``.

    For ``/health/detailed`` a bot passes its own open ``database`` and a
    ``timeout`` below the status server's provider timeout (5 s)::

        runtime.set_detailed_health(lambda: run_checks(settings, database=db, timeout=4))

    Raises:
        ValueError: an unknown check name.
        ConfigError: malformed resource thresholds in the environment.
    """
    if thresholds is None and "resources" in expand_names(names):
        thresholds = ResourceThresholds.resolve(settings)
    async with HealthChecker(
        settings, database=database, thresholds=thresholds, sampler=sampler, timeout=timeout, heartbeat_ids=heartbeat_ids
    ) as checker:
        report = await checker.run(names)
    return report.as_dict()


# --- output -----------------------------------------------------------------------------------


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def render_table(report: HealthReport) -> str:
    """The report as a plain-text table: check, status, time, detail, then the overall verdict."""
    rows = [(r.name, r.status.value, _fmt_seconds(r.seconds), r.detail) for r in report.checks.values()]
    headers = ("CHECK", "STATUS", "TIME", "DETAIL")
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(3)] if rows else [5, 6, 4]
    lines = [f"{headers[0]:<{widths[0]}}  {headers[1]:<{widths[1]}}  {headers[2]:>{widths[2]}}  {headers[3]}"]
    for name, status, took, detail in rows:
        lines.append(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {took:>{widths[2]}}  {detail}")
    lines.append(f"overall: {report.overall.value}")
    return "\n".join(lines) + "\n"


def _beat_of(beat_id: str, ids: Sequence[str]) -> bool:
    """A heartbeat row of one of ``ids``: the id itself, or a replica of it (worker replicas beat as ``WORKER_ID:host:pid:…``)."""
    return any(beat_id == i or beat_id.startswith(i + ":") for i in ids)


# --- the command --------------------------------------------------------------------------------

_SETTINGS_BY_BOT: dict[str, type[CommonSettings]] = {
    "worker": WorkerSettings,
    "ingest": IngestSettings,
    "bot": ReplyGuySettings,
}
_HEARTBEAT_IDS_BY_BOT: dict[str, Callable[[Any], tuple[str, ...] | None]] = {
    "worker": lambda s: (s.worker_id,),
    "ingest": lambda s: ("ingest",),
    "bot": lambda s: None,
}


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="./start.sh health",
        description="Check the bot's dependencies. Exit 0 healthy, 1 degraded, 2 error.",
        epilog="Settings come from the environment and .env (BOT picks the bot: worker, ingest or bot). "
        "Resource thresholds: RESOURCE_WARN_PERCENT (70), RESOURCE_CRITICAL_PERCENT (90).",
    )
    parser.add_argument("checks", nargs="*", metavar="CHECK", help=f"{', '.join(CHECK_NAMES)} or all (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--timeout", type=float, default=DEFAULT_CHECK_TIMEOUT, help="seconds each check may take (default: %(default)s)")
    return parser


async def _main(names: list[str], *, as_json: bool, timeout: float, env: Mapping[str, str]) -> int:
    bot = (env.get("BOT") or "worker").strip().lower()
    cls = _SETTINGS_BY_BOT.get(bot)
    if cls is None:
        sys.stderr.write(f"CONFIG ERROR: BOT must be worker, ingest or bot, got {bot!r}\n")
        return 2
    try:
        settings = load_settings(cls, env)
        thresholds = ResourceThresholds.resolve(settings, env) if "resources" in names else None
    except ConfigError as exc:
        sys.stderr.write(f"CONFIG ERROR: {exc}\n")
        return 2
    async with HealthChecker(
        settings, thresholds=thresholds, timeout=timeout, heartbeat_ids=_HEARTBEAT_IDS_BY_BOT[bot](settings)
    ) as checker:
        report = await checker.run(names)
    if as_json:
        sys.stdout.write(json.dumps(report.as_dict(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(render_table(report))
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    """``python -m shared.health``: run the checks, print them, return the exit code."""
    from shared.cli import run_cli

    return run_cli(_main_cli, argv)


def _main_cli(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        names = expand_names(args.checks)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.timeout > 0:
        parser.error("--timeout must be above 0")
    env = read_environment()
    # The table is the output: logs (to stderr) only for errors, or everything with LOG_LEVEL=DEBUG.
    from shared.cli import verbose

    debug = (env.get("LOG_LEVEL") or "").strip().upper() == "DEBUG"
    setup_logging(level="DEBUG" if debug else "INFO" if verbose() else "ERROR", fmt="text", stream=sys.stderr)
    try:
        return asyncio.run(_main(names, as_json=args.json, timeout=args.timeout, env=env))
    except KeyboardInterrupt:
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
