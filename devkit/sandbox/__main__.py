"""Command line for the Telegram sandbox: ``python -m devkit.sandbox --help``.

Everything acts on the world in ``--dir`` (default: ``SANDBOX_DIR``, else
``<DATA_DIR>/sandbox``), the same file running bots use, so a message sent
here reaches a running worker within a fraction of a second.

Exit codes: 0 done, 1 a failure (a bot did not answer a button in time),
2 bad usage or a request the sandbox refused (unknown peer, bad fault...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from shared.cli import ArgumentParser

from . import default_sandbox_dir
from ._faults import AfterLoss, FaultKind
from ._media import ImageKind
from ._store import PeerKind, SandboxError, WorldMessage
from ._world import World


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="./start.sh sandbox",
        description="Drive the local Telegram sandbox world that bots use in sandbox mode.",
        epilog="Example: ./start.sh sandbox inbox alice. Manual: docs/sandbox.md",
    )
    parser.add_argument("--dir", type=Path, default=None,
                        help="world directory (default: SANDBOX_DIR or <DATA_DIR>/sandbox)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("seed", help="create the demo accounts, contacts, channel and bots (idempotent)")
    status = sub.add_parser("status", help="counts of peers, messages and active faults")
    status.add_argument("--json", action="store_true")
    peers = sub.add_parser("peers", help="list users, bots, groups and channels")
    peers.add_argument("--kind", choices=[k.value for k in PeerKind])
    peers.add_argument("--json", action="store_true")

    create = sub.add_parser("create", help="create a user, bot, group or channel")
    create_sub = create.add_subparsers(dest="what", required=True)
    user = create_sub.add_parser("user", help="a user (an account when it has a phone)")
    user.add_argument("username")
    user.add_argument("--phone")
    user.add_argument("--name", help="first name")
    user.add_argument("--login-required", action="store_true", help="clients must sign in with code 12345")
    bot = create_sub.add_parser("bot", help="a bot account")
    bot.add_argument("username")
    bot.add_argument("--token")
    channel = create_sub.add_parser("channel", help="a broadcast channel (or --megagroup)")
    channel.add_argument("title")
    channel.add_argument("--username")
    channel.add_argument("--creator")
    channel.add_argument("--member", action="append", default=[])
    channel.add_argument("--admin", action="append", default=[])
    channel.add_argument("--megagroup", action="store_true")
    group = create_sub.add_parser("group", help="a basic group")
    group.add_argument("title")
    group.add_argument("--creator")
    group.add_argument("--member", action="append", default=[])

    send = sub.add_parser("send", help="send a message from a sandbox user to an account, user, group or channel")
    send.add_argument("sender", metavar="FROM")
    send.add_argument("to", metavar="TO")
    send.add_argument("text", nargs="?", default="")
    send.add_argument("--gap", action="store_true", help="store it but never push the update")
    send.add_argument("--reply-to", type=int, help="message id (in the sender's view) to reply to")
    send.add_argument("--image", choices=[k.value for k in ImageKind])
    send.add_argument("--button", action="append", default=[], metavar="TEXT[=DATA]",
                      help="add an inline callback button")

    inbox = sub.add_parser("inbox", help="what a peer received (duplicates visible)")
    inbox.add_argument("peer")
    inbox.add_argument("--from", dest="sender")
    inbox.add_argument("--limit", type=int, default=0, help="only the last N")
    inbox.add_argument("--json", action="store_true")

    post = sub.add_parser("post", help="post a text, image or document to a channel")
    post.add_argument("channel")
    source = post.add_mutually_exclusive_group()
    source.add_argument("--image", choices=[k.value for k in ImageKind], help="a generated image kind")
    source.add_argument("--file", type=Path, help="post this file's bytes")
    post.add_argument("--caption", "--text", dest="text", default="")
    kind = post.add_mutually_exclusive_group()
    kind.add_argument("--document", action="store_true", help="post as a document")
    kind.add_argument("--photo", action="store_true", help="post as a compressed photo")
    post.add_argument("--gap", action="store_true", help="store it but never push the update")
    post.add_argument("--author", help="who posts (default: the channel's creator)")

    press = sub.add_parser("press", help="press an inline button as a user; the bot gets a CallbackQuery")
    press.add_argument("user")
    press.add_argument("--chat", help="the bot (private chat), group or channel holding the message")
    press.add_argument("--message", type=int, help="message id in the user's view (default: latest with buttons)")
    which = press.add_mutually_exclusive_group()
    which.add_argument("--data", help="the button's callback data")
    which.add_argument("--button", help="the button's label")
    press.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the bot's answer")

    fault = sub.add_parser("fault", help="set, list and clear faults")
    fault_sub = fault.add_subparsers(dest="action", required=True)
    fault_set = fault_sub.add_parser("set", help="add a fault rule")
    fault_set.add_argument("kind", choices=[k.value for k in FaultKind])
    fault_set.add_argument("--method", default="*", help="SendMessage, send*, connect, ... (default: * = all but connect)")
    fault_set.add_argument("--peer")
    fault_set.add_argument("--account")
    fault_set.add_argument("--count", type=int, help="how many requests it hits (default: until cleared)")
    fault_set.add_argument("--ms", type=float, default=0.0, help="latency in milliseconds")
    fault_set.add_argument("--jitter-ms", type=float, default=0.0)
    fault_set.add_argument("--error", help="RPC error (RPC_CALL_FAIL) or Telethon class (ChatWriteForbiddenError)")
    fault_set.add_argument("--seconds", type=int, default=0, help="flood wait seconds")
    fault_set.add_argument("--then", choices=[a.value for a in AfterLoss], default=AfterLoss.HANG.value,
                           help="answer_lost: hang or drop after storing")
    fault_list = fault_sub.add_parser("list", help="list fault rules")
    fault_list.add_argument("--json", action="store_true")
    fault_clear = fault_sub.add_parser("clear", help="remove one rule (ID) or all")
    fault_clear.add_argument("id", type=int, nargs="?")

    flood = sub.add_parser("flood", help="flood limits on sends (token buckets)")
    flood_sub = flood.add_subparsers(dest="action", required=True)
    flood_set = flood_sub.add_parser("set")
    flood_set.add_argument("scope", choices=["account", "chat", "non_contacts"],
                           help="account: any chat (FLOOD_WAIT); chat: one chat (FLOOD_WAIT); non_contacts: PEER_FLOOD")
    flood_set.add_argument("--rate", type=float, required=True, help="messages per second")
    flood_set.add_argument("--burst", type=float, default=1.0)
    flood_set.add_argument("--account")
    flood_sub.add_parser("clear")

    session = sub.add_parser("session", help="print a StringSession logged into an account")
    session.add_argument("account")
    logout = sub.add_parser("logout", help="kill an account's sessions (its clients need a new login)")
    logout.add_argument("account")
    logout.add_argument("--error", default="AUTH_KEY_UNREGISTERED",
                        help="what its clients get: AUTH_KEY_UNREGISTERED, SESSION_REVOKED, AUTH_KEY_DUPLICATED...")
    block = sub.add_parser("block", help="USER blocks BLOCKED (sends from BLOCKED fail with USER_IS_BLOCKED)")
    block.add_argument("user")
    block.add_argument("blocked")
    unblock = sub.add_parser("unblock", help="undo block")
    unblock.add_argument("user")
    unblock.add_argument("blocked")
    reset = sub.add_parser("reset", help="empty the world")
    reset.add_argument("--yes", action="store_true", help="really do it")
    return parser


def _message_line(message: WorldMessage, duplicate: bool) -> str:
    """One message as a person reads it: the text as written, its further lines indented under the first."""
    parts = [f"#{message.id}", message.date.strftime("%Y-%m-%d %H:%M:%S"), f"{message.sender}:"]
    if message.text:
        parts.append(message.text.replace("\r\n", "\n").replace("\n", "\n    "))
    elif not message.media:
        parts.append("(no text)")
    if message.media:
        media = message.media
        size = f" {media.width}x{media.height}" if media.width else ""
        parts.append(f"[{media.kind} {media.mime_type}{size} {media.size} B{' ' + media.label if media.label else ''}]")
    if message.reply_to:
        parts.append(f"(reply to #{message.reply_to})")
    if message.buttons:
        parts.append("buttons=" + ",".join(text for text, _ in message.buttons))
    if message.edited:
        parts.append("(edited)")
    if message.deleted:
        parts.append("(deleted)")
    if duplicate:
        parts.append("DUPLICATE")
    return " ".join(parts)


def _buttons(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        text, _, data = spec.partition("=")
        out.append((text, data or text))
    return out


def run(args: argparse.Namespace) -> int:
    """Execute a parsed command; returns the exit code."""
    world = World(args.dir or default_sandbox_dir())
    try:
        return _dispatch(world, args)
    finally:
        world.close()


def _dispatch(world: World, args: argparse.Namespace) -> int:  # noqa: C901 - a flat command switch
    out = sys.stdout
    command = args.command
    if command == "seed":
        demo = world.seed_demo()
        out.write(f"demo world ready in {world.directory}\n")
        for account in demo.accounts:
            out.write(f"  account {account.ref} phone +{account.phone} (login code {world.login_code})\n")
        out.write(f"  contacts {', '.join(c.ref for c in demo.contacts)}\n")
        out.write(f"  channel {demo.channel.ref}; operator chat {demo.operators.title!r} ({demo.operators.id})\n")
        out.write(f"  bots {demo.alert_bot.ref} token {demo.alert_bot.bot_token}, "
                  f"{demo.reply_bot.ref} token {demo.reply_bot.bot_token}\n")
    elif command == "status":
        summary = world.summary()
        out.write(json.dumps(summary, indent=2 if not args.json else None, sort_keys=True) + "\n")
    elif command == "peers":
        peers = world.peers(args.kind)
        if args.json:
            out.write(json.dumps([{"id": p.id, "kind": p.kind.value, "ref": p.ref, "name": p.name,
                                   "username": p.username, "phone": p.phone, "bot_token": p.bot_token}
                                  for p in peers]) + "\n")
        else:
            for p in peers:
                extra = f" phone=+{p.phone}" if p.phone else ""
                extra += f" token={p.bot_token}" if p.bot_token else ""
                out.write(f"{p.id:>10} {p.kind.value:<9} {p.ref:<24} {p.name}{extra}\n")
    elif command == "create":
        if args.what == "user":
            peer = world.create_user(args.username, phone=args.phone, first_name=args.name,
                                     login_required=args.login_required)
        elif args.what == "bot":
            peer = world.create_bot(args.username, token=args.token)
        elif args.what == "channel":
            peer = world.create_channel(args.title, username=args.username, creator=args.creator,
                                        members=args.member, admins=args.admin, megagroup=args.megagroup)
        else:
            peer = world.create_group(args.title, args.member, creator=args.creator)
        out.write(f"created {peer.kind.value} {peer.ref} id={peer.id}"
                  + (f" token={peer.bot_token}" if peer.bot_token else "") + "\n")
    elif command == "send":
        message = world.send_incoming(args.sender, args.to, args.text, gap=args.gap, reply_to=args.reply_to,
                                      image=args.image, buttons=_buttons(args.button) or None)
        out.write(f"sent #{message.id} to {args.to}{' (gap: not pushed)' if args.gap else ''}\n")
    elif command == "inbox":
        messages = world.received(args.peer, sender=args.sender)
        if args.limit > 0:
            messages = messages[-args.limit:]
        if args.json:
            out.write(json.dumps([m.to_dict() for m in messages]) + "\n")
        else:
            seen: Counter[tuple[int, str, str | None]] = Counter()
            for message in messages:
                key = (message.sender_id, message.text, message.media.label if message.media else None)
                seen[key] += 1
                out.write(_message_line(message, seen[key] > 1) + "\n")
            if not messages:
                out.write("(nothing received)\n")
    elif command == "post":
        as_document = True if args.document else False if args.photo else None
        image: ImageKind | bytes | None = ImageKind(args.image) if args.image else None
        file_name = None
        if args.file:
            image = args.file.read_bytes()
            file_name = args.file.name
        message = world.post_to_channel(args.channel, image, text=args.text, gap=args.gap,
                                        as_document=as_document, file_name=file_name, author=args.author)
        media = f" with {message.media.kind} {message.media.mime_type} {message.media.size} B" if message.media else ""
        out.write(f"posted #{message.id} to {args.channel}{media}\n")
    elif command == "press":
        query_id = world.press(args.user, chat=args.chat, message_id=args.message, data=args.data, text=args.button)
        out.write(f"pressed: callback query {query_id}\n")
        deadline = time.monotonic() + max(0.0, args.wait)
        answer = world.callback_answer(query_id)
        while args.wait > 0 and not (answer and answer.answered) and time.monotonic() < deadline:
            time.sleep(0.1)
            answer = world.callback_answer(query_id)
        if answer and answer.answered:
            out.write(f"bot answered: {answer.message!r}{' (alert)' if answer.alert else ''}"
                      f"{' url=' + answer.url if answer.url else ''}\n")
        elif args.wait > 0:
            out.write("no answer from the bot\n")
            return 1
    elif command == "fault":
        if args.action == "set":
            rule = world.set_fault(args.kind, method=args.method, peer=args.peer, account=args.account,
                                   count=args.count, ms=args.ms, jitter_ms=args.jitter_ms, error=args.error,
                                   seconds=args.seconds, then=args.then)
            times = "" if rule.remaining is None else f" ({rule.remaining} times)"
            out.write(f"fault {rule.id} set: {rule.kind.value} on {rule.method}{times}\n")
        elif args.action == "list":
            rules = world.faults()
            if args.json:
                out.write(json.dumps(rules) + "\n")
            elif not rules:
                out.write("(no faults)\n")
            else:
                for rule in rules:
                    out.write(" ".join(f"{k}={v}" for k, v in rule.items() if v not in (None, 0, 0.0, "")) + "\n")
        else:
            removed = world.clear_faults(args.id)
            out.write(f"removed {removed} fault(s)\n")
    elif command == "flood":
        if args.action == "set":
            limit_id = world.set_flood_limit(args.scope, rate=args.rate, burst=args.burst, account=args.account)
            out.write(f"flood limit {limit_id} set\n")
        else:
            world.clear_flood_limits()
            out.write("flood limits cleared\n")
    elif command == "session":
        out.write(world.session_string(args.account) + "\n")
    elif command == "logout":
        killed = world.logout(args.account, error=args.error)
        out.write(f"killed {killed} session(s); new clients must sign in (code {world.login_code})\n")
    elif command == "block":
        world.block(args.user, args.blocked)
        out.write(f"{args.user} blocked {args.blocked}\n")
    elif command == "unblock":
        world.unblock(args.user, args.blocked)
        out.write(f"{args.user} unblocked {args.blocked}\n")
    elif command == "reset":
        if not args.yes:
            sys.stderr.write("sandbox: reset empties the whole world; repeat with --yes\n")
            return 2
        world.reset()
        out.write(f"world in {world.directory} reset\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (errors end as one line, see shared.cli)."""
    from shared.cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    # A SandboxError (unknown peer, bad fault ...) is bad input: shared.cli says it in one line, exit 2.
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
