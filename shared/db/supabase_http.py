"""The Supabase HTTP transport: the same SQL functions through PostgREST's ``/rpc``.

Each call is ``POST <SUPABASE_URL>/rest/v1/rpc/<function>`` with the named
arguments as a JSON object, made by supabase-py's async client with the
service role key, under TIMEOUT_DB and the ``database`` breaker. PostgREST
runs the function in a transaction and answers after the commit.

There is no NOTIFY over HTTP: subscriptions poll, at most ``poll_interval``
(1 s by default) apart. supabase-py's own retries are switched off (they
would only ever retry reads, but a retry is our decision).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import httpx

from shared.breaker import CircuitBreaker
from shared.db.base import DEFAULT_POLL_INTERVAL, Database, Subscription, json_safe
from shared.db.errors import DatabaseOutcomeUnknown, DatabaseRejected, DatabaseUnavailable, schema_missing
from shared.db.postgres import database_breaker
from shared.db.records import Backend
from shared.errors import ErrorKind, classify_sqlstate, describe
from shared.timeouts import bounded, db_op

logger = logging.getLogger(__name__)

_SQLSTATE = re.compile(r"^[0-9A-Z]{5}$")
# PostgREST's own codes for "cannot reach / lost the database".
_POSTGREST_UNAVAILABLE = {"PGRST000", "PGRST001", "PGRST002", "PGRST003"}


def translate_api_error(exc: Exception, *, read_only: bool) -> Exception:
    """A postgrest-py ``APIError`` as our typed error."""
    code = str(getattr(exc, "code", None) or "")
    message = str(getattr(exc, "message", None) or exc)
    detail = getattr(exc, "details", None)
    hint = getattr(exc, "hint", None)
    missing = schema_missing(code, message)
    if missing is not None:
        return missing
    if _SQLSTATE.match(code):
        if classify_sqlstate(code, message).kind is ErrorKind.TRANSIENT:
            if code.startswith(("08", "57P0")) and not read_only:
                return DatabaseOutcomeUnknown(f"database connection lost ({code}: {message})", code=code)
            return DatabaseUnavailable(f"database unavailable ({code}: {message})", code=code)
        return DatabaseRejected(
            f"database rejected the call ({code}: {message})",
            code=code,
            detail=None if detail is None else str(detail),
            hint=None if hint is None else str(hint),
        )
    if code in _POSTGREST_UNAVAILABLE:
        return DatabaseUnavailable(f"Supabase cannot reach the database ({code}: {message})", code=code)
    if code.isdigit():
        status = int(code)
        if status >= 500 or status in (408, 425, 429):
            return DatabaseUnavailable(f"Supabase answered HTTP {status}: {message}", code=code)
        return DatabaseRejected(f"Supabase answered HTTP {status}: {message}", code=code)
    return DatabaseRejected(
        f"Supabase rejected the call ({code or 'error'}: {message})",
        code=code or None,
        detail=None if detail is None else str(detail),
        hint=None if hint is None else str(hint),
    )


class SupabaseDatabase(Database):
    """:class:`Database` over Supabase's HTTP API (SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY).

    Args:
        url: the project URL (``https://<ref>.supabase.co``).
        key: the service role key (never logged or described).
        timeout: TIMEOUT_DB, the deadline of one call.
        breaker: the circuit breaker calls go through (default: ``database``).
        poll_interval: how often subscriptions look for work (at most 1 s is sensible).
        schema: the exposed schema the functions live in.
        http_client: an ``httpx.AsyncClient`` to use (default: one made and closed here).
    """

    backend = Backend.SUPABASE
    rows_capped = True

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout: float = 10.0,
        breaker: CircuitBreaker | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        schema: str = "public",
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(poll_interval=poll_interval)
        if not key:
            raise ValueError("a Supabase key is required")
        self.url = url.rstrip("/")
        self._key = key
        self.timeout = timeout
        self.schema = schema
        self._breaker = breaker if breaker is not None else database_breaker()
        self._own_http = http_client is None
        self._http = http_client
        self._client: Any = None
        self._closed = False

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def open(self) -> SupabaseDatabase:
        """Build the client (no network traffic)."""
        if self._client is None:
            from supabase import AsyncClientOptions, acreate_client

            if self._http is None:
                # httpx's own timeout sits behind ours, so ours always fires first.
                self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout + 5.0), follow_redirects=True)
            options = AsyncClientOptions(
                schema=self.schema,
                httpx_client=self._http,
                postgrest_client_retry=False,
                auto_refresh_token=False,
                persist_session=False,
            )
            self._client = await acreate_client(self.url, self._key, options=options)
        self._breaker.set_probe(self.probe)
        return self

    async def probe(self) -> None:
        """``db_ping`` past the breaker: how the open breaker learns that the database is back."""
        await self._run("db_ping", {}, True)

    async def call(self, function: str, args: Mapping[str, Any], *, read_only: bool = False) -> list[dict[str, Any]]:
        """See :meth:`Database.call`.

        Raises:
            DatabaseUnavailable: unreachable, HTTP 5xx, or a transient database error.
            DatabaseOutcomeUnknown: the answer to a state-changing call was lost.
            DatabaseRejected: the call was refused (bad argument, unknown function, bad key).
            OperationTimeout: past ``timeout``.
            CircuitOpenError: the breaker is open.
        """
        if self._closed:
            raise DatabaseUnavailable("the database object is closed")
        if self._client is None:
            await self.open()
        payload = {name: json_safe(value) for name, value in args.items()}
        return await self._breaker.call(self._run, function, payload, read_only)

    async def _run(self, function: str, payload: dict[str, Any], read_only: bool) -> list[dict[str, Any]]:
        return await db_op(self._rpc(function, payload, read_only), self.timeout, function, outcome_unknown=not read_only)

    async def _rpc(self, function: str, payload: dict[str, Any], read_only: bool) -> list[dict[str, Any]]:
        from postgrest.exceptions import APIError

        try:
            response = await self._client.rpc(function, payload).execute()
        except APIError as exc:
            raise translate_api_error(exc, read_only=read_only) from exc
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise DatabaseUnavailable(f"cannot reach Supabase: {describe(exc)}") from exc
        except httpx.TransportError as exc:
            if read_only:
                raise DatabaseUnavailable(f"Supabase connection failed: {describe(exc)}") from exc
            raise DatabaseOutcomeUnknown(f"Supabase connection failed during {function}: {describe(exc)}") from exc
        data = response.data
        if isinstance(data, list):
            return [row if isinstance(row, dict) else {function: row} for row in data]
        if isinstance(data, dict):
            return [data]
        return [{function: data}]

    async def subscribe(self, channel: str) -> Subscription:
        """A polling subscription: NOTIFY does not cross the HTTP API."""
        return self._subscribed(Subscription(channel, poll_interval=self.poll_interval, live=lambda: False))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._breaker.clear_probe(self.probe)
        if self._http is not None and self._own_http:
            try:
                await bounded(self._http.aclose(), self.timeout, "db.http_close")
            except Exception:
                logger.debug("closing the Supabase HTTP client failed", exc_info=True)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend.value,
            "url": self.url,
            "schema": self.schema,
            "notifications": "polling",
            "poll_interval_s": self.poll_interval,
            "breaker": self._breaker.state.value,
        }
