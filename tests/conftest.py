"""Suite-wide fixtures. Fixture modules live in tests/fixtures and are loaded here as plugins."""

pytest_plugins: list[str] = ["tests.fixtures.sandbox", "tests.fixtures.postgres"]
