"""shared.cli: one line per error, the exit code by what must happen next, --debug and -v."""

from __future__ import annotations

import errno

import pytest

from shared.cli import (
    ArgumentParser,
    CliError,
    cli_log_level,
    error_line,
    exit_code_for,
    port_error,
    run_cli,
)
from shared.config import ConfigError
from shared.db.errors import DatabaseRejected, DatabaseUnavailable, MigrationError, SchemaMissing, schema_missing
from shared.errors import PermanentError


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (CliError("no account labelled 'x'", "known: a, b"), 2, "error: no account labelled 'x' (known: a, b)"),
        (ConfigError("PORT", "a port number 0-65535", "abc"), 2, "error: PORT must be a port number 0-65535, got 'abc'"),
        (PermanentError("text too long:\n5000 units"), 2, "error: text too long: 5000 units"),
        (DatabaseRejected("database rejected the call (22023: empty message)"), 2, "error: database rejected the call"),
        (SchemaMissing("public.db_ping"), 2, "error: the database has no schema yet (run ./start.sh db migrate"),
        (DatabaseUnavailable("database unavailable (08006: gone)"), 1, "error: database unavailable"),
        (MigrationError("cannot connect to the database"), 1, "error: cannot connect to the database"),
        (ConnectionRefusedError(111, "Connection refused"), 1, "error: ConnectionRefusedError"),
        (KeyError("oops"), 1, "error: unexpected KeyError"),
    ],
)
def test_each_error_is_one_line_with_the_exit_code_of_what_must_happen_next(exc: BaseException, code: int, line: str) -> None:
    assert exit_code_for(exc) == code
    shown = error_line(exc)
    assert shown.startswith(line) and "\n" not in shown, shown


def test_a_taken_port_names_port_and_a_free_choice() -> None:
    error = port_error(OSError(errno.EADDRINUSE, "Address already in use"), 8081)
    assert error is not None and error.code == 2
    assert error_line(error) == "error: port 8081 is already in use (stop the other process, or set PORT to a free port, e.g. PORT=8082)"
    assert port_error(OSError(errno.ENOENT, "no"), 8081) is None


def test_the_servers_no_such_function_answer_becomes_schema_missing_on_both_backends() -> None:
    sql = schema_missing("42883", "function public.db_ping() does not exist")
    http = schema_missing("PGRST202", "Could not find the function public.db_ping without parameters in the schema cache")
    assert sql is not None and http is not None and sql.function == http.function == "public.db_ping"
    newer = schema_missing("42883", "function public.outbound_list(text[], bigint, integer) does not exist")
    assert newer is not None and "misses a migration: function public.outbound_list" in str(newer)
    assert schema_missing("42883", "operator does not exist: text = integer") is None
    assert schema_missing("22023", "function public.x() does not exist") is None


def test_run_cli_prints_one_line_and_debug_adds_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    def failing(argv: list[str]) -> int:
        raise PermanentError(f"bad input {argv}")

    assert run_cli(failing, ["a", "-v"]) == 2
    assert capsys.readouterr().err == "error: bad input ['a']\n"
    assert run_cli(failing, ["--debug", "a"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad input ['a']\n")


def test_usage_errors_are_one_line_naming_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = ArgumentParser(prog="./start.sh worker")
    parser.add_argument("--count", type=int)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--count", "many"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: argument --count: invalid int value: 'many' (see ./start.sh worker --help)\n"


def test_commands_are_quiet_unless_verbose_or_debug_logging() -> None:
    run_cli(lambda argv: 0, [])
    assert cli_log_level("INFO") == "WARNING" and cli_log_level("DEBUG") == "DEBUG"
    run_cli(lambda argv: 0, ["-v"])
    assert cli_log_level("INFO") == "INFO"
    run_cli(lambda argv: 0, [])
