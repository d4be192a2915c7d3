"""Sessions are encrypted at rest and survive a key rotation."""

from __future__ import annotations

import pytest

from shared.sessions import SessionCipher, SessionKeyError, generate_key

SESSION = "1BVtsOKABu" + "x" * 340


def test_a_session_round_trips_and_is_not_stored_in_clear() -> None:
    cipher = SessionCipher(generate_key())
    token = cipher.encrypt(SESSION)
    assert SESSION not in token
    assert cipher.decrypt(token) == SESSION


def test_the_wrong_key_gives_a_clear_error_not_garbage() -> None:
    token = SessionCipher(generate_key()).encrypt(SESSION)
    with pytest.raises(SessionKeyError, match="wrong key"):
        SessionCipher(generate_key()).decrypt(token)


@pytest.mark.parametrize("bad", ["", "not-a-key", "short=="])
def test_a_malformed_key_is_refused_with_how_to_make_one(bad: str) -> None:
    with pytest.raises(SessionKeyError):
        SessionCipher(bad)


def test_rotation_re_encrypts_under_the_newest_key_and_old_tokens_still_open() -> None:
    old, new = generate_key(), generate_key()
    token = SessionCipher(old).encrypt(SESSION)
    both = SessionCipher(f"{new},{old}")
    assert not both.is_current(token)
    rotated = both.rotate(token)
    assert both.is_current(rotated)
    assert SessionCipher(new).decrypt(rotated) == SESSION
