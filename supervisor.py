"""Keeps one bot process alive: restarts it when it crashes or hangs, gives up loudly.

Run it as ``python supervisor.py`` (``SUPERVISED=1 ./start.sh`` does exactly
that); it starts ``python $BOT.py`` as a child and then:

* a child that exits with 0 ends the supervisor with 0 (nothing to restart);
* a child that exits with 2, a bad setting (its ``CONFIG ERROR`` line says
  which), ends the supervisor with 2 and one alert: a restart cannot fix it;
* a child that exits non-zero, is killed by a signal, or whose ``/health``
  (on ``http://127.0.0.1:$PORT``) has not answered for HEALTH_FAIL_AFTER
  seconds is stopped (SIGTERM, then SIGKILL after the grace) and started
  again after an exponential backoff (RESTART_BACKOFF_BASE doubling up to
  RESTART_BACKOFF_MAX);
* more than MAX_RESTARTS restarts within RESTART_WINDOW seconds ends the
  supervisor with exit 1, so the platform's restart policy (Railway's
  ON_FAILURE) takes over;
* SIGTERM and SIGINT are forwarded to the child; the supervisor waits up to
  SHUTDOWN_GRACE (+ a small margin) for it, then SIGKILLs it, and exits with
  0 (or the child's own non-zero exit code);
* every exit code or signal is logged; a restart and giving up are also sent
  as Telegram alerts when ALERT_BOT_TOKEN and ALERT_CHAT_ID are set.

The supervisor runs before the bot and must keep working when the bot's code
is broken, so it imports only the standard library, aiohttp, python-dotenv,
``shared/logs.py`` and ``shared/alerts.py`` (never the bot or the database
layers). Its settings are parsed here, with the same one-line error style as
``shared/config.py``.

Tests and operators can supervise any command: ``python supervisor.py --
<command...>``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from shared.alerts import AlertType, build_alert_sink
from shared.cli import ArgumentParser, run_cli
from shared.config import ConfigError, load_settings
from shared.logs import setup_logging
from shared.retry import exponential_delay

# Run as a script, __name__ is "__main__"; name the logger after the module anyway.
logger = logging.getLogger("supervisor" if __name__ == "__main__" else __name__)

ROOT = Path(__file__).resolve().parent

HEALTH_PATH = "/health"
"""Path probed on the child's status server (also Railway's healthcheckPath)."""

CONFIG_ERROR_EXIT = 2
"""The bots' exit code for a bad setting (``shared.config.load_or_exit``): never restarted."""

BOTS: tuple[str, ...] = ("worker", "ingest", "bot")

KILL_MARGIN = 2.0
"""Seconds the supervisor waits beyond SHUTDOWN_GRACE before SIGKILL.

The child bounds its own drain by SHUTDOWN_GRACE; the margin lets it finish
its last steps (releasing the account lease) instead of racing the kill.
"""

REAP_TIMEOUT = 10.0
"""Seconds to wait for the kernel to report a SIGKILLed child's exit."""

PROBE_TIMEOUT_MAX = 5.0
"""Upper bound of one /health request; it is also never longer than HEALTH_FAIL_AFTER."""

ALERT_FLUSH_TIMEOUT = 10.0
"""Seconds queued alerts get to go out when the supervisor exits."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SupervisorSettings:
    """What the supervisor reads; each field is declared once in ``shared.config.SETTINGS``."""

    bot: str
    max_restarts: int
    restart_window: float
    health_fail_after: float
    health_check_interval: float
    health_startup_grace: float
    port: int
    shutdown_grace: float
    restart_backoff_base: float
    restart_backoff_max: float
    alert_bot_token: str | None
    alert_chat_id: str | None
    alert_api_base: str
    alert_dedupe_window: float
    log_level: str
    log_format: str

    @property
    def health_enabled(self) -> bool:
        """Whether the child's /health is probed at all (HEALTH_FAIL_AFTER > 0)."""
        return self.health_fail_after > 0 and self.port > 0

    @property
    def alerts_enabled(self) -> bool:
        """Whether both ALERT_BOT_TOKEN and ALERT_CHAT_ID are set."""
        return bool(self.alert_bot_token and self.alert_chat_id)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SupervisorSettings:
        """Parse the settings from an environment mapping.

        Raises:
            ConfigError: a value is malformed or out of range; the message
                names the variable and quotes the value.
        """
        return load_settings(cls, env)


def load_environment(env_file: Path | None) -> dict[str, str]:
    """Merge the process environment over an optional dotenv file.

    Args:
        env_file: The ``.env`` file to read, or None for none. A missing file
            is not an error.

    Returns:
        A new dict; real environment variables win over the file.
    """
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        from dotenv import dotenv_values  # small, pure Python; only needed here

        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ)
    return merged


# --------------------------------------------------------------------------- small pure parts


def describe_returncode(returncode: int | None) -> str:
    """Say how a process ended: "exited with code 3" or "was killed by signal SIGKILL"."""
    if returncode is None:
        return "did not report an exit status"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by signal {name}"
    return f"exited with code {returncode}"


class RestartHistory:
    """The times of recent restarts, forgetting those older than the window.

    Args:
        window: Seconds a restart is remembered (RESTART_WINDOW).
        clock: Monotonic clock, injectable for tests.
    """

    def __init__(self, *, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._times: collections.deque[float] = collections.deque()

    def record(self) -> int:
        """Note a restart now; return how many restarts the window now holds."""
        self._times.append(self._clock())
        return self.count()

    def count(self) -> int:
        """How many restarts happened within the last `window` seconds."""
        horizon = self._clock() - self._window
        while self._times and self._times[0] <= horizon:
            self._times.popleft()
        return len(self._times)


# --------------------------------------------------------------------------- alerts


class SupervisorAlerts(Protocol):
    """What the supervisor needs from an alert sink (shared.alerts.TelegramAlertSender or LogAlertSink)."""

    def alert(
        self,
        type: AlertType,  # noqa: A002 - shared.alerts' name
        message: str,
        *,
        key: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """Queue an alert; never blocks, never raises."""
        ...

    async def start(self) -> None:
        """Start sending."""
        ...

    async def close(self, *, timeout: float = 5) -> None:
        """Send what is queued within `timeout` seconds, then stop."""
        ...


# --------------------------------------------------------------------------- health probe


@dataclass(frozen=True)
class ProbeResult:
    """One /health request: whether the child answered at all, and how."""

    answered: bool
    status: int | None = None
    error: str | None = None


class HealthProbe(Protocol):
    """Asks the child whether it is alive."""

    async def start(self) -> None:
        """Open connections."""

    async def check(self) -> ProbeResult:
        """Probe once, bounded in time; never raises."""

    async def close(self) -> None:
        """Release connections."""


class HttpHealthProbe:
    """GET ``http://127.0.0.1:<port>/health`` with a short deadline, a new connection each time.

    Any HTTP response counts as "answering": the child's event loop is alive.
    Deciding that a live but unhealthy child should exit is the child's own
    watchdog's job; a non-200 status is only logged.

    Args:
        url: The URL to probe.
        timeout: Deadline of one request in seconds.
    """

    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = url
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the HTTP session (no keep-alive, so a hung child cannot hold a pooled connection)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                connector=aiohttp.TCPConnector(force_close=True),
            )

    async def check(self) -> ProbeResult:
        """Probe once; errors and timeouts become ``answered=False``."""
        if self._session is None:
            await self.start()
        assert self._session is not None
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.get(self.url, allow_redirects=False) as response:
                    await response.read()
                    return ProbeResult(answered=True, status=response.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            detail = str(exc) or "no answer"
            if isinstance(exc, TimeoutError):
                detail = f"no answer within {self._timeout:g}s"
            return ProbeResult(answered=False, error=f"{type(exc).__name__}: {detail}")

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


# --------------------------------------------------------------------------- the supervisor


class ExitReason(str, enum.Enum):
    """Why one run of the child ended."""

    EXITED = "exited"
    HUNG = "hung"
    STOPPED = "stopped"
    SPAWN_FAILED = "spawn_failed"


@dataclass(frozen=True)
class ChildExit:
    """How one run of the child ended."""

    pid: int | None
    returncode: int | None
    reason: ExitReason
    runtime: float
    killed: bool = False
    detail: str = ""

    def describe(self) -> str:
        """Human text for logs and alerts."""
        if self.reason is ExitReason.SPAWN_FAILED:
            return f"could not be started ({self.detail})"
        text = describe_returncode(self.returncode)
        if self.reason is ExitReason.HUNG:
            text += f" after it stopped answering {HEALTH_PATH} ({self.detail})"
        return text


class Supervisor:
    """Runs a command, restarts it on failure, forwards stop signals.

    Args:
        settings: Parsed SupervisorSettings.
        command: The program and its arguments.
        alerts: Where restart and give-up alerts go.
        probe: Health probe; default HttpHealthProbe on 127.0.0.1:PORT/health.
        clock: Monotonic clock for the restart window and health deadlines.
        env: Environment for the child; default the supervisor's own.
    """

    def __init__(
        self,
        settings: SupervisorSettings,
        command: Sequence[str],
        *,
        alerts: SupervisorAlerts,
        probe: HealthProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not command:
            raise ValueError("command must not be empty")
        self.settings = settings
        self.command = list(command)
        self._alerts = alerts
        self._probe = probe or HttpHealthProbe(
            f"http://127.0.0.1:{settings.port}{HEALTH_PATH}",
            timeout=min(PROBE_TIMEOUT_MAX, settings.health_fail_after or PROBE_TIMEOUT_MAX),
        )
        self._clock = clock
        self._env = dict(env) if env is not None else None
        self._history = RestartHistory(window=settings.restart_window, clock=clock)
        self._child: asyncio.subprocess.Process | None = None
        self._stop_signal: signal.Signals | None = None
        self._stop_event = asyncio.Event()

    @property
    def kill_after(self) -> float:
        """Seconds between SIGTERM and SIGKILL."""
        return self.settings.shutdown_grace + KILL_MARGIN

    async def run(self) -> int:
        """Supervise until the child exits cleanly, a stop signal arrives, or restarts run out.

        Returns:
            The process exit code: 0 after a clean exit or a stop signal
            (or the child's own non-zero code on stop), 1 after giving up.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        s = self.settings
        logger.info(
            "supervising %s (max %d restarts per %gs, backoff %gs..%gs, health %s, grace %gs)",
            shlex.join(self.command),
            s.max_restarts,
            s.restart_window,
            s.restart_backoff_base,
            s.restart_backoff_max,
            f"{HEALTH_PATH} on port {s.port} must answer within {s.health_fail_after:g}s"
            if s.health_enabled
            else "probe off",
            s.shutdown_grace,
        )
        code = 1
        try:
            await self._alerts.start()
            if s.health_enabled:
                await self._probe.start()
            code = await self._supervise()
            return code
        finally:
            await self._probe.close()
            await self._alerts.close(timeout=ALERT_FLUSH_TIMEOUT)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            logger.info("supervisor exiting with code %d", code)

    # ----------------------------------------------------------------- main loop

    async def _supervise(self) -> int:
        while True:
            result = await self._run_child_once()
            self._log_exit(result)
            if self._stop_signal is not None:
                return self._exit_code_after_stop(result)
            if result.reason is ExitReason.EXITED and result.returncode == 0:
                logger.info("child finished cleanly; nothing to restart")
                return 0
            if result.reason is ExitReason.EXITED and result.returncode == CONFIG_ERROR_EXIT:
                logger.error(
                    "the child stopped on a bad setting (exit %d, its CONFIG ERROR line is above); "
                    "restarting cannot fix that: exiting %d",
                    CONFIG_ERROR_EXIT,
                    CONFIG_ERROR_EXIT,
                )
                self._alerts.alert(
                    AlertType.SUPERVISOR_GAVE_UP,
                    f"supervisor gave up: the child {result.describe()}, a bad setting (see its CONFIG ERROR line); "
                    "fix the variable and deploy again",
                    key=f"{self.settings.bot}:config_error",
                    details=self._details(result, 0),
                )
                return CONFIG_ERROR_EXIT
            restarts = self._history.record()
            s = self.settings
            if restarts > s.max_restarts:
                logger.error(
                    "giving up: restart %d within %gs would exceed MAX_RESTARTS=%d; exiting 1",
                    restarts,
                    s.restart_window,
                    s.max_restarts,
                )
                self._alerts.alert(
                    AlertType.SUPERVISOR_GAVE_UP,
                    f"supervisor gave up: the child {result.describe()}, and restart {restarts} within "
                    f"{s.restart_window:g}s would exceed MAX_RESTARTS={s.max_restarts}; exiting 1 so the "
                    f"platform's restart policy takes over",
                    key=f"{s.bot}:gave_up",
                    details=self._details(result, restarts),
                )
                return 1
            delay = exponential_delay(restarts, base=s.restart_backoff_base, cap=s.restart_backoff_max, jitter=False)
            logger.warning(
                "restart %d of %d within %gs: starting the child again in %.2fs",
                restarts,
                s.max_restarts,
                s.restart_window,
                delay,
            )
            self._alerts.alert(
                AlertType.SUPERVISOR_RESTART,
                f"supervisor: the child {result.describe()} after {result.runtime:.1f}s; "
                f"restart {restarts} of {s.max_restarts} within {s.restart_window:g}s in {delay:g}s",
                key=f"{s.bot}:restart:{restarts}",
                details=self._details(result, restarts, delay=delay),
            )
            if await self._stop_requested_within(delay):
                logger.info("stop requested during the backoff; not starting the child again")
                return 0

    async def _stop_requested_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    def _exit_code_after_stop(self, result: ChildExit) -> int:
        if result.killed:
            return 1
        rc = result.returncode
        if rc is None or rc == 0:
            return 0
        if rc < 0:
            return 0 if -rc in (signal.SIGTERM, signal.SIGINT) else 128 - rc
        return rc

    def _log_exit(self, result: ChildExit) -> None:
        if result.reason is ExitReason.SPAWN_FAILED:
            logger.error("child %s", result.describe())
            return
        level = logging.INFO if result.returncode == 0 else logging.WARNING
        logger.log(level, "child pid=%s %s (ran %.1fs)", result.pid, result.describe(), result.runtime)

    # ----------------------------------------------------------------- one run

    async def _run_child_once(self) -> ChildExit:
        started = self._clock()
        try:
            proc = await asyncio.create_subprocess_exec(*self.command, env=self._env)
        except OSError as exc:
            return ChildExit(None, None, ExitReason.SPAWN_FAILED, 0.0, detail=f"{type(exc).__name__}: {exc}")
        self._child = proc
        logger.info("started child pid=%d: %s", proc.pid, shlex.join(self.command))
        if self._stop_signal is not None:  # a signal arrived while the child was being spawned
            self._forward(self._stop_signal)

        waiter = asyncio.create_task(proc.wait(), name="child-wait")
        stopper = asyncio.create_task(self._stop_event.wait(), name="stop-wait")
        watchers: set[asyncio.Task[object]] = {waiter, stopper}
        health: asyncio.Task[float] | None = None
        if self.settings.health_enabled:
            health = asyncio.create_task(self._watch_health(proc.pid, started), name="health-watch")
            watchers.add(health)
        try:
            done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in watchers - {waiter}:
                task.cancel()
            await asyncio.gather(*(watchers - {waiter}), return_exceptions=True)

        reason = ExitReason.EXITED
        killed = False
        detail = ""
        if waiter in done:
            if self._stop_signal is not None:
                reason = ExitReason.STOPPED
        elif health is not None and health in done and self._stop_signal is None:
            silence = health.result()
            reason = ExitReason.HUNG
            detail = f"silent for {silence:.1f}s"
            logger.error(
                "child pid=%d has not answered %s for %.1fs; stopping it", proc.pid, HEALTH_PATH, silence
            )
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            killed = await self._wait_or_kill(proc, waiter)
        else:
            reason = ExitReason.STOPPED
            killed = await self._wait_or_kill(proc, waiter)
        if not waiter.done():
            waiter.cancel()
        self._child = None
        return ChildExit(
            pid=proc.pid,
            returncode=proc.returncode,
            reason=reason,
            runtime=self._clock() - started,
            killed=killed,
            detail=detail,
        )

    async def _wait_or_kill(self, proc: asyncio.subprocess.Process, waiter: asyncio.Task[int]) -> bool:
        """Wait up to `kill_after` for the child, then SIGKILL it. Returns True if it was killed."""
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=self.kill_after)
            return False
        except TimeoutError:
            pass
        logger.error("child pid=%d did not exit within %.1fs; sending SIGKILL", proc.pid, self.kill_after)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=REAP_TIMEOUT)
        except TimeoutError:
            logger.critical("child pid=%d is still there %.0fs after SIGKILL; giving up on it", proc.pid, REAP_TIMEOUT)
        return True

    async def _watch_health(self, pid: int, started: float) -> float:
        """Probe until the child counts as hung; return how long it has been silent.

        A child that has never answered gets HEALTH_STARTUP_GRACE +
        HEALTH_FAIL_AFTER seconds from its start; once it has answered, it
        must answer again within HEALTH_FAIL_AFTER seconds.
        """
        s = self.settings
        last_ok: float | None = None
        failing = False
        last_status: int | None = None
        while True:
            result = await self._probe.check()
            now = self._clock()
            if result.answered:
                if last_ok is None or failing or result.status != last_status:
                    logger.info("child pid=%d answers %s (HTTP %s)", pid, HEALTH_PATH, result.status)
                last_ok, failing, last_status = now, False, result.status
            elif not failing:
                failing = True
                logger.log(
                    logging.INFO if last_ok is None else logging.WARNING,
                    "child pid=%d does not answer %s: %s",
                    pid,
                    HEALTH_PATH,
                    result.error,
                )
            silent_since = last_ok if last_ok is not None else started + s.health_startup_grace
            if now - silent_since >= s.health_fail_after:
                return now - (last_ok if last_ok is not None else started)
            await asyncio.sleep(s.health_check_interval)

    # ----------------------------------------------------------------- signals and alerts

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_signal is None:
            self._stop_signal = sig
        child = self._child
        if child is not None and child.returncode is None:
            logger.info(
                "received %s; forwarding it to child pid=%d (SIGKILL after %.1fs)", sig.name, child.pid, self.kill_after
            )
            self._forward(sig)
        else:
            logger.info("received %s; no child running", sig.name)
        self._stop_event.set()

    def _forward(self, sig: signal.Signals) -> None:
        child = self._child
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(sig)

    def _details(self, result: ChildExit, restarts: int, *, delay: float | None = None) -> dict[str, Any]:
        details: dict[str, Any] = {
            "command": shlex.join(self.command),
            "pid": result.pid,
            "exit": result.describe(),
            "ran_seconds": round(result.runtime, 1),
            "restarts_in_window": restarts,
            "max_restarts": self.settings.max_restarts,
            "window_seconds": self.settings.restart_window,
        }
        if delay is not None:
            details["next_start_in_seconds"] = delay
        return details


# --------------------------------------------------------------------------- command line


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = ArgumentParser(
        prog="./start.sh supervisor",
        description="Run $BOT.py (or the command after --), restarting it when it crashes or hangs.",
        epilog="Settings come from the environment and .env: BOT, MAX_RESTARTS, RESTART_WINDOW, "
        "HEALTH_FAIL_AFTER, HEALTH_CHECK_INTERVAL, HEALTH_STARTUP_GRACE, PORT, SHUTDOWN_GRACE, "
        "RESTART_BACKOFF_BASE, RESTART_BACKOFF_MAX, ALERT_BOT_TOKEN, ALERT_CHAT_ID, ALERT_API_BASE, "
        "LOG_LEVEL, LOG_FORMAT.",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=ROOT / ".env",
        help="dotenv file to read before the environment (default: .env next to supervisor.py)",
    )
    return parser.parse_args(argv), command


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code (2 for a bad setting, see shared.cli)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, command = _parse_args(argv)
    env = load_environment(args.env_file)
    try:
        settings = SupervisorSettings.from_env(env)
    except ConfigError as exc:
        sys.stderr.write(f"CONFIG ERROR: {exc}\n")
        return 2
    setup_logging(level=settings.log_level, fmt=settings.log_format)
    if not command:
        command = [sys.executable, str(ROOT / f"{settings.bot}.py")]
    # A TelegramAlertSender when ALERT_BOT_TOKEN and ALERT_CHAT_ID are set, else a log-only sink.
    alerts = build_alert_sink(settings, f"{settings.bot} (supervisor)")
    supervisor = Supervisor(settings, command, alerts=alerts)
    return asyncio.run(supervisor.run())


if __name__ == "__main__":
    sys.exit(main())
