#!/usr/bin/env bash
# Sets up ./.venv (first run only), then runs the default test suite and after it the slow tests (the
# real SD-1.5 / ViT-H shapes, resume and device-count runs), both on 2 workers; CI (.ci/run) runs exactly this.
# --dist loadscope keeps a test module on one worker, so its module-scoped fixtures (a trained detector, loaded
# models) are built once, not once per worker.
# With arguments, runs pytest once with them instead, e.g. `bash scripts/test.sh -m "not slow"` for the
# default suite alone, or `bash scripts/test.sh tests/test_unet.py -k parity`. The two passes list their 10 slowest
# tests, so that CI's log shows where the default suite's 10 minutes go.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -n 2 --dist loadscope -q "$@"
fi
SECONDS=0
.venv/bin/python -m pytest -n 2 --dist loadscope -q --durations=10
echo "[test] default suite passed in ${SECONDS}s; now the slow tests" >&2
SECONDS=0
.venv/bin/python -m pytest -n 2 --dist loadscope -q -m slow --durations=10
echo "[test] slow tests passed in ${SECONDS}s" >&2
