"""supervisor.py: real supervisor processes running tests/programs/child.py.

Every scenario starts `python supervisor.py -- python child.py ...` in its own
session, reads the merged stdout/stderr line by line with a deadline, and
kills the whole process group at teardown. Alerts go to a Bot API stand-in
served by aiohttp on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import supervisor
from shared.alerts import LogAlertSink
from tests.fixtures.bot_api import BotApiStandIn
from supervisor import (
    ChildExit,
    ConfigError,
    ExitReason,
    RestartHistory,
    SupervisorSettings,
    describe_returncode,
)

ROOT = Path(__file__).resolve().parents[1]
SUPERVISOR = ROOT / "supervisor.py"
CHILD = ROOT / "tests" / "programs" / "child.py"

EXPECT_TIMEOUT = 30.0

# Every supervisor setting, set explicitly so the developer's environment cannot leak in.
BASE_ENV = {
    "BOT": "worker",
    "MAX_RESTARTS": "2",
    "RESTART_WINDOW": "60",
    "HEALTH_FAIL_AFTER": "0",
    "HEALTH_CHECK_INTERVAL": "0.1",
    "HEALTH_STARTUP_GRACE": "30",
    "SHUTDOWN_GRACE": "5",
    "RESTART_BACKOFF_BASE": "0.05",
    "RESTART_BACKOFF_MAX": "60",
    "ALERT_BOT_TOKEN": "",
    "ALERT_CHAT_ID": "",
    "ALERT_API_BASE": "",
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "text",
    "PYTHONUNBUFFERED": "1",
}

ALERT_TOKEN = "7654321:" + "Ab" * 18
ALERT_CHAT = "-100123"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SupervisorRun:
    """A running supervisor and the lines it (and its child) printed so far."""

    proc: asyncio.subprocess.Process
    port: int
    lines: list[str] = field(default_factory=list)
    _cursor: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def _read_line(self, deadline: float) -> str | None:
        assert self.proc.stdout is not None
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout=remaining)
        if not raw:
            return None
        line = raw.decode(errors="replace").rstrip("\n")
        self.lines.append(line)
        return line

    async def expect(self, pattern: str, *, timeout: float = EXPECT_TIMEOUT) -> re.Match[str]:
        """Wait for the next line (after the last match) that matches `pattern`."""
        regex = re.compile(pattern)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            while self._cursor < len(self.lines):
                line = self.lines[self._cursor]
                self._cursor += 1
                if match := regex.search(line):
                    return match
            try:
                line = await self._read_line(deadline)
            except TimeoutError:
                pytest.fail(f"no line matching {pattern!r} within {timeout}s; output so far:\n{self.text}")
            if line is None:
                pytest.fail(f"output ended without a line matching {pattern!r}; output:\n{self.text}")

    async def finish(self, *, timeout: float = EXPECT_TIMEOUT) -> int:
        """Read the rest of the output and return the supervisor's exit code."""
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while await self._read_line(deadline) is not None:
                pass
            return await asyncio.wait_for(self.proc.wait(), timeout=max(deadline - asyncio.get_running_loop().time(), 0.1))
        except TimeoutError:
            pytest.fail(f"supervisor did not finish within {timeout}s; output so far:\n{self.text}")

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in self.lines if regex.search(line))

    def signal(self, sig: signal.Signals) -> None:
        """Signal the supervisor process only (not its child)."""
        self.proc.send_signal(sig)


Launch = Callable[..., Awaitable[SupervisorRun]]


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """Start supervisors on child.py; kill every process they left behind at teardown."""
    runs: list[SupervisorRun] = []

    async def _launch(
        plan: str, *, env: dict[str, str] | None = None, child_args: Sequence[str] = ()
    ) -> SupervisorRun:
        state = tmp_path / f"state-{len(runs)}"
        state.mkdir()
        port = free_port()
        command = [
            sys.executable,
            str(SUPERVISOR),
            "--env-file",
            str(tmp_path / "absent.env"),
            "--",
            sys.executable,
            str(CHILD),
            "--state",
            str(state),
            "--plan",
            plan,
            *child_args,
        ]
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **BASE_ENV, "PORT": str(port), **(env or {})},
            start_new_session=True,
        )
        run = SupervisorRun(proc=proc, port=port)
        runs.append(run)
        return run

    yield _launch

    for run in runs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            await asyncio.wait_for(run.proc.wait(), timeout=10)


# --------------------------------------------------------------------------- real processes


async def test_crashing_child_is_restarted_with_growing_backoff_then_supervisor_gives_up_with_exit_1(
    launch: Launch, bot_api: BotApiStandIn
) -> None:
    run = await launch(
        "crash:3",
        env={"ALERT_BOT_TOKEN": ALERT_TOKEN, "ALERT_CHAT_ID": ALERT_CHAT, "ALERT_API_BASE": bot_api.url},
    )

    await run.expect(r"child: run=1 mode=crash")
    await run.expect(r"child pid=\d+ exited with code 3")
    await run.expect(r"restart 1 of 2 within 60s: starting the child again in 0\.05s")
    await run.expect(r"child: run=2 mode=crash")
    await run.expect(r"child pid=\d+ exited with code 3")
    await run.expect(r"restart 2 of 2 within 60s: starting the child again in 0\.10s")
    await run.expect(r"child: run=3 mode=crash")
    await run.expect(r"child pid=\d+ exited with code 3")
    await run.expect(r"giving up: restart 3 within 60s would exceed MAX_RESTARTS=2; exiting 1")
    assert await run.finish() == 1
    assert run.count(r"child: run=") == 3
    assert run.count(r"child pid=\d+ exited with code 3") == 3

    texts = [m["text"] for m in bot_api.messages]
    assert sorted(text.splitlines()[0].split(": ")[-1] for text in texts) == [
        "supervisor_gave_up",
        "supervisor_restart",
        "supervisor_restart",
    ], texts
    assert all(m["token"] == ALERT_TOKEN and m["chat_id"] == ALERT_CHAT for m in bot_api.messages)
    assert all("Bot: worker (supervisor)" in text and "exited with code 3" in text for text in texts)
    assert ALERT_TOKEN not in run.text


async def test_child_whose_health_stops_answering_is_killed_and_restarted(launch: Launch) -> None:
    run = await launch(
        "hang,clean",
        env={"HEALTH_FAIL_AFTER": "1", "SHUTDOWN_GRACE": "0.5"},
        child_args=["--answers", "2"],
    )

    await run.expect(r"child: run=1 mode=hang")
    await run.expect(r"answers /health \(HTTP 200\)")
    await run.expect(r"has not answered /health for \d+\.\ds; stopping it")
    await run.expect(r"did not exit within 2\.5s; sending SIGKILL")
    await run.expect(r"was killed by signal SIGKILL after it stopped answering /health")
    await run.expect(r"restart 1 of 2 within 60s")
    await run.expect(r"child: run=2 mode=clean")
    await run.expect(r"exited with code 0")
    assert await run.finish() == 0


async def test_child_that_never_answers_is_stopped_after_startup_grace_and_restarted_although_it_exits_0(
    launch: Launch,
) -> None:
    run = await launch(
        "quiet,clean",
        env={"HEALTH_FAIL_AFTER": "0.5", "HEALTH_STARTUP_GRACE": "2"},
    )

    await run.expect(r"child: run=1 mode=quiet")
    await run.expect(r"has not answered /health for")
    await run.expect(r"child: got SIGTERM, draining")
    await run.expect(r"exited with code 0 after it stopped answering /health")
    await run.expect(r"restart 1 of 2")
    await run.expect(r"child: run=2 mode=clean")
    assert await run.finish() == 0
    assert "sending SIGKILL" not in run.text


async def test_child_that_stops_on_a_bad_setting_is_not_restarted_and_the_supervisor_exits_2(
    launch: Launch, bot_api: BotApiStandIn
) -> None:
    run = await launch(
        "crash:2",
        env={"ALERT_BOT_TOKEN": ALERT_TOKEN, "ALERT_CHAT_ID": ALERT_CHAT, "ALERT_API_BASE": bot_api.url},
    )

    await run.expect(r"child pid=\d+ exited with code 2")
    await run.expect(r"the child stopped on a bad setting \(exit 2, its CONFIG ERROR line is above\); restarting cannot fix that")
    assert await run.finish() == 2
    assert run.count(r"child: run=") == 1 and run.count(r"restart \d+ of") == 0
    [alert] = [m["text"] for m in bot_api.messages]
    assert "supervisor_gave_up" in alert and "a bad setting" in alert


async def test_cleanly_exiting_child_ends_supervisor_with_exit_0_without_restart(launch: Launch) -> None:
    run = await launch("clean")

    await run.expect(r"child: run=1 mode=clean")
    await run.expect(r"child pid=\d+ exited with code 0")
    await run.expect(r"child finished cleanly; nothing to restart")
    await run.expect(r"supervisor exiting with code 0")
    assert await run.finish() == 0
    assert run.count(r"restart \d+ of") == 0
    assert run.count(r"child: run=") == 1


@pytest.mark.parametrize(
    ("sig", "term_exit", "expected_code"),
    [
        (signal.SIGTERM, 0, 0),
        (signal.SIGINT, 0, 0),
        (signal.SIGTERM, 7, 7),
    ],
    ids=["sigterm", "sigint", "sigterm-child-exits-7"],
)
async def test_stop_signal_reaches_child_which_drains_and_supervisor_exits_with_its_code(
    launch: Launch, sig: signal.Signals, term_exit: int, expected_code: int
) -> None:
    run = await launch("serve", env={"HEALTH_FAIL_AFTER": "30"}, child_args=["--term-exit", str(term_exit)])
    await run.expect(r"answers /health \(HTTP 200\)")

    run.signal(sig)

    await run.expect(rf"received {sig.name}; forwarding it to child pid=\d+")
    await run.expect(rf"child: got {sig.name}, draining")
    await run.expect(rf"child: drained, exiting with {term_exit}")
    await run.expect(rf"child pid=\d+ exited with code {term_exit}")
    assert await run.finish() == expected_code
    assert run.count(r"restart \d+ of") == 0
    assert "sending SIGKILL" not in run.text


async def test_stop_signal_during_backoff_ends_supervisor_with_0_without_another_start(launch: Launch) -> None:
    run = await launch("crash:9", env={"RESTART_BACKOFF_BASE": "30"})
    await run.expect(r"exited with code 9")
    await run.expect(r"restart 1 of 2 within 60s: starting the child again in 30\.00s")

    run.signal(signal.SIGTERM)

    await run.expect(r"received SIGTERM; no child running")
    await run.expect(r"stop requested during the backoff")
    assert await run.finish() == 0
    assert run.count(r"child: run=") == 1


async def test_command_that_cannot_start_counts_as_a_failure_and_ends_in_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-program"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SUPERVISOR),
        "--env-file",
        str(tmp_path / "absent.env"),
        "--",
        str(missing),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **BASE_ENV, "MAX_RESTARTS": "1", "RESTART_BACKOFF_BASE": "0.01"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=EXPECT_TIMEOUT)
    text = out.decode()

    assert proc.returncode == 1, text
    assert text.count("ERROR supervisor: child could not be started (FileNotFoundError") == 2, text
    assert "restart 1 of 1" in text and "giving up: restart 2" in text


async def test_bad_setting_is_reported_in_one_line_naming_the_variable_and_exits_2(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SUPERVISOR),
        "--env-file",
        str(tmp_path / "absent.env"),
        "--",
        sys.executable,
        "-c",
        "raise SystemExit(0)",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, **BASE_ENV, "MAX_RESTARTS": "abc"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=EXPECT_TIMEOUT)

    assert proc.returncode == 2
    assert out == b""
    assert err.decode().splitlines() == ["CONFIG ERROR: MAX_RESTARTS must be a whole number >= 0, got 'abc'"]


async def test_dotenv_file_supplies_settings_the_environment_does_not(tmp_path: Path) -> None:
    env_file = tmp_path / "test.env"
    env_file.write_text("HEALTH_CHECK_INTERVAL=0\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SUPERVISOR),
        "--env-file",
        str(env_file),
        "--",
        sys.executable,
        "-c",
        "raise SystemExit(0)",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={k: v for k, v in {**os.environ, **BASE_ENV}.items() if k != "HEALTH_CHECK_INTERVAL"},
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=EXPECT_TIMEOUT)

    assert proc.returncode == 2
    assert err.decode().strip() == "CONFIG ERROR: HEALTH_CHECK_INTERVAL must be a number of seconds > 0, got '0'"


# --------------------------------------------------------------------------- pure parts


def test_settings_defaults_are_the_documented_ones() -> None:
    settings = SupervisorSettings.from_env({})

    assert (settings.bot, settings.max_restarts, settings.restart_window) == ("worker", 10, 3600.0)
    assert (settings.health_fail_after, settings.health_check_interval, settings.health_startup_grace) == (60.0, 5.0, 60.0)
    assert (settings.port, settings.shutdown_grace) == (8080, 30.0)
    assert (settings.restart_backoff_base, settings.restart_backoff_max) == (1.0, 60.0)
    assert settings.health_enabled and not settings.alerts_enabled


def test_empty_variables_count_as_unset_and_zero_fail_after_disables_the_probe() -> None:
    settings = SupervisorSettings.from_env({"MAX_RESTARTS": "", "PORT": " ", "HEALTH_FAIL_AFTER": "0", "BOT": "Ingest"})

    assert settings.max_restarts == 10 and settings.port == 8081, "ingest's own default port: the bot it probes"
    assert settings.bot == "ingest"
    assert not settings.health_enabled


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_RESTARTS", "-1", "MAX_RESTARTS must be a whole number >= 0, got '-1'"),
        ("MAX_RESTARTS", "2.5", "MAX_RESTARTS must be a whole number >= 0, got '2.5'"),
        ("RESTART_WINDOW", "0", "RESTART_WINDOW must be a number of seconds > 0, got '0'"),
        ("HEALTH_FAIL_AFTER", "-5", "HEALTH_FAIL_AFTER must be a number of seconds >= 0, got '-5'"),
        ("HEALTH_CHECK_INTERVAL", "nan", "HEALTH_CHECK_INTERVAL must be a number of seconds > 0, got 'nan'"),
        ("SHUTDOWN_GRACE", "soon", "SHUTDOWN_GRACE must be a number of seconds >= 0, got 'soon'"),
        ("PORT", "70000", "PORT must be a port number 0-65535, got '70000'"),
        ("BOT", "bridge", "BOT must be worker, ingest or bot, got 'bridge'"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be text or json, got 'xml'"),
        ("ALERT_API_BASE", "api.telegram.org", "ALERT_API_BASE must be an http(s) URL, got 'api.telegram.org'"),
    ],
)
def test_bad_value_raises_config_error_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SupervisorSettings.from_env({name: value})

    assert str(caught.value) == message


def test_restart_history_forgets_restarts_older_than_the_window() -> None:
    now = [1000.0]
    history = RestartHistory(window=60.0, clock=lambda: now[0])

    assert history.record() == 1
    now[0] += 30
    assert history.record() == 2
    now[0] += 31  # the first restart is now 61 s old
    assert history.count() == 1
    assert history.record() == 2
    now[0] += 120
    assert history.count() == 0


def test_exit_descriptions_name_codes_and_signals() -> None:
    assert describe_returncode(0) == "exited with code 0"
    assert describe_returncode(3) == "exited with code 3"
    assert describe_returncode(-9) == "was killed by signal SIGKILL"
    assert describe_returncode(-15) == "was killed by signal SIGTERM"
    assert describe_returncode(None) == "did not report an exit status"
    hung = ChildExit(pid=1, returncode=-9, reason=ExitReason.HUNG, runtime=3.0, killed=True, detail="silent for 61.0s")
    assert hung.describe() == "was killed by signal SIGKILL after it stopped answering /health (silent for 61.0s)"


def test_kill_after_leaves_the_child_its_whole_grace_plus_a_margin() -> None:
    sup = supervisor.Supervisor(SupervisorSettings.from_env({"SHUTDOWN_GRACE": "30"}), ["true"], alerts=LogAlertSink(bot_name="worker (supervisor)"))

    assert sup.kill_after == 30.0 + supervisor.KILL_MARGIN > 30.0
