"""What the two chaos benchmarks (``bench/chaos.py``, ``bench/chaos_ingest.py``) share.

* :class:`ChaosRun`: the frame of one run. Its embedded PostgreSQL and
  sandbox world, its bot processes (started one after another, watched,
  replaced when one dies on its own, stopped at the end), polling with a
  deadline, the fault schedule run phase by phase, the drain after the last
  fault and the result fields every run reports. A subclass says how to make
  its process, what the faults are, how the run goes and how it is judged.
* :func:`phase_table`, :func:`reason_lines`, :func:`process_lines`, :func:`closing_lines`: the
  parts of the printed report both share.
* :func:`chaos_main`: the command line (``--quick``, ``--json``, ``--keep``),
  the run in a temporary directory, the table and (with ``--json``) the JSON
  line; exit status 0 when the run is ``ok``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from bench._chaos_faults import ChaosPostgres, ChaosProcess
from bench._common import emit, parser
from devkit.sandbox import World

ProcT = TypeVar("ProcT", bound=ChaosProcess)
PlanT = TypeVar("PlanT")

#: One fault of the schedule: its name and the step that brings it about (returns a note for the table).
Step = tuple[str, Callable[[], Awaitable[str]]]


@dataclass
class PhaseRecord:
    """One fault as it went: when it began (seconds into the run), how long it took, what happened."""

    name: str
    started: float
    seconds: float = 0.0
    note: str = ""


class ChaosRun(abc.ABC, Generic[PlanT, ProcT]):
    """One chaos run of ``plan`` in ``run_dir``: a database, a sandbox world, bot processes of one kind, faults.

    Subclasses set :attr:`name` and :attr:`process_kind`, and implement
    :meth:`new_process`, :meth:`schedule`, :meth:`run` and :meth:`verdict`.
    """

    #: The benchmark (``./start.sh bench <name>``); it logs as ``bench.<name>``.
    name = ""
    #: What its processes are (``worker``, ``ingest``), as the ``--keep`` help names their logs.
    process_kind = ""

    def __init__(self, plan: PlanT, *, run_dir: Path) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.pg = ChaosPostgres(run_dir / "pg")
        self.world: World | None = None
        self.procs: list[ProcT] = []
        self.started = 0
        self.unexpected_exits: list[str] = []
        self.sigterm_codes: list[int | None] = []
        self.phases: list[PhaseRecord] = []
        self.t0 = time.monotonic()
        #: The run directory is deleted after the run (not ``--keep``): the database need not be stopped cleanly.
        self.discard_data = False

    @abc.abstractmethod
    def new_process(self, number: int) -> ProcT:
        """The ``number``-th process of the run (1, 2, ...), not started yet."""

    @abc.abstractmethod
    def schedule(self) -> list[Step]:
        """The faults in the order they come."""

    @abc.abstractmethod
    async def run(self) -> dict[str, Any]:
        """Set up, start, go through the schedule, drain; the result (see :meth:`finish`)."""

    @abc.abstractmethod
    async def verdict(self) -> dict[str, Any]:
        """Compare the ground truth with what the processes did; must carry ``ok``."""

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"bench.{self.name}")

    # the processes ---------------------------------------------------------------------

    async def start_process(self) -> ProcT:
        self.started += 1
        proc = self.new_process(self.started)
        await proc.start()
        self.procs.append(proc)
        return proc

    def live(self) -> list[ProcT]:
        return [p for p in self.procs if p.alive]

    async def check_procs(self) -> None:
        """A process that died on its own is a finding; replace it (as Railway would)."""
        for proc in self.procs:
            if not proc.alive and not proc.expected_exit:
                proc.expected_exit = True
                code = proc.proc.returncode if proc.proc else None
                self.unexpected_exits.append(f"{proc.name} exited with {code}")
                self.log.error("%s exited on its own (%s); its log ends:\n%s", proc.name, code, proc.tail())
                await self.start_process()

    async def kill_all(self) -> None:
        """kill -9 whatever still runs (the end of a run, or its failure)."""
        for proc in self.procs:
            if proc.alive:
                with contextlib.suppress(Exception):
                    await proc.kill9()

    # waiting -----------------------------------------------------------------------------

    async def wait_for(self, condition: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> bool:
        """Poll ``condition`` until true or ``timeout``; False (and a log line) on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if await condition():
                return True
            await self.check_procs()
            if time.monotonic() > deadline:
                self.log.warning("%s: not reached within %.0fs, going on", what, timeout)
                return False
            await asyncio.sleep(0.1)

    async def sleep_watching(self, seconds: float) -> None:
        """The fault lasts ``seconds``; meanwhile notice processes that die."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(0.5, left))
            await self.check_procs()

    # the run -------------------------------------------------------------------------------

    async def run_schedule(self) -> None:
        """Bring about each fault of :meth:`schedule` in turn, timing it as a phase."""
        for name, step in self.schedule():
            record = PhaseRecord(name=name, started=time.monotonic() - self.t0)
            self.log.info("fault: %s", name)
            record.note = await step()
            record.seconds = time.monotonic() - self.t0 - record.started
            self.phases.append(record)
            await self.check_procs()

    async def finish(
        self,
        drained: Callable[[], Awaitable[bool]],
        *,
        timeout: float,
        what: str,
        grace: float,
        started_key: str,
        **extra: Any,
    ) -> dict[str, Any]:
        """Wait up to ``timeout`` for ``drained``, SIGTERM the live processes, judge.

        Returns:
            the :meth:`verdict`, then ``drain_seconds``, ``drained``, ``total_seconds``,
            ``unexpected_exits``, ``sigterm_exit_codes``, ``started_key`` (processes started),
            ``extra`` and ``phases``.
        """
        drain_started = time.monotonic()
        drained_ok = await self.wait_for(drained, timeout=timeout, what=what)
        drain_seconds = time.monotonic() - drain_started
        self.log.info("%s after %.1fs; SIGTERM to the %d live process(es)", what, drain_seconds, len(self.live()))
        # All at once, as a deploy stops its replicas: each drains on its own.
        self.sigterm_codes += await asyncio.gather(*(proc.terminate(timeout=grace + 20) for proc in self.live()))
        self.log.info("judging the run")
        result = await self.verdict()
        result.update(
            drain_seconds=round(drain_seconds, 1),
            drained=drained_ok,
            total_seconds=round(time.monotonic() - self.t0, 1),
            unexpected_exits=self.unexpected_exits,
            sigterm_exit_codes=self.sigterm_codes,
            **{started_key: self.started},
            **extra,
            phases=[asdict(p) for p in self.phases],
        )
        return result

    async def close(self) -> None:
        """Kill the processes, close the world, stop PostgreSQL (subclasses stop their own part, then call this)."""
        await self.kill_all()
        if self.world is not None:
            self.world.close()
        await self.pg.close(discard=self.discard_data)


# --- the report ------------------------------------------------------------------------------


def phase_table(result: dict[str, Any], *, width: int) -> list[str]:
    """The phases as a table (name column ``width`` wide), set off by blank lines."""
    lines = ["", f"{'phase':<{width}} {'at':>7} {'took':>7}  note"]
    for phase in result.get("phases", []):
        lines.append(f"{phase['name']:<{width}} {phase['started']:>6.1f}s {phase['seconds']:>6.1f}s  {phase['note']}")
    lines.append("")
    return lines


def reason_lines(counts: dict[str, int]) -> list[str]:
    """One indented line per reason: how many, then the reason."""
    return [f"    {n:>5}  {reason}" for reason, n in counts.items()]


def process_lines(result: dict[str, Any]) -> list[str]:
    """The processes that died on their own and the exit codes after SIGTERM."""
    return [
        f"unexpected exits         {len(result.get('unexpected_exits', []))} {result.get('unexpected_exits') or ''}",
        f"SIGTERM exit codes       {result.get('sigterm_exit_codes')}",
    ]


def closing_lines(result: dict[str, Any]) -> list[str]:
    """Time to drain, total time, the verdict and the examples (if any)."""
    lines = [
        f"time to drain            {result.get('drain_seconds')}s (after the last fault)",
        f"total                    {result.get('total_seconds')}s",
        f"verdict                  {'OK' if result['ok'] else 'FAILED'}",
    ]
    if result.get("examples"):
        lines.append(f"examples                 {result['examples']}")
    return lines


# --- the command line ----------------------------------------------------------------------


async def run_in_temp_dir(run_class: type[ChaosRun[PlanT, Any]], plan: PlanT, *, keep: bool) -> dict[str, Any]:
    """Run ``plan`` in a fresh temporary directory; removed afterwards unless ``keep``."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{run_class.name.replace('_', '-')}-"))
    chaos = run_class(plan, run_dir=run_dir)
    chaos.discard_data = not keep
    try:
        return await chaos.run()
    except BaseException:
        for proc in chaos.procs:
            chaos.log.error("%s log tail:\n%s", proc.name, proc.tail(3000))
        raise
    finally:
        await chaos.close()
        if keep:
            chaos.log.warning("run directory kept: %s", run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def chaos_main(
    argv: list[str] | None,
    run_class: type[ChaosRun[PlanT, Any]],
    *,
    doc: str | None,
    plans: tuple[PlanT, PlanT],
    quick_help: str,
    report: Callable[[dict[str, Any], PlanT], str],
    quiet_loggers: Sequence[str] = (),
) -> int:
    """The command line of a chaos benchmark; its exit status (0 when the run is ``ok``).

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
        run_class: the run (its ``name`` is the benchmark's).
        doc: the module docstring (its first paragraph is the description).
        plans: the plan of a full run and of a ``--quick`` one.
        quick_help: what ``--quick`` runs.
        report: the printed table for a result and its plan.
        quiet_loggers: loggers held at WARNING (chatty libraries).
    """
    cli = parser(run_class.name, doc, quick_help=quick_help)
    cli.add_argument("--keep", action="store_true", help=f"keep the run directory ({run_class.process_kind} logs, world, database)")
    args = cli.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    full, quick = plans
    plan = quick if args.quick else full
    result = asyncio.run(run_in_temp_dir(run_class, plan, keep=args.keep))
    emit(report(result, plan), result, as_json=args.json)
    return 0 if result["ok"] else 1
