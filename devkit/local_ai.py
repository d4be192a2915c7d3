"""A local stand-in for an OpenAI-compatible chat-completions API, on 127.0.0.1.

``POST /v1/chat/completions`` (and ``/chat/completions``) answers with a
short, friendly reply built from the tweet in the prompt: no model, no
network, deterministic. It serves the embedded default and the tests.
Faults come from :class:`devkit.standins.FaultPlan` (endpoint ``chat``):
``status``, ``rate_limit`` (429 with ``retry-after``), ``hang``,
``malformed``, ``overlong`` (a reply far over X's 280 weighted
characters), ``content_filter`` (``content: null`` with ``finish_reason:
content_filter``) and ``no_choices``; a rule's ``match`` limits it to
requests whose prompt contains that text. Every request's messages are kept in :attr:`LocalAI.requests`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from aiohttp import web

from devkit.standins import FaultKind, StandInServer

logger = logging.getLogger(__name__)

SANDBOX_AI_KEY = "sandbox-ai-key"
"""The key the stand-in accepts and the bot uses in sandbox mode."""

SANDBOX_AI_MODEL = "local-stand-in"

_TEMPLATES = (
    "Interesting point about {topic}. In my experience the boring parts (timeouts, retries, alerts) decide whether it holds up.",
    "Good question on {topic}! Deadlines on every network call and a watchdog that restarts stuck loops help a lot.",
    "Agreed on {topic}. Measure first, then fix the slowest part; it is rarely where you expect.",
    "Thanks for sharing this about {topic}. Curious how it behaves under load and after a crash.",
)

_OVERLONG = (
    "This is a deliberately long answer from the stand-in AI, written to test how the bot handles replies "
    "that are far over the limit X allows. It goes on about reliability, timeouts, retries, circuit breakers, "
    "watchdogs, dead letter queues, crash recovery, exactly-once posting and operator alerts, and then it keeps "
    "going for a while longer so that no reasonable counting rule could ever let it through as a single tweet."
)


def _topic(text: str) -> str:
    words = [w.strip(".,!?:;\"'()") for w in text.split()]
    candidates = [w for w in words if len(w) >= 5 and w.isalpha()]
    return max(candidates, key=len) if candidates else "this"


class LocalAI(StandInServer):
    """The stand-in AI API.

    Args:
        api_key: the key it accepts.
        host, port: where to listen (port 0: a free one).
    """

    name = "local AI API"

    def __init__(self, *, api_key: str = SANDBOX_AI_KEY, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.api_key = api_key
        self.requests: list[list[dict[str, Any]]] = []
        self._variant = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/models", self._models)

    def state(self) -> dict[str, Any]:
        return {"requests": len(self.requests)}

    async def _models(self, request: web.Request) -> web.Response:
        """The model list (what a client's health probe reads); faults of endpoint ``models`` or ``*`` apply."""
        self.hits["models"] += 1
        fault = self.faults.take("models")
        if fault is not None:
            if fault.kind is FaultKind.STATUS:
                return web.json_response({"error": {"message": "stand-in fault", "type": "server_error"}}, status=fault.status)
            if fault.kind is FaultKind.HANG:
                return await self.hang()
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": "stand-in", "object": "model", "owned_by": "local"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        self.hits["chat"] += 1
        raw = await request.text()
        fault = self.faults.take("chat", raw)
        overlong = fault is not None and fault.kind is FaultKind.OVERLONG
        with_nul = fault is not None and fault.kind is FaultKind.NUL_IN_TEXT
        if fault is not None and not overlong and not with_nul:
            if fault.kind is FaultKind.STATUS:
                return web.json_response({"error": {"message": "stand-in fault", "type": "server_error"}}, status=fault.status)
            if fault.kind is FaultKind.RATE_LIMIT:
                return web.json_response(
                    {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
                    status=429,
                    headers={"retry-after": str(int(fault.reset_in))},
                )
            if fault.kind is FaultKind.HANG:
                return await self.hang()
            if fault.kind is FaultKind.MALFORMED:
                return self.malformed()
            if fault.kind is FaultKind.CONTENT_FILTER:
                return web.json_response(self._completion(None, "content_filter"))
            if fault.kind is FaultKind.NO_CHOICES:
                return web.json_response({**self._completion(None, "stop"), "choices": []})
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, status=401)
        try:
            body = await request.json()
            messages = list(body["messages"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": {"message": "messages are required", "type": "invalid_request_error"}}, status=400)
        self.requests.append(messages)
        content = _OVERLONG if overlong else self._reply(messages)
        if with_nul:
            content = content.replace(" ", " \x00", 1)
        return web.json_response(self._completion(content, "stop", model=body.get("model", SANDBOX_AI_MODEL)))

    def _completion(self, content: str | None, finish_reason: str, *, model: str = SANDBOX_AI_MODEL) -> dict[str, Any]:
        """A chat-completions answer body as OpenAI shapes it."""
        return {
            "id": f"chatcmpl-standin-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    def _reply(self, messages: list[dict[str, Any]]) -> str:
        first_user = next((str(m.get("content", "")) for m in messages if m.get("role") == "user"), "")
        match = re.search(r'"""(.*?)"""', first_user, re.S)
        tweet = match.group(1) if match else first_user
        template = _TEMPLATES[self._variant % len(_TEMPLATES)]
        self._variant += 1
        return template.format(topic=_topic(tweet))


__all__ = ["LocalAI", "SANDBOX_AI_KEY", "SANDBOX_AI_MODEL"]
