"""The classifier trainer's BatchNorm recompute (fairdiff_jax/classifier/batch_norm.py) against torch's, the one
scripts/build_miniature.py ends `train_mobilenet` with: reset_running_stats, momentum None, train-mode forwards."""

import pytest
import jax
import numpy as np
import torch
from torchvision.models import mobilenetv3

from fairdiff_jax.classifier.batch_norm import recompute_batch_stats
from fairdiff_jax.judging.mobilenet_v3 import load_mobilenet_v3, torchvision_state_dict
from fairdiff_jax.training import parallel

# float32 on both sides: max-abs difference allowed per statistic, relative to that statistic's largest
# magnitude over the layer's channels. Measured 7e-6 to 1.1e-5 (the variances of the last stages, which every
# earlier layer's float32 rounding reaches, as in the logits' 2e-5 of tests/test_mobilenet_v3.py); the
# statistics before the recompute are 8e2 off, a variance off by 7 / 8 is 0.125 off.
RELATIVE_TOL = 5e-5
SIZE = 32  # the last stages are 1 x 1: n = N there, where the unbiased and biased variances differ most


def _random_torch_classifier(num_classes: int = 4) -> torch.nn.Module:
    """torchvision's mobilenet_v3_large(width_mult=0.25) with random BatchNorm affine terms and biases (as
    tests/test_mobilenet_v3.py does): every layer's statistics depend on the weights before it."""
    torch.manual_seed(0)
    model = mobilenetv3.mobilenet_v3_large(num_classes=num_classes, width_mult=0.25)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.bias is not None:
                module.bias.normal_(0.0, 0.2)
    return model


def _chip_batches() -> list[np.ndarray]:
    """Three batches [B, SIZE, SIZE, 3] in [-1, 1]; the last one smaller (it weighs as much in torch)."""
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32) for n in (8, 8, 5)]


def _torch_recompute(model: torch.nn.Module, batches: list[np.ndarray]) -> dict:
    """scripts/build_miniature.py's recompute; returns {'<layer>.running_mean' / '.running_var': numpy}."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average
        model.train()
        for chips in batches:
            model(torch.from_numpy(chips.transpose(0, 3, 1, 2)))
    return {k: v.numpy() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def _largest_relative_error(got: dict, want: dict) -> float:
    return max(float(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-12)) for k in want)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_recompute_equals_torchs_cumulative_average(tmp_path):
    model = _random_torch_classifier()
    torch.save(model.state_dict(), tmp_path / "start.pt")
    module, variables = load_mobilenet_v3(tmp_path / "start.pt", 4)
    batches = _chip_batches()
    want = _torch_recompute(model, batches)

    mesh = parallel.make_mesh()
    recomputed, counts = recompute_batch_stats(module, parallel.replicate(variables, mesh), batches, mesh)
    assert counts == {"batches": 3, "chips": 21}
    # Compared through the .pt export, so the choice of the unbiased variance in Flax's `var` is checked
    # against torch's running_var where it matters: the file a debiasing config loads.
    got = {k: v.numpy() for k, v in torchvision_state_dict(jax.device_get(recomputed)).items() if k in want}
    assert set(got) == set(want) and len(want) == 2 * 46  # mean and var of every BatchNorm
    error = _largest_relative_error(got, want)
    assert error < RELATIVE_TOL, error

    # The check can fail: the converted torch start (running statistics 0 / 1) is far off, and so is a variance
    # off by 7 / 8, the biased / unbiased ratio of the 1 x 1 stages' batches of 8 (what storing Flax's biased
    # variance would do there).
    before = {k: v.numpy() for k, v in torchvision_state_dict(variables).items() if k in want}
    assert _largest_relative_error(before, want) > 1e3 * RELATIVE_TOL
    biased = {k: v * (7 / 8) if k.endswith("running_var") else v for k, v in got.items()}
    assert _largest_relative_error(biased, want) > 1e3 * RELATIVE_TOL
