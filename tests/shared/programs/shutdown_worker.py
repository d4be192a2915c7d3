"""A worker that uses GracefulShutdown, for the shutdown tests.

Usage::

    python -m tests.shared.programs.shutdown_worker --grace SECONDS --work SECONDS [--hang]

It starts one piece of in-flight work, prints ``ready``, and waits for
SIGTERM/SIGINT. The work stays in flight until ``--work`` seconds after the
stop signal (so the signal always finds it running), or forever with
``--hang``. Then it drains, runs two cleanups (registered ``first`` then
``second``, so they run ``second`` then ``first``) and exits 0 when drained,
1 when the grace ran out. A second signal exits at once with 128+signal.
Every line goes to stdout, flushed; it ends by itself after 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

from shared.shutdown import GracefulShutdown

LIFETIME = 60.0


def say(text: str) -> None:
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


async def run(grace: float, work: float, hang: bool) -> int:
    shutdown = GracefulShutdown(grace=grace)
    shutdown.install()

    def cleanup(name: str) -> Callable[[], Awaitable[None]]:
        async def clean() -> None:
            say(f"cleanup {name}")

        return clean

    shutdown.add_cleanup("first", cleanup("first"), timeout=1.0)
    shutdown.add_cleanup("second", cleanup("second"), timeout=1.0)

    started = asyncio.Event()

    async def in_flight_work() -> None:
        async with shutdown.in_flight():
            started.set()
            await shutdown.wait()
            if hang:
                await asyncio.Event().wait()
            await asyncio.sleep(work)
            say("work finished")

    task = asyncio.create_task(in_flight_work())
    await started.wait()
    say("ready")
    try:
        await asyncio.wait_for(shutdown.wait(), LIFETIME)
    except TimeoutError:
        say("no signal came; giving up")
        return 3
    say(f"stopping reason={shutdown.reason}")
    drained = await shutdown.finish()
    say(f"drained={drained}")
    task.cancel()
    return 0 if drained else 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--work", type=float, default=0.5)
    parser.add_argument("--hang", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    raise SystemExit(asyncio.run(run(args.grace, args.work, args.hang)))


if __name__ == "__main__":
    main()
