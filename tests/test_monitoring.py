"""What an operator scrapes and loads: a running worker's /metrics, the alert rules, the dashboards.

A real worker runs in sandbox mode in-process (real PostgreSQL, the Telegram
sandbox); its /metrics is read over HTTP like Prometheus does. The rules in
deploy/prometheus/alerts.yml and the panels of deploy/grafana/*.json must name
only metrics a running bot exports, so an alert can never watch a name that
does not exist. ``promtool`` is Debian's ``prometheus`` package (``.ci/run``
installs it); without it the promtool checks are skipped with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.db import utc_now
from tests.helpers import wait_until
from tests.test_worker import account_ids, running_worker, texts_received, worker_env, world_of  # noqa: F401 - a fixture
from worker import Worker

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return path


async def scrape(worker: Worker) -> str:
    url = f"http://127.0.0.1:{worker.runtime.status_server.port}/metrics"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, http.get(url) as response:
        assert response.status == 200
        return await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def families(text: str) -> set[str]:
    """Metric names an exposition declares (HELP/TYPE), with each sample name (``_bucket``, ``_count`` ...)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
    return names


async def test_twenty_sends_move_the_per_account_counters_the_latency_histogram_and_the_queue_gauges(
    worker_env: dict[str, str],
) -> None:
    world = world_of(worker_env)
    world.seed_demo()
    async with running_worker(worker_env) as worker:
        ids = await account_ids(worker)
        db = worker.db
        assert db is not None
        before = await scrape(worker)
        for n in range(20):
            await db.enqueue_outbound(ids["demo_one"], "alice", f"metric {n}")
        await db.enqueue_outbound(ids["demo_one"], "alice", "caption", attachments=["/nonexistent/missing.jpg"])  # fails permanently: no such file
        await db.enqueue_outbound(ids["demo_two"], "bob", "tomorrow", send_at=utc_now() + timedelta(days=1))
        await wait_until(lambda: len(texts_received(world, "alice")) >= 20, timeout=20, what="20 messages at alice")

        async def settled() -> str | None:
            text = await scrape(worker)
            failed = value(text, "worker_messages_failed_total", account="demo_one", kind="permanent")
            depth = value(text, "worker_outbound_queue_depth", account="demo_two")
            return text if failed > value(before, "worker_messages_failed_total", account="demo_one", kind="permanent") and depth == 1 else None

        await wait_until(settled, timeout=20, what="the failure counted and the queue gauges refreshed")
        after = await scrape(worker)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("worker_messages_sent_total", account="demo_one") == 20
    assert moved("worker_messages_sent_total", account="demo_two") == 0
    assert moved("worker_messages_failed_total", account="demo_one", kind="permanent") == 1
    assert moved("worker_enqueue_to_sent_seconds_count") == 20
    assert value(after, "worker_enqueue_to_sent_seconds_bucket", le="+Inf") >= 20
    # The scheduled message waits in demo_two's queue, not yet due; demo_one's queue is empty.
    assert value(after, "worker_outbound_queue_depth", account="demo_two") == 1
    assert value(after, "worker_outbound_queue_due", account="demo_two") == 0
    assert value(after, "worker_outbound_queue_depth", account="demo_one") == 0
    assert value(after, "worker_outbound_oldest_due_age_seconds", account="demo_one") == 0
    assert value(after, "worker_accounts", state="connected") == 2
    assert moved("bot_loop_cycles_total", loop="outbound", outcome="ok") > 0
    label_names = {name for (_, labels) in samples(after) for name, _ in labels}
    label_values = {v for (_, labels) in samples(after) for _, v in labels}
    assert not label_names & {"chat", "chat_id", "peer", "phone"} and "alice" not in label_values  # never a peer


async def test_a_running_workers_metrics_pass_promtool_check_metrics(worker_env: dict[str, str]) -> None:
    tool = promtool()
    async with running_worker(worker_env) as worker:
        text = await scrape(worker)
    result = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- rules and dashboards -----------------------------------------------------------------------

#: PromQL words that are not metric names: functions, aggregations, keywords.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "absent", "time", "vector", "scalar", "label_values", "changes", "resets", "max_over_time",
    "min_over_time", "avg_over_time", "humanize", "humanizeDuration", "e", "inf", "nan",
}
#: Series Prometheus makes itself for every target: not exported by a bot, yet always there.
SYNTHETIC = {"up"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, groupings and strings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    label_values = re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,", expr)
    text = re.sub(r"label_values\([^)]*\)", "", text)
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return (words - PROMQL_WORDS) | set(label_values)


def rule_expressions() -> dict[str, str]:
    rules: dict[str, str] = {}
    text = RULES.read_text()
    # A YAML reader is not a dependency of the project: the file's shape is fixed and simple.
    for match in re.finditer(r"- alert: (\w+)\n\s+expr: (\|\n(?:\s{10,}.*\n)+|.*\n)", text):
        expr = match.group(2)
        rules[match.group(1)] = expr[1:] if expr.startswith("|") else expr
    return rules


def dashboard_expressions() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found[f"{path.name}: {panel['title']} ({target['refId']})"] = target["expr"]
        for variable in board.get("templating", {}).get("list", []):
            query = variable.get("query")
            if isinstance(query, dict):
                found[f"{path.name}: variable {variable['name']}"] = query["query"]
    return found


def test_the_expression_reader_finds_metric_names_and_nothing_else() -> None:
    expr = 'sum by (job, loop) (rate(bot_loop_cycles_total{outcome="error", job=~"a|b"}[5m])) / clamp_min(up, 1e-9) > 0.5'
    assert metric_names(expr) == {"bot_loop_cycles_total", "up"}
    assert metric_names("label_values(bot_info, job)") == {"bot_info"}


def test_every_rule_has_a_runbook_that_exists_and_the_rules_pass_promtool() -> None:
    tool = promtool()
    rules = rule_expressions()
    assert len(rules) == RULES.read_text().count("- alert:") >= 10
    for check in (["check", "rules", str(RULES)], ["test", "rules", str(RULES.with_name("alerts_test.yml"))]):
        result = subprocess.run([tool, *check], capture_output=True, text=True, timeout=60, check=False, cwd=RULES.parent)
        assert result.returncode == 0, result.stdout + result.stderr


def test_each_rule_points_at_a_runbook_anchor_of_the_manual() -> None:
    text = RULES.read_text()
    links = re.findall(r"runbook: (\S+)", text)
    assert len(links) == text.count("- alert:")
    paths = {link.partition("#")[0] for link in links}
    missing = [p for p in paths if not (ROOT / p).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} is not there yet: the runbook still lives in the README")
    for link in set(links):
        path, _, anchor = link.partition("#")
        slugs = {slug(h) for h in re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), flags=re.M)}
        assert anchor in slugs, f"{link}: no heading with anchor #{anchor} in {path}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


async def test_every_rule_and_dashboard_panel_names_only_metrics_a_running_bot_exports(worker_env: dict[str, str]) -> None:
    async with running_worker(worker_env) as worker:
        exported = families(await scrape(worker))
    expressions = {f"rule {name}": expr for name, expr in rule_expressions().items()} | dashboard_expressions()
    assert len(expressions) > 40
    unknown = {
        where: sorted(metric_names(expr) - exported - SYNTHETIC)
        for where, expr in expressions.items()
        if metric_names(expr) - exported - SYNTHETIC
    }
    assert not unknown, f"names no bot exports: {unknown}"
    used = set().union(*(metric_names(e) for e in expressions.values()))
    # The dashboard shows what an operator watches: the core families are all on it.
    for name in ("worker_enqueue_to_sent_seconds_bucket", "worker_outbound_queue_depth", "worker_messages_sent_total",
                 "worker_accounts", "bot_breaker_state", "ingest_images_failed_total", "replyguy_api_call_seconds_bucket"):
        assert name in used, name
