"""The issue-10 benchmarks run end to end: each ``--quick --json`` ends with one JSON object.

Only the shape of the output is checked, never a figure: benchmarks measure,
and speed on a shared 2-core machine is not a test's business. The three
benchmarks start together (each with its own embedded PostgreSQL, sandbox
world and worker process) so the whole file takes about as long as the
slowest of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Benchmark -> the fields its JSON line must carry.
REQUIRED: dict[str, tuple[str, ...]] = {
    "outbound": ("p50_ms", "p99_ms", "per_s", "baseline_p50_ms", "loads", "machine"),
    "recovery": ("cases", "worst_ratio", "machine"),
    "footprint": ("cases", "rss_mb", "cpu_percent", "machine"),
    "ingest": ("rss_ratio", "speed_ratio", "budget_mb", "peak_rss_mb", "ceiling_mb", "large_images", "machine"),
    "fleet": ("balanced", "max_minus_min", "handoff_kill_s", "handoff_bound_s", "lost", "duplicated", "scaling_3x", "phases", "machine"),
}

RUN_TIMEOUT = 240.0
"""Seconds one quick benchmark may take: alone they need 15-30 s each, but every one starts at once
beside the rest of the suite on two cores, and then the slowest took up to 110 s."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(RUN_TIMEOUT + 10)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Every benchmark started at once with ``--quick --json``; killed if still running at the end."""
    logs = tmp_path_factory.mktemp("bench-smoke")
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "SUPABASE_URL", "TELEGRAM_API_ID"}}
    procs = {
        name: subprocess.Popen(
            [sys.executable, f"bench/{name}.py", "--quick", "--json"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=(logs / f"{name}.err").open("w"),
            text=True,
        )
        for name in REQUIRED
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


_RESULTS: dict[int, dict[str, Any]] = {}


def last_json_line(proc: subprocess.Popen[str], name: str) -> dict[str, Any]:
    """The benchmark's JSON line (read once per process: several tests look at it)."""
    if proc.pid not in _RESULTS:
        _RESULTS[proc.pid] = _read_json_line(proc, name)
    return _RESULTS[proc.pid]


def _read_json_line(proc: subprocess.Popen[str], name: str) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"bench {name} --quick did not finish within {RUN_TIMEOUT:g} s:\n{out[-2000:]}")
    assert proc.returncode == 0, f"bench {name} exited with {proc.returncode}:\n{out[-3000:]}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"bench {name} printed nothing"
    result = json.loads(lines[-1])
    assert isinstance(result, dict), f"bench {name}: the last line is not a JSON object"
    assert len(lines) > 1, f"bench {name}: no table before the JSON line"
    return result


@pytest.mark.parametrize("name", list(REQUIRED))
def test_quick_json_run_ends_with_an_object_carrying_the_required_fields(
    runs: dict[str, subprocess.Popen[str]], name: str
) -> None:
    result = last_json_line(runs[name], name)
    missing = [field for field in REQUIRED[name] if field not in result]
    assert not missing, f"bench {name}: JSON lacks {missing}"
    assert {"date", "commit", "load_average"} <= set(result["machine"]), "where the figures come from"


def test_bench_ingest_reports_peak_rss_of_the_large_images_against_the_memory_budget(
    runs: dict[str, subprocess.Popen[str]],
) -> None:
    result = last_json_line(runs["ingest"], "ingest")
    assert isinstance(result["budget_mb"], int) and isinstance(result["peak_rss_mb"], (int, float))
    cases = result["large_images"]
    assert [case["case"] for case in cases] == ["png 8000x8000 RGBA", "jpeg 12000x9000"]
    for case in cases:
        assert {"peak_rss_mb", "no_budget_peak_rss_mb", "outcome", "no_budget_outcome"} <= set(case)
    assert result["peak_rss_mb"] == max(case["peak_rss_mb"] for case in cases)


#: Runs of the comparisons against peers, against Telegram's limits and with the default settings,
#: each a little smaller than --quick where an option allows, started together after the
#: first group: benchmark id -> (arguments after bench/, the fields its JSON line must carry).
MORE: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "queue": (["queue.py", "--quick", "--json"], ("pgqueuer_per_s", "ratio_pgqueuer", "pgqueuer_p99_ms", "settings")),
    "recovery-defaults": (
        # Two of the four cases (one worker, one bot.py): the JSON's shape is the same for all four.
        ["recovery.py", "--defaults", "--quick", "--json", "--cases", "hung,x", "--outage", "4", "--x-outage", "4"],
        ("cases", "after_return_s", "worst_after_return_s", "machine"),
    ),
    "outbound-realistic": (
        ["outbound.py", "--realistic", "--quick", "--json", "--seconds", "3", "--accounts", "4"],
        ("efficiency", "flood_waits", "p99_ms", "loads", "machine"),
    ),
}

MORE_TIMEOUT = 300.0
"""Seconds the second group may take (three benchmarks at once on two shared cores)."""


@pytest.fixture(scope="module")
def more_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen[str]]]:
    logs = tmp_path_factory.mktemp("bench-smoke-more")
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "SUPABASE_URL", "TELEGRAM_API_ID"}}
    procs = {
        name: subprocess.Popen(
            [sys.executable, f"bench/{args[0]}", *args[1:]],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=(logs / f"{name}.err").open("w"), text=True,
        )
        for name, (args, _) in MORE.items()
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _number_or_none(value: Any) -> bool:
    return value is None or isinstance(value, (int, float))


@pytest.mark.timeout(MORE_TIMEOUT + 10)
@pytest.mark.parametrize("name", list(MORE))
def test_peer_limit_and_default_recovery_runs_carry_their_fields(more_runs: dict[str, subprocess.Popen[str]], name: str) -> None:
    proc = more_runs[name]
    try:
        out, _ = proc.communicate(timeout=MORE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"bench {name} did not finish within {MORE_TIMEOUT:g} s:\n{out[-2000:]}")
    assert proc.returncode == 0, f"bench {name} exited with {proc.returncode}:\n{out[-3000:]}"
    lines = [line for line in out.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    missing = [field for field in MORE[name][1] if field not in result]
    assert not missing, f"bench {name}: JSON lacks {missing}"
    if name == "queue":
        assert all(_number_or_none(result[f]) for f in ("pgqueuer_per_s", "ratio_pgqueuer", "pgqueuer_p99_ms"))
        assert set(result["settings"]) == {"ours", "procrastinate", "pgqueuer"}, "each system's settings are stated"
    elif name == "recovery-defaults":
        assert _number_or_none(result["worst_after_return_s"])
        assert result["cases"] and all("after_return_s" in c and _number_or_none(c["after_return_s"]) for c in result["cases"])
        assert set(result["after_return_s"]) == {c["case"] for c in result["cases"]}
        assert any(c["case"].startswith("X outage, bot.py") for c in result["cases"]), "bot.py's X outage is a case"
    else:
        assert _number_or_none(result["efficiency"]) and isinstance(result["flood_waits"], int)
        assert [load["percent"] for load in result["loads"]] == [50.0, 100.0, 150.0]
        for load in result["loads"]:
            assert {"efficiency", "flood_waits", "p50_ms", "p99_ms", "delivered_per_s", "backlog"} <= set(load)
        assert {"peak", "drain_per_s", "samples"} <= set(result["loads"][-1]["backlog"])
