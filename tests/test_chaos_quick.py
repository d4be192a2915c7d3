"""The chaos suite's quick form, as part of the test suite.

Runs ``bench/chaos.py --quick --json`` as a subprocess (real worker.py
processes, an embedded PostgreSQL behind a cuttable proxy, the Telegram
sandbox) and asserts the correctness figures of its last line. Speed is not
asserted: the run's durations are printed for people, not checked.
"""

from __future__ import annotations

import pytest

from tests.chaos_helpers import QUICK_RUN_DEADLINE, run_quick

pytestmark = pytest.mark.slow


@pytest.mark.timeout(QUICK_RUN_DEADLINE + 30)
async def test_quick_chaos_run_delivers_every_message_exactly_once_in_order_and_leaves_nothing_queued() -> None:
    run = await run_quick("bench/chaos.py", what="the quick chaos run")
    result = run.result

    assert result["enqueued"] > 0, run.summary
    run.assert_zero(
        "duplicated",
        "lost",
        "left_queued",
        "order_violations",
        "unexpected_messages",
        "failures_without_reason",
        "poison_not_failed",
    )
    assert result["sent"] + result["dead"] == result["enqueued"], run.summary
    run.assert_processes_ended_well()
