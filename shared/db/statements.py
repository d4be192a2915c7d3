"""Named SQL statements kept in ``shared/db/sql/*.sql`` rather than in Python strings.

A file holds several statements, each after a ``-- name: <name>`` line; the
text up to the next such line is the statement (comments included, which
PostgreSQL ignores). The state changes of the bots are SQL functions in
``supabase/migrations``; these files hold the little SQL that cannot be a
migration (the migrator's own bookkeeping).
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_NAME = re.compile(r"^-- name: (?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse_statements(text: str) -> dict[str, str]:
    """The named statements of ``text``: name -> statement (stripped).

    Raises:
        ValueError: a name is used twice or a statement is empty.
    """
    found: dict[str, str] = {}
    marks = list(_NAME.finditer(text))
    for mark, following in zip(marks, [*marks[1:], None]):
        body = text[mark.end() : following.start() if following else len(text)].strip()
        if mark["name"] in found:
            raise ValueError(f"statement {mark['name']!r} is named twice")
        if not body:
            raise ValueError(f"statement {mark['name']!r} is empty")
        found[mark["name"]] = body
    return found


@functools.cache
def statements(file: str) -> dict[str, str]:
    """The named statements of ``shared/db/sql/<file>.sql`` (read once)."""
    text = (resources.files("shared.db") / "sql" / f"{file}.sql").read_text(encoding="utf-8")
    return parse_statements(text)
