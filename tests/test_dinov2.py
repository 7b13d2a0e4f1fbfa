"""DINOv2 against transformers' PyTorch Dinov2Model (random weights, float32), and the torch-hub loader.

The tiny model has a 37x37 pretraining grid like ViT-B/14 at 518 px (patch 7, image 259) and runs on 112 px
inputs (16x16 grid, like 224 px with patch 14), so the position embeddings go through the same 37 -> 16
bicubic resampling as the real model. torch hub cannot be reached here: the test builds a hub-format
state dict from the transformers model (renaming keys, fusing q/k/v into `attn.qkv`, as the released
dinov2_vitb14 .pth lays them out) and writes the hub's interpolation (scale_factor = (16 + 0.1) / 37) with
torch.nn.functional.interpolate as the reference.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import transformers
from test_clip import (
    randomize_,  # the one helper that randomises every parameter of a torch model
)

from fairdiff_jax.judging import dinov2
from fairdiff_jax.nn.weights import WeightLoadError

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=7, image_size=7 * 37, mlp_ratio=4)
INPUT = 112  # -> 16 x 16 patches


def tiny_reference(seed: int = 0, **overrides) -> transformers.Dinov2Model:
    torch.manual_seed(seed)
    return randomize_(transformers.Dinov2Model(transformers.Dinov2Config(**{**TINY, **overrides})), seed=seed)


def hub_state_dict(ref: transformers.Dinov2Model) -> dict[str, torch.Tensor]:
    """The transformers weights under torch-hub DinoVisionTransformer names, with q/k/v fused as `attn.qkv`."""
    sd = ref.state_dict()
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "mask_token": sd["embeddings.mask_token"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(ref.config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.qkv.{leaf}"] = torch.cat([sd[src + f"attention.{p}_proj.{leaf}"] for p in "qkv"])
            out[dst + f"attn.proj.{leaf}"] = sd[src + f"attention.o_proj.{leaf}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[dst + f"{name}.{leaf}"] = sd[src + f"{name}.{leaf}"]
        out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
    return out


def hub_style_reference(ref: transformers.Dinov2Model, input_size: int) -> transformers.Dinov2Model:
    """A transformers model for `input_size` whose position embeddings are the hub's resampling of ref's."""
    side = math.isqrt(ref.embeddings.position_embeddings.shape[1] - 1)
    grid = input_size // ref.config.patch_size
    pos = ref.embeddings.position_embeddings.detach()
    patch = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / side
    patch = torch.nn.functional.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    out = transformers.Dinov2Model(transformers.Dinov2Config(**{**ref.config.to_dict(), "image_size": input_size})).eval()
    state = dict(ref.state_dict())
    state["embeddings.position_embeddings"] = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)
    out.load_state_dict(state)
    return out


def test_matches_transformers_with_interpolated_positions(tmp_path):
    ref = tiny_reference()
    ref.save_pretrained(tmp_path)
    model, params = dinov2.load_dinov2(tmp_path, input_size=INPUT)
    assert params["embeddings"]["position_embeddings"].shape == (1, 257, 32)

    pixels = np.random.default_rng(0).normal(size=(2, INPUT, INPUT, 3)).astype(np.float32)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(pixels)))
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
    print(f"dinov2 pooler_output: max abs diff {np.abs(got - want).max():.2e} (values ~{np.abs(want).max():.2f})")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bicubic_matrix_is_torch_interpolate():
    signal = np.random.default_rng(1).normal(size=(1, 5, 37, 37)).astype(np.float32)
    for size, scale_factor in ((16, None), (16, 16.1 / 37), (50, None), (53, 53.1 / 37)):
        matrix = dinov2.torch_bicubic_matrix(37, size, scale_factor)
        got = np.einsum("hi,ncij,wj->nchw", matrix, signal, matrix)
        kwargs = {"scale_factor": (scale_factor, scale_factor)} if scale_factor else {"size": (size, size)}
        want = torch.nn.functional.interpolate(torch.from_numpy(signal), mode="bicubic", align_corners=False, **kwargs).numpy()
        # torch rounds its weights and sums to float32: ~2e-6 on values ~3.
        np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)
    # The offset form samples elsewhere than the size form: the two reference conventions differ.
    assert np.abs(dinov2.torch_bicubic_matrix(37, 16, 16.1 / 37) - dinov2.torch_bicubic_matrix(37, 16)).max() > 1e-2


def test_hub_checkpoint_loads_like_transformers_and_reproduces_hub_interpolation(tmp_path):
    ref = tiny_reference(seed=2)
    ref.save_pretrained(tmp_path)
    torch.save(hub_state_dict(ref), tmp_path / "dinov2_tiny_pretrain.pth")
    config = dinov2.Dinov2Config(**TINY)

    # Same interpolation convention -> bit-identical params from both file formats.
    _, params_transformers = dinov2.load_dinov2(tmp_path, input_size=INPUT)
    _, params_hub_size = dinov2.load_dinov2_hub(tmp_path / "dinov2_tiny_pretrain.pth", config, INPUT, interpolate_offset=0.0)
    jax.tree.map(np.testing.assert_array_equal, params_hub_size, params_transformers)

    # torch hub's own convention (the original's features).
    model, params = dinov2.load_dinov2_hub(tmp_path / "dinov2_tiny_pretrain.pth", config, INPUT)
    reference = hub_style_reference(ref, INPUT)
    images = np.random.default_rng(3).uniform(-1, 1, size=(2, 150, 150, 3)).astype(np.float32)
    got = np.asarray(dinov2.dino_image_embeds(model, params, jnp.asarray(images)))
    x = TF.resize(torch.from_numpy(images).permute(0, 3, 1, 2), [INPUT, INPUT], antialias=False)
    mean = torch.tensor(dinov2.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(dinov2.IMAGENET_STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.nn.functional.normalize(reference(pixel_values=((x + 1) * 0.5 - mean) / std).pooler_output, dim=-1).numpy()
    print(f"dino feature (hub interpolation): max abs diff {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # transformers 5's convention would not pass this comparison: the offset matters.
    got_size = np.asarray(dinov2.dino_image_embeds(model, params_hub_size, jnp.asarray(images)))
    assert np.abs(got_size - want).max() > 1e-4  # 10x the tolerance above (measured 2.3e-4)


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(WeightLoadError, match="model folder not found: .*absent"):
        dinov2.load_dinov2(tmp_path / "absent")
    with pytest.raises(WeightLoadError, match="weights file not found: .*absent.pth"):
        dinov2.load_dinov2_hub(tmp_path / "absent.pth", dinov2.Dinov2Config(**TINY), INPUT)

    ref = tiny_reference(seed=4)
    state = hub_state_dict(ref)
    config = dinov2.Dinov2Config(**TINY)
    torch.save({k: v for k, v in state.items() if k != "blocks.1.ls2.gamma"}, tmp_path / "missing.pth")
    with pytest.raises(WeightLoadError, match=r"missing.pth[\s\S]*missing[\s\S]*encoder/layer_1/layer_scale2"):
        dinov2.load_dinov2_hub(tmp_path / "missing.pth", config, INPUT)
    torch.save(state, tmp_path / "wide.pth")
    with pytest.raises(WeightLoadError, match=r"blocks.0.mlp.fc1.weight: file \(32, 128\) vs model \(32, 64\)"):
        dinov2.load_dinov2_hub(tmp_path / "wide.pth", dinov2.Dinov2Config(**{**TINY, "mlp_ratio": 2}), INPUT)
    torch.save(dict(state, pos_embed=state["pos_embed"][:, :-1]), tmp_path / "ragged.pth")
    with pytest.raises(WeightLoadError, match="ragged.pth: position embeddings hold 1368 patch positions, not a square"):
        dinov2.load_dinov2_hub(tmp_path / "ragged.pth", config, INPUT)

    with pytest.raises(ValueError, match="'use_swiglu_ffn' = True"):
        dinov2.Dinov2Config.from_dict({**TINY, "model_type": "dinov2", "use_swiglu_ffn": True})
    with pytest.raises(ValueError, match="'hidden_act' = 'silu'"):
        dinov2.Dinov2Config.from_dict({**TINY, "hidden_act": "silu"})


# ----------------------------------------------------------------------------------------------------------
# Real shapes (random weights): `pytest -m slow tests/test_dinov2.py`


@pytest.mark.slow
def test_vitb14_matches_transformers_at_224():
    """ViT-B/14 as facebook/dinov2-base (518 px pretraining grid) on 224 px images."""
    start = time.time()
    torch.manual_seed(5)
    config = transformers.Dinov2Config(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518
    )
    ref = transformers.Dinov2Model(config).eval()  # transformers' own initialisation
    model = dinov2.Dinov2Model(dinov2.Dinov2Config.from_dict(ref.config.to_dict()), input_size=224)
    params = dinov2.dinov2_params(model, {k: v.numpy() for k, v in ref.state_dict().items()}, "in-memory", 0.0)
    pixels = np.random.default_rng(6).normal(size=(2, 224, 224, 3)).astype(np.float32)
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(pixels)))
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
    print(f"DINOv2 ViT-B/14: max abs diff {np.abs(got - want).max():.2e}; {time.time() - start:.0f} s")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
