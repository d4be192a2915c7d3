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

from pathlib import Path

import pytest

pytest_plugins: list[str] = ["tests.fixtures.sandbox", "tests.fixtures.postgres", "tests.fixtures.bot_api", "tests.fixtures.standins"]

TESTS = Path(__file__).resolve().parent

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

#: Modules whose module-scoped fixtures do the expensive part once (run every
#: bad-environment case, copy the repository, write huge images): one worker runs each of them whole,
#: or every worker that gets one of their tests would do it all again (``--dist loadgroup``).
WHOLE_MODULES = frozenset({
    "test_docs.py",
    "hostile/test_environment.py",
    "shared/test_images_memory.py",
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))
        module = Path(str(item.fspath)).resolve().relative_to(TESTS).as_posix()
        if module in WHOLE_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))
    # Long modules first: with parallel workers, a 30 s test handed out last is the whole run's tail.
    # Whole modules move, in their own order, so module-scoped fixtures are still set up once.
    rank: dict[str, int] = {}
    for item in items:
        module = str(item.fspath)
        here = 0 if item.get_closest_marker("slow") is not None else 1 if item.get_closest_marker("process") else 2
        rank[module] = min(rank.get(module, 2), here)
    items.sort(key=lambda item: rank[str(item.fspath)])
