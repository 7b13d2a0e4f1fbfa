"""The Flax SD-1.x UNet equals diffusers' UNet2DConditionModel, loads its folders, and names every error."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from fairdiff_jax.nn import weights
from fairdiff_jax.sd import unet

# Every block type of SD-1.x, at toy widths. attention_head_dim=2 means 2 heads (of width 16 and 32):
# reading it as a head width would change the output and fail the parity tests.
TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
# SD-2-style projection, per-block head counts, SD's 2 layers per block (3 per up block), and the
# timestep-embedding variants SD-1.x does not use. upcast_attention changes nothing in float32.
TINY_LINEAR = dict(
    TINY, use_linear_projection=True, attention_head_dim=(2, 4), layers_per_block=2, flip_sin_to_cos=False,
    freq_shift=1, upcast_attention=True,
)

# float32 CPU: measured max |diff| 3.9e-6 (tiny) for outputs of max |value| ~3.
F32_ATOL = 3e-5


def _random_torch_unet(config: dict, seed: int = 0) -> TorchUNet:
    """diffusers' init, with every norm scale and every bias randomised so that all of them matter."""
    torch.manual_seed(seed)
    net = TorchUNet(**config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
    return net


def _inputs(config: dict, size: int, tokens: int, batch: int = 2, seed: int = 1):
    """NCHW latents, [B] int timesteps, [B, tokens, D] context, as torch tensors."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config["in_channels"], size, size, generator=g)
    timesteps = torch.tensor([10, 900, 500, 1][:batch])
    context = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)
    return sample, timesteps, context


def _torch_eps(net, sample, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        return net(sample, timesteps, context).sample.permute(0, 2, 3, 1).numpy()


def _flax_args(sample, timesteps, context):
    """torch NCHW inputs -> the Flax model's NHWC arrays."""
    timesteps = timesteps.numpy() if isinstance(timesteps, torch.Tensor) else timesteps
    return jnp.asarray(sample.permute(0, 2, 3, 1).numpy()), jnp.asarray(timesteps), jnp.asarray(context.numpy())


def _flax_eps(apply, params, sample, timesteps, context) -> np.ndarray:
    out = apply({"params": params}, *_flax_args(sample, timesteps, context))
    return np.asarray(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder with a safetensors checkpoint, the torch net, loaded module, params, jitted apply)."""
    folder = tmp_path_factory.mktemp("tiny_unet")
    net = _random_torch_unet(TINY)
    net.save_pretrained(folder)
    module, params = unet.load_unet(folder)
    return folder, net, module, params, jax.jit(module.apply)


def test_tiny_unet_matches_diffusers(tiny):
    _, net, module, params, apply = tiny
    sample, timesteps, context = _inputs(TINY, size=16, tokens=7)
    want = _torch_eps(net, sample, timesteps, context)
    got = _flax_eps(apply, params, sample, timesteps, context)
    assert got.dtype == np.float32 and got.shape == (2, 16, 16, 4)
    print(f"tiny UNet fp32 max|diff| {np.abs(got - want).max():.2e}, max|out| {np.abs(want).max():.2f}")
    np.testing.assert_allclose(got, want, rtol=0, atol=F32_ATOL)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_encoder_attention_mask_matches_diffusers(tiny):
    """A per-row key mask on the text tokens in every cross-attention, as diffusers' encoder_attention_mask;
    masking trailing tokens equals dropping them, and a [1, L] mask is shared by the batch."""
    _, net, module, params, _ = tiny
    sample, timesteps, context = _inputs(TINY, size=16, tokens=7)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        want = net(sample, timesteps, context, encoder_attention_mask=mask).sample.permute(0, 2, 3, 1).numpy()
    apply = jax.jit(module.apply)
    got = np.asarray(apply({"params": params}, *_flax_args(sample, timesteps, context), jnp.asarray(mask.numpy())))
    print(f"tiny UNet with encoder_attention_mask fp32 max|diff| {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=F32_ATOL)
    unmasked = _torch_eps(net, sample, timesteps, context)
    assert np.abs(unmasked - want).max() > 1e-2  # the mask changes the output: the check can fail

    dropped = _torch_eps(net, sample, timesteps, context[:, :4])
    shared = np.asarray(apply({"params": params}, *_flax_args(sample, timesteps, context), jnp.asarray(mask[:1].numpy() != 0)))
    np.testing.assert_allclose(shared, dropped, rtol=0, atol=F32_ATOL)


def test_scalar_float_timestep_and_other_sizes(tiny):
    _, net, module, params, apply = tiny
    sample, _, context = _inputs(TINY, size=8, tokens=3, batch=1)
    want = _torch_eps(net, sample, 321.5, context)
    got = _flax_eps(apply, params, sample, np.float32(321.5), context)
    np.testing.assert_allclose(got, want, rtol=0, atol=F32_ATOL)


def test_params_carry_diffusers_names(tiny):
    params = tiny[3]
    attn = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
    assert set(attn) == {"to_q", "to_k", "to_v", "to_out_0"}
    assert "bias" not in attn["to_q"] and "bias" in attn["to_out_0"]
    ff = params["up_blocks_1"]["attentions_1"]["transformer_blocks_0"]["ff"]
    assert ff["net_0"]["proj"]["kernel"].shape == (32, 2 * 4 * 32) and ff["net_2"]["kernel"].shape == (4 * 32, 32)
    assert params["down_blocks_0"]["downsamplers_0"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    assert "upsamplers_0" in params["up_blocks_0"] and "upsamplers_0" not in params["up_blocks_1"]


def test_bin_checkpoint_loads_the_same_params(tiny, tmp_path):
    folder, net, _, params, _ = tiny
    net.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    _, from_bin = unet.load_unet(tmp_path)
    flat_st, flat_bin = traverse_util.flatten_dict(params), traverse_util.flatten_dict(from_bin)
    assert flat_st.keys() == flat_bin.keys()
    for path, value in flat_st.items():
        np.testing.assert_array_equal(flat_bin[path], value, err_msg="/".join(path))


def test_param_shapes_match_loaded_params(tiny):
    _, _, module, params, _ = tiny
    shapes = traverse_util.flatten_dict(unet.unet_param_shapes(module))
    flat = traverse_util.flatten_dict(params)
    assert {p: s.shape for p, s in shapes.items()} == {p: v.shape for p, v in flat.items()}


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_bfloat16_model_stays_close_to_float32(tiny):
    """The frozen-model setting: bf16 params and compute (einsum attention), float32 output."""
    folder, net, _, _, _ = tiny
    module, params = unet.load_unet(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl="einsum")
    assert params["conv_in"]["kernel"].dtype == jnp.bfloat16
    sample, timesteps, context = _inputs(TINY, size=16, tokens=7)
    want = _torch_eps(net, sample, timesteps, context)
    got = _flax_eps(jax.jit(module.apply), params, sample, timesteps, context)
    assert got.dtype == np.float32
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"tiny UNet bf16 params+compute: max|diff| / max|out| = {err:.2e}")
    assert err < 0.05


def _remat_loss(module, params, size):
    """loss(params) = mean(eps ** 2) on fixed inputs: a scalar whose gradient runs through every block."""
    sample, timesteps, context = _inputs(TINY, size=size, tokens=3)
    args = _flax_args(sample, timesteps, context)
    return lambda p: jnp.mean(module.apply({"params": p}, *args) ** 2)


def test_remat_puts_every_block_under_checkpoint(tiny):
    _, _, module, params, _ = tiny

    def checkpoints(model):
        jaxpr = jax.make_jaxpr(jax.value_and_grad(_remat_loss(model, params, size=8)))(params)
        # jax.checkpoint's primitive: "checkpoint" when traced, "remat2" once differentiated (jax 0.10).
        return sum(eqn.primitive.name in ("checkpoint", "remat2") for eqn in jaxpr.jaxpr.eqns)

    assert checkpoints(module) == 0
    assert checkpoints(module.clone(remat=True)) == 5  # 2 down blocks, the mid block, 2 up blocks


@pytest.mark.slow  # two backward compiles of the whole UNet: ~40 s on 2 CPU cores
def test_remat_gives_the_same_loss_and_gradients(tiny):
    _, _, module, params, _ = tiny
    plain_loss, plain_grad = jax.jit(jax.value_and_grad(_remat_loss(module, params, size=8)))(params)
    remat_loss, remat_grad = jax.jit(jax.value_and_grad(_remat_loss(module.clone(remat=True), params, size=8)))(params)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), remat_grad, plain_grad)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_linear_projection_variant_matches_diffusers(tmp_path):
    net = _random_torch_unet(TINY_LINEAR, seed=2)
    net.save_pretrained(tmp_path)
    module, params = unet.load_unet(tmp_path)
    assert module.config.num_attention_heads == (2, 4)
    assert params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (32, 32)
    sample, timesteps, context = _inputs(TINY_LINEAR, size=16, tokens=7)
    want = _torch_eps(net, sample, timesteps, context)
    got = _flax_eps(jax.jit(module.apply), params, sample, timesteps, context)
    print(f"tiny linear-projection UNet fp32 max|diff| {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=F32_ATOL)


# ---- errors name the file, key, value or shape --------------------------------------------------


def _copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_config(tiny, tmp_path):
    with pytest.raises(weights.WeightLoadError, match="UNet folder not found.*nowhere"):
        unet.load_unet(tmp_path / "nowhere")
    folder = _copy_folder(tiny[0], tmp_path / "no_config")
    (folder / "config.json").unlink()
    with pytest.raises(weights.WeightLoadError, match=r"UNet config not found.*no_config/config\.json"):
        unet.load_unet(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(weights.WeightLoadError, match=r"cannot read UNet config .*config\.json"):
        unet.load_unet(folder)


def test_missing_weights_file(tiny, tmp_path):
    folder = _copy_folder(tiny[0], tmp_path / "no_weights")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(weights.WeightLoadError, match="no weights file in .*no_weights"):
        unet.load_unet(folder)


def test_missing_and_misshapen_weights(tiny, tmp_path):
    folder = _copy_folder(tiny[0], tmp_path / "bad_weights")
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    del state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    state["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
    save_file(state, str(path))
    with pytest.raises(weights.WeightLoadError) as info:
        unet.load_unet(folder)
    message = str(info.value)
    assert "diffusion_pytorch_model.safetensors" in message
    assert "conv_in.weight: file (1, 1, 4, 32) vs model (3, 3, 4, 32)" in message
    assert "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel" in message


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("class_embed_type", "timestep", "class_embed_type='timestep'"),
        ("addition_embed_type", "text_time", "addition_embed_type='text_time'"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
        ("mid_block_type", None, "mid_block_type=None"),
        ("transformer_layers_per_block", 2, "transformer_layers_per_block=2"),
        ("time_cond_proj_dim", 256, "time_cond_proj_dim=256"),
        ("act_fn", "gelu", "act_fn='gelu'"),
        ("layers_per_block", [1, 2], "layers_per_block=[1, 2]"),
        ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D"], "down_block_types entry 'AttnDownBlock2D'"),
    ],
)
def test_unsupported_config_options_are_refused(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        unet.UNetConfig.from_diffusers(dict(TINY, **{key: value}))


def test_unknown_config_key_and_bad_head_count_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown UNet config keys: frobnicate"):
        unet.UNetConfig.from_diffusers(dict(TINY, frobnicate=1))
    with pytest.raises(ValueError, match="block width 32 is not divisible by its 3 attention heads"):
        unet.UNetConfig.from_diffusers(dict(TINY, attention_head_dim=3))
    folder = _copy_folder(tiny[0], tmp_path / "sdxl_like")
    config = json.loads((folder / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightLoadError, match=r"sdxl_like/config\.json: .*addition_embed_type='text_time'"):
        unet.load_unet(folder)


def test_sample_size_must_divide_into_the_blocks(tiny):
    module, params = tiny[2], tiny[3]
    with pytest.raises(ValueError, match=r"divisible by 2; got \(1, 9, 9, 4\)"):
        module.apply({"params": params}, jnp.zeros((1, 9, 9, 4)), 1, jnp.zeros((1, 3, 32)))


# ---- real SD-1.5 shapes ------------------------------------------------------------------------

SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    mid_block_scale_factor=1,
)


def test_sd15_config_builds_diffusers_parameter_tree():
    """Shapes only (diffusers on the meta device, Flax by eval_shape): same tensors, same sizes."""
    config = unet.UNetConfig.from_diffusers(dict(SD15, _class_name="UNet2DConditionModel", _diffusers_version="0.6.0"))
    assert config.num_attention_heads == (8, 8, 8, 8) and config.cross_attention_dim == 768
    with torch.device("meta"):
        torch_shapes = {k: tuple(v.shape) for k, v in TorchUNet(**SD15).state_dict().items()}
    flax_shapes = traverse_util.flatten_dict(unet.unet_param_shapes(unet.UNet2DConditionModel(config)))
    assert len(flax_shapes) == len(torch_shapes) == 686
    assert sum(np.prod(s.shape) for s in flax_shapes.values()) == sum(np.prod(s) for s in torch_shapes.values())
    q = ("up_blocks_3", "attentions_2", "transformer_blocks_0", "attn2", "to_k", "kernel")
    to_k = torch_shapes["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"]
    assert flax_shapes[q].shape == to_k[::-1] == (768, 320)


@pytest.mark.slow
def test_sd15_unet_matches_diffusers(tmp_path):
    net = _random_torch_unet(SD15)
    sample, timesteps, context = _inputs(SD15, size=32, tokens=12, batch=1)
    want = _torch_eps(net, sample, timesteps, context)
    net.save_pretrained(tmp_path)
    del net  # 3.4 GB: free it before the Flax copy exists
    module, params = unet.load_unet(tmp_path)
    got = _flax_eps(jax.jit(module.apply), params, sample, timesteps, context)
    print(f"SD-1.5 UNet fp32 max|diff| {np.abs(got - want).max():.2e}, max|out| {np.abs(want).max():.2f}")
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
