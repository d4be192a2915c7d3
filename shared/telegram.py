"""Telegram accounts held by this process: lease, connect, supervise, reconnect.

Exactly one process may use a Telegram session at a time (two at once kill
it for good with ``AuthKeyDuplicatedError``), so an account is only touched
under a lease in the database: taken before connecting, renewed on every
check, released on shutdown, and lapsing by itself when a process is
killed. A lost lease disconnects the account at once.

Connections are supervised twice: a check on every cycle of the accounts
loop, and a watcher on the client's ``disconnected`` future that asks for a
reconnect as soon as Telethon gives up. Reconnects back off exponentially up
to a cap; after ``alert_after`` failed attempts the operator is told once and
the attempts go on at the cap. ``on_client`` runs on each new client before
it connects (handlers: Telethon catches up while it connects), and after
every (re)connect ``on_connected`` runs (``catch_up()``, a reconciliation pass).

Each connect loads the account's session from the database as a
:class:`~shared.sessions.DatabaseSession`: the auth key, the update state
``catch_up()`` resumes from, and every peer the account has seen. Clients
note what Telegram answers to the update loop's GetDifference
(:class:`DifferenceWatch`), so the caller knows when the catch-up is over and
whether Telegram said the gap was too long to fill.

A session that is dead (revoked, unregistered, duplicated, banned) marks the
account ``needs_login``, disconnects it, alerts once, and is not retried; the
other accounts go on. A session this process's key cannot decrypt is the
process's problem, not the account's: the account is left as it is
(``key_mismatch`` here, its lease released for a process with the right key).

Worker replicas share the accounts (:class:`AccountPool` with a
:class:`FleetPolicy`, the assignment in :mod:`shared.fleet`), handing them
over cleanly; each held lease is also fenced by a timer, so an account is
never connected in two processes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import os
from pathlib import Path

from shared.config import TelegramSettings
from shared.errors import ErrorKind, classify, describe
from shared.retry import exponential_delay
from shared.cipher import SessionCipher, SessionKeyError, generate_key
from shared.timeouts import telegram_op

if TYPE_CHECKING:
    from telethon import TelegramClient

    from shared.alerts import AlertSink
    from shared.db import Database
    from shared.db.records import Account

logger = logging.getLogger(__name__)

ClientFactory = Callable[["Account", Any], "TelegramClient"]
"""Builds a client for an account from its session: a Telethon session object, or a
decrypted ``StringSession`` string (None: no session)."""


class DifferenceWatch:
    """What Telegram answered to the update loop's GetDifference, since :meth:`reset`.

    ``catch_up()`` only queues a request for the update loop; this tells when
    the account's difference is complete (``settled``) and whether Telegram
    answered differenceTooLong or channelDifferenceTooLong (``too_long``):
    then the updates in between are gone and only reading the dialogs finds
    their messages.
    """

    def __init__(self) -> None:
        self.settled = asyncio.Event()
        self.too_long = False

    def reset(self) -> None:
        self.settled = asyncio.Event()
        self.too_long = False

    def note(self, result: object) -> None:
        from telethon.tl import types

        if isinstance(result, (types.updates.DifferenceTooLong, types.updates.ChannelDifferenceTooLong)):
            self.too_long = True
        if isinstance(result, (types.updates.Difference, types.updates.DifferenceEmpty, types.updates.DifferenceTooLong)):
            self.settled.set()

    async def wait(self, timeout: float) -> bool:
        """True when the account's difference completed within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self.settled.wait(), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            return False
        return True


def difference_watch(client: Any) -> DifferenceWatch:
    """The client's :class:`DifferenceWatch` (made on first use)."""
    watch = getattr(client, "_difference_watch", None)
    if watch is None:
        watch = DifferenceWatch()
        client._difference_watch = watch
    return watch


class _CarriedDuplicate(Exception):
    """RANDOM_ID_DUPLICATE on its way past Telethon's request loop (see :class:`_WatchesDifferences`)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


async def _duplicates_carried(answer: Awaitable[Any]) -> Any:
    from telethon import errors

    try:
        return await answer
    except errors.RandomIdDuplicateError as exc:
        raise _CarriedDuplicate(exc) from None


class _DuplicatesCarried:
    """A sender whose answers carry RANDOM_ID_DUPLICATE past Telethon's request loop unchanged."""

    def __init__(self, sender: Any) -> None:
        self._sender = sender

    def send(self, request: Any, ordered: bool = False) -> Any:
        sent = self._sender.send(request, ordered=ordered)
        return sent if isinstance(sent, list) else _duplicates_carried(sent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sender, name)


class _WatchesDifferences:
    """Mixed into a ``TelegramClient``: every answer passes :func:`difference_watch` on its way back,
    and RANDOM_ID_DUPLICATE is raised at once.

    Why the latter: Telethon counts RANDOM_ID_DUPLICATE among Telegram's internal errors
    (it is a 500) and sleeps 2 s before raising it, or before repeating the request,
    which only draws the same answer. For us it is an answer: the message was
    delivered by an earlier attempt whose outcome was lost (e.g. the database went
    away before the send was marked), so the row is settled at once instead of
    holding its chat's next messages for 2 s (4 s with a real client's one retry).
    """

    async def __call__(self, request: Any, ordered: bool = False, flood_sleep_threshold: int | None = None) -> Any:
        result = await super().__call__(request, ordered, flood_sleep_threshold)  # type: ignore[misc]
        difference_watch(self).note(result)
        return result

    async def _call(self, sender: Any, request: Any, ordered: bool = False, flood_sleep_threshold: int | None = None) -> Any:
        try:
            return await super()._call(_DuplicatesCarried(sender), request, ordered, flood_sleep_threshold)  # type: ignore[misc]
        except _CarriedDuplicate as carried:
            raise carried.error from None


#: In sandbox mode without SESSION_ENCRYPTION_KEY, the key lives in this file in the sandbox world.
SANDBOX_KEY_FILE = "sandbox-session.key"


def session_cipher(settings: TelegramSettings) -> SessionCipher:
    """SESSION_ENCRYPTION_KEY; in sandbox mode without it, a key file in the sandbox world, made once.

    Sandbox sessions are encrypted at rest like real ones, so the code path is
    the production one. The key lives with the world (SANDBOX_DIR) whose
    sessions it encrypts, so every process sharing a world shares the key,
    whatever its DATA_DIR. A key an older version kept in DATA_DIR moves in.
    """
    if settings.session_encryption_key:
        return SessionCipher(settings.session_encryption_key)
    if not settings.sandbox:  # pragma: no cover - TelegramSettings.validate refuses this
        raise SessionKeyError("SESSION_ENCRYPTION_KEY is required outside sandbox mode")
    path = Path(settings.sandbox_path) / SANDBOX_KEY_FILE
    if not path.exists():
        legacy = Path(settings.data_dir) / SANDBOX_KEY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, then linked in: a process starting at the same moment sees
        # no key file or the whole key, never an empty file, and the first link wins.
        draft = path.with_name(f".{SANDBOX_KEY_FILE}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(legacy.read_text().strip() if legacy.is_file() else generate_key())
        try:
            os.link(draft, path)
        except FileExistsError:  # another process made it first: its key is the world's
            pass
        finally:
            draft.unlink(missing_ok=True)
    return SessionCipher(path.read_text().strip())


def client_factory(settings: TelegramSettings, world: Any | None) -> ClientFactory:
    """Clients with Telethon's own sleeping turned off (``flood_sleep_threshold=0``): our loops decide.

    ``world`` is the sandbox world in sandbox mode, else None for real Telegram.
    Real clients keep one request retry, which Telethon needs to follow a
    datacenter migration.
    """
    from telethon import TelegramClient
    from telethon.sessions import StringSession
    from telethon.sessions.abstract import Session

    # catch_up=True: Telethon loads the session's saved update state only then (and catches up at connect).
    common: dict[str, Any] = {"flood_sleep_threshold": 0, "raise_last_call_error": True, "catch_up": True}
    if world is not None:
        from devkit.sandbox import SandboxClient

        class WatchedSandboxClient(_WatchesDifferences, SandboxClient):
            pass

        def sandbox_client(account: Account, session: Any) -> TelegramClient:
            return WatchedSandboxClient(world, phone=account.phone, session=session, request_retries=0, **common)

        return sandbox_client

    class WatchedClient(_WatchesDifferences, TelegramClient):
        pass

    def real_client(account: Account, session: Any) -> TelegramClient:
        return WatchedClient(
            session if isinstance(session, Session) else StringSession(session or ""),
            settings.telegram_api_id,
            settings.telegram_api_hash,
            request_retries=1,
            connection_retries=2,
            retry_delay=1,
            **common,
        )

    return real_client


@dataclass
class KeyCheck:
    """What SESSION_ENCRYPTION_KEY opens among the sessions a process should serve (labels)."""

    opened: list[str]
    failed: list[str]
    recovered: list[str]

    @property
    def opens_none(self) -> bool:
        return bool(self.failed) and not self.opened


async def check_session_key(
    db: Database, cipher: SessionCipher, *, labels: set[str] | None = None, accepts: Callable[[Account], bool] | None = None
) -> KeyCheck:
    """Try the key on every stored session this process should serve, before connecting any.

    Changes no account but one kind: an account an older version marked
    ``needs_login`` only because its key could not decrypt the session goes
    back to active when this key opens it (the database checks the recorded
    reason, so a real logout stays). ``labels`` is WORKER_ACCOUNTS (None: all);
    ``accepts`` leaves out accounts this process never serves (the sandbox's).
    """
    from shared.db.records import AccountStatus

    check = KeyCheck(opened=[], failed=[], recovered=[])
    for account in await db.list_accounts():
        if not account.has_session or (labels is not None and account.label not in labels):
            continue
        if accepts is not None and not accepts(account):
            continue
        if account.status not in (AccountStatus.ACTIVE, AccountStatus.NEEDS_LOGIN):
            continue
        stored = await db.get_account_session(account.id)
        if not stored:
            continue
        try:
            cipher.decrypt(stored)
        except SessionKeyError:
            if account.status is AccountStatus.ACTIVE:
                check.failed.append(account.label)
            continue
        if account.status is AccountStatus.ACTIVE:
            check.opened.append(account.label)
        elif await db.recover_account_from_key_mismatch(account.id):
            logger.warning(
                "account %s: back to active; it was marked needs_login by a process whose key could not decrypt it",
                account.label,
                extra={"account": account.label},
            )
            check.opened.append(account.label)
            check.recovered.append(account.label)
    return check


class ConnectionState(str, enum.Enum):
    IDLE = "idle"
    LEASED_ELSEWHERE = "leased_elsewhere"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    NEEDS_LOGIN = "needs_login"
    KEY_MISMATCH = "key_mismatch"
    STOPPED = "stopped"


class AccountDisconnected(ConnectionError):
    """A loop asked for an account's client while it has none (dropped, lease lost, not connected yet).

    A :class:`ConnectionError`, so every loop already treats it as transient:
    the work goes back and is tried again once the account is connected.
    """


@dataclass(frozen=True)
class ConnectionPolicy:
    """Numbers of the account lifecycle (from the settings)."""

    lease_seconds: float = 90.0
    connect_timeout: float = 30.0
    call_timeout: float = 15.0
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    alert_after: int = 10


class AccountConnection:
    """One account: its lease, its client and the state between them.

    Args:
        account: the account row.
        db: where the lease and the encrypted session live.
        cipher: opens the stored session; None stores and reads it as is (sandbox).
        client_factory: builds the Telethon client.
        owner: this process's lease owner name.
        policy: lease, timeout and backoff numbers.
        on_connected: awaited after every successful (re)connect.
        on_client: called with the new client before it connects (its handlers must be
            in place before the catch-up at connect dispatches what was missed).
        on_change: called when the connection wants the accounts loop to run now.
        alerts: receives account_needs_login and repeated reconnect failures.
        clock: monotonic seconds.
        on_ready: called (not awaited) once the connection counts as connected, after
            ``on_connected``: loops that wait for a connected account may go now.
    """

    def __init__(
        self,
        account: Account,
        *,
        db: Database,
        cipher: SessionCipher | None,
        client_factory: ClientFactory,
        owner: str,
        policy: ConnectionPolicy,
        on_connected: Callable[[AccountConnection], Awaitable[None]] | None = None,
        on_change: Callable[[], None] | None = None,
        alerts: AlertSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_client: Callable[[AccountConnection], None] | None = None,
        on_ready: Callable[[AccountConnection], None] | None = None,
    ) -> None:
        self.account = account
        self.db = db
        self.cipher = cipher
        self.client_factory = client_factory
        self.owner = owner
        self.policy = policy
        self.on_connected = on_connected
        self.on_client = on_client
        self.on_ready = on_ready
        self.on_change = on_change or (lambda: None)
        self.alerts = alerts
        self._clock = clock
        self.client: TelegramClient | None = None
        self.state = ConnectionState.IDLE
        self.lease_token: str | None = None
        self._lease_renewed_at = 0.0
        self._attempts = 0
        self._next_attempt_at = 0.0
        self._alerted_unreachable = False
        self._watcher: asyncio.Task[None] | None = None
        self._fence: asyncio.TimerHandle | None = None
        self.handing_off = False
        self.connected_since: float | None = None
        self.reconnects = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.sent = 0
        self.failed = 0
        self.received = 0
        #: Wall times Telegram's limits end: FLOOD_WAIT holds every send, PEER_FLOOD sends to non-contacts.
        self.flood_wait_until: float | None = None
        self.limited_until: float | None = None

    @property
    def id(self) -> int:
        return self.account.id

    @property
    def label(self) -> str:
        return self.account.label

    @property
    def connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED and self.client is not None and self.client.is_connected()

    def live_client(self) -> TelegramClient:
        """The account's client, for a loop about to use it.

        Raises:
            AccountDisconnected: it has none now (the connection dropped or the lease was lost).
        """
        client = self.client
        if client is None:
            raise AccountDisconnected(f"account {self.label} is not connected")
        return client

    def _error(self, text: str) -> None:
        self.last_error = text
        self.last_error_at = time.time()

    # --- the step the accounts loop runs ------------------------------------

    async def step(self) -> None:
        """Hold the lease and keep the client connected. Never raises for Telegram trouble."""
        if self.state in (ConnectionState.NEEDS_LOGIN, ConnectionState.KEY_MISMATCH, ConnectionState.STOPPED):
            return
        if not await self._hold_lease():
            return
        if self.client is not None and self.client.is_connected():
            if self.state is not ConnectionState.CONNECTED:
                self.state = ConnectionState.CONNECTED
            return
        if self._clock() < self._next_attempt_at:
            self.state = ConnectionState.BACKOFF
            return
        await self._connect()

    async def _hold_lease(self) -> bool:
        now = self._clock()
        if self.lease_token is None:
            token = await self.db.acquire_account_lease(self.id, owner=self.owner, seconds=self.policy.lease_seconds)
            if token is None:
                if self.state is not ConnectionState.LEASED_ELSEWHERE:
                    logger.info("account %s is held by another process; waiting for its lease", self.label)
                self.state = ConnectionState.LEASED_ELSEWHERE
                return False
            self.lease_token = token
            self._lease_renewed_at = now
            self._arm_fence(now)
            logger.info("account %s: lease taken", self.label, extra={"account": self.label})
            return True
        if now - self._lease_renewed_at < self.policy.lease_seconds / 3:
            return True
        try:
            renewed = await self.db.renew_account_lease(self.id, self.lease_token, seconds=self.policy.lease_seconds)
        except Exception as exc:
            # Not sure we still hold it: keep going only while the old lease surely runs.
            if now - self._lease_renewed_at > self.policy.lease_seconds * 0.8:
                self._error(f"could not renew the lease: {describe(exc)}")
                logger.error("account %s: lease renewal failing, disconnecting to be safe", self.label)
                await self._drop_client(save=False)
                self.lease_token = None
                self.state = ConnectionState.IDLE
                return False
            logger.warning("account %s: lease renewal failed (%s); retrying next cycle", self.label, describe(exc))
            return True
        if not renewed:
            logger.error("account %s: lease lost to another process; disconnecting at once", self.label)
            self._error("lease lost to another process")
            self.lease_token = None
            await self._drop_client(save=False)
            self.state = ConnectionState.LEASED_ELSEWHERE
            return False
        self._lease_renewed_at = now
        self._arm_fence(now)
        return True

    def _arm_fence(self, renewed_at: float) -> None:
        """Disconnect by itself when the lease is not renewed in time, whatever the loops are doing.

        The database lease runs from the renewal call's own clock, which is
        later than ``renewed_at``; cutting at 80 % of it leaves the rest for the
        disconnect, so this process is off the account before anyone else can
        take its lease.
        """
        if self._fence is not None:
            self._fence.cancel()
        delay = max(0.0, self.policy.lease_seconds * 0.8 - (self._clock() - renewed_at))
        self._fence = asyncio.get_running_loop().call_later(delay, self._fence_fired, self.lease_token)

    def _fence_fired(self, token: str | None) -> None:
        self._fence = None
        if token is None or token != self.lease_token:
            return
        logger.error(
            "account %s: the lease was not renewed in time; disconnecting before it lapses",
            self.label,
            extra={"account": self.label},
        )
        self._error("lease not renewed in time (disconnected to be safe)")
        self.lease_token = None
        if self.state is ConnectionState.CONNECTED or self.client is not None:
            self.state = ConnectionState.IDLE
        client, self.client = self.client, None
        if client is not None:
            asyncio.ensure_future(self._disconnect(client, save=False))  # the lease lapsed: the state is the next holder's
        self.on_change()

    def _disarm_fence(self) -> None:
        if self._fence is not None:
            self._fence.cancel()
            self._fence = None

    async def _connect(self) -> None:
        from shared.sessions import DatabaseSession  # Telethon's session type: imported by the first connect

        self.state = ConnectionState.CONNECTING
        await self._drop_client()
        try:
            stored = await self.db.get_account_session(self.id)
            string = None
            if stored:
                string = self.cipher.decrypt(stored) if self.cipher is not None else stored
            # The update state and entities are read once per connect; what Telethon learns is written back.
            session = await DatabaseSession.load(
                string, db=self.db, account_id=self.id, cipher=self.cipher, timeout=self.policy.call_timeout
            )
            client = self.client_factory(self.account, session)
            self.client = client
            difference_watch(client).reset()
            if self.on_client is not None:
                self.on_client(self)
            await telegram_op(client.connect(), self.policy.connect_timeout, "connect", detail=self.label)
            authorized = await telegram_op(client.is_user_authorized(), self.policy.call_timeout, "is_user_authorized")
            if not authorized:
                await self.mark_needs_login("the session is not logged in (run: ./start.sh worker login)")
                return
            if self.on_connected is not None:
                await self.on_connected(self)
        except SessionKeyError as exc:
            await self.key_mismatch(str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = classify(exc)
            if verdict.kind is ErrorKind.ACCOUNT_DEAD:
                await self.mark_needs_login(verdict.reason)
                return
            await self._drop_client()
            self._attempts += 1
            delay = exponential_delay(self._attempts, base=self.policy.backoff_base, cap=self.policy.backoff_max)
            self._next_attempt_at = self._clock() + delay
            self.state = ConnectionState.BACKOFF
            self._error(f"connect failed: {verdict.reason}")
            logger.warning(
                "account %s: connect failed (%s); attempt %d, next in %.1fs",
                self.label,
                verdict.reason,
                self._attempts,
                delay,
                extra={"account": self.label, "attempt": self._attempts},
            )
            if self._attempts >= self.policy.alert_after and not self._alerted_unreachable and self.alerts is not None:
                from shared.alerts import AlertType

                self._alerted_unreachable = True
                self.alerts.alert(
                    AlertType.MULTIPLE_FAILURES,
                    f"Account {self.label}: {self._attempts} connection attempts failed; still retrying every {self.policy.backoff_max:.0f}s",
                    key=f"connect:{self.label}",
                    details={"account": self.label, "error": verdict.reason},
                )
            return
        if self.connected_since is not None:
            self.reconnects += 1
        self.connected_since = time.time()
        self._attempts = 0
        self._next_attempt_at = 0.0
        self.state = ConnectionState.CONNECTED
        if self._alerted_unreachable and self.alerts is not None:
            from shared.alerts import AlertType

            self._alerted_unreachable = False
            self.alerts.resolve(AlertType.MULTIPLE_FAILURES, key=f"connect:{self.label}", message=f"Account {self.label} connected again")
        self._watch(client)
        logger.info("account %s connected", self.label, extra={"account": self.label, "reconnects": self.reconnects})
        if self.on_ready is not None:
            try:
                self.on_ready(self)
            except Exception:  # a listener must never undo the connect
                logger.exception("account %s: the on_ready listener failed", self.label)

    def _watch(self, client: TelegramClient) -> None:
        async def watch() -> None:
            try:
                await client.disconnected
            except Exception as exc:  # the future carries the connection error
                self._error(f"disconnected: {describe(exc)}")
            if self.client is client and self.state is ConnectionState.CONNECTED:
                logger.warning("account %s disconnected; reconnecting", self.label, extra={"account": self.label})
                self.state = ConnectionState.BACKOFF
                self._next_attempt_at = self._clock()
                self.on_change()

        self._watcher = asyncio.create_task(watch(), name=f"watch-{self.label}")

    async def _drop_client(self, *, save: bool = True) -> None:
        """Disconnect; ``save=False`` (the lease is lost) leaves the session's state to the new holder."""
        client, self.client = self.client, None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if client is None:
            return
        await self._disconnect(client, save=save)

    async def _disconnect(self, client: TelegramClient, *, save: bool = True) -> None:
        from shared.sessions import DatabaseSession

        try:
            await telegram_op(client.disconnect(), self.policy.call_timeout, "disconnect", detail=self.label)
        except Exception as exc:
            logger.debug("account %s: disconnect raised %s", self.label, describe(exc))
        # The disconnect handed the session its final update state: write it before the next connect reads it.
        session = getattr(client, "session", None)
        if isinstance(session, DatabaseSession):
            if save:
                await session.aclose(self.policy.call_timeout)
            else:
                session.discard()

    # --- called by the loops ------------------------------------------------------

    async def handle_error(self, exc: BaseException) -> None:
        """A loop saw ``exc`` on this account's client: act if the session is dead."""
        verdict = classify(exc)
        if verdict.kind is ErrorKind.ACCOUNT_DEAD:
            await self.mark_needs_login(verdict.reason)
        elif isinstance(exc, ConnectionError) and self.client is not None and not self.client.is_connected():
            self.state = ConnectionState.BACKOFF
            self._next_attempt_at = self._clock()
            self.on_change()

    async def mark_needs_login(self, reason: str) -> None:
        """Stop using this account until someone logs it in again."""
        if self.state is ConnectionState.NEEDS_LOGIN:
            return
        self.state = ConnectionState.NEEDS_LOGIN
        self._error(reason)
        logger.error("account %s needs a new login: %s", self.label, reason, extra={"account": self.label})
        await self._drop_client()
        try:
            from shared.db.records import AccountStatus

            await self.db.set_account_status(self.id, AccountStatus.NEEDS_LOGIN, last_error=reason)
        except Exception as exc:
            logger.error("account %s: could not record needs_login: %s", self.label, describe(exc))
        await self._release_lease()
        if self.alerts is not None:
            from shared.alerts import AlertType

            self.alerts.alert(
                AlertType.ACCOUNT_NEEDS_LOGIN,
                f"Account {self.label} needs a new login: {reason}",
                key=f"login:{self.label}",
                details={"account": self.label, "fix": f"./start.sh worker login --label {self.label}"},
            )

    async def key_mismatch(self, reason: str) -> None:
        """This process's key cannot open the session: its problem, not the account's.

        The account's status is left alone (only Telegram's own answers mean
        a new login is needed), the lease is released so a process with the
        right key can take the account, and the account is not tried again by
        this process (its key will not change while it runs).
        """
        self.state = ConnectionState.KEY_MISMATCH
        self._error(f"{reason}: the account is left as it is; a process with the right key serves it")
        logger.error(
            "account %s: %s; leaving the account's status alone and releasing its lease",
            self.label,
            reason,
            extra={"account": self.label},
        )
        await self._drop_client()
        await self._release_lease()

    async def _release_lease(self) -> None:
        token, self.lease_token = self.lease_token, None
        self._disarm_fence()
        if token is None:
            return
        try:
            await self.db.release_account_lease(self.id, token)
        except Exception as exc:
            logger.warning("account %s: could not release the lease (%s); it will lapse", self.label, describe(exc))

    async def close(self) -> None:
        """Shutdown: disconnect and release the lease so the next process can start at once."""
        if self.state not in (ConnectionState.NEEDS_LOGIN, ConnectionState.KEY_MISMATCH):
            self.state = ConnectionState.STOPPED
        await self._drop_client()
        await self._release_lease()

    async def answers(self, timeout: float) -> bool:
        """The connection check as a probe: does Telegram answer a ping on this connection within ``timeout``?

        Cheap (no side effect, no flood limit); used to tell a request that was
        lost in an outage (Telegram answers again, the request never will) from
        one that is merely slow.
        """
        from telethon import functions

        client = self.client
        if client is None or not self.connected:
            return False
        try:
            await telegram_op(client(functions.PingRequest(ping_id=int.from_bytes(os.urandom(7), "big"))), timeout, "ping")
        except Exception:  # noqa: BLE001 - any failure means "not answering"
            return False
        return True

    def status(self) -> dict[str, Any]:
        state = self.state.value
        now = time.time()
        if self.state is ConnectionState.CONNECTED and self.limited_until is not None and self.limited_until > now:
            state = "limited"
        elif self.state is ConnectionState.CONNECTED and self.flood_wait_until is not None and self.flood_wait_until > now:
            state = "flood_wait"
        return {
            "id": self.id,
            "state": "handing_off" if self.handing_off else state,
            "connected": self.connected,
            "lease": "held" if self.lease_token else ("elsewhere" if self.state is ConnectionState.LEASED_ELSEWHERE else None),
            "connected_since": self.connected_since,
            "reconnects": self.reconnects,
            "sent": self.sent,
            "failed": self.failed,
            "received": self.received,
            "flood_wait_until": self.flood_wait_until,
            "limited_until": self.limited_until,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "session": self._session_status(),
        }

    def _session_status(self) -> dict[str, Any] | None:
        """What the session keeps in the database: peers known, whether catch-up had a state to resume from."""
        from shared.sessions import DatabaseSession

        session = getattr(self.client, "session", None)
        if not isinstance(session, DatabaseSession):
            return None
        return {
            "known_peers": len(session),
            "resumed_from_saved_state": session.had_state,
            "unsaved_changes": session.dirty,
            "last_save_error": session.last_error,
        }


#: Ingest's own account in sandbox mode, so the worker's and ingest's walk-throughs run side by
#: side (one account is served by one process at a time: its lease).
SANDBOX_INGEST_ACCOUNT = "demo_ingest"
SANDBOX_INGEST_PHONE = "+15550100009"


@dataclass(frozen=True)
class FleetPolicy:
    """How a worker replica finds the others and hands accounts over (from the settings)."""

    live_seconds: float
    handoff_grace: float = 2.0


class AccountPool:
    """The accounts this process serves, each as an :class:`AccountConnection`.

    Alone (no ``fleet``) it serves every active account (or the ``labels``).
    As a worker replica it serves its share: each cycle reads the live
    replicas and the accounts, computes the assignment every replica computes
    (:mod:`shared.fleet`), takes what is assigned to it and hands the rest
    over cleanly: no new claims for the account, the work in hand finished
    (at most ``handoff_grace``), disconnect, then release the lease, which
    wakes the new holder through a notification.

    Connecting runs in a task per account, so one slow connect never delays
    the lease renewals of the others; each lease also has its own fence
    timer (:meth:`AccountConnection._arm_fence`).
    """

    def __init__(
        self,
        *,
        db: Database,
        cipher: SessionCipher | None,
        client_factory: ClientFactory,
        owner: str,
        policy: ConnectionPolicy,
        on_connected: Callable[[AccountConnection], Awaitable[None]] | None = None,
        alerts: AlertSink | None = None,
        labels: set[str] | None = None,
        on_client: Callable[[AccountConnection], None] | None = None,
        accepts: Callable[[Account], bool] | None = None,
        fleet: FleetPolicy | None = None,
        most: int | None = None,
        on_ready: Callable[[AccountConnection], None] | None = None,
    ) -> None:
        self.db = db
        self.cipher = cipher
        self.client_factory = client_factory
        self.owner = owner
        self.policy = policy
        self.on_connected = on_connected
        self.alerts = alerts
        self.labels = labels
        self.on_client = on_client
        self.on_ready = on_ready
        self.accepts = accepts
        self.fleet = fleet
        #: Serve at most this many accounts: the ones served already first, then the lowest ids.
        self.most = most
        self.wake = asyncio.Event()
        self.connections: dict[int, AccountConnection] = {}
        self.replicas: list[Any] = []
        self.assignment: Any | None = None
        self.handoffs = 0
        self.last_handoff_s: float | None = None
        self._steps: dict[int, asyncio.Task[None]] = {}
        self._handing_off: dict[int, asyncio.Task[None]] = {}
        self._alerted_key_mismatch = False
        self._undecryptable: set[str] = set()
        self._wakeups: Any | None = None

    @classmethod
    def single(cls, *, label: str | None = None, **options: Any) -> AccountPool:
        """The one-account case: the account ``label``, else the first active account (lowest id).

        Once connected it stays the one served; ``options`` are the constructor's.
        """
        return cls(labels={label} if label else None, most=1, **options)

    def _over_limit(self, account_id: int, seen: set[int]) -> bool:
        """True when ``most`` accounts are served already and ``account_id`` is not one of them."""
        if self.most is None or account_id in self.connections:
            return False
        return sum(1 for served in seen if served in self.connections) >= self.most

    @property
    def cadence(self) -> float:
        """Longest pause between two cycles: renewals must come well inside the lease."""
        return self.policy.lease_seconds / 4

    async def _share(self, active: list[Account]) -> set[int] | None:
        """The ids of the active accounts assigned to this replica (None: not in a fleet, all of them)."""
        if self.fleet is None:
            return None
        from shared.fleet import Member, assign

        self.replicas = await self.db.worker_fleet(live_seconds=self.fleet.live_seconds)
        members = [
            Member(r.replica, frozenset(r.pinned), frozenset(r.cannot)) for r in self.replicas if r.alive and r.replica != self.owner
        ]
        # Ourselves as we are now, seen by the others or not yet (the first beat is on its way, or
        # our beats fail): the lease keeps it safe while views differ.
        members.append(Member(self.owner, frozenset(self.labels or ()), frozenset(self._undecryptable)))
        self.assignment = assign([(a.id, a.label) for a in active], members)
        return self.assignment.of(self.owner)

    async def refresh(self) -> None:
        """One cycle: take the share, hand over the rest, keep the leases, connect what needs it."""
        from shared.db.records import AccountStatus

        if self.fleet is not None and self._wakeups is None:
            # Listening before the first look: a lease released meanwhile still wakes us.
            self._wakeups = await self.db.subscribe("accounts")
        accounts = await self.db.list_accounts()
        if self.most is not None:
            accounts = sorted(accounts, key=lambda a: (a.id not in self.connections, a.id))
        mine = await self._share(
            [a for a in accounts if a.status is AccountStatus.ACTIVE and (self.accepts is None or self.accepts(a))]
        )
        seen: set[int] = set()
        for account in accounts:
            if self.labels is not None and account.label not in self.labels:
                continue
            if self.accepts is not None and not self.accepts(account):
                continue
            connection = self.connections.get(account.id)
            if mine is not None and account.status is AccountStatus.ACTIVE and account.id not in mine:
                if connection is not None:
                    self._hand_off(connection)
                continue
            if account.id in self._handing_off:
                continue  # back to us before the handoff finished: the next cycle takes it again
            if account.status is AccountStatus.ACTIVE and self._over_limit(account.id, seen):
                continue
            seen.add(account.id)
            if account.status is not AccountStatus.ACTIVE:
                if connection is not None and connection.state not in (ConnectionState.NEEDS_LOGIN, ConnectionState.KEY_MISMATCH):
                    await self._forget(connection)
                continue
            if connection is None or connection.state is ConnectionState.NEEDS_LOGIN:
                # New, or logged in again since (status back to active).
                connection = AccountConnection(
                    account,
                    db=self.db,
                    cipher=self.cipher,
                    client_factory=self.client_factory,
                    owner=self.owner,
                    policy=self.policy,
                    on_connected=self.on_connected,
                    on_change=self.wake.set,
                    alerts=self.alerts,
                    on_client=self.on_client,
                    on_ready=self.on_ready,
                )
                self.connections[account.id] = connection
            else:
                connection.account = account
        for gone in set(self.connections) - seen - set(self._handing_off):
            await self._forget(self.connections[gone])
        await self._step_all(seen)
        self._alert_key_mismatch()

    async def _step_all(self, ids: set[int]) -> None:
        renewals = []
        for account_id in ids:
            connection = self.connections.get(account_id)
            if connection is None:
                continue
            task = self._steps.get(account_id)
            if task is None or task.done():
                self._steps[account_id] = asyncio.create_task(self._step(connection), name=f"account-{connection.label}")
            elif connection.lease_token is not None:
                renewals.append(self._renew(connection))  # still connecting: the lease must not lapse meanwhile
        if renewals:
            await asyncio.gather(*renewals)
        running = [t for t in self._steps.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=min(self.policy.call_timeout, self.policy.lease_seconds / 8))

    async def _step(self, connection: AccountConnection) -> None:
        try:
            await connection.step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database hiccup for one account must not stop the others
            connection._error(describe(exc))
            logger.warning("account %s: step failed: %s", connection.label, describe(exc))

    async def _renew(self, connection: AccountConnection) -> None:
        try:
            await connection._hold_lease()
        except Exception as exc:
            logger.warning("account %s: lease renewal failed: %s", connection.label, describe(exc))

    async def _forget(self, connection: AccountConnection) -> None:
        task = self._steps.pop(connection.id, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=self.policy.call_timeout)
        if self.connections.get(connection.id) is connection:
            del self.connections[connection.id]
        await connection.close()

    def _hand_off(self, connection: AccountConnection) -> None:
        if connection.id not in self._handing_off:
            self._handing_off[connection.id] = asyncio.create_task(self._handoff(connection), name=f"handoff-{connection.label}")

    async def _handoff(self, connection: AccountConnection) -> None:
        """Give the account to its new holder: stop claiming, finish the work in hand, disconnect, release."""
        started = time.monotonic()
        connection.handing_off = True  # connected() leaves it out: no loop claims new work for it
        grace = self.fleet.handoff_grace if self.fleet is not None else 0.0
        try:
            while connection.lease_token is not None and time.monotonic() - started < grace:
                try:
                    if await self.db.account_work_in_hand(connection.id, owner=self.owner) == 0:
                        break
                except Exception as exc:
                    logger.warning("account %s: cannot see its work in hand (%s); handing over now", connection.label, describe(exc))
                    break
                await asyncio.sleep(0.05)
            await self._forget(connection)  # disconnect first, then release: never two holders connected
        finally:
            self._handing_off.pop(connection.id, None)
        self.handoffs += 1
        self.last_handoff_s = time.monotonic() - started
        logger.info(
            "account %s handed over to the replica it belongs to now (%.2fs)",
            connection.label,
            self.last_handoff_s,
            extra={"account": connection.label},
        )

    async def leave(self) -> None:
        """Shutdown of a replica: hand every account over cleanly, at once."""
        for connection in list(self.connections.values()):
            self._hand_off(connection)
        if self._handing_off:
            await asyncio.gather(*list(self._handing_off.values()), return_exceptions=True)

    async def idle(self, timeout: float) -> None:
        """Wait until the next cycle: ``timeout``, a connection asking (``wake``), or a notification
        on ``accounts`` (a replica joined or left, a lease was released)."""
        deadline = time.monotonic() + min(timeout, self.cadence)
        while not self.wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._wakeups is None or self._wakeups.closed:
                self._wakeups = await self.db.subscribe("accounts")
            woken = asyncio.ensure_future(self.wake.wait())
            notified = asyncio.ensure_future(self._wakeups.wait(remaining))
            done, pending = await asyncio.wait({woken, notified}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if notified in done and not notified.cancelled() and notified.exception() is None and notified.result():
                return

    def connected(self) -> list[AccountConnection]:
        return [c for c in self.connections.values() if c.connected and not c.handing_off]

    def get(self, account_id: int) -> AccountConnection | None:
        return self.connections.get(account_id)

    async def close(self) -> None:
        if self._wakeups is not None:
            self._wakeups.close()
        for task in list(self._steps.values()) + list(self._handing_off.values()):
            task.cancel()
        await asyncio.gather(*(c.close() for c in self.connections.values()), return_exceptions=True)

    def cannot_decrypt(self, labels: list[str]) -> None:
        """Sessions the start-up check found this key cannot open: never taken, shown as key_mismatch."""
        self._undecryptable.update(labels)

    def key_mismatched(self) -> list[str]:
        """Labels of the accounts whose session this process's key cannot open (remembered: in a
        fleet such an account goes to another replica, and must not come back to this one)."""
        self._undecryptable |= {c.label for c in self.connections.values() if c.state is ConnectionState.KEY_MISMATCH}
        return sorted(self._undecryptable)

    def _alert_key_mismatch(self) -> None:
        labels = self.key_mismatched()
        if not labels or self._alerted_key_mismatch or self.alerts is None:
            return
        from shared.alerts import AlertType

        self._alerted_key_mismatch = True  # once per process: its key does not change while it runs
        self.alerts.alert(
            AlertType.SESSION_KEY_MISMATCH,
            f"SESSION_ENCRYPTION_KEY of {self.owner} cannot decrypt the session of {', '.join(labels)}; "
            "those accounts are left as they are (not needs_login) for a process with the right key",
            key=f"session-key:{self.owner}",
            details={"accounts": labels, "fix": "give this process the SESSION_ENCRYPTION_KEY the sessions were stored with"},
        )

    async def check_key(self) -> None:
        """For /ready: raises while this process's key cannot open a session it should serve."""
        labels = self.key_mismatched()
        if labels:
            raise SessionKeyError(f"key_mismatch: SESSION_ENCRYPTION_KEY cannot decrypt {', '.join(labels)}")

    def key_status(self) -> dict[str, Any]:
        """The ``session_key`` section of /status."""
        labels = self.key_mismatched()
        return {
            "status": "key_mismatch" if labels else "ok",
            "accounts": labels,
            "fix": "give this process the SESSION_ENCRYPTION_KEY the sessions were stored with" if labels else None,
        }

    def status(self) -> dict[str, dict[str, Any]]:
        return {c.label: c.status() for c in self.connections.values()}

    def fleet_status(self) -> dict[str, Any]:
        """The ``fleet`` section of /status: every replica with its heartbeat, held leases and target share."""
        from shared.fleet import fleet_rows

        return fleet_rows(self.replicas, self.assignment, me=self.owner)
