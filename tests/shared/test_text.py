"""shared.text: what PostgreSQL cannot store is removed, or named with its position."""

from __future__ import annotations

from shared.text import storable, unstorable_reason


def test_nul_characters_and_lone_surrogates_are_removed_and_the_rest_is_kept() -> None:
    assert storable("a\x00b\ud83dc\udc00d \U0001f600 ok") == "abcd \U0001f600 ok"
    assert storable("plain text, emoji \U0001f600, accents é") == "plain text, emoji \U0001f600, accents é"
    assert storable(None) is None and storable("") == ""


def test_the_reason_names_the_first_bad_character_and_its_position() -> None:
    assert unstorable_reason("hello\x00world") == "the text contains a NUL character at position 5, which PostgreSQL cannot store"
    surrogate = unstorable_reason("ab\ud83d", what="the caption")
    assert surrogate == "the caption contains a lone surrogate (U+D83D) at position 2, which is not valid Unicode text"
    assert unstorable_reason("fine \U0001f600") is None and unstorable_reason(None) is None
