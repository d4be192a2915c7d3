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


# The operator page: plain HTML + vanilla JS, no build step. It reads the token
# from its own URL (?token=...) and sends it as a Bearer header; the server never
# writes the token into the page. All data goes in through textContent.
_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{{TITLE}} status</title>
<style nonce="{{NONCE}}">
  :root { --bg:#13161b; --panel:#1a1e25; --text:#d8dce3; --muted:#8a93a2; --faint:#5d6573; --line:#272d37;
          --ok:#7dbb92; --warn:#d9ab4f; --bad:#f0695c; --accent:#6f9fd6; }
  * { box-sizing:border-box; }
  html, body { margin:0; background:var(--bg); color:var(--text); }
  body { font:13px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  header { display:flex; flex-wrap:wrap; gap:6px 18px; align-items:baseline; padding:10px 16px 9px; border-bottom:1px solid var(--line); }
  header h1 { font-size:17px; font-weight:650; margin:0; letter-spacing:.01em; }
  header .meta { color:var(--muted); font-size:12px; }
  #conn { margin-left:auto; }
  .pill { display:inline-block; padding:1px 9px; border-radius:9px; font-size:12px; font-weight:600; border:1px solid currentColor; }
  .pill.ok { color:var(--ok); } .pill.warn { color:var(--warn); } .pill.bad { color:var(--bad); }
  .banner { padding:7px 16px; font-weight:600; font-size:13px; }
  .banner.sandbox { background:#1f3047; color:#cfe0f5; border-bottom:1px solid #2f4a6b; }
  .banner.error { background:#4a1f1f; color:#ffd6d0; }
  .hidden { display:none !important; }
  main { padding:12px 16px 24px; display:flex; flex-wrap:wrap; gap:12px; align-items:flex-start; }
  section { flex:1 1 380px; min-width:0; background:var(--panel); border:1px solid var(--line); border-radius:6px; padding:8px 12px 10px; overflow-x:auto; }
  section.wide { flex-basis:100%; }
  section.stat { flex:0 1 auto; min-width:120px; }
  section.stat .value { font-size:20px; font-variant-numeric:tabular-nums; }
  section h2 { font-size:11px; font-weight:650; margin:0 0 6px; text-transform:uppercase; letter-spacing:.07em; color:var(--muted); }
  table { border-collapse:collapse; font-size:12.5px; }
  table.kv { width:100%; }
  table.grid { min-width:50%; }
  th, td { text-align:left; padding:3px 20px 3px 0; border-bottom:1px solid var(--line); vertical-align:top; white-space:nowrap; }
  th.num { text-align:right; }
  tr:last-child > td, tr:last-child > th { border-bottom:none; }
  th { color:var(--muted); font-weight:600; }
  th.row { color:var(--text); font-weight:600; }
  td.num { font-variant-numeric:tabular-nums; text-align:right; }
  td.text { white-space:normal; min-width:160px; max-width:520px; word-break:break-word; }
  .ok { color:var(--ok); } .warn { color:var(--warn); } .bad { color:var(--bad); font-weight:650; }
  .err { color:#e49a92; } .muted { color:var(--faint); }
  .sub { display:block; color:var(--faint); font-size:11px; }
  .bar { position:relative; height:14px; width:160px; background:#272d37; border-radius:3px; overflow:hidden; }
  .bar > span { position:absolute; left:0; top:0; bottom:0; background:var(--accent); opacity:.75; }
  .bar > span.warn { background:var(--warn); } .bar > span.bad { background:var(--bad); } .bar > span.ok { background:var(--ok); }
  .bar > em { position:relative; font-style:normal; font-size:11px; padding-left:6px; color:#fff; line-height:14px; }
  .lasterror .message { font-size:14px; white-space:pre-wrap; word-break:break-word; }
  .lasterror .when { color:var(--muted); font-size:12px; margin-top:2px; }
  pre { margin:0; white-space:pre-wrap; word-break:break-word; color:var(--muted); font-size:12px; }
  .none { color:var(--faint); font-style:italic; }
  svg.spark { display:block; width:240px; height:30px; background:#161a20; border-radius:3px; }
  svg.spark polyline { fill:none; stroke:#b48ead; stroke-width:2; stroke-linejoin:round; }
  svg.spark line.base { stroke:var(--line); stroke-width:1; }
  td.trend { padding-right:12px; }
</style>
</head>
<body>
<div id="sandbox" class="banner sandbox hidden">SANDBOX MODE: not talking to real Telegram</div>
<div id="fetch-error" class="banner error hidden"></div>
<div id="starting" class="banner error hidden"></div>
<header>
  <h1 id="bot">{{TITLE}}</h1>
  <span id="overall" class="pill hidden"></span>
  <span class="meta" id="version"></span>
  <span class="meta" id="backend"></span>
  <span class="meta" id="uptime"></span>
  <span class="meta" id="time"></span>
  <span class="meta" id="conn">loading...</span>
</header>
<main id="sections"></main>
<template id="spark-template"><svg class="spark" viewBox="0 0 240 30" preserveAspectRatio="none"><line class="base" x1="0" x2="240" y1="28" y2="28"></line><polyline></polyline></svg></template>
<script nonce="{{NONCE}}">
"use strict";
(function () {
  var REFRESH_MS = 5000;
  var params = new URLSearchParams(window.location.search);
  var token = params.get("token") || "";
  var lastOk = 0;
  var skewMs = 0;  // browser clock minus server clock, from /status's "time"
  var HEADER_KEYS = ["bot", "version", "uptime_seconds", "time", "sandbox", "backend", "stopping", "starting"];
  var ORDER = ["last_error", "trends", "session_key", "loops", "accounts", "fleet", "channels", "queues", "breakers", "history_jobs", "resources",
               "counters", "outbound", "sync", "jobs", "heartbeat", "alerts", "watchdog", "sandbox_world"];
  var BAD = ["failing", "failed", "open", "dead", "error", "key_mismatch", "stopped", "crashed", "exhausted", "down", "unhealthy"];
  var WARN = ["half_open", "degraded", "restarting", "retrying", "stale", "rate_limited", "waiting", "paused", "starting",
              "flood_wait", "limited", "backoff", "connecting", "pending", "needs_login"];
  var GOOD = ["ok", "running", "closed", "healthy", "connected", "ready", "idle", "done", "active", "alive", "online", "sent"];
  // Per section: the columns worth a glance, in order; then the rest minus HIDE.
  var COLUMNS = {
    loops: ["state", "last_ping", "last_ping_ago_s", "restarts", "cycles", "cycle_errors", "last_error", "last_error_at", "last_restart_reason"],
    accounts: ["state", "fix", "connected", "lease", "queue_depth", "sent", "failed", "received", "reconnects", "connected_since",
               "flood_wait_until", "limited_until", "last_error", "last_error_at"],
    channels: ["state", "last_message_id", "stored", "skipped", "failed", "last_error", "last_error_at"],
    breakers: ["state", "consecutive_failures", "failures", "retry_in_s", "times_opened", "rejected_calls", "last_error", "last_error_at"],
    history_jobs: ["job_id", "account", "channel", "chat_id", "fetched", "stored", "target", "done", "percent"],
    fleet: ["state", "this", "host", "pid", "version", "last_heartbeat_at", "held", "target", "pinned"]
  };
  var HIDE = {
    loops: ["alive", "max_silence_s", "restarts_in_window", "abandoned"],
    accounts: ["id"],
    fleet: ["heartbeat_age_s"],
    breakers: ["name", "failure_threshold", "recovery_timeout_s", "half_open_max_calls", "success_threshold",
               "total_successes", "total_failures", "last_change_at"]
  };
  var NAME_LABEL = { loops: "loop", accounts: "account", channels: "channel", breakers: "breaker", queues: "queue", fleet: "replica" };
  var LABELS = { last_ping_ago_s: "last ping", retry_in_s: "retry in", queue_depth: "queue depth", connected_since: "connected since",
                 flood_wait_until: "flood wait until", limited_until: "limited until", last_error_at: "last error at", last_ok_at: "last ok", uptime_seconds: "uptime" };
  var HEADS = { last_ping: "last ping", consecutive_failures: "failures", queue_depth: "queue", cycle_errors: "errors",
                last_restart_reason: "restart reason", connected_since: "since", flood_wait_until: "flood wait", limited_until: "limited",
                times_opened: "opened", rejected_calls: "rejected", last_error_at: "error at", chat_id: "chat", job_id: "job",
                last_heartbeat_at: "last heartbeat", held: "accounts held", target: "target share" };
  var EMPTY = { history_jobs: "no history sync jobs", queues: "no retry queues", accounts: "no accounts", channels: "no channels",
                fleet: "no replica seen yet" };
  var WIDE = ["loops", "accounts", "fleet", "channels", "breakers", "history_jobs"];

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function byId(id) { return document.getElementById(id); }
  function isObj(v) { return v !== null && typeof v === "object" && !Array.isArray(v); }
  function isScalar(v) { return v === null || v === undefined || typeof v !== "object"; }
  function head(key) { return HEADS[key] || title(key); }
  function title(key) {
    if (LABELS[key]) { return LABELS[key]; }
    return String(key).replace(/_ago_s$/, "").replace(/_s$/, "").replace(/_/g, " ");
  }
  function fmtDuration(sec) {
    sec = Math.max(0, sec);
    if (sec < 10 && sec !== Math.round(sec)) { return (Math.round(sec * 10) / 10) + "s"; }
    sec = Math.round(sec);
    var d = Math.floor(sec / 86400), h = Math.floor(sec % 86400 / 3600), m = Math.floor(sec % 3600 / 60), s = sec % 60;
    if (d) { return d + "d " + h + "h"; }
    if (h) { return h + "h " + m + "m"; }
    if (m) { return m + "m " + s + "s"; }
    return s + "s";
  }
  function now() { return Date.now() - skewMs; }
  function fmtAgo(d) {
    var diff = (now() - d.getTime()) / 1000;
    return diff >= -1 ? fmtDuration(diff) + " ago" : "in " + fmtDuration(-diff);
  }
  function fmtAbs(d) { return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z"); }
  function asDate(key, v) {
    if (typeof v === "string" && /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}/.test(v)) {
      var d = new Date(v); return isNaN(d.getTime()) ? null : d;
    }
    if (typeof v === "number" && /(_at|_time|^time|ping|seen|heartbeat|_since|_until)$/.test(key) && v > 1e9 && v < 1e11) {
      return new Date(v * 1000);
    }
    return null;
  }
  function stateClass(v) {
    if (typeof v !== "string") { return ""; }
    var s = v.toLowerCase();
    if (BAD.indexOf(s) >= 0) { return "bad"; }
    if (WARN.indexOf(s) >= 0) { return "warn"; }
    if (GOOD.indexOf(s) >= 0) { return "ok"; }
    return "";
  }
  function percentOf(row) {
    if (!isObj(row)) { return null; }
    if (typeof row.percent === "number") { return row.percent; }
    var done = row.done !== undefined && typeof row.done === "number" ? row.done : (row.fetched !== undefined ? row.fetched : row.processed);
    var total = typeof row.total === "number" ? row.total : row.target;
    if (typeof done === "number" && typeof total === "number" && total > 0) { return 100 * done / total; }
    if (row.done === true) { return 100; }
    return null;
  }
  function bar(pct, fillClass) {
    var wrap = el("div", "bar");
    var fill = el("span", fillClass || null);
    var p = Math.max(0, Math.min(100, pct));
    fill.style.width = p.toFixed(1) + "%";
    wrap.appendChild(fill);
    wrap.appendChild(el("em", null, p.toFixed(1) + "%"));
    return wrap;
  }
  function inline(obj) {
    var keys = Object.keys(obj);
    if (!keys.length) { return null; }
    if (!keys.every(function (k) { return isScalar(obj[k]); })) { return null; }
    return keys.map(function (k) { return title(k) + " " + (obj[k] === null ? "-" : String(obj[k])); }).join(", ");
  }
  function cell(key, v) {
    var td = el("td");
    if (key === "percent" && typeof v === "number") { td.appendChild(bar(v)); return td; }
    if (/_ago_s$/.test(key) && typeof v === "number") { td.textContent = fmtDuration(v) + " ago"; return td; }
    var d = asDate(key, v);
    if (d) {
      td.textContent = fmtAgo(d);
      td.title = fmtAbs(d);
      return td;
    }
    if (v === null || v === undefined || v === "") { td.className = "muted"; td.textContent = "-"; return td; }
    if (typeof v === "number") {
      td.className = "num";
      td.textContent = /_s$/.test(key) ? fmtDuration(v) : String(Math.round(v * 1000) / 1000);
      return td;
    }
    if (typeof v === "boolean") {
      td.textContent = v ? "yes" : "no";
      if (key === "connected" || key === "alive" || key === "healthy" || key === "monitor_alive") { td.className = v ? "ok" : "bad"; }
      return td;
    }
    if (Array.isArray(v)) {
      if (!v.length) { td.className = "muted"; td.textContent = "-"; return td; }
      if (v.every(isScalar)) { td.className = "text"; td.textContent = v.map(String).join(", "); return td; }
    }
    if (typeof v === "object") {
      var flat = isObj(v) ? inline(v) : null;
      if (isObj(v) && !Object.keys(v).length) { td.className = "muted"; td.textContent = "-"; return td; }
      if (flat !== null) { td.className = "text"; td.textContent = flat; return td; }
      td.appendChild(el("pre", null, JSON.stringify(v, null, 1)));
      return td;
    }
    td.textContent = String(v);
    var c = stateClass(v);
    if (c) { td.className = c; }
    else if (/(^|_)(error|reason)$/.test(key)) { td.className = "text err"; }
    else if (String(v).length > 40) { td.className = "text"; }
    return td;
  }
  function columnsFor(section, rows) {
    var seen = [];
    rows.forEach(function (r) { Object.keys(r.data).forEach(function (k) { if (seen.indexOf(k) < 0) { seen.push(k); } }); });
    var hide = HIDE[section] || [];
    var preferred = COLUMNS[section] || [];
    var cols = preferred.filter(function (k) { return seen.indexOf(k) >= 0; });
    seen.forEach(function (k) { if (cols.indexOf(k) < 0 && hide.indexOf(k) < 0) { cols.push(k); } });
    // A column that says nothing for any row is left out (no "-" columns).
    return cols.filter(function (k) {
      return k === "state" || rows.some(function (r) { var v = r.data[k]; return v !== null && v !== undefined && v !== ""; });
    });
  }
  function table(section, rows, nameKey) {
    var cols = columnsFor(section, rows);
    var withPct = rows.some(function (r) { return percentOf(r.data) !== null; });
    if (withPct && cols.indexOf("percent") < 0) { cols.push("percent"); }
    var t = el("table", "grid"), headRow = el("tr");
    if (nameKey) { headRow.appendChild(el("th", null, nameKey)); }
    cols.forEach(function (c) {
      var numeric = rows.some(function (r) { return typeof r.data[c] === "number"; }) &&
        rows.every(function (r) { var v = r.data[c]; return v === null || v === undefined || typeof v === "number"; }) &&
        c !== "percent" && !/(_at|_since|_until|ping|_ago_s|_id)$/.test(c);
      headRow.appendChild(el("th", numeric ? "num" : null, c === "percent" ? "progress" : head(c)));
    });
    t.appendChild(headRow);
    rows.forEach(function (r) {
      var tr = el("tr");
      if (nameKey) { tr.appendChild(el("th", "row", r.name)); }
      cols.forEach(function (c) {
        if (c === "percent" && withPct) {
          var pct = percentOf(r.data), td = el("td");
          if (pct !== null) { td.appendChild(bar(pct)); } else { td.className = "muted"; td.textContent = "-"; }
          tr.appendChild(td);
        } else {
          tr.appendChild(cell(c, r.data[c]));
        }
      });
      t.appendChild(tr);
    });
    return t;
  }
  function kvTable(obj) {
    var t = el("table", "kv");
    Object.keys(obj).forEach(function (k) {
      var tr = el("tr");
      tr.appendChild(el("th", null, title(k)));
      tr.appendChild(cell(k, obj[k]));
      t.appendChild(tr);
    });
    return t;
  }
  function none(section) { return el("div", "none", EMPTY[section] || "(none)"); }
  function render(section, value) {
    if (Array.isArray(value)) {
      if (!value.length) { return none(section); }
      if (value.every(isObj)) {
        return table(section, value.map(function (r, i) { return { name: String(r.name || r.id || i), data: r }; }), null);
      }
      return el("pre", null, value.map(String).join("\n"));
    }
    if (isObj(value)) {
      var keys = Object.keys(value);
      if (!keys.length) { return none(section); }
      if (keys.every(function (k) { return isObj(value[k]); })) {
        return table(section, keys.map(function (k) { return { name: k, data: value[k] }; }), NAME_LABEL[section] || "name");
      }
      return kvTable(value);
    }
    return el("div", "value", value === null || value === undefined ? "-" : String(value));
  }
  function renderLastError(value) {
    var box = el("div", "lasterror");
    if (!isObj(value)) { box.appendChild(el("div", "message err", String(value))); return box; }
    var message = value.message || value.error || null;
    if (!message) { box.appendChild(el("div", "none", "no errors since the start")); return box; }
    box.appendChild(el("div", "message err", message));
    var at = value.at !== undefined ? value.at : (value.time !== undefined ? value.time : value.last_error_at);
    var d = asDate("last_error_at", at);
    if (d) { box.appendChild(el("div", "when", fmtAgo(d) + " (" + fmtAbs(d) + ")")); }
    return box;
  }
  function renderResources(value) {
    if (!isObj(value) || value.error) { return render("resources", value); }
    var warn = typeof value.warn_percent === "number" ? value.warn_percent : 70;
    var crit = typeof value.critical_percent === "number" ? value.critical_percent : 90;
    var t = el("table", "kv");
    ["cpu", "memory", "disk"].forEach(function (name) {
      var pct = value[name + "_percent"];
      if (typeof pct !== "number") { return; }
      var tr = el("tr"), td = el("td");
      tr.appendChild(el("th", null, name));
      td.appendChild(bar(pct, pct >= crit ? "bad" : pct >= warn ? "warn" : "ok"));
      tr.appendChild(td);
      t.appendChild(tr);
    });
    var foot = el("tr");
    foot.appendChild(el("th", null, "status"));
    foot.appendChild(cell("status", value.status));
    t.appendChild(foot);
    var limits = el("tr");
    limits.appendChild(el("th", null, "thresholds"));
    limits.appendChild(el("td", "muted", "warn " + warn + "%, critical " + crit + "%"));
    t.appendChild(limits);
    if (typeof value.source === "string") {
      // CPU and memory are percentages of these: the container's limits (cgroup) or the host's.
      var what = value.source;
      if (typeof value.cpu_limit_cores === "number") { what += ", " + (+value.cpu_limit_cores.toFixed(2)) + " CPU"; }
      var mem = value.memory_limit_bytes;
      if (typeof mem === "number") {
        what += ", " + (mem >= 1073741824 ? (+(mem / 1073741824).toFixed(1)) + " GB" : Math.round(mem / 1048576) + " MB") + " memory";
      }
      var measured = el("tr");
      measured.appendChild(el("th", null, "measured"));
      measured.appendChild(el("td", "muted", what));
      t.appendChild(measured);
    }
    return t;
  }
  var TRENDS = [["sent", "sent per minute", false], ["failed", "failed per minute", false],
                ["received", "received per minute", false], ["queue_depth", "queue depth", true],
                ["oldest_queued_age", "oldest queued age", true]];
  // The SVG comes from a <template> in the page, so the HTML parser gives it its namespace.
  function sparkline(values) {
    var w = 240, h = 30, pad = 2;
    var template = byId("spark-template");
    if (!template || !template.content) { return el("span", "muted", "-"); }
    var svg = template.content.firstElementChild.cloneNode(true);
    var proto = svg.querySelector("polyline");
    svg.removeChild(proto);
    var max = 0;
    values.forEach(function (v) { if (typeof v === "number" && v > max) { max = v; } });
    var step = values.length > 1 ? w / (values.length - 1) : w;
    // A minute without a reading (a level before the first one) breaks the line instead of drawing 0.
    var runs = [], run = [];
    values.forEach(function (v, i) {
      if (typeof v !== "number") { if (run.length) { runs.push(run); run = []; } return; }
      var y = h - pad - (max > 0 ? (h - 2 * pad) * v / max : 0);
      run.push((i * step).toFixed(1) + "," + y.toFixed(1));
    });
    if (run.length) { runs.push(run); }
    runs.forEach(function (points) {
      if (points.length === 1) { points.push((parseFloat(points[0]) + 1).toFixed(1) + "," + points[0].split(",")[1]); }
      var line = proto.cloneNode(false);
      line.setAttribute("points", points.join(" "));
      svg.appendChild(line);
    });
    return svg;
  }
  function renderTrends(value) {
    var series = isObj(value) && isObj(value.series) ? value.series : {};
    var t = el("table", "kv");
    TRENDS.forEach(function (spec) {
      var values = Array.isArray(series[spec[0]]) ? series[spec[0]] : [];
      var numbers = values.filter(function (v) { return typeof v === "number"; });
      var tr = el("tr"), graph = el("td", "trend");
      tr.id = "trend-" + spec[0];
      tr.appendChild(el("th", null, spec[1]));
      graph.appendChild(sparkline(values));
      tr.appendChild(graph);
      var last = numbers.length ? numbers[numbers.length - 1] : null;
      var peak = numbers.length ? Math.max.apply(null, numbers) : null;
      var fmt = spec[0] === "oldest_queued_age" ? function (v) { return fmtDuration(v); } : function (v) { return String(Math.round(v)); };
      var summary = !numbers.length ? "no data yet" : spec[2] ?
        "now " + fmt(last) + ", peak " + fmt(peak) :
        numbers.reduce(function (a, b) { return a + b; }, 0) + " in the last hour, peak " + peak + "/min";
      tr.appendChild(el("td", "muted", summary));
      t.appendChild(tr);
    });
    var foot = el("tr");
    foot.appendChild(el("th", null, "window"));
    foot.appendChild(el("td", "muted", "last 60 minutes, one point per minute, newest on the right"));
    t.appendChild(foot);
    return t;
  }
  function section(key, value) {
    var s = el("section");
    s.id = "section-" + key;
    var scalar = isScalar(value);
    if (scalar) { s.className = "stat"; }
    else if (WIDE.indexOf(key) >= 0) { s.className = "wide"; }
    s.appendChild(el("h2", null, title(key)));
    if (key === "last_error") { s.className = "wide"; s.appendChild(renderLastError(value)); }
    else if (key === "resources") { s.appendChild(renderResources(value)); }
    else if (key === "trends") { s.className = "wide"; s.appendChild(renderTrends(value)); }
    else { s.appendChild(render(key, value)); }
    return s;
  }
  function rowsOf(v) {
    if (Array.isArray(v)) { return v.filter(isObj).map(function (r, i) { return { name: String(r.name || r.label || r.id || i), data: r }; }); }
    if (isObj(v)) { return Object.keys(v).filter(function (k) { return isObj(v[k]); }).map(function (k) { return { name: k, data: v[k] }; }); }
    return [];
  }
  function overall(data) {
    var bad = [], warn = [];
    // An account that needs a login is a degraded bot while another still sends, and down when none does.
    var anyConnected = rowsOf(data.accounts).some(function (r) { return r.data.connected === true; });
    [["loops", "loop"], ["breakers", "breaker"], ["accounts", "account"], ["channels", "channel"]].forEach(function (pair) {
      rowsOf(data[pair[0]]).forEach(function (r) {
        if (pair[0] === "accounts" && r.data.state === "needs_login") {
          var line = "account " + r.name + " needs login" + (r.data.fix ? " (run: " + r.data.fix + ")" : "");
          if (anyConnected) { warn.push(line); } else { bad.push(line); }
          return;
        }
        var c = stateClass(r.data.state);
        if (c === "bad") { bad.push(pair[1] + " " + r.name + " " + r.data.state); }
        else if (c === "warn") { warn.push(pair[1] + " " + r.name + " " + r.data.state); }
      });
    });
    if (isObj(data.session_key) && data.session_key.status === "key_mismatch") {
      bad.push("key_mismatch: SESSION_ENCRYPTION_KEY cannot decrypt " + (data.session_key.accounts || []).join(", "));
    }
    if (isObj(data.resources) && data.resources.status) {
      var rc = stateClass(data.resources.status);
      if (rc === "bad") { bad.push("resources critical"); } else if (rc === "warn") { warn.push("resources high"); }
    }
    if (isObj(data.watchdog) && data.watchdog.healthy === false && !bad.length) { bad.push("watchdog unhealthy"); }
    if (isObj(data.heartbeat) && data.heartbeat.consecutive_failures > 0) { warn.push("heartbeat failing"); }
    if (data.stopping === true) { warn.push("stopping"); }
    if (isObj(data.starting)) { bad.push("waiting for " + data.starting.waiting_for); }
    if (bad.length) { return { cls: "bad", text: "trouble: " + bad.concat(warn).join(", ") }; }
    if (warn.length) { return { cls: "warn", text: "degraded: " + warn.join(", ") }; }
    return { cls: "ok", text: "all healthy" };
  }
  function update(data) {
    var serverTime = typeof data.time === "string" ? Date.parse(data.time) : NaN;
    skewMs = isNaN(serverTime) ? 0 : Date.now() - serverTime;
    byId("bot").textContent = data.bot || "bot";
    document.title = (data.bot || "bot") + " status";
    byId("version").textContent = data.version ? "version " + data.version : "";
    byId("uptime").textContent = typeof data.uptime_seconds === "number" ? "up " + fmtDuration(data.uptime_seconds) : "";
    byId("time").textContent = data.time ? "as of " + data.time : "";
    var backend = byId("backend");
    if (backend) { backend.textContent = data.backend ? "database " + data.backend : ""; }
    var sandbox = byId("sandbox");
    var world = isObj(data.sandbox_world) ? data.sandbox_world : null;
    sandbox.textContent = "SANDBOX MODE: not talking to real Telegram" +
      (world && world.directory ? " \u00b7 messages stay in the local world at " + world.directory : "");
    sandbox.classList.toggle("hidden", data.sandbox !== true);
    var starting = byId("starting");
    var waiting = isObj(data.starting) ? data.starting : null;
    starting.textContent = waiting ? "STARTING: waiting for " + waiting.waiting_for + " (attempt " + waiting.attempts +
      "): " + waiting.last_error + (waiting.fix ? " \u00b7 " + waiting.fix : "") : "";
    starting.classList.toggle("hidden", !waiting);
    var pill = byId("overall");
    if (pill) {
      var o = overall(data);
      pill.textContent = o.text;
      pill.className = "pill " + o.cls;
    }
    var keys = Object.keys(data).filter(function (k) { return HEADER_KEYS.indexOf(k) < 0; });
    keys.sort(function (a, b) {
      var ia = ORDER.indexOf(a), ib = ORDER.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || (a < b ? -1 : a > b ? 1 : 0);
    });
    var main = byId("sections");
    var fresh = document.createDocumentFragment();
    keys.forEach(function (k) { fresh.appendChild(section(k, data[k])); });
    main.replaceChildren(fresh);
  }
  function showError(text) {
    var box = byId("fetch-error");
    box.textContent = text;
    box.classList.toggle("hidden", !text);
  }
  function refresh() {
    var headers = { "Accept": "application/json" };
    if (token) { headers["Authorization"] = "Bearer " + token; }
    var ctrl = new AbortController();
    var timer = setTimeout(function () { ctrl.abort(); }, REFRESH_MS);
    fetch("status", { headers: headers, cache: "no-store", signal: ctrl.signal, credentials: "omit" })
      .then(function (r) {
        if (r.status === 401) { throw new Error("unauthorized: open this page with ?token=..."); }
        if (!r.ok) { throw new Error("/status answered " + r.status); }
        return r.json();
      })
      .then(function (data) { lastOk = Date.now(); update(data); showError(""); })
      .catch(function (err) {
        showError("Could not refresh: " + (err && err.message ? err.message : err) +
                  (lastOk ? " (showing data from " + fmtDuration((Date.now() - lastOk) / 1000) + " ago)" : ""));
      })
      .then(function () {
        clearTimeout(timer);
        byId("conn").textContent = lastOk ? "updated " + new Date(lastOk).toLocaleTimeString() + ", every " + (REFRESH_MS / 1000) + "s" : "no data yet";
        setTimeout(refresh, REFRESH_MS);
      });
  }
  refresh();
})();
</script>
</body>
</html>
"""
