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
