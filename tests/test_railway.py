"""railway.toml: parsed with tomllib and checked against the code it points at."""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

import supervisor

ROOT = Path(__file__).resolve().parents[1]
RAILWAY_TOML = ROOT / "railway.toml"
STATUS_SERVER = ROOT / "shared" / "status_server.py"

SHUTDOWN_GRACE_DEFAULT = 30.0


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return tomllib.loads(RAILWAY_TOML.read_text())


@pytest.fixture(scope="module")
def deploy(config: dict[str, Any]) -> dict[str, Any]:
    return config["deploy"]


def test_build_uses_railpack(config: dict[str, Any]) -> None:
    assert config["build"]["builder"] == "RAILPACK"


def test_start_command_is_an_executable_script_that_can_run_the_supervisor(deploy: dict[str, Any]) -> None:
    words = shlex.split(deploy["startCommand"])
    script = words[1] if words[0] in ("bash", "sh") else words[0]
    path = (ROOT / script).resolve()

    assert path.is_file(), f"startCommand names {script}, which does not exist"
    assert os.access(path, os.X_OK), f"{script} is not executable"
    text = path.read_text()
    assert "SUPERVISED" in text and "supervisor.py" in text, "start.sh must start supervisor.py when SUPERVISED=1"
    assert (ROOT / "supervisor.py").is_file()


def test_healthcheck_path_is_the_one_the_supervisor_probes_and_the_status_server_serves(
    deploy: dict[str, Any],
) -> None:
    assert deploy["healthcheckPath"] == "/health"
    assert supervisor.HEALTH_PATH == deploy["healthcheckPath"]
    route = re.escape(deploy["healthcheckPath"])
    assert re.search(rf"""["']{route}["']""", STATUS_SERVER.read_text()), (
        f"shared/status_server.py has no route {deploy['healthcheckPath']!r}"
    )


def test_restart_policy_is_on_failure_with_a_retry_limit(deploy: dict[str, Any]) -> None:
    assert deploy["restartPolicyType"] == "ON_FAILURE"
    assert deploy["restartPolicyMaxRetries"] >= 1


@pytest.mark.parametrize("key", ["healthcheckTimeout", "restartPolicyMaxRetries", "drainingSeconds"])
def test_numeric_settings_are_integers_not_strings(deploy: dict[str, Any], key: str) -> None:
    value = deploy[key]

    assert isinstance(value, int) and not isinstance(value, bool), f"{key} = {value!r}"
    assert value > 0


def test_draining_outlasts_the_shutdown_grace_and_the_supervisors_kill_margin(deploy: dict[str, Any]) -> None:
    grace = supervisor.SupervisorSettings.from_env({}).shutdown_grace

    assert grace == SHUTDOWN_GRACE_DEFAULT
    assert deploy["drainingSeconds"] > grace + supervisor.KILL_MARGIN
