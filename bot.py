"""bot.py: the Reply Guy. Finds tweets, drafts replies, asks a human, posts once.

``BOT=bot ./start.sh`` runs it. The story, top to bottom:

1. settings: what this run talks to (X, the AI API, the Telegram bot), or
   local stand-ins of all three when no credentials are set (:class:`Plan`);
2. what every step shares (:class:`Crew`): the wake-up events, the failure
   counts behind ``multiple_failures`` and the dead-letter queue
   (:class:`Failures`);
3. the steps, one class each, one watched loop each, all beating under the
   heartbeat id ``reply-guy``:

   * :class:`Recovery`, once at start: puts back what a crash left stuck;
   * :class:`Discover`: X recent search for REPLY_KEYWORDS and the recent
     tweets of REPLY_TARGET_ACCOUNTS, from persisted ``since_id`` cursors;
     each tweet is stored once in ``tweet_queue``;
   * :class:`Draft`: a reply from the AI API that fits X's 280 weighted
     characters (regenerated, then cut at a word boundary);
   * :class:`Approve`: the draft goes to the operators' Telegram chat with
     Approve / Reject / Regenerate buttons (or an answer with new text);
   * :class:`Post`: approved replies go out through ``POST /2/tweets`` after a
     random delay and within the daily cap, exactly once (below);
   * :class:`RetryDeadLetters`: failed drafts and posts are retried from
     ``retry_items`` (at most MAX_MESSAGE_RETRIES attempts, then they stay as
     dead letters and the operator is told once);

4. :class:`ReplyGuy`, the steps together with ``health_check_all()`` and the
   status section;
5. assembly (:func:`assemble`, the one place every part is built, complete)
   and ``main()``: ``python bot.py`` runs it, ``python bot.py health`` asks
   the running bot how it is (exit 0 healthy, 1 degraded, 2 error).

Exactly-once posting, in short: the intent is recorded (status ``posting``,
``attempts + 1``) *before* the POST; a tweet that ever had an intent
(``attempts > 0``) is never posted again before our own timeline has been
searched for a reply to it. See :meth:`Post.post_one`.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import logging
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from shared.active import ActiveLease
from shared import metrics, tracing
from shared.alerts import AlertType
from shared.breaker import BreakerRegistry, CircuitBreaker, CircuitOpenError, CircuitState
from shared.breaker import registry as breaker_registry
from shared.cli import bot_parser
from shared.config import BY_NAME, ConfigError, ReplyGuySettings
from shared.db import Database, Tweet, TweetStatus
from shared.db.retry_store import DbRetryStore
from shared.errors import ErrorKind, classify, concerns_the_chat, describe
from shared.health import report_of
from shared.retry_queue import JsonlRetryStore, RetryItem, RetryQueue
from shared.runtime import BotRuntime, StartupAborted, StartupFailed, bot_main
from shared.timeouts import db_op

from replyguy.ai import AIClient, Drafter, load_prompt
from replyguy.health import Health
from replyguy.http import HttpSettings
from replyguy.state import ReplyState
from replyguy.xapi import DuplicateContentError, XClient, XCredentials

if TYPE_CHECKING:  # Telethon (and the approval desk on it) is imported where the bot builds its chat: `health` starts without it
    from telethon import TelegramClient

    from replyguy.approval import ApprovalDesk, Decision

logger = logging.getLogger("bot")

# --- 1. settings -------------------------------------------------------------------------

BOT = "bot"
HEARTBEAT_ID = "reply-guy"

BREAKERS: dict[str, dict[str, Any]] = {
    "twitter_api": {"failure_threshold": 5, "recovery_timeout": 120.0, "half_open_max_calls": 3, "success_threshold": 3},
    "ai_service": {"failure_threshold": 3, "recovery_timeout": 60.0, "half_open_max_calls": 2, "success_threshold": 2},
    "database": {"failure_threshold": 3, "recovery_timeout": 30.0, "half_open_max_calls": 2, "success_threshold": 2},
}
"""The breakers, by name: failures in a row that open it, seconds it stays open, and the
trial calls admitted when half-open, all of which must succeed to close it again."""

STALE_MINUTES = 30.0
"""Crash recovery: tweets stuck this long in ``failed`` or ``posting`` are put back."""

MAX_POST_ATTEMPTS = 5
"""Recorded posting intents after which recovery leaves a tweet alone."""

SETTLE_MARGIN = 5.0
"""Seconds, on top of TIMEOUT_HTTP, after which a ``posting`` intent cannot still be in flight."""

MULTIPLE_FAILURES_AFTER = 3
"""Consecutive failures of one step that raise a ``multiple_failures`` alert."""

DEFAULT_X_API_BASE = BY_NAME["X_API_BASE"].default
DEFAULT_AI_BASE_URL = BY_NAME["AI_BASE_URL"].default


class Stage(str, enum.Enum):
    """Steps whose failures go to the dead-letter queue (``retry_items.kind``; ``approve`` only as dead letters)."""

    DRAFT = "draft"
    APPROVE = "approve"
    POST = "post"


@dataclass(frozen=True)
class LiveTelegram:
    """The operator bot on real Telegram: its token, the MTProto app (bots need it too) and the chat."""

    bot_token: str
    api_id: int
    api_hash: str
    operator_chat: str


@dataclass(frozen=True)
class Plan:
    """What this run talks to, resolved from the settings.

    ``x_base`` / ``ai_base`` None means "start the local stand-in";
    ``telegram`` None means "the Telegram sandbox", where ``operator_chat``
    None and empty ``operator_ids`` mean its demo operator chat and operator.
    """

    sandbox: bool
    x_base: str | None
    x_credentials: XCredentials
    ai_base: str | None
    ai_key: str
    ai_model: str
    keywords: tuple[str, ...]
    accounts: tuple[str, ...]
    operator_chat: str | None
    operator_ids: tuple[int, ...]
    telegram: LiveTelegram | None


V = TypeVar("V")


def _required(value: V | None, name: str) -> V:
    """A credential that ``ReplyGuySettings.validate`` already demanded outside sandbox mode."""
    if value is None or value == "":
        raise ConfigError(name, BY_NAME[name].expected, None)
    return value


def plan_for(settings: ReplyGuySettings) -> Plan:
    """Resolve the settings into a :class:`Plan`: local stand-ins, or the real services.

    Outside sandbox mode every credential is present: ``ReplyGuySettings.validate``
    checked them, TELEGRAM_API_ID/HASH included (MTProto needs them for bots too).

    Raises:
        ConfigError: a credential is missing outside sandbox mode (settings not validated).
    """
    if settings.sandbox:
        from devkit.local_ai import SANDBOX_AI_KEY, SANDBOX_AI_MODEL
        from devkit.local_x import SANDBOX_KEYWORDS, SANDBOX_TARGET_ACCOUNTS, SANDBOX_X_CREDENTIALS

        return Plan(
            sandbox=True,
            x_base=None if settings.x_api_base == DEFAULT_X_API_BASE else settings.x_api_base,
            x_credentials=SANDBOX_X_CREDENTIALS,
            ai_base=None if settings.ai_base_url == DEFAULT_AI_BASE_URL else settings.ai_base_url,
            ai_key=SANDBOX_AI_KEY,
            ai_model=settings.ai_model if settings.ai_base_url != DEFAULT_AI_BASE_URL else SANDBOX_AI_MODEL,
            keywords=settings.reply_keywords or (() if settings.reply_target_accounts else SANDBOX_KEYWORDS),
            accounts=settings.reply_target_accounts or (() if settings.reply_keywords else SANDBOX_TARGET_ACCOUNTS),
            operator_chat=settings.operator_chat_id,
            operator_ids=settings.operator_ids or (),
            telegram=None,
        )
    operator_chat = _required(settings.operator_chat_id, "OPERATOR_CHAT_ID")
    return Plan(
        sandbox=False,
        x_base=settings.x_api_base,
        x_credentials=XCredentials(
            bearer_token=_required(settings.x_bearer_token, "X_BEARER_TOKEN"),
            consumer_key=_required(settings.x_consumer_key, "X_CONSUMER_KEY"),
            consumer_secret=_required(settings.x_consumer_secret, "X_CONSUMER_SECRET"),
            access_token=_required(settings.x_access_token, "X_ACCESS_TOKEN"),
            access_token_secret=_required(settings.x_access_token_secret, "X_ACCESS_TOKEN_SECRET"),
            user_id=settings.x_user_id,
        ),
        ai_base=settings.ai_base_url,
        ai_key=_required(settings.ai_api_key, "AI_API_KEY"),
        ai_model=settings.ai_model,
        keywords=settings.reply_keywords or (),
        accounts=settings.reply_target_accounts or (),
        operator_chat=operator_chat,
        operator_ids=settings.operator_ids or (),
        telegram=LiveTelegram(
            bot_token=_required(settings.telegram_bot_token, "TELEGRAM_BOT_TOKEN"),
            api_id=_required(settings.telegram_api_id, "TELEGRAM_API_ID"),
            api_hash=_required(settings.telegram_api_hash, "TELEGRAM_API_HASH"),
            operator_chat=operator_chat,
        ),
    )


def configure_breakers(registry: BreakerRegistry = breaker_registry, **kwargs: Any) -> dict[str, CircuitBreaker]:
    """The three breakers, as the Reply Guy configures them (``kwargs``: e.g. a test clock).

    The ``database`` breaker must exist before ``open_database`` (which takes
    the process-wide one), or the data layer's defaults would win.
    """
    return {name: registry.get_or_create(name, **options, **kwargs) for name, options in BREAKERS.items()}


def search_query(keywords: Sequence[str]) -> str:
    """X search syntax for "any of these", without retweets and replies."""
    terms = [f'"{k}"' if " " in k else k for k in keywords]
    joined = " OR ".join(terms)
    return f"({joined}) -is:retweet -is:reply" if len(terms) > 1 else f"{joined} -is:retweet -is:reply"


def seconds_to_utc_midnight(wall: float) -> float:
    """Seconds until the next UTC midnight, when the daily cap starts over (at least 1)."""
    now = datetime.fromtimestamp(wall, UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, (tomorrow - now).total_seconds())


# --- 2. what every step shares ------------------------------------------------------------


def pause_asked_by(exc: BaseException) -> float | None:
    """Seconds to wait when ``exc`` says "not now" (a rate limit, an open breaker), else None."""
    verdict = classify(exc)
    if verdict.kind is ErrorKind.RATE_LIMITED or isinstance(exc, CircuitOpenError):
        return max(1.0, verdict.retry_after or 1.0)
    return None


def breaker_wait(breaker: CircuitBreaker) -> float:
    """Seconds until an open breaker admits a trial call (at least 1)."""
    retry_in = breaker.get_status().get("retry_in_s") or 1.0
    return max(1.0, float(retry_in))


@dataclass(frozen=True)
class Wakeups:
    """One event per loop that another step (or an operator) can wake early."""

    draft: asyncio.Event = field(default_factory=asyncio.Event)
    approve: asyncio.Event = field(default_factory=asyncio.Event)
    post: asyncio.Event = field(default_factory=asyncio.Event)
    dlq: asyncio.Event = field(default_factory=asyncio.Event)

    def of(self, loop: str) -> asyncio.Event | None:
        """The event of the loop named ``loop`` (None: nothing wakes it, e.g. ``discover``)."""
        event = getattr(self, loop, None)
        return event if isinstance(event, asyncio.Event) else None

    def on_decision(self, decision: Decision, tweet_id: str) -> None:
        """An operator decided (the approval desk calls this): wake the step that acts next."""
        from replyguy.approval import Decision

        metrics.DECISIONS.labels(decision.name.lower()).inc()
        (self.post if decision is Decision.APPROVE else self.draft).set()


class Failures:
    """What happens when a step fails: counted, alerted after a streak, kept as a dead letter or retried.

    Args:
        runtime: the kit (alerts and stats).
        queue: the dead-letter queue (``retry_items`` of bot ``bot``).
        wake: woken when a retry is queued.
        clock: wall-clock seconds.
    """

    def __init__(self, *, runtime: BotRuntime, queue: RetryQueue, wake: Wakeups, clock: Callable[[], float]) -> None:
        self.runtime = runtime
        self.queue = queue
        self.wake = wake
        self.clock = clock
        self._streaks: dict[str, int] = {}

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def succeeded(self, step: str) -> None:
        """``step`` worked: a ``multiple_failures`` alert of it is resolved."""
        if self._streaks.get(step):
            self._streaks[step] = 0
            self.runtime.alerts.resolve(AlertType.MULTIPLE_FAILURES, key=f"step:{step}", message=f"{step} works again")

    def failed(self, step: str, exc: BaseException, *, tweet: Tweet | None = None) -> None:
        """``step`` failed: counted, and the MULTIPLE_FAILURES_AFTER-th failure in a row alerts."""
        verdict = classify(exc)
        self.runtime.stats.failed += 1
        self.runtime.stats.error(f"{step}" + (f" tweet {tweet.target_tweet_id}" if tweet else ""), verdict.reason)
        count = self._streaks.get(step, 0) + 1
        self._streaks[step] = count
        if count == MULTIPLE_FAILURES_AFTER:
            self.runtime.alerts.alert(
                AlertType.MULTIPLE_FAILURES,
                f"{count} failures in a row in the {step} step",
                key=f"step:{step}",
                details={"step": step, "last_error": verdict.reason},
            )

    async def dead_letter(self, stage: Stage, tweet: Tweet, exc: BaseException) -> None:
        """A tweet that can never succeed as it is: keep it as a dead letter and tell the operator."""
        reason = classify(exc).reason
        item = RetryItem(
            id=f"{stage.value}-{tweet.id}",
            kind=stage.value,
            payload={"tweet_id": tweet.id, "target_tweet_id": tweet.target_tweet_id},
            attempts=1,
            next_attempt_at=self._now(),
            last_error=reason,
            created_at=self._now(),
        )
        metrics.DEAD_LETTERS.inc()
        try:
            await self.queue.dead_letter(item)
        except Exception as store_exc:
            logger.error("could not record dead letter for tweet %s: %s", tweet.target_tweet_id, describe(store_exc))
        self.runtime.alerts.alert(
            AlertType.TWEET_PROCESSING_FAILED,
            f"tweet {tweet.target_tweet_id} failed for good in the {stage.value} step: {reason}",
            key=f"tweet:{tweet.id}",
            details={"tweet": tweet.target_tweet_id, "author": tweet.author or "", "stage": stage.value, "error": reason},
        )

    async def retry_later(self, stage: Stage, tweet: Tweet, exc: BaseException, *, service_back: bool = False) -> None:
        """A failed tweet (already in status ``failed``): retry later, or keep it dead if hopeless.

        ``service_back``: the service the step failed on was seen back while the step was still
        failing (its lookups and retries outlasted the outage), so the retry is due at once: the
        "back" signal came before this item was queued and would otherwise be missed.
        """
        verdict = classify(exc)
        if verdict.kind is ErrorKind.PERMANENT:
            await self.dead_letter(stage, tweet, exc)
            return
        await self.queue.put(
            stage.value,
            {"tweet_id": tweet.id, "target_tweet_id": tweet.target_tweet_id},
            error=verdict.reason,
            delay=0.0 if service_back else verdict.retry_after,
        )
        self.runtime.stats.retried += 1
        self.wake.dlq.set()
        logger.warning(
            "tweet %s: %s failed (%s); queued for a retry",
            tweet.target_tweet_id,
            stage.value,
            verdict.reason,
            extra={"tweet": tweet.target_tweet_id, "stage": stage.value},
        )


@dataclass(frozen=True)
class Crew:
    """What every step works with: the settings, the kit, the tweets, the cursors, one another."""

    settings: ReplyGuySettings
    runtime: BotRuntime
    db: Database
    state: ReplyState
    wake: Wakeups
    failures: Failures
    clock: Callable[[], float]

    def ping(self, loop: str) -> None:
        """Tell the watchdog ``loop`` is alive."""
        self.runtime.watchdog.ping(loop)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    @property
    def stopping(self) -> bool:
        return self.runtime.shutdown.stopping


# --- 3. the steps -------------------------------------------------------------------------


class Recovery:
    """Crash recovery, once at start: put back what a crash left stuck (tweets left in ``posting`` or ``failed``).

    Args:
        crew: what every step shares.
        queue: the dead-letter queue, loaded first.
        stale_minutes: how long a tweet must be stuck to be put back.
    """

    def __init__(self, crew: Crew, *, queue: RetryQueue, stale_minutes: float = STALE_MINUTES) -> None:
        self.crew = crew
        self.queue = queue
        self.stale_minutes = stale_minutes

    async def run(self) -> dict[str, int]:
        """Put the stale tweets back where they can safely continue.

        Tweets stuck for STALE_MINUTES in ``failed`` or ``posting`` are sent
        back, by one SQL statement, to where they can safely continue (so a
        crash during recovery leaves no tweet anywhere unsafe): no draft yet:
        ``discovered``; never approved by an operator: ``drafted`` (asked
        again); approved: ``approved``, and the post step looks for an earlier
        reply before posting (it had an intent). Dead letters of this bot stay
        ``failed``. Younger ``posting`` rows are settled by the post loop once
        no attempt can still be in flight.

        Returns:
            How many stale tweets were found (``recovered``) and where they
            went: ``to_discovered``, ``to_drafted``, ``approved``, ``kept_dead``.
        """
        # The queue first: dead letters written to the fallback file while the database was
        # down move into the database, where the recovery statement looks for them.
        waiting = await self.queue.load()
        recovered = await self.crew.db.recover_stale_tweets(minutes=self.stale_minutes, max_attempts=MAX_POST_ATTEMPTS, bot=BOT)
        key_for = {
            TweetStatus.DISCOVERED: "to_discovered",
            TweetStatus.DRAFTED: "to_drafted",
            TweetStatus.APPROVED: "approved",
            TweetStatus.FAILED: "kept_dead",
        }
        counts = {"recovered": len(recovered), **dict.fromkeys(key_for.values(), 0)}
        for item in recovered:
            counts[key_for[item.status]] += 1
        await self.crew.state.load()  # cursors, and today's posts as the database counts them after recovery
        logger.info(
            "crash recovery: %d stale tweets found (%s); %d dead-letter retries waiting",
            counts["recovered"],
            ", ".join(f"{k}={v}" for k, v in counts.items() if k != "recovered"),
            waiting,
            extra={"recovery": counts, "dlq_waiting": waiting},
        )
        return counts


class Discover:
    """Step 1: new tweets from X recent search and the target accounts' timelines, stored once.

    Args:
        crew: what every step shares.
        x: the X API client.
        keywords: REPLY_KEYWORDS (one search for all of them).
        accounts: REPLY_TARGET_ACCOUNTS (one timeline each).
    """

    def __init__(self, crew: Crew, *, x: XClient, keywords: Sequence[str], accounts: Sequence[str]) -> None:
        self.crew = crew
        self.x = x
        self.keywords = tuple(keywords)
        self.accounts = tuple(accounts)
        self._unknown_accounts: set[str] = set()

    def sources(self) -> list[tuple[str, str]]:
        """(cursor key, what) per discovery source: one search, one timeline per account."""
        found: list[tuple[str, str]] = []
        if self.keywords:
            query = search_query(self.keywords)
            found.append((f"search:{query}", query))
        found += [(f"account:{a.lstrip('@').lower()}", a.lstrip("@")) for a in self.accounts]
        return found

    async def cycle(self) -> float | None:
        """Store new tweets from every source; a failing source does not stop the others."""
        sources = self.sources()
        failures: list[BaseException] = []
        waits: list[float] = []
        new = 0
        for key, what in sources:
            self.crew.ping("discover")
            try:
                new += await tracing.traced("replyguy.discover", self._discover(key, what), attributes={"source": key})
            except Exception as exc:
                wait = pause_asked_by(exc)
                if wait is not None:
                    waits.append(wait)
                    continue
                failures.append(exc)
                logger.warning("discovery from %s failed: %s", key, describe(exc))
        if new:
            self.crew.wake.draft.set()
            logger.info("discovered %d new tweet(s)", new)
        if failures and len(failures) + len(waits) == len(sources):
            raise failures[-1]
        self.crew.failures.succeeded("discover")
        if waits and len(waits) == len(sources):
            return min(max(waits), self.crew.settings.discover_interval)
        return None

    async def _discover(self, key: str, what: str) -> int:
        since = self.crew.state.cursor(key)
        if key.startswith("search:"):
            tweets = await self.x.search_recent(what, since_id=since)
        else:
            user = await self.x.user_by_username(what)
            if user is None:
                if what not in self._unknown_accounts:
                    self._unknown_accounts.add(what)
                    logger.warning("X knows no account @%s; REPLY_TARGET_ACCOUNTS names it", what)
                return 0
            tweets = await self.x.user_tweets(user.id, since_id=since, username=user.username)
        me = await self.x.me()  # X_USER_ID, or one /2/users/me call: never answer ourselves
        created = 0
        for tweet in tweets:
            if tweet.is_retweet or tweet.author_id == me:
                continue
            inserted = await self.crew.db.insert_tweet(tweet.id, author=tweet.author, text=tweet.text)
            created += int(inserted.created)
        if tweets:
            await self.crew.state.advance(key, tweets[-1].id)
        return created


class Draft:
    """Step 2: a reply from the AI API for each discovered tweet.

    Args:
        crew: what every step shares.
        drafter: the AI drafter (its client's breaker decides when to wait).
    """

    BATCH = 5

    def __init__(self, crew: Crew, *, drafter: Drafter) -> None:
        self.crew = crew
        self.drafter = drafter

    async def cycle(self) -> float | None:
        """Draft replies for discovered tweets, a few per cycle."""
        crew = self.crew
        breaker = self.drafter.ai.http.breaker
        if breaker.state is CircuitState.OPEN:
            return breaker_wait(breaker)
        tweets = await crew.db.list_tweets(statuses=[TweetStatus.DISCOVERED], limit=self.BATCH)
        for tweet in tweets:
            crew.ping("draft")
            if crew.stopping:
                return None
            seen_back = breaker.times_back
            try:
                async with crew.runtime.shutdown.in_flight():
                    await tracing.traced("replyguy.draft", self.draft_one(tweet), attributes=tracing.of_tweet(tweet))
            except Exception as exc:
                wait = pause_asked_by(exc)
                if wait is not None:
                    return wait  # not this tweet's fault: it stays discovered
                crew.failures.failed("draft", exc, tweet=tweet)
                if await crew.db.tweet_transition(tweet.id, [TweetStatus.DISCOVERED], TweetStatus.FAILED, last_error=classify(exc).reason):
                    await crew.failures.retry_later(Stage.DRAFT, tweet, exc, service_back=breaker.times_back != seen_back)
                continue
            crew.failures.succeeded("draft")
        return 0.0 if len(tweets) == self.BATCH else None

    async def draft_one(self, tweet: Tweet) -> bool:
        """Draft a reply for a ``discovered`` tweet and move it to ``drafted``.

        Raises:
            Whatever the AI client raises (the tweet stays ``discovered``).
        """
        draft = await self.drafter.draft(text=tweet.tweet_text or "", author=tweet.author, previous=tweet.draft)
        moved = await self.crew.db.tweet_transition(tweet.id, [TweetStatus.DISCOVERED], TweetStatus.DRAFTED, draft=draft.text)
        if moved:
            metrics.DRAFTS.inc()
            logger.info(
                "drafted a reply to %s (%d/280%s)",
                tweet.target_tweet_id,
                draft.weighted_length,
                ", cut" if draft.trimmed else "",
                extra={"tweet": tweet.target_tweet_id, "regenerations": draft.regenerations},
            )
            self.crew.wake.approve.set()
        return moved


class Approve:
    """Step 3: every draft goes to the operators' chat; their decision comes back through :class:`Wakeups`.

    Args:
        crew: what every step shares.
        desk: the operators' approval desk.
    """

    BATCH = 10

    def __init__(self, crew: Crew, *, desk: ApprovalDesk) -> None:
        self.crew = crew
        self.desk = desk

    async def cycle(self) -> float | None:
        """Keep the bot connected and send every drafted tweet to the operators."""
        crew = self.crew
        await self.desk.ensure_connected()
        tweets = await crew.db.list_tweets(statuses=[TweetStatus.DRAFTED], limit=self.BATCH)
        for tweet in tweets:
            crew.ping("approve")
            try:
                message_id = await tracing.traced("replyguy.approval_request", self.desk.request(tweet), attributes=tracing.of_tweet(tweet))
            except Exception as exc:
                wait = pause_asked_by(exc)
                if wait is not None:
                    return wait
                if classify(exc).kind is ErrorKind.PERMANENT and not concerns_the_chat(exc):
                    # This draft's own problem (Telegram refuses its text): a dead letter with
                    # its reason, so it cannot hold up the drafts after it.
                    crew.failures.failed("approve", exc, tweet=tweet)
                    if await crew.db.tweet_transition(
                        tweet.id, [TweetStatus.DRAFTED], TweetStatus.FAILED, last_error=classify(exc).reason
                    ):
                        await crew.failures.dead_letter(Stage.APPROVE, tweet, exc)
                    continue
                raise  # Telegram or the operator chat as a whole: every draft waits for the next cycle
            await crew.db.tweet_transition(
                tweet.id, [TweetStatus.DRAFTED], TweetStatus.PENDING_APPROVAL, approval_message_id=message_id
            )
            logger.info("draft for %s sent to the operators (message %d)", tweet.target_tweet_id, message_id,
                        extra={"tweet": tweet.target_tweet_id})
        crew.failures.succeeded("approve")
        return 0.0 if len(tweets) == self.BATCH else None


class Post:
    """Step 4: approved replies go out through ``POST /2/tweets``, exactly once, within the daily cap.

    Args:
        crew: what every step shares.
        x: the X API client.
        rng: chooses the random posting delays.
        settle_after: seconds after which a ``posting`` intent is settled
            (default TIMEOUT_HTTP + 5 s: no POST can still be in flight).
    """

    def __init__(self, crew: Crew, *, x: XClient, rng: random.Random | None = None, settle_after: float | None = None) -> None:
        self.crew = crew
        self.x = x
        self.rng = rng or random.Random()
        self.settle_after = crew.settings.timeout_http + SETTLE_MARGIN if settle_after is None else settle_after
        self._not_before: dict[str, float] = {}
        self._cap_logged_for: str | None = None
        self._settle_in: float | None = None  # seconds until the youngest unsettled intent may be settled

    def cap_reached(self) -> bool:
        """Today's posts reached POST_DAILY_CAP (said once a day in the log)."""
        cap = self.crew.settings.post_daily_cap
        reached = self.crew.state.posted_today() >= cap
        day = self.crew.now().strftime("%Y-%m-%d")
        if reached and self._cap_logged_for != day:
            self._cap_logged_for = day
            logger.warning("daily cap of %d replies reached; posting again after midnight UTC", cap)
        return reached

    async def cycle(self) -> float | None:
        """Settle old intents, then post the approved replies that are due."""
        crew, settings = self.crew, self.crew.settings
        if crew.stopping:
            return None
        await self.settle_posting()
        breaker = self.x.http.breaker
        if breaker.state is CircuitState.OPEN:
            return breaker_wait(breaker)
        tweets = await crew.db.list_tweets(statuses=[TweetStatus.APPROVED], limit=10)
        now = crew.clock()
        next_due: float | None = None
        for tweet in tweets:
            crew.ping("post")
            if crew.stopping:
                return None
            if self.cap_reached():
                return min(seconds_to_utc_midnight(now), 600.0)
            due = self._not_before.setdefault(tweet.id, now + self.rng.uniform(settings.post_delay_min, settings.post_delay_max))
            if due > now:
                next_due = due - now if next_due is None else min(next_due, due - now)
                continue
            seen_back = breaker.times_back
            try:
                await tracing.traced("replyguy.post", self.post_one(tweet), attributes=tracing.of_tweet(tweet))
            except Exception as exc:
                wait = pause_asked_by(exc)
                if wait is not None:
                    self._not_before[tweet.id] = crew.clock() + wait
                    return wait
                crew.failures.failed("post", exc, tweet=tweet)
                current = await crew.db.get_tweet(tweet.id)
                if current is not None and current.status is TweetStatus.FAILED:
                    await crew.failures.retry_later(Stage.POST, current, exc, service_back=breaker.times_back != seen_back)
                continue
            finally:
                if self._not_before.get(tweet.id, 0) <= crew.clock():
                    self._not_before.pop(tweet.id, None)
            crew.failures.succeeded("post")
        if self._settle_in is not None:
            # A young intent (a crash moments ago) is settled when it is old enough, not an interval later.
            next_due = self._settle_in if next_due is None else min(next_due, self._settle_in)
        return next_due

    async def post_one(self, tweet: Tweet) -> str | None:
        """Post an ``approved`` tweet's draft exactly once; the reply's id (None: someone else took it).

        Why "record intent, then look before posting again": X has no
        idempotency key for ``POST /2/tweets``, so a crash (or a lost answer)
        between X creating the reply and our database recording it leaves us
        not knowing whether the reply exists. We cannot make the POST and the
        database update one transaction, so we make the uncertainty visible
        and resolve it by looking:

        1. before the POST the row moves to ``posting`` and ``attempts + 1``
           (the intent), in the database, so it survives a kill -9;
        2. any tweet with ``attempts > 0`` had an earlier intent: before it is
           posted again, our own timeline is searched for a reply to its
           target, and a reply found is recorded instead of posting;
        3. a POST whose outcome is unknown (timeout, 5xx, connection lost,
           X calling it a duplicate) is looked up at once as well;
        4. an intent left in ``posting`` (a crash) is only looked up after
           TIMEOUT_HTTP + 5 s (:meth:`settle_posting`), when no process can
           still have that POST in flight (during a redeploy the old process
           may still be posting).

        The cost is one timeline read per retry; the alternative, posting
        again blindly, would reply twice. X also refuses an identical text
        from the same account as a duplicate, a second safety net.

        Raises:
            Exception: the failure, after the tweet was settled: back to
                ``approved`` when nothing was sent (rate limit, open breaker),
                ``failed`` otherwise (for the dead-letter queue).
        """
        if tweet.attempts > 0:
            existing = await self.x.find_reply(tweet.target_tweet_id)
            if existing is not None:
                logger.info("tweet %s already has our reply %s (an earlier attempt); not posting again",
                            tweet.target_tweet_id, existing)
                await self._mark_posted(tweet, existing, [TweetStatus.APPROVED])
                return existing
        async with self.crew.runtime.shutdown.in_flight():
            if not await self.crew.db.tweet_transition(tweet.id, [TweetStatus.APPROVED], TweetStatus.POSTING):
                return None
            try:
                reply_id = await self.x.post_reply(tweet.draft or "", tweet.target_tweet_id)
            except Exception as exc:
                return await self._post_failed(tweet, exc)
            await self._mark_posted(tweet, reply_id, [TweetStatus.POSTING])
            return reply_id

    async def _post_failed(self, tweet: Tweet, exc: BaseException) -> str | None:
        verdict = classify(exc)
        if verdict.kind is ErrorKind.UNKNOWN_OUTCOME or isinstance(exc, DuplicateContentError):
            try:
                existing = await self.x.find_reply(tweet.target_tweet_id)
            except Exception as lookup_exc:
                logger.warning("could not look for the reply after an unknown outcome: %s", describe(lookup_exc))
                existing = None
            if existing is not None:
                logger.info("the post of %s went through after all (%s)", tweet.target_tweet_id, existing)
                await self._mark_posted(tweet, existing, [TweetStatus.POSTING])
                return existing
        # Refused before anything was sent (rate limit, open breaker): back in line, not a failure of the tweet.
        back_to = TweetStatus.APPROVED if pause_asked_by(exc) is not None else TweetStatus.FAILED
        await self.crew.db.tweet_transition(tweet.id, [TweetStatus.POSTING], back_to, last_error=verdict.reason)
        raise exc

    async def _mark_posted(self, tweet: Tweet, reply_id: str, from_statuses: list[TweetStatus]) -> None:
        crew = self.crew
        if await crew.db.tweet_transition(tweet.id, from_statuses, TweetStatus.POSTED, posted_tweet_id=reply_id):
            metrics.POSTS.inc()
            count = await crew.state.count_post()
            crew.runtime.stats.processed += 1
            logger.info(
                "replied to %s with %s (%d of %d today)",
                tweet.target_tweet_id,
                reply_id,
                count,
                crew.settings.post_daily_cap,
                extra={"tweet": tweet.target_tweet_id, "reply": reply_id},
            )

    async def settle_posting(self) -> int:
        """Resolve ``posting`` intents old enough that no POST can be in flight; how many.

        The seconds until the youngest of the others is old enough are kept for :meth:`cycle`'s pause.
        """
        settled = 0
        cutoff = self.crew.now() - timedelta(seconds=self.settle_after)
        self._settle_in = None
        for tweet in await self.crew.db.list_tweets(statuses=[TweetStatus.POSTING], limit=20):
            if tweet.updated_at > cutoff:
                left = max(0.05, (tweet.updated_at - cutoff).total_seconds())
                self._settle_in = left if self._settle_in is None else min(self._settle_in, left)
                continue
            self.crew.ping("post")
            existing = await self.x.find_reply(tweet.target_tweet_id)
            if existing is not None:
                logger.info("recovered the reply %s to %s left by an interrupted post", existing, tweet.target_tweet_id)
                await self._mark_posted(tweet, existing, [TweetStatus.POSTING])
            else:
                logger.info("interrupted post of %s left no reply; it will be posted again", tweet.target_tweet_id)
                await self.crew.db.tweet_transition(
                    tweet.id, [TweetStatus.POSTING], TweetStatus.APPROVED, last_error="interrupted before X had the reply"
                )
            settled += 1
        return settled


class RetryDeadLetters:
    """Step 5: failed drafts and posts, retried from the dead-letter queue through the steps that failed.

    Args:
        crew: what every step shares.
        queue: the dead-letter queue.
        draft: retries of ``draft`` items.
        post: retries of ``post`` items.
    """

    def __init__(self, crew: Crew, *, queue: RetryQueue, draft: Draft, post: Post) -> None:
        self.crew = crew
        self.queue = queue
        self.draft = draft
        self.post = post

    def _times_back(self) -> int:
        """How often X or the AI was seen back (see :attr:`CircuitBreaker.times_back`)."""
        return self.post.x.http.breaker.times_back + self.draft.drafter.ai.http.breaker.times_back

    def retry_now(self) -> None:
        """The service the waiting items failed on is back: retry them now, not after their delay."""
        if self.queue.retry_now():
            self.crew.wake.dlq.set()

    async def cycle(self) -> float | None:
        """Retry the dead-letter items that are due; the exhausted ones alert once."""
        for item in await self.queue.due(limit=10):
            self.crew.ping("dlq")
            if self.crew.stopping:
                await self.queue.release(item)
                continue
            seen_back = self._times_back()
            try:
                await self._retry(item)
            except CircuitOpenError as exc:
                # Refused before anything was tried: not this item's attempt.
                await self.queue.postpone(item, max(1.0, exc.retry_after), reason=str(exc))
                continue
            except Exception as exc:
                verdict = classify(exc)
                dead = await self.queue.failed(
                    item,
                    verdict.reason,
                    permanent=verdict.kind is ErrorKind.PERMANENT,
                    retry_after=(
                        verdict.retry_after if verdict.kind is ErrorKind.RATE_LIMITED
                        else 0.0 if self._times_back() != seen_back  # back while it failed: go again now
                        else None
                    ),
                )
                if dead:
                    self._exhausted(item, verdict.reason)
                continue
            await self.queue.succeeded(item)
        self.crew.failures.succeeded("dlq")
        pause = self.queue.next_due_in()
        return None if pause is None else min(pause, 60.0)

    def _exhausted(self, item: RetryItem, reason: str) -> None:
        target = item.payload.get("target_tweet_id", "?")
        metrics.DEAD_LETTERS.inc()
        self.crew.runtime.stats.failed += 1
        self.crew.runtime.alerts.alert(
            AlertType.TWEET_PROCESSING_FAILED,
            f"gave up on tweet {target} after {item.attempts + 1} retries of its {item.kind} step: {reason}",
            key=f"dead:{item.id}",
            details={"tweet": target, "stage": item.kind, "attempts": item.attempts + 1, "error": reason},
        )

    async def _retry(self, item: RetryItem) -> None:
        """One dead-letter retry. Returns when done (or moot); raises when it failed again."""
        db = self.crew.db
        tweet = await db.get_tweet(str(item.payload.get("tweet_id")))
        if tweet is None or tweet.status is not TweetStatus.FAILED:
            return  # moved on meanwhile (recovered, or an operator acted)
        if item.kind == Stage.DRAFT.value:
            if not await db.tweet_transition(tweet.id, [TweetStatus.FAILED], TweetStatus.DISCOVERED):
                return
            try:
                await tracing.traced("replyguy.draft", self.draft.draft_one(tweet), attributes=tracing.of_tweet(tweet, retry=True))
            except Exception as exc:
                await db.tweet_transition(tweet.id, [TweetStatus.DISCOVERED], TweetStatus.FAILED, last_error=classify(exc).reason)
                raise
            return
        if item.kind == Stage.POST.value:
            if not await db.tweet_transition(tweet.id, [TweetStatus.FAILED], TweetStatus.APPROVED):
                return
            if self.post.cap_reached():
                return  # the post loop takes it after midnight
            fresh = await db.get_tweet(tweet.id)
            if fresh is None:
                return
            try:
                await tracing.traced("replyguy.post", self.post.post_one(fresh), attributes=tracing.of_tweet(fresh, retry=True))
            except Exception as exc:
                if pause_asked_by(exc) is not None:
                    return  # back in ``approved``: the post loop takes it when allowed
                raise
            return
        logger.error("dead-letter item %s has an unknown kind %r; dropping it", item.id, item.kind)


# --- 4. the Reply Guy: the steps together -------------------------------------------------


@dataclass(frozen=True)
class Loop:
    """One watched loop: its name (the watchdog's and the wake-up's), its cycle and its pause."""

    name: str
    cycle: Callable[[], Awaitable[float | None]]
    interval: float


class ReplyGuy:
    """The Reply Guy's steps over one set of parts, complete when constructed.

    Args:
        settings: the bot's settings.
        plan: what this run talks to.
        runtime: the kit (alerts, watchdog, stats, shutdown).
        db: tweets and dead letters.
        x: the X API client.
        drafter: the AI drafter.
        desk: the operators' approval desk (built with ``on_decision=wake.on_decision``).
        queue: the dead-letter queue (``retry_items`` of bot ``bot``).
        state: discovery cursors and the day's post count.
        wake: the loops' wake-up events, shared with the desk.
        clock: wall-clock seconds.
        rng: chooses the random posting delays.
        settle_after: see :class:`Post`.
        stale_minutes: crash recovery's threshold (30 minutes by default).
    """

    def __init__(
        self,
        *,
        settings: ReplyGuySettings,
        plan: Plan,
        runtime: BotRuntime,
        db: Database,
        x: XClient,
        drafter: Drafter,
        desk: ApprovalDesk,
        queue: RetryQueue,
        state: ReplyState,
        wake: Wakeups,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        settle_after: float | None = None,
        stale_minutes: float = STALE_MINUTES,
    ) -> None:
        self.settings = settings
        self.plan = plan
        self.runtime = runtime
        self.db = db
        self.x = x
        self.ai = drafter.ai
        self.desk = desk
        self.queue = queue
        self.state = state
        self.wake = wake
        self.failures = Failures(runtime=runtime, queue=queue, wake=wake, clock=clock)
        crew = Crew(settings=settings, runtime=runtime, db=db, state=state, wake=wake, failures=self.failures, clock=clock)
        self.recovery = Recovery(crew, queue=queue, stale_minutes=stale_minutes)
        self.discover = Discover(crew, x=x, keywords=plan.keywords, accounts=plan.accounts)
        self.draft = Draft(crew, drafter=drafter)
        self.approve = Approve(crew, desk=desk)
        self.post = Post(crew, x=x, rng=rng, settle_after=settle_after)
        self.dlq = RetryDeadLetters(crew, queue=queue, draft=self.draft, post=self.post)

    def loops(self) -> list[Loop]:
        """The watched loops, in the order a tweet passes them."""
        return [
            Loop("discover", self.discover.cycle, self.settings.discover_interval),
            Loop("draft", self.draft.cycle, 10.0),
            Loop("approve", self.approve.cycle, 10.0),
            Loop("post", self.post.cycle, 10.0),
            Loop("dlq", self.dlq.cycle, 30.0),
        ]

    def watched(self, step: str, cycle: Callable[[], Awaitable[float | None]]) -> Callable[[], Awaitable[float | None]]:
        """``cycle`` with its failures counted toward ``multiple_failures``."""

        async def run() -> float | None:
            try:
                result = await cycle()
            except Exception as exc:
                self.failures.failed(step, exc)
                raise
            return result

        return run

    async def health_check_all(self) -> dict[str, Any]:
        """Database, twitter, ai and telegram, each healthy | degraded | error, and overall (one shape for every bot)."""
        database: dict[str, Any]
        db_breaker = breaker_registry.get("database")
        try:
            await db_op(self.db.ping(), min(self.settings.timeout_db, 3.0), "health_ping")
            state = db_breaker.state.value if db_breaker else "closed"
            status = Health.HEALTHY if state == "closed" else Health.DEGRADED
            database = {"status": status.value, "connected": True, "circuit_breaker": state, "backend": self.db.backend.value}
        except Exception as exc:
            database = {"status": Health.ERROR.value, "connected": False, "error": describe(exc),
                        "circuit_breaker": db_breaker.state.value if db_breaker else None}
        return report_of({
            "database": database,
            "twitter": self.x.health(),
            "ai": self.ai.health(),
            "telegram": self.desk.health(),
        })

    async def status(self) -> dict[str, Any]:
        """The ``reply_guy`` section of /status."""
        counts = await self.db.tweet_counts()
        return {
            "mode": "sandbox" if self.plan.sandbox else "live",
            "x_api": self.x.base_url,
            "ai_api": self.ai.url,
            "keywords": list(self.plan.keywords),
            "accounts": list(self.plan.accounts),
            "tweets": {status.value: n for status, n in counts.items()},
            "posted_today": self.state.posted_today(),
            "daily_cap": self.settings.post_daily_cap,
            "cursors": dict(self.state.cursors),
            "approval": self.desk.status(),
            "twitter": self.x.health(),
            "ai": self.ai.health(),
        }


# --- 5. assembly and main() ---------------------------------------------------------------


@dataclass(frozen=True)
class ApiUrls:
    """Where the X and AI clients send their requests (a stand-in's URL in the sandbox)."""

    x: str
    ai: str


@dataclass(frozen=True)
class OperatorChat:
    """The operator bot's Telegram client and where it asks."""

    client: TelegramClient
    chat: str | int
    operator_ids: tuple[int, ...]
    bot_token: str | None


async def start_apis(settings: ReplyGuySettings, plan: Plan, runtime: BotRuntime) -> ApiUrls:
    """The X and AI base URLs: the configured ones, or local stand-ins started (and stopped at the end) here."""
    x_url, ai_url = plan.x_base, plan.ai_base
    if x_url is None:
        from devkit.local_x import LocalX

        local_x = await LocalX(state_path=settings.data_dir / "replyguy" / "local_x.json").start()
        runtime.add_cleanup("local X API", local_x.stop)
        x_url = local_x.base_url
    if ai_url is None:
        from devkit.local_ai import LocalAI

        local_ai = await LocalAI().start()
        runtime.add_cleanup("local AI API", local_ai.stop)
        ai_url = f"{local_ai.base_url}/v1"
    return ApiUrls(x=x_url, ai=ai_url)


def sandbox_dir(settings: ReplyGuySettings) -> Path:
    return settings.sandbox_dir or settings.data_dir / "sandbox"


async def open_operator_chat(settings: ReplyGuySettings, plan: Plan, runtime: BotRuntime) -> OperatorChat:
    """The operator bot on Telegram, or in the sandbox world with its demo peers (the operator chat, the operator, the bot)."""
    if plan.telegram is not None:
        from telethon import TelegramClient
        from telethon.sessions import StringSession

        live = plan.telegram
        client = TelegramClient(StringSession(), live.api_id, live.api_hash,
                                flood_sleep_threshold=0, raise_last_call_error=True, request_retries=1)
        return OperatorChat(client=client, chat=live.operator_chat, operator_ids=plan.operator_ids, bot_token=live.bot_token)

    from devkit.sandbox import SandboxClient, World
    from devkit.sandbox import describe as describe_sandbox

    world = await asyncio.to_thread(World.open, sandbox_dir(settings))
    demo = await asyncio.to_thread(world.seed_demo)
    runtime.sandbox = True
    runtime.add_section("sandbox", lambda: describe_sandbox(world))
    client = SandboxClient(world, bot_token=demo.reply_bot.bot_token, flood_sleep_threshold=0,
                           raise_last_call_error=True, request_retries=0)
    return OperatorChat(
        client=client,
        chat=plan.operator_chat if plan.operator_chat is not None else -demo.operators.id,
        operator_ids=plan.operator_ids or (demo.operator.id,),
        bot_token=None,
    )


def _banner(*, urls: ApiUrls, sandbox_dir: Path, operator_chat: Any) -> None:
    from devkit.sandbox import banner

    lines = [
        "*" * 78,
        "*** REPLY GUY SANDBOX MODE: no X, AI or Telegram credentials are set. ***",
        f"*** X API: local stand-in at {urls.x} (nothing is posted to X). ***",
        f"*** AI API: local stand-in at {urls.ai} (no model is called). ***",
        banner(sandbox_dir),
        f"Drafts go to the sandbox chat {operator_chat!r}; press Approve with:",
        f"  ./start.sh sandbox --dir {sandbox_dir} press operator --chat \"Demo Operators\" --button Approve --wait 5",
        "*" * 78,
    ]
    for line in lines:
        logger.warning("%s", line)


async def assemble(settings: ReplyGuySettings, plan: Plan, runtime: BotRuntime, db: Database) -> ReplyGuy:
    """Build every part of the Reply Guy for a run, each complete when constructed; the runtime closes them.

    The one place the parts meet: breakers, the X and AI clients (one
    :class:`HttpSettings` for both), the operator chat and its approval desk,
    the dead-letter queue and the cursors.
    """
    from replyguy.approval import ApprovalDesk

    breakers = configure_breakers()
    urls = await start_apis(settings, plan, runtime)
    http = HttpSettings.from_settings(settings, alerts=runtime.alerts)
    x = XClient(base_url=urls.x, credentials=plan.x_credentials, breaker=breakers["twitter_api"], settings=http)
    runtime.add_cleanup("X client", x.close)
    ai = AIClient(base_url=urls.ai, api_key=plan.ai_key, model=plan.ai_model, breaker=breakers["ai_service"], settings=http)
    runtime.add_cleanup("AI client", ai.close)
    drafter = Drafter(ai, system_prompt=load_prompt(settings.reply_prompt_file))

    wake = Wakeups()
    operators = await open_operator_chat(settings, plan, runtime)
    desk = ApprovalDesk(
        client=operators.client,
        db=db,
        chat=operators.chat,
        operator_ids=operators.operator_ids,
        send_timeout=settings.timeout_telegram_send,
        entity_timeout=settings.timeout_telegram_entity,
        bot_token=operators.bot_token,
        on_decision=wake.on_decision,
        on_error=lambda where, exc: runtime.stats.error(f"approval {where}", exc),
    )
    runtime.add_cleanup("Telegram bot", desk.close, timeout=settings.timeout_telegram_entity + 2)
    await desk.start()

    queue = RetryQueue(
        name="dlq",
        store=DbRetryStore(db, BOT),
        fallback=JsonlRetryStore(settings.data_dir / "replyguy" / "dlq-fallback.jsonl"),
        capacity=settings.retry_queue_capacity,
        base_delay=settings.retry_base_delay,
        max_retries=settings.max_message_retries,
        store_timeout=settings.timeout_db,
    )
    runtime.add_queue(queue)
    if plan.sandbox:
        _banner(urls=urls, sandbox_dir=sandbox_dir(settings), operator_chat=desk.chat)
    return ReplyGuy(settings=settings, plan=plan, runtime=runtime, db=db, x=x, drafter=drafter, desk=desk,
                    queue=queue, state=ReplyState(db, clock=time.time), wake=wake)


async def serve(settings: ReplyGuySettings, plan: Plan, *, runtime: BotRuntime | None = None) -> None:
    """Run the Reply Guy until SIGTERM/SIGINT, then drain and stop.

    Raises:
        Exception: wiring failed (after an ``initialization_failed`` alert).
    """
    runtime = runtime or BotRuntime(bot=BOT, settings=settings)
    lease: ActiveLease | None = None
    async with runtime:
        # Replicas on one database: one is active, the others stand by (nothing is asked or posted twice).
        db = await runtime.open_database(settings)  # waits while the database is away
        lease = ActiveLease(
            db,
            name=HEARTBEAT_ID,
            owner=f"{HEARTBEAT_ID}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            seconds=settings.bot_lease_seconds,
            on_lost=lambda reason: runtime.shutdown.request_stop(f"lost the active lease: {reason}"),
        )
        runtime.add_section("replica", lease.status)
        if not await lease.wait_until_active(runtime.shutdown):
            return  # stopped while standing by
        runtime.add_cleanup("active lease", lease.release)  # after everything else: the next replica starts clean
        try:
            guy = await assemble(settings, plan, runtime, db)
            await runtime.until_started("crash recovery", guy.recovery.run, fix="check the database")
        except (StartupFailed, StartupAborted):
            raise  # said and alerted by the runtime
        except Exception as exc:
            runtime.alerts.alert(
                AlertType.INITIALIZATION_FAILED,
                f"the Reply Guy could not start: {describe(exc)}",
                key="init",
                details={"error": describe(exc)},
            )
            raise
        # One call may retry 3 times, each under TIMEOUT_HTTP, between two pings: allow that much silence.
        silence = settings.watchdog_max_silence + 4 * max(settings.timeout_http, settings.timeout_telegram_send) + 20
        for loop in guy.loops():
            runtime.add_loop(loop.name, guy.watched(loop.name, loop.cycle), interval=loop.interval,
                             wake=guy.wake.of(loop.name), max_silence=silence)
        # Drafts and posts that failed while X or the AI was down go again as soon as its breaker closes.
        event_loop = asyncio.get_running_loop()
        for breaker_name in ("twitter_api", "ai_service"):
            breaker_registry.get_or_create(breaker_name).on_close(lambda: event_loop.call_soon_threadsafe(guy.dlq.retry_now))
        runtime.add_section("reply_guy", guy.status)
        runtime.set_detailed_health(guy.health_check_all)
        for name, health in (("twitter", guy.x.health), ("ai", guy.ai.health), ("telegram", guy.desk.health)):
            runtime.add_ready_check(name, ready_unless_failing(health))  # the database's check is the runtime's
        runtime.start_heartbeat(worker_id=HEARTBEAT_ID, store=guy.db)
        await runtime.run_until_stopped()
    if lease is not None and lease.lost:
        # Exit non-zero: the platform restarts this replica, which then stands by.
        logger.critical("the Reply Guy stopped: it is no longer the active replica (%s)", lease.lost_reason)
        raise StartupFailed(f"no longer the active replica: {lease.lost_reason}", exit_code=1)


def ready_unless_failing(health: Callable[[], dict[str, Any]]) -> Callable[[], Awaitable[None]]:
    """A /ready check from a client's own verdict: not ready while it says ``error`` (breaker open, disconnected)."""

    async def check() -> None:
        state = health()
        if state.get("status") == Health.ERROR.value:
            raise ConnectionError(str(state.get("last_error") or state.get("error") or "failing"))

    return check


async def cli_health(settings: ReplyGuySettings, args: argparse.Namespace) -> int:
    """Ask the running bot's /health/detailed; exit 0 healthy, 1 degraded, 2 error or unreachable."""
    url = (args.url or f"http://127.0.0.1:{args.port or settings.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {settings.status_token}"} if settings.status_token else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
            async with session.get(f"{url}/health/detailed", headers=headers) as response:
                code = response.status
                text = await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"error: the Reply Guy is not answering at {url} ({describe(exc)}; is it running? ./start.sh bot)", file=sys.stderr)
        return Health.ERROR.exit_code
    if code == 401:
        print("error: /health/detailed refused the token (set STATUS_TOKEN to the bot's)", file=sys.stderr)
        return Health.ERROR.exit_code
    try:
        data = json.loads(text)
        state = Health(data["overall"])
    except (ValueError, KeyError, TypeError):
        print(f"error: unexpected answer from {url}/health/detailed (HTTP {code}; is that the Reply Guy's port?)", file=sys.stderr)
        return Health.ERROR.exit_code
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(f"overall: {state.value}")
        for name, part in (data.get("checks") or {}).items():
            detail = part.get("detail", "") if part.get("status") != "healthy" else ""
            print(f"  {name:<9} {part.get('status', '?'):<9} {detail}".rstrip())
    return state.exit_code


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser, sub = bot_parser("bot", "The Reply Guy: tweets in, approved replies out.", "docs/reply-guy.md")
    health = sub.add_parser("health", help="ask the running bot how it is: exit 0 healthy, 1 degraded, 2 error")
    health.add_argument("--url", help="the bot's status server (default http://127.0.0.1:$PORT)")
    health.add_argument("--port", type=int, help="the bot's status port (default $PORT)")
    health.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    health.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the Reply Guy, or ``health``; bad input ends as one line, never a traceback."""
    return bot_main(
        argv,
        parse_args=parse_args,
        settings_type=ReplyGuySettings,
        serve=lambda settings: serve(settings, plan_for(settings)),
        commands={"health": cli_health},
    )


if __name__ == "__main__":
    sys.exit(main())
