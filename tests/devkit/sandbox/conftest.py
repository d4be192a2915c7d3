"""Sandbox tests use the sandbox fixture plugin (also registered suite-wide by tests/conftest.py)."""

from tests.fixtures.sandbox import sandbox_connect, sandbox_demo, sandbox_world

__all__ = ["sandbox_connect", "sandbox_demo", "sandbox_world"]
