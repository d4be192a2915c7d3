"""A small child program for the supervisor tests: each run does what the plan says.

Usage::

    child.py --state DIR --plan MODE[,MODE...] [--answers N] [--term-exit CODE]

The n-th run (counted in ``DIR/runs``) performs the n-th mode of the plan; the
last mode repeats. Modes:

* ``crash[:CODE]``: exit with CODE (default 3) at once.
* ``clean``: exit 0 at once.
* ``serve``: answer ``GET /health`` with 200 on 127.0.0.1:$PORT until SIGTERM
  or SIGINT, then drain (close the server) and exit with ``--term-exit`` (0).
* ``quiet``: like ``serve`` but without the server: it never answers /health,
  yet stops cleanly on SIGTERM or SIGINT.
* ``hang``: answer /health ``--answers`` times (2), then block the event loop
  with a blocking sleep, the way a real hang looks: nothing answers, and the
  asyncio signal handlers never run, so only SIGKILL ends it.

Each run first prints ``child: run=N mode=M pid=P``; all output is on stdout,
flushed. Every mode ends by itself after LIFETIME seconds, so a failed test
cannot leave a child behind for long.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

LIFETIME = 60.0


def say(text: str) -> None:
    """Write one line to stdout at once (the tests read it through the supervisor's pipe)."""
    sys.stdout.write(f"child: {text}\n")
    sys.stdout.flush()


def next_run(state: Path) -> int:
    """Count this run in the state directory and return its 1-based number."""
    counter = state / "runs"
    runs = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(runs))
    return runs


class HealthServer:
    """A minimal HTTP/1.1 server answering every request with 200 "ok"."""

    def __init__(self, *, answers_before_hang: int | None = None) -> None:
        self.answered = 0
        self._answers_before_hang = answers_before_hang
        self._server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        """Listen on 127.0.0.1:port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)

    async def close(self) -> None:
        """Stop listening and wait (bounded) for open connections to finish."""
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await asyncio.wait_for(writer.drain(), timeout=5)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
        self.answered += 1
        if self._answers_before_hang is not None and self.answered == self._answers_before_hang:
            say(f"answered {self.answered} health checks; hanging now")
            # A blocking call in async code: exactly the bug the supervisor guards against.
            asyncio.get_running_loop().call_soon(_hang_forever)


def _hang_forever() -> None:
    """Block the event loop's thread: no request, timer or signal handler runs any more."""
    time.sleep(LIFETIME)
    say("hang ended by itself")
    os._exit(5)


async def serve(*, port: int | None, term_exit: int, answers_before_hang: int | None) -> int:
    """Run the health server (none when port is None) until a stop signal or LIFETIME; return the exit code."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
    server = HealthServer(answers_before_hang=answers_before_hang)
    if port is None:
        say("running without a health server")
    else:
        await server.start(port)
        say(f"serving /health on port {port}")
    try:
        received = await asyncio.wait_for(stop, timeout=LIFETIME)
    except TimeoutError:
        say("lifetime over")
        return 4
    say(f"got {received.name}, draining")
    await server.close()
    say(f"drained, exiting with {term_exit}")
    return term_exit


def main() -> int:
    """Run the mode the plan gives this run; return the exit code."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--answers", type=int, default=2)
    parser.add_argument("--term-exit", type=int, default=0)
    args = parser.parse_args()

    plan = args.plan.split(",")
    run = next_run(args.state)
    mode = plan[min(run, len(plan)) - 1]
    say(f"run={run} mode={mode} pid={os.getpid()}")
    port = int(os.environ.get("PORT", "8080"))

    name, _, arg = mode.partition(":")
    if name == "crash":
        return int(arg or 3)
    if name == "clean":
        return 0
    if name == "serve":
        return asyncio.run(serve(port=port, term_exit=args.term_exit, answers_before_hang=None))
    if name == "quiet":
        return asyncio.run(serve(port=None, term_exit=args.term_exit, answers_before_hang=None))
    if name == "hang":
        return asyncio.run(serve(port=port, term_exit=args.term_exit, answers_before_hang=args.answers))
    say(f"unknown mode {mode!r}")
    return 64


if __name__ == "__main__":
    sys.exit(main())
