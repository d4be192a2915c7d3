"""A local stand-in for the X API v2: the endpoints the Reply Guy calls, on 127.0.0.1.

It serves the embedded default (started in-process, seeded with demo tweets)
and the tests. Endpoints:

* ``GET /2/tweets/search/recent``: ``query`` with words, ``"phrases"``,
  ``OR``, ``from:``, ``-from:``, ``is:reply``/``is:retweet`` (and their
  negations), ``in_reply_to_tweet_id:``, ``conversation_id:``; ``since_id``,
  ``max_results``; newest first, ``includes.users`` for ``author_id``.
* ``GET /2/users/by/username/:username``, ``GET /2/users/me`` (OAuth 1.0a).
* ``GET /2/users/:id/tweets``: ``since_id``, ``max_results``, ``exclude``.
* ``POST /2/tweets``: OAuth 1.0a signature verified with oauthlib's resource
  endpoint; 280 weighted characters at most; a duplicate of one of the
  author's tweets is refused with 403 like X does.

Reads need ``Authorization: Bearer <token>`` (or OAuth 1.0a). Faults come
from :class:`devkit.standins.FaultPlan` (endpoint names: ``search``,
``user``, ``me``, ``timeline``, ``post``). ``POST /_standin/tweets`` with
``{"author": ..., "text": ...}`` adds a tweet by anyone (curl it to give the
bot something new to answer).

With ``state_path`` every change is saved there (atomically, off the event
loop), so the stand-in keeps its tweets, and the bot's replies, across
restarts: a crash between posting and recording finds the reply again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from oauthlib.oauth1 import RequestValidator, ResourceEndpoint

from replyguy.length import MAX_WEIGHTED_LENGTH, weighted_length
from devkit.standins import Fault, FaultKind, StandInServer
from replyguy.xapi import XCredentials

logger = logging.getLogger(__name__)

FIRST_TWEET_ID = 1_860_000_000_000_000_001
"""Tweet ids are increasing integers, like X's snowflakes."""

SANDBOX_X_CREDENTIALS = XCredentials(
    bearer_token="sandbox-x-bearer-token",
    consumer_key="sandboxconsumerkey0001",
    consumer_secret="sandbox-consumer-secret",
    access_token="1000-sandboxaccesstoken01",
    access_token_secret="sandbox-access-token-secret",
    user_id="1000",
)
"""The credentials the stand-in accepts and the bot uses in sandbox mode."""

OUR_USERNAME = "replyguy_demo"
"""The account the bot posts as in sandbox mode (id 1000)."""

DEMO_USERS: tuple[tuple[str, str, str], ...] = (
    ("1000", OUR_USERNAME, "Reply Guy (demo)"),
    ("1001", "demo_dev", "Demo Developer"),
    ("1002", "demo_founder", "Demo Founder"),
    ("1003", "demo_news", "Demo News"),
)

DEMO_TWEETS: tuple[tuple[str, str], ...] = (
    ("demo_dev", "My Telegram bot keeps hanging on network calls. How do you make an async bot reliable?"),
    ("demo_founder", "Hot take: every bot needs a watchdog and circuit breakers. Prove me wrong."),
    ("demo_news", "PostgreSQL 17 is out, with faster vacuum and better JSON support."),
)
"""Seeded on first start. The sandbox defaults (keyword ``bot``, account
``demo_news``) find all three."""

SANDBOX_KEYWORDS = ("bot",)
SANDBOX_TARGET_ACCOUNTS = ("demo_news",)


@dataclass
class _Tweet:
    id: str
    text: str
    author_id: str
    created_at: str
    conversation_id: str
    in_reply_to: str | None = None
    in_reply_to_user_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "text": self.text,
            "author_id": self.author_id,
            "created_at": self.created_at,
            "conversation_id": self.conversation_id,
            "edit_history_tweet_ids": [self.id],
        }
        if self.in_reply_to:
            data["referenced_tweets"] = [{"type": "replied_to", "id": self.in_reply_to}]
            data["in_reply_to_user_id"] = self.in_reply_to_user_id
        return data


class _Validator(RequestValidator):
    """oauthlib's server-side checks against the one set of credentials the stand-in knows."""

    def __init__(self, credentials: XCredentials) -> None:
        super().__init__()
        self.credentials = credentials
        self._seen: set[tuple[str, str, str, str | None]] = set()

    @property
    def enforce_ssl(self) -> bool:
        return False

    @property
    def dummy_client(self) -> str:
        return "dummy-client"

    @property
    def dummy_access_token(self) -> str:
        return "dummy-access-token"

    def check_client_key(self, client_key: str) -> bool:
        return bool(client_key)

    def check_access_token(self, request_token: str) -> bool:
        return bool(request_token)

    def check_nonce(self, nonce: str) -> bool:
        return bool(nonce)

    def validate_timestamp_and_nonce(
        self, client_key: str, timestamp: str, nonce: str, request: Any, request_token: str | None = None,
        access_token: str | None = None,
    ) -> bool:
        key = (client_key, timestamp, nonce, access_token)
        if key in self._seen:
            return False  # a replayed request
        self._seen.add(key)
        return True

    def validate_client_key(self, client_key: str, request: Any) -> bool:
        return client_key == self.credentials.consumer_key

    def validate_access_token(self, client_key: str, token: str, request: Any) -> bool:
        return token == self.credentials.access_token

    def validate_realms(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def get_client_secret(self, client_key: str, request: Any) -> str:
        return self.credentials.consumer_secret if client_key == self.credentials.consumer_key else "dummy-secret"

    def get_access_token_secret(self, client_key: str, token: str, request: Any) -> str:
        return self.credentials.access_token_secret if token == self.credentials.access_token else "dummy-secret"


def _problem(status: int, title: str, detail: str) -> web.Response:
    return web.json_response({"title": title, "detail": detail, "type": "about:blank", "status": status}, status=status)


class LocalX(StandInServer):
    """The stand-in X API.

    Args:
        credentials: what it accepts (the sandbox credentials by default).
        state_path: a JSON file to keep the tweets in across restarts.
        seed_demo: add the demo users and tweets when the state is new.
        host, port: where to listen (port 0: a free one).
    """

    name = "local X API"

    def __init__(
        self,
        *,
        credentials: XCredentials = SANDBOX_X_CREDENTIALS,
        state_path: Path | None = None,
        seed_demo: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.credentials = credentials
        self.state_path = state_path
        self.users: dict[str, dict[str, str]] = {}
        self.tweets: dict[str, _Tweet] = {}
        self._next_id = FIRST_TWEET_ID
        self._oauth = ResourceEndpoint(_Validator(credentials))
        self._save_lock = asyncio.Lock()
        self._seed_demo = seed_demo
        self.our_id = credentials.user_id or "1000"

    # --- state -----------------------------------------------------------------------

    def _load(self) -> bool:
        if self.state_path is None or not self.state_path.exists():
            return False
        data = json.loads(self.state_path.read_text(encoding="utf-8"))
        self.users = {str(k): dict(v) for k, v in data.get("users", {}).items()}
        self.tweets = {str(t["id"]): _Tweet(**t) for t in data.get("tweets", [])}
        self._next_id = int(data.get("next_id", FIRST_TWEET_ID))
        return True

    def _snapshot(self) -> str:
        return json.dumps(
            {
                "users": self.users,
                "tweets": [vars(t) for t in self.tweets.values()],
                "next_id": self._next_id,
            }
        )

    def _write(self, text: str) -> None:
        assert self.state_path is not None
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.state_path)

    async def _save(self) -> None:
        if self.state_path is None:
            return
        async with self._save_lock:
            await asyncio.to_thread(self._write, self._snapshot())

    async def start(self) -> LocalX:
        loaded = await asyncio.to_thread(self._load)
        if not loaded:
            for user_id, username, name in DEMO_USERS[:1]:
                self.add_user(username, name=name, user_id=user_id)
            if self._seed_demo:
                for user_id, username, name in DEMO_USERS[1:]:
                    self.add_user(username, name=name, user_id=user_id)
                for author, text in DEMO_TWEETS:
                    self.add_tweet(author, text)
            await self._save()
        await super().start()
        return self

    def add_user(self, username: str, *, name: str | None = None, user_id: str | None = None) -> dict[str, str]:
        """Create a user (or return the one with that username)."""
        existing = self.user_by_username(username)
        if existing is not None:
            return existing
        new_id = user_id or str(2000 + len(self.users))
        user = {"id": new_id, "username": username, "name": name or username}
        self.users[new_id] = user
        return user

    def user_by_username(self, username: str) -> dict[str, str] | None:
        wanted = username.lstrip("@").lower()
        return next((u for u in self.users.values() if u["username"].lower() == wanted), None)

    def add_tweet(self, author: str, text: str, *, in_reply_to: str | None = None) -> dict[str, Any]:
        """Store a tweet by ``author`` (created when unknown); returns its JSON."""
        user = self.add_user(author)
        return self._store(user["id"], text, in_reply_to).as_json()

    def _store(self, author_id: str, text: str, in_reply_to: str | None) -> _Tweet:
        tweet_id = str(self._next_id)
        self._next_id += 1
        parent = self.tweets.get(in_reply_to) if in_reply_to else None
        tweet = _Tweet(
            id=tweet_id,
            text=text,
            author_id=author_id,
            created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            conversation_id=parent.conversation_id if parent else tweet_id,
            in_reply_to=in_reply_to,
            in_reply_to_user_id=parent.author_id if parent else None,
        )
        self.tweets[tweet_id] = tweet
        return tweet

    def replies_to(self, tweet_id: str, *, author_id: str | None = None) -> list[dict[str, Any]]:
        """Replies to a tweet (by ``author_id`` only, when given), oldest first."""
        return [
            t.as_json()
            for t in sorted(self.tweets.values(), key=lambda t: int(t.id))
            if t.in_reply_to == tweet_id and (author_id is None or t.author_id == author_id)
        ]

    def state(self) -> dict[str, Any]:
        return {
            "users": list(self.users.values()),
            "tweets": [t.as_json() for t in sorted(self.tweets.values(), key=lambda t: int(t.id))],
            "our_user_id": self.our_id,
        }

    # --- routes ------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/2/tweets/search/recent", self._search)
        app.router.add_get("/2/users/by/username/{username}", self._user)
        app.router.add_get("/2/users/me", self._me)
        app.router.add_get("/2/users/{user_id}/tweets", self._timeline)
        app.router.add_post("/2/tweets", self._post)
        app.router.add_post("/_standin/tweets", self._admin_add_tweet)

    def _oauth_user(self, request: web.Request) -> bool:
        valid, _ = self._oauth.validate_protected_resource_request(
            str(request.url), http_method=request.method, body=None, headers=dict(request.headers)
        )
        return bool(valid)

    def _authorized_read(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("OAuth "):
            return self._oauth_user(request)
        return header == f"Bearer {self.credentials.bearer_token}"

    async def _fault(self, endpoint: str) -> web.Response | None:
        """Count the request and answer for a fault rule that hits it (None: serve it normally)."""
        self.hits[endpoint] += 1
        fault = self.faults.take(endpoint)
        return None if fault is None else await self._fault_response(fault)

    async def _fault_response(self, fault: Fault) -> web.Response | None:
        if fault.kind is FaultKind.STATUS:
            return _problem(fault.status, "Service Unavailable" if fault.status >= 500 else "Error", "stand-in fault")
        if fault.kind is FaultKind.RATE_LIMIT:
            response = _problem(429, "Too Many Requests", "Too Many Requests")
            response.headers["x-rate-limit-limit"] = "50"
            response.headers["x-rate-limit-remaining"] = "0"
            response.headers["x-rate-limit-reset"] = str(int(time.time() + fault.reset_in))
            return response
        if fault.kind is FaultKind.HANG:
            return await self.hang()
        if fault.kind is FaultKind.MALFORMED:
            return self.malformed()
        return None  # answer_lost and overlong mean nothing to reads

    def _page(self, tweets: list[_Tweet], request: web.Request, *, low: int, high: int) -> web.Response:
        since = request.query.get("since_id")
        try:
            limit = int(request.query.get("max_results", "10"))
        except ValueError:
            return _problem(400, "Invalid Request", "max_results must be a number")
        if not low <= limit <= high:
            return _problem(400, "Invalid Request", f"max_results must be between {low} and {high}")
        if since:
            tweets = [t for t in tweets if int(t.id) > int(since)]
        tweets = sorted(tweets, key=lambda t: int(t.id), reverse=True)[:limit]
        if not tweets:
            return web.json_response({"meta": {"result_count": 0}})
        authors = {t.author_id for t in tweets}
        return web.json_response(
            {
                "data": [t.as_json() for t in tweets],
                "includes": {"users": [self.users[a] for a in authors if a in self.users]},
                "meta": {"newest_id": tweets[0].id, "oldest_id": tweets[-1].id, "result_count": len(tweets)},
            }
        )

    async def _search(self, request: web.Request) -> web.Response:
        if (fault := await self._fault("search")) is not None:
            return fault
        if not self._authorized_read(request):
            return _problem(401, "Unauthorized", "Unauthorized")
        query = request.query.get("query", "").strip()
        if not query:
            return _problem(400, "Invalid Request", "query is required")
        matches = _Query(query, self)
        return self._page([t for t in self.tweets.values() if matches(t)], request, low=10, high=100)

    async def _user(self, request: web.Request) -> web.Response:
        if (fault := await self._fault("user")) is not None:
            return fault
        if not self._authorized_read(request):
            return _problem(401, "Unauthorized", "Unauthorized")
        name = request.match_info["username"]
        user = self.user_by_username(name)
        if user is None:
            return web.json_response(
                {"errors": [{"title": "Not Found Error", "detail": f"Could not find user with username: [{name}]."}]}
            )
        return web.json_response({"data": user})

    async def _me(self, request: web.Request) -> web.Response:
        if (fault := await self._fault("me")) is not None:
            return fault
        if not self._oauth_user(request):
            return _problem(401, "Unauthorized", "Unauthorized")
        return web.json_response({"data": self.users.get(self.our_id, {"id": self.our_id, "username": OUR_USERNAME})})

    async def _timeline(self, request: web.Request) -> web.Response:
        if (fault := await self._fault("timeline")) is not None:
            return fault
        if not self._authorized_read(request):
            return _problem(401, "Unauthorized", "Unauthorized")
        user_id = request.match_info["user_id"]
        if user_id not in self.users:
            return web.json_response({"errors": [{"title": "Not Found Error", "detail": f"no user {user_id}"}]})
        exclude = set(filter(None, request.query.get("exclude", "").split(",")))
        tweets = [
            t for t in self.tweets.values()
            if t.author_id == user_id and not ("replies" in exclude and t.in_reply_to)
        ]
        return self._page(tweets, request, low=5, high=100)

    async def _post(self, request: web.Request) -> web.Response:
        self.hits["post"] += 1
        fault = self.faults.take("post", await request.text())
        answer_lost = fault is not None and fault.kind is FaultKind.ANSWER_LOST
        if fault is not None and not answer_lost and (response := await self._fault_response(fault)) is not None:
            return response
        if not self._oauth_user(request):
            return _problem(401, "Unauthorized", "Unauthorized")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _problem(400, "Invalid Request", "body is not JSON")
        text = str(body.get("text") or "")
        reply_to = (body.get("reply") or {}).get("in_reply_to_tweet_id")
        if not text.strip():
            return _problem(400, "Invalid Request", "text is required")
        if weighted_length(text) > MAX_WEIGHTED_LENGTH:
            return _problem(400, "Invalid Request", f"text weighs {weighted_length(text)}; the limit is {MAX_WEIGHTED_LENGTH}")
        if reply_to is not None and str(reply_to) not in self.tweets:
            return _problem(400, "Invalid Request", "You attempted to reply to a Tweet that is deleted or not visible to you.")
        if any(t.author_id == self.our_id and t.text == text for t in self.tweets.values()):
            return _problem(403, "Forbidden", "You are not allowed to create a Tweet with duplicate content.")
        tweet = self._store(self.our_id, text, str(reply_to) if reply_to is not None else None)
        await self._save()
        logger.info("local X: %s posted %s in reply to %s", OUR_USERNAME, tweet.id, reply_to)
        if answer_lost:
            return await self.hang()
        return web.json_response({"data": {"id": tweet.id, "text": tweet.text, "edit_history_tweet_ids": [tweet.id]}}, status=201)

    async def _admin_add_tweet(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            author, text = str(body["author"]), str(body["text"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'send {"author": "...", "text": "..."}'}, status=400)
        tweet = self.add_tweet(author, text)
        await self._save()
        return web.json_response({"data": tweet}, status=201)


_TOKEN = re.compile(r'-?"[^"]*"|\S+')


class _Query:
    """A small subset of X's search syntax: the terms the bot builds, and a few more."""

    def __init__(self, query: str, x: LocalX) -> None:
        self.x = x
        self.any_of: list[str] = []  # words or phrases; one must match
        self.filters: list[tuple[bool, str, str]] = []  # (negated, operator, value)
        for raw in _TOKEN.findall(query.replace("(", " ").replace(")", " ")):
            if raw.upper() == "OR":
                continue
            negated = raw.startswith("-")
            token = raw[1:] if negated else raw
            if ":" in token and not token.startswith('"'):
                operator, _, value = token.partition(":")
                self.filters.append((negated, operator.lower(), value))
            elif not negated:
                self.any_of.append(token.strip('"').lower())

    def __call__(self, tweet: _Tweet) -> bool:
        for negated, operator, value in self.filters:
            if self._operator(tweet, operator, value) == negated:
                return False
        if not self.any_of:
            return True
        text = tweet.text.lower()
        words = set(re.findall(r"[\w#@']+", text))
        return any((" " in term and term in text) or term in words for term in self.any_of)

    def _operator(self, tweet: _Tweet, operator: str, value: str) -> bool:
        if operator == "from":
            user = self.x.users.get(tweet.author_id, {})
            return value.lstrip("@").lower() in (user.get("username", "").lower(), tweet.author_id)
        if operator == "is":
            if value == "reply":
                return tweet.in_reply_to is not None
            if value == "retweet":
                return False  # the stand-in has no retweets
            return False
        if operator == "in_reply_to_tweet_id":
            return tweet.in_reply_to == value
        if operator == "conversation_id":
            return tweet.conversation_id == value
        if operator == "lang":
            return True
        return False


__all__ = ["DEMO_TWEETS", "LocalX", "OUR_USERNAME", "SANDBOX_KEYWORDS", "SANDBOX_TARGET_ACCOUNTS", "SANDBOX_X_CREDENTIALS"]
