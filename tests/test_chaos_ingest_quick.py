"""The ingest chaos suite's quick form, as part of the test suite.

Runs ``bench/chaos_ingest.py --quick --json`` as a subprocess (real ingest.py
processes, an embedded PostgreSQL, moto's S3 server stopped and started
again, the Telegram sandbox) and asserts the correctness figures of its last
line. Speed is not asserted.
"""

from __future__ import annotations

import pytest

from tests.chaos_helpers import run_quick

pytestmark = pytest.mark.slow


@pytest.mark.timeout(200)
async def test_quick_ingest_chaos_run_stores_every_image_once_with_its_object_through_kills_and_an_r2_outage() -> None:
    run = await run_quick("bench/chaos_ingest.py", what="the quick ingest chaos run")
    result = run.result

    assert result["posted"] > 0, run.summary
    run.assert_zero("duplicated", "missing", "rows_without_object", "not_stored", "hostile_without_reason")
    assert result["stored"] + sum(result["failed_by_reason"].values()) == result["posted"], run.summary
    run.assert_processes_ended_well()
    assert [phase["name"] for phase in result["phases"]] == ["kill -9 mid-batch", "SIGTERM mid-batch", "R2 unreachable 2s mid-batch"]
    assert result["processes_started"] == 3, run.summary  # the first, after kill -9, after SIGTERM
    assert len(result["sigterm_exit_codes"]) == 2, run.summary  # the SIGTERM phase and the last one at the end
    assert result["waited_out_r2"] > 0, run.summary  # images were in flight while R2 refused connections
