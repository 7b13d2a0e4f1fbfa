"""scripts/torch_train_step.py, the PyTorch step scripts/benchmark_train_step.py times beside the JAX one:
one step on the tiny assets trains every LoRA factor that has a gradient and gives a finite loss."""

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from torch_train_step import TorchTrainStep  # noqa: E402

from fairdiff_jax import config_cli
from fairdiff_jax.judging.tiny import build_tiny_assets


def test_one_step_moves_every_lora_up_factor(tmp_path):
    assets = build_tiny_assets(tmp_path / "assets")
    config = config_cli.load_config(str(ROOT / "configs" / "tiny.py"), [f"assets_dir={assets}"])
    step = TorchTrainStep(config, device="cpu")
    names = [n for n, _ in step.text_encoder.named_parameters() if "lora_linear_layer" in n]
    assert config.lora.train_text_encoder and config.lora.train_unet and names
    before = [p.detach().clone() for p in step.lora_parameters]
    # up = 0 at the start (lora.init), so only a gradient that reaches a LoRA layer through the adjusted-DFT
    # sampler, the judges and the loss can move its `up` factor (AdamW's decay keeps a zero at zero).
    ups = [i for i, p in enumerate(step.lora_parameters) if not p.detach().any()]
    assert len(ups) == len(before) // 2

    timings = {}
    logs = step.run("a photo of the face of a doctor", config.train.min_denoising_steps, 0, timings)

    assert logs["finite"] and np.isfinite(logs["loss"]) and logs["loss"] > 0
    assert set(timings) == {"sampling", "faces", "ot", "gradient"}
    unet_ups = [i for i in ups if i >= len(names)]
    assert unet_ups and len(ups) > len(unet_ups)  # both the text encoder's and the UNet's LoRA
    for i in ups:
        assert step.lora_parameters[i].detach().abs().max() > 0, f"LoRA parameter {i} got no gradient"
    assert all(torch.isfinite(p).all() for p in step.lora_parameters)
