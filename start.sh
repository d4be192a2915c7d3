#!/usr/bin/env bash
# The one entry point.
#   ./start.sh                      run the bot named by BOT (worker by default; .env counts)
#   ./start.sh test [pytest args]   run the test suite
#   ./start.sh bench NAME [args]    run bench/NAME.py (--quick, --json)
#   ./start.sh worker|ingest|bot [COMMAND ...]   that bot, or one of its commands (--help lists them)
#   ./start.sh sandbox [...]        python -m devkit.sandbox in the venv (the Telegram stand-in)
#   ./start.sh db|health|config|sessions [...]  python -m shared.<that> in the venv
#   ./start.sh supervisor [...]     supervisor.py (restarts the bot when it crashes or hangs)
#
# Creates .venv on first use and reinstalls only when the requirements change
# (a hash stamp inside .venv). On Railway (RAILWAY_ENVIRONMENT set) or with
# NO_VENV=1 it uses the interpreter it finds: the platform installed the
# requirements already.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

die() { echo "error: $*" >&2; exit 2; }

# benchmarks: the runnable modules of bench/ (a leading _ marks a helper module).
benchmarks() {
    local file names=()
    for file in bench/*.py; do
        [[ -f "$file" ]] || continue
        file=$(basename "$file" .py)
        [[ "$file" == _* ]] || names+=("$file")
    done
    echo "${names[*]}"
}

# env_or_dotenv NAME: the variable from the environment, else its value in .env (real variables win, as in the bots).
env_or_dotenv() {
    local name=$1 line value
    if [[ -n "${!name:-}" ]]; then
        echo "${!name}"
        return 0
    fi
    [[ -f .env ]] || return 0
    line=$(grep -E "^[[:space:]]*(export[[:space:]]+)?${name}[[:space:]]*=" .env | tail -n 1) || return 0
    value=${line#*=}
    value=${value%%#*}
    value=$(echo "$value" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e "s/^[\"']//" -e "s/[\"']\$//")
    echo "$value"
}

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

SYSTEM_PY=$(find_python) || die "Python 3.11 or newer is required (found: $(python3 --version 2>&1 || echo none)). Install it, or set PYTHON=/path/to/python3.11."

# ensure_env REQUIREMENTS_FILE: make sure the interpreter in $PY has that file installed.
ensure_env() {
    local reqs=$1
    if [[ -n "${RAILWAY_ENVIRONMENT:-}" || "${NO_VENV:-}" == "1" ]]; then
        PY=$SYSTEM_PY
        return 0
    fi
    if [[ ! -x .venv/bin/python ]]; then
        echo "start.sh: creating .venv with $("$SYSTEM_PY" --version)" >&2
        "$SYSTEM_PY" -m venv .venv || die "could not create .venv (on Debian: apt-get install python3-venv)"
    fi
    PY=.venv/bin/python
    local stamp=".venv/.stamp-$(basename "$reqs" .txt)"
    local want
    want=$(cat requirements*.txt | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        echo "start.sh: installing $reqs into .venv" >&2
        # (pip configs with missing local index folders print a line per package: not ours to show)
        "$PY" -m pip install --quiet --disable-pip-version-check -r "$reqs" \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || die "pip could not install $reqs"
        echo "$want" > "$stamp"
    fi
}

case "${1:-run}" in
    test)
        shift
        ensure_env requirements-dev.txt
        # Three workers by default (pytest-xdist; the process tests mostly wait, so 3 beat 2 on 2 cores;
        # TEST_WORKERS=0 for one process); a -n of your own wins. With no groups marked, loadgroup hands
        # out one test at a time, in the order tests/conftest.py sorts them (longest first).
        workers=()
        case " $* " in
            *" -n "* | *" -n="* | *" --numprocesses"*) ;;
            *) workers=(-n "${TEST_WORKERS:-3}" --dist loadgroup) ;;
        esac
        # The suite starts a few hundred interpreters: without bytecode files (PYTHONDONTWRITEBYTECODE,
        # set on some machines) each would compile our sources again.
        unset PYTHONDONTWRITEBYTECODE
        exec "$PY" -m pytest "${workers[@]}" "$@"
        ;;
    bench)
        shift
        [[ $# -ge 1 ]] || die "name a benchmark: ./start.sh bench NAME [--quick] [--json] (available: $(benchmarks))"
        if [[ "$1" == "-h" || "$1" == "--help" ]]; then
            echo "usage: ./start.sh bench NAME [--quick] [--json]   (available: $(benchmarks))"
            exit 0
        fi
        name=$1
        shift
        [[ "$name" != _* && -f "bench/$name.py" ]] || die "no benchmark named '$name' (available: $(benchmarks))"
        ensure_env requirements-bench.txt
        exec "$PY" "bench/$name.py" "$@"
        ;;
    run)
        ensure_env requirements.txt
        bot=$(env_or_dotenv BOT)
        bot=${bot:-worker}
        case "$bot" in
            worker | ingest | bot) ;;
            *) die "BOT must be one of worker, ingest, bot, got '$bot' (fix it in .env or the environment)" ;;
        esac
        export BOT=$bot
        if [[ "$(env_or_dotenv SUPERVISED)" == "1" ]]; then
            exec "$PY" supervisor.py
        fi
        exec "$PY" "$bot.py"
        ;;
    worker | ingest | bot)
        bot=$1
        shift
        ensure_env requirements.txt
        exec "$PY" "$bot.py" "$@"
        ;;
    supervisor)
        shift
        ensure_env requirements.txt
        exec "$PY" supervisor.py "$@"
        ;;
    sandbox)
        shift
        ensure_env requirements.txt
        exec "$PY" -m devkit.sandbox "$@"
        ;;
    db | health | config | sessions)
        module=$1
        shift
        ensure_env requirements.txt
        exec "$PY" -m "shared.$module" "$@"
        ;;
    -h | --help | help)
        # the usage lines of the header comment above
        sed -n '3,/^#$/p' "$0" | sed -e '/^#$/d' -e 's/^# //'
        ;;
    *)
        die "unknown command '$1' (./start.sh --help lists them: run, test, bench, worker, ingest, bot, sandbox, db, health, config, sessions, supervisor)"
        ;;
esac
