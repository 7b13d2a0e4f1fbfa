"""scripts/device_check.sh, the one device measurement, run with --tiny on the CPU so that it cannot rot before a
GPU runs it; and scripts/random_models.py, the random networks it times."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import random_models  # noqa: E402


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# Slow (~2.5 min unloaded: it compiles a whole training step in a fresh process); CI's slow pass runs it, so the
# script cannot rot while the default suite stays under its 10 minutes.
@pytest.mark.slow
def test_device_check_tiny_writes_every_measurement(tmp_path):
    out = tmp_path / "dc"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--tiny", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=1900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "device_check.json").read_text())
    phases = summary["phases"]
    for phase in ("sampling_jax", "sampling_torch", "train_step"):
        assert phases[phase]["status"] == "ok", (phase, phases[phase], (out / f"{phase}.log").read_text()[-3000:])
        assert phases[phase]["tiny"] is True

    jax_sampling, torch_sampling, step = phases["sampling_jax"], phases["sampling_torch"], phases["train_step"]
    for key in ("images_per_second", "seconds_per_batch", "compile_seconds"):
        assert _positive(jax_sampling[key]), (key, jax_sampling[key])
    assert all(_positive(f) for f in jax_sampling["flops_per_batch"])
    assert _positive(torch_sampling["images_per_second"]) and _positive(torch_sampling["seconds_per_batch"])
    ratio = summary["sampling_ratio_jax_over_diffusers"]
    assert math.isclose(ratio, jax_sampling["images_per_second"] / torch_sampling["images_per_second"])

    for key in ("step_seconds", "first_step_seconds", "peak_memory_bytes", "gradient_stage_memory_analysis_bytes"):
        assert _positive(step[key]), (key, step[key])
    assert set(step["part_seconds"]) == {"sampling", "faces", "ot", "gradient", "total"}
    assert all(_positive(v) for v in step["part_seconds"].values())
    assert set(step["flops_per_step"]) == {"sampling", "faces", "gradient", "step"}
    for part, (lower, upper) in step["flops_per_step"].items():
        assert _positive(lower) and upper >= lower, (part, lower, upper)
    # No peak FLOP/s for a CPU: the fraction is left out rather than invented.
    assert jax_sampling["fraction_of_bf16_peak"] is None and all(v is None for v in step["fraction_of_bf16_peak"].values())
    assert "training step" in run.stdout and "images/s" in run.stdout


def test_random_weights_follow_the_names_and_fan_in():
    abstract = {
        "dense": {"kernel": jax.ShapeDtypeStruct((400, 30), jnp.bfloat16), "bias": jax.ShapeDtypeStruct((30,), jnp.float32)},
        "norm": {"scale": jax.ShapeDtypeStruct((30,), jnp.float32)},
        "batch_stats": {"mean": jax.ShapeDtypeStruct((8,), jnp.float32), "var": jax.ShapeDtypeStruct((8,), jnp.float32)},
    }
    weights = random_models.random_weights(abstract, seed=0)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), weights) == jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    kernel = np.asarray(weights["dense"]["kernel"], np.float32)
    assert abs(kernel.std() - 1 / 20) < 0.005  # std 1/sqrt(fan-in 400)
    assert not np.asarray(weights["dense"]["bias"]).any() and not np.asarray(weights["batch_stats"]["mean"]).any()
    assert (np.asarray(weights["norm"]["scale"]) == 1).all() and (np.asarray(weights["batch_stats"]["var"]) == 1).all()
    again = random_models.random_weights(abstract, seed=0)
    np.testing.assert_array_equal(np.asarray(again["dense"]["kernel"], np.float32), kernel)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_sd15_shapes_have_sd15_parameter_counts():
    """The abstract SD v1-5 networks have the parameter counts of the released model's UNet, VAE decoder and text encoder."""
    sd, _, _ = random_models.abstract_models(random_models.SHAPES["sd15"], jnp.bfloat16)
    count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))  # noqa: E731
    assert count(sd.unet_params) == 859_520_964
    assert count(sd.text_encoder_params) == 123_060_480
    assert 49_000_000 < count(sd.vae_params) < 50_000_000  # the decoder and post_quant_conv of the 83.7M AutoencoderKL
