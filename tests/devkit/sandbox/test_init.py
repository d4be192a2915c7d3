"""Sandbox mode must be impossible to miss: banner text and a /status description."""

from __future__ import annotations

from pathlib import Path

from devkit.sandbox import SANDBOX_BANNER, banner, default_sandbox_dir, describe


def test_default_directory_follows_sandbox_dir_then_data_dir():
    assert default_sandbox_dir({"SANDBOX_DIR": "/srv/world"}) == Path("/srv/world")
    assert default_sandbox_dir({"DATA_DIR": "/data"}) == Path("/data/sandbox")
    assert default_sandbox_dir({}) == Path(".data/sandbox")


def test_banner_names_the_world_directory(tmp_path):
    text = banner(tmp_path)

    assert "SANDBOX" in text and str(tmp_path.resolve()) in text
    assert SANDBOX_BANNER.format(directory="x").startswith("*** TELEGRAM SANDBOX MODE")


def test_describe_reports_sandbox_mode_and_counts(sandbox_world, sandbox_demo):
    sandbox_world.set_fault("hang", method="SendMessage", count=1)

    info = describe(sandbox_world)

    assert info["mode"] == "sandbox" and info["sandbox"] is True
    assert info["directory"] == str(sandbox_world.directory)
    assert info["accounts"] == 8 and info["active_faults"] == 1
    assert "SANDBOX" in info["status_line"]


def test_describe_never_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    info = describe(blocker / "world")

    assert info["mode"] == "sandbox" and "error" in info
