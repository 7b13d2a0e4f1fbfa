#!/usr/bin/env bash
# One device measurement (scripts/device_check.py says what each phase measures): sampling throughput of this
# project and of diffusers' PyTorch pipeline, then one training step at the original's batch. Each phase runs in
# its own process (JAX and PyTorch do not share the GPU's memory) under its own time limit, so a slow phase
# cannot eat the others' time; a phase that fails or runs out of time is recorded as such in the summary.
#
#   bash scripts/device_check.sh [--out DIR] [--limits 120,90,270]   # one GPU, SD v1-5 shapes: ~8 minutes at most
#   bash scripts/device_check.sh --tiny --out /tmp/dc                  # the same code paths on the CPU, tiny models
# Other options go to every phase (e.g. --train-attention cudnn, --sampling-attention cudnn).
# Writes DIR/<phase>.json, DIR/<phase>.log and DIR/device_check.json (all phases, the ratio, the targets);
# prints the summary.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
out="device_check"
limits="120,90,270"  # seconds per phase: sampling_jax, sampling_torch, train_step (8 minutes in all)
tiny=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --limits) limits="$2"; shift 2 ;;
    --tiny) tiny=(--tiny); limits="${DEVICE_CHECK_TINY_LIMITS:-600,300,900}"; shift ;;
    *) extra+=("$1"); shift ;;
  esac
done
mkdir -p "$out"
IFS=, read -r -a limit_list <<< "$limits"
phases=(sampling_jax sampling_torch train_step)
for i in "${!phases[@]}"; do
  phase="${phases[$i]}"
  limit="${limit_list[$i]:-300}"
  rm -f "$out/$phase.json"
  echo "[device_check] $phase (at most $limit s)" >&2
  # PYTHONPATH: the package, also when it is not installed in the environment. The PyTorch phase keeps jax (it draws
  # the noise with it) on the CPU: on the GPU, jax would take 75% of the GPU's memory before PyTorch starts.
  platforms="${JAX_PLATFORMS:-}"
  [ "$phase" = sampling_torch ] && platforms=cpu
  JAX_PLATFORMS="$platforms" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$limit" \
    "$python" "$root/scripts/device_check.py" --phase "$phase" --out "$out/$phase.json" "${tiny[@]}" "${extra[@]}" \
    > "$out/$phase.log" 2>&1
  status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "{\"status\": \"timed out after $limit s\", \"phase\": \"$phase\"}" > "$out/$phase.json"
  elif [ "$status" -ne 0 ]; then
    echo "[device_check] $phase failed (exit $status); its last lines ($out/$phase.log):" >&2
    tail -n 5 "$out/$phase.log" >&2
    "$python" -c 'import json, sys; print(json.dumps({"status": f"failed (exit {sys.argv[1]}), see {sys.argv[2]}", "phase": sys.argv[3]}))' \
      "$status" "$out/$phase.log" "$phase" > "$out/$phase.json"
  fi
done
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" "$root/scripts/device_check.py" --summary "$out"
