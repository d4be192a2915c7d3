"""Tests for shared/health.py: real PostgreSQL, a real Bot API stand-in over HTTP, moto's S3, the CLI as a process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shared.alerts import AlertType
from shared.config import ConfigError, ReplyGuySettings, WorkerSettings, load_settings
from shared.db import AccountStatus, PostgresDatabase, utc_now
from shared.db.records import SendHoldKind
from shared.health import (
    CHECK_NAMES,
    HealthChecker,
    HealthStatus,
    PsutilSampler,
    ResourceMonitor,
    ResourceSample,
    ResourceThresholds,
    render_table,
    resources_status,
    run_checks,
    temp_usage,
)
from shared.heartbeat import HeartbeatRecord
from tests.helpers import RecordingAlerts
from tests.ingest.s3_server import S3Server, s3_bucket, s3_server  # noqa: F401 - fixtures
from tests.fixtures.bot_api import BotApiStandIn

ROOT = Path(__file__).resolve().parents[2]
ALERT_TOKEN = "123456789:AAHhealthCheckTokenForTests_abcdefghij"
WRONG_TOKEN = "123456789:AAHwrongTokenWrongTokenWrongToken_xyz"


# --- helpers -------------------------------------------------------------------------------


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def bot_api(bot_api: BotApiStandIn) -> BotApiStandIn:
    """The suite's Bot API stand-in, knowing only ALERT_TOKEN."""
    bot_api.token = ALERT_TOKEN
    return bot_api


def worker_settings(tmp_path: Path, **env: str) -> WorkerSettings:
    return load_settings(WorkerSettings, {"DATA_DIR": str(tmp_path / "data"), **env})


class FixedSampler:
    """Resource use as the test says (the machine's real load must not decide a test)."""

    def __init__(self, cpu: float, memory: float, disk: float) -> None:
        self.values = (cpu, memory, disk)
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> ResourceSample:
        self.paths.append(path)
        cpu, memory, disk = self.values
        return ResourceSample(cpu, memory, disk, str(path))


async def write_heartbeat(db: PostgresDatabase, worker_id: str = "telegram-main", status: str = "online") -> None:
    await db.write_heartbeat(HeartbeatRecord(worker_id, status, {"outbound": {"state": "running"}}, "test", "host-1", 4242))


async def age_heartbeat(database_url: str, worker_id: str, seconds: float) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "update worker_heartbeats set last_heartbeat_at = now() - make_interval(secs => $2) where worker_id = $1",
            worker_id,
            seconds,
        )
    finally:
        await conn.close()


async def check(settings: Any, name: str, **kwargs: Any) -> Any:
    async with HealthChecker(settings, **kwargs) as checker:
        return await checker.run_one(name)


# --- database ---------------------------------------------------------------------------------


async def test_database_check_is_healthy_when_postgres_answers(tmp_path: Path, database_url: str) -> None:
    result = await check(worker_settings(tmp_path, DATABASE_URL=database_url), "database")
    assert result.status is HealthStatus.HEALTHY, result
    assert "postgres reachable" in result.detail and result.data["backend"] == "postgres"


async def test_database_check_is_an_error_with_the_reason_when_the_port_is_closed(tmp_path: Path) -> None:
    url = f"postgresql://bot:hunter2secret@127.0.0.1:{closed_port()}/app"
    result = await check(worker_settings(tmp_path, DATABASE_URL=url), "database")
    assert result.status is HealthStatus.ERROR
    assert "cannot connect" in result.detail.lower() or "refused" in result.detail.lower()
    assert "hunter2secret" not in json.dumps(result.as_dict())


async def test_a_hung_database_is_cut_at_the_check_deadline(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections and never speaks: a hung server
    try:
        url = f"postgresql://bot@127.0.0.1:{listener.getsockname()[1]}/app"
        settings = worker_settings(tmp_path, DATABASE_URL=url, TIMEOUT_DB="30")
        result = await check(settings, "database", timeout=0.5)
    finally:
        listener.close()
    assert result.status is HealthStatus.ERROR and "no answer within 0.5s" in result.detail


# --- telegram (heartbeats and accounts, never a session) -------------------------------------------


async def test_telegram_check_is_degraded_before_any_worker_heartbeat(tmp_path: Path, database: PostgresDatabase) -> None:
    await database.upsert_account("demo_one", status=AccountStatus.ACTIVE)
    result = await check(worker_settings(tmp_path), "telegram", database=database)
    assert result.status is HealthStatus.DEGRADED
    assert "no worker heartbeat yet" in result.detail
    assert result.detail.startswith("sandbox: "), "no TELEGRAM_API_ID: the detail says sandbox"


async def test_telegram_check_is_healthy_with_a_fresh_heartbeat_and_active_accounts(tmp_path: Path, database: PostgresDatabase) -> None:
    await database.upsert_account("demo_one", status=AccountStatus.ACTIVE)
    await write_heartbeat(database)
    settings = worker_settings(tmp_path, HEARTBEAT_INTERVAL="15")
    result = await check(settings, "telegram", database=database)
    assert result.status is HealthStatus.HEALTHY, result
    assert "worker telegram-main alive" in result.detail and "1 of 1 accounts active" in result.detail
    assert result.data["heartbeats"]["telegram-main"]["status"] == "online"


async def test_telegram_check_is_an_error_when_the_heartbeat_is_stale(
    tmp_path: Path, database: PostgresDatabase, database_url: str
) -> None:
    await database.upsert_account("demo_one", status=AccountStatus.ACTIVE)
    await write_heartbeat(database)
    await age_heartbeat(database_url, "telegram-main", 120)
    result = await check(worker_settings(tmp_path, HEARTBEAT_INTERVAL="15"), "telegram", database=database)
    assert result.status is HealthStatus.ERROR
    assert "silent for 2m" in result.detail and "stale after 45s" in result.detail


async def test_telegram_check_is_an_error_when_the_worker_stopped(tmp_path: Path, database: PostgresDatabase) -> None:
    await database.upsert_account("demo_one", status=AccountStatus.ACTIVE)
    await write_heartbeat(database, status="stopped")
    result = await check(worker_settings(tmp_path), "telegram", database=database)
    assert result.status is HealthStatus.ERROR and "worker telegram-main stopped" in result.detail


async def test_telegram_check_names_accounts_that_need_a_login(tmp_path: Path, database: PostgresDatabase) -> None:
    await database.upsert_account("demo_one", status=AccountStatus.ACTIVE)
    await database.upsert_account("spare", phone="+15551234567", status=AccountStatus.NEEDS_LOGIN)
    await write_heartbeat(database)
    result = await check(worker_settings(tmp_path), "telegram", database=database)
    assert result.status is HealthStatus.DEGRADED
    assert "needs login: spare" in result.detail and "1 of 2 accounts active" in result.detail
    assert "+15551234567" not in json.dumps(result.as_dict())


async def test_telegram_check_shows_an_account_limited_by_peer_flood(tmp_path: Path, database: PostgresDatabase) -> None:
    limited = await database.upsert_account("demo_one", status=AccountStatus.ACTIVE)
    flooded = await database.upsert_account("demo_two", status=AccountStatus.ACTIVE)
    await database.hold_account_sends(limited.id, SendHoldKind.LIMITED, until=utc_now() + timedelta(hours=1), reason="PEER_FLOOD")
    await database.hold_account_sends(flooded.id, SendHoldKind.FLOOD, until=utc_now() + timedelta(seconds=30))
    await write_heartbeat(database)
    result = await check(worker_settings(tmp_path), "telegram", database=database)
    assert result.status is HealthStatus.DEGRADED
    assert "limited by Telegram (PEER_FLOOD" in result.detail and "demo_one until" in result.detail
    assert result.data["accounts"]["demo_one"]["status"] == "limited"
    assert result.data["accounts"]["demo_one"]["limited_until"]
    # A flood wait is Telegram pacing the account, not trouble: shown, not degraded for it.
    assert result.data["accounts"]["demo_two"]["status"] == "active"
    assert result.data["accounts"]["demo_two"]["flood_wait_until"]
    assert "demo_two" not in result.detail


async def test_telegram_check_judges_only_the_configured_workers_heartbeat(tmp_path: Path, database: PostgresDatabase) -> None:
    await database.upsert_account("demo_one", status=AccountStatus.ACTIVE)
    await write_heartbeat(database, worker_id="someone-else")
    result = await check(worker_settings(tmp_path, WORKER_ID="main-eu"), "telegram", database=database)
    assert result.status is HealthStatus.DEGRADED and "no worker heartbeat yet (main-eu)" in result.detail
    assert "someone-else" in result.data["heartbeats"]


async def test_telegram_check_is_an_error_when_the_database_is_unreachable(tmp_path: Path) -> None:
    url = f"postgresql://bot@127.0.0.1:{closed_port()}/app"
    result = await check(worker_settings(tmp_path, DATABASE_URL=url), "telegram")
    assert result.status is HealthStatus.ERROR and "cannot read worker heartbeats" in result.detail


# --- storage --------------------------------------------------------------------------------


async def test_storage_check_writes_and_deletes_a_probe_in_the_local_directory(tmp_path: Path) -> None:
    settings = worker_settings(tmp_path)
    result = await check(settings, "storage")
    assert result.status is HealthStatus.HEALTHY, result
    assert "local storage" in result.detail
    objects = tmp_path / "data" / "objects"
    assert [p for p in objects.rglob("*") if p.is_file()] == [], "the probe object is gone"


async def test_storage_check_writes_and_deletes_a_probe_in_s3(tmp_path: Path, s3_server: S3Server, s3_bucket: str) -> None:
    settings = worker_settings(tmp_path, **s3_server.env(s3_bucket))
    result = await check(settings, "storage")
    assert result.status is HealthStatus.HEALTHY, result
    assert f"bucket {s3_bucket}" in result.detail
    assert s3_server.keys(s3_bucket) == set(), "the probe object is gone"


async def test_storage_check_is_an_error_for_a_missing_bucket(tmp_path: Path, s3_server: S3Server) -> None:
    settings = worker_settings(tmp_path, **s3_server.env("no-such-bucket-here"))
    result = await check(settings, "storage")
    assert result.status is HealthStatus.ERROR
    assert "test-secret-key" not in json.dumps(result.as_dict())


async def test_storage_check_without_storage_settings_checks_data_dir_is_writable(tmp_path: Path) -> None:
    good = load_settings(ReplyGuySettings, {"DATA_DIR": str(tmp_path / "rg")})
    result = await check(good, "storage")
    assert result.status is HealthStatus.HEALTHY and "DATA_DIR" in result.detail and "writable" in result.detail
    assert list((tmp_path / "rg").iterdir()) == []

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = load_settings(ReplyGuySettings, {"DATA_DIR": str(blocker / "data")})
    result = await check(bad, "storage")
    assert result.status is HealthStatus.ERROR


# --- alerts -------------------------------------------------------------------------------


async def test_alerts_check_is_healthy_when_get_me_answers(tmp_path: Path, bot_api: BotApiStandIn) -> None:
    settings = worker_settings(tmp_path, ALERT_BOT_TOKEN=ALERT_TOKEN, ALERT_CHAT_ID="-1001", ALERT_API_BASE=bot_api.url)
    result = await check(settings, "alerts")
    assert result.status is HealthStatus.HEALTHY and "@ops_alert_bot" in result.detail
    assert bot_api.calls == [ALERT_TOKEN]


async def test_alerts_check_is_degraded_without_a_token_or_without_a_chat(tmp_path: Path, bot_api: BotApiStandIn) -> None:
    result = await check(worker_settings(tmp_path), "alerts")
    assert result.status is HealthStatus.DEGRADED and "only logged" in result.detail
    assert bot_api.calls == []
    no_chat = worker_settings(tmp_path, ALERT_BOT_TOKEN=ALERT_TOKEN, ALERT_API_BASE=bot_api.url)
    result = await check(no_chat, "alerts")
    assert result.status is HealthStatus.DEGRADED and "ALERT_CHAT_ID" in result.detail


async def test_alerts_check_is_an_error_for_a_rejected_token_and_never_shows_it(tmp_path: Path, bot_api: BotApiStandIn) -> None:
    settings = worker_settings(tmp_path, ALERT_BOT_TOKEN=WRONG_TOKEN, ALERT_CHAT_ID="-1001", ALERT_API_BASE=bot_api.url)
    result = await check(settings, "alerts")
    assert result.status is HealthStatus.ERROR and "401" in result.detail
    assert WRONG_TOKEN.split(":")[1] not in json.dumps(result.as_dict())


async def test_alerts_check_is_an_error_when_the_bot_api_is_unreachable(tmp_path: Path) -> None:
    settings = worker_settings(
        tmp_path, ALERT_BOT_TOKEN=ALERT_TOKEN, ALERT_CHAT_ID="-1001", ALERT_API_BASE=f"http://127.0.0.1:{closed_port()}"
    )
    result = await check(settings, "alerts")
    assert result.status is HealthStatus.ERROR and "unreachable" in result.detail
    assert ALERT_TOKEN.split(":")[1] not in json.dumps(result.as_dict())


# --- resources ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected", "words"),
    [
        ((10, 20, 30), HealthStatus.HEALTHY, "cpu 10%, memory 20%, disk 30%"),
        ((10, 75, 30), HealthStatus.DEGRADED, "memory 75% (high)"),
        ((10, 20, 95), HealthStatus.ERROR, "disk 95% (critical)"),
        ((70, 20, 30), HealthStatus.DEGRADED, "cpu 70% (high)"),
    ],
)
async def test_resources_are_judged_against_warning_and_critical_thresholds(
    tmp_path: Path, values: tuple[float, float, float], expected: HealthStatus, words: str
) -> None:
    sampler = FixedSampler(*values)
    result = await check(worker_settings(tmp_path), "resources", sampler=sampler, thresholds=ResourceThresholds())
    assert result.status is expected and words in result.detail
    assert result.data["warn_percent"] == 70 and result.data["critical_percent"] == 90
    assert sampler.paths == [tmp_path / "data"]


async def test_temporary_files_over_500_mb_make_the_resources_degraded(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    left_over = data_dir / "tmp" / "ingest"
    left_over.mkdir(parents=True)
    (left_over / "small.part").write_bytes(b"x" * 1000)

    def calm_machine(path: Path) -> ResourceSample:
        """CPU, memory and disk fixed (the machine's load must not decide this test); temporary files measured."""
        temp_bytes, temp_files = temp_usage(path)
        return ResourceSample(10.0, 20.0, 30.0, str(path), temp_bytes, temp_files)

    quiet = await resources_status(data_dir, thresholds=ResourceThresholds(), sampler=calm_machine)
    assert quiet["status"] == "healthy" and (quiet["temp_files"], quiet["temp_bytes"]) == (1, 1000)

    with (left_over / "download-of-a-killed-process.part").open("wb") as handle:
        handle.truncate(600 * 1024 * 1024)  # sparse: 600 MB on paper, nothing on disk
    full = await resources_status(data_dir, thresholds=ResourceThresholds(), sampler=calm_machine)
    assert full["status"] == "degraded" and full["temp_files"] == 2
    assert "temporary files 600 MB in 2 file(s) (high, warn 500 MB)" in full["detail"]
    measured = PsutilSampler(cpu_interval=None)(data_dir)  # the real sampler measures the same
    assert (measured.temp_files, measured.temp_bytes) == (2, 600 * 1024 * 1024 + 1000)


def test_thresholds_come_from_the_environment_and_bad_values_name_the_variable() -> None:
    assert ResourceThresholds.from_env({}) == ResourceThresholds(70.0, 90.0)
    assert ResourceThresholds.from_env({"RESOURCE_WARN_PERCENT": "50", "RESOURCE_CRITICAL_PERCENT": "80"}) == ResourceThresholds(50, 80)
    assert ResourceThresholds(50, 80).judge(79.9) is HealthStatus.DEGRADED
    with pytest.raises(ConfigError, match="RESOURCE_WARN_PERCENT"):
        ResourceThresholds.from_env({"RESOURCE_WARN_PERCENT": "lots"})
    with pytest.raises(ConfigError, match="RESOURCE_CRITICAL_PERCENT"):
        ResourceThresholds.from_env({"RESOURCE_CRITICAL_PERCENT": "150"})
    with pytest.raises(ConfigError, match="RESOURCE_CRITICAL_PERCENT must be at least RESOURCE_WARN_PERCENT"):
        ResourceThresholds.from_env({"RESOURCE_WARN_PERCENT": "90", "RESOURCE_CRITICAL_PERCENT": "80"})


async def test_resources_status_for_the_status_page_uses_the_real_machine(tmp_path: Path) -> None:
    status = await resources_status(tmp_path / "not-created-yet", thresholds=ResourceThresholds())
    assert status["status"] in {"healthy", "degraded", "error"}
    for key in ("cpu_percent", "memory_percent", "disk_percent"):
        assert 0 <= status[key] <= 100
    assert status["disk_path"] == str(tmp_path), "the nearest existing directory is measured"
    fixed = await resources_status(tmp_path, thresholds=ResourceThresholds(), sampler=FixedSampler(1, 2, 91))
    assert fixed["status"] == "error" and "disk 91% (critical)" in fixed["detail"]


# --- all together ----------------------------------------------------------------------------


async def test_run_checks_runs_every_check_and_the_overall_is_the_worst(
    tmp_path: Path, database: PostgresDatabase, bot_api: BotApiStandIn
) -> None:
    await database.upsert_account("demo_one", status=AccountStatus.ACTIVE)
    await write_heartbeat(database)
    settings = worker_settings(tmp_path, ALERT_BOT_TOKEN=ALERT_TOKEN, ALERT_CHAT_ID="-1001", ALERT_API_BASE=bot_api.url)
    report = await run_checks(settings, database=database, sampler=FixedSampler(5, 5, 5), timeout=5)
    assert report["overall"] == "healthy", report
    assert list(report["checks"]) == list(CHECK_NAMES)
    assert all(c["status"] == "healthy" and c["detail"] for c in report["checks"].values())

    report = await run_checks(settings, ["resources", "database"], database=database, sampler=FixedSampler(5, 80, 5))
    assert list(report["checks"]) == ["database", "resources"] and report["overall"] == "degraded"
    with pytest.raises(ValueError, match="unknown check 'dns'"):
        await run_checks(settings, ["dns"])


async def test_the_table_shows_name_status_time_and_detail(tmp_path: Path) -> None:
    async with HealthChecker(worker_settings(tmp_path), sampler=FixedSampler(1, 2, 3), thresholds=ResourceThresholds()) as checker:
        report = await checker.run(["alerts", "resources"])
    table = render_table(report)
    lines = table.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "TIME", "DETAIL"]
    assert lines[1].startswith("alerts") and "degraded" in lines[1] and "only logged" in lines[1] and " ms " in lines[1]
    assert lines[2].startswith("resources") and "healthy" in lines[2]
    assert lines[-1] == "overall: degraded" and report.exit_code == 1


# --- the command, as a process -------------------------------------------------------------------


async def run_cli(cwd: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.health", *args,
        cwd=cwd, env={**base, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_exits_0_when_every_dependency_is_healthy(
    tmp_path: Path, database: PostgresDatabase, database_url: str, bot_api: BotApiStandIn
) -> None:
    await database.upsert_account("demo_one", status=AccountStatus.ACTIVE)
    await write_heartbeat(database)
    env = {
        "DATABASE_URL": database_url, "DATA_DIR": str(tmp_path / "data"), "HEARTBEAT_INTERVAL": "60",
        "ALERT_BOT_TOKEN": ALERT_TOKEN, "ALERT_CHAT_ID": "-1001", "ALERT_API_BASE": bot_api.url,
    }
    # resources is left out here: the machine's own load must not decide this test (see the in-process tests).
    code, out, err = await run_cli(tmp_path, env, "database", "telegram", "storage", "alerts")
    assert code == 0, out + err
    assert out.splitlines()[-1] == "overall: healthy"
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ["database", "telegram", "storage", "alerts"]
    assert ALERT_TOKEN.split(":")[1] not in out + err


async def test_cli_exits_1_when_alerts_are_only_logged(tmp_path: Path) -> None:
    code, out, err = await run_cli(tmp_path, {"DATA_DIR": str(tmp_path / "data")}, "alerts", "--json")
    assert code == 1, out + err
    report = json.loads(out)
    assert report["overall"] == "degraded" and report["checks"]["alerts"]["status"] == "degraded"


async def test_cli_exits_2_when_the_database_is_unreachable(tmp_path: Path) -> None:
    url = f"postgresql://bot:s3cretPassw0rd@127.0.0.1:{closed_port()}/app"
    code, out, err = await run_cli(tmp_path, {"DATABASE_URL": url, "DATA_DIR": str(tmp_path / "data")}, "database", "--json")
    assert code == 2, out + err
    report = json.loads(out)
    assert report["checks"]["database"]["status"] == "error"
    assert "s3cretPassw0rd" not in out + err


async def test_cli_exit_code_matches_the_resource_verdict_it_prints(tmp_path: Path) -> None:
    code, out, err = await run_cli(tmp_path, {"DATA_DIR": str(tmp_path / "data")}, "resources", "--json")
    report = json.loads(out)
    assert code == HealthStatus(report["overall"]).exit_code, out + err
    assert set(report["checks"]["resources"]["data"]) >= {"cpu_percent", "memory_percent", "disk_percent"}


async def test_cli_exits_2_with_one_line_for_a_bad_setting_or_an_unknown_check(tmp_path: Path) -> None:
    code, out, err = await run_cli(tmp_path, {"RESOURCE_WARN_PERCENT": "lots"}, "resources")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["CONFIG ERROR: RESOURCE_WARN_PERCENT must be a percentage above 0 and at most 100, got 'lots'"]
    code, out, err = await run_cli(tmp_path, {}, "dns")
    assert code == 2 and "unknown check 'dns'" in err


# --- the resources verdict over a moving window ---------------------------------------------------


class ScriptedSampler:
    """A sampler whose CPU figure the test sets; memory and disk stay low."""

    def __init__(self) -> None:
        self.cpu = 10.0

    def __call__(self, path: Path) -> ResourceSample:
        return ResourceSample(cpu_percent=self.cpu, memory_percent=30.0, disk_percent=40.0, disk_path=str(path))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def run_for(monitor: ResourceMonitor, clock: Clock, seconds: float, step: float = 1.0) -> list[str]:
    """Sample once per ``step`` of the test's clock for ``seconds``; the verdicts seen."""
    verdicts = []
    for _ in range(int(seconds / step)):
        clock.now += step
        verdicts.append((await monitor.sample())["status"])
    return verdicts


async def test_a_five_second_cpu_spike_changes_no_verdict_and_raises_no_alert(tmp_path: Path) -> None:
    sampler, clock, alerts = ScriptedSampler(), Clock(), RecordingAlerts()
    monitor = ResourceMonitor(data_dir=tmp_path, thresholds=ResourceThresholds(70, 90), window=60, sampler=sampler, clock=clock, alerts=alerts)
    assert set(await run_for(monitor, clock, 60)) == {"healthy"}
    sampler.cpu = 100.0
    during = await run_for(monitor, clock, 5)
    sampler.cpu = 10.0
    after = await run_for(monitor, clock, 60)
    assert set(during + after) == {"healthy"}
    assert alerts.alerts == [] and alerts.resolved == []
    spike = monitor.status()
    assert spike["cpu_now_percent"] == 10.0 and "over 60s" in spike["detail"]


async def test_sustained_cpu_turns_the_verdict_critical_with_one_alert_and_one_resolved(tmp_path: Path) -> None:
    sampler, clock, alerts = ScriptedSampler(), Clock(), RecordingAlerts()
    monitor = ResourceMonitor(data_dir=tmp_path, thresholds=ResourceThresholds(70, 90), window=60, sampler=sampler, clock=clock, alerts=alerts)
    await run_for(monitor, clock, 60)
    sampler.cpu = 100.0
    high = await run_for(monitor, clock, 120)
    assert high[0] == "healthy" and high[-1] == "error"
    sampler.cpu = 10.0
    low = await run_for(monitor, clock, 120)
    assert low[-1] == "healthy"
    assert [(a[0], a[2]) for a in alerts.alerts] == [(AlertType.RESOURCES_CRITICAL, "bot:resources")]
    assert alerts.resolved == [(AlertType.RESOURCES_CRITICAL, "bot:resources")]


async def test_a_zero_window_judges_the_latest_sample_alone(tmp_path: Path) -> None:
    sampler, clock = ScriptedSampler(), Clock()
    monitor = ResourceMonitor(data_dir=tmp_path, thresholds=ResourceThresholds(70, 90), window=0, sampler=sampler, clock=clock)
    await run_for(monitor, clock, 10)
    sampler.cpu = 95.0
    assert await run_for(monitor, clock, 1) == ["error"]


async def test_right_after_the_start_one_high_sample_is_not_yet_critical(tmp_path: Path) -> None:
    sampler, clock, alerts = ScriptedSampler(), Clock(), RecordingAlerts()
    sampler.cpu = 100.0
    monitor = ResourceMonitor(data_dir=tmp_path, thresholds=ResourceThresholds(70, 90), window=60, sampler=sampler, clock=clock, alerts=alerts)
    first = await monitor.sample()
    assert first["status"] == "degraded" and "measured for 0s of the 60s window" in first["detail"]
    assert alerts.alerts == []
