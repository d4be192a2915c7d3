"""Tests for shared/errors.py: classify() decides what every error means, table by table.

The exceptions are the libraries' real types, built the way the libraries build
them (Telethon's RPC errors with ``request=None``, asyncpg's by message,
aiohttp/httpx/botocore with real request and response objects).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import asyncpg
import httpx
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from multidict import CIMultiDict, CIMultiDictProxy
from telethon import errors as tg
from yarl import URL

from shared.errors import (
    AccountDeadError,
    BotError,
    Classification,
    ErrorKind,
    LimitScope,
    PermanentError,
    RateLimitedError,
    TransientError,
    UnknownOutcomeError,
    UnresolvedPeerError,
    classify,
    classify_http_status,
    describe,
    is_unresolved_peer,
)
from shared.timeouts import OperationTimeout

LOCAL_URL = "http://127.0.0.1:9/bot/sendMessage"


@dataclass(frozen=True)
class Case:
    """One row of a classification table."""

    id: str
    exc: BaseException
    kind: ErrorKind
    retry_after: float | None = None
    reason_contains: str = ""


def _cases(rows: list[Case]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", rows, ids=[row.id for row in rows])


def _check(case: Case) -> Classification:
    verdict = classify(case.exc)
    assert verdict.kind is case.kind, verdict
    assert verdict.retry_after == case.retry_after, verdict
    assert verdict.reason, "every verdict carries a readable reason"
    assert case.reason_contains.lower() in verdict.reason.lower(), verdict.reason
    return verdict


# --- Telethon ---------------------------------------------------------------

TELETHON = [
    Case("flood_wait_17s", tg.FloodWaitError(request=None, capture=17), ErrorKind.RATE_LIMITED, 17.0, "17"),
    Case("flood_premium_wait_9s", tg.FloodPremiumWaitError(request=None, capture=9), ErrorKind.RATE_LIMITED, 9.0, "9"),
    Case("slowmode_wait_30s", tg.SlowModeWaitError(request=None, capture=30), ErrorKind.RATE_LIMITED, 30.0, "30"),
    Case("peer_flood", tg.PeerFloodError(request=None), ErrorKind.ACCOUNT_LIMITED, None, "non-contacts"),
    Case("random_id_duplicate", tg.RandomIdDuplicateError(request=None), ErrorKind.ALREADY_DONE, None, "random_id"),
    Case("auth_key_duplicated", tg.AuthKeyDuplicatedError(request=None), ErrorKind.ACCOUNT_DEAD, None, "AuthKeyDuplicated"),
    Case("auth_key_unregistered", tg.AuthKeyUnregisteredError(request=None), ErrorKind.ACCOUNT_DEAD, None, "login"),
    Case("session_revoked", tg.SessionRevokedError(request=None), ErrorKind.ACCOUNT_DEAD, None, "SessionRevoked"),
    Case("user_deactivated_ban", tg.UserDeactivatedBanError(request=None), ErrorKind.ACCOUNT_DEAD, None, "login"),
    Case("message_too_long", tg.MessageTooLongError(request=None), ErrorKind.PERMANENT, None, "too long"),
    Case("peer_id_invalid", tg.PeerIdInvalidError(request=None), ErrorKind.PERMANENT, None, "invalid chat"),
    Case("user_is_blocked", tg.UserIsBlockedError(request=None), ErrorKind.PERMANENT, None, "blocked"),
    Case("chat_write_forbidden", tg.ChatWriteForbiddenError(request=None), ErrorKind.PERMANENT, None, "may not write"),
    Case("server_error_500", tg.ServerError(request=None, message="INTERNAL", code=500), ErrorKind.TRANSIENT, None, "server"),
    Case("rpc_call_fail", tg.RpcCallFailError(request=None), ErrorKind.TRANSIENT, None, "server"),
]


@_cases(TELETHON)
def test_telethon_errors_are_classified_by_meaning(case: Case) -> None:
    _check(case)


def test_flood_waits_bind_the_account_and_slow_mode_binds_the_chat() -> None:
    # Telegram's FLOOD_WAIT (and FLOOD_PREMIUM_WAIT) limit the account: another
    # chat would draw its own wait. Slow mode is a setting of one group.
    assert classify(tg.FloodWaitError(request=None, capture=5)).scope is LimitScope.ACCOUNT
    assert classify(tg.FloodPremiumWaitError(request=None, capture=5)).scope is LimitScope.ACCOUNT
    assert classify(tg.SlowModeWaitError(request=None, capture=5)).scope is LimitScope.CHAT
    assert classify(tg.PeerFloodError(request=None)).scope is None


# --- asyncpg ------------------------------------------------------------------

ASYNCPG = [
    Case("connection_does_not_exist", asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
         ErrorKind.TRANSIENT, None, "unavailable"),
    Case("cannot_connect_now", asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
         ErrorKind.TRANSIENT, None, "57P03"),
    Case("unique_violation", asyncpg.exceptions.UniqueViolationError("duplicate key value"),
         ErrorKind.PERMANENT, None, "23505"),
    Case("interface_error", asyncpg.exceptions.InterfaceError("connection is closed"),
         ErrorKind.TRANSIENT, None, "connection"),
]


@_cases(ASYNCPG)
def test_asyncpg_errors_split_database_outages_from_bad_data(case: Case) -> None:
    _check(case)


# --- HTTP clients -------------------------------------------------------------


def _aiohttp_error(status: int, headers: dict[str, str] | None = None) -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(URL(LOCAL_URL), "POST", CIMultiDictProxy(CIMultiDict()), URL(LOCAL_URL))
    return aiohttp.ClientResponseError(info, (), status=status, message="answer", headers=CIMultiDict(headers or {}))


def _httpx_error(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", LOCAL_URL)
    response = httpx.Response(status, headers=headers or {}, request=request)
    return httpx.HTTPStatusError(f"status {status}", request=request, response=response)


HTTP = [
    Case("aiohttp_429_retry_after", _aiohttp_error(429, {"Retry-After": "7"}), ErrorKind.RATE_LIMITED, 7.0, "429"),
    Case("aiohttp_429_without_header", _aiohttp_error(429), ErrorKind.RATE_LIMITED, 60.0, "429"),
    Case("aiohttp_500", _aiohttp_error(500), ErrorKind.TRANSIENT, None, "500"),
    Case("aiohttp_400", _aiohttp_error(400), ErrorKind.PERMANENT, None, "400"),
    Case("aiohttp_connection_refused", aiohttp.ClientConnectionError("refused"), ErrorKind.TRANSIENT, None, "connection"),
    Case("httpx_429_retry_after", _httpx_error(429, {"retry-after": "3"}), ErrorKind.RATE_LIMITED, 3.0, "429"),
    Case("httpx_503", _httpx_error(503), ErrorKind.TRANSIENT, None, "503"),
    Case("httpx_404", _httpx_error(404), ErrorKind.PERMANENT, None, "404"),
    Case("httpx_401", _httpx_error(401), ErrorKind.PERMANENT, None, "credentials"),
    Case("httpx_connect_error", httpx.ConnectError("connection refused"), ErrorKind.TRANSIENT, None, "connection"),
]


@_cases(HTTP)
def test_http_client_errors_follow_the_status_code(case: Case) -> None:
    _check(case)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(408, ErrorKind.TRANSIENT), (425, ErrorKind.TRANSIENT), (502, ErrorKind.TRANSIENT),
     (403, ErrorKind.PERMANENT), (422, ErrorKind.PERMANENT), (429, ErrorKind.RATE_LIMITED)],
)
def test_classify_http_status_table(status: int, kind: ErrorKind) -> None:
    assert classify_http_status(status).kind is kind


# --- botocore (R2) --------------------------------------------------------------


def _s3_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": f"{code} happened"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


BOTOCORE = [
    Case("slow_down", _s3_error("SlowDown", 503), ErrorKind.RATE_LIMITED, 5.0, "throttled"),
    Case("no_such_bucket", _s3_error("NoSuchBucket", 404), ErrorKind.PERMANENT, None, "NoSuchBucket"),
    Case("internal_error_500", _s3_error("InternalError", 500), ErrorKind.TRANSIENT, None, "server"),
    Case("endpoint_unreachable", EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), ErrorKind.TRANSIENT, None,
         "unreachable"),
]


@_cases(BOTOCORE)
def test_storage_errors_are_classified(case: Case) -> None:
    _check(case)


# --- timeouts, our own types, the standard library ------------------------------------

OWN = [
    Case("timeout_plain", OperationTimeout("db.claim", 10), ErrorKind.TRANSIENT, None, "timed out"),
    Case("timeout_outcome_unknown", OperationTimeout("telegram.send", 30, outcome_unknown=True),
         ErrorKind.UNKNOWN_OUTCOME, None, "outcome unknown"),
    Case("builtin_timeout", TimeoutError(), ErrorKind.TRANSIENT, None, "timed out"),
    Case("transient_error", TransientError("upstream hiccup"), ErrorKind.TRANSIENT, None, "hiccup"),
    Case("unknown_outcome_error", UnknownOutcomeError("send may have landed"), ErrorKind.UNKNOWN_OUTCOME, None, "landed"),
    Case("permanent_error", PermanentError("photo is corrupt"), ErrorKind.PERMANENT, None, "corrupt"),
    Case("rate_limited_error", RateLimitedError("slow down", retry_after=2.5), ErrorKind.RATE_LIMITED, 2.5, "slow"),
    Case("account_dead_error", AccountDeadError("session gone"), ErrorKind.ACCOUNT_DEAD, None, "session"),
    Case("bare_bot_error", BotError("surprise"), ErrorKind.TRANSIENT, None, "surprise"),
    Case("file_not_found", FileNotFoundError(2, "No such file", "/nowhere/x.jpg"), ErrorKind.PERMANENT, None, "x.jpg"),
    Case("value_error", ValueError("Cannot find any entity corresponding to 'nobody'"), ErrorKind.PERMANENT, None,
         "ValueError"),
    Case("connection_reset", ConnectionResetError("peer reset"), ErrorKind.TRANSIENT, None, "connection"),
    Case("unknown_exception", RuntimeError("never seen before"), ErrorKind.TRANSIENT, None, "unexpected"),
    Case("cancelled", asyncio.CancelledError(), ErrorKind.TRANSIENT, None, "cancelled"),
]


@_cases(OWN)
def test_own_types_timeouts_and_builtins_are_classified(case: Case) -> None:
    _check(case)


def test_a_subclass_of_our_types_keeps_its_parents_kind() -> None:
    class TooBig(PermanentError):
        pass

    class Hiccup(TransientError):
        retry_after = 4

    assert classify(TooBig("12 MB")).kind is ErrorKind.PERMANENT
    verdict = classify(Hiccup("later"))
    assert (verdict.kind, verdict.retry_after) == (ErrorKind.TRANSIENT, 4.0)


def test_retryable_covers_transient_rate_limited_and_unknown_outcome_only() -> None:
    retryable = {kind for kind in ErrorKind if Classification(kind, "x").retryable}
    assert retryable == {ErrorKind.TRANSIENT, ErrorKind.RATE_LIMITED, ErrorKind.UNKNOWN_OUTCOME}


def test_classify_never_raises_on_an_exception_whose_str_fails() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text for you")

    with pytest.raises(RuntimeError):
        str(Unprintable())
    verdict = classify(Unprintable())
    assert verdict.kind is ErrorKind.TRANSIENT


def test_describe_is_one_line_and_bounded() -> None:
    text = describe(ValueError("line one\nline two " + "x" * 1000))
    assert text.startswith("ValueError: line one line two")
    assert "\n" not in text
    assert len(text) < 350
    assert describe(KeyError()) == "KeyError"


def test_a_numeric_id_telethon_cannot_resolve_is_permanent_and_says_what_to_do() -> None:
    telethon_says = ValueError(
        "Could not find the input entity for PeerUser(user_id=4242) (PeerUser). Please read https://docs.telethon.dev"
    )
    ours = UnresolvedPeerError("4242")

    for exc in (telethon_says, ours):
        verdict = classify(exc)
        assert verdict.kind is ErrorKind.PERMANENT
        assert "chat 4242 is unknown to this account" in verdict.reason
        assert "address it by @username or phone number, or wait until the chat writes to the account first" in verdict.reason
    assert not is_unresolved_peer(ValueError('No user has "nobody" as username'))
