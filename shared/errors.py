"""One place that decides what an error means.

Every loop asks :func:`classify` what to do with an exception instead of
guessing: retry it soon (transient), wait the time the service asked for
(rate limited), give up on this item (permanent), stop using this account
(account dead), pause the account's sends to strangers (account limited), or
treat the call as possibly done (unknown outcome). A rate limit also says
what it binds: Telegram's FLOOD_WAIT applies to the whole account, its
SLOWMODE_WAIT to one chat.

The mapping covers Telethon's RPC errors, asyncpg, aiohttp, httpx (used by
supabase-py), botocore (R2), our own timeouts and the exception types below,
which our code raises when it already knows the kind.
"""

from __future__ import annotations

import asyncio
import enum
import re
import sys
from dataclasses import dataclass
from typing import Any

from shared.logs import redact


class ErrorKind(str, enum.Enum):
    """What an error means for the work that raised it."""

    TRANSIENT = "transient"
    """Try again later with backoff: the next attempt may well succeed."""
    RATE_LIMITED = "rate_limited"
    """The service asked us to wait ``retry_after`` seconds."""
    PERMANENT = "permanent"
    """This item can never succeed as it is: fail it with the reason."""
    ACCOUNT_DEAD = "account_dead"
    """The Telegram account's session is gone: stop it, mark it, alert."""
    UNKNOWN_OUTCOME = "unknown_outcome"
    """The call may have taken effect: retry only idempotently."""
    ALREADY_DONE = "already_done"
    """The operation took effect earlier (Telegram's RANDOM_ID_DUPLICATE)."""
    ACCOUNT_LIMITED = "account_limited"
    """Telegram's spam limit (PEER_FLOOD): the account may not message non-contacts for a while."""


class LimitScope(str, enum.Enum):
    """What a rate limit binds: every call of the account, or only its calls into one chat."""

    ACCOUNT = "account"
    CHAT = "chat"


@dataclass(frozen=True)
class Classification:
    """The verdict of :func:`classify`."""

    kind: ErrorKind
    reason: str
    retry_after: float | None = None
    scope: LimitScope | None = None
    """For RATE_LIMITED: what the wait binds (None: the item itself)."""

    @property
    def retryable(self) -> bool:
        return self.kind in (ErrorKind.TRANSIENT, ErrorKind.RATE_LIMITED, ErrorKind.UNKNOWN_OUTCOME)


class BotError(Exception):
    """Base of the errors our own code raises on purpose."""


class TransientError(BotError):
    """A failure that a later attempt may not see (outage, timeout, 5xx)."""


class UnknownOutcomeError(TransientError):
    """The operation may or may not have taken effect."""


class PermanentError(BotError):
    """This item cannot succeed as it is; the message says why."""


class UnresolvedPeerError(PermanentError):
    """A chat given by numeric id that this account has never seen, so it has no access hash for it."""

    def __init__(self, peer: object) -> None:
        super().__init__(unresolved_peer_reason(peer))
        self.peer = peer


def unresolved_peer_reason(peer: object) -> str:
    """What to do about a numeric chat id Telegram will not take without its access hash."""
    return (
        f"chat {peer} is unknown to this account: Telegram needs the access hash of a user who is not a contact, "
        "and of every channel and supergroup, and this account has never seen that chat; "
        "address it by @username or phone number, or wait until the chat writes to the account first"
    )


#: How Telethon's get_input_entity says it has no access hash for a peer.
_TELETHON_UNRESOLVED = "Could not find the input entity for"


def is_unresolved_peer(exc: BaseException) -> bool:
    """True for Telethon's "no access hash cached for this id" (a ValueError), or ours."""
    return isinstance(exc, UnresolvedPeerError) or (
        type(exc) is ValueError and str(exc).startswith(_TELETHON_UNRESOLVED)
    )


class AccountDeadError(BotError):
    """The account needs a new login."""


class RateLimitedError(BotError):
    """The remote side asked us to wait ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = float(retry_after)


# --- Telethon -------------------------------------------------------------

_ACCOUNT_DEAD_TELETHON = {
    "AuthKeyDuplicatedError",
    "AuthKeyUnregisteredError",
    "AuthKeyInvalidError",
    "AuthKeyPermEmptyError",
    "SessionRevokedError",
    "SessionExpiredError",
    "UserDeactivatedError",
    "UserDeactivatedBanError",
    "PhoneNumberBannedError",
    "SessionPasswordNeededError",
}

_READABLE_TELETHON = {
    "PeerIdInvalidError": "invalid chat: Telegram does not know this peer",
    "UsernameNotOccupiedError": "invalid chat: no user has this username",
    "UsernameInvalidError": "invalid chat: malformed username",
    "UserIsBlockedError": "the user blocked this account",
    "ChatWriteForbiddenError": "this account may not write in that chat",
    "ChannelPrivateError": "the channel is private or this account was banned from it",
    "MessageTooLongError": "text too long: Telegram accepts at most 4096 UTF-16 code units",
    "MessageEmptyError": "empty message: nothing to send",
    "MediaCaptionTooLongError": "caption too long: Telegram accepts at most 1024 characters",
    "InputUserDeactivatedError": "the recipient's account was deleted",
    "UserBannedInChannelError": "this account is banned from sending in that chat",
}


def _loaded(module: str) -> Any:
    """``module`` when something imported it already, else None.

    An exception of a library's types cannot exist before the library is
    imported, so classifying one never has to import it (Telethon alone costs
    half a second of a command's start).
    """
    return sys.modules.get(module)


def _classify_telethon(exc: BaseException) -> Classification | None:
    tg = _loaded("telethon.errors")
    if tg is None or not isinstance(exc, tg.RPCError):
        return None
    name = type(exc).__name__
    text = _short(exc)
    if isinstance(exc, tg.RandomIdDuplicateError):
        return Classification(ErrorKind.ALREADY_DONE, "Telegram already has a message with this random_id")
    if name in _ACCOUNT_DEAD_TELETHON or isinstance(exc, tg.UnauthorizedError):
        return Classification(ErrorKind.ACCOUNT_DEAD, f"account needs a new login ({name}: {text})")
    if isinstance(exc, tg.PeerFloodError):
        return Classification(
            ErrorKind.ACCOUNT_LIMITED,
            "Telegram limits this account's messages to non-contacts (PEER_FLOOD, its spam limit; @SpamBot tells why)",
        )
    seconds = getattr(exc, "seconds", None)
    if isinstance(exc, tg.FloodError) or seconds is not None:
        wait = float(seconds) if seconds is not None else 30.0
        # Slow mode is a setting of one group; every other flood wait
        # (FLOOD_WAIT, FLOOD_PREMIUM_WAIT, ...) is Telegram's limit on the account.
        scope = LimitScope.CHAT if isinstance(exc, tg.SlowModeWaitError) else LimitScope.ACCOUNT
        return Classification(ErrorKind.RATE_LIMITED, f"Telegram asked to wait {wait:.0f}s ({name})", wait, scope)
    if isinstance(exc, (tg.ServerError, tg.TimedOutError, tg.InvalidDCError)):
        return Classification(ErrorKind.TRANSIENT, f"Telegram server error ({name}: {text})")
    if name in _READABLE_TELETHON:
        return Classification(ErrorKind.PERMANENT, _READABLE_TELETHON[name])
    if name.startswith(("File", "Media", "Photo", "Document", "Webpage")) or isinstance(
        exc, (tg.BadRequestError, tg.ForbiddenError, tg.NotFoundError)
    ):
        return Classification(ErrorKind.PERMANENT, f"Telegram refused the request ({name}: {text})")
    return Classification(ErrorKind.TRANSIENT, f"Telegram error ({name}: {text})")


_ABOUT_THE_CHAT_TELETHON = {
    "PeerIdInvalidError",
    "UsernameNotOccupiedError",
    "UsernameInvalidError",
    "UserIsBlockedError",
    "ChannelPrivateError",
    "ChannelInvalidError",
    "ChatIdInvalidError",
    "InputUserDeactivatedError",
}


def concerns_the_chat(exc: BaseException) -> bool:
    """Whether a Telegram refusal is about the chat or this account's rights in it, not the message.

    A message Telegram refuses for its own content (too long, empty, bad
    entities) is that message's problem; "may not write in that chat" is
    everyone's problem and must not be pinned on the first message that met it.
    """
    tg = _loaded("telethon.errors")
    if tg is None:
        return False
    return isinstance(exc, tg.ForbiddenError) or type(exc).__name__ in _ABOUT_THE_CHAT_TELETHON


# --- asyncpg and PostgreSQL SQLSTATE -------------------------------------

# SQLSTATE classes that mean "the database is unwell", not "your data is wrong".
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")


NUL_IN_TEXT = "the text contains a NUL character (\\u0000), which PostgreSQL cannot store"


def _readable_sqlstate(code: str | None, message: str) -> str | None:
    """A reason a person understands for the database errors that are about the data itself."""
    if code == "22P05" or (code == "22021" and "0x00" in message):
        # 22P05 is what \u0000 in JSON (PostgREST, jsonb) gives; 22021 a raw NUL byte in text.
        return NUL_IN_TEXT
    return None


def classify_sqlstate(sqlstate: str | None, message: str) -> Classification:
    """Classify a PostgreSQL error code (also used for PostgREST answers)."""
    code = sqlstate or ""
    readable = _readable_sqlstate(code, message)
    if readable is not None:
        return Classification(ErrorKind.PERMANENT, readable)
    if code.startswith(_TRANSIENT_SQLSTATE_CLASSES):
        return Classification(ErrorKind.TRANSIENT, f"database unavailable ({code}: {message})")
    return Classification(ErrorKind.PERMANENT, f"database refused the operation ({code or 'error'}: {message})")


def _classify_asyncpg(exc: BaseException) -> Classification | None:
    asyncpg = _loaded("asyncpg")
    if asyncpg is None:
        return None
    if isinstance(exc, asyncpg.PostgresError):
        return classify_sqlstate(getattr(exc, "sqlstate", None), _short(exc))
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)):
        return Classification(ErrorKind.TRANSIENT, f"database connection problem ({type(exc).__name__}: {_short(exc)})")
    return None


# --- HTTP clients -----------------------------------------------------------


def _retry_after_from_headers(headers: Any) -> float | None:
    if not headers:
        return None
    for key in ("Retry-After", "retry-after"):
        value = headers.get(key)
        if value:
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def classify_http_status(status: int, *, retry_after: float | None = None, what: str = "HTTP") -> Classification:
    """Classify an HTTP status code from any client."""
    if status == 429:
        return Classification(ErrorKind.RATE_LIMITED, f"{what} rate limited (429)", retry_after if retry_after is not None else 60.0)
    if status in (408, 425) or status >= 500:
        return Classification(ErrorKind.TRANSIENT, f"{what} server error ({status})")
    if status in (401, 403):
        return Classification(ErrorKind.PERMANENT, f"{what} refused our credentials ({status})")
    return Classification(ErrorKind.PERMANENT, f"{what} rejected the request ({status})")


def _classify_aiohttp(exc: BaseException) -> Classification | None:
    aiohttp = _loaded("aiohttp")
    if aiohttp is None:
        return None
    if isinstance(exc, aiohttp.ClientResponseError):
        return classify_http_status(exc.status, retry_after=_retry_after_from_headers(exc.headers))
    if isinstance(exc, aiohttp.ClientError):
        return Classification(ErrorKind.TRANSIENT, f"HTTP connection problem ({type(exc).__name__}: {_short(exc)})")
    return None


def _classify_httpx(exc: BaseException) -> Classification | None:
    httpx = _loaded("httpx")
    if httpx is None:
        return None
    if isinstance(exc, httpx.HTTPStatusError):
        return classify_http_status(
            exc.response.status_code, retry_after=_retry_after_from_headers(exc.response.headers)
        )
    if isinstance(exc, httpx.TransportError):
        return Classification(ErrorKind.TRANSIENT, f"HTTP connection problem ({type(exc).__name__}: {_short(exc)})")
    return None


def _classify_postgrest(exc: BaseException) -> Classification | None:
    if type(exc).__name__ != "APIError" or not type(exc).__module__.startswith("postgrest"):
        return None
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or _short(exc)
    if code and re.fullmatch(r"[0-9A-Z]{5}", str(code)):
        return classify_sqlstate(str(code), str(message))
    return Classification(ErrorKind.TRANSIENT, f"Supabase API error ({code}: {message})")


# --- botocore (R2) ----------------------------------------------------------

_S3_THROTTLE = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
_S3_PERMANENT = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "InvalidBucketName"}


def _classify_botocore(exc: BaseException) -> Classification | None:
    bc = _loaded("botocore.exceptions")
    if bc is None:
        return None
    if isinstance(exc, bc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _S3_THROTTLE or status == 429:
            return Classification(ErrorKind.RATE_LIMITED, f"storage throttled ({code or status})", 5.0)
        if code in _S3_PERMANENT:
            return Classification(ErrorKind.PERMANENT, f"storage refused the request ({code})")
        if status >= 500 or status == 0:
            return Classification(ErrorKind.TRANSIENT, f"storage server error ({code or status})")
        return Classification(ErrorKind.PERMANENT, f"storage rejected the request ({code or status})")
    if isinstance(exc, (bc.EndpointConnectionError, bc.ConnectionError, bc.HTTPClientError)):
        return Classification(ErrorKind.TRANSIENT, f"storage unreachable ({type(exc).__name__})")
    if isinstance(exc, bc.NoCredentialsError):
        return Classification(ErrorKind.PERMANENT, "storage credentials missing")
    return None


# --- the classifier ---------------------------------------------------------


def _short(exc: BaseException, limit: int = 300) -> str:
    try:
        text = str(exc).strip().replace("\n", " ")
    except Exception:  # a broken __str__ must not make classify() raise
        text = f"<unprintable {type(exc).__name__}>"
    # Redact before cutting: a cut secret (a 353-character session string) no
    # longer looks like one, and these texts end up in /status and the logs.
    text = redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(exc: BaseException) -> str:
    """A one-line, human-readable description of an exception."""
    text = _short(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def classify(exc: BaseException) -> Classification:
    """Decide what ``exc`` means for the work that raised it.

    Never raises. Unknown exception types count as transient: retries are
    bounded everywhere, so a surprise ends as a dead item with its reason
    rather than a crash or an endless loop.
    """
    if isinstance(exc, asyncio.CancelledError):
        return Classification(ErrorKind.TRANSIENT, "cancelled")

    # Our own types first: the raiser knew best.
    if isinstance(exc, RateLimitedError):
        return Classification(ErrorKind.RATE_LIMITED, _short(exc), exc.retry_after)
    if isinstance(exc, AccountDeadError):
        return Classification(ErrorKind.ACCOUNT_DEAD, _short(exc))
    if isinstance(exc, PermanentError):
        readable = _readable_sqlstate(getattr(exc, "code", None), _short(exc))  # a DatabaseRejected
        return Classification(ErrorKind.PERMANENT, readable or _short(exc))
    if isinstance(exc, UnknownOutcomeError):
        return Classification(ErrorKind.UNKNOWN_OUTCOME, _short(exc))
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(exc, TransientError):
        if isinstance(retry_after, (int, float)):
            return Classification(ErrorKind.TRANSIENT, _short(exc), float(retry_after))
        return Classification(ErrorKind.TRANSIENT, _short(exc))

    # OperationTimeout carries whether the call may have taken effect.
    if isinstance(exc, TimeoutError):
        if getattr(exc, "outcome_unknown", False):
            return Classification(ErrorKind.UNKNOWN_OUTCOME, f"timed out, outcome unknown ({_short(exc) or 'timeout'})")
        return Classification(ErrorKind.TRANSIENT, f"timed out ({_short(exc) or 'timeout'})")

    for specific in (
        _classify_telethon,
        _classify_asyncpg,
        _classify_aiohttp,
        _classify_httpx,
        _classify_postgrest,
        _classify_botocore,
    ):
        verdict = specific(exc)
        if verdict is not None:
            return verdict

    if isinstance(exc, FileNotFoundError):
        return Classification(ErrorKind.PERMANENT, f"file not found: {exc.filename or _short(exc)}")
    if isinstance(exc, (IsADirectoryError, PermissionError)):
        return Classification(ErrorKind.PERMANENT, f"file not usable: {_short(exc)}")
    if isinstance(exc, (ConnectionError, OSError, EOFError)):
        return Classification(ErrorKind.TRANSIENT, f"connection problem ({describe(exc)})")
    if isinstance(exc, UnicodeEncodeError) and "surrogate" in str(exc):
        return Classification(ErrorKind.PERMANENT, "the text contains a lone surrogate, which is not valid Unicode text")
    if is_unresolved_peer(exc):
        number = re.search(r"-?\d+", str(exc).removeprefix(_TELETHON_UNRESOLVED))
        return Classification(ErrorKind.PERMANENT, unresolved_peer_reason(number.group(0) if number else "(by id)"))
    if isinstance(exc, (ValueError, TypeError, KeyError, LookupError, UnicodeError)):
        # Telethon raises ValueError for usernames nobody has and similar; bad input
        # in general does not get better by retrying.
        return Classification(ErrorKind.PERMANENT, describe(exc))
    return Classification(ErrorKind.TRANSIENT, f"unexpected error ({describe(exc)})")
