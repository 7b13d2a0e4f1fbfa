"""LoRA as data: target selection, init, merge, the original's .pth files and diffusers' PEFT files.

The PyTorch side is the original's LoRA rebuilt with diffusers' own classes (tests/lora_torch_reference.py);
the Flax side here is a params tree that follows the project's naming convention, made from the PyTorch
modules' Linear weights. Whole-model parity (Flax UNet / CLIP with merged LoRA) is in test_lora_models.py.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.utils import AttnProcsLayers
from flax import traverse_util
from lora_torch_reference import (
    attach_unet_lora,
    patch_text_encoder,
    unet_lora_state_dict,
)

from fairdiff_jax.nn.weights import WeightLoadError, torch_key_to_flax_path
from fairdiff_jax.sd import lora

RANK = 4


def _kernel(shape, dtype=jnp.float32):
    return {"kernel": jax.ShapeDtypeStruct(shape, dtype)}


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=99, bos_token_id=0, eos_token_id=2, pad_token_id=1, max_position_embeddings=16)
    return CLIPTextModel(config).eval()


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=8,
        norm_num_groups=8, sample_size=8,
    ).eval()


def linear_params(module: torch.nn.Module, root: tuple[str, ...] = ()) -> dict:
    """The module's Linear weights/biases as a Flax params tree under the project's naming convention."""
    linears = {name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    flat = {}
    for name in linears:
        path = root + torch_key_to_flax_path(name)
        m = module.get_submodule(name)
        flat[path + ("kernel",)] = m.weight.detach().numpy().T.copy()
        if m.bias is not None:
            flat[path + ("bias",)] = m.bias.detach().numpy().copy()
    return traverse_util.unflatten_dict(flat)


# ---- selection and init ------------------------------------------------------------------------

def test_select_targets_by_rule():
    layer = {
        "self_attn": {name: _kernel((8, 8)) for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "mlp": {"fc1": _kernel((8, 16)), "fc2": _kernel((16, 8))},
        "layer_norm1": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)},
    }
    text = {"embeddings": {"token_embedding": {"embedding": jax.ShapeDtypeStruct((99, 8), jnp.float32)}},
            "encoder": {"layers_10": layer, "layers_2": layer}}
    got = lora.select_targets(text, "text_encoder")
    names = ("fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj")
    assert got == tuple(("encoder", f"layers_{i}", "mlp" if n.startswith("fc") else "self_attn", n) for i in (2, 10) for n in names)

    attention = {name: _kernel((8, 8)) for name in ("to_q", "to_k", "to_v", "to_out_0")}
    block = {"attn1": attention, "attn2": attention, "ff": {"net_0": {"proj": _kernel((8, 64))}, "net_2": _kernel((32, 8))}}
    transformer = {"proj_in": _kernel((8, 8)), "transformer_blocks_0": block}
    unet = {"time_embedding": {"linear_1": _kernel((8, 32))}, "down_blocks_0": {"attentions_0": transformer},
            "mid_block": {"attentions_0": transformer}, "conv_in": _kernel((3, 3, 4, 8))}
    got = lora.select_targets(unet, "unet")
    assert len(got) == 16 and {p[-2] for p in got} == {"attn1", "attn2"}
    assert {p[-1] for p in got} == {"to_q", "to_k", "to_v", "to_out_0"} and got[0][0] == "down_blocks_0"
    with pytest.raises(ValueError, match="no text_encoder LoRA targets"):
        lora.select_targets(unet, "text_encoder")
    with pytest.raises(ValueError, match="model must be one of"):
        lora.select_targets(unet, "vae")


def test_init_is_a_pure_function_of_the_key():
    frozen = {"a": {"q_proj": _kernel((512, 24))}, "b": {"q_proj": _kernel((24, 40), jnp.bfloat16)}}
    targets = [("a", "q_proj"), ("b", "q_proj")]
    tree = lora.init(jax.random.key(3), frozen, targets, rank=8)
    again = lora.init(jax.random.key(3), frozen, targets, rank=8)
    other = lora.init(jax.random.key(4), frozen, targets, rank=8)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), tree) == {
        "a": {"q_proj": {"down": ((512, 8), jnp.float32), "up": ((8, 24), jnp.float32)}},
        "b": {"q_proj": {"down": ((24, 8), jnp.float32), "up": ((8, 40), jnp.float32)}},
    }
    jax.tree.map(np.testing.assert_array_equal, tree, again)
    assert not np.array_equal(tree["a"]["q_proj"]["down"], other["a"]["q_proj"]["down"])
    assert not np.array_equal(tree["a"]["q_proj"]["down"][:24], tree["b"]["q_proj"]["down"])
    down = np.asarray(tree["a"]["q_proj"]["down"])  # 4096 draws: std within 5% of 1/rank
    assert abs(down.std() - 1 / 8) < 0.05 / 8 and abs(down.mean()) < 0.01
    assert not np.any(np.asarray(tree["a"]["q_proj"]["up"])) and lora.lora_rank(tree) == 8


# ---- merge -------------------------------------------------------------------------------------

def test_merge_matches_torch_linear_with_lora_branch_values_and_gradients():
    """y = W x + b + up(down(x)) in PyTorch vs Flax Dense with merge(); gradients w.r.t. down/up too."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    down, up = torch.nn.Linear(6, RANK, bias=False), torch.nn.Linear(RANK, 5, bias=False)
    x = torch.randn(3, 6)
    y = linear(x) + up(down(x))
    (y ** 2).sum().backward()

    frozen = {"proj": {"kernel": linear.weight.detach().numpy().T, "bias": linear.bias.detach().numpy()}}
    tree = {"proj": {"down": down.weight.detach().numpy().T, "up": up.weight.detach().numpy().T}}

    def loss(tree):
        out = nn.Dense(5).apply({"params": lora.merge(frozen, tree)["proj"]}, jnp.asarray(x.numpy()))
        return (out ** 2).sum(), out

    grads, out = jax.grad(loss, has_aux=True)(tree)
    np.testing.assert_allclose(out, y.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(grads["proj"]["down"], down.weight.grad.numpy().T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["proj"]["up"], up.weight.grad.numpy().T, rtol=1e-5, atol=1e-6)
    assert np.abs(grads["proj"]["up"]).min() > 0


def test_merge_keeps_frozen_leaves_and_widens_targets_to_float32():
    rng = np.random.default_rng(0)
    frozen = {"attn": {"to_q": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.bfloat16), "bias": jnp.zeros((5,), jnp.bfloat16)},
                       "to_k": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.bfloat16)}}}
    tree = {"attn": {"to_q": {"down": rng.normal(size=(6, 2)).astype(np.float32), "up": rng.normal(size=(2, 5)).astype(np.float32)}}}
    merged = lora.merge(frozen, tree)
    assert merged["attn"]["to_k"]["kernel"] is frozen["attn"]["to_k"]["kernel"]
    assert merged["attn"]["to_q"]["bias"] is frozen["attn"]["to_q"]["bias"]
    assert merged["attn"]["to_q"]["kernel"].dtype == jnp.float32
    want = np.asarray(frozen["attn"]["to_q"]["kernel"], np.float32) + tree["attn"]["to_q"]["down"] @ tree["attn"]["to_q"]["up"]
    np.testing.assert_allclose(merged["attn"]["to_q"]["kernel"], want, rtol=1e-6)
    # Only the LoRA is differentiated; with up = 0 (fresh init) only `up` gets a gradient, as in PyTorch.
    fresh = lora.init(jax.random.key(0), frozen, [("attn", "to_q")], rank=2)
    grads = jax.grad(lambda t: jnp.sum(lora.merge(frozen, t)["attn"]["to_q"]["kernel"] ** 2))(fresh)
    assert np.abs(grads["attn"]["to_q"]["up"]).sum() > 0 and not np.any(grads["attn"]["to_q"]["down"])
    with pytest.raises(ValueError, match="attn/to_x, which has no kernel"):
        lora.merge(frozen, {"attn": {"to_x": tree["attn"]["to_q"]}})


# ---- the original's .pth files -----------------------------------------------------------------

def _assert_merge_fuses(frozen, tree, lora_layer_of):
    """merge() kernels == frozen + (up.weight @ down.weight).T of the PyTorch LoRA layer of each module."""
    merged = traverse_util.flatten_dict(lora.merge(frozen, tree))
    flat_frozen = traverse_util.flatten_dict(frozen)
    for path in lora.lora_modules(tree):
        layer = lora_layer_of(path)
        want = flat_frozen[path + ("kernel",)] + (layer.up.weight @ layer.down.weight).detach().numpy().T
        np.testing.assert_allclose(merged[path + ("kernel",)], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("root", [(), ("text_model",)])
def test_text_encoder_pth_import_export(tmp_path, root):
    """A file made the original's way loads, fuses to the PyTorch LoRA's weights, and is written back key for key."""
    text_encoder = tiny_text_encoder()
    frozen = linear_params(text_encoder, root)
    original = patch_text_encoder(text_encoder, RANK)
    assert "text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.up.weight" in original
    assert "text_model.encoder.layers.0.self_attn.out_proj.lora_linear_layer.down.weight" in original
    assert len(original) == 2 * 6 * 2
    torch.save(original, tmp_path / "text_encoder_lora.pth")

    tree = lora.load_original(tmp_path / "text_encoder_lora.pth", frozen, "text_encoder")
    assert lora.lora_modules(tree) == lora.select_targets(frozen, "text_encoder") and lora.lora_rank(tree) == RANK

    _assert_merge_fuses(frozen, tree, lambda path: text_encoder.get_submodule(
        ".".join(p.replace("layers_", "layers.") for p in path[len(root):])).lora_linear_layer)

    lora.save_original(tree, tmp_path / "out" / "text_encoder_lora.pth", "text_encoder")
    written = torch.load(tmp_path / "out" / "text_encoder_lora.pth", weights_only=True)
    assert set(written) == set(original)
    for key, value in original.items():
        assert written[key].dtype == torch.float32
        np.testing.assert_array_equal(written[key].numpy(), value.numpy())
    again = lora.load_original(tmp_path / "out" / "text_encoder_lora.pth", frozen, "text_encoder")
    jax.tree.map(np.testing.assert_array_equal, again, tree)
    # The original's gen-images.py: patch a fresh text encoder, load_state_dict(file, strict=False).
    # transformers 4 (which it ran on) had the `text_model.` level that transformers 5 dropped.
    fresh = tiny_text_encoder()
    patch_text_encoder(fresh, RANK, seed=9)
    result = fresh.load_state_dict({k.removeprefix("text_model."): v for k, v in written.items()}, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora" in k]
    loaded = {n: p for n, p in fresh.named_parameters() if "lora" in n}
    np.testing.assert_array_equal(loaded["encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"].detach().numpy(),
                                  original["text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"].numpy())


def test_unet_pth_import_export(tmp_path):
    unet = tiny_unet()
    frozen = linear_params(unet)
    processors, _ = attach_unet_lora(unet, RANK)
    original = unet_lora_state_dict(processors)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight" in original
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" in original
    assert len(original) == 4 * 2 * 4 * 2  # 4 transformers (down 1, mid 1, up 2) x attn1/attn2 x q,k,v,out x down/up
    torch.save(original, tmp_path / "unet_lora.pth")

    tree = lora.load_original(tmp_path / "unet_lora.pth", frozen, "unet")
    assert lora.lora_modules(tree) == lora.select_targets(frozen, "unet")
    # to_k of attn2 reads the 24-wide context: in and out must not be mixed up.
    assert tree["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["down"].shape == (24, RANK)

    lora_names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out_0": "to_out_lora"}
    _assert_merge_fuses(frozen, tree, lambda path: getattr(
        processors[".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]) + ".processor"], lora_names[path[-1]]))

    lora.save_original(tree, tmp_path / "unet_lora_EMA.pth", "unet")
    written = torch.load(tmp_path / "unet_lora_EMA.pth", weights_only=True)
    assert set(written) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key].numpy(), value.numpy())
    jax.tree.map(np.testing.assert_array_equal, lora.load_original(tmp_path / "unet_lora_EMA.pth", frozen, "unet"), tree)
    # The original's loader maps these names back onto processors (AttnProcsLayers' load hook), strictly.
    fresh, _ = attach_unet_lora(tiny_unet(), RANK, seed=5)
    AttnProcsLayers(fresh).load_state_dict(written, strict=True)
    reloaded = unet_lora_state_dict(fresh)
    for key, value in original.items():
        np.testing.assert_array_equal(reloaded[key].numpy(), value.numpy())


def test_bad_files_name_keys_shapes_and_file(tmp_path):
    unet = tiny_unet()
    frozen = linear_params(unet)
    original = unet_lora_state_dict(attach_unet_lora(unet, RANK)[0])
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_v_lora.up.weight"

    def write(state, name):
        torch.save(state, tmp_path / name)
        return tmp_path / name

    missing = write({k: v for k, v in original.items() if k != key}, "missing.pth")
    with pytest.raises(WeightLoadError, match=rf"missing.pth[\s\S]*missing keys:\s+{key}"):
        lora.load_original(missing, frozen, "unet")
    extra = write(dict(original, **{"up_blocks.1.attentions.0.proj_in.processor.to_q_lora.up.weight": original[key]}), "extra.pth")
    with pytest.raises(WeightLoadError, match=r"extra.pth[\s\S]*name no unet LoRA target:\s+up_blocks.1.attentions.0.proj_in"):
        lora.load_original(extra, frozen, "unet")
    shape = write(dict(original, **{key: torch.zeros(33, RANK)}), "shape.pth")
    with pytest.raises(WeightLoadError, match=rf"shape.pth[\s\S]*{key}: file \(33, 4\) vs expected \(32, 4\)"):
        lora.load_original(shape, frozen, "unet")
    mixed = {k: (v[:2] if k.endswith("down.weight") and "attn1.processor.to_q" in k else v) for k, v in original.items()}
    with pytest.raises(WeightLoadError, match=r"more than one rank: \[2, 4\]"):
        lora.load_original(write(mixed, "mixed.pth"), frozen, "unet")
    text = write(patch_text_encoder(tiny_text_encoder(), RANK), "text.pth")
    with pytest.raises(WeightLoadError, match=r"text.pth[\s\S]*missing keys[\s\S]*name no unet LoRA target:\s+text_model"):
        lora.load_original(text, frozen, "unet")


# ---- diffusers / PEFT export -------------------------------------------------------------------

def _tiny_pipeline(unet, text_encoder):
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
    )

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DPMSolverMultistepScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_diffusers_export_loads_with_scale_one(tmp_path):
    """Original-way LoRA (.pth) -> load_original -> save_diffusers -> load_lora_weights gives the same outputs."""
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    frozen_unet, frozen_text = linear_params(unet), linear_params(text_encoder)
    torch.save(unet_lora_state_dict(attach_unet_lora(unet, RANK)[0]), tmp_path / "unet_lora.pth")
    torch.save(patch_text_encoder(text_encoder, RANK), tmp_path / "text_encoder_lora.pth")
    unet_tree = lora.load_original(tmp_path / "unet_lora.pth", frozen_unet, "unet")
    text_tree = lora.load_original(tmp_path / "text_encoder_lora.pth", frozen_text, "text_encoder")

    gen = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 24, generator=gen)
    ids = torch.tensor([[0, 5, 17, 2, 1], [0, 9, 2, 1, 1]])
    with torch.no_grad():
        want_unet = unet(sample, 10, encoder_hidden_states=context).sample
        want_text = text_encoder(ids).last_hidden_state

    path = lora.save_diffusers(tmp_path / "export", unet=unet_tree, text_encoder=text_tree)
    assert path == tmp_path / "export" / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in keys
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_A.weight" in keys
    assert len(keys) == 2 * (32 + 12) and '"unet.lora_alpha": 4' in metadata["lora_adapter_metadata"]

    pipe = _tiny_pipeline(tiny_unet(), tiny_text_encoder())
    with torch.no_grad():
        base_unet = pipe.unet(sample, 10, encoder_hidden_states=context).sample
        base_text = pipe.text_encoder(ids).last_hidden_state
    pipe.load_lora_weights(str(tmp_path / "export"))
    scalings = [v for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()] if hasattr(m, "scaling") for v in m.scaling.values()]
    assert len(scalings) == 32 + 12 and set(scalings) == {1.0}
    with torch.no_grad():
        got_unet = pipe.unet(sample, 10, encoder_hidden_states=context).sample
        got_text = pipe.text_encoder(ids).last_hidden_state
    assert (want_unet - base_unet).abs().max() > 0.05 and (want_text - base_text).abs().max() > 0.05
    np.testing.assert_allclose(got_unet.numpy(), want_unet.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_text.numpy(), want_text.numpy(), atol=1e-5)
