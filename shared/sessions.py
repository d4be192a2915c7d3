"""Telegram sessions: encrypted at rest, with their state kept in the database.

A Telethon ``StringSession`` holds the account's auth key: whoever has it *is*
the account. It is stored only encrypted under SESSION_ENCRYPTION_KEY
(:mod:`shared.cipher`), and decrypted in memory just before connecting.

The rest of a session, which a ``StringSession`` keeps only in memory, lives
in the database too (:class:`DatabaseSession`): the update state (pts, qts,
date, seq and each channel's pts), so ``catch_up()`` after a restart asks
Telegram for what happened since, and the entity cache (peer id to access
hash, kind, username, phone), so a chat seen once resolves by its numeric id
for good. A session stored before these existed is the same string: it
loads with no state and no entities and is upgraded as it is used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from telethon import utils
from telethon.sessions import StringSession
from telethon.tl import types
from telethon.tl.tlobject import TLObject

from shared.cipher import SessionCipher, generate_key
from shared.db.records import KnownEntity, UpdateState
from shared.errors import describe
from shared.timeouts import bounded

if TYPE_CHECKING:
    from shared.db import Database

logger = logging.getLogger(__name__)


def entity_kind(entity: Any) -> str | None:
    """How ``telegram_entities`` names a peer's type (None: not a peer worth keeping)."""
    if isinstance(entity, types.User):
        return "bot" if entity.bot else "user"
    if isinstance(entity, (types.Chat, types.ChatForbidden)):
        return "chat"
    if isinstance(entity, (types.Channel, types.ChannelForbidden)):
        return "megagroup" if getattr(entity, "megagroup", False) else "channel"
    if isinstance(entity, types.InputPeerUser):  # Telethon's own record of "who am I" (id 0)
        return "user"
    return None


class DatabaseSession(StringSession):
    """A Telethon session whose update state and entity cache live in the database.

    The auth key is the ``StringSession`` string, stored encrypted in
    ``telegram_accounts`` as before. Telethon reads the session synchronously
    (it is a cache in memory, loaded once per connect by :meth:`load`); what
    Telethon changes, through ``process_entities`` (every answer and every
    update), ``set_update_state`` (every minute and on disconnect) and
    ``save``, is written behind its back: batched, ``flush_delay`` seconds
    after the first change, each write under ``timeout``. A failed write
    keeps its rows for the next attempt; :meth:`aclose` writes what is left.

    Args:
        string: the decrypted ``StringSession`` string ('' or None: no key yet).
        db: where the state lives.
        account_id: whose state this is.
        cipher: encrypts the auth key when it changes (None: stored as is).
        flush_delay: seconds between the first unsaved change and its write.
        timeout: deadline of one write.
    """

    def __init__(
        self,
        string: str | None,
        *,
        db: Database,
        account_id: int,
        cipher: SessionCipher | None,
        flush_delay: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(string or None)
        self.db = db
        self.account_id = account_id
        self.cipher = cipher
        self.flush_delay = flush_delay
        self.timeout = timeout
        self._saved_string = string or ""
        self._by_id: dict[int, KnownEntity] = {}
        self._by_username: dict[str, int] = {}
        self._by_phone: dict[str, int] = {}
        self._by_name: dict[str, int] = {}
        self._pending_entities: dict[int, KnownEntity] = {}
        self._pending_states: dict[int, UpdateState] = {}
        self._pending_auth: str | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failures = 0
        #: True when a saved account update state was loaded: catch_up() resumes from it.
        self.had_state = False
        #: The date of that saved state (Telegram's clock): what happened after it may be missing.
        self.state_date: datetime | None = None
        self.saved_entities = 0
        self.saved_states = 0
        self.last_error: str | None = None

    @classmethod
    async def load(
        cls,
        string: str | None,
        *,
        db: Database,
        account_id: int,
        cipher: SessionCipher | None,
        flush_delay: float = 1.0,
        timeout: float = 10.0,
    ) -> DatabaseSession:
        """The session with its saved state and entities read in (each page under ``timeout``)."""
        session = cls(string, db=db, account_id=account_id, cipher=cipher, flush_delay=flush_delay, timeout=timeout)
        states = await bounded(db.get_update_states(account_id), timeout * 4, "session.load_state")
        entities = await bounded(db.list_entities(account_id), timeout * 4, "session.load_entities")
        for state in states:
            date = state.date or datetime.fromtimestamp(0, UTC)
            StringSession.set_update_state(
                session, state.entity_id, types.updates.State(state.pts, state.qts, date, state.seq, unread_count=0)
            )
            if state.entity_id == 0 and state.pts > 0:
                session.had_state = True
                session.state_date = state.date
        for entity in entities:
            session._remember(entity)
        return session

    # --- the entity cache ----------------------------------------------------------

    def _remember(self, entity: KnownEntity) -> None:
        before = self._by_id.get(entity.peer_id)
        if before is not None:  # a username or name given up may be someone else's now
            for index, old in ((self._by_username, (before.username or "").lower()), (self._by_name, before.name)):
                if old and index.get(old) == entity.peer_id:
                    del index[old]
        self._by_id[entity.peer_id] = entity
        if entity.username:
            self._by_username[entity.username.lower()] = entity.peer_id
        if entity.phone:
            self._by_phone[entity.phone] = entity.peer_id
        if entity.name:
            self._by_name[entity.name] = entity.peer_id

    def _known_entities(self, tlo: Any) -> Iterable[KnownEntity]:
        if not isinstance(tlo, TLObject) and utils.is_list_like(tlo):
            entities = list(tlo)
        else:
            entities = []
            for attr in ("user", "chat"):
                if hasattr(tlo, attr):
                    entities.append(getattr(tlo, attr))
            for attr in ("chats", "users"):
                if hasattr(tlo, attr) and utils.is_list_like(getattr(tlo, attr)):
                    entities.extend(getattr(tlo, attr))
        for entity in entities:
            row = self._entity_to_row(entity)  # skips min entities and ones without a usable hash
            kind = entity_kind(entity)
            if row is None or kind is None:
                continue
            peer_id, access_hash, username, phone, name = row
            yield KnownEntity(peer_id, access_hash, kind, username=username, phone=phone, name=name)

    def process_entities(self, tlo: Any) -> None:
        for entity in self._known_entities(tlo):
            known = self._by_id.get(entity.peer_id)
            if known is not None:
                # A sighting without a name keeps the one we know (Telegram omits some in places).
                entity = KnownEntity(
                    entity.peer_id,
                    entity.access_hash,
                    entity.kind,
                    username=entity.username or known.username,
                    phone=entity.phone or known.phone,
                    name=entity.name or known.name,
                )
                if entity == known:
                    continue
            self._remember(entity)
            self._pending_entities[entity.peer_id] = entity
        if self._pending_entities:
            self._schedule()

    def _rows(self, peer_id: int | None) -> tuple[int, int] | None:
        if peer_id is None or peer_id not in self._by_id:
            return None
        return peer_id, self._by_id[peer_id].access_hash

    def get_entity_rows_by_phone(self, phone: str) -> tuple[int, int] | None:
        return self._rows(self._by_phone.get(phone))

    def get_entity_rows_by_username(self, username: str) -> tuple[int, int] | None:
        return self._rows(self._by_username.get(username.lower()))

    def get_entity_rows_by_name(self, name: str) -> tuple[int, int] | None:
        return self._rows(self._by_name.get(name))

    def get_entity_rows_by_id(self, id: int, exact: bool = True) -> tuple[int, int] | None:
        if exact:
            return self._rows(id)
        for marked in (utils.get_peer_id(types.PeerUser(id)), utils.get_peer_id(types.PeerChat(id)),
                       utils.get_peer_id(types.PeerChannel(id))):
            found = self._rows(marked)
            if found is not None:
                return found
        return None

    def known(self, peer_id: int) -> KnownEntity | None:
        """The cached entity of a marked peer id, if this account has seen it."""
        return self._by_id.get(peer_id)

    def __len__(self) -> int:
        return len(self._by_id)

    # --- the update state and the auth key ---------------------------------------------

    def set_update_state(self, entity_id: int, state: Any) -> None:
        super().set_update_state(entity_id, state)
        if entity_id == 0 and state.pts <= 0:
            return  # an empty message box has no state to save; never overwrite a real one with it
        date = None
        if entity_id == 0 and isinstance(state.date, datetime):
            date = state.date if state.date.tzinfo else state.date.replace(tzinfo=UTC)
        self._pending_states[entity_id] = UpdateState(
            entity_id, pts=state.pts, qts=state.qts if entity_id == 0 else 0, date=date, seq=state.seq if entity_id == 0 else 0
        )
        self._schedule()

    def save(self) -> str:
        string = super().save()
        if string and string != self._saved_string:
            self._pending_auth = string
            self._schedule()
        return string

    # --- writing behind Telethon's back --------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._pending_entities or self._pending_states or self._pending_auth)

    def _schedule(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): aclose() writes it
        self._flusher = loop.create_task(self._flush_later(), name=f"session-flush-{self.account_id}")

    async def _flush_later(self) -> None:
        delay = self.flush_delay if not self._failures else min(30.0, self.flush_delay * 2**self._failures)
        await asyncio.sleep(delay)
        if await self.flush():
            if self.dirty:  # changed while we were writing
                self._flusher = None
                self._schedule()
        else:
            self._flusher = None
            self._schedule()

    async def flush(self) -> bool:
        """Write every unsaved change now. Returns False (and keeps them) when a write failed."""
        async with self._lock:
            entities, self._pending_entities = self._pending_entities, {}
            states, self._pending_states = self._pending_states, {}
            auth, self._pending_auth = self._pending_auth, None
            try:
                if auth is not None:
                    stored = self.cipher.encrypt(auth) if self.cipher is not None else auth
                    await bounded(self.db.save_account_session(self.account_id, stored), self.timeout, "session.save_auth")
                    self._saved_string, auth = auth, None
                if states:
                    await bounded(self.db.save_update_states(self.account_id, list(states.values())), self.timeout, "session.save_state")
                    self.saved_states += len(states)
                    states = {}
                batch = list(entities.values())
                for start in range(0, len(batch), 500):
                    await bounded(self.db.save_entities(self.account_id, batch[start : start + 500]), self.timeout, "session.save_entities")
                    for entity in batch[start : start + 500]:
                        entities.pop(entity.peer_id, None)
                    self.saved_entities += len(batch[start : start + 500])
            except asyncio.CancelledError:
                self._requeue(entities, states, auth)
                raise
            except Exception as exc:
                self._requeue(entities, states, auth)
                self._failures += 1
                self.last_error = describe(exc)
                logger.warning(
                    "could not save the Telegram session state of account %d (%s); retrying",
                    self.account_id,
                    self.last_error,
                )
                return False
            self._failures = 0
            self.last_error = None
            return True

    def _requeue(self, entities: dict[int, KnownEntity], states: dict[int, UpdateState], auth: str | None) -> None:
        # What changed meanwhile is newer than what failed: it wins.
        self._pending_entities = {**entities, **self._pending_entities}
        self._pending_states = {**states, **self._pending_states}
        if self._pending_auth is None:
            self._pending_auth = auth

    def discard(self) -> None:
        """Drop unsaved changes and stop writing (another process holds the account now; its state wins)."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
        self._flusher = None
        self._pending_entities.clear()
        self._pending_states.clear()
        self._pending_auth = None

    async def aclose(self, timeout: float | None = None) -> bool:
        """Write what is left (after the client's disconnect saved its final state). True when all was saved."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.cancel()
            try:
                await flusher
            except BaseException:  # noqa: BLE001 - cancelled on purpose; its rows are requeued
                pass
        if not self.dirty:
            return True
        try:
            return await asyncio.wait_for(self.flush(), timeout or self.timeout * 2)
        except (TimeoutError, asyncio.TimeoutError):
            logger.warning("the Telegram session state of account %d was not saved in time at close", self.account_id)
            return False


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["new-key"]:
        sys.stdout.write(generate_key() + "\n")
        raise SystemExit(0)
    sys.stderr.write("usage: ./start.sh sessions new-key\n")
    raise SystemExit(2)
