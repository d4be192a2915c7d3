"""Token buckets per key, plus "hold until" penalties for flood waits.

Telegram publishes limits for bots (about 1 message per second per chat, 30
per second overall, 20 per minute in a group) and none for user accounts, so
the worker sends through conservative buckets per account and per chat. When
Telegram still answers with a wait, the key it binds is held for the time it
asked (the account for FLOOD_WAIT, the chat for SLOWMODE_WAIT):
:meth:`KeyedBuckets.hold` makes :meth:`KeyedBuckets.delay` report the
remaining wait, and other keys go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def delay(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available (0 when they are now)."""
        self._refill(now)
        if self.tokens >= cost:
            return 0.0
        return (cost - self.tokens) / self.rate if self.rate > 0 else float("inf")

    def take(self, now: float, cost: float = 1.0) -> None:
        self._refill(now)
        self.tokens -= cost


class KeyedBuckets:
    """One :class:`TokenBucket` per key, created on first use, with penalties.

    Args:
        rate: tokens per second for each key.
        burst: bucket size for each key.
        clock: monotonic seconds.
        max_keys: idle buckets beyond this are forgotten (full buckets only).
    """

    def __init__(self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[object, TokenBucket] = {}
        self._held_until: dict[object, float] = {}
        self._max_keys = max_keys

    def _bucket(self, key: object, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._forget_idle(now)
            bucket = TokenBucket(self.rate, self.burst, self.burst, now)
            self._buckets[key] = bucket
        return bucket

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.delay(now, b.burst) == 0.0]:
            del self._buckets[key]

    def delay(self, key: object) -> float:
        """Seconds before ``key`` may send (penalty or empty bucket)."""
        now = self._clock()
        held = self._held_until.get(key, 0.0) - now
        if held > 0:
            return held
        self._held_until.pop(key, None)
        return self._bucket(key, now).delay(now)

    def take(self, key: object) -> None:
        """Spend one token of ``key`` (call after :meth:`delay` returned 0)."""
        now = self._clock()
        self._bucket(key, now).take(now)

    def hold(self, key: object, seconds: float) -> None:
        """Let nothing through ``key`` for ``seconds`` (Telegram's flood wait)."""
        until = self._clock() + seconds
        if until > self._held_until.get(key, 0.0):
            self._held_until[key] = until

    def held_until(self, key: object) -> float | None:
        """Monotonic time the penalty on ``key`` ends, or None."""
        until = self._held_until.get(key)
        return until if until is not None and until > self._clock() else None
