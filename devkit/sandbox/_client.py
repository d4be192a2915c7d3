"""``SandboxClient``: a real ``TelegramClient`` whose network is the sandbox world.

Telethon's own code runs unchanged: ``connect()`` (InitConnection, GetMe,
GetState/GetDifference, the update loop), ``__call__`` (flood-wait
handling, ``raise_last_call_error``, retries of server errors, entity
caching), ``send_message``, ``send_file``, ``download_media``,
``iter_messages``, ``catch_up`` and the event handlers. Only the transport
is replaced: ``SandboxSender`` stands where ``MTProtoSender`` stands and
answers each request from the world, applying fault rules first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from pathlib import Path
from typing import Any

from telethon import TelegramClient
from telethon.crypto import AuthKey
from telethon.extensions import BinaryReader
from telethon.network import MTProtoSender
from telethon.sessions import MemorySession, StringSession
from telethon.sessions.abstract import Session
from telethon.tl import types

from . import _faults
from ._faults import AfterLoss, Fault, FaultKind
from ._world import World

logger = logging.getLogger(__name__)

SANDBOX_API_ID = 1
"""api_id sandbox clients use unless given one (the sandbox does not check it)."""
SANDBOX_API_HASH = "sandbox"
CALLBACK_ANSWER_TIMEOUT = 10.0
"""Seconds a user's button press waits for the bot's answer (then BOT_RESPONSE_TIMEOUT)."""
CALLBACK_POLL_INTERVAL = 0.05


class SandboxSender:
    """Stands in for Telethon's ``MTProtoSender``: same methods, the world as the server.

    Args:
        world: The world to talk to.
        auth_key: The session's ``AuthKey`` (filled in on connect).
        updates_queue: The client's update queue (what ``_update_loop`` reads).
        phone: Log into this account when the session has no key yet.
        bot_token: Log into this bot when the session has no key yet.
        receive_updates: False when the client was built with ``receive_updates=False``.
    """

    def __init__(
        self,
        world: World,
        auth_key: AuthKey | None,
        updates_queue: asyncio.Queue,
        *,
        phone: str | None,
        bot_token: str | None,
        receive_updates: bool = True,
    ) -> None:
        self.world = world
        self.auth_key = auth_key or AuthKey(None)
        self._updates_queue = updates_queue
        self.phone = phone
        self.bot_token = bot_token
        self.receive_updates = receive_updates
        self.key_id: int | None = None
        self.account_id: int | None = None
        self.min_seq = 0
        self._user_connected = False
        self._connection: object | None = None
        self._disconnected_future: asyncio.Future[None] | None = None
        self._pending: dict[asyncio.Future[Any], asyncio.Task[None]] = {}
        self._ping = None
        self._poller = None

    # ---------------------------------------------------- MTProtoSender API

    async def connect(self, connection: object) -> bool:
        """Open the sandbox "connection": find the session's key in the world.

        Returns:
            False when already connected (like MTProtoSender).

        Raises:
            ConnectionError: When a ``connect`` fault says so.
        """
        if self._user_connected:
            return False
        info = await self.world.run(self.world._open_session, self.auth_key.key, self.phone, self.bot_token)
        if info.fault is not None:
            await self._connect_fault(info.fault)
        self.auth_key.key = info.auth_key
        self.key_id = info.key_id
        self.account_id = info.account_id
        self.min_seq = info.min_seq
        self._connection = connection
        self._user_connected = True
        loop = asyncio.get_running_loop()
        self._disconnected_future = loop.create_future()
        self._poller = self.world.poller()
        self._poller.add(self, info.min_seq)
        return True

    async def _connect_fault(self, fault: Fault) -> None:
        if fault.kind is FaultKind.LATENCY:
            await asyncio.sleep(_latency(fault))
            return
        if fault.kind is FaultKind.HANG:
            await asyncio.get_running_loop().create_future()  # never resolves; callers time out
        raise ConnectionError(f"Connection to Telegram failed (sandbox fault: {fault.kind.value})")

    def is_connected(self) -> bool:
        return self._user_connected

    def _transport_connected(self) -> bool:
        return self._user_connected

    async def disconnect(self) -> None:
        """User disconnect: pending requests are cancelled, ``disconnected`` resolves."""
        self._shutdown(None)

    def send(self, request: Any, ordered: bool = False) -> asyncio.Future[Any] | list[asyncio.Future[Any]]:
        """Queue a request; the returned future resolves with the world's answer.

        Raises:
            ConnectionError: When not connected (as MTProtoSender).
        """
        if not self._user_connected:
            raise ConnectionError("Cannot send requests while disconnected")
        if isinstance(request, list):
            return [self._submit(r) for r in request]
        return self._submit(request)

    @property
    def disconnected(self) -> asyncio.Future[None]:
        return asyncio.shield(self._disconnected)

    @property
    def _disconnected(self) -> asyncio.Future[None]:
        if self._disconnected_future is None:
            self._disconnected_future = asyncio.get_running_loop().create_future()
            self._disconnected_future.set_result(None)
        return self._disconnected_future

    def _keepalive_ping(self, rnd_id: int) -> None:
        """Telethon's keep-alive: nothing to do, the sandbox connection cannot go stale by itself."""

    _store_own_updates = MTProtoSender._store_own_updates

    # ------------------------------------------------------------ internals

    def _submit(self, request: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        task = loop.create_task(self._handle(request, future))
        self._pending[future] = task
        future.add_done_callback(lambda f: self._pending.pop(f, None))
        return future

    async def _handle(self, request: Any, future: asyncio.Future[Any]) -> None:
        assert self.key_id is not None
        try:
            outcome = await self.world.submit(self.key_id, request)
            if outcome.account_id is not None:
                self.account_id = outcome.account_id
            fault = outcome.fault
            if fault is not None and fault.kind is FaultKind.LATENCY:
                await asyncio.sleep(_latency(fault))
                outcome = await self.world.submit(self.key_id, request, check_faults=False)
                fault = None
            elif fault is not None and fault.kind is not FaultKind.ANSWER_LOST:
                self._apply_fault(fault, request, future)
                return
            if fault is not None:  # answer lost: the world did the work, the client never hears of it
                logger.info("sandbox: answer to %s lost (%s)", type(request).__name__, fault.then.value)
                if fault.then is AfterLoss.DROP:
                    self._shutdown(ConnectionError("Connection to Telegram lost (sandbox fault: answer_lost)"))
                return
            if outcome.internal_error is not None:
                _set_exception(future, outcome.internal_error)
                return
            if outcome.error is not None:
                code, message = outcome.error
                _set_exception(future, _faults.make_rpc_error(code, message, request))
                return
            if outcome.callback_query is not None:
                await self._await_callback(outcome.callback_query, request, future)
                return
            if self.receive_updates:
                self._store_own_updates(outcome.result)
            if not future.done():
                future.set_result(outcome.result)
        except asyncio.CancelledError:
            if not future.done():
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - an internal sandbox error must reach the caller
            logger.exception("sandbox: internal error answering %s", type(request).__name__)
            _set_exception(future, exc)

    def _apply_fault(self, fault: Fault, request: Any, future: asyncio.Future[Any]) -> None:
        if fault.kind is FaultKind.HANG:
            return  # the future stays pending until the client disconnects
        if fault.kind is FaultKind.DROP:
            self._shutdown(ConnectionError("Connection to Telegram lost (sandbox fault: drop)"))
            return
        code = fault.error_code or 400
        message = fault.error or "INTERNAL"
        _set_exception(future, _faults.make_rpc_error(code, message, request))

    async def _await_callback(self, query_id: int, request: Any, future: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CALLBACK_ANSWER_TIMEOUT
        while loop.time() < deadline:
            answer = await self.world.run(self.world.callback_answer, query_id)
            if answer is not None and answer.answered:
                result = types.messages.BotCallbackAnswer(cache_time=0, alert=answer.alert or None,
                                                          message=answer.message, url=answer.url)
                with BinaryReader(bytes(result)) as reader:
                    parsed = request.read_result(reader)
                if not future.done():
                    future.set_result(parsed)
                return
            await asyncio.sleep(CALLBACK_POLL_INTERVAL)
        _set_exception(future, _faults.make_rpc_error(400, "BOT_RESPONSE_TIMEOUT", request))

    def deliver(self, payload: bytes) -> None:
        """Push one update (serialized ``types.Updates``) into the client's update queue."""
        if not self._user_connected or not self.receive_updates:
            return
        with BinaryReader(payload) as reader:
            self._updates_queue.put_nowait(reader.tgread_object())

    def _shutdown(self, error: BaseException | None) -> None:
        was_connected = self._user_connected
        self._user_connected = False
        if self._poller is not None:
            self._poller.discard(self)
        for future, task in list(self._pending.items()):
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.cancel()
            task.cancel()
        self._pending.clear()
        if was_connected and self._disconnected_future is not None and not self._disconnected_future.done():
            if error is not None:
                self._disconnected_future.set_exception(error)
                self._disconnected_future.add_done_callback(_retrieve)
            else:
                self._disconnected_future.set_result(None)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _latency(fault: Fault) -> float:
    return max(0.0, fault.ms + random.uniform(0.0, fault.jitter_ms)) / 1000.0


class SandboxClient(TelegramClient):
    """A ``TelegramClient`` connected to a sandbox world instead of Telegram.

    Everything above the transport is Telethon's own code, so
    ``get_entity``, ``send_message``, raw ``SendMessageRequest`` with your
    ``random_id``, ``send_file``, ``iter_messages``, ``download_media``,
    ``catch_up`` and event handlers behave as in production and return real
    TL objects.

    Args:
        world: A ``World``, or the world directory (shared per process via ``World.open``).
        phone: Log into this user account (when the session is new or unknown to the world).
        bot_token: Log into this bot (when the session is new or unknown to the world).
        session: A Telethon session (``StringSession``/``MemorySession``) or a StringSession
            string; default a fresh ``StringSession`` (``client.session.save()`` gives its string).
        **telethon_kwargs: Passed to ``TelegramClient`` (``flood_sleep_threshold``,
            ``raise_last_call_error``, ``request_retries``, ``receive_updates``...).

    Raises:
        TypeError: For an unsupported session type.
    """

    def __init__(
        self,
        world: World | str | os.PathLike[str],
        *,
        phone: str | None = None,
        bot_token: str | None = None,
        session: Session | str | None = None,
        **telethon_kwargs: Any,
    ) -> None:
        self.world = world if isinstance(world, World) else World.open(Path(world))
        if session is None:
            session = StringSession()
        elif isinstance(session, str):
            session = StringSession(session)
        elif not isinstance(session, (MemorySession, Session)):
            raise TypeError(f"unsupported session type {type(session).__name__}")
        api_id = telethon_kwargs.pop("api_id", SANDBOX_API_ID)
        api_hash = telethon_kwargs.pop("api_hash", SANDBOX_API_HASH)
        super().__init__(session, api_id, api_hash, **telethon_kwargs)
        self._sender = SandboxSender(
            self.world,
            self.session.auth_key,
            self._updates_queue,
            phone=phone,
            bot_token=bot_token,
            receive_updates=not self._no_updates,
        )

    @property
    def sandbox_sender(self) -> SandboxSender:
        """The sandbox transport (for tests that need the account or key id)."""
        return self._sender  # type: ignore[return-value]

    async def connect(self) -> None:
        """Connect to the world with Telethon's real ``connect()``.

        Stale update/keep-alive tasks from a dropped connection are cancelled
        first so a reconnect never leaves two update loops reading one queue.

        Raises:
            ConnectionError: When a ``connect`` fault makes it fail.
        """
        if not self.is_connected():
            for handle in (self._updates_handle, self._keepalive_handle):
                if handle is not None and not handle.done():
                    handle.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await handle
        await super().connect()

    def is_connected(self) -> bool:
        """True while the sandbox connection is up (False after a drop or disconnect)."""
        sender = getattr(self, "_sender", None)
        return bool(sender and sender.is_connected())

    async def _get_dc(self, dc_id: int, cdn: bool = False) -> types.DcOption:
        return types.DcOption(id=dc_id, ip_address="127.0.0.1", port=443)

    async def _borrow_exported_sender(self, dc_id: int) -> SandboxSender:
        # Every sandbox file lives in one "data centre": never open a real connection elsewhere.
        return self._sender  # type: ignore[return-value]

    async def _return_exported_sender(self, sender: object) -> None:
        return None

    async def _clean_exported_senders(self) -> None:
        return None

    def disconnect(self):  # noqa: ANN201 - returns Telethon's awaitable
        """Disconnect (pending requests are cancelled, as Telethon does)."""
        return super().disconnect()


__all__ = ["SandboxClient", "SandboxSender"]
