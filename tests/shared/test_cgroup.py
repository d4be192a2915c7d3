"""Tests for shared/cgroup.py: CPU and memory from a cgroup tree (v2, v1) given in a temporary directory, else the host's."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from shared.cgroup import CpuMemoryReader, ResourceSource
from shared.config import WorkerSettings, load_settings
from shared.health import HealthChecker, PsutilSampler, ResourceThresholds, resources_status
from tests.helpers import FakeClock

GIB = 1024**3
HOST_MEMORY = 64 * GIB
HOST_CPUS = 32.0


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="ascii")


def cgroup_v2(root: Path, *, current: int, inactive_file: int, memory_max: str, cpu_max: str, usage_usec: int) -> None:
    """The files a container sees at /sys/fs/cgroup under cgroup v2 (with the lines around ours, as the kernel writes them)."""
    write(
        root,
        {
            "cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc",
            "memory.current": str(current),
            "memory.max": memory_max,
            "memory.stat": f"anon 123456\nfile 7890000\nactive_file 1000\ninactive_file {inactive_file}\nslab 4096",
            "cpu.max": cpu_max,
            "cpu.stat": f"usage_usec {usage_usec}\nuser_usec 1\nsystem_usec 2\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0",
        },
    )


def cgroup_v1(root: Path, *, usage: int, inactive_file: int, limit: int, quota_us: int, cpuacct_ns: int, cpu_dir: str = "cpu,cpuacct") -> None:
    """The per-controller hierarchies of cgroup v1 (Docker mounts cpu and cpuacct together)."""
    write(
        root,
        {
            "memory/memory.usage_in_bytes": str(usage),
            "memory/memory.limit_in_bytes": str(limit),
            "memory/memory.stat": f"cache 100\nrss 200\ntotal_cache 100\ntotal_inactive_file {inactive_file}\ntotal_rss 200",
            f"{cpu_dir}/cpu.cfs_quota_us": str(quota_us),
            f"{cpu_dir}/cpu.cfs_period_us": "100000",
            f"{cpu_dir}/cpuacct.usage": str(cpuacct_ns),
        },
    )


def reader(root: Path, clock: FakeClock) -> CpuMemoryReader:
    return CpuMemoryReader(cgroup_root=root, clock=clock, host_cpus=lambda: HOST_CPUS, host_memory=lambda: HOST_MEMORY)


def test_cgroup_v2_memory_is_the_working_set_against_memory_max_and_cpu_a_rate_against_the_quota(tmp_path: Path) -> None:
    clock = FakeClock()
    cgroup_v2(tmp_path, current=600 * 1024**2, inactive_file=88 * 1024**2, memory_max=str(GIB), cpu_max="150000 100000", usage_usec=5_000_000)
    read = reader(tmp_path, clock)
    first = read.read()
    assert first.source is ResourceSource.CGROUP_V2
    assert first.cpu_percent == 0.0  # nothing to compare with yet, as psutil's first reading
    assert first.memory_percent == pytest.approx(50.0)  # 512 MiB of 1 GiB: the page cache it may drop does not count
    assert (first.memory_limit_bytes, first.cpu_limit_cores) == (GIB, 1.5)

    # 0.75 s of CPU in 1 s on a quota of 1.5 CPUs: half the quota (not 0.75 / 32 of the host).
    clock.advance(1.0)
    cgroup_v2(tmp_path, current=600 * 1024**2, inactive_file=88 * 1024**2, memory_max=str(GIB), cpu_max="150000 100000", usage_usec=5_750_000)
    assert read.read().cpu_percent == pytest.approx(50.0)


def test_cgroup_v2_without_limits_measures_against_the_host(tmp_path: Path) -> None:
    clock = FakeClock()
    cgroup_v2(tmp_path, current=16 * GIB, inactive_file=0, memory_max="max", cpu_max="max 100000", usage_usec=0)
    read = reader(tmp_path, clock)
    read.read()
    clock.advance(2.0)
    cgroup_v2(tmp_path, current=16 * GIB, inactive_file=0, memory_max="max", cpu_max="max 100000", usage_usec=16_000_000)
    figures = read.read()
    assert figures.source is ResourceSource.CGROUP_V2
    assert figures.memory_percent == pytest.approx(25.0) and figures.memory_limit_bytes == HOST_MEMORY
    assert figures.cpu_percent == pytest.approx(25.0) and figures.cpu_limit_cores == HOST_CPUS  # 8 of 32 CPUs busy


@pytest.mark.parametrize("cpu_dir", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_reads_the_memory_and_cpuacct_hierarchies(tmp_path: Path, cpu_dir: str) -> None:
    clock = FakeClock()
    if cpu_dir == "cpu":  # cpu and cpuacct mounted apart
        write(tmp_path, {"cpuacct/cpuacct.usage": "2000000000"})
    cgroup_v1(tmp_path, usage=3 * GIB, inactive_file=GIB, limit=4 * GIB, quota_us=200000, cpuacct_ns=2_000_000_000, cpu_dir=cpu_dir)
    read = reader(tmp_path, clock)
    first = read.read()
    assert first.source is ResourceSource.CGROUP_V1
    assert first.memory_percent == pytest.approx(50.0) and first.cpu_limit_cores == 2.0
    clock.advance(0.5)
    if cpu_dir == "cpu":
        write(tmp_path, {"cpuacct/cpuacct.usage": "2250000000"})
    cgroup_v1(tmp_path, usage=3 * GIB, inactive_file=GIB, limit=4 * GIB, quota_us=200000, cpuacct_ns=2_250_000_000, cpu_dir=cpu_dir)
    assert read.read().cpu_percent == pytest.approx(25.0)  # 0.25 s in 0.5 s of 2 CPUs


def test_cgroup_v1_unlimited_is_the_host(tmp_path: Path) -> None:
    cgroup_v1(tmp_path, usage=8 * GIB, inactive_file=0, limit=9223372036854771712, quota_us=-1, cpuacct_ns=0)
    figures = reader(tmp_path, FakeClock()).read()
    assert figures.source is ResourceSource.CGROUP_V1
    assert (figures.memory_limit_bytes, figures.cpu_limit_cores) == (HOST_MEMORY, HOST_CPUS)
    assert figures.memory_percent == pytest.approx(12.5)


def test_a_measured_interval_reads_twice_around_the_wait(tmp_path: Path) -> None:
    clock = FakeClock()
    cgroup_v2(tmp_path, current=GIB, inactive_file=0, memory_max=str(2 * GIB), cpu_max="100000 100000", usage_usec=1_000_000)

    def busy_wait(seconds: float) -> None:
        clock.advance(seconds)
        cgroup_v2(tmp_path, current=GIB, inactive_file=0, memory_max=str(2 * GIB), cpu_max="100000 100000", usage_usec=1_180_000)

    read = CpuMemoryReader(cgroup_root=tmp_path, cpu_interval=0.2, clock=clock, sleep=busy_wait, host_cpus=lambda: HOST_CPUS, host_memory=lambda: HOST_MEMORY)
    assert read.read().cpu_percent == pytest.approx(90.0)  # 0.18 s of one CPU in 0.2 s


def test_no_cgroup_files_and_unreadable_ones_fall_back_to_the_host(tmp_path: Path) -> None:
    empty = reader(tmp_path / "nothing-here", FakeClock()).read()
    assert empty.source is ResourceSource.HOST
    assert empty.memory_limit_bytes == psutil.virtual_memory().total
    # A host's own v2 root: controllers but no memory.current (that is only in child cgroups).
    write(tmp_path / "host", {"cgroup.controllers": "cpu memory", "cpu.stat": "usage_usec 1"})
    assert reader(tmp_path / "host", FakeClock()).read().source is ResourceSource.HOST
    broken = tmp_path / "broken"
    cgroup_v2(broken, current=1, inactive_file=0, memory_max="garbage", cpu_max="max 100000", usage_usec=0)
    assert reader(broken, FakeClock()).read().source is ResourceSource.HOST


async def test_status_and_the_resources_check_say_which_figures_they_used(tmp_path: Path) -> None:
    tree = tmp_path / "cgroup"
    cgroup_v2(tree, current=900 * 1024**2, inactive_file=0, memory_max=str(GIB), cpu_max="100000 100000", usage_usec=0)
    data_dir = tmp_path / "data"
    status = await resources_status(data_dir, thresholds=ResourceThresholds(), sampler=PsutilSampler(cpu_interval=None, cgroup_root=tree))
    assert status["source"] == "cgroup v2" and status["memory_limit_bytes"] == GIB and status["cpu_limit_cores"] == 1.0
    assert status["status"] == "degraded" and "memory 88% (high)" in status["detail"]  # 900 MiB of the container's 1 GiB

    host = await resources_status(data_dir, thresholds=ResourceThresholds(), sampler=PsutilSampler(cpu_interval=None, cgroup_root=tmp_path / "none"))
    assert host["source"] == "host"

    settings = load_settings(WorkerSettings, {"DATA_DIR": str(data_dir)})
    checker = HealthChecker(settings, sampler=PsutilSampler(cpu_interval=None, cgroup_root=tree))
    try:
        result = await checker.run_one("resources")
    finally:
        await checker.close()
    assert result.data["source"] == "cgroup v2" and result.data["memory_percent"] == pytest.approx(87.9, abs=0.1)

