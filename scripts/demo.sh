#!/usr/bin/env bash
# The built-in default, end to end on this machine's CPU: set-up, then the main job on tiny
# random-weight stand-ins for every network (configs/tiny.py): train text-encoder + UNet LoRA for
# 4 steps on 2 (virtual) CPU devices, export the LoRA, generate images with it.
# Random networks say nothing about fairness; the run proves every stage works together.
# Output under demo_out/ (or the folder given as $1). A second run starts the training afresh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_env.sh"
cd "$root"
out=$(realpath -m "${1:-demo_out}")
py=.venv/bin/python
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2"

echo "== 1/4 tiny random assets -> $out/assets"
$py -m fairdiff_jax.tiny_assets "$out/assets" >/dev/null
echo "== 2/4 train (configs/tiny.py, 4 steps, 2 CPU devices) -> $out/run"
rm -rf "$out/run"
$py -m fairdiff_jax.train --config configs/tiny.py --config.assets_dir="$out/assets" --workdir "$out/run"
echo "== 3/4 export step 4"
$py -m fairdiff_jax.export --workdir "$out/run" --step 4 --out "$out/lora"
echo "== 4/4 generate with the EMA LoRA"
printf '{"test_prompts": ["a photo of the face of a doctor", "a photo of the face of a nurse"]}\n' > "$out/prompts.json"
$py -m fairdiff_jax.generate --model "$out/assets/sd" --prompts "$out/prompts.json" --save_dir "$out/images" \
  --num_imgs_per_prompt 4 --batch_size 4 --steps 10 --dtype float32 \
  --text_encoder_lora "$out/lora/text_encoder_lora_EMA.pth" --unet_lora "$out/lora/unet_lora_EMA.pth"
echo "done: metrics in $out/run/metrics.jsonl, evaluation grids in $out/run/eval/, images in $out/images/"
