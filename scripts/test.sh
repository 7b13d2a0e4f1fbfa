#!/usr/bin/env bash
# Sets up ./.venv (first run only) and runs the default test suite (slow tests skipped) on 2 workers.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the real-shape tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
exec .venv/bin/python -m pytest -n 2 -q "$@"
