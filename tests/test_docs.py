"""The README and docs/ as a newcomer uses them: every command works as copied, every link leads somewhere.

Commands are the lines of the fenced code blocks that start with
``./start.sh`` (after any ``NAME=value`` prefixes). Each is run from a fresh
copy of the repository in its ``--help`` form (the command words, then
``--help``), so a renamed subcommand or option fails here, not in a
newcomer's terminal. ``.env.example`` and docs/configuration.md are generated
from the settings registry and must be current.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from shared.config import CONFIGURATION_DOC, SETTINGS, render_configuration_doc, render_env_example

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Pages other parts of the project write; a link to one is checked once it exists.
PAGES_WRITTEN_ELSEWHERE = {
    "docs/telegram-state.md",
    "docs/flood-limits.md",
    "docs/supabase-and-containers.md",
    "docs/poison-items-and-memory.md",
    "docs/fleet.md",
    "docs/monitoring.md",
    "tests/README.md",
    "BENCHMARKS.md",
}

#: Commands that are their own dry form (they only print).
HARMLESS = {("sessions", "new-key"), ("config", "check"), ("config", "markdown"), ("config", "env-example")}

MAX_README_WORDS = 1500


def test_env_example_is_generated_from_the_settings_registry() -> None:
    assert (ROOT / ".env.example").read_text(encoding="utf-8") == render_env_example(), (
        "regenerate it: ./start.sh config env-example > .env.example"
    )


def test_configuration_doc_is_generated_from_the_settings_registry_and_lists_every_setting() -> None:
    assert CONFIGURATION_DOC.read_text(encoding="utf-8") == render_configuration_doc(), "regenerate it: ./start.sh config docs"
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", CONFIGURATION_DOC.read_text(encoding="utf-8"), flags=re.MULTILINE))
    assert documented == {s.name for s in SETTINGS}


def test_readme_opens_with_the_two_commands_and_stays_short() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```", 2)[1]
    assert "./start.sh\n" in first_block and "./start.sh test" in first_block
    words = len(readme.split())
    assert words <= MAX_README_WORDS, f"README.md has {words} words; move detail into docs/"


# --- commands ----------------------------------------------------------------------------------


def code_lines(text: str) -> list[str]:
    """The lines of fenced code blocks, comments cut, continuation lines joined."""
    lines: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def inline_commands(text: str) -> list[str]:
    """Commands written inline as `./start.sh ...`."""
    return [m for m in re.findall(r"`(\./start\.sh[^`]*)`", text) if "<" not in m and "…" not in m]


def commands_of(text: str) -> list[list[str]]:
    found = []
    for line in code_lines(text) + inline_commands(text):
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words = words[1:]
        if words and words[0] == "./start.sh":
            found.append(words)
    return found


def help_form(words: list[str]) -> tuple[str, ...]:
    """The command words (up to the first option) and ``--help``; the bare runs use start.sh's own help."""
    command = [w for w in words[1:4]]
    cut = next((i for i, w in enumerate(command) if w.startswith("-") or not re.fullmatch(r"[a-z][a-z_-]*", w)), len(command))
    command = command[:cut]
    if not command or command == ["run"]:
        return ("./start.sh", "--help")
    if tuple(command[:2]) in HARMLESS:
        return ("./start.sh", *command[:2])
    return ("./start.sh", *command, "--help")


def every_command() -> dict[tuple[str, ...], str]:
    forms: dict[tuple[str, ...], str] = {}
    for page in PAGES:
        for words in commands_of(page.read_text(encoding="utf-8")):
            forms.setdefault(help_form(words), f"{page.relative_to(ROOT)}: {shlex.join(words)}")
    return forms


def test_the_pages_show_commands_in_the_one_form_that_works_as_copied() -> None:
    wrong = []
    for page in PAGES:
        for line in code_lines(page.read_text(encoding="utf-8")):
            if re.search(r"(^|\s)(python3?|\.venv/bin/python)\s", line) or line.startswith("open "):
                wrong.append(f"{page.relative_to(ROOT)}: {line}")
    assert not wrong, "use ./start.sh ... (it runs inside .venv):\n" + "\n".join(wrong)
    assert len(every_command()) >= 15, "the command extraction found too little to be checking anything"


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files (committed or not, minus ignored ones) in a new directory."""
    target = tmp_path_factory.mktemp("clone") / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


#: What start.sh runs for its first word (a path of the repository, or a module); the rest run only through start.sh.
ENTRY_POINTS = {
    "worker": ("path", "worker.py"),
    "ingest": ("path", "ingest.py"),
    "bot": ("path", "bot.py"),
    "supervisor": ("path", "supervisor.py"),
    "sandbox": ("module", "devkit.sandbox"),
    "db": ("module", "shared.db"),
    "health": ("module", "shared.health"),
    "config": ("module", "shared.config"),
    "sessions": ("module", "shared.sessions"),
}

#: Runs many command lines of our programs in one interpreter: each as ``__main__`` with its own
#: ``sys.argv``; prints, per command, its exit code and what it wrote on stderr.
DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
sys.path.insert(0, ".")
results = []
for kind, target, argv in json.loads(sys.stdin.read()):
    err = io.StringIO()
    code = 0
    sys.argv = [target, *argv]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc(file=err)
            code = 1
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def entry_of(form: tuple[str, ...]) -> tuple[str, str, list[str]] | None:
    """How a start.sh form runs without start.sh: (kind, target, argv), or None when only start.sh can run it."""
    words = list(form[1:])
    if words and words[0] == "bench" and len(words) > 1 and not words[1].startswith("-"):
        return ("path", f"bench/{words[1]}.py", words[2:])
    if words and words[0] in ENTRY_POINTS:
        kind, target = ENTRY_POINTS[words[0]]
        return (kind, target, words[1:])
    return None


@pytest.mark.slow
async def test_every_command_in_readme_and_docs_runs_as_copied_from_a_fresh_clone(fresh_clone: Path, tmp_path: Path) -> None:
    """Each program is reached through start.sh as copied (its shortest form); the other forms of every
    program run in one interpreter, each as start.sh would run it (as ``__main__`` with its own argv),
    which keeps a Python start-up per command out of the suite's time."""
    # As after `./start.sh` ran once: the requirements are installed (here: in the test's interpreter).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "SUPABASE_", "DATABASE_URL", "BOT"))}
    env.update(NO_VENV="1", PYTHON=sys.executable, DATA_DIR=str(tmp_path / "data"))
    forms = every_command()
    through_start: list[tuple[str, ...]] = []
    in_driver: list[tuple[str, ...]] = []
    for form in sorted(forms, key=len):
        program = form[1] if len(form) > 1 else ""
        if entry_of(form) is None or program not in {f[1] for f in through_start if len(f) > 1}:
            through_start.append(form)  # the shortest form of each program goes through start.sh
        else:
            in_driver.append(form)
    limit = asyncio.Semaphore(3)

    async def run(command: Sequence[str], stdin: bytes | None = None) -> tuple[int, str, str]:
        async with limit:
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=fresh_clone, env=env, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    def problem(form: tuple[str, ...], code: int, err: str) -> str | None:
        if code == 0 and "Traceback" not in err:
            return None
        return f"{forms[form]}\n    ran {shlex.join(form)}: exit {code}\n    {err.strip()[-400:]}"

    async def check_one(form: tuple[str, ...]) -> list[str | None]:
        code, _, err = await run(form)
        return [problem(form, code, err)]

    async def check_many(group: list[tuple[str, ...]]) -> list[str | None]:
        jobs = [entry_of(form) for form in group]
        code, out, err = await run([sys.executable, "-c", DRIVER], json.dumps(jobs).encode())
        if code != 0:
            return [f"the command driver failed for {group}: exit {code}\n    {err.strip()[-400:]}"]
        return [problem(form, c, e) for form, (c, e) in zip(group, json.loads(out.strip().splitlines()[-1]))]

    checks = [check_many(in_driver)] + [check_one(f) for f in through_start]  # the longest first
    problems = [p for found in await asyncio.gather(*checks) for p in found if p]
    assert not problems, "\n".join(problems)
    assert len(through_start) + len(in_driver) == len(forms)


# --- links -------------------------------------------------------------------------------------


def anchors_of(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_relative_link_in_readme_and_docs_leads_to_a_file_and_heading() -> None:
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        # Links outside code: drop fenced blocks and inline code first.
        prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
        prose = re.sub(r"`[^`]*`", "", prose)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            relative = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
            if not file.exists():
                if relative in PAGES_WRITTEN_ELSEWHERE:
                    continue  # written by another part of the project; checked once it exists
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
                continue
            if anchor and file.suffix == ".md" and anchor not in anchors_of(file.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_runbook_has_a_heading_per_alert_type_for_alert_links() -> None:
    from shared.alerts import AlertType

    anchors = anchors_of((ROOT / "docs" / "operations.md").read_text(encoding="utf-8"))
    missing = [t.value for t in AlertType if t.value not in anchors]
    assert not missing, f"docs/operations.md has no runbook heading for {missing}"
