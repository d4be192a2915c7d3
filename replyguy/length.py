"""X's reply-length rule: 280 *weighted* characters, every URL counting 23.

X does not count characters the way Python does. Its rule (twitter-text,
configuration v3) gives each code point a weight: 1 for most Latin, Greek,
Cyrillic, Hebrew, Arabic and similar scripts and for general punctuation, 2
for everything else (CJK, most symbols, emoji); an emoji sequence (flags,
skin tones, ZWJ families, keycaps) counts 2 as a whole; and every URL counts
23 however long it is, because X shortens it to a t.co link. The text is
NFC-normalized first. A tweet may weigh at most 280.

URL detection here is a close approximation of twitter-text's extractor:
``http(s)://`` links, ``www.`` links and bare domains on common top-level
domains. It errs the same way X does for ordinary text, which is what a reply
drafted by a language model contains.
"""

from __future__ import annotations

import re
import unicodedata

MAX_WEIGHTED_LENGTH = 280
"""The most a tweet may weigh."""

URL_WEIGHT = 23
"""What any URL weighs (the length of a t.co link)."""

ELLIPSIS = "\u2026"
"""Appended to a reply that had to be cut."""

# twitter-text v3: code points in these ranges weigh 1, all others 2.
_LIGHT_RANGES: tuple[tuple[int, int], ...] = (
    (0x0000, 0x10FF),
    (0x2000, 0x200D),
    (0x2010, 0x201F),
    (0x2032, 0x2037),
)

_TLDS = (
    "com|net|org|io|co|ai|dev|app|me|ly|gg|xyz|info|edu|gov|tv|fm|so|sh|to|news|blog|uk|de|fr|es|it|nl|jp|"
    "ru|br|in|us|ca|au|ch|se|no|pl|eu"
)
_URL = re.compile(
    rf"""(?ix)
    (?<![@\w.])                              # not inside an e-mail address or a word
    (?:
        https?://[^\s<>"]+                   # explicit scheme
      | www\.[^\s<>"]+                       # www. without a scheme
      | (?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+(?:{_TLDS})\b(?:[/?#][^\s<>"]*)?   # bare domain
    )
    """
)
_TRAILING_PUNCTUATION = ".,:;!?)]}'\"\u2019\u201d"

_ZWJ = 0x200D
_VARIATION_SELECTORS = (0xFE0E, 0xFE0F)
_KEYCAP = 0x20E3


def _is_light(code_point: int) -> bool:
    return any(low <= code_point <= high for low, high in _LIGHT_RANGES)


def _is_emoji_base(code_point: int) -> bool:
    return (
        0x1F000 <= code_point <= 0x1FAFF
        or 0x2600 <= code_point <= 0x27BF
        or 0x2300 <= code_point <= 0x23FF
        or 0x2B00 <= code_point <= 0x2BFF
        or code_point in (0x203C, 0x2049, 0x2122, 0x2139, 0x3030, 0x303D, 0x3297, 0x3299)
        or 0x2194 <= code_point <= 0x21AA
    )


def _is_emoji_modifier(code_point: int) -> bool:
    return (
        code_point in _VARIATION_SELECTORS
        or 0x1F3FB <= code_point <= 0x1F3FF  # skin tones
        or 0xE0020 <= code_point <= 0xE007F  # tag sequences (subdivision flags)
        or code_point == _KEYCAP
    )


def _emoji_cluster_end(text: str, start: int) -> int:
    """Index after the emoji sequence starting at ``start``, or ``start`` if none starts there."""
    code_point = ord(text[start])
    n = len(text)
    # Keycaps: a digit, # or * followed by (FE0F) 20E3.
    if text[start] in "0123456789#*":
        i = start + 1
        if i < n and ord(text[i]) == 0xFE0F:
            i += 1
        if i < n and ord(text[i]) == _KEYCAP:
            return i + 1
        return start
    if not _is_emoji_base(code_point):
        return start
    i = start + 1
    # A flag is a pair of regional indicators.
    if 0x1F1E6 <= code_point <= 0x1F1FF:
        if i < n and 0x1F1E6 <= ord(text[i]) <= 0x1F1FF:
            return i + 1
        return i
    while i < n:
        following = ord(text[i])
        if _is_emoji_modifier(following):
            i += 1
        elif following == _ZWJ and i + 1 < n and _is_emoji_base(ord(text[i + 1])):
            i += 2
        else:
            break
    return i


def find_urls(text: str) -> list[tuple[int, int]]:
    """Spans of the URLs in ``text`` (after trailing punctuation is taken off)."""
    spans: list[tuple[int, int]] = []
    for match in _URL.finditer(text):
        start, end = match.span()
        while end > start and text[end - 1] in _TRAILING_PUNCTUATION:
            end -= 1
        if end > start:
            spans.append((start, end))
    return spans


def _weigh_plain(text: str) -> int:
    weight = 0
    i = 0
    n = len(text)
    while i < n:
        end = _emoji_cluster_end(text, i)
        if end > i:
            weight += 2
            i = end
            continue
        weight += 1 if _is_light(ord(text[i])) else 2
        i += 1
    return weight


def weighted_length(text: str) -> int:
    """How much ``text`` weighs for X (at most :data:`MAX_WEIGHTED_LENGTH` may be posted)."""
    normalized = unicodedata.normalize("NFC", text)
    weight = 0
    position = 0
    for start, end in find_urls(normalized):
        weight += _weigh_plain(normalized[position:start]) + URL_WEIGHT
        position = end
    return weight + _weigh_plain(normalized[position:])


def fits(text: str, limit: int = MAX_WEIGHTED_LENGTH) -> bool:
    """True when ``text`` is not empty and weighs at most ``limit``."""
    return bool(text.strip()) and weighted_length(text) <= limit


def trim_to_fit(text: str, limit: int = MAX_WEIGHTED_LENGTH) -> str:
    """``text`` cut at a word boundary so that it fits, with an ellipsis when cut.

    Whole words (and whole URLs) are kept; only a single word longer than the
    limit is cut inside. Text that already fits comes back unchanged
    (stripped).
    """
    text = unicodedata.normalize("NFC", text.strip())
    if weighted_length(text) <= limit:
        return text
    budget = limit - weighted_length(ELLIPSIS)
    kept = ""
    for token in re.findall(r"\S+|\s+", text):
        candidate = kept + token
        if token.isspace():
            kept = candidate
            continue
        if weighted_length(candidate) > budget:
            break
        kept = candidate
    kept = kept.rstrip().rstrip(",;:-\u2013\u2014")
    if not kept:
        # One enormous word: cut it by code points.
        for char in text:
            if weighted_length(kept + char) > budget:
                break
            kept += char
    return kept + ELLIPSIS


__all__ = ["ELLIPSIS", "MAX_WEIGHTED_LENGTH", "URL_WEIGHT", "find_urls", "fits", "trim_to_fit", "weighted_length"]
