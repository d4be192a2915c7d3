"""The sandbox's Telegram server: answers the TL requests Telethon makes.

``handle`` takes a real Telethon request object and returns what Telegram
would return (a TL object, a list, a bool) or raises ``RpcFailure`` with the
error code and message Telegram would send. It runs inside one world
transaction; the client side turns the answer into bytes and back, so the
caller receives objects parsed exactly like production ones.
"""

from __future__ import annotations

import datetime as dt
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from telethon.tl import functions, types

from . import _faults
from ._store import (
    CAPTION_LIMIT,
    DC_ID,
    LOGIN_CODE,
    TEXT_LIMIT,
    Peer,
    PeerKind,
    RpcFailure,
    Store,
    now_dt,
    parse_tl,
    peer_tl,
    utf16_len,
    view_hash,
)

logger = logging.getLogger(__name__)

DIFFERENCE_LIMIT = 1000
"""Most updates one ``GetDifference`` answer carries (then a slice)."""
TOO_LONG_PTS = 100_000
"""Default: a state this many pts behind is answered differenceTooLong (``World.set_difference_limits``)."""
TOO_LONG_SECONDS = 7 * 24 * 3600.0
"""Default: a state older than this is answered differenceTooLong."""
DIALOGS_PAGE_LIMIT = 100
"""Most dialogs one ``GetDialogs`` answer carries, as on Telegram."""


@dataclass
class Caller:
    """Who makes a request: the client's auth key and the account it is logged into."""

    key_id: int
    account_id: int | None
    revoked: str | None = None


@dataclass(frozen=True)
class AwaitCallback:
    """Answer to ``GetBotCallbackAnswer``: the client waits for the bot to answer this query."""

    query_id: int


_WRAPPERS = (
    functions.InvokeWithLayerRequest,
    functions.InitConnectionRequest,
    functions.InvokeWithoutUpdatesRequest,
    functions.InvokeAfterMsgRequest,
    functions.InvokeWithTakeoutRequest,
)

_NO_AUTH = {
    functions.help.GetConfigRequest,
    functions.help.GetNearestDcRequest,
    functions.PingRequest,
    functions.auth.SendCodeRequest,
    functions.auth.SignInRequest,
    functions.auth.ImportBotAuthorizationRequest,
    functions.auth.LogOutRequest,
}

_BOT_FORBIDDEN = {
    functions.messages.GetHistoryRequest,
    functions.messages.SearchRequest,
    functions.messages.GetDialogsRequest,
    functions.contacts.GetContactsRequest,
    functions.contacts.ResolvePhoneRequest,
    functions.messages.GetBotCallbackAnswerRequest,
}


def unwrap(request: object) -> object:
    """The innermost query of wrapper requests (InvokeWithLayer, InitConnection...)."""
    while isinstance(request, _WRAPPERS):
        request = request.query
    return request


def method_name(request: object) -> str:
    """Normalised method name of a request, for fault matching (``sendmessage``)."""
    return _faults.normalize_method(type(unwrap(request)).__name__)


def encode_result(result: object) -> bytes:
    """Serialize an answer the way Telegram puts it on the wire."""
    if isinstance(result, bool):
        return struct.pack("<I", 0x997275B5 if result else 0xBC799737)
    if isinstance(result, list):
        return struct.pack("<Ii", 0x1CB5C415, len(result)) + b"".join(encode_result(x) for x in result)
    if isinstance(result, int):
        return struct.pack("<q", result)
    return bytes(result)  # type: ignore[arg-type]


def _config() -> types.Config:
    now = dt.datetime.now(tz=dt.timezone.utc).replace(microsecond=0)
    return types.Config(
        date=now,
        expires=now + dt.timedelta(hours=1),
        test_mode=False,
        this_dc=DC_ID,
        dc_options=[types.DcOption(id=DC_ID, ip_address="127.0.0.1", port=443)],
        dc_txt_domain_name="sandbox.invalid",
        chat_size_max=200,
        megagroup_size_max=200000,
        forwarded_count_max=100,
        online_update_period_ms=210000,
        offline_blur_timeout_ms=5000,
        offline_idle_timeout_ms=30000,
        online_cloud_timeout_ms=300000,
        notify_cloud_delay_ms=30000,
        notify_default_delay_ms=1500,
        push_chat_period_ms=60000,
        push_chat_limit=2,
        edit_time_limit=172800,
        revoke_time_limit=2147483647,
        revoke_pm_time_limit=2147483647,
        rating_e_decay=2419200,
        stickers_recent_limit=200,
        channels_read_media_period=604800,
        call_receive_timeout_ms=20000,
        call_ring_timeout_ms=90000,
        call_connect_timeout_ms=30000,
        call_packet_timeout_ms=10000,
        me_url_prefix="https://t.me/",
        caption_length_max=CAPTION_LIMIT,
        message_length_max=TEXT_LIMIT,
        webfile_dc_id=DC_ID,
    )


class Server:
    """Answers requests for one caller inside one transaction.

    Args:
        store: The world store (inside an open transaction).
        caller: The requesting client's key and account.
        bind_key: Called with (key_id, account_id) when a login succeeds.
    """

    _HANDLERS: dict[type, str] = {
        functions.auth.SendCodeRequest: "send_code",
        functions.auth.SignInRequest: "sign_in",
        functions.auth.ImportBotAuthorizationRequest: "import_bot_authorization",
        functions.auth.LogOutRequest: "log_out",
        functions.users.GetUsersRequest: "get_users",
        functions.users.GetFullUserRequest: "get_full_user",
        functions.updates.GetStateRequest: "get_state",
        functions.updates.GetDifferenceRequest: "get_difference",
        functions.updates.GetChannelDifferenceRequest: "get_channel_difference",
        functions.contacts.ResolveUsernameRequest: "resolve_username",
        functions.contacts.ResolvePhoneRequest: "resolve_phone",
        functions.contacts.GetContactsRequest: "get_contacts",
        functions.messages.GetChatsRequest: "get_chats",
        functions.channels.GetChannelsRequest: "get_channels",
        functions.messages.SendMessageRequest: "send_message",
        functions.messages.SendMediaRequest: "send_media",
        functions.messages.EditMessageRequest: "edit_message",
        functions.messages.DeleteMessagesRequest: "delete_messages",
        functions.channels.DeleteMessagesRequest: "delete_channel_messages",
        functions.messages.GetHistoryRequest: "get_history",
        functions.messages.SearchRequest: "search",
        functions.messages.GetMessagesRequest: "get_messages",
        functions.channels.GetMessagesRequest: "get_channel_messages",
        functions.messages.ReadHistoryRequest: "read_history",
        functions.messages.GetDialogsRequest: "get_dialogs",
        functions.messages.GetBotCallbackAnswerRequest: "get_bot_callback_answer",
        functions.messages.SetBotCallbackAnswerRequest: "set_bot_callback_answer",
        functions.upload.SaveFilePartRequest: "save_file_part",
        functions.upload.SaveBigFilePartRequest: "save_file_part",
        functions.upload.GetFileRequest: "get_file",
        functions.help.GetConfigRequest: "get_config",
        functions.help.GetNearestDcRequest: "get_nearest_dc",
        functions.PingRequest: "ping",
        functions.channels.ReadHistoryRequest: "read_channel_history",
        functions.messages.SetTypingRequest: "ok",
        functions.account.UpdateStatusRequest: "ok",
        functions.bots.SetBotCommandsRequest: "ok",
    }

    def __init__(self, store: Store, caller: Caller, *, bind_key: Callable[[int, int | None], None]) -> None:
        self.store = store
        self.caller = caller
        self.bind_key = bind_key

    # ------------------------------------------------------------ dispatch

    def handle(self, request: object) -> object:
        """Answer one request.

        Raises:
            RpcFailure: As Telegram would fail this request.
        """
        inner = unwrap(request)
        kind = type(inner)
        name = self._HANDLERS.get(kind)
        if kind not in _NO_AUTH:
            self.require_account()
            if kind in _BOT_FORBIDDEN and self.me().kind is PeerKind.BOT:
                raise RpcFailure(400, "BOT_METHOD_INVALID")
        if name is None:
            logger.warning("sandbox does not implement %s; answering INPUT_METHOD_INVALID", kind.__name__)
            raise RpcFailure(400, f"INPUT_METHOD_INVALID_{inner.CONSTRUCTOR_ID:08X}")  # type: ignore[attr-defined]
        return getattr(self, name)(inner)

    # ----------------------------------------------------------- trivial

    def get_config(self, request: object) -> types.Config:
        return _config()

    def get_nearest_dc(self, request: object) -> types.NearestDc:
        return types.NearestDc(country="ZZ", this_dc=DC_ID, nearest_dc=DC_ID)

    def ping(self, request: functions.PingRequest) -> types.Pong:
        return types.Pong(msg_id=0, ping_id=request.ping_id)

    def ok(self, request: object) -> bool:
        return True

    def read_channel_history(self, request: functions.channels.ReadHistoryRequest) -> bool:
        self.input_channel(request.channel)
        return True

    def require_account(self) -> Peer:
        if self.caller.revoked:
            message = self.caller.revoked
            raise RpcFailure(_faults.error_code_for(message), message)
        if self.caller.account_id is None:
            raise RpcFailure(401, "AUTH_KEY_UNREGISTERED")
        account = self.store.peer(self.caller.account_id)
        if account is None:
            raise RpcFailure(401, "AUTH_KEY_UNREGISTERED")
        if account.deactivated:
            raise RpcFailure(401, "USER_DEACTIVATED_BAN")
        return account

    def me(self) -> Peer:
        return self.require_account()

    # ------------------------------------------------------------- peers

    def input_peer(self, peer: object) -> Peer:
        """Resolve an InputPeer (or InputUser/InputChannel) to a world peer, as strictly as Telegram.

        A user or channel must come with the access hash Telegram gave the
        caller for it (hashes are per account). An access hash of 0 is taken
        only where Telegram takes it: for the caller itself, for a user in
        the caller's contacts, and from bots (which may address users and
        channels they know by id alone).

        Raises:
            RpcFailure: PEER_ID_INVALID, CHANNEL_INVALID or CHAT_ID_INVALID.
        """
        store = self.store
        if isinstance(peer, (types.InputPeerSelf, types.InputUserSelf)):
            return self.me()
        if isinstance(peer, (types.InputPeerUserFromMessage, types.InputUserFromMessage,
                             types.InputPeerChannelFromMessage)):
            # Valid when the caller can see the chat the message is in (the hash comes from there).
            self.input_peer(peer.peer)
            wanted = getattr(peer, "user_id", None) or getattr(peer, "channel_id", None)
            found = store.peer(wanted) if wanted else None
            if found is None:
                raise RpcFailure(400, "PEER_ID_INVALID" if hasattr(peer, "user_id") else "CHANNEL_INVALID")
            return found
        if isinstance(peer, (types.InputPeerUser, types.InputUser)):
            found = store.peer(peer.user_id)
            if found is None or not found.kind.is_user or not self._hash_ok(found, peer.access_hash):
                raise RpcFailure(400, "PEER_ID_INVALID")
            return found
        if isinstance(peer, types.InputPeerChat):
            found = store.peer(peer.chat_id)
            if found is None or found.kind is not PeerKind.GROUP:
                raise RpcFailure(400, "CHAT_ID_INVALID")
            return found
        if isinstance(peer, (types.InputPeerChannel, types.InputChannel)):
            found = store.peer(peer.channel_id)
            if found is None or not found.kind.is_channel or not self._hash_ok(found, peer.access_hash):
                raise RpcFailure(400, "CHANNEL_INVALID")
            return found
        raise RpcFailure(400, "PEER_ID_INVALID")

    def _hash_ok(self, found: Peer, access_hash: int) -> bool:
        viewer = self.caller.account_id
        if access_hash == view_hash(found.access_hash, viewer):
            return True
        if access_hash != 0 or viewer is None:
            return False
        if found.id == viewer:
            return True
        me = self.store.peer(viewer)
        if me is not None and me.kind is PeerKind.BOT:
            return True
        return found.kind.is_user and self.store.is_contact(viewer, found.id)

    def input_channel(self, channel: object) -> Peer:
        peer = self.input_peer(channel)
        if not peer.kind.is_channel:
            raise RpcFailure(400, "CHANNEL_INVALID")
        return peer

    def entities(self, ids: list[int]) -> tuple[list, list]:
        return self.store.entities_tl(ids, self.caller.account_id)

    # -------------------------------------------------------------- auth

    def send_code(self, request: functions.auth.SendCodeRequest) -> types.auth.SentCode:
        if self.store.peer_by_phone(request.phone_number) is None:
            raise RpcFailure(400, "PHONE_NUMBER_INVALID")
        return types.auth.SentCode(type=types.auth.SentCodeTypeApp(length=len(LOGIN_CODE)), phone_code_hash="sandbox")

    def sign_in(self, request: functions.auth.SignInRequest) -> types.auth.Authorization:
        account = self.store.peer_by_phone(request.phone_number)
        if account is None:
            raise RpcFailure(400, "PHONE_NUMBER_UNOCCUPIED")
        if request.phone_code != LOGIN_CODE:
            raise RpcFailure(400, "PHONE_CODE_INVALID")
        if account.deactivated:
            raise RpcFailure(400, "PHONE_NUMBER_BANNED")
        self.store.update_peer(account, login_required=0)
        self.bind_key(self.caller.key_id, account.id)
        return types.auth.Authorization(user=self.store.user_tl(account, account.id))

    def import_bot_authorization(self, request: functions.auth.ImportBotAuthorizationRequest) -> types.auth.Authorization:
        bot = self.store.peer_by_token(request.bot_auth_token)
        if bot is None:
            raise RpcFailure(400, "ACCESS_TOKEN_INVALID")
        self.store.update_peer(bot, login_required=0)
        self.bind_key(self.caller.key_id, bot.id)
        return types.auth.Authorization(user=self.store.user_tl(bot, bot.id))

    def log_out(self, request: object) -> types.auth.LoggedOut:
        self.bind_key(self.caller.key_id, None)
        return types.auth.LoggedOut()

    # ------------------------------------------------------------- users

    def get_users(self, request: functions.users.GetUsersRequest) -> list:
        me = self.me()
        found: list = []
        for item in request.id:
            try:
                peer = self.input_peer(item)
            except RpcFailure:
                found.append(types.UserEmpty(id=getattr(item, "user_id", 0)))
                continue
            found.append(self.store.user_tl(peer, me.id))
        return found

    def get_full_user(self, request: functions.users.GetFullUserRequest) -> types.users.UserFull:
        me = self.me()
        peer = self.input_peer(request.id)
        full = types.UserFull(
            id=peer.id,
            settings=types.PeerSettings(),
            notify_settings=types.PeerNotifySettings(),
            common_chats_count=0,
            blocked=self.store.has_blocked(me.id, peer.id) or None,
            about=peer.about,
        )
        return types.users.UserFull(full_user=full, chats=[], users=[self.store.user_tl(peer, me.id)])

    def resolve_username(self, request: functions.contacts.ResolveUsernameRequest) -> types.contacts.ResolvedPeer:
        peer = self.store.peer_by_username(request.username)
        if peer is None:
            raise RpcFailure(400, "USERNAME_NOT_OCCUPIED")
        users, chats = self.entities([peer.id])
        return types.contacts.ResolvedPeer(peer=peer_tl(peer), chats=chats, users=users)

    def resolve_phone(self, request: functions.contacts.ResolvePhoneRequest) -> types.contacts.ResolvedPeer:
        peer = self.store.peer_by_phone(request.phone)
        if peer is None:
            raise RpcFailure(400, "PHONE_NOT_OCCUPIED")
        users, chats = self.entities([peer.id])
        return types.contacts.ResolvedPeer(peer=peer_tl(peer), chats=chats, users=users)

    def get_contacts(self, request: object) -> types.contacts.Contacts:
        me = self.me()
        ids = [r[0] for r in self.store.conn.execute(
            "SELECT contact_id FROM contacts WHERE owner_id = ? ORDER BY contact_id", (me.id,))]
        contacts = [types.Contact(user_id=i, mutual=self.store.is_contact(i, me.id)) for i in ids]
        users, _ = self.entities(ids)
        return types.contacts.Contacts(contacts=contacts, saved_count=0, users=users)

    def get_chats(self, request: functions.messages.GetChatsRequest) -> types.messages.Chats:
        chats = []
        for chat_id in request.id:
            peer = self.store.peer(chat_id)
            if peer is None or peer.kind is not PeerKind.GROUP:
                raise RpcFailure(400, "CHAT_ID_INVALID")
            chats.append(self.store.chat_tl(peer, self.caller.account_id))
        return types.messages.Chats(chats=chats)

    def get_channels(self, request: functions.channels.GetChannelsRequest) -> types.messages.Chats:
        return types.messages.Chats(
            chats=[self.store.chat_tl(self.input_channel(c), self.caller.account_id) for c in request.id]
        )

    # ----------------------------------------------------------- updates

    def _state(self, me: Peer) -> types.updates.State:
        pts = self.store.conn.execute("SELECT pts FROM peers WHERE id = ?", (me.id,)).fetchone()[0]
        return types.updates.State(pts=pts, qts=0, date=now_dt(self.store.clock()), seq=0, unread_count=0)

    def get_state(self, request: object) -> types.updates.State:
        return self._state(self.me())

    def _too_long(self, current_pts: int, pts: int, date: float | None) -> bool:
        """Whether a client state is too far behind to be brought up to date (Telegram keeps a bounded log)."""
        max_pts = int(self.store.meta("difference_too_long_pts", str(TOO_LONG_PTS)) or TOO_LONG_PTS)
        max_age = float(self.store.meta("difference_too_long_seconds", str(TOO_LONG_SECONDS)) or TOO_LONG_SECONDS)
        if current_pts - pts > max_pts:
            return True
        return date is not None and self.store.clock() - date > max_age

    def get_difference(self, request: functions.updates.GetDifferenceRequest) -> object:
        me = self.me()
        state = self._state(me)
        since_date = request.date.timestamp() if request.date else None
        # A state ahead of the server's (a world reset under a saved session) cannot be brought up to date either.
        if request.pts > state.pts or self._too_long(state.pts, request.pts, since_date):
            # Telegram's answer to a state it can no longer bring up to date: start again from
            # this pts; whatever happened in between must be read from the dialogs.
            return types.updates.DifferenceTooLong(pts=state.pts)
        other_updates: list = []
        # Channels with news since the client's date: tell it to fetch their difference.
        since = request.date.timestamp() if request.date else 0.0
        for channel in self.store.channels_of(me.id):
            row = self.store.conn.execute(
                "SELECT max(date), max(pts) FROM events WHERE box = ? AND date >= ?", (channel.id, since)
            ).fetchone()
            if row and row[0] is not None:
                pts = self.store.conn.execute("SELECT pts FROM peers WHERE id = ?", (channel.id,)).fetchone()[0]
                other_updates.append(types.UpdateChannelTooLong(channel_id=channel.id, pts=pts))
        rows = self.store.conn.execute(
            "SELECT pts, box, pts, pts_count, date, msg_id, entity_ids, payload FROM events"
            " WHERE box = ? AND pts > ? ORDER BY pts LIMIT ?",
            (me.id, request.pts, DIFFERENCE_LIMIT + 1),
        ).fetchall()
        if not rows and not other_updates:
            return types.updates.DifferenceEmpty(date=state.date, seq=0)
        sliced = len(rows) > DIFFERENCE_LIMIT
        rows = rows[:DIFFERENCE_LIMIT]
        new_messages, more_updates, users, chats = self._render(me, rows)
        other_updates += more_updates
        _, channel_chats = self.entities(
            [u.channel_id for u in other_updates if isinstance(u, types.UpdateChannelTooLong)]
        )
        chats += channel_chats
        if sliced:
            intermediate = types.updates.State(pts=rows[-1][0], qts=0, date=state.date, seq=0, unread_count=0)
            return types.updates.DifferenceSlice(
                new_messages=new_messages, new_encrypted_messages=[], other_updates=other_updates,
                chats=chats, users=users, intermediate_state=intermediate,
            )
        return types.updates.Difference(
            new_messages=new_messages, new_encrypted_messages=[], other_updates=other_updates,
            chats=chats, users=users, state=state,
        )

    def _render(self, me: Peer, rows: list[tuple]) -> tuple[list, list, list, list]:
        """(new messages, other updates, users, chats) of events rows (pts, box, pts, pts_count, date, msg_id,
        entity_ids, payload) as ``me`` sees them."""
        new_messages: list = []
        other_updates: list = []
        ids: list[int] = []
        for row in rows:
            _, box, pts, pts_count, _, msg_id, entity_ids, payload = row
            update = self.store.render_update(box, msg_id, pts, pts_count, payload, me.id)
            ids.extend(int(i) for i in entity_ids.split(",") if i)
            if update is None:
                continue
            if isinstance(update, (types.UpdateNewMessage, types.UpdateNewChannelMessage)):
                new_messages.append(update.message)
            else:
                other_updates.append(update)
        users, chats = self.entities(ids)
        return new_messages, other_updates, users, chats

    def get_channel_difference(self, request: functions.updates.GetChannelDifferenceRequest) -> object:
        me = self.me()
        channel = self.input_channel(request.channel)
        if self.store.membership(channel.id, me.id) is None and not channel.username:
            raise RpcFailure(400, "CHANNEL_PRIVATE")
        current = self.store.conn.execute("SELECT pts FROM peers WHERE id = ?", (channel.id,)).fetchone()[0]
        if self._too_long(current, request.pts, None):
            return self._channel_too_long(me, channel, current)
        limit = max(1, min(int(request.limit or 100), 100000))
        rows = self.store.conn.execute(
            "SELECT pts, box, pts, pts_count, date, msg_id, entity_ids, payload FROM events"
            " WHERE box = ? AND pts > ? ORDER BY pts LIMIT ?",
            (channel.id, request.pts, limit + 1),
        ).fetchall()
        if not rows:
            return types.updates.ChannelDifferenceEmpty(pts=current, final=True)
        final = len(rows) <= limit
        rows = rows[:limit]
        new_messages, other_updates, users, chats = self._render(me, rows)
        if not any(getattr(c, "id", None) == channel.id for c in chats):
            chats.append(self.store.chat_tl(channel, me.id))
        return types.updates.ChannelDifference(
            pts=current if final else rows[-1][0], new_messages=new_messages, other_updates=other_updates,
            chats=chats, users=users, final=final or None,
        )

    def _channel_too_long(self, me: Peer, channel: Peer, current: int) -> types.updates.ChannelDifferenceTooLong:
        """channelDifferenceTooLong: the channel's dialog and its latest messages, and a fresh pts."""
        rows = self.store.conn.execute(
            "SELECT id, tl FROM messages WHERE box = ? AND deleted = 0 ORDER BY id DESC LIMIT 20", (channel.id,)
        ).fetchall()
        messages = [parse_tl(tl) for _, tl in rows]
        top = rows[0][0] if rows else 0
        dialog = types.Dialog(
            peer=peer_tl(channel), top_message=top, read_inbox_max_id=top, read_outbox_max_id=top, unread_count=0,
            unread_mentions_count=0, unread_reactions_count=0, unread_poll_votes_count=0,
            notify_settings=types.PeerNotifySettings(), pts=current,
        )
        ids = [channel.id, *(getattr(m.from_id, "user_id", 0) for m in messages)]
        users, chats = self.entities(ids)
        return types.updates.ChannelDifferenceTooLong(
            dialog=dialog, messages=messages, chats=chats, users=users, final=True
        )

    # ---------------------------------------------------------- sending

    def _check_can_send(self, me: Peer, chat: Peer) -> None:
        store = self.store
        if chat.kind.is_user:
            if chat.deactivated:
                raise RpcFailure(400, "INPUT_USER_DEACTIVATED")
            if me.kind is PeerKind.BOT and chat.kind is PeerKind.BOT and chat.id != me.id:
                raise RpcFailure(400, "USER_IS_BOT")
            they_blocked, we_blocked = store.blocking(chat.id, me.id)
            if they_blocked:
                raise RpcFailure(400, "USER_IS_BLOCKED")
            if we_blocked:
                raise RpcFailure(400, "YOU_BLOCKED_USER")
            return
        member = store.membership(chat.id, me.id)
        if chat.kind.is_channel and member is None and not chat.username:
            raise RpcFailure(400, "CHANNEL_PRIVATE")
        if member is None or not member[1]:
            raise RpcFailure(403, "CHAT_WRITE_FORBIDDEN")
        if chat.kind is PeerKind.CHANNEL and member[0] not in ("creator", "admin"):
            raise RpcFailure(403, "CHAT_WRITE_FORBIDDEN")

    def _reply_to(self, reply_to: object) -> int | None:
        return getattr(reply_to, "reply_to_msg_id", None)

    def _sent_updates(self, me: Peer, chat: Peer, own, random_id: int | None, *, edit: bool = False) -> types.Updates:
        message = own.message
        message.out = True
        if chat.kind.is_channel:
            update = (types.UpdateEditChannelMessage if edit else types.UpdateNewChannelMessage)(
                message=message, pts=own.pts, pts_count=1)
        else:
            update = (types.UpdateEditMessage if edit else types.UpdateNewMessage)(
                message=message, pts=own.pts, pts_count=1)
        items: list = [] if edit else [types.UpdateMessageID(id=own.id, random_id=random_id)]
        items.append(update)
        users, chats = self.entities([me.id, chat.id])
        return types.Updates(updates=items, users=users, chats=chats, date=message.date, seq=0)

    def send_message(self, request: functions.messages.SendMessageRequest) -> object:
        me = self.me()
        chat = self.input_peer(request.peer)
        self._check_can_send(me, chat)
        text = request.message or ""
        if not text.strip():
            raise RpcFailure(400, "MESSAGE_EMPTY")
        if utf16_len(text) > TEXT_LIMIT:
            raise RpcFailure(400, "MESSAGE_TOO_LONG")
        self.store.check_random_id(me, chat, request.random_id)
        self.store.check_flood(me, chat)
        copies = self.store.send_message(
            me, chat, text=text, entities=request.entities, reply_to=self._reply_to(request.reply_to),
            reply_markup=request.reply_markup if me.kind is PeerKind.BOT else None,
            random_id=request.random_id, origin_key=self.caller.key_id, silent=bool(request.silent), checked=True,
        )
        own = copies[0]
        if chat.kind.is_channel:
            return self._sent_updates(me, chat, own, request.random_id)
        return types.UpdateShortSentMessage(
            id=own.id, pts=own.pts, pts_count=1, date=own.message.date, out=True, entities=request.entities
        )

    def _uploaded(self, input_file: object) -> bytes:
        me = self.me()
        rows = self.store.conn.execute(
            "SELECT part, data FROM uploads WHERE account_id = ? AND file_id = ? ORDER BY part",
            (me.id, input_file.id),  # type: ignore[attr-defined]
        ).fetchall()
        expected = input_file.parts  # type: ignore[attr-defined]
        have = {r[0] for r in rows}
        for part in range(expected):
            if part not in have:
                raise RpcFailure(400, f"FILE_PART_{part}_MISSING")
        self.store.conn.execute(
            "DELETE FROM uploads WHERE account_id = ? AND file_id = ?", (me.id, input_file.id)  # type: ignore[attr-defined]
        )
        return b"".join(r[1] for r in rows if r[0] < expected)

    def _input_media(self, media: object) -> tuple[int, object]:
        store = self.store
        if isinstance(media, types.InputMediaUploadedPhoto):
            data = self._uploaded(media.file)
            return store.media_from_bytes(data, as_document=False, mime_type=None, file_name=media.file.name)
        if isinstance(media, types.InputMediaUploadedDocument):
            data = self._uploaded(media.file)
            name = next((a.file_name for a in media.attributes if isinstance(a, types.DocumentAttributeFilename)),
                        media.file.name)
            attributes = [a for a in media.attributes if not isinstance(a, types.DocumentAttributeImageSize)]
            return store.media_from_bytes(data, as_document=True, mime_type=media.mime_type, file_name=name,
                                          attributes=attributes)
        if isinstance(media, (types.InputMediaPhoto, types.InputMediaDocument)):
            item = media.id
            row = store.media_row(getattr(item, "id", 0)) if not isinstance(item, (types.InputPhotoEmpty, types.InputDocumentEmpty)) else None
            if row is None or row[2] != item.access_hash:
                raise RpcFailure(400, "MEDIA_INVALID")
            return row[0], parse_tl(row[11])
        raise RpcFailure(400, "MEDIA_INVALID")

    def send_media(self, request: functions.messages.SendMediaRequest) -> types.Updates:
        me = self.me()
        chat = self.input_peer(request.peer)
        self._check_can_send(me, chat)
        caption = request.message or ""
        if utf16_len(caption) > CAPTION_LIMIT:
            raise RpcFailure(400, "MEDIA_CAPTION_TOO_LONG")
        self.store.check_random_id(me, chat, request.random_id)
        self.store.check_flood(me, chat)
        media_id, media = self._input_media(request.media)
        copies = self.store.send_message(
            me, chat, text=caption, entities=request.entities, media=media, media_id=media_id,
            reply_to=self._reply_to(request.reply_to),
            reply_markup=request.reply_markup if me.kind is PeerKind.BOT else None,
            random_id=request.random_id, origin_key=self.caller.key_id, silent=bool(request.silent), checked=True,
        )
        return self._sent_updates(me, chat, copies[0], request.random_id)

    def edit_message(self, request: functions.messages.EditMessageRequest) -> types.Updates:
        me = self.me()
        chat = self.input_peer(request.peer)
        if request.media is not None:
            raise RpcFailure(400, "MEDIA_INVALID")
        own = self.store.edit_message(
            me, chat, request.id, text=request.message, entities=request.entities,
            reply_markup=request.reply_markup, origin_key=self.caller.key_id,
        )
        return self._sent_updates(me, chat, own, None, edit=True)

    def delete_messages(self, request: functions.messages.DeleteMessagesRequest) -> types.messages.AffectedMessages:
        me = self.me()
        pts, count = self.store.delete_messages(me, list(request.id), revoke=bool(request.revoke), channel=None,
                                                origin_key=self.caller.key_id)
        return types.messages.AffectedMessages(pts=pts, pts_count=count)

    def delete_channel_messages(self, request: functions.channels.DeleteMessagesRequest) -> types.messages.AffectedMessages:
        me = self.me()
        channel = self.input_channel(request.channel)
        member = self.store.membership(channel.id, me.id)
        if member is None:
            raise RpcFailure(400, "CHANNEL_PRIVATE")
        if member[0] == "member":
            for msg_id in request.id:
                row = self.store.message_row(channel.id, msg_id)
                if row is not None and row[3] != me.id:
                    raise RpcFailure(403, "MESSAGE_DELETE_FORBIDDEN")
        pts, count = self.store.delete_messages(me, list(request.id), revoke=True, channel=channel,
                                                origin_key=self.caller.key_id)
        return types.messages.AffectedMessages(pts=pts, pts_count=count)

    # ---------------------------------------------------------- reading

    def _history_box(self, me: Peer, chat: Peer) -> int:
        if chat.kind.is_channel:
            if self.store.membership(chat.id, me.id) is None and not chat.username:
                raise RpcFailure(400, "CHANNEL_PRIVATE")
            return chat.id
        return me.id

    def _messages_result(self, me: Peer, chat: Peer | None, rows: list[tuple], count: int, *, whole: bool) -> object:
        messages = [self.store.message_tl(r[2], me.id, r[1]) for r in rows]
        ids: list[int] = []
        for message in messages:
            ids.append(getattr(message.from_id, "user_id", 0))
            peer = message.peer_id
            ids.append(getattr(peer, "user_id", 0) or getattr(peer, "chat_id", 0) or getattr(peer, "channel_id", 0))
        if chat is not None:
            ids.append(chat.id)
        users, chats = self.entities(ids)
        if chat is not None and chat.kind.is_channel:
            pts = self.store.conn.execute("SELECT pts FROM peers WHERE id = ?", (chat.id,)).fetchone()[0]
            return types.messages.ChannelMessages(pts=pts, count=count, messages=messages, topics=[], chats=chats,
                                                  users=users)
        if whole:
            return types.messages.Messages(messages=messages, topics=[], chats=chats, users=users)
        return types.messages.MessagesSlice(count=count, messages=messages, topics=[], chats=chats, users=users)

    def _window(
        self, me: Peer, chat: Peer, *, where: str, params: tuple, offset_id: int, offset_date: dt.datetime | None,
        add_offset: int, limit: int, max_id: int, min_id: int,
    ) -> object:
        box = self._history_box(me, chat)
        conditions = f"box = ? AND chat_id = ? AND deleted = 0{where}"
        args: tuple = (box, chat.id, *params)
        if max_id:
            conditions += " AND id < ?"
            args += (max_id,)
        if min_id:
            conditions += " AND id > ?"
            args += (min_id,)
        conn = self.store.conn
        count = conn.execute(f"SELECT count(*) FROM messages WHERE {conditions}", args).fetchone()[0]
        if offset_id:
            position = conn.execute(f"SELECT count(*) FROM messages WHERE {conditions} AND id >= ?",
                                    (*args, offset_id)).fetchone()[0]
        elif offset_date:
            position = conn.execute(f"SELECT count(*) FROM messages WHERE {conditions} AND date >= ?",
                                    (*args, int(offset_date.timestamp()))).fetchone()[0]
        else:
            position = 0
        limit = max(0, min(int(limit), 100))
        start = position + add_offset
        end = start + limit
        start = max(0, start)
        rows: list[tuple] = []
        if end > start:
            rows = conn.execute(
                f"SELECT id, sender_id, tl FROM messages WHERE {conditions} ORDER BY id DESC LIMIT ? OFFSET ?",
                (*args, end - start, start),
            ).fetchall()
        whole = not offset_id and not offset_date and not add_offset and not max_id and not min_id and count <= limit
        return self._messages_result(me, chat, rows, count, whole=whole)

    def get_history(self, request: functions.messages.GetHistoryRequest) -> object:
        me = self.me()
        chat = self.input_peer(request.peer)
        return self._window(me, chat, where="", params=(), offset_id=request.offset_id,
                            offset_date=request.offset_date, add_offset=request.add_offset, limit=request.limit,
                            max_id=request.max_id, min_id=request.min_id)

    def search(self, request: functions.messages.SearchRequest) -> object:
        me = self.me()
        if isinstance(request.peer, types.InputPeerEmpty):
            raise RpcFailure(400, "PEER_ID_INVALID")
        chat = self.input_peer(request.peer)
        where = ""
        params: tuple = ()
        if request.q:
            where += " AND instr(lower(text), lower(?)) > 0"
            params += (request.q,)
        if request.from_id is not None:
            where += " AND sender_id = ?"
            params += (self.input_peer(request.from_id).id,)
        flt = request.filter
        if isinstance(flt, types.InputMessagesFilterPhotos):
            where += " AND media_id IN (SELECT id FROM media WHERE kind = 'photo')"
        elif isinstance(flt, types.InputMessagesFilterDocument):
            where += " AND media_id IN (SELECT id FROM media WHERE kind = 'document')"
        elif isinstance(flt, types.InputMessagesFilterPhotoVideo):
            where += " AND media_id IS NOT NULL"
        elif not isinstance(flt, types.InputMessagesFilterEmpty):
            where += " AND 0"
        if request.min_date:
            where += " AND date >= ?"
            params += (int(request.min_date.timestamp()),)
        result = self._window(me, chat, where=where, params=params, offset_id=request.offset_id,
                              offset_date=request.max_date, add_offset=request.add_offset,
                              limit=request.limit or 20, max_id=request.max_id, min_id=request.min_id)
        if isinstance(result, types.messages.Messages):
            return types.messages.MessagesSlice(count=len(result.messages), messages=result.messages, topics=[],
                                                chats=result.chats, users=result.users)
        return result

    def _message_ids(self, items: list) -> list[int]:
        ids = []
        for item in items:
            if isinstance(item, int):
                ids.append(item)
            elif isinstance(item, types.InputMessageID):
                ids.append(item.id)
            else:
                ids.append(0)
        return ids

    def get_messages(self, request: functions.messages.GetMessagesRequest) -> types.messages.Messages:
        me = self.me()
        ids = self._message_ids(request.id)
        return self._by_ids(me, me.id, None, ids)

    def get_channel_messages(self, request: functions.channels.GetMessagesRequest) -> object:
        me = self.me()
        channel = self.input_channel(request.channel)
        box = self._history_box(me, channel)
        ids = self._message_ids(request.id)
        if not any(ids):
            raise RpcFailure(400, "MESSAGE_IDS_EMPTY")
        return self._by_ids(me, box, channel, ids)

    def _by_ids(self, me: Peer, box: int, channel: Peer | None, ids: list[int]) -> object:
        found = {}
        for msg_id in ids:
            row = self.store.conn.execute(
                "SELECT id, sender_id, tl FROM messages WHERE box = ? AND id = ? AND deleted = 0", (box, msg_id)
            ).fetchone()
            if row:
                found[msg_id] = row
        rows = [found[i] for i in ids if i in found]
        result = self._messages_result(me, channel, rows, len(rows), whole=True)
        # Missing ids come back as MessageEmpty, in the requested order.
        messages = {m.id: m for m in result.messages}
        result.messages = [messages.get(i) or types.MessageEmpty(id=i, peer_id=None) for i in ids]
        return result

    def read_history(self, request: functions.messages.ReadHistoryRequest) -> types.messages.AffectedMessages:
        me = self.me()
        self.input_peer(request.peer)
        pts = self.store.conn.execute("SELECT pts FROM peers WHERE id = ?", (me.id,)).fetchone()[0]
        return types.messages.AffectedMessages(pts=pts, pts_count=0)

    def get_dialogs(self, request: functions.messages.GetDialogsRequest) -> types.messages.Dialogs:
        me = self.me()
        conn = self.store.conn
        tops = conn.execute(
            "SELECT chat_id, max(id) FROM messages WHERE box = ? AND deleted = 0 GROUP BY chat_id", (me.id,)
        ).fetchall()
        entries: list[tuple[int, int, int, bytes, int | None]] = []  # (date, chat_id, top id, tl, channel pts)
        for chat_id, top in tops:
            row = conn.execute("SELECT date, tl, sender_id FROM messages WHERE box = ? AND id = ?", (me.id, top)).fetchone()
            entries.append((row[0], chat_id, top, row[1], None))
        for channel in self.store.channels_of(me.id):
            row = conn.execute(
                "SELECT id, date, tl FROM messages WHERE box = ? AND deleted = 0 ORDER BY id DESC LIMIT 1", (channel.id,)
            ).fetchone()
            pts, created = conn.execute("SELECT pts, created FROM peers WHERE id = ?", (channel.id,)).fetchone()
            if row:
                entries.append((row[1], channel.id, row[0], row[2], pts))
            else:  # a joined channel is a dialog even before its first post
                entries.append((created, channel.id, 0, None, pts))
        # Newest first, and one page at a time below the offset (date, message id, peer), as Telegram pages.
        entries.sort(key=lambda e: (int(e[0]), e[2], e[1]), reverse=True)
        total = len(entries)
        if request.offset_date or request.offset_id:
            offset_date = int(request.offset_date.timestamp()) if request.offset_date else 2**31
            offset_peer = request.offset_peer
            offset_peer_id = (getattr(offset_peer, "user_id", None) or getattr(offset_peer, "chat_id", None)
                              or getattr(offset_peer, "channel_id", None) or 0)
            offset = (offset_date, request.offset_id or 2**31, offset_peer_id)
            entries = [e for e in entries if (int(e[0]), e[2], e[1]) < offset]
        limit = max(1, min(int(request.limit or DIALOGS_PAGE_LIMIT), DIALOGS_PAGE_LIMIT))
        sliced = len(entries) > limit
        entries = entries[:limit]
        dialogs = []
        messages = []
        ids: list[int] = []
        for _, chat_id, top, tl, pts in entries:
            chat = self.store.peer(chat_id)
            if chat is None:
                continue
            dialogs.append(types.Dialog(
                peer=peer_tl(chat), top_message=top, read_inbox_max_id=top, read_outbox_max_id=top,
                unread_count=0, unread_mentions_count=0, unread_reactions_count=0, unread_poll_votes_count=0,
                notify_settings=types.PeerNotifySettings(), pts=pts,
            ))
            ids.append(chat_id)
            if tl is None:
                continue
            message = parse_tl(tl)
            messages.append(message)
            ids.append(getattr(message.from_id, "user_id", 0))
        users, chats = self.entities(ids + [me.id])
        if sliced:
            return types.messages.DialogsSlice(count=total, dialogs=dialogs, messages=messages, chats=chats, users=users)
        return types.messages.Dialogs(dialogs=dialogs, messages=messages, chats=chats, users=users)

    # ------------------------------------------------------------- bots

    def get_bot_callback_answer(self, request: functions.messages.GetBotCallbackAnswerRequest) -> AwaitCallback:
        me = self.me()
        chat = self.input_peer(request.peer)
        query_id = self.store.create_callback(me, chat, request.msg_id, request.data)
        return AwaitCallback(query_id)

    def set_bot_callback_answer(self, request: functions.messages.SetBotCallbackAnswerRequest) -> bool:
        me = self.me()
        row = self.store.callback_answer(request.query_id)
        if row is None or row[5] != me.id or row[0]:
            raise RpcFailure(400, "QUERY_ID_INVALID")
        self.store.conn.execute(
            "UPDATE callbacks SET answered = 1, answer_message = ?, answer_alert = ?, answer_url = ? WHERE query_id = ?",
            (request.message, int(bool(request.alert)), request.url, request.query_id),
        )
        return True

    # ------------------------------------------------------------ files

    def save_file_part(self, request: object) -> bool:
        me = self.me()
        data = request.bytes  # type: ignore[attr-defined]
        if len(data) > 512 * 1024:
            raise RpcFailure(400, "FILE_PART_TOO_BIG")
        self.store.conn.execute(
            "INSERT INTO uploads (account_id, file_id, part, data) VALUES (?,?,?,?)"
            " ON CONFLICT (account_id, file_id, part) DO UPDATE SET data = excluded.data",
            (me.id, request.file_id, request.file_part, data),  # type: ignore[attr-defined]
        )
        return True

    def get_file(self, request: functions.upload.GetFileRequest) -> types.upload.File:
        self.me()
        location = request.location
        if not isinstance(location, (types.InputPhotoFileLocation, types.InputDocumentFileLocation)):
            raise RpcFailure(400, "LOCATION_INVALID")
        if request.limit <= 0 or request.limit > 1024 * 1024:
            raise RpcFailure(400, "LIMIT_INVALID")
        if request.offset < 0:
            raise RpcFailure(400, "OFFSET_INVALID")
        data, kind, date = self.store.read_file(location.id, location.access_hash, request.offset, request.limit)
        file_type = types.storage.FileJpeg() if kind == "photo" else types.storage.FileUnknown()
        return types.upload.File(type=file_type, mtime=date, bytes=data)


def request_peer_id(server: Server, request: object) -> int | None:
    """Best-effort id of the peer a request is aimed at (for fault rules)."""
    inner = unwrap(request)
    try:
        if isinstance(inner, functions.contacts.ResolveUsernameRequest):
            peer = server.store.peer_by_username(inner.username)
            return peer.id if peer else None
        for attr in ("peer", "channel"):
            value = getattr(inner, attr, None)
            if value is not None and not isinstance(value, list):
                return server.input_peer(value).id
        if isinstance(inner, functions.users.GetFullUserRequest):
            return server.input_peer(inner.id).id
        if isinstance(inner, functions.upload.GetFileRequest):
            row = server.store.conn.execute(
                "SELECT chat_id FROM messages WHERE media_id = ? LIMIT 1", (inner.location.id,)
            ).fetchone()
            return row[0] if row else None
    except (RpcFailure, AttributeError):
        return None
    return None
