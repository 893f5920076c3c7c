#!/bin/bash
# The test command: bash tests/run.sh [pytest args...]  (from any directory).
# Runs all of tests/ unless the arguments name test files or node ids.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tests/bootstrap.sh"
cd "$ROOT"
for arg in "$@"; do
    case $arg in -*) continue ;; esac
    # a path given: pytest "tests" too would run the whole suite
    if [ -e "${arg%%::*}" ]; then exec .venv/bin/python -m pytest "$@"; fi
done
# The whole suite: one worker per core, each with its own servers (session fixtures run per
# worker); a module's tests stay on one worker, so its module-scoped servers start once.
exec .venv/bin/python -m pytest tests -n "${MAILBACKUP_TEST_WORKERS:-2}" --dist loadfile "$@"
