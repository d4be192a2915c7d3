"""The X API v2 client: find tweets, post replies, find our own replies again.

Reads (recent search, user lookup, a user's tweets) use the app's bearer
token. Posting (``POST /2/tweets``) and ``GET /2/users/me`` use OAuth 1.0a
user context, signed by oauthlib (HMAC-SHA1; the JSON body is not part of
the signature, as the OAuth 1.0a spec says for non-form bodies).

Errors, by what they mean for the caller:

* :class:`shared.errors.RateLimitedError`: a 429. Its wait comes from
  ``x-rate-limit-reset`` (an epoch second); an operator alert goes out and
  the endpoint is not called again before the reset.
* :class:`shared.errors.TransientError`: a 5xx or malformed JSON on a read;
  retried with backoff, counted by the ``twitter_api`` breaker.
* :class:`shared.errors.UnknownOutcomeError` or an ``OperationTimeout`` with
  ``outcome_unknown``: a post whose answer never came or was broken (5xx,
  malformed, connection lost). The reply may exist. Never retried here: the
  caller looks for it with :meth:`XClient.find_reply` first.
* :class:`DuplicateContentError`: X refused a post as a duplicate of one of
  our tweets: an earlier attempt did go out.
* :class:`shared.errors.PermanentError`: other 4xx (bad credentials, a reply
  to a deleted tweet): retrying will not help.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from oauthlib.oauth1 import SIGNATURE_HMAC_SHA1
from oauthlib.oauth1 import Client as OAuth1Client

from shared.breaker import CircuitBreaker
from shared.errors import PermanentError, TransientError, UnknownOutcomeError

from replyguy.http import HttpResult, HttpService, HttpSettings, retry_after_header

logger = logging.getLogger(__name__)

DEFAULT_RATE_LIMIT_WAIT = 60.0
"""Wait assumed for a 429 that names no reset time."""


class DuplicateContentError(PermanentError):
    """X refused a post because we already posted the same text."""


@dataclass(frozen=True)
class XCredentials:
    """What the client signs with.

    Attributes:
        bearer_token: app-only token for reads.
        consumer_key, consumer_secret, access_token, access_token_secret:
            OAuth 1.0a user context for posting.
        user_id: our own account's id (looked up with ``/2/users/me`` when None).
    """

    bearer_token: str
    consumer_key: str
    consumer_secret: str
    access_token: str
    access_token_secret: str
    user_id: str | None = None


@dataclass(frozen=True)
class XTweet:
    """A tweet as the bot needs it."""

    id: str
    text: str
    author_id: str | None
    author: str | None
    in_reply_to: str | None
    is_retweet: bool


@dataclass(frozen=True)
class XUser:
    id: str
    username: str
    name: str | None


_TWEET_FIELDS = "author_id,created_at,conversation_id,referenced_tweets,in_reply_to_user_id"


def _tweets_from(payload: Any) -> list[XTweet]:
    """Tweets of a v2 answer, oldest first, with usernames from ``includes.users``."""
    shape_error = TransientError("X answered with an unexpected JSON shape")
    if not isinstance(payload, dict):
        raise shape_error
    includes = payload.get("includes") or {}
    data = payload.get("data") or []
    if not isinstance(includes, dict) or not isinstance(data, list):
        raise shape_error
    listed_users = includes.get("users") or []
    if not isinstance(listed_users, list):
        raise shape_error
    users = {str(u.get("id")): str(u.get("username")) for u in listed_users if isinstance(u, dict)}
    tweets: list[XTweet] = []
    for item in data:
        # A tweet without a usable id cannot be answered: skip it rather than invent one.
        if not isinstance(item, dict) or not isinstance(item.get("id"), (str, int)) or isinstance(item.get("id"), bool):
            continue
        refs = item.get("referenced_tweets") or []
        if not isinstance(refs, list):
            raise shape_error
        replied = next((str(r.get("id")) for r in refs if isinstance(r, dict) and r.get("type") == "replied_to"), None)
        retweet = any(isinstance(r, dict) and r.get("type") == "retweeted" for r in refs)
        author_id = str(item["author_id"]) if item.get("author_id") is not None else None
        tweets.append(
            XTweet(
                id=str(item["id"]),
                text=str(item.get("text") or ""),
                author_id=author_id,
                author=users.get(author_id or ""),
                in_reply_to=replied,
                is_retweet=retweet,
            )
        )
    tweets.sort(key=lambda t: int(t.id) if t.id.isdigit() else 0)
    return tweets


class XClient:
    """X API v2 over aiohttp, through the ``twitter_api`` breaker.

    Args:
        base_url: ``https://api.twitter.com`` (or a stand-in's URL).
        credentials: tokens and keys.
        breaker: the ``twitter_api`` breaker.
        settings: deadline (TIMEOUT_HTTP), backoff, alert sink and clock
            (X's reset header is wall-clock).
    """

    def __init__(self, *, base_url: str, credentials: XCredentials, breaker: CircuitBreaker, settings: HttpSettings) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self.http = HttpService("twitter", breaker=breaker, settings=settings)
        self._me: str | None = credentials.user_id
        self._user_ids: dict[str, XUser] = {}
        breaker.set_probe(self.probe)

    async def probe(self) -> None:
        """``GET /2/users/me``, the cheapest authenticated call: the open breaker's probe."""
        url = f"{self.base_url}/2/users/me"
        await self.http.probe(url, self._oauth1("GET", url))

    async def close(self) -> None:
        self.http.breaker.clear_probe(self.probe)
        await self.http.close()

    # --- auth ----------------------------------------------------------------------

    def _bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credentials.bearer_token}", "Accept": "application/json"}

    def _oauth1(self, method: str, url: str) -> dict[str, str]:
        """An OAuth 1.0a ``Authorization`` header for a request without query parameters."""
        creds = self.credentials
        client = OAuth1Client(
            creds.consumer_key,
            client_secret=creds.consumer_secret,
            resource_owner_key=creds.access_token,
            resource_owner_secret=creds.access_token_secret,
            signature_method=SIGNATURE_HMAC_SHA1,
        )
        _, headers, _ = client.sign(url, http_method=method)
        return {"Authorization": headers["Authorization"], "Accept": "application/json"}

    # --- answers -----------------------------------------------------------------------

    def _interpret(self, endpoint: str, result: HttpResult, *, posting: bool = False) -> Any:
        status = result.status
        if status == 429:
            reset = result.headers.get("x-rate-limit-reset")
            wait = DEFAULT_RATE_LIMIT_WAIT
            if reset:
                try:
                    wait = float(reset) - self.http.clock()
                except ValueError:
                    wait = retry_after_header(result.headers, DEFAULT_RATE_LIMIT_WAIT)
            else:
                wait = retry_after_header(result.headers, DEFAULT_RATE_LIMIT_WAIT)
            raise self.http.rate_limited(endpoint, wait, detail=result.error_detail())
        if status >= 500 or status in (408, 425):
            message = f"X API {endpoint} answered {status}: {result.error_detail()}"
            if posting:
                # The post may have been stored before the server failed.
                raise UnknownOutcomeError(message)
            raise TransientError(message)
        if status >= 400:
            detail = result.error_detail()
            if status == 403 and "duplicate" in detail.lower():
                raise DuplicateContentError(f"X refused a duplicate post: {detail}")
            if status in (401, 403):
                raise PermanentError(f"X refused our credentials on {endpoint} ({status}): {detail}")
            raise PermanentError(f"X rejected {endpoint} ({status}): {detail}")
        try:
            return result.json()
        except ValueError:
            message = f"X API {endpoint} answered {status} with malformed JSON"
            if posting:
                raise UnknownOutcomeError(message) from None
            raise TransientError(message) from None

    async def _get(self, endpoint: str, path: str, params: Mapping[str, str], *, oauth: bool = False) -> Any:
        url = f"{self.base_url}{path}"

        async def attempt() -> Any:
            headers = self._oauth1("GET", url) if oauth else self._bearer()
            result = await self.http.send(endpoint, "GET", url, headers=headers, params=params)
            return self._interpret(endpoint, result)

        return await self.http.call(endpoint, attempt)

    # --- reads -----------------------------------------------------------------------------

    async def search_recent(self, query: str, *, since_id: str | None = None, max_results: int = 25) -> list[XTweet]:
        """Tweets of the last 7 days matching ``query``, oldest first, newer than ``since_id``."""
        params = {
            "query": query,
            "max_results": str(max(10, min(100, max_results))),
            "tweet.fields": _TWEET_FIELDS,
            "expansions": "author_id",
            "user.fields": "username",
        }
        if since_id:
            params["since_id"] = since_id
        return _tweets_from(await self._get("search", "/2/tweets/search/recent", params))

    async def user_by_username(self, username: str) -> XUser | None:
        """The user with this username (without ``@``), or None when X knows none."""
        name = username.lstrip("@")
        cached = self._user_ids.get(name.lower())
        if cached is not None:
            return cached
        payload = await self._get("user", f"/2/users/by/username/{name}", {"user.fields": "username"})
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, dict) or "id" not in data:
            return None
        user = XUser(id=str(data["id"]), username=str(data.get("username") or name), name=data.get("name"))
        self._user_ids[name.lower()] = user
        return user

    async def user_tweets(
        self,
        user_id: str,
        *,
        since_id: str | None = None,
        max_results: int = 25,
        exclude: Sequence[str] = ("retweets", "replies"),
        username: str | None = None,
    ) -> list[XTweet]:
        """A user's recent tweets, oldest first, newer than ``since_id``."""
        params = {
            "max_results": str(max(5, min(100, max_results))),
            "tweet.fields": _TWEET_FIELDS,
            "expansions": "author_id",
            "user.fields": "username",
        }
        if exclude:
            params["exclude"] = ",".join(exclude)
        if since_id:
            params["since_id"] = since_id
        tweets = _tweets_from(await self._get("timeline", f"/2/users/{user_id}/tweets", params))
        if username:
            tweets = [t if t.author else XTweet(t.id, t.text, t.author_id, username, t.in_reply_to, t.is_retweet) for t in tweets]
        return tweets

    async def me(self) -> str:
        """Our own account's id (X_USER_ID, else ``GET /2/users/me`` once)."""
        if self._me is None:
            payload = await self._get("me", "/2/users/me", {}, oauth=True)
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, dict) or "id" not in data:
                raise TransientError("X answered /2/users/me without an id")
            self._me = str(data["id"])
        return self._me

    async def find_reply(self, in_reply_to: str) -> str | None:
        """The id of our reply to tweet ``in_reply_to``, or None when we have none.

        Reads our own timeline (``GET /2/users/:me/tweets``, replies
        included), not the recent search: search is indexed with a delay and
        may miss a reply made seconds ago, which is exactly the reply a crash
        leaves behind; the timeline shows it at once. It covers our latest
        100 tweets, far more than can be posted between a crash and the
        recovery.
        """
        me = await self.me()
        tweets = await self.user_tweets(me, max_results=100, exclude=("retweets",))
        for tweet in reversed(tweets):
            if tweet.in_reply_to == in_reply_to:
                return tweet.id
        return None

    # --- posting -----------------------------------------------------------------------------

    async def post_reply(self, text: str, in_reply_to: str) -> str:
        """Post ``text`` as a reply to ``in_reply_to``; the new tweet's id.

        One request: retried with backoff only when no connection could be
        made at all (nothing was sent). Any other failure is raised for the
        caller, which must look for the reply before posting again.

        Raises:
            See the module docstring.
        """
        url = f"{self.base_url}/2/tweets"
        body = {"text": text, "reply": {"in_reply_to_tweet_id": in_reply_to}}

        async def attempt() -> str:
            headers = {**self._oauth1("POST", url), "Content-Type": "application/json"}
            result = await self.http.send("post", "POST", url, headers=headers, json_body=body, changes_state=True)
            payload = self._interpret("post", result, posting=True)
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, dict) or not data.get("id"):
                raise UnknownOutcomeError("X accepted the post but its answer has no tweet id")
            return str(data["id"])

        tweet_id = await self.http.call("post", attempt)
        logger.info("reply posted", extra={"tweet_id": tweet_id, "in_reply_to": in_reply_to})
        return tweet_id

    def health(self) -> dict[str, Any]:
        return self.http.health()


__all__ = ["DuplicateContentError", "XClient", "XCredentials", "XTweet", "XUser"]
