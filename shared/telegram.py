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
the attempts go on at the cap. After every (re)connect ``on_connected``
runs (handlers, ``catch_up()``, a reconciliation pass).

A session that is dead (revoked, unregistered, duplicated, banned) marks the
account ``needs_login``, disconnects it, alerts once, and is not retried; the
other accounts go on.
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
from shared.sessions import SessionCipher, SessionKeyError, generate_key
from shared.timeouts import telegram_op

if TYPE_CHECKING:
    from telethon import TelegramClient

    from shared.alerts import AlertSink
    from shared.db import Database
    from shared.db.records import Account

logger = logging.getLogger(__name__)

ClientFactory = Callable[["Account", str | None], "TelegramClient"]
"""Builds a client for an account from its decrypted session string (None: no session)."""


#: In sandbox mode without SESSION_ENCRYPTION_KEY, the key lives in this file under DATA_DIR.
SANDBOX_KEY_FILE = "sandbox-session.key"


def session_cipher(settings: TelegramSettings) -> SessionCipher:
    """SESSION_ENCRYPTION_KEY; in sandbox mode without it, a key file in DATA_DIR made once.

    Sandbox sessions are encrypted at rest like real ones, so the code path is
    the production one; every bot of one DATA_DIR shares the key file.
    """
    if settings.session_encryption_key:
        return SessionCipher(settings.session_encryption_key)
    if not settings.sandbox:  # pragma: no cover - TelegramSettings.validate refuses this
        raise SessionKeyError("SESSION_ENCRYPTION_KEY is required outside sandbox mode")
    path = Path(settings.data_dir) / SANDBOX_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(generate_key())
    return SessionCipher(path.read_text().strip())


def client_factory(settings: TelegramSettings, world: Any | None) -> ClientFactory:
    """Clients with Telethon's own sleeping turned off (``flood_sleep_threshold=0``): our loops decide.

    ``world`` is the sandbox world in sandbox mode, else None for real Telegram.
    Real clients keep one request retry, which Telethon needs to follow a
    datacenter migration.
    """
    from telethon import TelegramClient
    from telethon.sessions import StringSession

    common: dict[str, Any] = {"flood_sleep_threshold": 0, "raise_last_call_error": True}
    if world is not None:
        from shared.sandbox import SandboxClient

        def sandbox_client(account: Account, session: str | None) -> TelegramClient:
            return SandboxClient(world, phone=account.phone, session=session, request_retries=0, **common)

        return sandbox_client

    def real_client(account: Account, session: str | None) -> TelegramClient:
        return TelegramClient(
            StringSession(session or ""),
            settings.telegram_api_id,
            settings.telegram_api_hash,
            request_retries=1,
            connection_retries=2,
            retry_delay=1,
            **common,
        )

    return real_client


class ConnectionState(str, enum.Enum):
    IDLE = "idle"
    LEASED_ELSEWHERE = "leased_elsewhere"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    NEEDS_LOGIN = "needs_login"
    STOPPED = "stopped"


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
        on_change: called when the connection wants the accounts loop to run now.
        alerts: receives account_needs_login and repeated reconnect failures.
        clock: monotonic seconds.
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
    ) -> None:
        self.account = account
        self.db = db
        self.cipher = cipher
        self.client_factory = client_factory
        self.owner = owner
        self.policy = policy
        self.on_connected = on_connected
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

    def _error(self, text: str) -> None:
        self.last_error = text
        self.last_error_at = time.time()

    # --- the step the accounts loop runs ------------------------------------

    async def step(self) -> None:
        """Hold the lease and keep the client connected. Never raises for Telegram trouble."""
        if self.state in (ConnectionState.NEEDS_LOGIN, ConnectionState.STOPPED):
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
                await self._drop_client()
                self.lease_token = None
                self.state = ConnectionState.IDLE
                return False
            logger.warning("account %s: lease renewal failed (%s); retrying next cycle", self.label, describe(exc))
            return True
        if not renewed:
            logger.error("account %s: lease lost to another process; disconnecting at once", self.label)
            self._error("lease lost to another process")
            self.lease_token = None
            await self._drop_client()
            self.state = ConnectionState.LEASED_ELSEWHERE
            return False
        self._lease_renewed_at = now
        return True

    async def _connect(self) -> None:
        self.state = ConnectionState.CONNECTING
        await self._drop_client()
        try:
            stored = await self.db.get_account_session(self.id)
            session = None
            if stored:
                session = self.cipher.decrypt(stored) if self.cipher is not None else stored
            client = self.client_factory(self.account, session)
            self.client = client
            await telegram_op(client.connect(), self.policy.connect_timeout, "connect", detail=self.label)
            authorized = await telegram_op(client.is_user_authorized(), self.policy.call_timeout, "is_user_authorized")
            if not authorized:
                await self.mark_needs_login("the session is not logged in (run: ./start.sh worker login)")
                return
            if self.on_connected is not None:
                await self.on_connected(self)
        except SessionKeyError as exc:
            await self.mark_needs_login(str(exc))
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

    async def _drop_client(self) -> None:
        client, self.client = self.client, None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if client is None:
            return
        try:
            await telegram_op(client.disconnect(), self.policy.call_timeout, "disconnect", detail=self.label)
        except Exception as exc:
            logger.debug("account %s: disconnect raised %s", self.label, describe(exc))

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

    async def _release_lease(self) -> None:
        token, self.lease_token = self.lease_token, None
        if token is None:
            return
        try:
            await self.db.release_account_lease(self.id, token)
        except Exception as exc:
            logger.warning("account %s: could not release the lease (%s); it will lapse", self.label, describe(exc))

    async def close(self) -> None:
        """Shutdown: disconnect and release the lease so the next process can start at once."""
        if self.state is not ConnectionState.NEEDS_LOGIN:
            self.state = ConnectionState.STOPPED
        await self._drop_client()
        await self._release_lease()

    def status(self) -> dict[str, Any]:
        state = self.state.value
        now = time.time()
        if self.state is ConnectionState.CONNECTED and self.limited_until is not None and self.limited_until > now:
            state = "limited"
        elif self.state is ConnectionState.CONNECTED and self.flood_wait_until is not None and self.flood_wait_until > now:
            state = "flood_wait"
        return {
            "id": self.id,
            "state": state,
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
        }


#: Ingest's own account in sandbox mode, so the worker's and ingest's walk-throughs run side by
#: side (one account is served by one process at a time: its lease).
SANDBOX_INGEST_ACCOUNT = "demo_ingest"
SANDBOX_INGEST_PHONE = "+15550100009"


class AccountPool:
    """Every active account of the database, each as an :class:`AccountConnection`.

    ``labels`` limits it to those accounts; ``exclude`` leaves these out.
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
        exclude: set[str] | None = None,
        accepts: Callable[[Account], bool] | None = None,
    ) -> None:
        self.exclude = exclude or set()
        self.db = db
        self.cipher = cipher
        self.client_factory = client_factory
        self.owner = owner
        self.policy = policy
        self.on_connected = on_connected
        self.alerts = alerts
        self.labels = labels
        self.accepts = accepts
        self.wake = asyncio.Event()
        self.connections: dict[int, AccountConnection] = {}

    async def refresh(self) -> None:
        """One cycle: pick up new accounts, drop disabled ones, step each."""
        from shared.db.records import AccountStatus

        accounts = await self.db.list_accounts()
        seen: set[int] = set()
        for account in accounts:
            if (self.labels is not None and account.label not in self.labels) or account.label in self.exclude:
                continue
            if self.accepts is not None and not self.accepts(account):
                continue
            seen.add(account.id)
            connection = self.connections.get(account.id)
            if account.status is not AccountStatus.ACTIVE:
                if connection is not None and connection.state is not ConnectionState.NEEDS_LOGIN:
                    await connection.close()
                    del self.connections[account.id]
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
                )
                self.connections[account.id] = connection
            else:
                connection.account = account
        for gone in set(self.connections) - seen:
            await self.connections.pop(gone).close()
        steps = [self._step(c) for c in self.connections.values()]
        await asyncio.gather(*steps)

    async def _step(self, connection: AccountConnection) -> None:
        try:
            await connection.step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database hiccup for one account must not stop the others
            connection._error(describe(exc))
            logger.warning("account %s: step failed: %s", connection.label, describe(exc))

    def connected(self) -> list[AccountConnection]:
        return [c for c in self.connections.values() if c.connected]

    def get(self, account_id: int) -> AccountConnection | None:
        return self.connections.get(account_id)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.connections.values()), return_exceptions=True)

    def status(self) -> dict[str, dict[str, Any]]:
        return {c.label: c.status() for c in self.connections.values()}
