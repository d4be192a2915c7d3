"""The bot runtime: the shared kit assembled once for every bot.

A bot file reads as a story on top of this::

    settings = load_or_exit(WorkerSettings)
    runtime = BotRuntime(bot="worker", settings=settings)
    async with runtime:                       # alerts, status server, signals
        runtime.add_loop("outbound", outbound.cycle, interval=1.0, wake=outbound.wake)
        runtime.add_cleanup("database", db.close)
        await runtime.run_until_stopped()     # SIGTERM: drain, clean up, exit 0

It owns the alert sink, the loop watchdog, the global heartbeat, the
graceful shutdown, the status server and the counters that ``/status``
shows, and it decides what ``/health`` means: the event loop answers, the
watchdog's monitor is checking, and no loop is ``failing``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import shared
from shared import tracing
from shared.alerts import AlertSink, AlertType, build_alert_sink
from shared.breaker import registry as breakers
from shared.cli import CliError, cli_log_level, error_line, port_error, run_cli
from shared.config import CommonSettings, load_or_exit, refuse_implicit_sandbox_or_exit
from shared.db import Database, DatabaseSettings, open_database
from shared.errors import ErrorKind, classify, describe
from shared.health import ResourceMonitor, ResourceThresholds, temp_files
from shared.heartbeat import GlobalHeartbeat, HeartbeatStore
from shared.logs import register_secret, setup_logging
from shared.metrics import GaugeRefresher
from shared.retry import exponential_delay
from shared.retry_queue import RetryQueue
from shared.shutdown import GracefulShutdown
from shared.trends import trends
from shared.watchdog import LoopWatchdog, periodic

logger = logging.getLogger(__name__)

T = TypeVar("T")

STARTUP_RETRY_MAX = 30.0
"""Cap of the pause between two attempts of a start-up step that failed for a passing reason."""

STARTUP_ALERT_AFTER = 7
"""Failed attempts of one start-up step before the operator is alerted (with 1 s doubling to 30 s: 30 to 60 s)."""


TEMP_MAX_AGE = 3600.0
"""Temporary files under DATA_DIR/tmp older than this (seconds) are a killed process's leftovers:
a download or attachment in use lives at most TIMEOUT_TELEGRAM_MEDIA."""


def sweep_temp_files(data_dir: Path, *, older_than: float = TEMP_MAX_AGE) -> tuple[int, int]:
    """Remove files under ``DATA_DIR/tmp`` not modified for ``older_than`` seconds (blocking); (files, bytes) removed."""
    cutoff = time.time() - older_than
    files = size = 0
    for path, info in temp_files(data_dir):
        if info.st_mtime < cutoff:
            try:
                path.unlink()
            except OSError:  # gone meanwhile, or not ours to remove: the health check still shows it
                continue
            files += 1
            size += info.st_size
    return files, size


class StartupFailed(Exception):
    """A start-up step failed for a reason waiting cannot fix; ``str()`` is the one line to show.

    ``exit_code`` is the process's: 1 by default, 2 for a configuration the
    operator must change (a restart cannot help, so a supervisor should not
    spend its restarts on it).
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StartupAborted(Exception):
    """The process was asked to stop while it was still waiting for a start-up step."""


def run_bot(main: Coroutine[Any, Any, None]) -> int:
    """Run a bot's ``run()`` to the end; its exit code.

    0 after a stop (including one that came while still starting); 1 when a
    start-up step failed for good (logged by :class:`BotRuntime` as one line,
    and alerted) or an unexpected error ended the bot (logged by it with the
    traceback): either way it is already said, so nothing more is printed.
    2 when start-up found a configuration error (``StartupFailed(exit_code=2)``).
    """
    try:
        asyncio.run(main)
    except StartupAborted:
        return 0
    except CliError as exc:  # raised before logging could say it (a port in use): one line on stderr
        sys.stderr.write(error_line(exc) + "\n")
        return exc.code
    except StartupFailed as exc:
        return exc.exit_code
    except Exception:
        return 1
    return 0


Command = Callable[[Any, argparse.Namespace], Coroutine[Any, Any, int]]
"""One of a bot's commands: ``(settings, arguments) -> exit code``."""


def bot_main(
    argv: Sequence[str] | None,
    *,
    parse_args: Callable[[list[str]], argparse.Namespace],
    settings_type: type[CommonSettings],
    serve: Callable[[Any], Coroutine[Any, Any, None]],
    commands: Mapping[str, Command],
    after_logging: Callable[[str], None] | None = None,
) -> int:
    """The one ``main()`` of the three bots: arguments, settings, logging, then the command or the bot.

    ``serve(settings)`` is the bot itself (command ``run``, the default); it
    refuses to start on a configured database without Telegram credentials
    unless ``SANDBOX=1``. Any other command runs ``commands[name](settings,
    args)``: its answer goes to stdout and its logs to stderr, warnings only
    unless ``-v``. ``after_logging(command)`` is a bot's own set-up that needs
    logging (tracing, quieter library loggers). Errors end as one line
    (:func:`shared.cli.run_cli`), never a traceback.
    """

    def entry(arguments: list[str]) -> int:
        args = parse_args(arguments)
        settings = load_or_exit(settings_type)
        command = getattr(args, "command", None) or "run"
        running = command == "run"
        if running:
            refuse_implicit_sandbox_or_exit(settings, "TELEGRAM_API_ID")
        configure_logging(settings, stream=sys.stdout if running else sys.stderr, quiet=not running)
        if after_logging is not None:
            after_logging(command)
        if running:
            return run_bot(serve(settings))
        return asyncio.run(commands[command](settings, args))

    return run_cli(entry, argv)


def code_version() -> str:
    """The package version, with the deployed commit when Railway provides it."""
    sha = os.environ.get("RAILWAY_GIT_COMMIT_SHA", "")[:7]
    return f"{shared.__version__}+{sha}" if sha else shared.__version__


def configure_logging(settings: CommonSettings, *, stream: Any = None, quiet: bool = False) -> None:
    """Logging per LOG_LEVEL / LOG_FORMAT, with every configured secret redacted.

    ``quiet``: a one-shot command, whose answer is its output: warnings and
    errors only, unless ``-v`` (or LOG_LEVEL=DEBUG).
    """
    level = cli_log_level(settings.log_level) if quiet else settings.log_level
    setup_logging(level=level, fmt=settings.log_format, stream=stream)
    for secret in settings.secrets():
        register_secret(secret)


@dataclass
class Stats:
    """Counters every bot reports in /status."""

    processed: int = 0
    failed: int = 0
    retried: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    last_error_at: float | None = None

    def error(self, where: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else describe(exc)
        self.last_error = f"{where}: {text}"
        self.last_error_at = time.time()

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "failed": self.failed,
            "retried": self.retried,
            "skipped": dict(self.skipped),
        }


class BotRuntime:
    """Everything a bot process needs besides its own logic.

    Args:
        bot: "worker", "ingest" or "bot"; names the process in alerts and /status.
        settings: the bot's settings (any subclass of CommonSettings).
        alerts: an alert sink; built from ALERT_* settings when omitted.
        version: shown in /status and the heartbeat.
        host: interface of the status server.
        startup_retry_base: first pause of :meth:`until_started` (tests make it short).
    """

    def __init__(
        self,
        *,
        bot: str,
        settings: CommonSettings,
        alerts: AlertSink | None = None,
        version: str | None = None,
        host: str = "0.0.0.0",
        startup_retry_base: float = 1.0,
    ) -> None:
        from shared.status_server import StatusServer  # aiohttp's web server: a running bot's, not a command's

        self.bot = bot
        self.startup_retry_base = startup_retry_base
        self.settings = settings
        self.version = version or code_version()
        self.alerts = alerts if alerts is not None else build_alert_sink(settings, bot)
        self.stats = Stats()
        self.sandbox = False
        self.backend: str | None = None
        self.watchdog = LoopWatchdog(
            max_silence=settings.watchdog_max_silence,
            check_interval=settings.watchdog_check_interval,
            startup_grace=settings.watchdog_startup_grace,
            storm_restarts=settings.watchdog_storm_restarts,
            storm_window=settings.watchdog_storm_window,
            alerts=self.alerts,
        )
        self.shutdown = GracefulShutdown(grace=settings.shutdown_grace)
        self.heartbeat: GlobalHeartbeat | None = None
        self.gauges = GaugeRefresher()
        self.resources = ResourceMonitor(
            data_dir=settings.data_dir,
            thresholds=ResourceThresholds.resolve(settings),
            window=getattr(settings, "resource_average_window", 60.0),
            alerts=self.alerts,
            bot=bot,
        )
        self.queues: dict[str, RetryQueue] = {}
        self._sections: dict[str, Callable[[], Any]] = {"resources": self._resources}
        self._ready_checks: dict[str, Callable[[], Awaitable[Any]]] = {}
        self._detailed: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self.status_server = StatusServer(
            bot=bot,
            version=self.version,
            port=settings.port,
            host=host,
            token=settings.status_token,
            status=self.status,
            liveness=self.liveness,
            readiness=self.readiness,
            detailed_health=self._detailed_health,
        )
        self._started = False
        self._starting: dict[str, Any] | None = None

    # --- wiring ---------------------------------------------------------------

    def add_loop(
        self,
        name: str,
        cycle: Callable[[], Awaitable[float | None]],
        *,
        interval: float,
        wake: asyncio.Event | None = None,
        max_silence: float | None = None,
    ) -> None:
        """Run ``cycle`` forever under the watchdog, each cycle bounded by TIMEOUT_LOOP_CYCLE."""
        factory = periodic(
            self.watchdog, name, cycle, interval=interval, cycle_timeout=self.settings.timeout_loop_cycle, wake=wake
        )
        # A cycle that makes progress for longer than WATCHDOG_MAX_SILENCE must
        # ping as it goes (``runtime.watchdog.ping(name)``); silence means stuck.
        self.watchdog.register(name, factory, max_silence=max_silence)

    def add_task_loop(self, name: str, factory: Callable[[], Awaitable[None]], *, max_silence: float | None = None) -> None:
        """Watch a hand-written loop that pings ``runtime.watchdog`` itself."""
        self.watchdog.register(name, factory, max_silence=max_silence)

    def add_queue(self, queue: RetryQueue) -> None:
        self.queues[queue.name] = queue

    def add_section(self, name: str, provider: Callable[[], Any]) -> None:
        """Add a section to /status (accounts, channels, history jobs ...)."""
        self._sections[name] = provider

    def add_ready_check(self, name: str, check: Callable[[], Awaitable[Any]]) -> None:
        """A dependency that /ready probes (it raises when unreachable)."""
        self._ready_checks[name] = check

    def set_detailed_health(self, provider: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._detailed = provider

    def add_cleanup(self, name: str, fn: Callable[[], Awaitable[object]], *, timeout: float = 5.0) -> None:
        self.shutdown.add_cleanup(name, fn, timeout=timeout)

    def start_heartbeat(
        self,
        *,
        worker_id: str,
        store: HeartbeatStore,
        interval: float | None = None,
        fleet: Callable[[], dict[str, Any]] | None = None,
        remove_on_stop: bool = False,
    ) -> GlobalHeartbeat:
        """Start the global heartbeat (HEARTBEAT_INTERVAL unless ``interval``); see :class:`GlobalHeartbeat`."""
        self.heartbeat = GlobalHeartbeat(
            worker_id=worker_id,
            store=store,
            version=self.version,
            status=lambda: "online" if self.watchdog.is_healthy() else "degraded",
            loops=self.watchdog.get_status,
            interval=interval or self.settings.heartbeat_interval,
            timeout=self.settings.timeout_db,
            fleet=fleet,
            remove_on_stop=remove_on_stop,
        )
        self.heartbeat.start()
        return self.heartbeat

    # --- health and status ----------------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        summary = self.watchdog.summary() if self._started else {"healthy": True, "starting": True}
        return bool(summary.get("healthy", True)), summary

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when start-up is over and every dependency check answers; never while waiting for one."""
        if self._starting is not None:
            return False, {"starting": self._starting}
        if not self._started:
            return False, {"starting": "the bot is still starting"}
        results: dict[str, Any] = {}
        ok = True
        for name, check in list(self._ready_checks.items()):
            try:
                await asyncio.wait_for(check(), 5)
                results[name] = "ok"
            except Exception as exc:
                ok = False
                results[name] = describe(exc) if not isinstance(exc, TimeoutError) else "timed out"
        return ok, results

    async def _resources(self) -> dict[str, Any]:
        if not self.resources.samples_taken:
            return await self.resources.sample()
        return self.resources.status()

    async def _detailed_health(self) -> dict[str, Any]:
        """The bot's own checks, else its readiness checks, in the one shape of :func:`shared.health.report_of`."""
        from shared.health import report_of

        if self._detailed is not None:
            return await self._detailed()
        if self._starting is not None:
            return report_of({"start-up": {"status": "error", "detail": f"waiting for {self._starting['waiting_for']}"}})
        components: dict[str, dict[str, Any]] = {}
        for name, check in list(self._ready_checks.items()):
            started = time.monotonic()
            try:
                await asyncio.wait_for(check(), 5)
                components[name] = {"status": "healthy", "detail": "ok"}
            except Exception as exc:
                detail = "no answer within 5s" if isinstance(exc, TimeoutError) else describe(exc)
                components[name] = {"status": "error", "detail": detail}
            components[name]["seconds"] = time.monotonic() - started
        return report_of(components)

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "sandbox": self.sandbox,
            "backend": self.backend,
            "stopping": self.shutdown.stopping,
            "starting": self._starting,
            "counters": self.stats.as_dict(),
            "last_error": {"message": self.stats.last_error, "at": self.stats.last_error_at},
            "watchdog": self.watchdog.summary(),
            "loops": self.watchdog.get_status(),
            "breakers": breakers.status(),
            "queues": {name: queue.get_status() for name, queue in self.queues.items()},
            "trends": trends.as_dict(),
        }
        if self.heartbeat is not None:
            data["heartbeat"] = self.heartbeat.get_status()
        status_of_alerts = getattr(self.alerts, "get_status", None)
        if callable(status_of_alerts):
            data["alerts"] = status_of_alerts()
        for name, provider in list(self._sections.items()):
            try:
                value = provider()
                data[name] = await value if asyncio.iscoroutine(value) else value
            except Exception as exc:
                data[name] = {"error": describe(exc)}
        return data

    # --- start-up ---------------------------------------------------------------

    async def until_started(self, what: str, step: Callable[[], Awaitable[T]], *, fix: str) -> T:
        """Run a start-up step (open the database, log in ...) until it succeeds.

        A deploy often starts while a dependency is briefly away (a database
        restart, a Supabase maintenance window). Exiting would spend one of
        Railway's restarts (``restartPolicyMaxRetries``) per attempt, so a
        passing failure (transient, timeout, unknown outcome, rate limit) is
        retried here instead: one log line per attempt, a pause of
        ``startup_retry_base`` (1 s) doubling to :data:`STARTUP_RETRY_MAX`, ``/status`` showing what is
        awaited, and an ``initialization_failed`` alert after
        :data:`STARTUP_ALERT_AFTER` attempts (resolved once it succeeds). The
        status server answers meanwhile: ``/health`` is alive, ``/ready`` not.

        Args:
            what: what the step brings up ("the database"), for logs and alerts.
            step: the step; it must be safe to call again after a failure.
            fix: what the operator should check, for the alert and the last line.

        Raises:
            StartupFailed: a failure retrying cannot fix (bad credentials, a
                rejected migration, a wrong setting), after the alert.
            StartupAborted: SIGTERM/SIGINT arrived while waiting.
        """
        attempt = 0
        alerted = False
        key = f"{self.bot}:start:{what}"
        try:
            while True:
                attempt += 1
                try:
                    result = await step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    verdict = classify(exc)
                    if verdict.kind not in (ErrorKind.TRANSIENT, ErrorKind.UNKNOWN_OUTCOME, ErrorKind.RATE_LIMITED):
                        self.alerts.alert(
                            AlertType.INITIALIZATION_FAILED,
                            f"{self.bot} could not start: {what}: {verdict.reason}",
                            key=key,
                            details={"fix": getattr(exc, "fix", None) or fix},
                        )
                        # An error that knows its own fix (a database without the schema) names it.
                        own_fix = getattr(exc, "fix", None)
                        line = f"{self.bot} could not start: {what}: {verdict.reason}"
                        raise StartupFailed(
                            line if own_fix else f"{line} ({fix})", exit_code=2 if own_fix else 1
                        ) from exc
                    delay = max(verdict.retry_after or 0.0, exponential_delay(attempt, base=self.startup_retry_base, cap=STARTUP_RETRY_MAX))
                    self._starting = {"waiting_for": what, "attempts": attempt, "last_error": verdict.reason, "fix": fix}
                    logger.warning(
                        "waiting for %s (attempt %d): %s; trying again in %.0fs",
                        what,
                        attempt,
                        verdict.reason,
                        delay,
                        extra={"waiting_for": what, "attempt": attempt, "kind": verdict.kind.value},
                    )
                    if attempt == STARTUP_ALERT_AFTER:
                        alerted = True
                        self.alerts.alert(
                            AlertType.INITIALIZATION_FAILED,
                            f"{self.bot} is still waiting for {what} after {attempt} attempts: {verdict.reason}",
                            key=key,
                            details={"fix": fix},
                        )
                    if await self.shutdown.sleep(delay):
                        raise StartupAborted(f"stopped while waiting for {what}") from exc
                    continue
                if attempt > 1:
                    logger.info("%s is up after %d attempts", what, attempt)
                if alerted:
                    self.alerts.resolve(AlertType.INITIALIZATION_FAILED, key=key, message=f"{self.bot}: {what} is up")
                return result
        finally:
            self._starting = None  # however it ends, start-up is no longer waiting for this step

    async def open_database(self, settings: DatabaseSettings) -> Database:
        """The configured database, once it answers: what every bot does first.

        Opens it (:func:`shared.db.open_database`) and pings it under
        :meth:`until_started`, so a deploy that starts while the database is
        away waits for it instead of exiting; then registers it: ``backend``
        in ``/status``, a ``/ready`` check, and closing it at stop.
        """
        db: Database | None = None

        async def step() -> Database:
            nonlocal db
            if db is None:
                db = await open_database(settings)
                self.add_cleanup("database", db.close, timeout=10)
            await db.ping()
            return db

        opened = await self.until_started(
            "the database", step, fix="check DATABASE_URL or SUPABASE_URL/SUPABASE_SERVICE_ROLE_KEY and that it is reachable"
        )
        self.backend = opened.backend.value
        self.add_ready_check("database", opened.ping)
        return opened

    # --- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> BotRuntime:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, StartupFailed):
            logger.critical("%s", exc)  # one line: the cause and what to check, no traceback
        elif exc is not None and not isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, StartupAborted)):
            logger.critical("%s stopped by an unexpected error: %s", self.bot, describe(exc), exc_info=exc)
        await self.stop()

    async def start(self) -> None:
        """Start alerts, the status server and signal handling (loops start with :meth:`run_until_stopped`)."""
        starter = getattr(self.alerts, "start", None)
        if callable(starter):
            await starter()
        breakers.set_alerts(self.alerts)
        breakers.set_probe_interval(float(getattr(self.settings, "breaker_probe_interval", 2.0)))
        try:
            self.shutdown.install()
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            logger.debug("signal handlers not installed")
        try:
            await self.status_server.start()
        except OSError as exc:
            clear = port_error(exc, self.settings.port)
            if clear is None:
                raise
            raise clear from exc
        self.resources.start()
        tracing.setup(self.bot, version=self.version)
        files, size = await asyncio.to_thread(sweep_temp_files, Path(self.settings.data_dir))
        if files:
            logger.info("removed %d temporary file(s) (%d bytes) left by an earlier process", files, size)
        logger.info(
            "%s %s started; status server on port %d",
            self.bot,
            self.version,
            self.status_server.port,
            extra={"bot": self.bot, "version": self.version, "port": self.status_server.port},
        )

    async def run_until_stopped(self) -> None:
        """Start the loops and wait for SIGTERM/SIGINT (or :meth:`GracefulShutdown.request_stop`)."""
        await self.watchdog.start()
        self.gauges.start()
        self._started = True
        await self.shutdown.wait()

    async def stop(self) -> None:
        """Drain in-flight work within the grace, stop loops, run cleanups, stop serving."""
        self.shutdown.request_stop("stop")
        started = time.monotonic()
        drained = await self.shutdown.drain()
        await self.watchdog.stop(timeout=2.0)
        await self.gauges.stop()
        await self.resources.stop()
        for queue in self.queues.values():
            try:
                await queue.close()
            except Exception:
                logger.exception("could not close retry queue %s", queue.name)
        if self.heartbeat is not None:
            await self.heartbeat.stop()  # its last record says "stopped", while the store is still open
        await self.shutdown.run_cleanups()
        closer = getattr(self.alerts, "close", None)
        if callable(closer):
            await closer(timeout=2.0)
        await self.status_server.stop()
        await tracing.shutdown()
        logger.info(
            "%s stopped in %.1fs (%s)",
            self.bot,
            time.monotonic() - started,
            "drained" if drained else "grace ran out",
            extra={"bot": self.bot},
        )
