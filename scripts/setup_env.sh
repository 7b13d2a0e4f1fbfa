#!/usr/bin/env bash
# Creates ./.venv and installs requirements.txt into it; a second run is a no-op unless
# requirements.txt or pyproject.toml changed (their hash is stamped inside the venv).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want=$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing requirements into $venv (first run: ~3 minutes, ~7.5 GB)" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
"$venv/bin/python" -m pip install -q -r "$root/requirements.txt" 2>&1 | grep -v "is ignored" >&2 || true
# The package itself, editable, so that scripts/ and any working directory can import it.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" 2>&1 | grep -E "^(ERROR|error)" >&2 || true
# pip's exit status is hidden by the filter above: check the install really worked.
"$venv/bin/python" -c "import jax, flax, optax, orbax.checkpoint, ml_collections, torch, torchvision, diffusers, transformers, fairdiff_jax.training.alignment" \
  || { echo "[setup] install failed: see pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
