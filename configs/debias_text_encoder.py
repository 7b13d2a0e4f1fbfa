"""Experiment 5, text-encoder LoRA: debias gender x race jointly over four kinds of prompts.

Run (from the repository root; one process drives all local GPUs, the batch of 40 images per prompt
is split over them):
    python -m fairdiff_jax.train --config configs/debias_text_encoder.py
    # e.g. --config.workdir=/data/runs/te --config.assets_dir=/data/assets --config.train.micro_batch_size=2
On a TPU VM slice: scripts/tpu_vm.sh (same command on every host).

What to expect:
  - Cost: the original took ~23 s per step on 2 x A100-SXM4-40GB (40 images per prompt), ~4 days for
    the 15000 steps; the debiasing is mostly there by step ~4000 (the paper's released checkpoint is
    step 12600, EMA weights). This port's own step time is not measured yet.
  - Training log: gender / race / gender x race gaps of the training batches fall over the first few
    thousand steps, evaluation every 200 steps (and at step 0) for the current and the EMA weights.
  - Paper (docs/method.md#what-the-paper-reports; 160 test images per prompt, 30 sampling steps; bias = mean |freq_i - freq_j| over
    class pairs; gender / race / gender x race), SD v1-5 -> debiased:
        occupations                        .67/.42/.21 -> .23/.10/.07
        sports                             .56/.38/.19 -> .37/.11/.08
        occupations with style and context .41/.37/.18 -> .31/.19/.11
        personal descriptors               .37/.36/.17 -> .18/.13/.07
"""

from configs import common


def get_config():
    config = common.get_base_config()
    config.name = "debias_text_encoder"
    config.lora.train_text_encoder = True
    config.lora.train_unet = False
    config.train.micro_batch_size = 4
    return config
