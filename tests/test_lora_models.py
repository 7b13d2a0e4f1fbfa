"""LoRA on the project's (tiny) Flax UNet and CLIP text encoder, against the original's PyTorch LoRA.

PyTorch side (tests/lora_torch_reference.py): the original's LoRA computed the original's way,
y = W x + b + up(down(x)), with diffusers' PatchedLoraProjection for the text encoder and forward hooks
that add the 0.19 LoRAAttnProcessor's terms for the UNet. Flax side: the unchanged model run with
`lora.merge(params, lora)`. Both directions of the .pth format are covered, and the PEFT safetensors
export is loaded by current diffusers' `load_lora_weights` on a tiny pipeline folder.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.utils import AttnProcsLayers
from flax import traverse_util
from lora_torch_reference import (
    attach_unet_lora,
    patch_text_encoder,
    unet_lora_state_dict,
)
from transformers import CLIPTextModel

from fairdiff_jax.sd import lora
from fairdiff_jax.sd import tiny as tiny_sd
from fairdiff_jax.sd.clip_text import load_clip_text
from fairdiff_jax.sd.unet import load_unet

RANK = 4
# float32 CPU: measured max |diff| 1.1e-6..2.3e-6 for outputs of max |value| 1.6..2.8, LoRA effects 0.2..2.5.
ATOL = 1e-5


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tiny_sd.build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=4)
    unet_module, unet_params = load_unet(folder / "unet")
    text_module, text_params = load_clip_text(folder / "text_encoder")

    # One compilation per model: the LoRA tree is an argument, so every test reuses it.
    @jax.jit
    def unet_eps(params, lora_tree, sample, timesteps, context):
        return unet_module.apply({"params": lora.merge(params, lora_tree)}, sample, timesteps, context)

    @jax.jit
    def text_states(params, lora_tree, ids, mask):
        return text_module.apply({"params": lora.merge(params, lora_tree)}, ids, mask)

    g = torch.Generator().manual_seed(1)
    inputs = SimpleNamespace(
        sample=torch.randn(2, 4, tiny_sd.LATENT_SIZE, tiny_sd.LATENT_SIZE, generator=g),
        timesteps=torch.tensor([10, 700]),
        context=torch.randn(2, 5, tiny_sd.TEXT_WIDTH, generator=g),
        ids=torch.randint(0, 500, (2, 6), generator=g),
        mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    )
    return SimpleNamespace(folder=folder, unet_params=unet_params, text_params=text_params,
                           unet_eps=unet_eps, text_states=text_states, inputs=inputs)


def _torch_unet(sd):
    return UNet2DConditionModel.from_pretrained(sd.folder / "unet").eval()


def _torch_text(sd):
    return CLIPTextModel.from_pretrained(sd.folder / "text_encoder").eval()


def _torch_outputs(sd, unet=None, text_encoder=None):
    x = sd.inputs
    with torch.no_grad():
        eps = unet(x.sample, x.timesteps, x.context).sample.permute(0, 2, 3, 1).numpy() if unet is not None else None
        states = text_encoder(x.ids, attention_mask=x.mask).last_hidden_state.numpy() if text_encoder is not None else None
    return eps, states


def _flax_unet(sd, tree):
    x = sd.inputs
    return np.asarray(sd.unet_eps(sd.unet_params, tree, jnp.asarray(x.sample.permute(0, 2, 3, 1).numpy()),
                                  jnp.asarray(x.timesteps.numpy()), jnp.asarray(x.context.numpy())))


def _flax_text(sd, tree):
    x = sd.inputs
    return np.asarray(sd.text_states(sd.text_params, tree, jnp.asarray(x.ids.numpy()), jnp.asarray(x.mask.numpy())))


def _trained_like(params, model, seed):
    """init() with `up` moved off zero, as training does, so the LoRA shows in every output."""
    key = jax.random.key(seed)
    tree = lora.init(key, params, lora.select_targets(params, model), RANK)
    flat = traverse_util.flatten_dict(tree)
    for i, path in enumerate(p for p in flat if p[-1] == "up"):
        flat[path] = 0.1 * jax.random.normal(jax.random.fold_in(key, 1000 + i), flat[path].shape)
    return traverse_util.unflatten_dict(flat)


def _assert_close(got, want, base, what):
    effect = np.abs(want - base).max()
    assert effect > 1e-2, f"{what}: the LoRA barely changes the output ({effect:.2e}); the check would be vacuous"
    np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"{what} (LoRA effect {effect:.2e})")


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_original_pth_imports_and_reproduces_torch(sd, tmp_path):
    """Original-way PyTorch LoRA -> .pth -> load_original -> Flax merge == PyTorch outputs."""
    unet, text_encoder = _torch_unet(sd), _torch_text(sd)
    base_eps, base_states = _torch_outputs(sd, unet, text_encoder)
    torch.save(unet_lora_state_dict(attach_unet_lora(unet, RANK, seed=2)[0]), tmp_path / "unet_lora.pth")
    torch.save(patch_text_encoder(text_encoder, RANK, seed=3), tmp_path / "text_encoder_lora.pth")
    want_eps, want_states = _torch_outputs(sd, unet, text_encoder)

    unet_tree = lora.load_original(tmp_path / "unet_lora.pth", sd.unet_params, "unet")
    text_tree = lora.load_original(tmp_path / "text_encoder_lora.pth", sd.text_params, "text_encoder")
    _assert_close(_flax_unet(sd, unet_tree), want_eps, base_eps, "UNet")
    _assert_close(_flax_text(sd, text_tree), want_states, base_states, "text encoder")


def test_exported_pth_loads_the_original_way(sd, tmp_path):
    """Flax LoRA -> save_original -> loaded as the original's gen-images.py does -> same outputs as Flax merge."""
    unet_tree, text_tree = _trained_like(sd.unet_params, "unet", 5), _trained_like(sd.text_params, "text_encoder", 6)
    lora.save_original(unet_tree, tmp_path / "unet_lora.pth", "unet")
    lora.save_original(text_tree, tmp_path / "text_encoder_lora.pth", "text_encoder")

    unet, text_encoder = _torch_unet(sd), _torch_text(sd)
    base_eps, base_states = _torch_outputs(sd, unet, text_encoder)
    processors, _ = attach_unet_lora(unet, RANK, seed=7)  # placeholders, overwritten by the file
    AttnProcsLayers(processors).load_state_dict(torch.load(tmp_path / "unet_lora.pth"), strict=True)
    patch_text_encoder(text_encoder, RANK, seed=8)
    # gen-images.py: text_encoder.load_state_dict(file, strict=False) on transformers 4, whose module
    # names carried the `text_model.` level that transformers 5 dropped.
    text_file = {k.removeprefix("text_model."): v for k, v in torch.load(tmp_path / "text_encoder_lora.pth").items()}
    result = text_encoder.load_state_dict(text_file, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora" in k]
    want_eps, want_states = _torch_outputs(sd, unet, text_encoder)

    _assert_close(_flax_unet(sd, unet_tree), want_eps, base_eps, "UNet")
    _assert_close(_flax_text(sd, text_tree), want_states, base_states, "text encoder")


def test_diffusers_export_reproduces_flax_outputs(sd, tmp_path):
    """save_diffusers -> StableDiffusionPipeline.load_lora_weights -> PyTorch outputs == Flax merge outputs."""
    unet_tree, text_tree = _trained_like(sd.unet_params, "unet", 9), _trained_like(sd.text_params, "text_encoder", 10)
    lora.save_diffusers(tmp_path / "lora", unet=unet_tree, text_encoder=text_tree)
    pipe = StableDiffusionPipeline.from_pretrained(sd.folder, safety_checker=None, requires_safety_checker=False)
    base_eps, base_states = _torch_outputs(sd, pipe.unet, pipe.text_encoder)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    scalings = {v for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()] if hasattr(m, "scaling") for v in m.scaling.values()}
    assert scalings == {1.0}
    want_eps, want_states = _torch_outputs(sd, pipe.unet, pipe.text_encoder)

    _assert_close(_flax_unet(sd, unet_tree), want_eps, base_eps, "UNet")
    _assert_close(_flax_text(sd, text_tree), want_states, base_states, "text encoder")
