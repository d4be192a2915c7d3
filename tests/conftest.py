"""Suite-wide fixtures and the test tiers. Fixture modules live in tests/fixtures and are loaded here as plugins.

Every test gets one tier marker, decided here from what it needs, so
``./start.sh test -m unit`` (or ``integration``, ``process``) runs one tier
(see tests/README.md):

* ``process``: a module whose tests run our programs as real processes
  (``worker.py``, ``bot.py``, ``ingest.py``, the supervisor, the CLIs, benchmarks);
* ``integration``: a test that needs a real service the suite starts
  (PostgreSQL, the PostgREST stand-in, the S3 server);
* ``unit``: everything else (in-process, servers on 127.0.0.1 at most).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

pytest_plugins: list[str] = ["tests.fixtures.sandbox", "tests.fixtures.postgres", "tests.fixtures.bot_api", "tests.fixtures.standins"]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

DURATIONS = TESTS / "durations.json"
"""Seconds each slower test took in a run on 2 cores (``./start.sh test --store-durations`` rewrites it)."""
STORED_FROM = 0.5
GUESSED_SECONDS = {"process": 3.0, "integration": 0.3, "unit": 0.05}
"""How long a test not in DURATIONS is taken to be, by tier."""

PROCESS_MODULES = frozenset({
    "test_worker_process.py",
    "test_fleet_process.py",
    "test_bot_replicas.py",
    "test_bot.py",
    "test_supervisor.py",
    "test_status_page.py",
    "test_chaos_quick.py",
    "test_chaos_ingest_quick.py",
    "test_docs.py",
    "test_ready_during_startup.py",
    "ingest/test_ingest_process.py",
    "hostile/test_environment.py",
    "devkit/sandbox/test_cli.py",
    "shared/db/test_main.py",
    "shared/db/test_embedded.py",
})

# Modules about a service itself: every test in them needs it.
SERVICE_DIRECTORIES = ("shared/db/",)

SERVICE_FIXTURES = frozenset({
    "embedded_pg", "local_pg", "database_url", "database", "backend_db", "postgrest", "supabase_database",
    "s3_server", "s3_bucket",
})


def tier_of(item: pytest.Item) -> str:
    module = Path(str(item.fspath)).resolve().relative_to(TESTS).as_posix()
    if module in PROCESS_MODULES or item.get_closest_marker("process") is not None:
        return "process"
    if module.startswith(SERVICE_DIRECTORIES) or SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "integration"
    return "unit"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-durations", action="store_true",
        help=f"write this run's test durations to {DURATIONS.relative_to(ROOT)} (the order parallel workers take tests in)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Longest first: with parallel workers taking one test at a time, a 30 s test handed out last is
    # the whole run's tail. The measured durations say how long; a test not measured yet ranks by its tier.
    measured = load_durations()
    expected: dict[str, float] = {}
    for item in items:
        tier = tier_of(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))
        expected[item.nodeid] = measured.get(item.nodeid, GUESSED_SECONDS[tier])
    items.sort(key=lambda item: -expected[item.nodeid])


def load_durations() -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


_spent: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _spent[report.nodeid] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if not config.getoption("store_durations") or hasattr(config, "workerinput"):
        return  # the controller writes, from every worker's reports
    slow = {nodeid: round(seconds, 1) for nodeid, seconds in sorted(_spent.items()) if seconds >= STORED_FROM}
    DURATIONS.write_text(json.dumps(slow, indent=0, sort_keys=True) + "\n")
