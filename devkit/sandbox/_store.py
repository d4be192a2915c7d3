"""The world's state on disk and the Telegram rules that change it.

A ``Store`` wraps one SQLite connection inside one transaction (the caller
opens and commits it). Everything Telegram-shaped is built here from rows:
``types.User``/``Chat``/``Channel`` as a given account sees them, messages
copied into each participant's box with their own ids and pts, the update
events clients receive, media, flood buckets and callback queries.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import logging
import math
import random
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from telethon import utils
from telethon.extensions import BinaryReader
from telethon.tl import types

from . import _media

logger = logging.getLogger(__name__)

TEXT_LIMIT = 4096
"""Longest message text, in UTF-16 code units."""
CAPTION_LIMIT = 1024
"""Longest media caption, in UTF-16 code units."""
DC_ID = 2
"""The data centre every sandbox file lives in (Telethon's default DC)."""
LOGIN_CODE = "12345"
"""The code every sandbox login accepts."""


class SandboxError(Exception):
    """A sandbox world operation was used wrongly (a test or CLI mistake)."""


class UnknownPeerError(SandboxError, LookupError):
    """No user, bot, group or channel matches the given reference."""


class RpcFailure(Exception):
    """A request fails the way Telegram fails it: an RPC error code and message.

    Converted to Telethon's exception class (``rpc_message_to_error``) on the
    client side, so callers see exactly what production would raise.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class PeerKind(str, enum.Enum):
    """What a world peer is."""

    USER = "user"
    BOT = "bot"
    GROUP = "group"  # a basic group: types.Chat
    CHANNEL = "channel"  # a broadcast channel: types.Channel(broadcast=True)
    MEGAGROUP = "megagroup"  # a supergroup: types.Channel(megagroup=True)

    @property
    def is_user(self) -> bool:
        return self in (PeerKind.USER, PeerKind.BOT)

    @property
    def is_channel(self) -> bool:
        return self in (PeerKind.CHANNEL, PeerKind.MEGAGROUP)


@dataclass(frozen=True)
class Peer:
    """A user, bot, group or channel in the world."""

    id: int
    kind: PeerKind
    access_hash: int
    username: str | None = None
    phone: str | None = None
    bot_token: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    title: str | None = None
    about: str | None = None
    creator_id: int | None = None
    deactivated: bool = False
    login_required: bool = False

    @property
    def name(self) -> str:
        """A display name: title for chats, first and last name for users."""
        if not self.kind.is_user:
            return self.title or str(self.id)
        return " ".join(x for x in (self.first_name, self.last_name) if x) or (self.username or str(self.id))

    @property
    def ref(self) -> str:
        """The shortest reference that finds this peer again (``@name``, ``+phone`` or the id)."""
        if self.username:
            return f"@{self.username}"
        if self.phone:
            return f"+{self.phone}"
        return str(self.id)

    @property
    def marked_id(self) -> int:
        """The Bot-API style id Telethon uses (``-100...`` for channels, ``-id`` for groups)."""
        return utils.get_peer_id(peer_tl(self))


@dataclass(frozen=True)
class MediaInfo:
    """Metadata of a message's photo or document."""

    id: int
    kind: str  # photo | document
    mime_type: str
    size: int
    width: int
    height: int
    file_name: str | None
    label: str | None  # the ImageKind it was generated from


@dataclass(frozen=True)
class WorldMessage:
    """One message as stored in one box: the ground truth for tests.

    Attributes:
        box: Whose copy this is (user, bot, group or channel id).
        id: Message id inside that box.
        chat_id: The chat it belongs to from the box owner's view.
        sender_id: Who sent it.
        sender: The sender's reference (``@username``, ``+phone`` or id).
        out: True in the sender's own copy.
        date: When it was sent.
        text: Text or caption.
        random_id: The sender's random_id (only on the sender's copy / the channel row).
        reply_to: Id (in this box) of the message it replies to.
        media: Photo or document metadata.
        buttons: Inline buttons as (text, callback data) pairs.
        edited: True once edited.
        deleted: True once deleted.
        origin: Shared by every copy of one message.
    """

    box: int
    id: int
    chat_id: int
    sender_id: int
    sender: str
    out: bool
    date: dt.datetime
    text: str
    random_id: int | None
    reply_to: int | None
    media: MediaInfo | None
    buttons: list[tuple[str, bytes]] = field(default_factory=list)
    edited: bool = False
    deleted: bool = False
    origin: int = 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly dict (used by ``inbox --json``)."""
        return {
            "box": self.box,
            "id": self.id,
            "chat_id": self.chat_id,
            "sender_id": self.sender_id,
            "sender": self.sender,
            "out": self.out,
            "date": self.date.isoformat(),
            "text": self.text,
            "random_id": self.random_id,
            "reply_to": self.reply_to,
            "media": None if self.media is None else {
                "kind": self.media.kind,
                "mime_type": self.media.mime_type,
                "size": self.media.size,
                "width": self.media.width,
                "height": self.media.height,
                "file_name": self.media.file_name,
                "label": self.media.label,
            },
            "buttons": [{"text": text, "data": data.decode("utf-8", "replace")} for text, data in self.buttons],
            "edited": self.edited,
            "deleted": self.deleted,
        }


@dataclass
class Copy:
    """A message copy just written into one box."""

    box: int
    id: int
    pts: int | None
    message: types.Message
    chat: Peer


def utf16_len(text: str) -> int:
    """Length of ``text`` in UTF-16 code units, as Telegram counts it."""
    return len(text.encode("utf-16-le")) // 2


def now_dt(ts: float) -> dt.datetime:
    """A UTC datetime from a POSIX timestamp, whole seconds (TL dates are ints)."""
    return dt.datetime.fromtimestamp(int(ts), tz=dt.timezone.utc)


def rand63() -> int:
    """A random positive 63-bit integer (ids, access hashes)."""
    return random.getrandbits(62) + 1


def view_hash(base: int, viewer_id: int | None) -> int:
    """The access hash ``viewer_id`` is given for a peer whose own hash is ``base``.

    Telegram's access hashes are per account: the hash one account holds for a
    user or channel is refused from another. Without a viewer (the world's own
    view) the base hash is returned.
    """
    if not viewer_id:
        return base
    mixed = (base ^ ((viewer_id * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))) & ((1 << 63) - 1)
    return mixed or 1


def peer_tl(peer: Peer) -> types.PeerUser | types.PeerChat | types.PeerChannel:
    """The TL ``Peer`` of a world peer."""
    if peer.kind.is_user:
        return types.PeerUser(peer.id)
    if peer.kind is PeerKind.GROUP:
        return types.PeerChat(peer.id)
    return types.PeerChannel(peer.id)


def parse_tl(data: bytes):  # noqa: ANN201 - any TL object
    """Deserialize one TL object, exactly as Telethon reads it off the wire."""
    with BinaryReader(data) as reader:
        return reader.tgread_object()


def buttons_of(markup: object) -> list[tuple[str, bytes]]:
    """Inline callback buttons of a reply markup as (text, data) pairs."""
    found: list[tuple[str, bytes]] = []
    for row in getattr(markup, "rows", None) or []:
        for button in getattr(row, "buttons", None) or []:
            kind = getattr(button, "type", None)
            data = getattr(kind, "data", None) if kind is not None else getattr(button, "data", None)
            if data is not None:
                found.append((getattr(button, "text", ""), bytes(data)))
    return found


_PEER_COLUMNS = (
    "id, kind, access_hash, username, phone, bot_token, first_name, last_name, title, about,"
    " creator_id, deactivated, login_required"
)


_KINDS = {kind.value: kind for kind in PeerKind}


def _peer_from_row(row: tuple) -> Peer:
    return Peer(
        id=row[0],
        kind=_KINDS[row[1]],
        access_hash=row[2],
        username=row[3],
        phone=row[4],
        bot_token=row[5],
        first_name=row[6],
        last_name=row[7],
        title=row[8],
        about=row[9],
        creator_id=row[10],
        deactivated=bool(row[11]),
        login_required=bool(row[12]),
    )


def normalize_phone(phone: str | int) -> str:
    """Digits only, as Telegram stores phone numbers."""
    digits = "".join(ch for ch in str(phone) if ch.isdigit())
    if not digits:
        raise SandboxError(f"not a phone number: {phone!r}")
    return digits


class Store:
    """The world's rules on one SQLite connection, inside one transaction.

    Args:
        conn: An open connection; the caller manages BEGIN/COMMIT.
        clock: Wall clock (seconds since the epoch).
    """

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self.conn = conn
        self.clock = clock
        self._peers: dict[int, Peer | None] = {}
        self.events_written = 0

    # ------------------------------------------------------------------ meta

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: object) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    def bump(self, key: str) -> int:
        value = int(self.meta(key, "0") or 0) + 1
        self.set_meta(key, value)
        return value

    # ----------------------------------------------------------------- peers

    def peer(self, peer_id: int) -> Peer | None:
        """The peer with this id, or None."""
        if peer_id in self._peers:
            return self._peers[peer_id]
        row = self.conn.execute(f"SELECT {_PEER_COLUMNS} FROM peers WHERE id = ?", (peer_id,)).fetchone()
        peer = _peer_from_row(row) if row else None
        self._peers[peer_id] = peer
        return peer

    def all_peers(self, kind: PeerKind | None = None) -> list[Peer]:
        if kind is None:
            rows = self.conn.execute(f"SELECT {_PEER_COLUMNS} FROM peers ORDER BY id").fetchall()
        else:
            rows = self.conn.execute(f"SELECT {_PEER_COLUMNS} FROM peers WHERE kind = ? ORDER BY id", (kind.value,)).fetchall()
        return [_peer_from_row(r) for r in rows]

    def find_peer(self, ref: object) -> Peer:
        """Find a peer by Peer, id, marked id, ``@username``, username, ``+phone`` or exact title.

        Raises:
            UnknownPeerError: When nothing matches.
        """
        if isinstance(ref, Peer):
            found = self.peer(ref.id)
            if found is None:
                raise UnknownPeerError(f"no peer {ref.ref!r} in this world (was it reset?)")
            return found
        if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().lstrip("-").isdigit() and not ref.strip().startswith("+")):
            number = int(ref)
            if number < 0:
                number, _ = utils.resolve_id(number)
            found = self.peer(number)
            if found is None and isinstance(ref, str) and len(ref.strip()) >= 7:
                found = self._peer_where("phone = ?", normalize_phone(ref))
            if found is None:
                raise UnknownPeerError(f"no peer with id {ref}")
            return found
        if not isinstance(ref, str) or not ref.strip():
            raise UnknownPeerError(f"not a peer reference: {ref!r}")
        text = ref.strip()
        if text.startswith("+"):
            found = self._peer_where("phone = ?", normalize_phone(text))
            if found is None:
                raise UnknownPeerError(f"no user with phone {text}")
            return found
        name = text[1:] if text.startswith("@") else text
        found = self._peer_where("username = ?", name)
        if found is None and not text.startswith("@"):
            found = self._peer_where("title = ?", text)
        if found is None:
            raise UnknownPeerError(f"no peer {text!r} (try a @username, +phone, id or exact title)")
        return found

    def _peer_where(self, where: str, value: object) -> Peer | None:
        row = self.conn.execute(f"SELECT {_PEER_COLUMNS} FROM peers WHERE {where}", (value,)).fetchone()
        return _peer_from_row(row) if row else None

    def peer_by_username(self, username: str) -> Peer | None:
        return self._peer_where("username = ?", username.lstrip("@"))

    def peer_by_phone(self, phone: str) -> Peer | None:
        return self._peer_where("phone = ?", normalize_phone(phone))

    def peer_by_token(self, token: str) -> Peer | None:
        return self._peer_where("bot_token = ?", token)

    def create_peer(
        self,
        kind: PeerKind,
        *,
        username: str | None = None,
        phone: str | None = None,
        bot_token: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
        title: str | None = None,
        about: str | None = None,
        creator_id: int | None = None,
    ) -> Peer:
        """Insert a new peer.

        Raises:
            SandboxError: When the username, phone or token is taken.
        """
        username = username.lstrip("@") if username else None
        if username and not utils.VALID_USERNAME_RE.match(username):
            raise SandboxError(f"invalid username {username!r}: 3-32 letters, digits or _, starting with a letter")
        phone = normalize_phone(phone) if phone else None
        next_id = int(self.meta("next_peer_id", "1000001") or 1000001)
        self.set_meta("next_peer_id", next_id + 1)
        try:
            self.conn.execute(
                "INSERT INTO peers (id, kind, access_hash, username, phone, bot_token, first_name, last_name,"
                " title, about, creator_id, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (next_id, kind.value, rand63(), username, phone, bot_token, first_name, last_name, title, about,
                 creator_id, self.clock()),
            )
        except sqlite3.IntegrityError as exc:
            raise SandboxError(f"cannot create {kind.value}: username, phone or token already taken ({exc})") from exc
        peer = self.peer(next_id)
        assert peer is not None
        return peer

    def update_peer(self, peer: Peer, **columns: object) -> Peer:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        self.conn.execute(f"UPDATE peers SET {assignments} WHERE id = ?", (*columns.values(), peer.id))
        self._peers.pop(peer.id, None)
        updated = self.peer(peer.id)
        assert updated is not None
        return updated

    def membership(self, chat_id: int, user_id: int) -> tuple[str, bool] | None:
        """(role, can_write) of a user in a group or channel, or None when not a member."""
        row = self.conn.execute(
            "SELECT role, can_write FROM members WHERE chat_id = ? AND user_id = ?", (chat_id, user_id)
        ).fetchone()
        return (row[0], bool(row[1])) if row else None

    def members(self, chat_id: int) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT user_id FROM members WHERE chat_id = ? ORDER BY user_id", (chat_id,))]

    def add_member(self, chat_id: int, user_id: int, *, role: str = "member", can_write: bool = True) -> None:
        self.conn.execute(
            "INSERT INTO members (chat_id, user_id, role, can_write) VALUES (?,?,?,?)"
            " ON CONFLICT (chat_id, user_id) DO UPDATE SET role = excluded.role, can_write = excluded.can_write",
            (chat_id, user_id, role, int(can_write)),
        )

    def member_count(self, chat_id: int) -> int:
        return self.conn.execute("SELECT count(*) FROM members WHERE chat_id = ?", (chat_id,)).fetchone()[0]

    def channels_of(self, user_id: int) -> list[Peer]:
        rows = self.conn.execute(
            f"SELECT {', '.join('p.' + c.strip() for c in _PEER_COLUMNS.split(','))} FROM peers p"
            " JOIN members m ON m.chat_id = p.id WHERE m.user_id = ? AND p.kind IN ('channel', 'megagroup')",
            (user_id,),
        ).fetchall()
        return [_peer_from_row(r) for r in rows]

    def is_contact(self, owner_id: int, contact_id: int) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM contacts WHERE owner_id = ? AND contact_id = ?", (owner_id, contact_id)
        ).fetchone() is not None

    def blocking(self, a: int, b: int) -> tuple[bool, bool]:
        """(a blocked b, b blocked a) in one query."""
        rows = self.conn.execute(
            "SELECT user_id FROM blocks WHERE (user_id = ? AND blocked_id = ?) OR (user_id = ? AND blocked_id = ?)",
            (a, b, b, a),
        ).fetchall()
        found = {r[0] for r in rows}
        return a in found, b in found

    def has_blocked(self, user_id: int, blocked_id: int) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM blocks WHERE user_id = ? AND blocked_id = ?", (user_id, blocked_id)
        ).fetchone() is not None

    # ------------------------------------------------------------ TL objects

    def user_tl(self, peer: Peer, viewer_id: int | None) -> types.User:
        """``types.User`` as ``viewer_id`` sees it (self flag, contact flag, phone visibility)."""
        is_self = viewer_id == peer.id
        contact = bool(viewer_id) and not is_self and self.is_contact(viewer_id, peer.id)
        mutual = contact and self.is_contact(peer.id, viewer_id)  # type: ignore[arg-type]
        bot = peer.kind is PeerKind.BOT
        return types.User(
            id=peer.id,
            is_self=is_self or None,
            contact=contact or None,
            mutual_contact=mutual or None,
            deleted=peer.deactivated or None,
            bot=bot or None,
            access_hash=view_hash(peer.access_hash, viewer_id),
            first_name=peer.first_name if not peer.deactivated else None,
            last_name=peer.last_name if not peer.deactivated else None,
            username=peer.username if not peer.deactivated else None,
            phone=peer.phone if (is_self or contact) and peer.phone else None,
            status=None if bot else types.UserStatusRecently(),
            bot_info_version=1 if bot else None,
        )

    def chat_tl(self, peer: Peer, viewer_id: int | None) -> types.Chat | types.Channel:
        """``types.Chat`` or ``types.Channel`` as ``viewer_id`` sees it."""
        member = self.membership(peer.id, viewer_id) if viewer_id else None
        created = now_dt(self.conn.execute("SELECT created FROM peers WHERE id = ?", (peer.id,)).fetchone()[0])
        if peer.kind is PeerKind.GROUP:
            return types.Chat(
                id=peer.id,
                title=peer.title or "",
                photo=types.ChatPhotoEmpty(),
                participants_count=self.member_count(peer.id),
                date=created,
                version=1,
                creator=(member is not None and member[0] == "creator") or None,
                left=(viewer_id is not None and member is None) or None,
            )
        return types.Channel(
            id=peer.id,
            title=peer.title or "",
            photo=types.ChatPhotoEmpty(),
            date=created,
            creator=(member is not None and member[0] == "creator") or None,
            left=(viewer_id is not None and member is None) or None,
            broadcast=(peer.kind is PeerKind.CHANNEL) or None,
            megagroup=(peer.kind is PeerKind.MEGAGROUP) or None,
            access_hash=view_hash(peer.access_hash, viewer_id),
            username=peer.username,
            participants_count=self.member_count(peer.id),
        )

    def entities_tl(self, ids: Iterable[int], viewer_id: int | None) -> tuple[list[types.User], list]:
        """(users, chats) for a set of peer ids, as ``viewer_id`` sees them."""
        users: list[types.User] = []
        chats: list = []
        for peer_id in dict.fromkeys(i for i in ids if i):
            peer = self.peer(peer_id)
            if peer is None:
                continue
            if peer.kind.is_user:
                users.append(self.user_tl(peer, viewer_id))
            else:
                chats.append(self.chat_tl(peer, viewer_id))
        return users, chats

    # ------------------------------------------------------------- messages

    def _allocate(self, box: int, *, new_message: bool = True, pts_count: int = 1) -> tuple[int, int]:
        if new_message:
            row = self.conn.execute(
                "UPDATE peers SET last_msg_id = last_msg_id + 1, pts = pts + ? WHERE id = ? RETURNING last_msg_id, pts",
                (pts_count, box),
            ).fetchone()
        else:
            row = self.conn.execute(
                "UPDATE peers SET pts = pts + ? WHERE id = ? RETURNING last_msg_id, pts", (pts_count, box)
            ).fetchone()
        return row[0], row[1]

    def add_event(
        self,
        box: int,
        *,
        update: object | None = None,
        msg_id: int | None = None,
        pts: int | None,
        pts_count: int,
        entity_ids: Iterable[int],
        pushed: bool,
        origin_key: int | None,
    ) -> None:
        """Record an update for a box (pushed to its clients unless it is a gap).

        A new message is stored as a reference to its row (``msg_id``); any
        other update as its serialized bytes. Users and chats are attached
        when the event is rendered for a viewer (``render_event``).
        """
        ids = ",".join(str(i) for i in dict.fromkeys(entity_ids) if i)
        self.conn.execute(
            "INSERT INTO events (box, pts, pts_count, pushed, origin_key, date, msg_id, entity_ids, payload)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (box, pts, pts_count, int(pushed), origin_key, self.clock(), msg_id, ids,
             None if update is None else bytes(update)),
        )
        self.events_written += 1

    def render_update(self, box: int, msg_id: int | None, pts: int | None, pts_count: int, payload: bytes | None,
                      viewer_id: int | None) -> object | None:
        """The TL update of an event as ``viewer_id`` sees it (None when its message is gone)."""
        if payload is not None:
            return parse_tl(payload)
        row = self.conn.execute("SELECT sender_id, deleted, tl FROM messages WHERE box = ? AND id = ?",
                                (box, msg_id)).fetchone()
        if row is None or row[1]:
            return None
        message = self.message_tl(row[2], viewer_id, row[0])
        if isinstance(message.peer_id, types.PeerChannel):
            return types.UpdateNewChannelMessage(message=message, pts=pts, pts_count=pts_count)
        return types.UpdateNewMessage(message=message, pts=pts, pts_count=pts_count)

    def render_event(self, row: tuple, viewer_id: int | None) -> bytes | None:
        """Serialized ``types.Updates`` for an events row (box, pts, pts_count, date, msg_id, entity_ids, payload)."""
        box, pts, pts_count, date, msg_id, entity_ids, payload = row
        update = self.render_update(box, msg_id, pts, pts_count, payload, viewer_id)
        if update is None:
            return None
        users, chats = self.entities_tl((int(i) for i in entity_ids.split(",") if i), viewer_id)
        return bytes(types.Updates(updates=[update], users=users, chats=chats, date=now_dt(date), seq=0))

    def _dedupe_box(self, sender: Peer, chat: Peer) -> int:
        return chat.id if chat.kind.is_channel else sender.id

    def check_random_id(self, sender: Peer, chat: Peer, random_id: int | None) -> None:
        """Raise RANDOM_ID_DUPLICATE when this sender already used random_id in this chat."""
        if random_id is None:
            return
        found = self.conn.execute(
            "SELECT 1 FROM messages WHERE box = ? AND chat_id = ? AND sender_id = ? AND random_id = ?",
            (self._dedupe_box(sender, chat), chat.id, sender.id, random_id),
        ).fetchone()
        if found:
            raise RpcFailure(500, "RANDOM_ID_DUPLICATE")

    def send_message(
        self,
        sender: Peer,
        chat: Peer,
        *,
        text: str = "",
        entities: list | None = None,
        media: types.TypeMessageMedia | None = None,
        media_id: int | None = None,
        reply_to: int | None = None,
        reply_markup: object | None = None,
        random_id: int | None = None,
        origin_key: int | None = None,
        pushed: bool = True,
        silent: bool = False,
        checked: bool = False,
    ) -> list[Copy]:
        """Write a message into every box that holds a copy of it.

        Args:
            sender: Who sends.
            chat: A user/bot (private chat), a group or a channel.
            reply_to: Id of the replied message in the sender's view of the chat.
            random_id: The sender's random_id; a repeat raises RANDOM_ID_DUPLICATE.
            origin_key: Auth key of the sending client (its own copy is not pushed back to it).
            pushed: False makes a gap: stored, counted in pts, but never pushed.
            checked: The caller already ran ``check_random_id``.

        Returns:
            The copies written; the sender's own copy (or the channel row) first.

        Raises:
            RpcFailure: RANDOM_ID_DUPLICATE.
        """
        if not checked:
            self.check_random_id(sender, chat, random_id)
        date = now_dt(self.clock())
        origin = rand63()
        reply_origin = None
        if reply_to:
            view_box = chat.id if chat.kind.is_channel else sender.id
            row = self.conn.execute(
                "SELECT origin FROM messages WHERE box = ? AND id = ? AND chat_id = ?",
                (view_box, reply_to, chat.id),
            ).fetchone()
            reply_origin = row[0] if row else None

        boxes: list[tuple[int, int, bool]]  # (box, chat id as seen from the box, out)
        if chat.kind.is_user:
            boxes = [(sender.id, chat.id, True)]
            if chat.id != sender.id:
                boxes.append((chat.id, sender.id, False))
        elif chat.kind is PeerKind.GROUP:
            boxes = [(sender.id, chat.id, True)]
            boxes += [(m, chat.id, False) for m in self.members(chat.id) if m != sender.id]
            boxes.append((chat.id, chat.id, False))  # the group's own ground-truth copy
        else:
            boxes = [(chat.id, chat.id, False)]

        copies: list[Copy] = []
        for index, (box, chat_id, out) in enumerate(boxes):
            is_group_box = chat.kind is PeerKind.GROUP and box == chat.id
            msg_id, pts = self._allocate(box)
            reply_header = None
            reply_id = None
            if reply_origin is not None:
                found = self.conn.execute(
                    "SELECT id FROM messages WHERE box = ? AND origin = ?", (box, reply_origin)
                ).fetchone()
                if found:
                    reply_id = found[0]
                    reply_header = types.MessageReplyHeader(reply_to_msg_id=reply_id)
            if chat.kind.is_user:
                peer_id = types.PeerUser(chat_id)
                from_id = types.PeerUser(sender.id) if out else None
            elif chat.kind is PeerKind.GROUP:
                peer_id = types.PeerChat(chat.id)
                from_id = types.PeerUser(sender.id)
            else:
                peer_id = types.PeerChannel(chat.id)
                from_id = None if chat.kind is PeerKind.CHANNEL else types.PeerUser(sender.id)
            message = types.Message(
                id=msg_id,
                peer_id=peer_id,
                date=date,
                message=text,
                out=out or None,
                silent=silent or None,
                post=(chat.kind is PeerKind.CHANNEL) or None,
                from_id=from_id,
                reply_to=reply_header,
                media=media,
                reply_markup=reply_markup,
                entities=entities or None,
                views=1 if chat.kind is PeerKind.CHANNEL else None,
                forwards=0 if chat.kind is PeerKind.CHANNEL else None,
            )
            self.conn.execute(
                "INSERT INTO messages (box, id, chat_id, sender_id, out, date, text, random_id, media_id, reply_to,"
                " origin, pts, tl) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (box, msg_id, chat_id, sender.id, int(out), int(date.timestamp()), text,
                 random_id if index == 0 else None, media_id, reply_id, origin,
                 None if is_group_box else pts, bytes(message)),
            )
            if not is_group_box:
                entity_ids = [chat.id, sender.id] if chat.kind.is_channel else [sender.id, chat.id, box]
                self.add_event(box, msg_id=msg_id, pts=pts, pts_count=1, entity_ids=entity_ids, pushed=pushed,
                               origin_key=origin_key)
            copies.append(Copy(box=box, id=msg_id, pts=None if is_group_box else pts, message=message, chat=chat))
        return copies

    def message_row(self, box: int, msg_id: int) -> tuple | None:
        return self.conn.execute(
            "SELECT box, id, chat_id, sender_id, out, date, text, random_id, media_id, reply_to, origin, pts,"
            " edited, deleted, tl FROM messages WHERE box = ? AND id = ?",
            (box, msg_id),
        ).fetchone()

    def message_tl(self, tl: bytes, viewer_id: int | None, sender_id: int | None = None) -> types.Message:
        message = parse_tl(tl)
        if isinstance(message.peer_id, types.PeerChannel) and viewer_id is not None and sender_id == viewer_id:
            message.out = True
        return message

    def edit_message(
        self,
        editor: Peer,
        chat: Peer,
        msg_id: int,
        *,
        text: str | None,
        entities: list | None,
        reply_markup: object | None,
        origin_key: int | None,
    ) -> Copy:
        """Edit a message the editor sent; every copy is changed and gets an edit update.

        Raises:
            RpcFailure: MESSAGE_ID_INVALID, MESSAGE_AUTHOR_REQUIRED, MESSAGE_NOT_MODIFIED, MESSAGE_TOO_LONG.
        """
        view_box = chat.id if chat.kind.is_channel else editor.id
        row = self.message_row(view_box, msg_id)
        if row is None or row[13] or row[2] != (chat.id if not chat.kind.is_user else chat.id):
            raise RpcFailure(400, "MESSAGE_ID_INVALID")
        if row[3] != editor.id:
            raise RpcFailure(403, "MESSAGE_AUTHOR_REQUIRED")
        current = parse_tl(row[14])
        new_text = current.message if text is None else text
        new_markup = current.reply_markup if reply_markup is None else reply_markup
        if new_text == current.message and (reply_markup is None or bytes(reply_markup) == bytes(current.reply_markup or b"")):
            raise RpcFailure(400, "MESSAGE_NOT_MODIFIED")
        limit = CAPTION_LIMIT if current.media else TEXT_LIMIT
        if utf16_len(new_text) > limit:
            raise RpcFailure(400, "MEDIA_CAPTION_TOO_LONG" if current.media else "MESSAGE_TOO_LONG")
        edit_date = now_dt(self.clock())
        result: Copy | None = None
        for copy_row in self.conn.execute(
            "SELECT box, id, tl FROM messages WHERE origin = ? AND deleted = 0", (row[10],)
        ).fetchall():
            box, copy_id, tl = copy_row
            message = parse_tl(tl)
            message.message = new_text
            message.entities = entities if text is not None else message.entities
            message.reply_markup = new_markup
            message.edit_date = edit_date
            is_group_box = chat.kind is PeerKind.GROUP and box == chat.id
            pts = None
            if not is_group_box:
                _, pts = self._allocate(box, new_message=False)
            self.conn.execute(
                "UPDATE messages SET text = ?, edited = 1, tl = ? WHERE box = ? AND id = ?",
                (new_text, bytes(message), box, copy_id),
            )
            if not is_group_box:
                if chat.kind.is_channel:
                    update = types.UpdateEditChannelMessage(message=message, pts=pts, pts_count=1)
                    self.add_event(box, update=update, pts=pts, pts_count=1, entity_ids=[chat.id, editor.id],
                                   pushed=True, origin_key=origin_key)
                else:
                    update = types.UpdateEditMessage(message=message, pts=pts, pts_count=1)
                    self.add_event(box, update=update, pts=pts, pts_count=1, entity_ids=[editor.id, chat.id, box],
                                   pushed=True, origin_key=origin_key)
            if box == view_box:
                result = Copy(box=box, id=copy_id, pts=pts, message=message, chat=chat)
        assert result is not None
        return result

    def delete_messages(
        self, actor: Peer, ids: list[int], *, revoke: bool, channel: Peer | None, origin_key: int | None
    ) -> tuple[int, int]:
        """Delete messages from the actor's box (and every copy when revoking).

        Returns:
            (pts, pts_count) of the actor's box (or the channel) after the deletion.
        """
        view_box = channel.id if channel else actor.id
        rows = [
            r for r in (self.message_row(view_box, i) for i in dict.fromkeys(ids)) if r is not None and not r[13]
        ]
        if channel is not None and not rows:
            pts = self.conn.execute("SELECT pts FROM peers WHERE id = ?", (view_box,)).fetchone()[0]
            return pts, 0
        targets: dict[int, list[int]] = {}
        for row in rows:
            if revoke or channel is not None:
                for box, copy_id in self.conn.execute(
                    "SELECT box, id FROM messages WHERE origin = ? AND deleted = 0", (row[10],)
                ).fetchall():
                    targets.setdefault(box, []).append(copy_id)
            else:
                targets.setdefault(view_box, []).append(row[1])
        result = (self.conn.execute("SELECT pts FROM peers WHERE id = ?", (view_box,)).fetchone()[0], 0)
        for box, box_ids in targets.items():
            self.conn.executemany(
                "UPDATE messages SET deleted = 1 WHERE box = ? AND id = ?", [(box, i) for i in box_ids]
            )
            box_peer = self.peer(box)
            if box_peer is None or box_peer.kind is PeerKind.GROUP:
                continue
            _, pts = self._allocate(box, new_message=False, pts_count=len(box_ids))
            if box_peer.kind.is_channel:
                update = types.UpdateDeleteChannelMessages(channel_id=box, messages=box_ids, pts=pts, pts_count=len(box_ids))
                self.add_event(box, update=update, pts=pts, pts_count=len(box_ids), entity_ids=[box],
                               pushed=True, origin_key=origin_key)
            else:
                update = types.UpdateDeleteMessages(messages=box_ids, pts=pts, pts_count=len(box_ids))
                self.add_event(box, update=update, pts=pts, pts_count=len(box_ids), entity_ids=[],
                               pushed=True, origin_key=origin_key)
            if box == view_box:
                result = (pts, len(box_ids))
        return result

    def world_message(self, row: tuple) -> WorldMessage:
        """A ``WorldMessage`` from a messages row (see ``message_row``)."""
        message = parse_tl(row[14])
        sender = self.peer(row[3])
        media_info = self.media_info(row[8]) if row[8] else None
        return WorldMessage(
            box=row[0],
            id=row[1],
            chat_id=row[2],
            sender_id=row[3],
            sender=sender.ref if sender else str(row[3]),
            out=bool(row[4]),
            date=now_dt(row[5]),
            text=row[6],
            random_id=row[7],
            reply_to=row[9],
            media=media_info,
            buttons=buttons_of(message.reply_markup),
            edited=bool(row[12]),
            deleted=bool(row[13]),
            origin=row[10],
        )

    # ---------------------------------------------------------------- media

    def create_media(
        self,
        data: bytes | None,
        *,
        as_photo: bool,
        mime_type: str,
        file_name: str | None,
        width: int = 0,
        height: int = 0,
        label: str | None = None,
        lazy_seed: int | None = None,
        lazy_size: int | None = None,
        attributes: list | None = None,
    ) -> tuple[int, types.TypeMessageMedia]:
        """Store a photo or document and return (media id, its ``MessageMedia``)."""
        media_id = rand63()
        access_hash = rand63()
        file_reference = hashlib.sha256(f"{media_id}".encode()).digest()[:16]
        date = now_dt(self.clock())
        size = lazy_size if data is None else len(data)
        assert size is not None
        if as_photo:
            longest = max(width, height)
            size_type = "s" if longest <= 100 else "m" if longest <= 320 else "x" if longest <= 800 else "y" if longest <= 1280 else "w"
            photo = types.Photo(
                id=media_id,
                access_hash=access_hash,
                file_reference=file_reference,
                date=date,
                sizes=[types.PhotoSize(type=size_type, w=width, h=height, size=size)],
                dc_id=DC_ID,
            )
            media: types.TypeMessageMedia = types.MessageMediaPhoto(photo=photo)
            mime_type = "image/jpeg"
        else:
            attrs = list(attributes or [])
            if width and height and not any(isinstance(a, types.DocumentAttributeImageSize) for a in attrs):
                attrs.insert(0, types.DocumentAttributeImageSize(w=width, h=height))
            if file_name and not any(isinstance(a, types.DocumentAttributeFilename) for a in attrs):
                attrs.append(types.DocumentAttributeFilename(file_name=file_name))
            document = types.Document(
                id=media_id,
                access_hash=access_hash,
                file_reference=file_reference,
                date=date,
                mime_type=mime_type,
                size=size,
                dc_id=DC_ID,
                attributes=attrs,
            )
            media = types.MessageMediaDocument(document=document)
        self.conn.execute(
            "INSERT INTO media (id, kind, access_hash, file_reference, mime_type, size, width, height, file_name,"
            " label, data, lazy_seed, date, tl) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (media_id, "photo" if as_photo else "document", access_hash, file_reference, mime_type, size, width,
             height, file_name, label, data, lazy_seed, int(date.timestamp()), bytes(media)),
        )
        return media_id, media

    def media_from_kind(self, kind: _media.ImageKind, *, as_document: bool | None = None, seed: int = 0) -> tuple[int, types.TypeMessageMedia]:
        """Store one of the generated media kinds."""
        spec = _media.SPECS[kind]
        as_photo = spec.as_photo if as_document is None else not as_document
        if spec.lazy_size is not None:
            return self.create_media(
                None, as_photo=False, mime_type=spec.mime_type, file_name=spec.file_name, width=spec.width,
                height=spec.height, label=kind.value, lazy_seed=seed, lazy_size=spec.lazy_size,
            )
        data = _media.generate(kind, seed)
        if as_photo and spec.mime_type != "image/jpeg":
            data = _media.to_jpeg(data)
        return self.create_media(
            data, as_photo=as_photo, mime_type=spec.mime_type, file_name=spec.file_name, width=spec.width,
            height=spec.height, label=kind.value,
        )

    def media_from_bytes(
        self, data: bytes, *, as_document: bool | None, mime_type: str | None, file_name: str | None,
        attributes: list | None = None,
    ) -> tuple[int, types.TypeMessageMedia]:
        """Store uploaded or given bytes as a photo or document (Pillow reads the size)."""
        size = _media.image_size(data)
        mime = mime_type or ("image/jpeg" if size else "application/octet-stream")
        as_photo = bool(size) and not as_document if as_document is not None else bool(size) and mime == "image/jpeg"
        if as_photo:
            data = _media.to_jpeg(data)
        width, height = size or (0, 0)
        return self.create_media(
            data, as_photo=as_photo, mime_type=mime, file_name=file_name, width=width, height=height,
            attributes=attributes,
        )

    def media_row(self, media_id: int) -> tuple | None:
        return self.conn.execute(
            "SELECT id, kind, access_hash, file_reference, mime_type, size, width, height, file_name, label,"
            " lazy_seed, tl FROM media WHERE id = ?",
            (media_id,),
        ).fetchone()

    def media_info(self, media_id: int) -> MediaInfo | None:
        row = self.media_row(media_id)
        if row is None:
            return None
        return MediaInfo(id=row[0], kind=row[1], mime_type=row[4], size=row[5], width=row[6], height=row[7],
                         file_name=row[8], label=row[9])

    def read_file(self, media_id: int, access_hash: int, offset: int, limit: int) -> tuple[bytes, str, int]:
        """Bytes ``offset:offset+limit`` of a stored file: (bytes, kind, date).

        Raises:
            RpcFailure: LOCATION_INVALID for an unknown file or wrong access hash.
        """
        row = self.conn.execute(
            "SELECT kind, access_hash, size, lazy_seed, date FROM media WHERE id = ?", (media_id,)
        ).fetchone()
        if row is None or row[1] != access_hash:
            raise RpcFailure(400, "LOCATION_INVALID")
        kind, _, size, lazy_seed, date = row
        if lazy_seed is not None:
            return _media.lazy_range(lazy_seed, offset, limit, size), kind, date
        chunk = self.conn.execute(
            "SELECT substr(data, ?, ?) FROM media WHERE id = ?", (offset + 1, limit, media_id)
        ).fetchone()[0]
        return bytes(chunk or b""), kind, date

    # ---------------------------------------------------------------- flood

    def check_flood(self, account: Peer, chat: Peer) -> None:
        """Take one token from every flood bucket that applies.

        Raises:
            RpcFailure: PEER_FLOOD when a ``non_contacts`` bucket is empty (a send to a
                non-contact), else FLOOD_WAIT_<seconds> when a bucket is empty.
        """
        limits = self.conn.execute(
            "SELECT id, scope, rate, burst FROM flood_limits WHERE account_id IS NULL OR account_id = ?",
            (account.id,),
        ).fetchall()
        if not limits:
            return
        now = self.clock()
        wait = 0.0
        spam_limited = False
        updates: list[tuple[str, float]] = []
        for limit_id, scope, rate, burst in limits:
            if scope == "non_contacts":
                # Telegram's spam limit counts messages to people who are not the account's contacts.
                if not chat.kind.is_user or chat.id == account.id or self.is_contact(account.id, chat.id):
                    continue
                key = f"{limit_id}:{account.id}"
            else:
                key = f"{limit_id}:{account.id}" if scope == "account" else f"{limit_id}:{account.id}:{chat.id}"
            row = self.conn.execute("SELECT tokens, updated FROM flood_buckets WHERE key = ?", (key,)).fetchone()
            tokens = burst if row is None else min(burst, row[0] + (now - row[1]) * rate)
            if tokens < 1.0:
                if scope == "non_contacts":
                    spam_limited = True
                else:
                    wait = max(wait, (1.0 - tokens) / rate if rate > 0 else 3600.0)
            updates.append((key, tokens))
        if spam_limited:
            raise RpcFailure(400, "PEER_FLOOD")
        if wait > 0:
            raise RpcFailure(420, f"FLOOD_WAIT_{max(1, math.ceil(wait))}")
        self.conn.executemany(
            "INSERT INTO flood_buckets (key, tokens, updated) VALUES (?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated",
            [(key, tokens - 1.0, now) for key, tokens in updates],
        )

    # ------------------------------------------------------------ callbacks

    def create_callback(self, user: Peer, chat: Peer, user_msg_id: int, data: bytes | None) -> int:
        """A user presses an inline button: push ``UpdateBotCallbackQuery`` to the bot.

        Args:
            user: Who presses.
            chat: The chat holding the message, as the user sees it (the bot for a private chat).
            user_msg_id: The message id in the user's view.
            data: The button's callback data.

        Returns:
            The query id.

        Raises:
            RpcFailure: MESSAGE_ID_INVALID when there is no such message with buttons, DATA_INVALID
                when no button carries ``data``.
        """
        view_box = chat.id if chat.kind.is_channel else user.id
        row = self.message_row(view_box, user_msg_id)
        if row is None or row[13] or row[2] != chat.id:
            raise RpcFailure(400, "MESSAGE_ID_INVALID")
        message = parse_tl(row[14])
        buttons = buttons_of(message.reply_markup)
        if not buttons:
            raise RpcFailure(400, "MESSAGE_ID_INVALID")
        if data is None:
            data = buttons[0][1]
        if all(b[1] != data for b in buttons):
            raise RpcFailure(400, "DATA_INVALID")
        bot = self.peer(row[3])
        if bot is None or bot.kind is not PeerKind.BOT:
            raise RpcFailure(400, "BOT_RESPONSE_TIMEOUT")
        if chat.kind.is_channel:
            bot_msg_id = user_msg_id
        else:
            found = self.conn.execute(
                "SELECT id FROM messages WHERE box = ? AND origin = ?", (bot.id, row[10])
            ).fetchone()
            bot_msg_id = found[0] if found else user_msg_id
        query_id = rand63()
        peer = types.PeerUser(user.id) if chat.kind.is_user else peer_tl(chat)
        chat_instance = int.from_bytes(hashlib.sha256(f"{bot.id}:{chat.id}".encode()).digest()[:7], "big")
        self.conn.execute(
            "INSERT INTO callbacks (query_id, bot_id, user_id, chat_id, user_msg_id, bot_msg_id, data, created)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (query_id, bot.id, user.id, chat.id, user_msg_id, bot_msg_id, data, self.clock()),
        )
        update = types.UpdateBotCallbackQuery(
            query_id=query_id, user_id=user.id, peer=peer, msg_id=bot_msg_id, chat_instance=chat_instance, data=data
        )
        entity_ids = [user.id] + ([] if chat.kind.is_user else [chat.id])
        self.add_event(bot.id, update=update, pts=None, pts_count=0, entity_ids=entity_ids, pushed=True,
                       origin_key=None)
        return query_id

    def callback_answer(self, query_id: int) -> tuple | None:
        """(answered, message, alert, url, user_id, bot_id) of a callback query, or None."""
        return self.conn.execute(
            "SELECT answered, answer_message, answer_alert, answer_url, user_id, bot_id FROM callbacks WHERE query_id = ?",
            (query_id,),
        ).fetchone()


def new_auth_key() -> bytes:
    """A fresh 256-byte authorization key."""
    return random.randbytes(256)
