"""The HTTP status server every bot runs on PORT (aiohttp).

Endpoints:

* ``GET /health``: liveness for Railway and watchdogs. 200 while the event
  loop answers and the liveness callback says no loop is failing, else 503.
  Cheap: never touches the network or the database. No token.
* ``GET /ready``: readiness (dependencies reachable), from the readiness
  callback, 200 or 503. No token.
* ``GET /status``: the bot's status as JSON (its provider's dict plus ``bot``,
  ``version``, ``uptime_seconds``, ``time``).
* ``GET /health/detailed``: the optional detailed-health provider's dict.
* ``GET /metrics``: Prometheus text format of the default registry.
* ``GET /``: the operator page: plain HTML and script, no build step, that
  fetches ``/status`` every 5 s and shows it for a person: an overall verdict
  (red only for trouble: a failing loop, an open breaker, an account that
  needs a login, critical resources, start-up waiting for the database), the
  sandbox banner, a banner while start-up waits, the last error with
  its age, each loop with its last ping and restarts, accounts or channels
  with their state and queue depth, retry queues, breakers, history-sync
  progress bars, CPU/memory/disk bars, then every other section. Ages are
  computed against the server's clock. Known sections get chosen columns;
  any other section is rendered generically, so a bot's new section shows up
  without touching the page.

With a token configured, ``/status``, ``/health/detailed``, ``/metrics`` and
``/`` need it, as ``Authorization: Bearer <token>`` or ``?token=<token>``
(compared in constant time); otherwise 401 with ``WWW-Authenticate: Bearer``.
Every JSON body goes through `shared.logs.redact_obj`, the metrics text
through `shared.logs.redact`, and the token is registered as a secret, so no
configured secret appears in any response.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import inspect
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, generate_latest

from shared.logs import redact, redact_obj, register_secret

logger = logging.getLogger(__name__)

BOT_INFO = Gauge("bot_info", "Always 1; labels say which bot and version this process is", ["bot", "version"])
BOT_START_TIME = Gauge("bot_start_time_seconds", "Unix time the status server of this bot started", ["bot"])

StatusProvider = Callable[[], "Awaitable[dict[str, Any]] | dict[str, Any]"]
LivenessProvider = Callable[[], "tuple[bool, dict[str, Any]]"]
ReadinessProvider = Callable[[], "Awaitable[tuple[bool, dict[str, Any]]]"]
DetailedProvider = Callable[[], "Awaitable[dict[str, Any]]"]

_MAX_REQUEST_BODY = 16 * 1024
_MAX_LINE = 8190
_MAX_FIELD = 8190
_MAX_HEADERS = 64


class _ProviderTimeout(Exception):
    """A provider did not answer within the server's provider timeout."""


class StatusServer:
    """Serves health, readiness, status, metrics and the operator page of one bot.

    Args:
        bot: Bot name shown in /status and on the page.
        version: Version string (e.g. the git commit).
        port: TCP port (Railway's PORT); 0 picks a free one (see `port` after `start`).
        host: Interface to bind; "0.0.0.0" on Railway, "127.0.0.1" in tests.
        token: STATUS_TOKEN; when set, /status, /health/detailed, /metrics and / need it.
        status: Returns the bot's status dict (loops, breakers, queues, accounts ...);
            sync or async.
        liveness: Sync and cheap: (False, details) turns /health into 503
            (e.g. a loop is failing). None means alive while the loop answers.
        readiness: Async: (ready, details) for /ready. None means always ready.
        detailed_health: Async: dict served at /health/detailed; 404 when None.
        clock: Unix time, for uptime and the ``time`` field.
        provider_timeout: Seconds a provider may take before the request answers 503.
    """

    def __init__(
        self,
        *,
        bot: str,
        version: str,
        port: int,
        host: str = "0.0.0.0",
        token: str | None = None,
        status: StatusProvider,
        liveness: LivenessProvider | None = None,
        readiness: ReadinessProvider | None = None,
        detailed_health: DetailedProvider | None = None,
        clock: Callable[[], float] = time.time,
        provider_timeout: float = 5.0,
    ) -> None:
        self.bot = bot
        self.version = version
        self.host = host
        self._requested_port = int(port)
        self._port: int | None = None
        self._token = token or None
        self._token_bytes = _utf8(self._token) if self._token else b""
        register_secret(self._token)
        self._status = status
        self._liveness = liveness
        self._readiness = readiness
        self._detailed = detailed_health
        self._clock = clock
        self._provider_timeout = float(provider_timeout)
        self._started_at = clock()
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            OSError: The port cannot be bound (in use, no permission).
        """
        if self._runner is not None:
            return
        app = web.Application(client_max_size=_MAX_REQUEST_BODY, middlewares=[self._middleware])
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/health/detailed", self._handle_detailed)
        app.router.add_get("/ready", self._handle_ready)
        app.router.add_get("/status", self._handle_status)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/", self._handle_page)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=2.0,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_FIELD,
            max_headers=_MAX_HEADERS,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        self._port = int(addresses[0][1]) if addresses else self._requested_port
        self._started_at = self._clock()
        BOT_INFO.labels(self.bot, self.version).set(1)
        BOT_START_TIME.labels(self.bot).set(self._started_at)
        logger.info("status server listening on %s:%d", self.host, self._port,
                    extra={"token_required": self._token is not None})

    async def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            logger.info("status server stopped")

    @property
    def port(self) -> int:
        """The bound port once started (the real one when started with port 0)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def url(self) -> str:
        """Base URL to reach the server locally, e.g. ``http://127.0.0.1:8080``."""
        host = self.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------ plumbing

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                response = self._json({"error": exc.reason.lower() if exc.reason else "error"}, status=exc.status)
                if exc.status == 405:
                    allow = exc.headers.get("Allow")
                    if allow:
                        response.headers["Allow"] = allow
            else:
                raise
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("status server: %s %s failed", request.method, request.path)
            response = self._json({"error": "internal error"}, status=500)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        logger.debug("status server: %s %s -> %s", request.method, request.path, response.status)
        return response

    def _json(self, data: Any, *, status: int = 200) -> web.Response:
        body = json.dumps(redact_obj(data), default=lambda o: redact(str(o)), ensure_ascii=False, indent=None)
        return web.Response(text=body, status=status, content_type="application/json")

    def _authorized(self, request: web.Request) -> bool:
        if not self._token:
            return True
        header = request.headers.get("Authorization", "")
        from_header = header[7:].strip() if header[:7].lower() == "bearer " else ""
        from_query = request.query.get("token", "")
        # Both compared every time, in constant time, so timing says nothing about either.
        header_ok = hmac.compare_digest(_utf8(from_header), self._token_bytes)
        query_ok = hmac.compare_digest(_utf8(from_query), self._token_bytes)
        return header_ok or query_ok

    def _unauthorized(self) -> web.Response:
        response = self._json({"error": "unauthorized"}, status=401)
        response.headers["WWW-Authenticate"] = 'Bearer realm="status"'
        return response

    async def _call(self, provider: Callable[[], Any]) -> Any:
        """Call a sync or async provider, cutting an async one at the provider timeout."""
        result = provider()
        if inspect.isawaitable(result):
            try:
                async with asyncio.timeout(self._provider_timeout):
                    result = await result
            except TimeoutError as exc:
                raise _ProviderTimeout from exc
        return result

    def _now_iso(self) -> str:
        return dt.datetime.fromtimestamp(self._clock(), tz=dt.timezone.utc).isoformat(timespec="seconds")

    def _uptime(self) -> float:
        return round(max(0.0, self._clock() - self._started_at), 3)

    # ------------------------------------------------------------ handlers

    async def _handle_health(self, request: web.Request) -> web.Response:
        if self._liveness is None:
            return self._json({"status": "ok"})
        try:
            alive, details = self._liveness()
        except Exception:
            logger.exception("status server: liveness check raised")
            return self._json({"status": "failing", "error": "liveness check failed"}, status=503)
        body: dict[str, Any] = {"status": "ok" if alive else "failing"}
        if details:
            body["checks"] = details
        return self._json(body, status=200 if alive else 503)

    async def _handle_ready(self, request: web.Request) -> web.Response:
        if self._readiness is None:
            return self._json({"status": "ready"})
        try:
            ready, details = await self._call(self._readiness)
        except _ProviderTimeout:
            logger.warning("status server: readiness check timed out after %.1fs", self._provider_timeout)
            return self._json({"status": "not_ready", "error": "readiness check timed out"}, status=503)
        except Exception:
            logger.exception("status server: readiness check raised")
            return self._json({"status": "not_ready", "error": "readiness check failed"}, status=503)
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready"}
        if details:
            body["checks"] = details
        return self._json(body, status=200 if ready else 503)

    async def _provided(self, provider: Callable[[], Any], what: str) -> web.Response:
        try:
            data = await self._call(provider)
        except _ProviderTimeout:
            logger.warning("status server: %s provider timed out after %.1fs", what, self._provider_timeout)
            return self._json({"error": f"{what} provider timed out"}, status=503)
        except Exception:
            logger.exception("status server: %s provider raised", what)
            return self._json({"error": "internal error"}, status=500)
        if not isinstance(data, dict):
            logger.error("status server: %s provider returned %s, not a dict", what, type(data).__name__)
            return self._json({"error": "internal error"}, status=500)
        body: dict[str, Any] = {
            "bot": self.bot,
            "version": self.version,
            "uptime_seconds": self._uptime(),
            "time": self._now_iso(),
        }
        for key, value in data.items():
            body.setdefault(key, value)
        return self._json(body)

    async def _handle_status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        return await self._provided(self._status, "status")

    async def _handle_detailed(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        if self._detailed is None:
            return self._json({"error": "not configured"}, status=404)
        return await self._provided(self._detailed, "detailed health")

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            async with asyncio.timeout(self._provider_timeout):
                payload = await asyncio.to_thread(generate_latest, REGISTRY)
        except TimeoutError:
            return self._json({"error": "metrics collection timed out"}, status=503)
        text = redact(payload.decode("utf-8", errors="replace"))
        response = web.Response(body=text.encode("utf-8"))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _handle_page(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        nonce = secrets.token_urlsafe(16)
        html = _PAGE.replace("{{NONCE}}", nonce).replace("{{TITLE}}", _html_escape(redact(self.bot)))
        response = web.Response(text=html, content_type="text/html", charset="utf-8")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        return response


def _utf8(text: str) -> bytes:
    """``text`` as bytes for a comparison; never raises.

    aiohttp hands header bytes that are not UTF-8 over as lone surrogates
    (``surrogateescape``); a plain ``encode()`` would raise on them and turn a
    wrong token into a 500 instead of a 401.
    """
    return text.encode("utf-8", errors="surrogatepass")


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;"))


# The operator page: plain HTML + vanilla JS + CSS, no build step, kept as package data
# in shared/status_page/ (read once). It reads the token from its own URL (?token=...)
# and sends it as a Bearer header; the server never writes the token into the page.
# All data goes in through textContent.
def _load_page() -> str:
    files = resources.files("shared") / "status_page"
    html = (files / "page.html").read_text(encoding="utf-8")
    css = (files / "page.css").read_text(encoding="utf-8")
    script = (files / "page.js").read_text(encoding="utf-8")
    return html.replace("{{STYLE}}", css).replace("{{SCRIPT}}", script)


_PAGE = _load_page()
