"""Load the PostgreSQL fixture plugin for these tests unless the suite already registered it."""

from __future__ import annotations

import pytest

PLUGIN = "tests.fixtures.postgres"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)
