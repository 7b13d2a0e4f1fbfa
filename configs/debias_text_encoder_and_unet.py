"""Experiment 5, LoRA on both the text encoder and the UNet: debias gender x race jointly.

Run (from the repository root):
    python -m fairdiff_jax.train --config configs/debias_text_encoder_and_unet.py
On a TPU VM slice: scripts/tpu_vm.sh.

What to expect: as configs/debias_unet.py (micro-batches of 3 images, 15000 steps, evaluation every 200
steps); both LoRA trees share one AdamW and one EMA. No published numbers for this variant (the paper's
multi-concept table, docs/method.md#what-the-paper-reports, is for the text-encoder LoRA).
"""

from configs import common


def get_config():
    config = common.get_base_config()
    config.name = "debias_text_encoder_and_unet"
    config.lora.train_text_encoder = True
    config.lora.train_unet = True
    config.train.micro_batch_size = 3
    return config
