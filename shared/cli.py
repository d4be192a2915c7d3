"""The one top-level handler of every command line: never a traceback for bad input.

Each CLI's ``main`` hands its real entry point to :func:`run_cli`, which

* takes the global flags out of the arguments (``--debug``: show the
  traceback of any error, for a bug report; ``-v``/``--verbose``: INFO logs
  on stderr, which a command keeps quiet otherwise);
* turns our typed errors into one line, ``error: <what> (<how to fix>)``,
  and an exit code: 2 for bad input or a bad setting (nothing can succeed
  until the caller changes something), 1 for a failure (an outage, a
  refusal of the remote side, a bug).

The classes below are how code says which of the two it is, and what fixes
it; :func:`exit_code_for` decides for the rest (our ``PermanentError`` is bad
input, ``TransientError`` and ``OSError`` are failures).
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from shared.errors import BotError, ErrorKind, PermanentError, TransientError, classify, describe
from shared.logs import redact

#: Exit codes every CLI shares.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

DEBUG_FLAG = "--debug"
VERBOSE_FLAGS = ("-v", "--verbose")

_verbose = False
_debug = False


class CliError(BotError):
    """An error a command reports as one line: what went wrong and how to fix it.

    Args:
        what: what is wrong, as the user would say it.
        fix: what to do about it (None when nothing needs saying).
        code: the exit code (2: bad input or setting; 1: a failure).
    """

    def __init__(self, what: str, fix: str | None = None, *, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(what if fix is None else f"{what} ({fix})")
        self.what = what
        self.fix = fix
        self.code = code


class PortInUse(CliError):
    """The status server's port is taken by another process."""

    def __init__(self, port: int) -> None:
        super().__init__(
            f"port {port} is already in use",
            f"stop the other process, or set PORT to a free port, e.g. PORT={port + 1}",
            code=EXIT_BAD_INPUT,
        )
        self.port = port


def port_error(exc: OSError, port: int) -> CliError | None:
    """A bind failure as the one line to show, or None when it is something else."""
    if exc.errno == errno.EADDRINUSE:
        return PortInUse(port)
    if exc.errno == errno.EACCES:
        return CliError(f"no permission to listen on port {port}", "set PORT to a port above 1024")
    return None


def verbose() -> bool:
    """True when the command line asked for INFO logs (``-v``)."""
    return _verbose


def cli_log_level(configured: str) -> str:
    """The log level of a one-shot command: warnings and errors only, unless ``-v``.

    LOG_LEVEL=DEBUG still shows everything, since whoever set it wants to see it.
    """
    if configured.upper() == "DEBUG":
        return "DEBUG"
    return configured if _verbose else "WARNING"


def split_flags(argv: Sequence[str]) -> tuple[list[str], bool, bool]:
    """(arguments without the global flags, debug, verbose); nothing after ``--`` is touched."""
    rest: list[str] = []
    debug = is_verbose = False
    args = list(argv)
    cut = args.index("--") if "--" in args else len(args)
    for arg in args[:cut]:
        if arg == DEBUG_FLAG:
            debug = True
        elif arg in VERBOSE_FLAGS:
            is_verbose = True
        else:
            rest.append(arg)
    return rest + args[cut:], debug, is_verbose


#: Exception types that mean a bug in our code, never bad input: reported as unexpected.
_BUGS = (AttributeError, TypeError, KeyError, IndexError, NameError, AssertionError, RuntimeError, ImportError)


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from shared.config import ConfigError

    types: list[type[BaseException]] = [ConfigError, PermanentError, ValueError]
    sandbox = sys.modules.get("devkit.sandbox")  # loaded only when the sandbox could have raised
    if sandbox is not None:
        types.append(sandbox.SandboxError)
    return tuple(types)


def exit_code_for(exc: BaseException) -> int:
    """2 when the caller must change something first, else 1."""
    from shared.db.errors import MigrationError

    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, MigrationError) or isinstance(exc, TransientError) or isinstance(exc, _BUGS):
        return EXIT_FAILURE
    if isinstance(exc, _bad_input_types()):
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError):
        return EXIT_FAILURE
    # Telethon, asyncpg, HTTP clients: the one classifier says whether retrying could help.
    return EXIT_BAD_INPUT if classify(exc).kind is ErrorKind.PERMANENT else EXIT_FAILURE


def error_line(exc: BaseException) -> str:
    """``error: <what> (<how to fix>)`` on one line."""
    from shared.config import ConfigError

    if isinstance(exc, _BUGS):
        text = f"unexpected {describe(exc)} (run again with --debug and report the traceback)"
    elif isinstance(exc, ConfigError):
        text = f"{exc} (fix it in .env or the environment; see docs/configuration.md)"
    elif isinstance(exc, _bad_input_types() + (BotError,)):
        text = redact(str(exc)) or type(exc).__name__
    elif isinstance(exc, OSError):
        text = f"{describe(exc)} (check the path or the network, then try again)"
    else:
        text = classify(exc).reason
    return "error: " + " ".join(text.split())


def run_cli(entry: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``entry(arguments)`` under the handler; its exit code, or the error's.

    ``SystemExit`` passes through (argparse's usage errors already are one
    line and exit 2); Ctrl-C exits 130 without a traceback.
    """
    global _verbose, _debug
    args, _debug, _verbose = split_flags(sys.argv[1:] if argv is None else argv)
    try:
        return entry(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # the one place an error reaches the user
        if _debug:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(error_line(exc) + "\n")
        return exit_code_for(exc)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``error: ... (see PROG --help)``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def bot_parser(bot: str, description: str, manual: str) -> tuple[ArgumentParser, Any]:
    """A bot's command line: ``./start.sh BOT [COMMAND]``, ``run`` the default; (parser, its subparsers)."""
    parser = ArgumentParser(
        prog=f"./start.sh {bot}",
        description=description,
        epilog=f"Global flags: -v shows INFO logs, --debug shows a traceback on errors. Manual: {manual}",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help=f"run the {'worker' if bot == 'worker' else 'bot'} (the default)")
    return parser, sub
