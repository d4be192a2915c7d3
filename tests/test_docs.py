"""The README and .env.example document exactly the settings the config module reads."""

from __future__ import annotations

import re
from pathlib import Path

from shared.config import SETTINGS, render_env_example

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_is_generated_from_the_settings_registry() -> None:
    assert (ROOT / ".env.example").read_text(encoding="utf-8") == render_env_example(), (
        "regenerate it: python -m shared.config env-example > .env.example"
    )


def test_readme_configuration_table_lists_every_setting_and_nothing_else() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    declared = {s.name for s in SETTINGS}
    assert documented - declared == set(), "README documents settings the code does not read"
    assert declared - documented == set(), "README misses settings (python -m shared.config markdown)"


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```", 2)[1]
    assert "./start.sh\n" in first_block and "./start.sh test" in first_block
