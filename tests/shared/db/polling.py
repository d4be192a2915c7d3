"""Waiting for a condition in the database without sleeping blindly (the suite's one polling helper)."""

from __future__ import annotations

from tests.helpers import eventually

__all__ = ["eventually"]
