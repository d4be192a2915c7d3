"""The chaos suite's quick form, as part of the test suite.

Runs ``bench/chaos.py --quick --json`` as a subprocess (real worker.py
processes, an embedded PostgreSQL behind a cuttable proxy, the Telegram
sandbox) and asserts the correctness figures of its last line. Speed is not
asserted: the run's durations are printed for people, not checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

#: The whole quick run (about a minute on 2 cores); past this the subprocess is killed.
RUN_DEADLINE = 150.0


@pytest.mark.timeout(RUN_DEADLINE + 30)
async def test_quick_chaos_run_delivers_every_message_exactly_once_in_order_and_leaves_nothing_queued() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "bench/chaos.py",
        "--quick",
        "--json",
        cwd=ROOT,
        env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_DEADLINE)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"the quick chaos run did not finish within {RUN_DEADLINE:.0f}s\n{err.decode(errors='replace')[-4000:]}")
    text = out.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, f"no output (exit {proc.returncode})\n{err.decode(errors='replace')[-4000:]}"
    result = json.loads(lines[-1])
    summary = "\n".join(lines[:-1]) + "\n" + err.decode(errors="replace")[-3000:]

    assert result["enqueued"] > 0, summary
    assert result["duplicated"] == 0, summary
    assert result["lost"] == 0, summary
    assert result["left_queued"] == 0, summary
    assert result["order_violations"] == 0, summary
    assert result["unexpected_messages"] == 0, summary
    assert result["failures_without_reason"] == 0, summary
    assert result["poison_not_failed"] == 0, summary
    assert result["sent"] + result["dead"] == result["enqueued"], summary
    assert not result["unexpected_exits"], summary
    assert all(code == 0 for code in result["sigterm_exit_codes"]), summary
    assert proc.returncode == 0, summary
