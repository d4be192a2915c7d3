"""What a database call can raise, typed so that callers (and the classifier) know what to do.

* :class:`DatabaseUnavailable` (transient): the database could not be reached
  or is unwell (connection refused or lost, server shutting down, too many
  connections, serialization failure, HTTP 5xx from Supabase). Nothing was
  done; try again later.
* :class:`DatabaseOutcomeUnknown` (unknown outcome): the connection was lost
  while a state-changing call was in flight; it may have committed. Every
  state-changing function is safe to repeat with the same arguments (marks
  are fenced by their lease token, enqueues by their dedupe key).
* :class:`DatabaseRejected` (permanent): the database refused the call as
  made: invalid argument, constraint violation, unknown function. Retrying
  the same call cannot help.
* :class:`MigrationError` (permanent): a migration file could not be applied.

A call that passes its deadline raises :class:`shared.timeouts.OperationTimeout`
(``outcome_unknown`` set for state-changing calls), and a call refused by the
open ``database`` breaker raises :class:`shared.breaker.CircuitOpenError`;
both are transient for :func:`shared.errors.classify`.
"""

from __future__ import annotations

import re

from shared.errors import PermanentError, TransientError, UnknownOutcomeError


class DatabaseUnavailable(TransientError):
    """The database cannot be used right now; nothing was done.

    Attributes:
        code: SQLSTATE or PostgREST code when the server answered, else None.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class DatabaseOutcomeUnknown(UnknownOutcomeError, DatabaseUnavailable):
    """The connection broke during a state-changing call, which may have committed."""


class DatabaseRejected(PermanentError):
    """The database refused the call as made (a caller's mistake, not an outage).

    Attributes:
        code: SQLSTATE (``22023`` for an invalid argument, ``23505`` for a
            duplicate key ...) or a PostgREST code (``PGRST202``: no such function).
        detail: the server's detail text, if any.
        hint: the server's hint, if any.
    """

    def __init__(self, message: str, *, code: str | None = None, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail
        self.hint = hint


class MigrationError(PermanentError):
    """A migration could not be applied (bad file name, SQL error, unreachable database)."""


MIGRATE_FIX = "run ./start.sh db migrate, or set DB_AUTO_MIGRATE=1"


class SchemaMissing(DatabaseRejected):
    """The database lacks our SQL functions: it was never migrated, or misses newer migrations.

    Attributes:
        function: the function the server did not find (e.g. ``public.db_ping``).
        fix: what to run (the start-up and command-line handlers show it).
    """

    def __init__(self, function: str, *, code: str | None = None) -> None:
        bare = function.split(".")[-1]
        if bare == "db_ping":
            what = "the database has no schema yet"
        else:
            what = f"the database misses a migration: function {function} does not exist"
        super().__init__(f"{what} ({MIGRATE_FIX})", code=code)
        self.function = function
        self.fix = MIGRATE_FIX


_MISSING_FUNCTION = re.compile(
    r"(?:function ([\w.]+)\(.*?\) does not exist|Could not find the function ([\w.]+)\b.*? in the schema cache)"
)


def schema_missing(code: str | None, message: str) -> SchemaMissing | None:
    """The server's "no such function" answer as :class:`SchemaMissing`, or None.

    PostgreSQL says ``42883: function public.db_ping() does not exist``;
    PostgREST says ``PGRST202: Could not find the function public.db_ping
    without parameters in the schema cache``.
    """
    if code not in ("42883", "PGRST202"):
        return None
    match = _MISSING_FUNCTION.search(message)
    if match is None:
        return None
    return SchemaMissing(match.group(1) or match.group(2), code=code)
