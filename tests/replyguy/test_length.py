"""X's weighted length: what counts 1, what counts 2, URLs count 23, and cutting at a word boundary."""

from __future__ import annotations

from replyguy.length import ELLIPSIS, MAX_WEIGHTED_LENGTH, find_urls, fits, trim_to_fit, weighted_length


def test_latin_text_counts_one_per_character() -> None:
    assert weighted_length("Hello, world!") == 13
    assert weighted_length("Привет, мир") == 11  # Cyrillic is in the light range


def test_cjk_characters_count_two() -> None:
    assert weighted_length("日本語") == 6
    assert fits("日" * 140) and not fits("日" * 141)


def test_every_url_counts_twenty_three_whatever_its_length() -> None:
    long_url = "https://example.com/" + "a" * 200
    assert weighted_length(long_url) == 23
    assert weighted_length("see https://t.co/x and www.example.org/page.") == len("see ") + 23 + len(" and ") + 23 + 1
    assert weighted_length("read example.com now") == len("read ") + 23 + len(" now")


def test_emoji_sequences_count_two_as_a_whole() -> None:
    assert weighted_length("\U0001f600") == 2  # 😀
    assert weighted_length("\U0001f468\u200d\U0001f469\u200d\U0001f467") == 2  # family (ZWJ sequence)
    assert weighted_length("\U0001f44d\U0001f3fd") == 2  # thumbs up, skin tone
    assert weighted_length("\U0001f1e9\U0001f1ea") == 2  # flag
    assert weighted_length("1\ufe0f\u20e3") == 2  # keycap


def test_an_email_address_is_not_a_url() -> None:
    assert find_urls("mail me at someone@example.com") == []


def test_trailing_punctuation_is_not_part_of_a_url() -> None:
    text = "look (https://example.com/x)."
    [(start, end)] = find_urls(text)
    assert text[start:end] == "https://example.com/x"


def test_a_reply_that_fits_is_left_alone() -> None:
    assert trim_to_fit("  short reply  ") == "short reply"


def test_an_overlong_reply_is_cut_at_a_word_boundary_with_an_ellipsis() -> None:
    words = " ".join(f"word{i}" for i in range(100))
    cut = trim_to_fit(words)
    assert weighted_length(cut) <= MAX_WEIGHTED_LENGTH
    assert cut.endswith(ELLIPSIS)
    assert words.startswith(cut[:-1]) and cut[:-1].split()[-1] in words.split()


def test_cutting_keeps_urls_whole_and_counts_them_as_twenty_three() -> None:
    text = "Read this https://example.com/" + "x" * 300 + " " + "and more words " * 30
    cut = trim_to_fit(text)
    assert "https://example.com/" + "x" * 300 in cut
    assert weighted_length(cut) <= MAX_WEIGHTED_LENGTH


def test_a_single_giant_word_is_cut_inside() -> None:
    cut = trim_to_fit("z" * 1000)
    assert weighted_length(cut) <= MAX_WEIGHTED_LENGTH and cut.startswith("zzz") and cut.endswith(ELLIPSIS)


def test_an_empty_reply_does_not_fit() -> None:
    assert not fits("   ")
