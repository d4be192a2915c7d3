"""The operator page at ``GET /`` rendered by a real browser (headless Chromium).

A real worker runs in sandbox mode in-process (real PostgreSQL, the Telegram
sandbox); Chromium loads ``/?token=...``, runs the page's script, which
fetches ``/status``, and the test reads what a person would see in the DOM it
dumps. Chromium is Debian's ``chromium``, which ``.ci/run`` installs when it
is missing; without it the tests are skipped with the reason.

``STATUS_PAGE_SCREENSHOT=/path/page.png`` also saves a screenshot of the page.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from shared.breaker import registry as breakers
from shared.errors import TransientError
from shared.health import ResourceSample, ResourceThresholds, resources_status
from devkit.sandbox import FaultKind, World
from shared.status_server import StatusServer
from tests.test_worker import FAST, account_ids, running_worker, wait_until

TOKEN = "page-token-5d1c7e9a3f"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RENDER_TIMEOUT = 60.0

# Two renders (DOM and screenshot) of a worker under load may take longer than the suite's 120 s.
pytestmark = pytest.mark.timeout(RENDER_TIMEOUT * 2 + 120)


# --- the browser --------------------------------------------------------------------------------


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def browser() -> str:
    """Path of a headless-capable Chromium, else a skip with the reason."""
    found = find_browser()
    if found is None:
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it)")
    return found


async def render(browser: str, url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """Load ``url`` in headless Chromium, let its scripts run (5 s of virtual time), return the DOM."""
    args = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000",
    ]
    args += [f"--screenshot={screenshot}", "--window-size=1280,1600"] if screenshot else ["--dump-dom"]
    profile.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "HOME": str(profile)},
    )
    try:
        async with asyncio.timeout(RENDER_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"chromium did not finish within {RENDER_TIMEOUT:.0f}s") from None
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode("utf-8", errors="replace")


# --- reading the DOM like a person ------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    @property
    def text(self) -> str:
        """The visible text, whitespace collapsed (script and style left out)."""
        parts: list[str] = []
        for child in self.children:
            if isinstance(child, str):
                parts.append(child)
            elif child.tag not in ("script", "style"):
                parts.append(child.text)
        return re.sub(r"\s+", " ", " ".join(parts)).strip()

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find(self, *, tag: str | None = None, cls: str | None = None, id: str | None = None) -> list[Node]:  # noqa: A002
        return [
            n for n in self.iter()
            if (tag is None or n.tag == tag) and (cls is None or cls in n.classes) and (id is None or n.attrs.get("id") == id)
        ]

    def by_id(self, id: str) -> Node:  # noqa: A002
        found = self.find(id=id)
        assert found, f"no element with id {id!r}"
        return found[0]

    def rows(self) -> dict[str, str]:
        """Each table row's text keyed by its first cell."""
        result: dict[str, str] = {}
        for tr in self.find(tag="tr"):
            cells = [c for c in tr.children if isinstance(c, Node)]
            if cells:
                result[cells[0].text] = tr.text
        return result


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(dom: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(dom)
    builder.close()
    return builder.root


def visible(node: Node) -> bool:
    return "hidden" not in node.classes


# --- the tests -----------------------------------------------------------------------------------


@pytest.fixture
def page_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {
        **FAST,
        "DATABASE_URL": database_url,
        "SANDBOX_DIR": str(tmp_path / "sandbox"),
        "DATA_DIR": str(tmp_path / "data"),
        "STATUS_TOKEN": TOKEN,
        "HISTORY_PAGE_SIZE": "10",
        "RECONCILE_INTERVAL": "3600",
    }


@pytest.fixture
def open_breaker() -> Iterator[str]:
    """A breaker of the process registry, opened by a real failure (closed again after the test)."""
    name = "status_page_api"
    breaker = breakers.get_or_create(name, failure_threshold=1, recovery_timeout=3600.0)
    breaker.record_failure(TransientError("upstream answered 503"))
    try:
        yield name
    finally:
        breaker.reset()


async def test_operator_page_shows_loops_accounts_queues_breakers_history_errors_and_the_sandbox(
    browser: str, page_env: dict[str, str], tmp_path: Path, open_breaker: str
) -> None:
    world = World.open(Path(page_env["SANDBOX_DIR"]))
    world.seed_demo()
    for n in range(60):
        world.send_incoming("@alice", "@demo_one", f"old {n:02d}", gap=True)
    world.set_fault(FaultKind.LATENCY, method="GetHistory", ms=50)

    async with running_worker(page_env) as worker:
        runtime = worker.runtime
        db = worker.db
        assert db is not None
        # Fixed numbers: the machine's own load (Chromium rendering, other tests) must not decide what is red.
        def sample(path: Path) -> ResourceSample:
            return ResourceSample(
                cpu_percent=23.0, memory_percent=41.0, disk_percent=76.0, disk_path=str(path),
                source="cgroup v2", memory_limit_bytes=512 * 1024**2, cpu_limit_cores=1.5,
            )

        runtime.add_section(
            "resources",
            lambda: resources_status(Path(page_env["DATA_DIR"]), thresholds=ResourceThresholds(), sampler=sample),
        )
        ids = await account_ids(worker)
        later = datetime.now(UTC) + timedelta(hours=1)
        for n in range(3):
            await db.enqueue_outbound(ids["demo_one"], "bob", f"scheduled {n}", send_at=later)
        await db.enqueue_outbound(ids["demo_two"], "@nobody_by_this_name", "to nobody")
        await db.create_history_job(ids["demo_one"], world.peer("@alice").id, target_count=60)

        assert worker.history is not None
        history = worker.history
        await wait_until(lambda: any(p.fetched >= 10 for p in history.progress.values()), what="history job under way")
        await wait_until(lambda: runtime.stats.last_error is not None, what="the failed send recorded")
        last_error = runtime.stats.last_error
        assert last_error is not None

        url = f"{runtime.status_server.url}/?token={TOKEN}"
        dom = await render(browser, url, tmp_path / "profile")
        if os.environ.get("STATUS_PAGE_SCREENSHOT"):
            await render(browser, url, tmp_path / "profile-shot", screenshot=Path(os.environ["STATUS_PAGE_SCREENSHOT"]))

    page = parse(dom)
    assert TOKEN not in dom, "the page never writes the token into itself"
    assert page.by_id("bot").text == "worker"
    assert not visible(page.by_id("fetch-error")), page.by_id("fetch-error").text

    banner = page.by_id("sandbox")
    assert visible(banner) and banner.text.startswith("SANDBOX MODE: not talking to real Telegram")
    assert page_env["SANDBOX_DIR"] in banner.text

    overall = page.by_id("overall")
    assert "bad" in overall.classes
    assert overall.text == f"trouble: breaker {open_breaker} open, resources high", overall.text

    loops = page.by_id("section-loops")
    header = loops.find(tag="tr")[0].text
    assert "last ping" in header and "restarts" in header
    rows = loops.rows()
    for name in ("accounts", "sync", "outbound", "history", "jobs"):
        assert name in rows, f"loop {name} missing: {rows}"
        assert "running" in rows[name] and re.search(r"\d+(\.\d)?s ago", rows[name]), rows[name]

    accounts = page.by_id("section-accounts")
    header = accounts.find(tag="tr")[0].text
    assert "connected" in header and "queue" in header
    rows = accounts.rows()
    assert set(rows) >= {"demo_one", "demo_two"}
    table = [[c.text for c in tr.children if isinstance(c, Node)] for tr in accounts.find(tag="tr")]
    demo_one = dict(zip(table[0], next(row for row in table if row[0] == "demo_one"), strict=True))
    assert demo_one["state"] == "connected" and demo_one["connected"] == "yes" and demo_one["queue"] == "3"

    breaker_rows = page.by_id("section-breakers").rows()
    assert "closed" in breaker_rows["database"]
    assert "open" in breaker_rows[open_breaker] and "upstream answered 503" in breaker_rows[open_breaker]
    assert any(cell.text == "open" for cell in page.by_id("section-breakers").find(cls="bad")), "an open breaker is red"

    bars = page.by_id("section-history_jobs").find(cls="bar")
    assert len(bars) == 1 and re.fullmatch(r"\d{1,3}\.\d%", bars[0].text), [b.text for b in bars]
    assert float(bars[0].text.rstrip("%")) >= 100 * 10 / 60 - 0.1

    error = page.by_id("section-last_error")
    assert html.unescape(last_error) in error.text and " ago (" in error.text

    resources = page.by_id("section-resources")
    rows = resources.rows()
    assert rows["cpu"] == "cpu 23.0%" and rows["memory"] == "memory 41.0%" and rows["disk"] == "disk 76.0%"
    fills = [bar.find(tag="span")[0].attrs.get("class") for bar in resources.find(cls="bar")]
    assert fills == ["ok", "ok", "warn"], "disk above the warning threshold is amber, not red"
    assert rows["measured"] == "measured cgroup v2, 1.5 CPU, 512 MB memory", "what the percentages are of"

    fleet = page.by_id("section-fleet")
    header = fleet.find(tag="tr")[0].text
    assert "replica" in header and "accounts held" in header and "target share" in header
    [(replica, row)] = [(name, text) for name, text in fleet.rows().items() if name != "replica"]
    assert replica.startswith("telegram-main:") and "alive" in row, row

    for section in ("heartbeat", "alerts", "counters", "sandbox_world", "session_key"):
        assert page.find(id=f"section-{section}"), f"section {section} missing"
    red = [n.text for n in page.find(cls="bad") if n is not overall]
    assert red == ["open"], f"red only for trouble: {red}"


async def test_operator_page_says_when_the_status_cannot_be_fetched(browser: str, tmp_path: Path) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("status provider broke")

    server = StatusServer(bot="ingest", version="9.9.9", port=0, host="127.0.0.1", token=TOKEN, status=broken)
    await server.start()
    try:
        dom = await render(browser, f"{server.url}/?token={TOKEN}", tmp_path / "profile")
        wrong = await render(browser, f"{server.url}/?token=nope", tmp_path / "profile2")
    finally:
        await server.stop()
    page = parse(dom)
    problem = page.by_id("fetch-error")
    assert visible(problem) and "Could not refresh: /status answered 500" in problem.text
    assert page.by_id("bot").text == "ingest"
    assert "status provider broke" not in dom, "the page shows no internals"
    assert "unauthorized" in parse(wrong).text, "a wrong token gets the 401 answer, not the page"


async def test_operator_page_says_what_start_up_is_waiting_for(browser: str, tmp_path: Path) -> None:
    def starting() -> dict[str, Any]:
        waiting = {"waiting_for": "the database", "attempts": 3, "last_error": "cannot connect to the database: refused",
                   "fix": "check DATABASE_URL"}
        return {"bot": "worker", "version": "9.9.9", "starting": waiting, "loops": {}}

    server = StatusServer(bot="worker", version="9.9.9", port=0, host="127.0.0.1", token=TOKEN, status=starting)
    await server.start()
    try:
        page = parse(await render(browser, f"{server.url}/?token={TOKEN}", tmp_path / "profile"))
    finally:
        await server.stop()
    banner = page.by_id("starting")
    assert visible(banner)
    assert banner.text == (
        "STARTING: waiting for the database (attempt 3): cannot connect to the database: refused \u00b7 check DATABASE_URL"
    )
    assert page.by_id("overall").text == "trouble: waiting for the database"


async def test_accounts_that_need_a_login_show_with_their_fix_and_turn_the_verdict_degraded_then_red(
    browser: str, page_env: dict[str, str], tmp_path: Path
) -> None:
    import aiohttp

    from shared.config import WorkerSettings, load_settings
    from shared.db import open_database
    from shared.db.records import AccountStatus
    from worker import seed_sandbox_accounts
    from shared.telegram import session_cipher

    settings = load_settings(WorkerSettings, page_env)
    world = World.open(Path(page_env["SANDBOX_DIR"]))
    db = await open_database(settings)
    try:
        await seed_sandbox_accounts(db, world, session_cipher(settings))
        ids = {a.label: a.id for a in await db.list_accounts()}
        await db.set_account_status(ids["demo_two"], AccountStatus.NEEDS_LOGIN, last_error="session revoked")
    finally:
        await db.close()

    async def status_and_ready(url: str) -> tuple[dict[str, Any], int]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.get(f"{url}/status") as response:
                status = await response.json()
            async with http.get(f"{url}/ready") as response:
                return status, response.status

    def calm(path: Path) -> ResourceSample:  # the machine's own load must not decide the verdict
        return ResourceSample(cpu_percent=10.0, memory_percent=10.0, disk_percent=10.0, disk_path=str(path))

    def fixed_resources(worker: Any) -> None:
        worker.runtime.add_section(
            "resources", lambda: resources_status(Path(page_env["DATA_DIR"]), thresholds=ResourceThresholds(), sampler=calm)
        )

    async with running_worker(page_env, accounts=1) as worker:
        fixed_resources(worker)
        url = worker.runtime.status_server.url
        status, ready = await status_and_ready(url)
        demo_two = status["accounts"]["demo_two"]
        assert demo_two["state"] == "needs_login" and demo_two["fix"] == "./start.sh worker login --label demo_two"
        assert ready == 200, "demo_one still sends"
        dom = await render(browser, f"{url}/?token={TOKEN}", tmp_path / "profile")
        overall = parse(dom).by_id("overall")
        assert "warn" in overall.classes
        assert overall.text == "degraded: account demo_two needs login (run: ./start.sh worker login --label demo_two)"

    db = await open_database(settings)
    try:
        await db.set_account_status(ids["demo_one"], AccountStatus.NEEDS_LOGIN, last_error="session revoked")
    finally:
        await db.close()
    async with running_worker(page_env, accounts=0) as worker:
        fixed_resources(worker)
        url = worker.runtime.status_server.url
        status, ready = await status_and_ready(url)
        assert {status["accounts"][label]["state"] for label in ("demo_one", "demo_two")} == {"needs_login"}
        assert ready == 503, "no account can send"
        dom = await render(browser, f"{url}/?token={TOKEN}", tmp_path / "profile-2")
        overall = parse(dom).by_id("overall")
        assert "bad" in overall.classes and "account demo_one needs login" in overall.text


async def test_operator_page_draws_the_last_hours_trends_as_sparklines_after_a_burst(
    browser: str, page_env: dict[str, str], tmp_path: Path
) -> None:
    from PIL import Image

    from shared.trends import trends

    world = World.open(Path(page_env["SANDBOX_DIR"]))
    world.seed_demo()
    trends.clear()  # the process's hour: only this burst
    async with running_worker(page_env) as worker:
        db = worker.db
        assert db is not None
        ids = await account_ids(worker)
        for n in range(30):
            await db.enqueue_outbound(ids["demo_one"], "alice", f"burst {n}")
        await db.enqueue_outbound(ids["demo_one"], "alice", "with a missing file", attachments=[str(tmp_path / "missing.jpg")])  # fails at send
        for n in range(4):
            world.send_incoming("@bob", "@demo_one", f"hello {n}")
        await wait_until(lambda: sum(v or 0 for v in trends.series("sent")) >= 30, timeout=20, what="the burst sent")
        await wait_until(lambda: sum(v or 0 for v in trends.series("received")) >= 4, timeout=20, what="the incoming stored")
        await wait_until(lambda: trends.series("queue_depth")[-1] is not None, timeout=20, what="a queue depth reading")
        await wait_until(lambda: sum(v or 0 for v in trends.series("failed")) >= 1, timeout=20, what="the failure counted")
        url = f"{worker.runtime.status_server.url}/?token={TOKEN}"
        dom = await render(browser, url, tmp_path / "profile")
        shot = Path(os.environ.get("STATUS_PAGE_SCREENSHOT") or tmp_path / "trends.png")
        await render(browser, url, tmp_path / "profile-shot", screenshot=shot)

    page = parse(dom)
    rows = page.by_id("section-trends").rows()
    assert "sent per minute 30 in the last hour" in rows["sent per minute"], rows["sent per minute"]
    assert "1 in the last hour" in rows["failed per minute"]
    assert "4 in the last hour" in rows["received per minute"]
    assert rows["queue depth"].startswith("queue depth now ")
    for name in ("sent", "failed", "received", "queue_depth", "oldest_queued_age"):
        svgs = page.by_id(f"trend-{name}").find(tag="svg")
        assert len(svgs) == 1 and "spark" in svgs[0].classes
    sent = page.by_id("trend-sent").find(tag="polyline")
    points = [tuple(map(float, p.split(","))) for p in sent[0].attrs["points"].split()]
    assert len(points) == 60, "one point per minute of the hour"
    assert points[-1][1] < points[0][1], "the burst's minute stands above the quiet ones"
    assert not page.find(tag="script", cls="external") and "<script src" not in dom, "no external script"

    # The screenshot shows the lines: the sparklines' own colour is on the picture.
    with Image.open(shot) as image:
        raw = image.convert("RGB").tobytes()
    pixels = zip(raw[0::3], raw[1::3], raw[2::3], strict=True)
    drawn = sum(1 for r, g, b in pixels if abs(r - 0xB4) < 8 and abs(g - 0x8E) < 8 and abs(b - 0xAD) < 8)
    assert drawn > 200, f"only {drawn} sparkline pixels in the screenshot"
