"""Helpers shared by the sandbox tests."""

from __future__ import annotations

from tests.helpers import eventually

__all__ = ["eventually"]
