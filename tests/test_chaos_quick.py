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

QUICK_PHASES = [
    "kill -9 #1",
    "flood waits on 10% of sends",
    "SIGTERM",
    "Telegram hanging 2s",
    "Telegram dropping connections 1s",
    "answer lost on 5% of sends",
    "PostgreSQL restart",
    "PostgreSQL unreachable 2s",
    "two replicas",
]
"""The faults of ``bench/chaos.py``'s QUICK plan, in order."""

FAULTS_THAT_MUST_HIT = (
    "flood:sendmessage",
    "hang:*",
    "drop:*",
    "answer_lost:sendmessage:drop",
    "answer_lost:sendmessage:hang",
)
"""The sandbox's fault rules (``fault_hits``): each must have answered at least one request."""


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
    # Every fault of the quick plan happened and met the workers (the shortened outages still trip).
    assert [phase["name"] for phase in result["phases"]] == QUICK_PHASES, run.summary
    missed = [fault for fault in FAULTS_THAT_MUST_HIT if not result["fault_hits"].get(fault)]
    assert not missed, f"fault rules that no request met: {missed}\n{run.summary}"
    assert result["workers_started"] == 4, run.summary  # the first, after kill -9, after SIGTERM, the second replica
    assert len(result["sigterm_exit_codes"]) == 3, run.summary  # the SIGTERM phase and both replicas at the end
    assert result["replicas_leasing"] >= 2, run.summary  # the two replicas both served accounts at once
