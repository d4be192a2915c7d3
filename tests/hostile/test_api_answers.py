"""Hostile answers from the AI and X APIs: the clients raise our own, readable errors.

A small aiohttp server on 127.0.0.1 answers every request with the case's
body (malformed JSON, wrong types, deep nesting, huge bodies, HTML). The
real ``AIClient`` and ``XClient`` call it; each must end in one of our error
types (``BotError``: transient, permanent...) with a message a person can
read, never a raw ``TypeError`` or ``RecursionError``, and the next, good
answer must work again (nothing is left broken).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from replyguy.ai import AIClient
from replyguy.http import HttpSettings, RetryPolicy
from replyguy.xapi import XClient, XCredentials
from shared.breaker import CircuitBreaker
from shared.errors import BotError

NO_RETRY = RetryPolicy(max_retries=0, base_delay=0.0, max_delay=0.0)
CREDENTIALS = XCredentials(
    bearer_token="bearer", consumer_key="ck", consumer_secret="cs", access_token="at", access_token_secret="ats", user_id="1"
)
GOOD_AI = json.dumps({"choices": [{"message": {"role": "assistant", "content": "a fine reply"}}]}).encode()
GOOD_X = json.dumps({"data": [{"id": "10", "text": "hello", "author_id": "7"}], "includes": {"users": [{"id": "7", "username": "u"}]}}).encode()
HUGE = 24 * 1024 * 1024  # bytes: far more than any real answer


@dataclass
class Answer:
    body: bytes
    status: int = 200
    content_type: str = "application/json"


@dataclass
class Stand:
    """The stand-in server: answers every request with ``answer``."""

    answer: Answer = field(default_factory=lambda: Answer(GOOD_AI))
    hits: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        await request.read()
        return web.Response(body=self.answer.body, status=self.answer.status, content_type=self.answer.content_type)


@pytest.fixture
async def stand() -> AsyncIterator[Stand]:
    state = Stand()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


def breaker(name: str) -> CircuitBreaker:
    return CircuitBreaker(name, failure_threshold=1000, recovery_timeout=60)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


COMMON_BODIES: list[tuple[str, Answer]] = [
    ("malformed JSON", Answer(b"{not json")),
    ("an empty body", Answer(b"")),
    ("an HTML page with 200", Answer(b"<html><body>Service Unavailable</body></html>", content_type="text/html")),
    ("invalid UTF-8", Answer(b"\xff\xfe\xfa{}")),
    ("JSON null", Answer(b"null")),
    ("a JSON string", Answer(b'"ok"')),
    ("a JSON list", Answer(b"[1, 2, 3]")),
    ("100000 levels of nesting", Answer(nested(100_000))),
    ("a 500 with an HTML body", Answer(b"<html>oops</html>", status=500, content_type="text/html")),
    ("a 400 with a huge JSON detail", Answer(json.dumps({"detail": "x" * 100_000}).encode(), status=400)),
]

AI_BODIES: list[tuple[str, Answer]] = COMMON_BODIES + [
    ("choices is a string", Answer(b'{"choices": "x"}')),
    ("choices is empty", Answer(b'{"choices": []}')),
    ("message is null", Answer(b'{"choices": [{"message": null}]}')),
    ("content is a number", Answer(b'{"choices": [{"message": {"content": 5}}]}')),
    ("content is a list", Answer(b'{"choices": [{"message": {"content": ["a"]}}]}')),
    ("content is blank", Answer(b'{"choices": [{"message": {"content": "   "}}]}')),
]

X_BODIES: list[tuple[str, Answer]] = COMMON_BODIES + [
    ("data is a number", Answer(b'{"data": 5}')),
    ("includes is a string", Answer(b'{"data": [], "includes": "x"}')),
    ("includes.users is a number", Answer(b'{"data": [], "includes": {"users": 5}}')),
    ("referenced_tweets is a number", Answer(b'{"data": [{"id": "1", "text": "t", "referenced_tweets": 5}]}')),
]

def _params(table: list[tuple[str, Answer]]) -> list[Any]:
    return [pytest.param(name, answer, id=name) for name, answer in table]


async def expect_our_error(call: Any, case: str) -> BaseException:
    try:
        result = await call()
    except BotError as exc:
        assert str(exc).strip(), f"{case}: an error without a message"
        assert len(str(exc)) < 2000, f"{case}: the error message repeats the whole body ({len(str(exc))} chars)"
        return exc
    except TimeoutError as exc:  # OperationTimeout is a TimeoutError of ours with a name
        assert getattr(exc, "name", None), f"{case}: an anonymous timeout"
        return exc
    except Exception as exc:  # noqa: BLE001 - the point of the corpus
        pytest.fail(f"{case}: a raw {type(exc).__name__} escaped: {str(exc)[:200]}")
    pytest.fail(f"{case}: no error, the client returned {str(result)[:200]!r}")


@pytest.mark.parametrize(("case", "answer"), _params(AI_BODIES))
async def test_a_hostile_ai_answer_raises_our_own_readable_error(stand: Stand, case: str, answer: Answer) -> None:
    client = AIClient(base_url=f"{stand.url}/v1", api_key="k", model="m", breaker=breaker("ai_service"), settings=HttpSettings(timeout=5, retry=NO_RETRY))
    try:
        stand.answer = answer
        await expect_our_error(lambda: client.complete([{"role": "user", "content": "hi"}]), case)
        stand.answer = Answer(GOOD_AI)
        assert await client.complete([{"role": "user", "content": "hi"}]) == "a fine reply", "the client works again"
    finally:
        await client.close()


@pytest.mark.parametrize(("case", "answer"), _params(X_BODIES))
async def test_a_hostile_x_answer_raises_our_own_readable_error(stand: Stand, case: str, answer: Answer) -> None:
    client = XClient(base_url=stand.url, credentials=CREDENTIALS, breaker=breaker("twitter_api"), settings=HttpSettings(timeout=5, retry=NO_RETRY))
    try:
        stand.answer = answer
        await expect_our_error(lambda: client.search_recent("bot"), case)
        stand.answer = Answer(GOOD_X)
        tweets = await client.search_recent("bot")
        assert [t.id for t in tweets] == ["10"], "the client works again"
    finally:
        await client.close()


async def test_tweets_that_are_not_objects_are_skipped(stand: Stand) -> None:
    client = XClient(base_url=stand.url, credentials=CREDENTIALS, breaker=breaker("twitter_api"), settings=HttpSettings(timeout=5, retry=NO_RETRY))
    try:
        stand.answer = Answer(b'{"data": [1, "two", null, {"text": "no id"}, {"id": {"a": 1}, "text": "an object id"}]}')
        assert await client.search_recent("bot") == []
    finally:
        await client.close()


@pytest.mark.parametrize("client_kind", ["ai", "x"])
async def test_a_huge_answer_is_refused_as_too_large(stand: Stand, client_kind: str) -> None:
    content = "y" * HUGE
    if client_kind == "ai":
        stand.answer = Answer(json.dumps({"choices": [{"message": {"content": content}}]}).encode())
        client: Any = AIClient(base_url=f"{stand.url}/v1", api_key="k", model="m", breaker=breaker("ai_service"), settings=HttpSettings(timeout=10, retry=NO_RETRY))
        call = lambda: client.complete([{"role": "user", "content": "hi"}])  # noqa: E731
    else:
        stand.answer = Answer(json.dumps({"data": [{"id": "1", "text": content}]}).encode())
        client = XClient(base_url=stand.url, credentials=CREDENTIALS, breaker=breaker("twitter_api"), settings=HttpSettings(timeout=10, retry=NO_RETRY))
        call = lambda: client.search_recent("bot")  # noqa: E731
    try:
        exc = await expect_our_error(call, f"a {HUGE >> 20} MB {client_kind} answer")
        assert "large" in str(exc).lower() or "size" in str(exc).lower(), str(exc)[:200]
    finally:
        await client.close()
