"""Named SQL statements read from shared/db/sql/*.sql."""

from __future__ import annotations

import pytest

from shared.db.statements import parse_statements, statements


def test_each_statement_runs_from_its_name_line_to_the_next() -> None:
    text = "-- a file comment\n-- name: one\nselect 1;\n\n-- name: two\n-- what it does\nselect $1;\n"
    assert parse_statements(text) == {"one": "select 1;", "two": "-- what it does\nselect $1;"}


def test_a_name_used_twice_or_an_empty_statement_is_refused() -> None:
    with pytest.raises(ValueError, match="named twice"):
        parse_statements("-- name: one\nselect 1;\n-- name: one\nselect 2;\n")
    with pytest.raises(ValueError, match="empty"):
        parse_statements("-- name: one\n\n-- name: two\nselect 2;\n")


def test_the_migrators_bookkeeping_statements_are_all_there() -> None:
    assert set(statements("migrations")) == {
        "bookkeeping", "lock", "bookkeeping_exists", "applied_versions", "is_applied", "record_applied",
    }
