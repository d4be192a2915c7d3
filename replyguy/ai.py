"""Drafting replies with an OpenAI-compatible chat-completions API.

:class:`AIClient` makes one ``POST {AI_BASE_URL}/chat/completions`` call
through the ``ai_service`` breaker with backoff on transient failures (a 5xx,
a hang past TIMEOUT_HTTP, malformed JSON); a 429 honours ``retry-after``
and alerts. Any OpenAI-compatible server works (OpenAI, OpenRouter, a local
vLLM or Ollama).

:class:`Drafter` turns a tweet into a reply that X will accept: the system
prompt comes from REPLY_PROMPT_FILE (or ``prompts/reply.txt``), and a reply
over 280 weighted characters is sent back to the model to be shortened, at
most ``max_regenerations`` times, then cut at a word boundary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from shared.breaker import CircuitBreaker
from shared.errors import PermanentError, TransientError

from replyguy.http import HttpService, HttpSettings, retry_after_header
from replyguy.length import MAX_WEIGHTED_LENGTH, fits, trim_to_fit, weighted_length

logger = logging.getLogger(__name__)

BUILTIN_PROMPT = Path(__file__).resolve().parent.parent / "prompts" / "reply.txt"
"""The system prompt used when REPLY_PROMPT_FILE is unset."""

DEFAULT_RATE_LIMIT_WAIT = 20.0


def load_prompt(path: Path | None) -> str:
    """The system prompt from ``path`` (default: the built-in one).

    Raises:
        PermanentError: the file cannot be read or is empty.
    """
    source = path or BUILTIN_PROMPT
    try:
        text = Path(source).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise PermanentError(f"REPLY_PROMPT_FILE {source} cannot be read: {exc}") from exc
    if not text:
        raise PermanentError(f"REPLY_PROMPT_FILE {source} is empty")
    return text


def answer_text(payload: Any) -> str:
    """The assistant's text in a chat-completions answer.

    Raises:
        TransientError: no choices, no text, or text that is only blanks; the
            reason names what was missing and the ``finish_reason`` (a
            moderated model answers ``content: null`` with ``content_filter``).
    """
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TransientError("AI API answered without any choices")
    choice = choices[0]
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        finish = choice.get("finish_reason")
        raise TransientError(f"AI API answered without any text (finish_reason {finish})" if finish else "AI API answered without any text")
    return content


class AIClient:
    """An OpenAI-compatible chat-completions client.

    Args:
        base_url: AI_BASE_URL (``https://api.openai.com/v1``).
        api_key: AI_API_KEY.
        model: AI_MODEL.
        breaker: the ``ai_service`` breaker.
        settings: deadline (TIMEOUT_HTTP), backoff, alert sink and clock.
    """

    def __init__(self, *, base_url: str, api_key: str, model: str, breaker: CircuitBreaker, settings: HttpSettings) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.http = HttpService("ai", breaker=breaker, settings=settings)
        self.models_url = base_url.rstrip("/") + "/models"
        breaker.set_probe(self.probe)

    async def probe(self) -> None:
        """``GET /models``, the cheapest authenticated call of an OpenAI-style API: the open breaker's probe."""
        await self.http.probe(self.models_url, {"Authorization": f"Bearer {self.api_key}"})

    async def close(self) -> None:
        self.http.breaker.clear_probe(self.probe)
        await self.http.close()

    async def complete(self, messages: list[dict[str, str]], *, temperature: float = 0.8, max_tokens: int = 300) -> str:
        """The assistant's answer to ``messages``.

        Raises:
            RateLimitedError: a 429 (after an alert).
            TransientError: a 5xx, malformed JSON or an answer without text.
            OperationTimeout: no answer within TIMEOUT_HTTP.
            PermanentError: a 4xx other than 429 (bad key, unknown model).
            CircuitOpenError: the ``ai_service`` breaker is open.
        """
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}

        async def attempt() -> str:
            result = await self.http.send("chat", "POST", self.url, headers=headers, json_body=body)
            if result.status == 429:
                wait = retry_after_header(result.headers, DEFAULT_RATE_LIMIT_WAIT)
                raise self.http.rate_limited("chat", wait, detail=result.error_detail())
            if result.status >= 500 or result.status in (408, 425):
                raise TransientError(f"AI API answered {result.status}: {result.error_detail()}")
            if result.status >= 400:
                raise PermanentError(f"AI API rejected the request ({result.status}): {result.error_detail()}")
            try:
                payload: Any = result.json()
            except ValueError:
                raise TransientError("AI API answered with a body that is not JSON") from None
            return answer_text(payload)

        return await self.http.call("chat", attempt)

    def health(self) -> dict[str, Any]:
        return self.http.health()


@dataclass(frozen=True)
class Draft:
    """A reply ready for the operator."""

    text: str
    weighted_length: int
    regenerations: int
    trimmed: bool


def _clean(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'\u201c\u201d":
        text = text[1:-1].strip()
    return text


class Drafter:
    """Tweet in, reply that fits out.

    Args:
        ai: the chat-completions client.
        system_prompt: the instructions (see :func:`load_prompt`).
        max_regenerations: how often an over-long reply is sent back to be shortened.
        limit: X's weighted limit.
    """

    def __init__(self, ai: AIClient, *, system_prompt: str, max_regenerations: int = 2, limit: int = MAX_WEIGHTED_LENGTH) -> None:
        self.ai = ai
        self.system_prompt = system_prompt
        self.max_regenerations = max_regenerations
        self.limit = limit

    def _ask(self, text: str, author: str | None, previous: str | None) -> str:
        lines = [f"Tweet by @{author or 'someone'}:", f'"""{text}"""', ""]
        if previous:
            lines += ["The operator did not like this draft:", f'"""{previous}"""', "Write a different reply.", ""]
        lines.append(
            f"Write one reply. At most {self.limit} characters; every link counts as 23. Answer with the reply text only."
        )
        return "\n".join(lines)

    async def draft(self, *, text: str, author: str | None, previous: str | None = None) -> Draft:
        """Ask for a reply to a tweet; shorten or cut it until it fits.

        Args:
            text: the tweet's text.
            author: its author's username.
            previous: a draft the operator asked to replace.

        Raises:
            Whatever :meth:`AIClient.complete` raises.
        """
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self._ask(text, author, previous)},
        ]
        reply = _clean(await self.ai.complete(messages))
        regenerations = 0
        while not fits(reply, self.limit) and regenerations < self.max_regenerations:
            regenerations += 1
            weight = weighted_length(reply)
            logger.info("draft too long (%d > %d); asking for a shorter one", weight, self.limit)
            messages += [
                {"role": "assistant", "content": reply},
                {
                    "role": "user",
                    "content": f"That reply counts {weight} characters for X; the limit is {self.limit}. "
                    "Write a shorter version. Answer with the reply text only.",
                },
            ]
            reply = _clean(await self.ai.complete(messages))
        if not reply:
            raise TransientError("the AI answered with an empty reply")
        trimmed = False
        if not fits(reply, self.limit):
            reply = trim_to_fit(reply, self.limit)
            trimmed = True
            logger.info("draft still too long after %d regenerations; cut at a word boundary", regenerations)
        return Draft(text=reply, weighted_length=weighted_length(reply), regenerations=regenerations, trimmed=trimmed)


__all__ = ["AIClient", "BUILTIN_PROMPT", "answer_text", "Draft", "Drafter", "load_prompt"]
