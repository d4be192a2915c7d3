"""Tests for shared/status_server.py over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.logs import register_secret
from shared.status_server import StatusServer

TOKEN = "status-token-7f3c9a1e5b2d4c6f"
DB_PASSWORD = "db-pass-e1f2a3b4c5"
SUPABASE_KEY = "sb-service-role-key-0a9b8c7d6e5f4a3b"
BOT_TOKEN = "987654321:AAE-botTokenForStatusTests_abcdefghijk"


def sample_status() -> dict[str, Any]:
    return {
        "processed": 10,
        "failed": 1,
        "retried": 2,
        "queues": {"outbound": 3, "retry": 0},
        "loops": {
            "sender": {"state": "running", "last_ping": "2025-01-01T12:00:00+00:00", "restarts": 0},
            "poller": {"state": "failing", "last_ping": 1735732800.0, "restarts": 4, "last_error": "boom"},
        },
        "breakers": {"telegram": {"state": "closed", "failures": 0}, "db": {"state": "open", "failures": 5}},
        "accounts": [{"name": "main", "state": "connected"}, {"name": "spare", "state": "needs_login"}],
        "history_jobs": [{"channel": "news", "percent": 42.5}, {"channel": "chat", "done": 5, "total": 20}],
        "last_error": {"message": "db timeout", "time": "2025-01-01T11:59:00+00:00"},
        "sandbox": True,
    }


ServerFactory = Callable[..., Awaitable[StatusServer]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    started: list[StatusServer] = []

    async def factory(**kwargs: Any) -> StatusServer:
        options: dict[str, Any] = {"bot": "worker", "version": "1.2.3", "port": 0, "host": "127.0.0.1", "status": sample_status}
        options.update(kwargs)
        server = StatusServer(**options)
        await server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str, dict[str, str]]:
    async with http.get(url, **kwargs) as response:
        return response.status, await response.text(), dict(response.headers)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_health_answers_200_without_a_token_and_503_when_a_loop_is_failing(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    alive = {"ok": True}
    server = await make_server(token=TOKEN, liveness=lambda: (alive["ok"], {"failing_loops": [] if alive["ok"] else ["poller"]}))

    status, body, _ = await get(http, f"{server.url}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    alive["ok"] = False
    status, body, _ = await get(http, f"{server.url}/health")
    assert status == 503
    assert json.loads(body) == {"status": "failing", "checks": {"failing_loops": ["poller"]}}


async def test_health_answers_503_when_the_liveness_check_raises(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("liveness bug")

    server = await make_server(liveness=broken)
    status, body, _ = await get(http, f"{server.url}/health")
    assert status == 503 and "liveness bug" not in body


@pytest.mark.parametrize("path", ["/status", "/metrics", "/", "/health/detailed"])
async def test_protected_paths_answer_401_without_the_token(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    async def detailed() -> dict[str, Any]:
        return {"db": "ok"}

    server = await make_server(token=TOKEN, detailed_health=detailed)
    status, body, headers = await get(http, f"{server.url}{path}")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(body) == {"error": "unauthorized"}

    for wrong in (bearer("nope"), bearer(TOKEN[:-1]), {"Authorization": f"Basic {TOKEN}"}):
        status, _, _ = await get(http, f"{server.url}{path}", headers=wrong)
        assert status == 401
    status, _, _ = await get(http, f"{server.url}{path}", params={"token": TOKEN + "x"})
    assert status == 401


async def test_token_is_accepted_as_bearer_header_or_query_parameter(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    server = await make_server(token=TOKEN)
    for kwargs in ({"headers": bearer()}, {"params": {"token": TOKEN}}, {"headers": {"authorization": f"bearer {TOKEN}"}}):
        for path in ("/status", "/metrics", "/"):
            status, _, _ = await get(http, f"{server.url}{path}", **kwargs)
            assert status == 200, (path, kwargs)


async def test_no_configured_secret_appears_in_any_response(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    for secret in (DB_PASSWORD, SUPABASE_KEY):
        register_secret(secret)

    def leaky_status() -> dict[str, Any]:
        data = sample_status()
        data["config"] = {
            "database_url": f"postgres://bot:{DB_PASSWORD}@db.local:5432/postgres",
            "supabase_key": SUPABASE_KEY,
            "alert_bot_token": BOT_TOKEN,
            "status_token": TOKEN,
        }
        data["last_error"] = {"message": f"auth failed with {SUPABASE_KEY} via bot{BOT_TOKEN}", "time": None}
        return data

    async def leaky_detailed() -> dict[str, Any]:
        return {"dsn": f"postgresql://u:{DB_PASSWORD}@h/db", "note": f"token={TOKEN}"}

    async def leaky_ready() -> tuple[bool, dict[str, Any]]:
        return False, {"db": f"cannot reach postgres://bot:{DB_PASSWORD}@db.local"}

    server = await make_server(
        token=TOKEN,
        status=leaky_status,
        readiness=leaky_ready,
        liveness=lambda: (True, {"key": SUPABASE_KEY}),
        detailed_health=leaky_detailed,
    )
    secrets = [TOKEN, DB_PASSWORD, SUPABASE_KEY, BOT_TOKEN.split(":")[1]]
    paths = ["/health", "/ready", "/status", "/metrics", "/", "/health/detailed", "/nope", "/status/../status", "/static/x"]
    seen = 0
    for path in paths:
        for kwargs in ({}, {"headers": bearer()}, {"params": {"token": TOKEN}}, {"headers": bearer("wrong")}):
            status, body, headers = await get(http, f"{server.url}{path}", **kwargs)
            everything = body + json.dumps(headers)
            for secret in secrets:
                assert secret not in everything, (path, kwargs, status, secret)
            seen += 1
    async with http.post(f"{server.url}/status", headers=bearer(), data=f"token={TOKEN}") as response:
        assert response.status == 405
        assert TOKEN not in await response.text()
    assert seen == len(paths) * 4

    status, body, _ = await get(http, f"{server.url}/status", headers=bearer())
    data = json.loads(body)
    assert status == 200 and data["processed"] == 10  # redaction did not break the payload


async def test_status_adds_bot_version_uptime_and_time_to_the_providers_dict(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    now = {"t": 1_700_000_000.0}

    async def provider() -> dict[str, Any]:
        return {"bot": "spoofed", "processed": 7, "queues": {"outbound": 1}}

    server = await make_server(status=provider, clock=lambda: now["t"], version="abc123")
    now["t"] += 90.5
    status, body, headers = await get(http, f"{server.url}/status")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    assert data["bot"] == "worker" and data["version"] == "abc123"
    assert data["uptime_seconds"] == 90.5
    assert data["time"] == "2023-11-14T22:14:50+00:00"
    assert data["processed"] == 7 and data["queues"] == {"outbound": 1}
    assert headers["Cache-Control"] == "no-store"


async def test_status_provider_that_raises_answers_500_generically_and_the_server_stays_up(
    make_server: ServerFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    calls = {"n": 0}

    def flaky() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("internal detail that must not leak")
        return {"processed": 1}

    server = await make_server(status=flaky)
    status, body, _ = await get(http, f"{server.url}/status")
    assert status == 500
    assert json.loads(body) == {"error": "internal error"}
    assert "internal detail that must not leak" in caplog.text  # logged for the operator
    status, _, _ = await get(http, f"{server.url}/status")
    assert status == 200


async def test_status_provider_that_hangs_is_cut_with_503(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    never = asyncio.Event()

    async def hanging() -> dict[str, Any]:
        await never.wait()
        return {}

    server = await make_server(status=hanging, provider_timeout=0.2)
    status, body, _ = await get(http, f"{server.url}/status")
    assert status == 503 and "timed out" in json.loads(body)["error"]
    status, _, _ = await get(http, f"{server.url}/health")
    assert status == 200


async def test_status_provider_returning_a_non_dict_answers_500(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    server = await make_server(status=lambda: ["not", "a", "dict"])
    status, _, _ = await get(http, f"{server.url}/status")
    assert status == 500


async def test_ready_reflects_the_readiness_provider(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    state: dict[str, Any] = {"mode": "ready"}
    never = asyncio.Event()

    async def readiness() -> tuple[bool, dict[str, Any]]:
        if state["mode"] == "raise":
            raise ConnectionError("db unreachable")
        if state["mode"] == "hang":
            await never.wait()
        return state["mode"] == "ready", {"db": state["mode"]}

    server = await make_server(readiness=readiness, provider_timeout=0.2)
    expected = {"ready": (200, "ready"), "down": (503, "not_ready"), "raise": (503, "not_ready"), "hang": (503, "not_ready")}
    for mode, (code, word) in expected.items():
        state["mode"] = mode
        status, body, _ = await get(http, f"{server.url}/ready")
        assert (status, json.loads(body)["status"]) == (code, word), mode

    plain = await make_server()
    status, body, _ = await get(http, f"{plain.url}/ready")
    assert status == 200 and json.loads(body) == {"status": "ready"}


async def test_metrics_are_prometheus_text_of_the_default_registry(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    server = await make_server(token=TOKEN, bot="metrics-bot", version="9.9")
    status, body, headers = await get(http, f"{server.url}/metrics", headers=bearer())
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert 'bot_info{bot="metrics-bot",version="9.9"} 1.0' in body
    assert "# TYPE bot_start_time_seconds gauge" in body


async def test_health_detailed_is_served_from_its_provider_and_404_without_one(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    async def detailed() -> dict[str, Any]:
        return {"database": {"status": "healthy"}, "overall": "healthy"}

    server = await make_server(token=TOKEN, detailed_health=detailed)
    status, body, _ = await get(http, f"{server.url}/health/detailed", headers=bearer())
    data = json.loads(body)
    assert status == 200 and data["overall"] == "healthy" and data["bot"] == "worker"

    bare = await make_server(token=TOKEN)
    status, _, _ = await get(http, f"{bare.url}/health/detailed", headers=bearer())
    assert status == 404


async def test_unknown_paths_404_other_methods_405_and_oversized_requests_are_refused(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    status, body, _ = await get(http, f"{server.url}/etc/passwd")
    assert status == 404 and json.loads(body) == {"error": "not found"}
    async with http.post(f"{server.url}/health", data=b"x" * 1024) as response:
        assert response.status == 405
    status, _, _ = await get(http, f"{server.url}/health", headers={"X-Big": "a" * 20_000})
    assert status in (400, 431)
    status, _, _ = await get(http, f"{server.url}/health")
    assert status == 200


async def test_without_a_token_configured_every_path_is_open(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    server = await make_server(token=None)
    for path in ("/status", "/metrics", "/"):
        status, _, _ = await get(http, f"{server.url}{path}")
        assert status == 200, path


async def test_port_zero_binds_a_free_port_and_stop_releases_it(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    server = await make_server()
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, f"{server.url}/health")


async def test_page_is_self_contained_html_with_a_nonce_csp_and_no_token(make_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    server = await make_server(token=TOKEN, bot="<ingest>")
    status, body, headers = await get(http, f"{server.url}/", params={"token": TOKEN})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert TOKEN not in body
    assert "&lt;ingest&gt;" in body and "<ingest>" not in body
    nonce = re.search(r"script-src 'nonce-([^']+)'", headers["Content-Security-Policy"])
    assert nonce and f'<script nonce="{nonce.group(1)}">' in body
    assert "<script src" not in body and "http://" not in body and "https://" not in body
    assert headers["Referrer-Policy"] == "no-referrer"


_NODE_HARNESS = r"""
const fs = require("fs");
const [scriptPath, dataPath] = process.argv.slice(2);
const DATA = JSON.parse(fs.readFileSync(dataPath, "utf8"));
class El {
  constructor(tag) { this.tagName = tag; this.children = []; this.className = ""; this._text = ""; this.style = {}; this.id = "";
    const self = this;
    this.classList = {
      toggle(c, force) { const s = new Set(self.className.split(" ").filter(Boolean));
        if (force === undefined ? !s.has(c) : force) { s.add(c); } else { s.delete(c); } self.className = [...s].join(" "); },
      contains(c) { return self.className.split(" ").includes(c); } };
  }
  appendChild(c) { if (c.isFragment) { this.children.push(...c.children); } else { this.children.push(c); } return c; }
  replaceChildren(...cs) { this.children = []; cs.forEach((c) => this.appendChild(c)); }
  set textContent(t) { this._text = String(t); this.children = []; }
  get textContent() { return [this._text, ...this.children.map((c) => c.textContent)].filter(Boolean).join(" "); }
  find(pred, out = []) { if (pred(this)) { out.push(this); } this.children.forEach((c) => c.find(pred, out)); return out; }
}
const ids = {};
["sandbox", "fetch-error", "starting", "bot", "version", "uptime", "time", "conn", "sections", "overall", "backend"].forEach((id) => {
  ids[id] = new El("div"); ids[id].id = id;
  if (id === "sandbox" || id === "fetch-error" || id === "starting") { ids[id].className = "banner hidden"; } });
globalThis.document = {
  title: "", getElementById: (id) => ids[id], createElement: (tag) => new El(tag),
  createDocumentFragment: () => { const f = new El("#fragment"); f.isFragment = true; return f; },
};
globalThis.window = { location: { search: "?token=from-url" } };
const requests = [];
globalThis.fetch = (url, opts) => { requests.push({ url, headers: opts.headers });
  return Promise.resolve({ status: 200, ok: true, json: () => Promise.resolve(DATA) }); };
globalThis.setTimeout = () => 0;
globalThis.clearTimeout = () => {};
(0, eval)(fs.readFileSync(scriptPath, "utf8"));
setImmediate(() => setImmediate(() => {
  const sections = ids["sections"].children.map((s) => ({ id: s.id, text: s.textContent }));
  const bars = ids["sections"].find((e) => e.className === "bar").map((b) => b.textContent);
  const bad = ids["sections"].find((e) => e.className === "bad").map((b) => b.textContent);
  const fills = ids["sections"].find((e) => e.className === "bar").map((b) => b.children[0].className || "");
  const heads = ids["sections"].children.map((s) => ({ id: s.id, cls: s.className,
    heads: s.find((e) => e.tagName === "th").map((e) => e.textContent) }));
  console.log(JSON.stringify({ requests, sections, bars, bad, title: globalThis.document.title,
    sandboxHidden: ids["sandbox"].classList.contains("hidden"), error: ids["fetch-error"].textContent,
    startingHidden: ids["starting"].classList.contains("hidden"),
    uptime: ids["uptime"].textContent, overall: { text: ids["overall"].textContent, cls: ids["overall"].className },
    sandboxText: ids["sandbox"].textContent, backend: ids["backend"].textContent, fills, heads }));
}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed; the page script is only syntax-checked by a browser")
async def test_page_script_renders_every_status_section(make_server: ServerFactory, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    server = await make_server()
    _, page, _ = await get(http, f"{server.url}/")
    _, status_body, _ = await get(http, f"{server.url}/status")
    script = re.search(r"<script nonce=\"[^\"]+\">(.*?)</script>", page, re.S)
    assert script is not None
    (tmp_path / "page.js").write_text(script.group(1))
    (tmp_path / "status.json").write_text(status_body)
    (tmp_path / "harness.js").write_text(_NODE_HARNESS)

    proc = await asyncio.create_subprocess_exec(
        "node", str(tmp_path / "harness.js"), str(tmp_path / "page.js"), str(tmp_path / "status.json"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])

    assert result["requests"] == [{"url": "status", "headers": {"Accept": "application/json", "Authorization": "Bearer from-url"}}]
    assert result["title"] == "worker status" and result["error"] == "" and result["uptime"].startswith("up ")
    assert result["sandboxHidden"] is False
    sections = {s["id"].removeprefix("section-"): s["text"] for s in result["sections"]}
    assert list(sections)[:6] == ["last_error", "loops", "accounts", "queues", "breakers", "history_jobs"]
    assert "db timeout" in sections["last_error"] and "ago" in sections["last_error"]
    assert "sender" in sections["loops"] and "poller" in sections["loops"] and "restarts" in sections["loops"]
    assert "needs_login" in sections["accounts"] and "outbound 3" in sections["queues"]
    assert result["bars"] == ["42.5%", "25.0%"]
    assert {"failing", "open"} <= set(result["bad"])
    assert "needs_login" not in result["bad"], "an account that needs a login is amber: the bot may still send with others"
    assert {"processed", "failed", "retried"} <= set(sections)


async def run_page_script(page: str, status: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Run the page's script in node against ``status`` (the fake DOM of ``_NODE_HARNESS``) and return what it shows."""
    script = re.search(r"<script nonce=\"[^\"]+\">(.*?)</script>", page, re.S)
    assert script is not None
    (tmp_path / "page.js").write_text(script.group(1))
    (tmp_path / "status.json").write_text(json.dumps(status))
    (tmp_path / "harness.js").write_text(_NODE_HARNESS)
    proc = await asyncio.create_subprocess_exec(
        "node", str(tmp_path / "harness.js"), str(tmp_path / "page.js"), str(tmp_path / "status.json"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed; the browser test covers the page")
async def test_page_script_sums_up_trouble_and_measures_ages_on_the_server_clock(
    make_server: ServerFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    server = await make_server()
    _, page, _ = await get(http, f"{server.url}/")
    server_now = 1577836800.0  # 2020-01-01T00:00:00Z: years behind the clock node runs on
    status = {
        "bot": "worker", "version": "1.0", "uptime_seconds": 65, "time": "2020-01-01T00:00:00+00:00",
        "sandbox": True, "backend": "embedded", "stopping": False,
        "sandbox_world": {"mode": "sandbox", "directory": "/data/sandbox"},
        "last_error": {"message": "db timeout", "at": server_now - 10},
        "loops": {
            "sender": {"state": "running", "alive": True, "last_ping_ago_s": 1.5, "max_silence_s": 60.0, "restarts": 0,
                       "last_error": None, "last_error_at": None},
            "poller": {"state": "failing", "alive": True, "last_ping_ago_s": 300.0, "max_silence_s": 60.0, "restarts": 6,
                       "last_error": "boom", "last_error_at": server_now - 120},
        },
        "breakers": {"db": {"name": "db", "state": "open", "consecutive_failures": 5, "failure_threshold": 5, "retry_in_s": 30.0}},
        "accounts": {"spare": {"id": 2, "state": "needs_login", "connected": False, "queue_depth": 4,
                               "flood_wait_until": server_now + 90}},
        "resources": {"status": "degraded", "cpu_percent": 75.0, "memory_percent": 20.0, "disk_percent": 91.0,
                      "warn_percent": 70.0, "critical_percent": 90.0},
    }
    result = await run_page_script(page, status, tmp_path)

    assert result["overall"]["cls"] == "pill bad"
    assert result["overall"]["text"] == (
        "trouble: loop poller failing, breaker db open, account spare needs login, resources high"
    )
    assert result["backend"] == "database embedded"
    assert result["sandboxText"].endswith("local world at /data/sandbox") and result["sandboxHidden"] is False
    sections = {s["id"].removeprefix("section-"): s["text"] for s in result["sections"]}
    assert "10s ago" in sections["last_error"], "the age is measured on the server's clock, not the browser's"
    assert "1.5s ago" in sections["loops"] and "5m 0s ago" in sections["loops"] and "2m 0s ago" in sections["loops"]
    assert "in 1m 30s" in sections["accounts"], "a flood wait ends in the future"
    heads = {h["id"].removeprefix("section-"): h for h in result["heads"]}
    assert heads["loops"]["heads"][:4] == ["loop", "state", "last ping", "restarts"]
    assert "max silence" not in heads["loops"]["heads"], "noise columns are left out"
    assert "last error" in heads["loops"]["heads"], "a column with a value in any row is kept"
    assert "flood wait" in heads["accounts"]["heads"] and "queue" in heads["accounts"]["heads"] and "id" not in heads["accounts"]["heads"]
    assert "failure threshold" not in heads["breakers"]["heads"]
    assert heads["loops"]["cls"] == "wide" and heads["last_error"]["cls"] == "wide"
    assert result["fills"] == ["warn", "ok", "bad"], "cpu high, memory fine, disk critical"
    assert {"failing", "open", "no"} <= set(result["bad"]) and "needs_login" not in set(result["bad"])


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed; the browser test covers the page")
async def test_page_script_says_all_healthy_and_shows_no_red_when_nothing_is_wrong(
    make_server: ServerFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    server = await make_server()
    _, page, _ = await get(http, f"{server.url}/")
    status = {
        "bot": "ingest", "time": "2030-06-01T12:00:00+00:00", "sandbox": False,
        "last_error": {"message": None, "at": None},
        "loops": {"poll": {"state": "running", "last_ping_ago_s": 0.0, "restarts": 0}},
        "breakers": {"r2": {"state": "closed", "consecutive_failures": 0}},
        "channels": {"@photos": {"state": "active", "last_message_id": 120, "stored": 40}},
        "queues": {},
        "history_jobs": [],
    }
    result = await run_page_script(page, status, tmp_path)
    assert result["overall"] == {"text": "all healthy", "cls": "pill ok"}
    assert result["bad"] == [] and result["sandboxHidden"] is True and result["startingHidden"] is True
    sections = {s["id"].removeprefix("section-"): s["text"] for s in result["sections"]}
    assert list(sections)[:3] == ["last_error", "loops", "channels"]
    assert "no errors since the start" in sections["last_error"]
    assert "no retry queues" in sections["queues"] and "no history sync jobs" in sections["history_jobs"]


async def test_a_bearer_that_is_not_utf8_is_refused_with_401_and_not_a_500(make_server: ServerFactory) -> None:
    server = await make_server(token=TOKEN)
    request = (
        b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Bearer \xe9\xff" + TOKEN.encode() + b"\r\n\r\n"
    )
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 10)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 401"), status_line
    assert b"unauthorized" in answer and TOKEN.encode() not in answer
