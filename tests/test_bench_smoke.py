"""Every benchmark runs end to end: each ``--json`` run ends with one JSON object carrying its fields.

Only the shape of the output is checked, never a figure: benchmarks measure,
and speed on a shared 2-core machine is not a test's business. Each runs at
the smallest size its options allow (the JSON's shape does not depend on the
size: a fraction of a second of load, one or two accounts, no footprint
settle, one small JPEG in ingest's speed comparison, recovery's independent
cases at once with ``--parallel``), as its own test, so the parallel workers
spread them like any other slow test instead of one worker starting all of
them at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUN_TIMEOUT = 240.0
"""Seconds one benchmark may take: alone the slowest needs about 15 s, beside the rest of the suite
on two busy cores several times that."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(RUN_TIMEOUT + 10)]


def _number_or_none(value: Any) -> bool:
    return value is None or isinstance(value, (int, float))


def _ingest(result: dict[str, Any]) -> None:
    assert isinstance(result["budget_mb"], int) and isinstance(result["peak_rss_mb"], (int, float))
    cases = result["large_images"]
    assert [case["case"] for case in cases] == ["png 8000x8000 RGBA", "jpeg 12000x9000"]
    for case in cases:
        assert {"peak_rss_mb", "no_budget_peak_rss_mb", "outcome", "no_budget_outcome"} <= set(case)
    assert result["peak_rss_mb"] == max(case["peak_rss_mb"] for case in cases)


def _queue(result: dict[str, Any]) -> None:
    assert all(_number_or_none(result[f]) for f in ("pgqueuer_per_s", "ratio_pgqueuer", "pgqueuer_p99_ms"))
    assert set(result["settings"]) == {"ours", "procrastinate", "pgqueuer"}, "each system's settings are stated"


def _recovery_defaults(result: dict[str, Any]) -> None:
    assert _number_or_none(result["worst_after_return_s"])
    assert result["cases"] and all("after_return_s" in c and _number_or_none(c["after_return_s"]) for c in result["cases"])
    assert set(result["after_return_s"]) == {c["case"] for c in result["cases"]}
    assert any(c["case"].startswith("X outage, bot.py") for c in result["cases"]), "bot.py's X outage is a case"


def _outbound_realistic(result: dict[str, Any]) -> None:
    assert _number_or_none(result["efficiency"]) and isinstance(result["flood_waits"], int)
    assert [load["percent"] for load in result["loads"]] == [50.0, 100.0, 150.0]
    for load in result["loads"]:
        assert {"efficiency", "flood_waits", "p50_ms", "p99_ms", "delivered_per_s", "backlog"} <= set(load)
    assert {"peak", "drain_per_s", "samples"} <= set(result["loads"][-1]["backlog"])


@dataclass(frozen=True)
class Run:
    """One benchmark at its smallest: its arguments, the fields its JSON line must carry, and any closer look."""

    args: list[str]
    fields: tuple[str, ...]
    check: Callable[[dict[str, Any]], None] = field(default=lambda result: None)


RUNS: dict[str, Run] = {
    "outbound": Run(
        ["outbound.py", "--quick", "--json", "--seconds", "0.2", "--rates", "50", "--accounts", "2"],
        ("p50_ms", "p99_ms", "per_s", "baseline_p50_ms", "loads", "machine"),
    ),
    "recovery": Run(["recovery.py", "--quick", "--json", "--outage", "2", "--parallel"], ("cases", "worst_ratio", "machine")),
    "footprint": Run(
        ["footprint.py", "--quick", "--json", "--seconds", "1", "--accounts", "1", "--settle", "0"], ("cases", "rss_mb", "cpu_percent", "machine")
    ),
    "ingest": Run(
        ["ingest.py", "--quick", "--json", "--sizes", "2048x1536"],
        ("rss_ratio", "speed_ratio", "budget_mb", "peak_rss_mb", "ceiling_mb", "large_images", "machine"),
        _ingest,
    ),
    "fleet": Run(
        ["fleet.py", "--quick", "--json", "--accounts", "3", "--messages", "2"],
        ("balanced", "max_minus_min", "handoff_kill_s", "handoff_bound_s", "lost", "duplicated", "scaling_3x", "phases", "machine"),
    ),
    # The comparisons against peers, against Telegram's limits and with the default settings.
    "queue": Run(
        ["queue.py", "--quick", "--json", "--messages", "50", "--rounds", "1", "--seconds", "0.25"],
        ("pgqueuer_per_s", "ratio_pgqueuer", "pgqueuer_p99_ms", "settings", "machine"),
        _queue,
    ),
    "recovery-defaults": Run(
        # One worker case and bot.py's: the JSON's shape is the same for all four.
        ["recovery.py", "--defaults", "--quick", "--json", "--parallel", "--cases", "reset,x", "--outage", "1", "--x-outage", "3"],
        ("cases", "after_return_s", "worst_after_return_s", "machine"),
        _recovery_defaults,
    ),
    "outbound-realistic": Run(
        ["outbound.py", "--realistic", "--quick", "--json", "--seconds", "0.5", "--accounts", "2"],
        ("efficiency", "flood_waits", "p99_ms", "loads", "machine"),
        _outbound_realistic,
    ),
}


def run_json(args: list[str], logs: Path) -> dict[str, Any]:
    """Run ``bench/<args>``; the JSON object on its last line (a table comes before it)."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "SUPABASE_URL", "TELEGRAM_API_ID"}}
    name = " ".join(args)
    with (logs / "stderr").open("w") as stderr:
        try:
            done = subprocess.run(
                [sys.executable, f"bench/{args[0]}", *args[1:]], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr,
                text=True, timeout=RUN_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if isinstance(exc.stdout, str) else ""
            pytest.fail(f"bench {name} did not finish within {RUN_TIMEOUT:g} s:\n{out[-2000:]}")
    tail = (logs / "stderr").read_text(errors="replace")[-2000:]
    assert done.returncode == 0, f"bench {name} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{tail}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) > 1, f"bench {name}: no table before the JSON line:\n{done.stdout[-2000:]}"
    result = json.loads(lines[-1])
    assert isinstance(result, dict), f"bench {name}: the last line is not a JSON object"
    return result


@pytest.mark.parametrize("name", list(RUNS))
def test_a_json_run_ends_with_an_object_carrying_the_benchmarks_fields(name: str, tmp_path: Path) -> None:
    run = RUNS[name]
    result = run_json(run.args, tmp_path)
    missing = [f for f in run.fields if f not in result]
    assert not missing, f"bench {name}: JSON lacks {missing}"
    assert {"date", "commit", "load_average"} <= set(result["machine"]), "where the figures come from"
    run.check(result)
