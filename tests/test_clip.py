"""CLIP towers against transformers' PyTorch models (random weights, float32).

Text: last_hidden_state of CLIPTextModel for a batch mixing an unpadded prompt and a right-padded one with
its attention mask (docs/method.md#sampler), for both activations and both key layouts (transformers 4.x `text_model.`
prefix and 5.x without). Vision: image_embeds of CLIPVisionModelWithProjection and of a CLIPModel's
vision half; the loss feature function (resize, normalise, tower, L2-normalise) and its gradient against the
same pipeline written with torchvision/PyTorch. Loader errors name the folder, file, key or value.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import transformers
from safetensors.torch import save_file

from fairdiff_jax.judging import clip_vision
from fairdiff_jax.nn import transformer
from fairdiff_jax.nn.weights import WeightLoadError
from fairdiff_jax.sd import clip_text

TINY_TEXT = dict(
    vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=98,
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7,
    projection_dim=24,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorm weights around 1), so that biases, scales and embeddings all matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                is_norm_scale = isinstance(module, torch.nn.LayerNorm) and name == "weight"
                p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)
    return model.eval()


def prompt_batch(length: int = 7):
    """Row 0: BOS, 5 tokens, EOS (unpadded). Row 1: the empty prompt (BOS, EOS) padded to `length`."""
    bos, eos = TINY_TEXT["bos_token_id"], TINY_TEXT["eos_token_id"]
    ids = np.array([[bos, 5, 17, 42, 3, 60, eos], [bos, eos] + [eos] * (length - 2)], np.int32)
    mask = np.array([[1] * length, [1, 1] + [0] * (length - 2)], np.int32)
    return ids, mask


@pytest.mark.parametrize("hidden_act,attention_impl", [("quick_gelu", "xla"), ("gelu", "einsum")])
def test_text_encoder_matches_transformers_with_padding_mask(tmp_path, hidden_act, attention_impl):
    torch.manual_seed(0)
    ref = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act=hidden_act, **TINY_TEXT)))
    ref.save_pretrained(tmp_path)
    model, params = clip_text.load_clip_text(tmp_path, attention_impl=attention_impl)
    ids, mask = prompt_batch()

    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    print(f"text {hidden_act}/{attention_impl}: max abs diff {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # The mask matters: without it the padded row's outputs differ (so the test above can fail).
    unmasked = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(unmasked[1, 2:] - got[1, 2:]).max() > 1e-2


def test_text_encoder_reads_transformers4_layout_and_torch_pickle(tmp_path):
    """SD v1-5's text_encoder files (transformers 4.x) prefix keys with `text_model.`; .bin pickles also load."""
    torch.manual_seed(1)
    ref = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)), seed=1)
    ref.config.to_json_file(tmp_path / "config.json")
    state = {f"text_model.{k}": v for k, v in ref.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(TINY_TEXT["max_position_embeddings"])[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, params = clip_text.load_clip_text(tmp_path)
    np.testing.assert_array_equal(
        params["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"],
        ref.state_dict()["encoder.layers.1.self_attn.q_proj.weight"].numpy().T,
    )
    ids, mask = prompt_batch()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def torch_clip_feature(ref, images_nhwc, size: int) -> torch.Tensor:
    """The original's get_clip_feat on Resize(size)(images): torchvision 0.16 tensors had no antialiasing."""
    x = torch.as_tensor(images_nhwc).permute(0, 3, 1, 2)
    x = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    mean = torch.tensor(clip_vision.CLIP_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(clip_vision.CLIP_STD).reshape(1, 3, 1, 1)
    embeds = ref(pixel_values=((x + 1) * 0.5 - mean) / std).image_embeds
    return torch.nn.functional.normalize(embeds.float(), dim=-1)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_vision_tower_and_feature_function_match_transformers(tmp_path):
    torch.manual_seed(2)
    config = transformers.CLIPVisionConfig(hidden_act="gelu", **TINY_VISION)
    ref = randomize_(transformers.CLIPVisionModelWithProjection(config), seed=2)
    ref.save_pretrained(tmp_path)
    model, params = clip_vision.load_clip_vision(tmp_path)
    assert model.config.projection_dim == 24 and model.config.hidden_act == "gelu"

    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(2, 28, 28, 3)).astype(np.float32)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(pixels)))
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).image_embeds.numpy()
    print(f"vision image_embeds: max abs diff {np.abs(got - want).max():.2e} (values ~{np.abs(want).max():.2f})")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

    # The loss feature on 40x40 images in [-1, 1] (downsampled to 28), values and input gradients.
    images = rng.uniform(-1, 1, size=(3, 40, 40, 3)).astype(np.float32)
    weights = rng.normal(size=(3, 24)).astype(np.float32)
    objective = lambda m, im: (clip_vision.clip_image_embeds(m, params, im) * weights).sum()  # noqa: E731
    feats_jax = np.asarray(clip_vision.clip_image_embeds(model, params, jnp.asarray(images)))
    grad_jax = np.asarray(jax.jit(jax.grad(objective, argnums=1), static_argnums=0)(model, jnp.asarray(images)))

    images_t = torch.from_numpy(images).requires_grad_(True)
    feats_t = torch_clip_feature(ref, images_t, 28)
    (feats_t * torch.from_numpy(weights)).sum().backward()
    assert feats_jax.dtype == np.float32 and feats_jax.shape == (3, 24)
    np.testing.assert_allclose(np.linalg.norm(feats_jax, axis=-1), 1.0, atol=1e-6)
    print(f"clip feature: max abs diff {np.abs(feats_jax - feats_t.detach().numpy()).max():.2e}; "
          f"grad max abs diff {np.abs(grad_jax - images_t.grad.numpy()).max():.2e} (grad ~{np.abs(grad_jax).max():.2e})")
    np.testing.assert_allclose(feats_jax, feats_t.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(grad_jax, images_t.grad.numpy(), atol=1e-5 * np.abs(grad_jax).max(), rtol=0)

    # Rematerialised layers change memory, not values.
    remat_model = clip_vision.CLIPVisionWithProjection(model.config, remat=True)
    grad_remat = jax.jit(jax.grad(objective, argnums=1), static_argnums=0)(remat_model, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(grad_remat), grad_jax, atol=1e-6 * np.abs(grad_jax).max(), rtol=0)


def test_resize_is_torch_bilinear_without_antialias():
    images = np.random.default_rng(3).uniform(-1, 1, size=(2, 50, 50, 3)).astype(np.float32)
    for size in (28, 64):  # down- and upsampling
        got = np.asarray(transformer.resize_bilinear(jnp.asarray(images), size))
        want = torch.nn.functional.interpolate(
            torch.from_numpy(images).permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False, antialias=False
        ).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_both_towers_load_from_a_clip_model_folder(tmp_path):
    torch.manual_seed(4)
    config = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=20)
    ref = randomize_(transformers.CLIPModel(config), seed=4)
    ref.save_pretrained(tmp_path)
    # transformers writes the vision_config's own (default, stale) projection_dim: the top level must win.
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["projection_dim"] != 20

    vision, vision_params = clip_vision.load_clip_vision(tmp_path)
    text, text_params = clip_text.load_clip_text(tmp_path)
    pixels = np.random.default_rng(5).normal(size=(2, 28, 28, 3)).astype(np.float32)
    ids, mask = prompt_batch()
    with torch.no_grad():
        want_image = ref.visual_projection(ref.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output).numpy()
        want_text = ref.text_model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
        want_text = want_text.last_hidden_state.numpy()
    got_image = np.asarray(vision.apply({"params": vision_params}, jnp.asarray(pixels)))
    got_text = np.asarray(text.apply({"params": text_params}, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got_image, want_image, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_text, want_text, atol=2e-5, rtol=0)


@pytest.mark.parametrize("eos_token_id", [TINY_TEXT["eos_token_id"], 2])
def test_text_features_match_get_text_features(tmp_path, eos_token_id):
    """CLIP-T's text side: the EOS token's state through text_projection. Row 1 is padded with EOS tokens, so
    taking the first EOS (not the last) matters; eos_token_id 2 is what pre-4.31 config files say (transformers
    then pools the largest token id)."""
    torch.manual_seed(8)
    text_config = dict(TINY_TEXT, eos_token_id=eos_token_id)
    config = transformers.CLIPConfig(text_config=text_config, vision_config=TINY_VISION, projection_dim=20)
    ref = randomize_(transformers.CLIPModel(config), seed=8)
    ref.save_pretrained(tmp_path)
    model, params = clip_text.load_clip_text_with_projection(tmp_path)
    ids, mask = prompt_batch()
    with torch.no_grad():
        want = ref.get_text_features(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    want = want.pooler_output.numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    print(f"text features (eos {eos_token_id}): max abs diff {np.abs(got - want).max():.2e}")
    assert got.shape == (2, 20)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # The pooled positions: row 0's only EOS, row 1's first (the padding after it would pool other states).
    assert np.asarray(clip_text.eos_positions(jnp.asarray(ids), eos_token_id)).tolist() == [6, 1]
    unit = np.asarray(clip_text.clip_text_embeds(model, params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(unit, want / np.linalg.norm(want, axis=-1, keepdims=True), atol=2e-5, rtol=0)


def test_text_features_need_a_projection(tmp_path):
    ref = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)))
    ref.save_pretrained(tmp_path)
    with pytest.raises(WeightLoadError, match=r"missing[\s\S]*text_projection"):
        clip_text.load_clip_text_with_projection(tmp_path)


def test_bfloat16_tower_stays_close_to_float32(tmp_path):
    torch.manual_seed(6)
    ref = randomize_(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_VISION)), seed=6)
    ref.save_pretrained(tmp_path)
    model32, params32 = clip_vision.load_clip_vision(tmp_path)
    model16, params16 = clip_vision.load_clip_vision(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert params16["visual_projection"]["kernel"].dtype == jnp.bfloat16
    images = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, size=(2, 40, 40, 3)).astype(np.float32))
    f32 = np.asarray(clip_vision.clip_image_embeds(model32, params32, images))
    f16 = clip_vision.clip_image_embeds(model16, params16, images)
    assert f16.dtype == jnp.float32
    cos = (f32 * np.asarray(f16)).sum(-1)
    assert cos.min() > 0.995, cos


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(WeightLoadError, match="model folder not found: .*absent"):
        clip_text.load_clip_text(tmp_path / "absent")
    with pytest.raises(WeightLoadError, match="no config.json in"):
        clip_vision.load_clip_vision(tmp_path)

    ref = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)))
    ref.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(WeightLoadError, match="no weights file in .*model.safetensors"):
        clip_text.load_clip_text(tmp_path)

    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "encoder.layers.1.mlp.fc2.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"model.safetensors[\s\S]*missing[\s\S]*encoder/layers_1/mlp/fc2/kernel"):
        clip_text.load_clip_text(tmp_path)

    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=48)))
    with pytest.raises(WeightLoadError, match=r"encoder.layers.0.mlp.fc1.weight: file \(32, 64\) vs model \(32, 48\)"):
        clip_text.load_clip_text(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
    with pytest.raises(ValueError, match="'hidden_act' = 'relu'"):
        clip_text.load_clip_text(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="clip_vision_model")))
    with pytest.raises(ValueError, match="'model_type' = 'clip_vision_model'"):
        clip_text.load_clip_text(tmp_path)

    vision = clip_vision.CLIPVisionWithProjection(clip_vision.CLIPVisionConfig(**TINY_VISION))
    with pytest.raises(ValueError, match=r"shape \(1, 32, 32, 3\).*\[B, \*\(28, 28, 3\)\]"):
        vision.apply({"params": vision.param_shapes()}, jnp.zeros((1, 32, 32, 3)))


# ----------------------------------------------------------------------------------------------------------
# Real shapes (random weights): `pytest -m slow tests/test_clip.py`


@pytest.mark.slow
def test_sd15_text_encoder_shape_matches_transformers():
    """CLIP ViT-L/14 text tower of SD v1-5: 12 layers, width 768, 12 heads, 77 positions, vocab 49408."""
    start = time.time()
    torch.manual_seed(10)
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    )
    ref = transformers.CLIPTextModel(config).eval()
    model = clip_text.CLIPTextTransformer(clip_text.CLIPTextConfig.from_dict(config.to_dict()))
    params = clip_text.clip_text_params(model, {k: v.numpy() for k, v in ref.state_dict().items()}, "in-memory")
    ids = np.full((2, 77), 49407, np.int32)
    ids[:, 0] = 49406
    ids[0, 1:20] = np.arange(1000, 1019)
    mask = np.zeros((2, 77), np.int32)
    mask[0, :21] = 1
    mask[1, :2] = 1
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    print(f"SD-1.5 text encoder: max abs diff {np.abs(got - want).max():.2e}; {time.time() - start:.0f} s")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_vit_h14_vision_tower_shape_matches_transformers():
    """CLIP ViT-H/14 (laion2B): 32 layers, width 1280, 16 heads, patch 14, 224 px, MLP 5120, gelu, projection 1024."""
    start = time.time()
    torch.manual_seed(11)
    config = transformers.CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
    )
    ref = transformers.CLIPVisionModelWithProjection(config).eval()
    model = clip_vision.CLIPVisionWithProjection(clip_vision.CLIPVisionConfig.from_dict(config.to_dict()))
    params = clip_vision.clip_vision_params(model, {k: v.numpy() for k, v in ref.state_dict().items()}, "in-memory")
    images = np.random.default_rng(12).uniform(-1, 1, size=(1, 512, 512, 3)).astype(np.float32)
    got = np.asarray(jax.jit(lambda p, im: clip_vision.clip_image_embeds(model, p, im))(params, jnp.asarray(images)))
    with torch.no_grad():
        want = torch_clip_feature(ref, images, 224).numpy()
    print(f"ViT-H/14 clip feature: max abs diff {np.abs(got - want).max():.2e}; {time.time() - start:.0f} s")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
