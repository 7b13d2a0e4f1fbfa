"""The Flax VAE decoder against diffusers' AutoencoderKL.decode, and the loader's errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from fairdiff_jax.nn import attention, weights
from fairdiff_jax.sd import vae as vae_lib

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
    scaling_factor=0.5,
)


@pytest.fixture(scope="module")
def torch_vae_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoencoderKL(**TINY_VAE).eval()
    # Non-trivial norm affine parameters, so that a scale/bias mix-up cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, folder


def _decode_torch(model, latents_nhwc):
    with torch.no_grad():
        out = model.decode(torch.from_numpy(latents_nhwc).permute(0, 3, 1, 2)).sample
    return out.permute(0, 2, 3, 1).numpy()


def test_decoder_matches_diffusers(torch_vae_folder):
    model, folder = torch_vae_folder
    module, params = vae_lib.load_vae_decoder(folder)
    assert module.config.scaling_factor == 0.5 and module.config.upsampling_factor == 2
    latents = np.random.default_rng(0).normal(size=(2, 8, 6, 4)).astype(np.float32)
    got = np.asarray(module.apply({"params": params}, jnp.asarray(latents)))
    want = _decode_torch(model, latents)
    assert got.shape == (2, 16, 12, 3)
    # float32, measured max abs diff 2.4e-6 on outputs of size ~1.
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_bfloat16_decoder_is_close(torch_vae_folder):
    model, folder = torch_vae_folder
    module, params = vae_lib.load_vae_decoder(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl="einsum")
    latents = np.random.default_rng(1).normal(size=(1, 8, 8, 4)).astype(np.float32)
    got = module.apply({"params": params}, jnp.asarray(latents))
    assert got.dtype == jnp.float32
    want = _decode_torch(model, latents)
    # bf16 has an 8-bit mantissa: relative error ~1e-2 per op.
    assert np.abs(np.asarray(got) - want).max() < 0.1 * np.abs(want).max()


def test_deprecated_attention_names_load(torch_vae_folder, tmp_path):
    model, folder = torch_vae_folder
    renamed = {}
    for key, value in model.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = value.contiguous()
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, want = vae_lib.load_vae_decoder(folder)
    _, got = vae_lib.load_vae_decoder(tmp_path)
    np.testing.assert_array_equal(
        got["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
        want["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
    )


def test_loader_errors(torch_vae_folder, tmp_path):
    model, folder = torch_vae_folder
    with pytest.raises(weights.WeightLoadError, match="VAE folder not found: .*absent"):
        vae_lib.load_vae_decoder(tmp_path / "absent")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, act_fn="gelu")))
    with pytest.raises(weights.WeightLoadError, match=r"config.json: act_fn = 'gelu' is not supported"):
        vae_lib.load_vae_decoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightLoadError, match="no weights file in"):
        vae_lib.load_vae_decoder(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "decoder.conv_out.bias"}
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(weights.WeightLoadError, match=r"missing weights[\s\S]*decoder/conv_out/bias"):
        vae_lib.load_vae_decoder(tmp_path)


def _decode_loss(module, latents):
    def loss(params):
        images = module.apply({"params": params}, latents)
        return jnp.sum(images * jnp.linspace(-1.0, 1.0, images.size).reshape(images.shape))

    return loss


def test_remat_puts_every_resnet_attention_and_upsampler_under_checkpoint(torch_vae_folder):
    _, folder = torch_vae_folder
    module, params = vae_lib.load_vae_decoder(folder)
    latents = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 8, 4)).astype(np.float32))

    def checkpoints(m):
        jaxpr = jax.make_jaxpr(jax.value_and_grad(_decode_loss(m, latents)))(params)
        return sum(eqn.primitive.name in ("checkpoint", "remat2") for eqn in jaxpr.jaxpr.eqns)

    assert checkpoints(module) == 0
    # mid block: 2 resnets + attention; 2 up blocks of 2 resnets; 1 upsampler.
    assert checkpoints(module.clone(remat=True)) == 3 + 4 + 1


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
@pytest.mark.parametrize("attention_impl", ["xla", "chunked"])
def test_remat_and_chunked_attention_give_the_same_images_and_gradients(torch_vae_folder, attention_impl, monkeypatch):
    # Blocks of 16 queries, so that the 64-token mid-block attention runs as 4 blocks.
    monkeypatch.setattr(attention, "QUERY_CHUNK_SIZE", 16)
    _, folder = torch_vae_folder
    module, params = vae_lib.load_vae_decoder(folder)
    latents = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 4)).astype(np.float32))
    plain_loss, plain_grad = jax.jit(jax.value_and_grad(_decode_loss(module, latents)))(params)
    lean = module.clone(remat=True, attention_impl=attention_impl)
    lean_loss, lean_grad = jax.jit(jax.value_and_grad(_decode_loss(lean, latents)))(params)
    np.testing.assert_allclose(lean_loss, plain_loss, rtol=1e-5)
    # float32: 'chunked' (einsum form) vs 'xla' attention differ by rounding; measured max abs diff
    # 1.1e-5 on gradient entries of up to ~6.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), lean_grad, plain_grad)
