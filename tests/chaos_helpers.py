"""Running a chaos benchmark's quick form from a test: the subprocess, its deadline and its last JSON line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: A whole quick run (15-25 s alone on 2 cores, a minute beside a busy suite); past this the subprocess is killed.
QUICK_RUN_DEADLINE = 150.0


@dataclass(frozen=True)
class QuickRun:
    """What a ``--quick --json`` run left: its JSON line, the rest for assertion messages, its exit status."""

    result: dict[str, Any]
    summary: str
    returncode: int | None

    def assert_zero(self, *keys: str) -> None:
        """Each of ``keys`` counted nothing (the message names those that did, then the run's output)."""
        counted = {key: self.result[key] for key in keys if self.result[key] != 0}
        assert not counted, f"{counted}\n{self.summary}"

    def assert_processes_ended_well(self) -> None:
        """No process died on its own, each one SIGTERM stopped exited 0, and so did the benchmark."""
        assert not self.result["unexpected_exits"], self.summary
        assert all(code == 0 for code in self.result["sigterm_exit_codes"]), self.summary
        assert self.returncode == 0, self.summary


async def run_quick(script: str, *, what: str, deadline: float = QUICK_RUN_DEADLINE) -> QuickRun:
    """Run ``python <script> --quick --json`` in the repository; fail the test if it outlives ``deadline``.

    Args:
        script: the benchmark, relative to the repository (``bench/chaos.py``).
        what: the run as named in the failure message (``the quick chaos run``).
        deadline: seconds before the subprocess is killed and the test fails.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        script,
        "--quick",
        "--json",
        cwd=ROOT,
        env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), deadline)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"{what} did not finish within {deadline:.0f}s\n{err.decode(errors='replace')[-4000:]}")
    lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
    assert lines, f"no output (exit {proc.returncode})\n{err.decode(errors='replace')[-4000:]}"
    summary = "\n".join(lines[:-1]) + "\n" + err.decode(errors="replace")[-3000:]
    return QuickRun(result=json.loads(lines[-1]), summary=summary, returncode=proc.returncode)
