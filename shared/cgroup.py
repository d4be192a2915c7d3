"""CPU and memory as the service sees them: its container's cgroup when there is one, else the host.

Inside a container (Railway, Docker, Kubernetes) psutil reports the host: the
load of every tenant and the host's memory. What stops the service is its own
cgroup: the kernel kills it at the cgroup's memory limit and throttles it at
its CPU quota. So :class:`CpuMemoryReader` reads, under the cgroup root
(``/sys/fs/cgroup``, the container's own cgroup there):

* cgroup v2 (``cgroup.controllers`` and ``memory.current`` at the root):
  ``memory.current`` less ``inactive_file`` of ``memory.stat`` (page cache
  the kernel takes back before it kills: the working set, as ``docker stats``
  and Kubernetes count it) against ``memory.max``; the CPU time of
  ``cpu.stat``'s ``usage_usec`` per second against ``cpu.max``'s quota.
* cgroup v1 (``memory/memory.usage_in_bytes`` under the root):
  ``memory.usage_in_bytes`` less ``total_inactive_file`` against
  ``memory.limit_in_bytes``; ``cpuacct.usage`` (nanoseconds) per second
  against ``cpu.cfs_quota_us / cpu.cfs_period_us``.
* neither: the host's figures through psutil.

A limit that is not set ("max", -1, or larger than the host) counts as the
host's memory or CPU count. CPU use is a rate, so it is measured between two
readings: over ``cpu_interval`` seconds, or (``cpu_interval=None``) since the
previous reading, the first one reading 0 as psutil's does. A cgroup file that
cannot be read makes that reading the host's.

Only the root is read: in a container that is the container's cgroup. A
process in a nested cgroup of a host (a systemd service) finds no
``memory.current`` at the root and gets the host's figures.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

#: Where the kernel's cgroup file system is mounted.
DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")


class ResourceSource(str, enum.Enum):
    """Where the CPU and memory figures came from."""

    CGROUP_V2 = "cgroup v2"
    CGROUP_V1 = "cgroup v1"
    HOST = "host"


@dataclass(frozen=True)
class CpuMemory:
    """One reading: use in percent of what the service may use, and those limits."""

    cpu_percent: float
    memory_percent: float
    source: ResourceSource
    memory_used_bytes: int
    memory_limit_bytes: int
    cpu_limit_cores: float


@dataclass(frozen=True)
class _Cgroup:
    """Raw figures of a cgroup: memory in bytes, CPU time in seconds, the quota in cores (None: none)."""

    version: ResourceSource
    memory_used: int
    memory_limit: int | None
    cpu_seconds: float
    cpu_quota: float | None


def host_cpu_count() -> float:
    """CPUs this process may run on (its affinity), at least 1."""
    try:
        return float(len(os.sched_getaffinity(0)) or 1)
    except (AttributeError, OSError):
        return float(os.cpu_count() or 1)


def host_memory_total() -> int:
    return int(psutil.virtual_memory().total)


class CpuMemoryReader:
    """Reads CPU and memory use from the cgroup under ``cgroup_root``, or the host's.

    Args:
        cgroup_root: the cgroup file system (a test hands it a fake tree).
        cpu_interval: seconds to measure the CPU over (blocking); None compares
            with the previous reading instead (instant; the first reads 0).
        clock: a monotonic clock in seconds (the CPU rate's denominator).
        sleep: how to wait ``cpu_interval``.
        host_cpus: the host's CPU count (the quota when none is set).
        host_memory: the host's memory in bytes (the limit when none is set).
    """

    def __init__(
        self,
        *,
        cgroup_root: Path | str = DEFAULT_CGROUP_ROOT,
        cpu_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        host_cpus: Callable[[], float] = host_cpu_count,
        host_memory: Callable[[], int] = host_memory_total,
    ) -> None:
        self.cgroup_root = Path(cgroup_root)
        self.cpu_interval = cpu_interval
        self._clock = clock
        self._sleep = sleep
        self._host_cpus = host_cpus
        self._host_memory = host_memory
        self._lock = threading.Lock()
        self._previous: tuple[ResourceSource, float, float] | None = None  # source, CPU seconds, clock

    def read(self) -> CpuMemory:
        """One reading (blocking for ``cpu_interval`` when set)."""
        try:
            first = self._read_cgroup()
        except (OSError, ValueError) as exc:
            logger.debug("cgroup figures unreadable, using the host's: %s", exc)
            first = None
        if first is None:
            return self._host()
        if self.cpu_interval is not None:
            start = self._clock()
            self._sleep(self.cpu_interval)
            try:
                second = self._read_cgroup()
            except (OSError, ValueError):
                second = None
            if second is None or second.version is not first.version:
                return self._host()
            return self._figures(second, self._rate(first.cpu_seconds, second.cpu_seconds, self._clock() - start, second))
        now = self._clock()
        with self._lock:
            previous, self._previous = self._previous, (first.version, first.cpu_seconds, now)
        if previous is None or previous[0] is not first.version:
            return self._figures(first, 0.0)
        return self._figures(first, self._rate(previous[1], first.cpu_seconds, now - previous[2], first))

    __call__ = read

    # --- the figures -------------------------------------------------------------------------

    def _cores(self, group: _Cgroup) -> float:
        host = max(1.0, float(self._host_cpus()))
        return host if group.cpu_quota is None or group.cpu_quota <= 0 else min(group.cpu_quota, host)

    def _rate(self, before: float, after: float, seconds: float, group: _Cgroup) -> float:
        if seconds <= 0:
            return 0.0
        percent = (after - before) / seconds / self._cores(group) * 100.0
        return max(0.0, min(100.0, percent))

    def _figures(self, group: _Cgroup, cpu_percent: float) -> CpuMemory:
        host_memory = int(self._host_memory())
        limit = host_memory if group.memory_limit is None or group.memory_limit <= 0 else min(group.memory_limit, host_memory)
        used = max(0, group.memory_used)
        return CpuMemory(
            cpu_percent=cpu_percent,
            memory_percent=min(100.0, used / limit * 100.0) if limit > 0 else 0.0,
            source=group.version,
            memory_used_bytes=used,
            memory_limit_bytes=limit,
            cpu_limit_cores=self._cores(group),
        )

    def _host(self) -> CpuMemory:
        memory = psutil.virtual_memory()
        return CpuMemory(
            cpu_percent=float(psutil.cpu_percent(interval=self.cpu_interval)),
            memory_percent=float(memory.percent),
            source=ResourceSource.HOST,
            memory_used_bytes=int(memory.total - memory.available),
            memory_limit_bytes=int(memory.total),
            cpu_limit_cores=max(1.0, float(self._host_cpus())),
        )

    # --- the cgroup files --------------------------------------------------------------------

    def _read_cgroup(self) -> _Cgroup | None:
        root = self.cgroup_root
        if (root / "cgroup.controllers").is_file() and (root / "memory.current").is_file():
            return self._read_v2(root)
        if (root / "memory" / "memory.usage_in_bytes").is_file():
            return self._read_v1(root)
        return None

    @staticmethod
    def _read_v2(root: Path) -> _Cgroup:
        current = int(_text(root / "memory.current"))
        stat = _keyed(root / "memory.stat")
        limit = _text(root / "memory.max")
        quota: float | None = None
        cpu_max = root / "cpu.max"
        if cpu_max.is_file():
            value, _, period = _text(cpu_max).partition(" ")
            if value != "max":
                quota = int(value) / int(period or "100000")
        cpu_seconds = _keyed(root / "cpu.stat").get("usage_usec", 0) / 1e6 if (root / "cpu.stat").is_file() else 0.0
        return _Cgroup(
            version=ResourceSource.CGROUP_V2,
            memory_used=current - stat.get("inactive_file", 0),
            memory_limit=None if limit == "max" else int(limit),
            cpu_seconds=cpu_seconds,
            cpu_quota=quota,
        )

    @staticmethod
    def _read_v1(root: Path) -> _Cgroup:
        memory = root / "memory"
        usage = int(_text(memory / "memory.usage_in_bytes"))
        stat = _keyed(memory / "memory.stat") if (memory / "memory.stat").is_file() else {}
        limit_file = memory / "memory.limit_in_bytes"
        limit = int(_text(limit_file)) if limit_file.is_file() else None
        quota: float | None = None
        cpu = _first_dir(root, ("cpu", "cpu,cpuacct", "cpuacct,cpu"), "cpu.cfs_quota_us")
        if cpu is not None:
            value = int(_text(cpu / "cpu.cfs_quota_us"))
            if value > 0:
                quota = value / int(_text(cpu / "cpu.cfs_period_us"))
        acct = _first_dir(root, ("cpuacct", "cpu,cpuacct", "cpuacct,cpu"), "cpuacct.usage")
        cpu_seconds = int(_text(acct / "cpuacct.usage")) / 1e9 if acct is not None else 0.0
        return _Cgroup(
            version=ResourceSource.CGROUP_V1,
            memory_used=usage - stat.get("total_inactive_file", 0),
            memory_limit=limit,
            cpu_seconds=cpu_seconds,
            cpu_quota=quota,
        )


def _text(path: Path) -> str:
    return path.read_text(encoding="ascii").strip()


def _keyed(path: Path) -> dict[str, int]:
    """A ``name value`` per line file (``memory.stat``, ``cpu.stat``)."""
    figures: dict[str, int] = {}
    for line in _text(path).splitlines():
        name, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            figures[name] = int(value)
    return figures


def _first_dir(root: Path, names: tuple[str, ...], file: str) -> Path | None:
    """The first of ``root/<name>`` that holds ``file`` (v1 mounts cpu and cpuacct alone or together)."""
    for name in names:
        if (root / name / file).is_file():
            return root / name
    return None


__all__ = ["CpuMemory", "CpuMemoryReader", "DEFAULT_CGROUP_ROOT", "ResourceSource", "host_cpu_count", "host_memory_total"]
