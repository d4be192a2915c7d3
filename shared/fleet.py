"""Worker replicas sharing the Telegram accounts among themselves.

No coordinator: every replica reads the same two things from the database,
the live replicas (``worker_heartbeats`` rows younger than a few heartbeat
intervals) and the active accounts, and computes the same assignment from
them with :func:`assign`. Each replica then serves what is assigned to it and
hands the rest over; the account lease (``shared.telegram``) makes sure that,
while views differ for a moment, no account is ever connected twice.

The assignment is rendezvous (highest random weight) hashing with bounded
loads: every account ranks the replicas by a hash of (account, replica) and
goes to the first with room. Room is ``ceil(accounts / replicas)`` or one
less, so the shares differ by at most one. The result depends only on the
membership and the account ids, never on who holds what now, so accounts do
not ping-pong, and a replica joining or leaving moves few of them.

``WORKER_ACCOUNTS`` pins: a replica with it serves exactly those accounts
(what it always did) and every other replica leaves them to it while it is
live; if it is gone, they are shared like any other.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Member:
    """A live replica as the assignment sees it."""

    id: str
    pinned: frozenset[str] = frozenset()
    #: Labels whose session this replica's key cannot decrypt: given to another replica.
    cannot: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Assignment:
    """Who serves which account, and each replica's target share."""

    owner: dict[int, str]
    target: dict[str, int]

    def of(self, replica: str) -> set[int]:
        return {account for account, owner in self.owner.items() if owner == replica}


def weight(account_id: int, replica: str) -> int:
    """The rendezvous weight of ``replica`` for ``account_id``: the same on every machine and Python."""
    digest = hashlib.blake2b(f"{account_id}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(accounts: Iterable[tuple[int, str]], members: Sequence[Member]) -> Assignment:
    """The assignment of ``accounts`` (id, label) over the live ``members``.

    Pinned accounts go to their pinning replica (the heaviest one if several
    pin the same label); the others are spread over the replicas that pin
    nothing, each getting ``floor`` or ``ceil`` of the even share.
    """
    ordered = sorted(set(accounts))
    live = sorted(set(members), key=lambda m: m.id)
    owner: dict[int, str] = {}
    target: dict[str, int] = {m.id: 0 for m in live}
    free = [m for m in live if not m.pinned]
    shared: list[int] = []
    labels = dict(ordered)
    for account_id, label in ordered:
        pinning = [m for m in live if label in m.pinned and label not in m.cannot] or [m for m in live if label in m.pinned]
        if pinning:
            chosen = max(pinning, key=lambda m: weight(account_id, m.id))
            owner[account_id] = chosen.id
            target[chosen.id] += 1
        else:
            shared.append(account_id)
    if not free:
        return Assignment(owner=owner, target=target)
    base, extra = divmod(len(shared), len(free))
    # Which replicas take the one more: fixed by their ids, so it does not change with the accounts.
    by_luck = sorted(free, key=lambda m: (weight(-1, m.id), m.id), reverse=True)
    room = {m.id: base + (1 if n < extra else 0) for n, m in enumerate(by_luck)}
    for m in free:
        target[m.id] += room[m.id]
    # Room may go below zero for a replica that took an account others' keys cannot open: the target says the plan.
    for account_id in shared:
        ranked = sorted(free, key=lambda m: (weight(account_id, m.id), m.id), reverse=True)
        able = [m for m in ranked if labels[account_id] not in m.cannot]
        # A replica whose key cannot open the session never gets it, even past its room.
        with_room = [m for m in ranked if room[m.id] > 0] or ranked
        chosen = next((m for m in able if room[m.id] > 0), None) or (able[0] if able else with_room[0])
        room[chosen.id] -= 1
        owner[account_id] = chosen.id
    return Assignment(owner=owner, target=target)


def even_share(accounts: int, replicas: int) -> int:
    """``ceil(accounts / replicas)``: the most any replica serves."""
    return math.ceil(accounts / replicas) if replicas else accounts


def fleet_rows(replicas: Sequence[Any], assignment: Assignment | None, *, me: str | None = None) -> dict[str, dict[str, Any]]:
    """The fleet view (``/status`` and ``worker.py fleet``): one row per replica, live ones first.

    ``replicas`` are :class:`shared.db.records.FleetReplica` rows.
    """
    rows: dict[str, dict[str, Any]] = {}
    for r in sorted(replicas, key=lambda r: (not r.alive, r.replica)):
        rows[r.replica] = {
            "state": "alive" if r.alive else ("stopped" if r.status == "stopped" else "stale"),
            "this": r.replica == me,
            "host": r.host,
            "pid": r.pid,
            "version": r.version,
            "last_heartbeat_at": r.last_heartbeat_at.isoformat(),
            "heartbeat_age_s": round(r.age_s, 1),
            "held": r.held,
            "target": assignment.target.get(r.replica) if assignment is not None and r.alive else None,
            "pinned": list(r.pinned),
            "key_mismatch": list(getattr(r, "cannot", ())),
        }
    return rows
