"""Experiment 5, UNet LoRA: debias gender x race jointly over four kinds of prompts.

Run (from the repository root):
    python -m fairdiff_jax.train --config configs/debias_unet.py
On a TPU VM slice: scripts/tpu_vm.sh.

What to expect: the same schedule as configs/debias_text_encoder.py (15000 steps, 40 images per prompt
per step, evaluation every 200 steps); the backward pass goes through the UNet's LoRA at every
denoising step, hence micro-batches of 3 images (the original's memory limit on A100-40GB). The original
reports ~23 s per step on 2 x A100 for its runs; the paper's multi-concept table (docs/method.md#what-the-paper-reports) is for the
text-encoder LoRA, there are no published numbers for this variant to compare with.
"""

from configs import common


def get_config():
    config = common.get_base_config()
    config.name = "debias_unet"
    config.lora.train_text_encoder = False
    config.lora.train_unet = True
    config.train.micro_batch_size = 3
    return config
