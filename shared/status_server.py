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
* ``GET /``: a self-refreshing HTML page that renders ``/status`` for a person.

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
        self._token_bytes = self._token.encode("utf-8") if self._token else b""
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
        header_ok = hmac.compare_digest(from_header.encode("utf-8"), self._token_bytes)
        query_ok = hmac.compare_digest(from_query.encode("utf-8"), self._token_bytes)
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


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;"))


# The operator page: plain HTML + vanilla JS, no build step. It reads the token
# from its own URL (?token=...) and sends it as a Bearer header; the server never
# writes the token into the page. All data goes in through textContent.
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{{TITLE}} status</title>
<style nonce="{{NONCE}}">
  :root { --bg:#0f1115; --panel:#171a21; --text:#e6e6e6; --muted:#8a93a6; --ok:#2ecc71; --warn:#f1c40f; --bad:#e74c3c; --line:#262b36; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; background:var(--bg); color:var(--text); }
  header { display:flex; flex-wrap:wrap; gap:16px; align-items:baseline; padding:12px 16px; border-bottom:1px solid var(--line); }
  header h1 { font-size:18px; margin:0; }
  header .meta { color:var(--muted); }
  #conn { margin-left:auto; }
  main { padding:12px 16px; display:grid; gap:12px; grid-template-columns:repeat(auto-fit, minmax(420px, 1fr)); }
  section { background:var(--panel); border:1px solid var(--line); border-radius:6px; padding:10px 12px; overflow:auto; }
  section h2 { font-size:14px; margin:0 0 8px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted); }
  table { border-collapse:collapse; width:100%; }
  th, td { text-align:left; padding:3px 8px 3px 0; border-bottom:1px solid var(--line); vertical-align:top; }
  th { color:var(--muted); font-weight:600; }
  td.num { font-variant-numeric: tabular-nums; }
  .ok { color:var(--ok); } .warn { color:var(--warn); } .bad { color:var(--bad); font-weight:600; }
  .banner { padding:12px 16px; font-weight:700; text-align:center; }
  .banner.sandbox { background:#8e44ad; color:#fff; font-size:18px; letter-spacing:.08em; }
  .banner.error { background:#5c1d1d; color:#ffd7d7; }
  .hidden { display:none; }
  .bar { position:relative; height:14px; min-width:140px; background:#262b36; border-radius:7px; overflow:hidden; }
  .bar > span { position:absolute; left:0; top:0; bottom:0; background:var(--ok); }
  .bar > em { position:relative; font-style:normal; font-size:11px; padding-left:6px; }
  pre { margin:0; white-space:pre-wrap; word-break:break-word; color:var(--muted); }
  .age { color:var(--muted); font-size:12px; }
</style>
</head>
<body>
<div id="sandbox" class="banner sandbox hidden">SANDBOX MODE: not talking to real Telegram</div>
<div id="fetch-error" class="banner error hidden"></div>
<header>
  <h1 id="bot">{{TITLE}}</h1>
  <span class="meta" id="version"></span>
  <span class="meta" id="uptime"></span>
  <span class="meta" id="time"></span>
  <span class="meta" id="conn">loading...</span>
</header>
<main id="sections"></main>
<script nonce="{{NONCE}}">
"use strict";
(function () {
  var REFRESH_MS = 5000;
  var params = new URLSearchParams(window.location.search);
  var token = params.get("token") || "";
  var lastOk = 0;
  var HEADER_KEYS = ["bot", "version", "uptime_seconds", "time", "sandbox"];
  var ORDER = ["last_error", "loops", "accounts", "channels", "queues", "breakers", "history_jobs", "counters", "alerts"];
  var BAD = ["failing", "failed", "open", "dead", "error", "needs_login", "stopped", "crashed", "exhausted", "down", "unhealthy"];
  var WARN = ["half_open", "degraded", "restarting", "retrying", "stale", "rate_limited", "waiting", "paused", "starting", "flood_wait"];
  var GOOD = ["ok", "running", "closed", "healthy", "connected", "ready", "idle", "done", "active", "alive"];

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function isObj(v) { return v !== null && typeof v === "object" && !Array.isArray(v); }
  function title(key) { return String(key).replace(/_/g, " "); }
  function fmtDuration(sec) {
    sec = Math.max(0, Math.round(sec));
    var d = Math.floor(sec / 86400), h = Math.floor(sec % 86400 / 3600), m = Math.floor(sec % 3600 / 60), s = sec % 60;
    if (d) { return d + "d " + h + "h"; }
    if (h) { return h + "h " + m + "m"; }
    if (m) { return m + "m " + s + "s"; }
    return s + "s";
  }
  function asDate(key, v) {
    if (typeof v === "string" && /^\\d{4}-\\d{2}-\\d{2}T\\d{2}:\\d{2}/.test(v)) {
      var d = new Date(v); return isNaN(d.getTime()) ? null : d;
    }
    if (typeof v === "number" && /(_at|_time|time|ping|seen|heartbeat)$/.test(key) && v > 1e9 && v < 1e11) {
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
    var done = row.done !== undefined ? row.done : row.processed;
    if (typeof done === "number" && typeof row.total === "number" && row.total > 0) { return 100 * done / row.total; }
    return null;
  }
  function bar(pct) {
    var wrap = el("div", "bar");
    var fill = el("span");
    var p = Math.max(0, Math.min(100, pct));
    fill.style.width = p.toFixed(1) + "%";
    wrap.appendChild(fill);
    wrap.appendChild(el("em", null, p.toFixed(1) + "%"));
    return wrap;
  }
  function cell(key, v) {
    var td = el("td");
    if (key === "percent" && typeof v === "number") { td.appendChild(bar(v)); return td; }
    var d = asDate(key, v);
    if (d) {
      td.appendChild(el("span", null, fmtDuration((Date.now() - d.getTime()) / 1000) + " ago"));
      td.appendChild(el("div", "age", d.toISOString().replace("T", " ").replace(/\\.\\d+Z$/, "Z")));
      return td;
    }
    if (v === null || v === undefined) { td.textContent = "-"; return td; }
    if (typeof v === "number") { td.className = "num"; td.textContent = String(Math.round(v * 1000) / 1000); return td; }
    if (typeof v === "boolean") { td.textContent = v ? "yes" : "no"; return td; }
    if (typeof v === "object") { td.appendChild(el("pre", null, JSON.stringify(v, null, 1))); return td; }
    td.textContent = String(v);
    var c = stateClass(v);
    if (c) { td.className = c; }
    return td;
  }
  function table(rows, nameKey) {
    var cols = [];
    rows.forEach(function (r) { Object.keys(r.data).forEach(function (k) { if (cols.indexOf(k) < 0) { cols.push(k); } }); });
    var withPct = rows.some(function (r) { return percentOf(r.data) !== null; });
    if (withPct && cols.indexOf("percent") < 0) { cols.push("percent"); }
    var t = el("table"), head = el("tr");
    if (nameKey) { head.appendChild(el("th", null, nameKey)); }
    cols.forEach(function (c) { head.appendChild(el("th", null, c === "percent" ? "progress" : title(c))); });
    t.appendChild(head);
    rows.forEach(function (r) {
      var tr = el("tr");
      if (nameKey) { tr.appendChild(el("td", null, r.name)); }
      cols.forEach(function (c) {
        if (c === "percent" && withPct) {
          var pct = percentOf(r.data), td = el("td");
          if (pct !== null) { td.appendChild(bar(pct)); } else { td.textContent = "-"; }
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
    var t = el("table");
    Object.keys(obj).forEach(function (k) {
      var tr = el("tr");
      tr.appendChild(el("th", null, title(k)));
      tr.appendChild(cell(k, obj[k]));
      t.appendChild(tr);
    });
    return t;
  }
  function render(value) {
    if (Array.isArray(value)) {
      if (value.length && value.every(isObj)) {
        return table(value.map(function (r, i) { return { name: String(r.name || r.id || i), data: r }; }), null);
      }
      return el("pre", null, value.length ? value.map(String).join("\\n") : "(none)");
    }
    if (isObj(value)) {
      var keys = Object.keys(value);
      if (!keys.length) { return el("pre", null, "(none)"); }
      if (keys.every(function (k) { return isObj(value[k]); })) {
        return table(keys.map(function (k) { return { name: k, data: value[k] }; }), "name");
      }
      return kvTable(value);
    }
    return el("pre", null, value === null || value === undefined ? "-" : String(value));
  }
  function section(key, value) {
    var s = el("section");
    s.id = "section-" + key;
    s.appendChild(el("h2", null, title(key)));
    s.appendChild(render(value));
    return s;
  }
  function update(data) {
    document.getElementById("bot").textContent = data.bot || "bot";
    document.title = (data.bot || "bot") + " status";
    document.getElementById("version").textContent = data.version ? "version " + data.version : "";
    document.getElementById("uptime").textContent = typeof data.uptime_seconds === "number" ? "up " + fmtDuration(data.uptime_seconds) : "";
    document.getElementById("time").textContent = data.time ? "as of " + data.time : "";
    document.getElementById("sandbox").classList.toggle("hidden", data.sandbox !== true);
    var keys = Object.keys(data).filter(function (k) { return HEADER_KEYS.indexOf(k) < 0; });
    keys.sort(function (a, b) {
      var ia = ORDER.indexOf(a), ib = ORDER.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || (a < b ? -1 : a > b ? 1 : 0);
    });
    var main = document.getElementById("sections");
    var fresh = document.createDocumentFragment();
    keys.forEach(function (k) { fresh.appendChild(section(k, data[k])); });
    main.replaceChildren(fresh);
  }
  function showError(text) {
    var box = document.getElementById("fetch-error");
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
        document.getElementById("conn").textContent = lastOk ? "updated " + new Date(lastOk).toLocaleTimeString() : "no data yet";
        setTimeout(refresh, REFRESH_MS);
      });
  }
  refresh();
})();
</script>
</body>
</html>
"""
