"""The ingest chaos suite's quick form, as part of the test suite.

Runs ``bench/chaos_ingest.py --quick --json`` as a subprocess (real ingest.py
processes, an embedded PostgreSQL, moto's S3 server stopped and started
again, the Telegram sandbox) and asserts the correctness figures of its last
line. Speed is not asserted.
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


@pytest.mark.timeout(200)
async def test_quick_ingest_chaos_run_stores_every_image_once_with_its_object_through_kills_and_an_r2_outage() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "bench/chaos_ingest.py",
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
        pytest.fail(f"the quick ingest chaos run did not finish within {RUN_DEADLINE:.0f}s\n{err.decode(errors='replace')[-4000:]}")
    lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
    assert lines, f"no output (exit {proc.returncode})\n{err.decode(errors='replace')[-4000:]}"
    result = json.loads(lines[-1])
    summary = "\n".join(lines[:-1]) + "\n" + err.decode(errors="replace")[-3000:]

    assert result["posted"] > 0, summary
    assert result["duplicated"] == 0, summary
    assert result["missing"] == 0, summary
    assert result["rows_without_object"] == 0, summary
    assert result["not_stored"] == 0, summary
    assert result["hostile_without_reason"] == 0, summary
    assert result["stored"] + sum(result["failed_by_reason"].values()) == result["posted"], summary
    assert not result["unexpected_exits"], summary
    assert all(code == 0 for code in result["sigterm_exit_codes"]), summary
    assert proc.returncode == 0, summary
