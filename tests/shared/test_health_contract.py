"""One /health/detailed shape for every bot: {overall, checked_at, checks: {dependency: {status, detail, seconds, checked_at}}}.

The worker answers with :func:`shared.health.run_checks`, ingest with the
runtime's readiness checks, bot.py with its clients' own verdicts through
:func:`shared.health.report_of`; each is held to the same contract here.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from shared.config import WorkerSettings, load_settings
from shared.health import run_checks, report_of
from shared.runtime import BotRuntime
from tests.helpers import RecordingAlerts

STATUSES = {"healthy", "degraded", "error"}


def assert_the_one_shape(report: dict[str, Any]) -> None:
    assert set(report) == {"overall", "checked_at", "checks"}, report
    assert report["overall"] in STATUSES
    dt.datetime.fromisoformat(report["checked_at"])
    assert report["checks"], "at least one dependency"
    for name, check in report["checks"].items():
        assert {"status", "detail", "seconds", "checked_at"} <= set(check) <= {"status", "detail", "seconds", "checked_at", "data"}, name
        assert check["status"] in STATUSES and isinstance(check["detail"], str) and check["detail"], name
        dt.datetime.fromisoformat(check["checked_at"])
    worst = max((c["status"] for c in report["checks"].values()), key=["healthy", "degraded", "error"].index)
    assert report["overall"] == worst


def settings(tmp_path: Path) -> WorkerSettings:
    return load_settings(WorkerSettings, {"DATA_DIR": str(tmp_path), "PORT": "0"})


async def test_the_checks_of_the_health_command_have_the_shape(tmp_path: Path) -> None:
    assert_the_one_shape(await run_checks(settings(tmp_path), ["alerts"], timeout=4))


async def test_a_bot_answering_from_its_readiness_checks_has_the_shape(tmp_path: Path) -> None:
    runtime = BotRuntime(bot="ingest", settings=settings(tmp_path), host="127.0.0.1", alerts=RecordingAlerts())

    async def fine() -> None:
        return None

    async def down() -> None:
        raise ConnectionRefusedError(111, "Connect call failed")

    runtime.add_ready_check("database", fine)
    runtime.add_ready_check("storage", down)
    report = await runtime._detailed_health()

    assert_the_one_shape(report)
    assert report["overall"] == "error" and report["checks"]["database"]["detail"] == "ok"
    assert "Connect call failed" in report["checks"]["storage"]["detail"]


def test_a_bot_judging_its_clients_itself_has_the_shape() -> None:
    report = report_of({
        "database": {"status": "healthy", "connected": True},
        "twitter": {"status": "degraded", "last_error": "429 rate limited", "circuit_breaker": "closed"},
        "ai": {"status": "error", "error": "breaker open"},
    })

    assert_the_one_shape(report)
    assert report["checks"]["twitter"]["detail"] == "429 rate limited"
    assert report["checks"]["twitter"]["data"]["circuit_breaker"] == "closed"
