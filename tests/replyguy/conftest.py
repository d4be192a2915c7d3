"""Fixtures of the Reply Guy tests: the stand-in X and AI servers, fresh breakers, an assembled bot.

Everything is real: the stand-ins are aiohttp servers on 127.0.0.1, the
database is the embedded PostgreSQL of ``tests.fixtures.postgres``, the
operator chat is the Telegram sandbox. Only the backoff is made fast
(``FAST_RETRY``), through the clients' constructors.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot import Plan, ReplyGuy, Wakeups, configure_breakers, plan_for
from replyguy.ai import AIClient, Drafter, load_prompt
from replyguy.approval import ApprovalDesk
from replyguy.http import HttpSettings, RetryPolicy
from devkit.local_ai import SANDBOX_AI_KEY, LocalAI
from devkit.local_x import SANDBOX_X_CREDENTIALS, LocalX
from replyguy.state import ReplyState
from replyguy.xapi import XClient
from shared.alerts import LogAlertSink
from shared.breaker import BreakerRegistry, CircuitBreaker
from shared.config import ReplyGuySettings
from shared.db import Database
from shared.db.retry_store import DbRetryStore
from shared.retry_queue import RetryQueue
from shared.runtime import BotRuntime
from devkit.sandbox import DemoWorld, SandboxClient, World
from tests.fixtures.sandbox import CLIENT_DEFAULTS
from tests.replyguy.helpers import settings_for

PLUGIN = "tests.fixtures.postgres"

FAST_RETRY = RetryPolicy(max_retries=3, base_delay=0.01, max_delay=0.05)
"""The production policy's 3 retries, with millisecond delays."""


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)


@pytest.fixture
def breakers() -> dict[str, CircuitBreaker]:
    """The three breakers as configured, in a registry of this test's own."""
    return configure_breakers(BreakerRegistry())


@pytest.fixture
def alert_sink() -> LogAlertSink:
    return LogAlertSink(bot_name="bot", dedupe_window=600)


@pytest.fixture
async def x_client(local_x: LocalX, breakers: dict[str, CircuitBreaker], alert_sink: LogAlertSink) -> AsyncIterator[XClient]:
    client = XClient(base_url=local_x.base_url, credentials=SANDBOX_X_CREDENTIALS, breaker=breakers["twitter_api"],
                     settings=HttpSettings(timeout=1.0, retry=FAST_RETRY, alerts=alert_sink))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def ai_client(local_ai: LocalAI, breakers: dict[str, CircuitBreaker], alert_sink: LogAlertSink) -> AsyncIterator[AIClient]:
    client = AIClient(base_url=f"{local_ai.base_url}/v1", api_key=SANDBOX_AI_KEY, model="test-model",
                      breaker=breakers["ai_service"], settings=HttpSettings(timeout=1.0, retry=FAST_RETRY, alerts=alert_sink))
    try:
        yield client
    finally:
        await client.close()


@dataclass
class Rig:
    """A Reply Guy assembled in-process from real parts."""

    guy: ReplyGuy
    settings: ReplyGuySettings
    plan: Plan
    db: Database
    local_x: LocalX
    local_ai: LocalAI
    world: World
    demo: DemoWorld
    desk: ApprovalDesk
    sink: LogAlertSink
    queue: RetryQueue
    breakers: dict[str, CircuitBreaker]

    @property
    def operator_chat(self) -> Any:
        return self.demo.operators

    def drafts_in_chat(self) -> list[Any]:
        """The bot's messages with buttons in the operator chat, as the operator sees them."""
        return [m for m in self.world.history("operator", self.demo.operators) if m.buttons]


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig_factory(
    tmp_path: Path,
    database: Database,
    local_x: LocalX,
    local_ai: LocalAI,
    sandbox_world: World,
    sandbox_demo: DemoWorld,
    breakers: dict[str, CircuitBreaker],
    alert_sink: LogAlertSink,
) -> AsyncIterator[RigFactory]:
    """``await rig_factory(env={...}, **ReplyGuy_options)``: the bot's parts built like ``bot.assemble``, on test servers."""
    closers: list[Callable[[], Awaitable[Any]]] = []

    async def build(*, env: Mapping[str, str] | None = None, max_regenerations: int = 2, **options: Any) -> Rig:
        settings = settings_for(tmp_path, env)
        plan = plan_for(settings)
        runtime = BotRuntime(bot="bot", settings=settings, alerts=alert_sink)
        http = HttpSettings.from_settings(settings, alerts=alert_sink, retry=FAST_RETRY)
        x = XClient(base_url=local_x.base_url, credentials=plan.x_credentials, breaker=breakers["twitter_api"], settings=http)
        ai = AIClient(base_url=f"{local_ai.base_url}/v1", api_key=plan.ai_key, model=plan.ai_model,
                      breaker=breakers["ai_service"], settings=http)
        closers.extend([x.close, ai.close])
        client = SandboxClient(sandbox_world, bot_token=sandbox_demo.reply_bot.bot_token, **CLIENT_DEFAULTS)
        wake = Wakeups()
        desk = ApprovalDesk(client=client, db=database, chat=-sandbox_demo.operators.id, operator_ids=(sandbox_demo.operator.id,),
                            send_timeout=5, entity_timeout=5, on_decision=wake.on_decision)
        await desk.start()
        closers.append(desk.close)
        queue = RetryQueue(name="dlq", store=DbRetryStore(database, "bot"), base_delay=settings.retry_base_delay,
                           max_retries=settings.max_message_retries, store_timeout=5)
        state = ReplyState(database, clock=time.time)
        await state.load()
        guy = ReplyGuy(settings=settings, plan=plan, runtime=runtime, db=database, x=x,
                       drafter=Drafter(ai, system_prompt=load_prompt(None), max_regenerations=max_regenerations),
                       desk=desk, queue=queue, state=state, wake=wake, **options)
        await queue.load()
        return Rig(guy=guy, settings=settings, plan=plan, db=database, local_x=local_x, local_ai=local_ai,
                   world=sandbox_world, demo=sandbox_demo, desk=desk, sink=alert_sink, queue=queue, breakers=breakers)

    yield build
    for close in reversed(closers):
        await close()
