#!/usr/bin/env bash
# The built-in default, end to end on this machine's CPU: set-up, then experiment 5's debiasing in the
# miniature world (configs/miniature.py, assets/miniature/: a small real Stable Diffusion with strong
# occupation-dependent gender x race bias, its classifiers, face bank and face detector):
#   1. train a text-encoder + UNet LoRA with the distributional alignment loss on 2 (virtual) CPU devices,
#   2. export it (the original's .pth files and diffusers/PEFT safetensors, plain and EMA),
#   3. generate the original and the debiased (EMA) model's images (32 per prompt, same seeds) for the
#      22 held-out prompts of the four kinds, evaluate both with the test classifiers and the evaluation's
#      judges and print the bias before -> after beside fidelity, prompt consistency and face share.
# About 8 minutes after set-up on 2 cores (README.md: the measured time and its table).
# Output under demo_out/ (or the folder given as $1); a second run starts afresh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
out=$(realpath -m "${1:-demo_out}")
py=.venv/bin/python
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
SECONDS=0

echo "== 1/3 train (configs/miniature.py: 32 steps, 2 CPU devices) -> $out/run"
rm -rf "$out/run" "$out/lora" "$out/before_after"
$py -m fairdiff_jax.train --config configs/miniature.py --workdir "$out/run"
echo "== 2/3 export the last checkpoint -> $out/lora"
$py -m fairdiff_jax.export --workdir "$out/run" --out "$out/lora"
echo "== 3/3 original vs debiased (EMA) on the held-out prompts -> $out/before_after"
$py -m fairdiff_jax.before_after --config configs/miniature.py --out "$out/before_after" --images_per_prompt 32 \
  --text_encoder_lora "$out/lora/text_encoder_lora_EMA.pth" --unet_lora "$out/lora/unet_lora_EMA.pth"
echo "done in ${SECONDS}s: metrics in $out/run/metrics.jsonl, images and tables in $out/before_after/"
