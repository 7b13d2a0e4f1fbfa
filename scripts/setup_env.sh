#!/usr/bin/env bash
# Creates ./.venv and installs requirements.txt into it, with the jax build for this machine's accelerator; a
# second run is a no-op unless requirements.txt, pyproject.toml or the accelerator changed (stamped in the venv).
#
#   bash scripts/setup_env.sh                          # detects an NVIDIA GPU with nvidia-smi
#   FAIRDIFF_ACCELERATOR=cpu bash scripts/setup_env.sh # or cuda (CUDA 13 or 12 by the driver), cuda13, cuda12
#   bash scripts/setup_env.sh --which-jax              # prints the jax requirement it would install, and stops
#
# The pinned jax (requirements.txt) comes with its CPU jaxlib; on an NVIDIA GPU the same version's CUDA plugin is
# added: jax[cuda13] when the driver supports CUDA 13 (driver >= 580, as the PyTorch wheels of requirements.txt,
# built for CUDA 13.0, need), else jax[cuda12]. CUDA, cuDNN and NCCL come as pip wheels: only the driver is needed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
jax_version=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$root/requirements.txt")
[ -n "$jax_version" ] || { echo "[setup] requirements.txt pins no jax==<version>" >&2; exit 1; }

# -> cpu | cuda12 | cuda13, and why, from FAIRDIFF_ACCELERATOR (auto by default) and nvidia-smi.
choose_accelerator() {
  local wanted="${FAIRDIFF_ACCELERATOR:-auto}" driver="" major=""
  case "$wanted" in
    cpu | cuda12 | cuda13) echo "$wanted FAIRDIFF_ACCELERATOR=$wanted"; return ;;
  esac
  if command -v nvidia-smi > /dev/null 2>&1; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' ' || true)
  fi
  if [ -z "$driver" ]; then
    if [ "$wanted" = cuda ]; then
      echo "cuda13 FAIRDIFF_ACCELERATOR=cuda (no nvidia-smi answer: CUDA 13 assumed)"
    else
      echo "cpu no NVIDIA GPU found (nvidia-smi absent or no GPU)"
    fi
    return
  fi
  major=${driver%%.*}
  if [ "$major" -ge 580 ] 2> /dev/null; then
    echo "cuda13 NVIDIA driver $driver (CUDA 13)"
  else
    echo "cuda12 NVIDIA driver $driver (older than 580: CUDA 12; the CUDA 13 PyTorch wheels will not see the GPU)"
  fi
}

case "${FAIRDIFF_ACCELERATOR:-auto}" in
  auto | cpu | cuda | cuda12 | cuda13) ;;
  *) echo "[setup] FAIRDIFF_ACCELERATOR=$FAIRDIFF_ACCELERATOR: expected auto, cpu, cuda, cuda12 or cuda13" >&2; exit 2 ;;
esac
read -r accelerator reason <<< "$(choose_accelerator)"
if [ "$accelerator" = cpu ]; then
  jax_requirement="jax==$jax_version"
else
  jax_requirement="jax[$accelerator]==$jax_version"
fi
if [ "${1:-}" = "--which-jax" ]; then
  echo "$jax_requirement ($reason)"
  exit 0
fi

# The CPU build is requirements.txt's own jax: its stamp is the hash of the two files alone.
want=$( (cat "$root/requirements.txt" "$root/pyproject.toml"; [ "$accelerator" = cpu ] || echo "$jax_requirement") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing requirements into $venv (first run: ~3 minutes, ~7.5 GB; CUDA wheels add ~3 GB)" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
"$venv/bin/python" -m pip install -q -r "$root/requirements.txt" 2>&1 | grep -v "is ignored" >&2 || true
if [ "$accelerator" != cpu ]; then
  "$venv/bin/python" -m pip install -q "$jax_requirement" 2>&1 | grep -v "is ignored" >&2 || true
fi
# The package itself, editable, so that scripts/ and any working directory can import it.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" 2>&1 | grep -E "^(ERROR|error)" >&2 || true
# pip's exit status is hidden by the filters above: check the install really worked.
"$venv/bin/python" -c "import jax, flax, optax, orbax.checkpoint, ml_collections, torch, torchvision, diffusers, transformers, fairdiff_jax.training.alignment" \
  || { echo "[setup] install failed: see pip output above" >&2; exit 1; }
if [ "$accelerator" != cpu ]; then
  "$venv/bin/python" -c "import importlib.metadata as m; m.version('jax-$accelerator-plugin')" 2> /dev/null \
    || { echo "[setup] $jax_requirement did not install (jax-$accelerator-plugin missing): see pip output above" >&2; exit 1; }
  # jax falls back to the CPU silently when the plugin cannot start: ask it.
  platform=$("$venv/bin/python" -c "import jax; print(jax.devices()[0].platform)" 2> /dev/null || echo "none")
  if [ "$platform" != gpu ]; then
    echo "[setup] WARNING: $jax_requirement is installed but jax runs on '$platform', not the GPU ($reason)." >&2
    echo "[setup] Check the driver (nvidia-smi) or choose another build: FAIRDIFF_ACCELERATOR=cuda12|cuda13|cpu" >&2
  fi
fi
echo "[setup] jax build: $jax_requirement ($reason)" >&2
echo "$want" > "$stamp"
