"""The Telegram sandbox: a local, file-backed Telegram for tests, benchmarks and demos.

``World`` is the server side (users, bots, groups, channels, messages,
media, faults, flood limits) kept in one SQLite file so several processes
share it. ``SandboxClient`` is a real ``telethon.TelegramClient`` whose
transport talks to that world, so production code runs unchanged against
it. ``python -m devkit.sandbox`` is the command line for people.

Usage::

    world = World(tmp_path / "sandbox")
    demo = world.seed_demo()
    client = SandboxClient(world, phone=demo.accounts[0].phone, flood_sleep_threshold=0)
    await client.connect()
    await client.send_message("alice", "hi")
    assert world.received("alice")[-1].text == "hi"
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._client import SandboxClient, SandboxSender
from ._faults import AfterLoss, Fault, FaultKind
from ._media import HUGE_DOCUMENT_SIZE, ImageKind
from ._store import (
    CAPTION_LIMIT,
    LOGIN_CODE,
    TEXT_LIMIT,
    MediaInfo,
    Peer,
    PeerKind,
    SandboxError,
    UnknownPeerError,
    WorldMessage,
    utf16_len,
)
from ._world import CallbackAnswer, DemoWorld, World

SANDBOX_BANNER = (
    "*** TELEGRAM SANDBOX MODE: nothing is sent to Telegram. "
    "Messages go to the local sandbox world in {directory}. ***"
)
"""Banner every bot logs at start in sandbox mode (``.format(directory=...)``)."""

STATUS_LINE = "Telegram: SANDBOX (local world at {directory}, no real messages are sent)"
"""One line for human status pages."""


def default_sandbox_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the world lives: ``SANDBOX_DIR``, else ``<DATA_DIR>/sandbox``, else ``./.data/sandbox``."""
    env = os.environ if env is None else env
    if env.get("SANDBOX_DIR"):
        return Path(env["SANDBOX_DIR"]).expanduser()
    return Path(env.get("DATA_DIR") or "./.data").expanduser() / "sandbox"


def banner(directory: str | os.PathLike[str] | None = None) -> str:
    """The sandbox banner for a world directory (default: ``default_sandbox_dir()``)."""
    return SANDBOX_BANNER.format(directory=Path(directory or default_sandbox_dir()).resolve())


def describe(world: World | str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A dict for ``/status``: ``{"mode": "sandbox", "directory": ..., "accounts": ..., ...}``.

    Never raises: a broken world is reported in ``error`` instead.
    """
    directory = world.directory if isinstance(world, World) else Path(world or default_sandbox_dir()).resolve()
    info: dict[str, Any] = {"mode": "sandbox", "sandbox": True, "directory": str(directory),
                            "status_line": STATUS_LINE.format(directory=directory)}
    try:
        target = world if isinstance(world, World) else World.open(directory)
        info.update(target.summary())
    except Exception as exc:  # noqa: BLE001 - status must not fail because of the sandbox
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


__all__ = [
    "CAPTION_LIMIT",
    "HUGE_DOCUMENT_SIZE",
    "LOGIN_CODE",
    "SANDBOX_BANNER",
    "STATUS_LINE",
    "TEXT_LIMIT",
    "AfterLoss",
    "CallbackAnswer",
    "DemoWorld",
    "Fault",
    "FaultKind",
    "ImageKind",
    "MediaInfo",
    "Peer",
    "PeerKind",
    "SandboxClient",
    "SandboxError",
    "SandboxSender",
    "UnknownPeerError",
    "World",
    "WorldMessage",
    "banner",
    "default_sandbox_dir",
    "describe",
    "utf16_len",
]
