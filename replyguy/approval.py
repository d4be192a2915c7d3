"""The operator's approval desk: drafts go to a Telegram chat with three buttons.

A Telethon *bot* client (TELEGRAM_BOT_TOKEN) sends each draft to
OPERATOR_CHAT_ID with inline buttons **Approve**, **Reject** and
**Regenerate**. An operator may also *answer* the draft's message with new
text: that text replaces the draft (if it fits X's 280 weighted characters)
and waits for Approve like any draft.

Only users in OPERATOR_IDS may act. Anyone else who presses a button gets
"not allowed" as the button's answer, anyone else who answers a draft gets it
as a reply, and nothing changes.

Every decision is one guarded state change in the database
(``tweet_transition`` from ``pending_approval``), so two presses, two
operators or two running processes cannot approve twice or undo each other:
the second one is told what already happened.

A crash between sending a draft and recording its message id sends that
draft again after the restart. That is deliberate: a second copy of a
question is harmless (either copy's buttons act on the same tweet, and the
guarded transition lets only one decision through), a lost one is not.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from telethon import Button, TelegramClient, events, types, utils

from shared.db import Database, Tweet, TweetStatus
from shared.errors import describe
from shared.timeouts import telegram_op

from replyguy.health import Health
from replyguy.length import MAX_WEIGHTED_LENGTH, weighted_length

logger = logging.getLogger(__name__)

CALLBACK_PREFIX = "rg"
NO_BUTTONS = types.ReplyInlineMarkup(rows=[])
"""An explicitly empty keyboard: an edit with it removes the buttons on every Telegram."""
NOT_ALLOWED = "not allowed: only the bot's operators may approve, reject, regenerate or edit drafts"


class Decision(str, enum.Enum):
    """What an operator's button asks for (the letter is the callback data)."""

    APPROVE = "a"
    REJECT = "r"
    REGENERATE = "g"

    @property
    def label(self) -> str:
        return {Decision.APPROVE: "Approve", Decision.REJECT: "Reject", Decision.REGENERATE: "Regenerate"}[self]


_OUTCOME = {
    Decision.APPROVE: (TweetStatus.APPROVED, "\u2705 Approved by {who}; it will be posted shortly."),
    Decision.REJECT: (TweetStatus.REJECTED, "\u274c Rejected by {who}."),
    Decision.REGENERATE: (TweetStatus.DISCOVERED, "\U0001f504 {who} asked for another draft; it will follow."),
}


_ANSWER = {Decision.APPROVE: "Approved.", Decision.REJECT: "Rejected.", Decision.REGENERATE: "Regenerating."}


def callback_data(decision: Decision, tweet_id: str) -> bytes:
    """``rg:<decision>:<tweet uuid>``: 41 bytes, within Telegram's 64."""
    return f"{CALLBACK_PREFIX}:{decision.value}:{tweet_id}".encode()


def parse_callback(data: bytes | None) -> tuple[Decision, str] | None:
    """The decision and tweet id of a button, or None for a button that is not ours."""
    if not data:
        return None
    try:
        prefix, letter, tweet_id = data.decode("ascii").split(":", 2)
        decision = Decision(letter)
    except (UnicodeDecodeError, ValueError):
        return None
    if prefix != CALLBACK_PREFIX or not tweet_id:
        return None
    return decision, tweet_id


def buttons_for(tweet_id: str) -> list[list[Any]]:
    return [[Button.inline(d.label, callback_data(d, tweet_id)) for d in Decision]]


def request_text(tweet: Tweet, draft: str, *, note: str | None = None) -> str:
    """The text of a draft's message in the operator chat."""
    original = (tweet.tweet_text or "").strip()
    if len(original) > 600:
        original = original[:599] + "\u2026"
    lines = []
    if note:
        lines += [note, ""]
    lines += [
        f"\U0001f4dd Reply draft for @{tweet.author or 'unknown'} (tweet {tweet.target_tweet_id})",
        f"\u201c{original}\u201d",
        "",
        f"Draft ({weighted_length(draft)}/{MAX_WEIGHTED_LENGTH}):",
        draft,
    ]
    if note is None:
        lines += ["", "Approve, reject or regenerate it, or answer this message with your own text to replace it."]
    return "\n".join(lines)


def parse_chat(raw: str | int) -> str | int:
    """OPERATOR_CHAT_ID as Telethon wants it: a number for ids, the text for @usernames."""
    if isinstance(raw, int):
        return raw
    text = raw.strip()
    try:
        return int(text)
    except ValueError:
        return text


class ApprovalDesk:
    """Sends drafts to the operator chat and applies the operators' decisions.

    Args:
        client: a Telethon client for the bot (real, or the sandbox's).
        db: where the tweets are.
        chat: OPERATOR_CHAT_ID (id or @username).
        operator_ids: OPERATOR_IDS.
        send_timeout: TIMEOUT_TELEGRAM_SEND.
        entity_timeout: TIMEOUT_TELEGRAM_ENTITY (connect, resolve, answer).
        bot_token: signs the bot in when the session is not authorized yet.
        on_decision: called after a decision was recorded (wakes the loops).
        on_error: called with what failed inside an event handler.
        clock: wall-clock seconds.
    """

    def __init__(
        self,
        *,
        client: TelegramClient,
        db: Database,
        chat: str | int,
        operator_ids: Iterable[int],
        send_timeout: float,
        entity_timeout: float,
        bot_token: str | None = None,
        on_decision: Callable[[Decision, str], None] | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.db = db
        self.chat = parse_chat(chat)
        self.operator_ids = frozenset(int(i) for i in operator_ids)
        self.send_timeout = send_timeout
        self.entity_timeout = entity_timeout
        self.bot_token = bot_token
        self.on_decision = on_decision
        self.on_error = on_error
        self.clock = clock
        self.chat_entity: Any = None
        self.chat_peer_id: int | None = None
        self.me_id: int | None = None
        self.me_username: str | None = None
        self.sent = 0
        self.decisions: dict[str, int] = {d.name.lower(): 0 for d in Decision}
        self.refused = 0
        self.replaced = 0
        self.connected_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._handlers_added = False

    # --- connection ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect, sign in, find the operator chat and start listening.

        Raises:
            OperationTimeout: Telegram did not answer in time.
            ValueError: the operator chat cannot be found.
            telethon errors: a refused token, for instance.
        """
        await self._connect()
        me = await telegram_op(self.client.get_me(), self.entity_timeout, "get_me")
        if me is None:
            raise ValueError("the Telegram bot is not signed in (check TELEGRAM_BOT_TOKEN)")
        self.me_id, self.me_username = int(me.id), getattr(me, "username", None)
        self.chat_entity = await telegram_op(self.client.get_input_entity(self.chat), self.entity_timeout, "get_entity")
        self.chat_peer_id = utils.get_peer_id(self.chat_entity)
        if not self._handlers_added:
            self.client.add_event_handler(self._on_press, events.CallbackQuery())
            self.client.add_event_handler(self._on_message, events.NewMessage(incoming=True))
            self._handlers_added = True
        logger.info(
            "approval desk ready: bot @%s, operator chat %s, %d operator(s)",
            self.me_username,
            self.chat_peer_id,
            len(self.operator_ids),
        )

    async def _connect(self) -> None:
        await telegram_op(self.client.connect(), self.entity_timeout, "connect")
        if self.bot_token and not await telegram_op(self.client.is_user_authorized(), self.entity_timeout, "is_authorized"):
            await telegram_op(self.client.sign_in(bot_token=self.bot_token), self.entity_timeout, "sign_in")
        self.connected_at = self.clock()

    @property
    def connected(self) -> bool:
        return bool(self.client.is_connected())

    async def ensure_connected(self) -> None:
        """Reconnect when Telethon gave up, then ask Telegram for what was missed.

        Raises:
            OperationTimeout, ConnectionError: the reconnect failed (the next cycle tries again).
        """
        if self.connected:
            return
        logger.warning("Telegram bot disconnected; reconnecting")
        await self._connect()
        try:
            await telegram_op(self.client.catch_up(), self.entity_timeout, "catch_up")
        except Exception as exc:  # presses pressed again still arrive; log and go on
            logger.warning("catch_up after reconnect failed: %s", describe(exc))
        logger.info("Telegram bot reconnected")

    async def close(self) -> None:
        try:
            await telegram_op(self.client.disconnect(), self.entity_timeout, "disconnect")
        except Exception as exc:
            logger.warning("Telegram bot did not disconnect cleanly: %s", describe(exc))

    # --- sending ---------------------------------------------------------------------------

    async def request(self, tweet: Tweet) -> int:
        """Send a drafted tweet to the operators; the message id.

        Raises:
            OperationTimeout: no answer within TIMEOUT_TELEGRAM_SEND (maybe sent).
            telethon errors: as Telegram raised them.
        """
        draft = tweet.draft or ""
        message = await telegram_op(
            self.client.send_message(self.chat_entity, request_text(tweet, draft), buttons=buttons_for(tweet.id)),
            self.send_timeout,
            "send_approval",
            outcome_unknown=True,
            detail=str(tweet.id),
        )
        self.sent += 1
        return int(message.id)

    # --- operators' actions -------------------------------------------------------------------

    def _allowed(self, user_id: int | None) -> bool:
        return user_id is not None and int(user_id) in self.operator_ids

    def _record_error(self, where: str, exc: BaseException) -> None:
        self.last_error = f"{where}: {describe(exc)}"
        self.last_error_at = self.clock()
        logger.error("approval desk: %s failed: %s", where, describe(exc), exc_info=exc)
        if self.on_error is not None:
            self.on_error(where, exc)

    async def _answer(self, event: events.CallbackQuery.Event, text: str, *, alert: bool = False) -> None:
        try:
            await telegram_op(event.answer(text[:200], alert=alert), self.entity_timeout, "answer_callback")
        except Exception as exc:
            logger.warning("could not answer a button press: %s", describe(exc))

    async def _on_press(self, event: events.CallbackQuery.Event) -> None:
        try:
            await self._handle_press(event)
        except Exception as exc:
            self._record_error("button press", exc)
            await self._answer(event, "Something went wrong; please press again.", alert=True)

    async def _handle_press(self, event: events.CallbackQuery.Event) -> None:
        parsed = parse_callback(event.data)
        if parsed is None:
            return
        decision, tweet_id = parsed
        who = await self._who(event)
        if not self._allowed(event.sender_id):
            self.refused += 1
            logger.warning("refused a press on %s by %s (not an operator)", decision.label, who,
                           extra={"user_id": event.sender_id, "tweet": tweet_id})
            await self._answer(event, NOT_ALLOWED, alert=True)
            return
        to_status, note = _OUTCOME[decision]
        moved = await self.db.tweet_transition(tweet_id, [TweetStatus.PENDING_APPROVAL], to_status)
        if not moved:
            tweet = await self.db.get_tweet(tweet_id)
            state = tweet.status.value.replace("_", " ") if tweet else "gone"
            await self._answer(event, f"Nothing done: this draft is already {state}.")
            return
        self.decisions[decision.name.lower()] += 1
        logger.info("draft %s: %s by %s", tweet_id, decision.name.lower(), who, extra={"tweet": tweet_id, "operator": event.sender_id})
        await self._answer(event, _ANSWER[decision])
        tweet = await self.db.get_tweet(tweet_id)
        if tweet is not None:
            try:
                text = request_text(tweet, tweet.draft or "", note=note.format(who=who))
                await telegram_op(event.edit(text, buttons=NO_BUTTONS), self.send_timeout, "edit_approval")
            except Exception as exc:  # the decision stands; the message just keeps its buttons
                logger.warning("could not update the draft's message: %s", describe(exc))
        if self.on_decision is not None:
            self.on_decision(decision, tweet_id)

    async def _who(self, event: Any) -> str:
        try:
            sender = await telegram_op(event.get_sender(), self.entity_timeout, "get_sender")
        except Exception:
            sender = None
        username = getattr(sender, "username", None)
        return f"@{username}" if username else str(event.sender_id)

    async def _on_message(self, event: events.NewMessage.Event) -> None:
        try:
            await self._handle_message(event)
        except Exception as exc:
            self._record_error("draft edit", exc)

    async def _reply(self, event: events.NewMessage.Event, text: str) -> None:
        try:
            await telegram_op(event.reply(text), self.send_timeout, "reply_operator", outcome_unknown=True)
        except Exception as exc:
            logger.warning("could not answer an operator's message: %s", describe(exc))

    async def _handle_message(self, event: events.NewMessage.Event) -> None:
        if self.chat_peer_id is not None and event.chat_id != self.chat_peer_id:
            return
        reply_to = event.message.reply_to
        if reply_to is None or getattr(reply_to, "reply_to_msg_id", None) is None:
            return
        original = await telegram_op(event.get_reply_message(), self.entity_timeout, "get_reply_message")
        if original is None or original.sender_id != self.me_id:
            return
        tweet_id = self._tweet_of(original)
        if tweet_id is None:
            await self._reply(event, "That draft is no longer waiting for approval.")
            return
        if not self._allowed(event.sender_id):
            self.refused += 1
            logger.warning("refused a draft edit by %s (not an operator)", event.sender_id, extra={"tweet": tweet_id})
            await self._reply(event, NOT_ALLOWED)
            return
        text = (event.raw_text or "").strip()
        weight = weighted_length(text)
        if not text or weight > MAX_WEIGHTED_LENGTH:
            await self._reply(event, f"Not changed: the text counts {weight} for X; the limit is {MAX_WEIGHTED_LENGTH}.")
            return
        moved = await self.db.tweet_transition(
            tweet_id, [TweetStatus.PENDING_APPROVAL], TweetStatus.PENDING_APPROVAL, draft=text
        )
        if not moved:
            await self._reply(event, "Not changed: that draft is no longer waiting for approval.")
            return
        self.replaced += 1
        logger.info("draft %s replaced by operator %s", tweet_id, event.sender_id, extra={"tweet": tweet_id})
        tweet = await self.db.get_tweet(tweet_id)
        if tweet is not None:
            try:
                await telegram_op(
                    self.client.edit_message(self.chat_entity, original.id, request_text(tweet, text), buttons=buttons_for(tweet_id)),
                    self.send_timeout,
                    "edit_approval",
                )
            except Exception as exc:
                logger.warning("could not show the new draft in its message: %s", describe(exc))
        await self._reply(event, "Draft replaced. Press Approve to post it.")

    @staticmethod
    def _tweet_of(message: Any) -> str | None:
        markup = getattr(message, "reply_markup", None)
        for row in getattr(markup, "rows", None) or []:
            for button in getattr(row, "buttons", None) or []:
                # Older layers put the data on the button, newer ones on its ``type``.
                data = getattr(button, "data", None) or getattr(getattr(button, "type", None), "data", None)
                parsed = parse_callback(data)
                if parsed is not None:
                    return parsed[1]
        return None

    # --- status -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Connected: healthy (degraded after a recent handler error); disconnected: error."""
        if not self.connected:
            status = Health.ERROR
        elif self.last_error_at is not None and self.clock() - self.last_error_at < 300:
            status = Health.DEGRADED
        else:
            status = Health.HEALTHY
        return {
            "status": status.value,
            "connected": self.connected,
            "bot": self.me_username,
            "operator_chat": self.chat_peer_id,
            "last_error": self.last_error,
        }

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "bot": self.me_username,
            "operator_chat": self.chat_peer_id,
            "operators": sorted(self.operator_ids),
            "drafts_sent": self.sent,
            "decisions": dict(self.decisions),
            "drafts_replaced": self.replaced,
            "refused": self.refused,
            "last_error": self.last_error,
        }


__all__ = ["NOT_ALLOWED", "ApprovalDesk", "Decision", "buttons_for", "callback_data", "parse_callback", "parse_chat", "request_text"]
