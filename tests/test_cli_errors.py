"""Every command line over a table of bad inputs: the exit code, one line, never a traceback.

Each case runs the real command as a child process, as a user would, against
a migrated test database and the sandbox (or no database at all, where the
command needs none). Exit 2 means "change something first" (bad input, a bad
setting, a missing schema); exit 1 a failure.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.cli import split_flags
from tests.fixtures.postgrest import PostgrestEndpoint

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.process]  # they run our programs as real processes


@dataclass(frozen=True)
class Bad:
    """One bad invocation and how it must end."""

    name: str
    argv: tuple[str, ...]
    code: int
    says: str  # a fragment of the one line on stderr
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    world: bool = False  # opens the sandbox world (and seeds its accounts): after the first such case, never with it


def table(files: dict[str, str]) -> list[Bad]:
    py = (sys.executable,)
    send = (*py, "worker.py", "send", "--account", "demo_one", "--to", "alice")
    return [
        # worker.py send: what Telegram would refuse is refused before it is queued.
        Bad("send empty", (*send, ""), 2, "empty message"),
        Bad("send whitespace only", (*send, "  \n\t "), 2, "empty message"),
        Bad("send 5000 characters", (*send, "x" * 5000), 2, "5000 UTF-16 code units, Telegram accepts at most 4096"),
        Bad("send 2100 emoji", (*send, "😀" * 2100), 2, "4200 UTF-16 code units"),
        Bad("send a missing file", (*send, "--file", "/missing/file.jpg", "caption"), 2, "attachment not found"),
        Bad("send an empty file", (*send, "--file", files["empty"], "caption"), 2, "attachment is empty"),
        Bad("send a file over 2 GiB", (*send, "--file", files["huge"], "caption"), 2, "attachment too large: 2147483649 bytes"),
        Bad("send a long caption", (*send, "--file", files["small"], "c" * 1100), 2, "caption too long: 1100"),
        Bad("send two attachments", (*send, "--file", files["small"], "--storage-key", "k", "x"), 2, "2 attachments"),
        Bad("send from an unknown account", (*py, "worker.py", "send", "--account", "nobody", "--to", "alice", "x"), 2, "no account labelled 'nobody'", world=True),
        Bad("send --wait of no seconds", (*send, "--wait", "0", "x"), 2, "--wait"),
        Bad("send without --to", (*py, "worker.py", "send", "--account", "demo_one", "x"), 2, "--to"),
        Bad("messages of an unknown account", (*py, "worker.py", "messages", "--account", "nobody"), 2, "no account labelled", world=True),
        Bad("messages of a bad status", (*py, "worker.py", "messages", "--status", "lost"), 2, "invalid choice"),
        Bad("requeue of nothing named", (*py, "worker.py", "requeue"), 2, "--all"),
        Bad("login of an unknown sandbox phone", (*py, "worker.py", "login", "--phone", "+19999999", "--label", "x"), 2, "no sandbox account", stdin=b"12345\n", world=True),
        Bad("rotate-key with one key", (*py, "worker.py", "rotate-key"), 2, "SESSION_ENCRYPTION_KEY"),
        Bad("an unknown worker command", (*py, "worker.py", "fly"), 2, "invalid choice"),
        Bad("a bad setting", (*py, "worker.py", "accounts"), 2, "TIMEOUT_DB", env={"TIMEOUT_DB": "soon"}),
        # ingest.py, bot.py
        Bad("ingest gc with bad hours", (*py, "ingest.py", "gc", "--older-than-hours", "many"), 2, "--older-than-hours"),
        Bad("ingest with a bad setting", (*py, "ingest.py", "gc"), 2, "INGEST_OVERSIZE", env={"INGEST_OVERSIZE": "squash"}),
        Bad("bot health of nothing running", (*py, "bot.py", "health", "--port", "1", "--timeout", "2"), 2, "not answering"),
        Bad("bot health with a bad timeout", (*py, "bot.py", "health", "--timeout", "x"), 2, "--timeout"),
        # python -m shared.db / devkit.sandbox / shared.health, supervisor.py
        Bad("db migrate of an unreachable server", (*py, "-m", "shared.db", "migrate", "--database-url", "postgresql://u@127.0.0.1:9/x"), 1, "cannot connect"),
        Bad("db without a command", (*py, "-m", "shared.db"), 2, "required"),
        Bad("sandbox inbox of nobody", (*py, "-m", "devkit.sandbox", "inbox", "@ghost"), 2, "no peer", world=True),
        Bad("sandbox fault of a bad kind", (*py, "-m", "devkit.sandbox", "fault", "set", "explode"), 2, "invalid choice"),
        Bad("health of an unknown check", (*py, "-m", "shared.health", "kidneys"), 2, "kidneys"),
        Bad("health with a zero timeout", (*py, "-m", "shared.health", "--timeout", "0"), 2, "--timeout"),
        Bad("supervisor with a bad setting", (*py, "supervisor.py"), 2, "MAX_RESTARTS", env={"MAX_RESTARTS": "many"}),
        # start.sh itself (with the test's interpreter: no venv is built here)
        Bad("start.sh of an unknown command", ("./start.sh", "fly"), 2, "unknown command 'fly'"),
        Bad("start.sh bench of a helper module", ("./start.sh", "bench", "_common"), 2, "no benchmark named '_common'"),
        Bad("start.sh with a bad BOT", ("./start.sh",), 2, "BOT must be one of", env={"BOT": "robot"}),
    ]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    small = tmp_path / "small.txt"
    small.write_text("a small attachment\n")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.bin"
    with huge.open("wb") as handle:  # sparse: 2 GiB + 1 byte on paper, nothing on disk
        handle.truncate(2 * 1024**3 + 1)
    return {"small": str(small), "empty": str(empty), "huge": str(huge)}


async def run(argv: tuple[str, ...], env: dict[str, str], stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 90)
    return proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace"), err.decode(errors="replace")


def base_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "SUPABASE_", "DATABASE_URL", "BOT"))}
    return {
        **env,
        "DATABASE_URL": database_url,
        "SANDBOX": "1",
        "SANDBOX_DIR": str(tmp_path / "sandbox"),
        "DATA_DIR": str(tmp_path / "data"),
        "NO_VENV": "1",
        "PYTHON": sys.executable,
    }


def one_clean_line(err: str) -> str | None:
    """What is wrong with ``err`` as the answer to bad input, or None when it is one clean line."""
    if "Traceback" in err:
        return "a traceback"
    lines = [line for line in err.splitlines() if line.strip()]
    if len(lines) != 1:
        return f"{len(lines)} lines"
    return None


async def test_every_cli_answers_bad_input_with_one_line_and_its_exit_code(
    tmp_path: Path, database_url: str, files: dict[str, str]
) -> None:
    env = base_env(tmp_path, database_url)
    limit = asyncio.Semaphore(3)

    async def check(case: Bad) -> str | None:
        async with limit:
            code, out, err = await run(case.argv, {**env, **case.env}, case.stdin)
        problem = one_clean_line(err)
        if code != case.code:
            problem = f"exit {code}, not {case.code}"
        elif problem is None and case.says not in err:
            problem = f"does not say {case.says!r}"
        return None if problem is None else f"{case.name}: {problem}\n    stderr: {err.strip()[-600:]}\n    stdout: {out.strip()[-200:]}"

    async def in_the_world(cases: list[Bad]) -> list[str | None]:
        # The first makes the sandbox world and seeds its accounts; the others find them there.
        first = await check(cases[0])
        return [first, *await asyncio.gather(*(check(c) for c in cases[1:]))]

    cases = table(files)
    world = [c for c in cases if c.world]
    assert world, "no case opens the sandbox world"
    world_problems, *other_problems = await asyncio.gather(in_the_world(world), *(check(c) for c in cases if not c.world))
    problems = [p for p in [*world_problems, *other_problems] if p]
    assert not problems, "\n".join(problems)


async def test_debug_shows_the_traceback_and_v_the_info_logs(tmp_path: Path, database_url: str) -> None:
    env = base_env(tmp_path, database_url)
    send = (sys.executable, "worker.py", "send", "--account", "demo_one", "--to", "alice")
    # The first makes the sandbox world and seeds its accounts; the two sends then run side by side.
    code, _, err = await run((*send, "--debug", "--account", "nobody", "x"), env)
    assert code == 2 and "Traceback" in err and err.strip().endswith("./start.sh worker accounts lists them)")
    (code, out, err), (verbose_code, _, verbose_err) = await asyncio.gather(
        run((*send, "hello"), env), run((*send, "-v", "hello again"), env)
    )
    assert code == 0 and out.strip().isdigit() and err == "", "quiet: no INFO lines of the embedded database or the sandbox"
    assert verbose_code == 0 and " INFO " in verbose_err


def test_global_flags_are_taken_out_before_the_command_sees_them_but_not_after_a_double_dash() -> None:
    assert split_flags(["send", "-v", "--debug", "x"]) == (["send", "x"], True, True)
    assert split_flags(["--", "python", "worker.py", "-v"]) == (["--", "python", "worker.py", "-v"], False, False)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("bot", ["worker", "ingest", "bot"])
async def test_a_bot_on_a_taken_port_exits_2_with_one_line_naming_port(
    bot: str, taken_port: int, tmp_path: Path, database_url: str
) -> None:
    env = {**base_env(tmp_path, database_url), "PORT": str(taken_port)}
    code, out, err = await run((sys.executable, f"{bot}.py"), env)
    assert code == 2, out + err
    assert f"error: port {taken_port} is already in use" in err and "PORT=" in err
    assert one_clean_line(err) is None, err


@pytest.mark.parametrize("transport", ["asyncpg", "supabase-http"])
async def test_a_database_without_the_schema_is_named_as_such_with_exit_2(
    transport: str, tmp_path: Path, embedded_pg, database_url: str
) -> None:
    empty = await embedded_pg.create_database(migrated=False)
    env = {**base_env(tmp_path, database_url), "DB_AUTO_MIGRATE": "0"}
    endpoint = None
    if transport == "asyncpg":
        env["DATABASE_URL"] = empty
    else:
        endpoint = PostgrestEndpoint(empty)
        await endpoint.start()
        env.pop("DATABASE_URL")
        env.update(SUPABASE_URL=endpoint.url, SUPABASE_SERVICE_ROLE_KEY=endpoint.service_key)
    try:
        # A command and the bot itself, side by side: neither changes the database.
        (code, _, err), (bot_code, bot_out, bot_err) = await asyncio.gather(
            run((sys.executable, "worker.py", "accounts"), env), run((sys.executable, "worker.py"), {**env, "PORT": "0"})
        )
        assert code == 2 and one_clean_line(err) is None, err
        assert "the database has no schema yet" in err and "./start.sh db migrate" in err and "DB_AUTO_MIGRATE=1" in err
        assert bot_code == 2, bot_out + bot_err
        assert "the database has no schema yet" in bot_out + bot_err
        assert "Traceback" not in bot_out + bot_err
    finally:
        if endpoint is not None:
            await endpoint.stop()


async def test_start_sh_runs_the_bot_named_by_bot_in_dotenv_and_the_environment_wins(tmp_path: Path) -> None:
    copy = tmp_path / "clone"
    copy.mkdir()
    (copy / "start.sh").write_bytes((ROOT / "start.sh").read_bytes())
    (copy / "start.sh").chmod(0o755)
    for bot in ("worker", "ingest", "bot"):
        (copy / f"{bot}.py").write_text(f"import sys\nprint('{bot} ran', *sys.argv[1:])\n")
    (copy / ".env").write_text("# the bot to run\nBOT = 'ingest'  # ingest only\n")
    env = {**os.environ, "NO_VENV": "1", "PYTHON": sys.executable}
    env.pop("BOT", None)
    code, out, err = await run((str(copy / "start.sh"),), env)
    assert code == 0 and out.strip() == "ingest ran", err
    code, out, err = await run((str(copy / "start.sh"),), {**env, "BOT": "bot"})
    assert code == 0 and out.strip() == "bot ran", err
    code, out, err = await run((str(copy / "start.sh"), "worker", "send", "--help"), env)
    assert code == 0 and out.strip() == "worker ran send --help", "commands pass through to the bot"
