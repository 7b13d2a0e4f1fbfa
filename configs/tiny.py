"""Tiny random-weight training run: experiment 5's loop end to end on a CPU in seconds per step.

Run (from the repository root):
    python -m fairdiff_jax.judging.tiny /tmp/tiny_assets
    python -m fairdiff_jax.train --config configs/tiny.py --config.assets_dir=/tmp/tiny_assets --workdir /tmp/tiny_run
    # 2 CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m fairdiff_jax.train ...

What to expect: nothing about fairness (every network is random, and the detector is
tiny_assets.CentralFaceDetector, a fixed central "face" on about half the images); the run exercises every
stage of a step (sampling with and without LoRA, detection, chips, OT targets, all loss terms, the
adjusted-DFT gradient, AdamW + EMA, checkpoints, evaluation) on 32x32 images. A step takes a few seconds on
a 2-core CPU after ~1-2 minutes of compilation (one compile per denoising-step count, here 2 and 3).
"""

from configs import common


def get_config():
    config = common.get_base_config()
    config.name = "tiny"
    config.seed = 0
    config.assets_dir = "/tmp/tiny_assets"
    common.flat_asset_layout(config)
    config.model.dtype = "float32"

    config.lora.rank = 4
    config.lora.train_text_encoder = True
    config.lora.train_unet = True

    config.optim.learning_rate = 1e-3  # large enough that a few steps move the LoRA visibly

    config.train.max_steps = 4
    config.train.images_per_prompt = 4
    config.train.micro_batch_size = 2
    config.train.generation_batch_size = 2
    config.train.min_denoising_steps = 2
    config.train.max_denoising_steps = 3
    config.train.plot_every_steps = 2

    config.loss.img_size_small = 28  # the tiny CLIP's image size; DINOv2 (patch 7) sees 4 x 4 patches
    config.loss.ot_num_samples = 20

    config.faces.size_face = 32  # mobilenet's smallest input
    config.faces.size_aligned_face = 112  # SFNet-20's fc fixes 112
    config.faces.detector = "fairdiff_jax.judging.tiny:CentralFaceDetector"

    config.ckpt.every_steps = 2
    config.ckpt.keep = 2
    config.ckpt.permanent_every_steps = 4

    config.eval.every_steps = 1000
    config.eval.at_start = False
    config.eval.images_per_prompt = 2
    config.eval.batch_size = 2
    config.eval.num_denoising_steps = 2
    config.eval.prompts_per_kind = 1
    config.eval.detector = "fairdiff_jax.judging.tiny:CentralFaceDetector"
    config.eval.fidelity_k = 1  # 2 images per prompt: each has one neighbour
    return config
