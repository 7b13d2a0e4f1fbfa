#!/usr/bin/env bash
# Cloud TPU VM life cycle for training: create the VM, put this working tree on every worker, install,
# start the same training command on all hosts, read logs, delete. Needs the gcloud CLI, logged in.
#
#   bash scripts/tpu_vm.sh create
#   bash scripts/tpu_vm.sh setup                   # copy repo + install on all workers (re-run after edits)
#   bash scripts/tpu_vm.sh train [--config.key=value ...]
#   bash scripts/tpu_vm.sh logs                    # last lines of worker 0's log
#   bash scripts/tpu_vm.sh delete
#
# Settings (environment variables):
#   TPU_NAME (fairdiff)  ZONE (us-central2-b)  ACCELERATOR (v4-8; e.g. v4-32 is 4 hosts, v5litepod-8)
#   RUNTIME (tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite)  PROJECT (gcloud's default if unset)
#   CONFIG (configs/debias_text_encoder.py)
#   WORKDIR: checkpoints and logs. With several hosts it MUST be shared, e.g. gs://BUCKET/runs/te
#            (orbax writes each array shard from the host that holds it); unset = the config's local one.
#   ASSETS_GCS: optional gs:// folder with the model files (see configs/common.py), copied to ./assets
#            on every worker by `setup`.
set -euo pipefail

TPU_NAME=${TPU_NAME:-fairdiff}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/debias_text_encoder.py}
root=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=fairdiff_jax
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

on_all_workers() {  # runs a shell command on every host of the slice at once
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    # The working tree as it is (uncommitted edits included), without the local venv, git data, outputs.
    tarball=$(mktemp --suffix=.tar.gz)
    tar -C "$root" --exclude=./.venv --exclude=./.git --exclude=./workdirs --exclude=./assets -czf "$tarball" .
    "${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME":fairdiff_jax.tar.gz "${where[@]}" --worker=all
    rm -f "$tarball"
    # jax 0.10 needs Python >= 3.11 (the Ubuntu 22.04 TPU images bring 3.10). Then the same pinned stack
    # as everywhere (scripts/setup_env.sh), jax's TPU build of the same version (libtpu) in place of the
    # CPU one, and gcsfs so that orbax can write gs:// workdirs.
    jax_version=$(sed -n 's/^jax==//p' "$root/requirements.txt")
    install="sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv"
    install+=" && mkdir -p $remote_dir && tar -xzf fairdiff_jax.tar.gz -C $remote_dir && cd $remote_dir"
    install+=" && { [ -x .venv/bin/python ] || python3.11 -m venv .venv; }"
    install+=" && bash scripts/setup_env.sh && .venv/bin/pip install -q 'jax[tpu]==$jax_version' gcsfs"
    if [ -n "${ASSETS_GCS:-}" ]; then
      install+=" && mkdir -p assets && gcloud storage cp -r '${ASSETS_GCS%/}/*' assets/"
    fi
    on_all_workers "$install"
    ;;
  train)
    shift
    overrides=${WORKDIR:+--config.workdir=$WORKDIR}
    for arg in "$@"; do overrides+=" $(printf '%q' "$arg")"; done
    # FAIRDIFF_MULTI_PROCESS=1: every host starts jax.distributed (parallel.initialize_distributed);
    # JAX finds the other hosts itself on TPU VMs. nohup: the run survives the ssh session.
    on_all_workers "cd $remote_dir && FAIRDIFF_MULTI_PROCESS=1 nohup .venv/bin/python -m fairdiff_jax.train \
      --config $CONFIG $overrides > train.log 2>&1 < /dev/null &"
    ;;
  logs)
    "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0 --command="tail -n ${LINES:-50} $remote_dir/train.log"
    ;;
  delete)
    "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *)
    sed -n '2,21p' "$0"
    exit 2
    ;;
esac
