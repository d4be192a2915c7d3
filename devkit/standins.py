"""What the local stand-in APIs share: an aiohttp server on 127.0.0.1 with faults you set.

The stand-in X API (:mod:`devkit.local_x`) and AI API
(:mod:`devkit.local_ai`) are real HTTP servers. The bot talks to them over
TCP exactly as it talks to the real services, so the client code under test
is the production code. Faults are *server state*: a test (or a person with
``curl``) adds a rule, and the next matching requests misbehave:

* ``status``: answer with an HTTP status (500, 503, 403 ...) and an error body;
* ``rate_limit``: 429 with ``x-rate-limit-reset`` (X) / ``retry-after`` (AI);
* ``hang``: never answer (until the server stops);
* ``malformed``: 200 with a body that is not JSON;
* ``answer_lost``: do the work (store the tweet), then never answer;
* ``overlong``: the AI answers with a reply far over 280 weighted characters;
* ``content_filter``: the AI answers 200 with ``content: null`` and
  ``finish_reason: content_filter`` (what moderated models send);
* ``no_choices``: the AI answers 200 with an empty ``choices`` list;
* ``nul_in_text``: the AI's reply carries a NUL character (``\u0000``).

A rule with ``match`` hits only requests whose body contains that text, so
one tweet can be poison while the others are answered normally.

Rules are set in-process (``server.faults.add(...)``) or over HTTP
(``POST /_standin/faults`` with the same fields as JSON, ``DELETE
/_standin/faults``), which is how tests reach a stand-in that runs inside a
bot subprocess. ``GET /_standin/state`` shows the server's state and request
counts. The admin routes have no authentication: the servers listen on
127.0.0.1 only and exist for local use.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import logging
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)


class FaultKind(str, enum.Enum):
    """How a stand-in misbehaves for a matching request."""

    STATUS = "status"
    RATE_LIMIT = "rate_limit"
    HANG = "hang"
    MALFORMED = "malformed"
    ANSWER_LOST = "answer_lost"
    OVERLONG = "overlong"
    CONTENT_FILTER = "content_filter"
    NO_CHOICES = "no_choices"
    NUL_IN_TEXT = "nul_in_text"


@dataclass
class Fault:
    """One fault rule.

    Attributes:
        kind: what happens.
        endpoint: the endpoint name it applies to (``search``, ``user``,
            ``timeline``, ``me``, ``post``, ``chat``) or ``*`` for all.
        count: how many matching requests it hits; None means until cleared.
        status: the HTTP status for ``status`` faults.
        reset_in: seconds until the rate limit resets (``rate_limit``).
        match: only requests whose body contains this text ("" for all).
        id: assigned when added.
    """

    kind: FaultKind
    endpoint: str = "*"
    count: int | None = None
    status: int = 500
    reset_in: float = 60.0
    match: str = ""
    id: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        """Build a rule from JSON fields; raises ValueError on bad ones."""
        try:
            return cls(
                kind=FaultKind(str(data["kind"])),
                endpoint=str(data.get("endpoint", "*")),
                count=None if data.get("count") is None else int(data["count"]),
                status=int(data.get("status", 500)),
                reset_in=float(data.get("reset_in", 60.0)),
                match=str(data.get("match", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad fault rule {data!r}: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data


class FaultPlan:
    """The fault rules of one stand-in (thread-safe: tests may set them from another thread)."""

    def __init__(self) -> None:
        self._rules: list[Fault] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(
        self,
        kind: FaultKind | str,
        *,
        endpoint: str = "*",
        count: int | None = None,
        status: int = 500,
        reset_in: float = 60.0,
        match: str = "",
    ) -> Fault:
        """Add a rule; the newest matching rule wins."""
        fault = Fault(FaultKind(kind), endpoint=endpoint, count=count, status=status, reset_in=reset_in, match=match)
        return self.add_rule(fault)

    def add_rule(self, fault: Fault) -> Fault:
        with self._lock:
            fault.id = next(self._ids)
            self._rules.append(fault)
        return fault

    def clear(self) -> int:
        """Remove every rule; how many there were."""
        with self._lock:
            removed = len(self._rules)
            self._rules.clear()
            return removed

    def take(self, endpoint: str, body: str = "") -> Fault | None:
        """The rule that hits this request (using up one of its count), or None."""
        with self._lock:
            for fault in reversed(self._rules):
                if fault.endpoint not in ("*", endpoint):
                    continue
                if fault.match and fault.match not in body:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self._rules.remove(fault)
                return fault
        return None

    def rules(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.as_dict() for f in self._rules]


class StandInServer:
    """Base of the stand-ins: lifecycle, request counting, fault rules and admin routes.

    Subclasses add their routes in :meth:`routes` and report their state in
    :meth:`state`.

    Args:
        host: interface to listen on (127.0.0.1: local use only).
        port: 0 picks a free port.
    """

    name = "stand-in"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.faults = FaultPlan()
        self.hits: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._hanging: set[asyncio.Future[None]] = set()

    # --- lifecycle ----------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` once started."""
        if self._runner is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://{self.host}:{self.port}"

    def routes(self, app: web.Application) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}

    async def start(self) -> StandInServer:
        """Listen on ``host:port`` (a free port when 0). Returns self."""
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/_standin/faults", self._admin_add_fault)
        app.router.add_delete("/_standin/faults", self._admin_clear_faults)
        app.router.add_get("/_standin/state", self._admin_state)
        self.routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001 - aiohttp exposes no public accessor
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        logger.info("%s listening on %s", self.name, self.base_url)
        return self

    async def stop(self) -> None:
        """Stop serving; hanging requests are released first."""
        for future in list(self._hanging):
            if not future.done():
                future.set_result(None)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> StandInServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- helpers for subclasses -----------------------------------------------

    async def hang(self) -> web.Response:
        """Never answer (until :meth:`stop`); the client's deadline must end the wait."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hanging.add(future)
        try:
            await future
        finally:
            self._hanging.discard(future)
        raise web.HTTPServiceUnavailable(text="stand-in stopping")

    @staticmethod
    def malformed() -> web.Response:
        return web.Response(status=200, text='{"data": [ this is not json', content_type="application/json")

    # --- admin routes -----------------------------------------------------------

    async def _admin_add_fault(self, request: web.Request) -> web.Response:
        try:
            fault = self.faults.add_rule(Fault.from_json(await request.json()))
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(fault.as_dict(), status=201)

    async def _admin_clear_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"removed": self.faults.clear()})

    async def _admin_state(self, request: web.Request) -> web.Response:
        return web.json_response({"hits": dict(self.hits), "faults": self.faults.rules(), **self.state()})


__all__ = ["Fault", "FaultKind", "FaultPlan", "StandInServer"]
