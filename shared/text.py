"""Text PostgreSQL can store: NUL characters and lone surrogates removed, or refused with the reason.

PostgreSQL's ``text`` (and ``jsonb``) cannot hold the NUL character: a
statement carrying one fails with ``22021`` (``invalid byte sequence for
encoding "UTF8": 0x00``) or, through PostgREST's JSON, ``22P05``
(``unsupported Unicode escape sequence``). A lone UTF-16 surrogate
(``\\ud83d`` without its partner, which a broken client or a cut emoji can
produce) has no UTF-8 encoding at all, so the driver refuses it before the
database sees it. Text that only needs to be kept (an AI draft, an incoming
message, a caption, a tweet) is stored without those characters; text that
must go out exactly as written (an outbound message) is refused with a
reason a person can act on.
"""

from __future__ import annotations

import re

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str | None) -> str | None:
    """``text`` without the characters PostgreSQL cannot store (None stays None)."""
    if text is None or not _UNSTORABLE.search(text):
        return text
    return _UNSTORABLE.sub("", text)


def unstorable_reason(text: str | None, *, what: str = "the text") -> str | None:
    """Why ``text`` cannot be stored as it is, naming the first bad character and its position; None when it can."""
    if text is None:
        return None
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    position = found.start()
    if found.group() == "\x00":
        return f"{what} contains a NUL character at position {position}, which PostgreSQL cannot store"
    return (
        f"{what} contains a lone surrogate (U+{ord(found.group()):04X}) at position {position}, "
        "which is not valid Unicode text"
    )


__all__ = ["storable", "unstorable_reason"]
