"""Token buckets pace each key; a flood-wait hold stops only its own key."""

from __future__ import annotations

from shared.ratelimit import KeyedBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_may_burst_then_is_paced_at_its_rate() -> None:
    clock = Clock()
    buckets = KeyedBuckets(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        assert buckets.delay("chat") == 0
        buckets.take("chat")
    assert buckets.delay("chat") == 0.5
    clock.now += 0.5
    assert buckets.delay("chat") == 0


def test_a_flood_wait_on_one_chat_does_not_delay_another() -> None:
    clock = Clock()
    buckets = KeyedBuckets(rate=1.0, burst=1, clock=clock)
    buckets.hold("chat-a", 17)
    assert buckets.delay("chat-a") == 17
    assert buckets.delay("chat-b") == 0
    clock.now += 17
    assert buckets.delay("chat-a") == 0
    assert buckets.held_until("chat-a") is None


def test_a_shorter_hold_never_shortens_a_longer_one() -> None:
    clock = Clock()
    buckets = KeyedBuckets(rate=1.0, burst=1, clock=clock)
    buckets.hold("acct", 30)
    buckets.hold("acct", 5)
    assert buckets.delay("acct") == 30
