"""Fault rules: how the sandbox misbehaves, per method, peer and account.

Rules live in the world database so a test or the CLI in another process can
set them while a worker runs. A rule matches a request by method name
(``SendMessage``, ``send*``, ``connect`` or ``*``), by peer and by account,
and may be limited to a number of hits.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from dataclasses import dataclass

from telethon import errors
from telethon.errors import rpc_message_to_error
from telethon.tl.types import RpcError


class FaultKind(str, enum.Enum):
    """What a fault rule does to a matching request."""

    LATENCY = "latency"  # wait ms (+- jitter_ms) then answer normally
    HANG = "hang"  # never answer (until the client disconnects)
    DROP = "drop"  # the connection dies: ConnectionError, `disconnected` resolves
    ERROR = "error"  # fail with a Telegram RPC error (e.g. RPC_CALL_FAIL)
    FLOOD = "flood"  # fail with FLOOD_WAIT_<seconds>
    ANSWER_LOST = "answer_lost"  # do the work, then hang or drop instead of answering


class AfterLoss(str, enum.Enum):
    """What the client sees when the answer of a processed request is lost."""

    HANG = "hang"
    DROP = "drop"


@dataclass(frozen=True)
class Fault:
    """One fault rule.

    Attributes:
        id: Row id in the world database.
        kind: What happens.
        method: Normalised method pattern (``sendmessage``, ``send*``, ``connect``, ``*``).
        peer_id: Only requests aimed at this peer, or None for any.
        account_id: Only requests made by this account, or None for any.
        remaining: Hits left, or None for unlimited.
        ms: Latency in milliseconds.
        jitter_ms: Random extra latency, 0..jitter_ms.
        error: The RPC error message to answer with (``RPC_CALL_FAIL``).
        error_code: The RPC error code (400, 403, 500...).
        seconds: Flood wait length.
        then: For ANSWER_LOST, whether the client then hangs or loses the connection.
    """

    id: int
    kind: FaultKind
    method: str = "*"
    peer_id: int | None = None
    account_id: int | None = None
    remaining: int | None = None
    ms: float = 0.0
    jitter_ms: float = 0.0
    error: str | None = None
    error_code: int | None = None
    seconds: int = 0
    then: AfterLoss = AfterLoss.HANG

    def matches(self, method: str, peer_id: int | None, account_id: int | None) -> bool:
        """Whether this rule applies to a request (method already normalised)."""
        if self.account_id is not None and self.account_id != account_id:
            return False
        if self.peer_id is not None and self.peer_id != peer_id:
            return False
        if self.method == "*":
            return method != "connect"
        return fnmatch.fnmatchcase(method, self.method)


def normalize_method(name: str) -> str:
    """Normalise a method name: ``messages.SendMessageRequest`` -> ``sendmessage``.

    ``send_message``, ``SendMessage`` and ``SendMessageRequest`` all give
    ``sendmessage``; glob characters are kept.
    """
    name = name.strip()
    if name in ("", "*"):
        return "*"
    name = name.rsplit(".", 1)[-1]
    if name.endswith("Request"):
        name = name[: -len("Request")]
    return name.replace("_", "").lower()


_CLASS_TO_MESSAGE: dict[str, str] = {cls.__name__: message for message, cls in errors.rpc_errors_dict.items()}
_CLASS_TO_PATTERN: dict[str, str] = {cls.__name__: pattern for pattern, cls in errors.rpc_errors_re}


def error_message_for(name: str, *, seconds: int = 0) -> str:
    """Turn an error class name or RPC message into the RPC message Telegram sends.

    Args:
        name: ``ChatWriteForbiddenError``, ``CHAT_WRITE_FORBIDDEN`` or ``FLOOD_WAIT_7``.
        seconds: The number to put into patterned messages (``FloodWaitError``).

    Raises:
        ValueError: When the name is empty.
    """
    name = name.strip()
    if not name:
        raise ValueError("an error name is required")
    if name in _CLASS_TO_MESSAGE:
        return _CLASS_TO_MESSAGE[name]
    if name in _CLASS_TO_PATTERN:
        return re.sub(r"\(\\d\+\)", str(int(seconds)), _CLASS_TO_PATTERN[name])
    return name.upper()


def error_code_for(message: str) -> int:
    """The RPC error code Telegram uses for an error message (400 when unknown)."""
    error = rpc_message_to_error(RpcError(error_code=400, error_message=message), None)
    code = type(error).code
    return int(code) if code else 400


def make_rpc_error(code: int, message: str, request: object) -> errors.RPCError:
    """Build the exception Telethon raises for an RPC error, exactly as its sender does."""
    return rpc_message_to_error(RpcError(error_code=code, error_message=message), request)
