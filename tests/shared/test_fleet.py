"""The fair share: every replica computes the same assignment, shares differ by one at most, few accounts move."""

from __future__ import annotations

import random

from shared.fleet import Member, assign, even_share

ACCOUNTS = [(n, f"acct{n:02d}") for n in range(1, 31)]
THREE = [Member("telegram-main:host-a:101:aaaaaa"), Member("telegram-main:host-b:102:bbbbbb"), Member("telegram-main:host-c:103:cccccc")]
FOURTH = Member("telegram-main:host-d:104:dddddd")


def moved(before: dict[int, str], after: dict[int, str]) -> int:
    return sum(1 for account, owner in before.items() if after.get(account) != owner)


def test_every_replica_computes_the_same_assignment_whatever_order_it_reads_the_rows_in() -> None:
    first = assign(ACCOUNTS, THREE)
    for seed in range(5):
        accounts, members = list(ACCOUNTS), list(THREE)
        random.Random(seed).shuffle(accounts)
        random.Random(seed).shuffle(members)
        assert assign(accounts, members) == first


def test_30_accounts_over_3_replicas_is_10_each_and_over_4_is_8_8_7_7() -> None:
    three = assign(ACCOUNTS, THREE)
    assert sorted(len(three.of(m.id)) for m in THREE) == [10, 10, 10]
    four = assign(ACCOUNTS, [*THREE, FOURTH])
    assert sorted((len(four.of(m.id)) for m in [*THREE, FOURTH]), reverse=True) == [8, 8, 7, 7]
    assert four.target == {m.id: len(four.of(m.id)) for m in [*THREE, FOURTH]}
    assert max(four.target.values()) == even_share(30, 4)


def test_a_replica_joining_or_leaving_moves_few_accounts() -> None:
    three = assign(ACCOUNTS, THREE).owner
    four = assign(ACCOUNTS, [*THREE, FOURTH]).owner
    # The newcomer's 7 or 8 must move; a few more may, to keep the shares within one.
    assert moved(three, four) <= 12
    two = assign(ACCOUNTS, THREE[:2]).owner
    # The leaver's 10 must move.
    assert moved(three, two) <= 15


def test_worker_accounts_pins_are_respected_by_the_others() -> None:
    pinned = Member("telegram-main:host-p:200:pppppp", pinned=frozenset({"acct01", "acct02", "acct99"}))
    result = assign(ACCOUNTS, [*THREE, pinned])
    assert result.of(pinned.id) == {1, 2}, "a pinned replica serves exactly its accounts (acct99 does not exist)"
    assert sorted(len(result.of(m.id)) for m in THREE) == [9, 9, 10]
    gone = assign(ACCOUNTS, THREE)
    assert {gone.owner[1], gone.owner[2]} <= {m.id for m in THREE}, "without their replica, pinned accounts are shared"


def test_no_replica_means_no_owner_and_only_pinned_replicas_share_nothing_else() -> None:
    assert assign(ACCOUNTS, []).owner == {}
    only = Member("w:h:1:x", pinned=frozenset({"acct03"}))
    assert assign(ACCOUNTS, [only]).owner == {3: only.id}


def test_an_account_goes_to_a_replica_whose_key_opens_it_and_stays_with_one_that_can_if_none_other_can() -> None:
    plain = assign(ACCOUNTS, THREE)
    owner = plain.owner[5]
    blind = [Member(m.id, cannot=frozenset({"acct05"})) if m.id == owner else m for m in THREE]
    moved_to = assign(ACCOUNTS, blind).owner[5]
    assert moved_to != owner, "a replica that cannot decrypt the session does not get it"
    alone = [Member(THREE[0].id, cannot=frozenset({"acct05"}))]
    assert assign(ACCOUNTS, alone).owner[5] == THREE[0].id, "nobody else: it stays (shown as key_mismatch)"


def test_accounts_no_replica_can_open_still_get_an_owner_when_every_share_is_full() -> None:
    blind = [Member(m.id, cannot=frozenset(label for _, label in ACCOUNTS)) for m in THREE]
    result = assign(ACCOUNTS, blind)
    assert len(result.owner) == 30, "each has an owner, who shows it as key_mismatch"
