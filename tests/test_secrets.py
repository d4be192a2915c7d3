"""No secret reaches the logs, an HTTP response or an operator alert; STATUS_TOKEN guards all but /health and /ready.

Real secrets are configured the way a deployment does it (settings from the
environment, ``shared.runtime.configure_logging``): a bot token, a Telethon
StringSession, a phone number, STATUS_TOKEN, a DATABASE_URL with a password,
the Telegram API hash and the session key. A real :class:`BotRuntime` then
runs with a real database, a loop that fails with secrets in its error,
status sections and checks that carry them, and an alert sink that talks to
a Bot API stand-in on 127.0.0.1. Exceptions carrying the secrets are logged
with ``logger.exception``, ``%s`` arguments, f-strings and ``extra=``. The
test reads the log stream (our handler is where redaction happens, so no
``caplog``), every response body and header of the status server, and every
request body the Bot API stand-in received.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from cryptography.fernet import Fernet
from telethon.crypto import AuthKey
from telethon.sessions import StringSession

from shared.alerts import AlertType
from shared.config import WorkerSettings, load_settings
from shared.db import PostgresDatabase
from shared.health import ResourceSample, ResourceThresholds, run_checks
from shared.errors import describe
from shared.logs import REDACTED, redact
from shared.metrics import OP_CALLS
from shared.runtime import BotRuntime, configure_logging
from tests.fixtures.postgres import fresh_breaker
from tests.fixtures.bot_api import BotApiStandIn
from tests.helpers import wait_until

logger = logging.getLogger("tests.secrets")

BOT_TOKEN = "123456789:AAH" + "k3Xq9ZpL2vB7nR4tY8wC1mJ6dF0sG5hU"  # 35 characters after the colon
PHONE = "+15551234567"
STATUS_TOKEN = "st-4f9a2c7e1b8d6035"
DB_PASSWORD = "pg-Pa55w0rd-e7c1a9"
API_HASH = "0123456789abcdef0123456789abcdef"
SESSION_KEY = Fernet.generate_key().decode()


def make_session_string() -> str:
    """A real Telethon StringSession string (DC, address, 256-byte auth key)."""
    session = StringSession()
    session.set_dc(2, "149.154.167.51", 443)
    session.auth_key = AuthKey(random.Random(20261124).randbytes(256))  # fixed: the same string every run
    return session.save()


SESSION = make_session_string()

class LoginFailed(Exception):
    """What a login flow might raise: everything it knew in its message."""


PROTECTED = ("/status", "/metrics", "/", "/health/detailed")
OPEN = ("/health", "/ready")


def fingerprints() -> dict[str, list[str]]:
    """Each secret and the parts of it that would give it away."""
    return {
        "bot token": [BOT_TOKEN, BOT_TOKEN.split(":")[1]],
        "session string": [SESSION, SESSION[40:100], SESSION[-60:]],
        "phone number": [PHONE, PHONE[1:], PHONE[2:]],
        "status token": [STATUS_TOKEN],
        "database password": [DB_PASSWORD],
        "api hash": [API_HASH],
        "session key": [SESSION_KEY],
    }


def leaks(text: str) -> list[str]:
    return sorted({name for name, parts in fingerprints().items() for part in parts if part in text})


def with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    user = user.split(":")[0] or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Where configure_logging writes in this test; the root logger is put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def log_everything_badly() -> None:
    """Every way code around here logs a secret by mistake."""
    logger.info("logging in %s with session %s", PHONE, SESSION)
    logger.warning(f"alert bot token is {BOT_TOKEN}, status token {STATUS_TOKEN}")  # noqa: G004 - the mistake under test
    logger.info("config", extra={"session": SESSION, "phone": PHONE, "settings": {"api_hash": API_HASH, "dsn_password": DB_PASSWORD}})
    try:
        try:
            raise ConnectionError(f"postgresql://postgres:{DB_PASSWORD}@db.example:5432/app refused")
        except ConnectionError as inner:
            raise LoginFailed(f"login of {PHONE} failed; session {SESSION}; bot {BOT_TOKEN}; key {SESSION_KEY}") from inner
    except LoginFailed as exc:
        logger.exception("login failed for %s", PHONE)
        logger.error("again, as extra", extra={"error": exc, "exc_args": exc.args})
        logger.warning("and as exc_info", exc_info=exc)
    try:
        {"session": SESSION}["missing"]
    except KeyError:
        logger.exception("lookup failed in %r", {"session_string": SESSION, "hash": API_HASH})


@dataclass
class Capture:
    """Everything a run of the scenario let out: response bodies and headers, alert bodies, the log stream."""

    bodies: dict[str, str]
    headers: dict[str, str]
    statuses: dict[str, int]
    alerts: list[str]
    logged: str


async def run_scenario(
    log_format: str, tmp_path: Path, database_url: str, bot_api: BotApiStandIn, log_stream: io.StringIO,
    *, after_logging: Any = None,
) -> Capture:
    """A real runtime, fed every secret in every way; returns what came out of it."""
    dsn = with_password(database_url, DB_PASSWORD)
    env = {
        "PORT": "0",
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": dsn,
        "STATUS_TOKEN": STATUS_TOKEN,
        "ALERT_BOT_TOKEN": BOT_TOKEN,
        "ALERT_CHAT_ID": "-100200300",
        "ALERT_API_BASE": bot_api.url,
        "TELEGRAM_API_ID": "12345",
        "TELEGRAM_API_HASH": API_HASH,
        "SESSION_ENCRYPTION_KEY": SESSION_KEY,
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": log_format,
        "WATCHDOG_CHECK_INTERVAL": "0.2",
        "WATCHDOG_STARTUP_GRACE": "0",
        "SHUTDOWN_GRACE": "2",
    }
    settings = load_settings(WorkerSettings, env)
    configure_logging(settings, stream=log_stream)
    if after_logging is not None:
        after_logging()

    db = await PostgresDatabase(dsn, timeout=10.0, breaker=fresh_breaker()).open()
    runtime = BotRuntime(bot="worker", settings=settings, host="127.0.0.1")
    leaky_metric = (f"telegram.login {PHONE} {BOT_TOKEN}", "error")
    OP_CALLS.labels(*leaky_metric).inc()
    loop_failed = asyncio.Event()

    async def leaky_cycle() -> float:
        loop_failed.set()
        raise LoginFailed(f"session {SESSION} of {PHONE} rejected (bot {BOT_TOKEN})")

    def leaky_section() -> dict[str, Any]:
        return {
            "account": {"phone": PHONE, "session": SESSION, "note": f"restored session {SESSION} for {PHONE}"},
            "database": {"url": dsn, "as_text": f"connected to {dsn}"},
            "alert_url": f"{bot_api.url}/bot{BOT_TOKEN}/sendMessage",
            "headers": {"Authorization": f"Bearer {STATUS_TOKEN}"},
            "config": {"telegram_api_hash": API_HASH, "session_encryption_key": SESSION_KEY, "key_in_text": f"key {SESSION_KEY}"},
        }

    def broken_section() -> dict[str, Any]:
        raise LoginFailed(f"section failed with {SESSION} for {PHONE} and {DB_PASSWORD}")

    async def replica_check() -> None:
        raise ConnectionError(f"cannot reach postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{closed_port()}/replica as {PHONE}")

    def sample(path: Path) -> ResourceSample:
        return ResourceSample(10.0, 20.0, 30.0, str(path))

    runtime.add_loop("leaky", leaky_cycle, interval=0.05)
    runtime.add_section("leaky", leaky_section)
    runtime.add_section("broken", broken_section)
    runtime.add_ready_check("database", db.ping)
    runtime.add_ready_check("replica", replica_check)
    runtime.set_detailed_health(
        lambda: run_checks(
            settings, ["database", "alerts", "resources"], database=db, timeout=4,
            sampler=sample, thresholds=ResourceThresholds(),
        )
    )
    runtime.add_cleanup("database", db.close)
    bodies: dict[str, str] = {}
    headers: dict[str, str] = {}
    statuses: dict[str, int] = {}
    try:
        await runtime.start()
        runner = asyncio.create_task(runtime.run_until_stopped())
        await asyncio.wait_for(loop_failed.wait(), 10)
        await wait_until(lambda: runtime.watchdog.get_status()["leaky"]["cycle_errors"] >= 1, what="the loop's error recorded")
        runtime.stats.error("outbound", LoginFailed(f"send as {PHONE} with {SESSION} failed"))
        log_everything_badly()
        runtime.alerts.alert(
            AlertType.ACCOUNT_NEEDS_LOGIN,
            f"account {PHONE} needs a login (session {SESSION} revoked, bot {BOT_TOKEN})",
            key="secrets-test",
            details={"dsn": dsn, "api_hash": API_HASH, "phone": PHONE},
        )
        await asyncio.wait_for(bot_api.sent.wait(), 10)

        base = runtime.status_server.url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            for path in PROTECTED:
                async with http.get(f"{base}{path}") as response:
                    assert response.status == 401, f"{path} answered {response.status} without the token"
                    bodies[f"{path} (no token)"] = await response.text()
                    headers[f"{path} (no token)"] = json.dumps(dict(response.headers))
            for path in OPEN:
                async with http.get(f"{base}{path}") as response:
                    statuses[path] = response.status
                    assert response.status != 401, f"{path} must not need the token"
                    bodies[path] = await response.text()
                    headers[path] = json.dumps(dict(response.headers))
            for path in PROTECTED:
                for how, kwargs in (
                    ("bearer", {"headers": {"Authorization": f"Bearer {STATUS_TOKEN}"}}),
                    ("query", {"params": {"token": STATUS_TOKEN}}),
                ):
                    async with http.get(f"{base}{path}", **kwargs) as response:
                        assert response.status == 200, f"{path} ({how}) answered {response.status}"
                        bodies[f"{path} ({how})"] = await response.text()
                        headers[f"{path} ({how})"] = json.dumps(dict(response.headers))
        runtime.shutdown.request_stop("test over")
        await asyncio.wait_for(runner, 15)
    finally:
        await runtime.stop()
        OP_CALLS.remove(*leaky_metric)

    return Capture(bodies, headers, statuses, list(bot_api.bodies), log_stream.getvalue())


def check_responses(capture: Capture) -> None:
    assert len(capture.bodies) == len(PROTECTED) * 3 + len(OPEN)
    for name, body in capture.bodies.items():
        assert leaks(body) == [], f"{name} leaks {leaks(body)}: {body[:3000]}"
        assert leaks(capture.headers[name]) == [], f"the headers of {name} leak {leaks(capture.headers[name])}"


def check_alerts(capture: Capture) -> None:
    assert capture.alerts, "no alert went out"
    for body in capture.alerts:
        assert leaks(body) == [], f"an alert leaks {leaks(body)}: {body}"


def check_logs(capture: Capture) -> None:
    assert leaks(capture.logged) == [], f"the logs leak {leaks(capture.logged)}"


def check_description(describe_exception: Any) -> None:
    text = describe_exception(LoginFailed(f"session {SESSION} of {PHONE} rejected"))
    assert leaks(text) == [] and SESSION[1:120] not in text, f"the description leaks {leaks(text)}: {text}"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_secret_reaches_logs_responses_or_alerts_and_the_token_guards_all_but_health_and_ready(
    log_format: str, tmp_path: Path, database_url: str, bot_api: BotApiStandIn, log_stream: io.StringIO
) -> None:
    capture = await run_scenario(log_format, tmp_path, database_url, bot_api, log_stream)
    check_responses(capture)
    check_alerts(capture)
    check_logs(capture)
    bodies, statuses, logged = capture.bodies, capture.statuses, capture.logged

    # Not vacuous: the secrets were there, and came out redacted.
    status = json.loads(bodies["/status (bearer)"])
    assert status["leaky"]["account"]["session"] == REDACTED and REDACTED in status["leaky"]["account"]["note"]
    assert status["leaky"]["account"]["phone"] == "+*********67"
    assert "LoginFailed" in status["broken"]["error"] and "LoginFailed" in status["last_error"]["message"]
    assert "LoginFailed" in status["loops"]["leaky"]["last_error"]
    assert statuses["/health"] == 200 and statuses["/ready"] == 503, "the replica check fails, visibly"
    assert "bot_operation_calls_total" in bodies["/metrics (bearer)"] and "telegram.login" in bodies["/metrics (bearer)"]
    detailed = json.loads(bodies["/health/detailed (bearer)"])
    assert detailed["overall"] == "healthy" and detailed["checks"]["alerts"]["detail"] == "alert bot @ops_alert_bot reachable"
    assert any("needs a login" in body for body in capture.alerts), "the alert went out"
    for marker in ("login failed for", "again, as extra", "and as exc_info", "lookup failed in", "LoginFailed", "ConnectionError"):
        assert marker in logged, f"{marker!r} was not logged"
    assert logged.count(REDACTED) >= 10


def test_an_exception_carrying_a_session_string_is_described_without_it() -> None:
    check_description(describe)


# --- the checks can fail ------------------------------------------------------
# Each leak check above is run once more against a bot whose redaction has been
# taken out by the test (a leaking formatter, identity redactors): every check
# must then fail. A check that passes here would pass with the leak too.


def _identity(value: Any) -> Any:
    return value


def leak_everything(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Plug in the leaks: no redacting filter on the log handler, identity redactors in every consumer."""
    import shared.alerts
    import shared.errors
    import shared.health
    import shared.logs
    import shared.status_server

    for module in (shared.alerts, shared.errors, shared.health, shared.status_server):
        monkeypatch.setattr(module, "redact", _identity)
    monkeypatch.setattr(shared.status_server, "redact_obj", _identity)
    monkeypatch.setattr(shared.logs, "redact_obj", _identity)

    def unfilter_the_handlers() -> None:
        for handler in logging.getLogger().handlers:
            for flt in list(handler.filters):
                if isinstance(flt, shared.logs.RedactingFilter):
                    handler.removeFilter(flt)

    return unfilter_the_handlers


async def test_every_leak_check_fails_when_redaction_is_taken_out(
    tmp_path: Path, database_url: str, bot_api: BotApiStandIn, log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    unfilter = leak_everything(monkeypatch)
    capture = await run_scenario("json", tmp_path, database_url, bot_api, log_stream, after_logging=unfilter)
    for check in (check_responses, check_alerts, check_logs):
        with pytest.raises(AssertionError, match="leak"):
            check(capture)


def test_the_description_check_fails_when_a_message_is_cut_before_it_is_redacted() -> None:
    def cut_then_redact(exc: BaseException) -> str:
        return redact(f"{type(exc).__name__}: {str(exc)[:299]}…")

    with pytest.raises(AssertionError, match="leak"):
        check_description(cut_then_redact)
