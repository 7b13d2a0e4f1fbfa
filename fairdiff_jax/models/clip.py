"""CLIP text tower (Stable Diffusion's text encoder) and CLIP vision tower with projection, in Flax.

Equal to transformers' `CLIPTextModel` (last_hidden_state) and `CLIPVisionModelWithProjection`
(image_embeds); tests/test_clip.py proves it against transformers with random weights.

Parameter paths mirror transformers' module names, so that checkpoints convert with the generic rule of
`weights.convert_state_dict`:
  - text: `embeddings/token_embedding`, `embeddings/position_embedding`,
    `encoder/layers_<i>/{layer_norm1, self_attn/{q_proj, k_proj, v_proj, out_proj}, layer_norm2, mlp/{fc1, fc2}}`,
    `final_layer_norm`. transformers 4.x files (Stable Diffusion v1-5's text_encoder) prefix every key
    with `text_model.`, transformers 5.x files do not: `TEXT_RENAME_RULES` drops the prefix, so the
    params tree is the same for both. A PyTorch key is `text_model.` + the Flax path with `/` -> `.`
    and `layers_<i>` -> `layers.<i>` (what the original's LoRA files use).
  - vision: `vision_model/{embeddings/{patch_embedding, class_embedding, position_embedding}, pre_layrnorm,
    encoder/layers_<i>/..., post_layernorm}` and `visual_projection`, exactly the keys of a
    CLIPVisionModelWithProjection file and the vision half of a CLIPModel file.

Precision: `dtype` is the compute dtype of the dense layers, the embeddings and the residual stream;
`param_dtype` the dtype of the stored weights. LayerNorms always compute in float32 (then cast back to
`dtype`) and attention's softmax runs in float32 (attention.py), so a bfloat16 tower stays close to the
float32 one; the feature functions return float32.
"""

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.models.attention import AttentionImpl, dot_product_attention
from fairdiff_jax.models.common import l2_normalize
from fairdiff_jax.weights import convert_state_dict, find_weights_file, read_config_json, read_state_dict

Dtype = Any
Params = Mapping[str, Any]

# Weight file stems a transformers folder may hold (safetensors preferred by find_weights_file).
WEIGHT_STEMS = ("model", "pytorch_model")

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP, SD v1-5's text encoder
    "gelu": partial(jax.nn.gelu, approximate=False),  # open_clip models such as ViT-H/14 laion2B
}

TEXT_RENAME_RULES = ((r"^text_model\.", ""),)
# position_ids is a buffer some files carry; the other keys belong to a CLIPModel's other tower or head.
TEXT_IGNORE = (r"position_ids$", r"^vision_model\.", r"^visual_projection\.", r"^text_projection\.", r"^logit_scale$")
VISION_IGNORE = (r"position_ids$", r"^text_model\.", r"^text_projection\.", r"^logit_scale$")

# Normalisation constants of the CLIP image processor, for pixels in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------------
# Configs


def check_activation(hidden_act: str) -> None:
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"config key 'hidden_act' = {hidden_act!r} is not supported (supported: {sorted(ACTIVATIONS)})")


def check_heads(hidden_size: int, num_attention_heads: int) -> None:
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"config key 'hidden_size' = {hidden_size} is not divisible by 'num_attention_heads' = {num_attention_heads}"
        )


def _sub_config(config: Mapping[str, Any], key: str, model_types: tuple[str, ...]) -> dict[str, Any]:
    """The fields of one tower: the dict itself, or a CLIPModel dict's `key` (updated by old files' `<key>_dict`)."""
    model_type = config.get("model_type")
    if model_type is not None and model_type not in model_types:
        raise ValueError(f"config key 'model_type' = {model_type!r} is not one of {model_types}")
    if key in config or f"{key}_dict" in config:
        return {**(config.get(key) or {}), **(config.get(f"{key}_dict") or {})}
    return dict(config)


def known_fields(cls, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a config.json dict that are fields of the dataclass `cls` (the rest describe training etc.)."""
    return {f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers CLIPTextConfig (defaults are transformers' defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_activation(self.hidden_act)
        check_heads(self.hidden_size, self.num_attention_heads)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a CLIPTextModel config.json dict, or a CLIPModel one (its `text_config`)."""
        return cls(**known_fields(cls, _sub_config(config, "text_config", ("clip_text_model", "clip"))))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The architecture fields of a transformers CLIPVisionConfig plus the projection width."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_activation(self.hidden_act)
        check_heads(self.hidden_size, self.num_attention_heads)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a CLIPVisionModelWithProjection config.json dict, or a CLIPModel one.

        For a CLIPModel the projection width is the top-level `projection_dim` (what its
        visual_projection was built with); the nested vision_config's own `projection_dim` is often a stale
        default (512) there.
        """
        fields = _sub_config(config, "vision_config", ("clip_vision_model", "clip"))
        if "vision_config" in config or "vision_config_dict" in config:
            fields["projection_dim"] = config.get("projection_dim", cls.projection_dim)
        return cls(**known_fields(cls, fields))


# ----------------------------------------------------------------------------------------------------------
# Building blocks (shared with dinov2.py)


def layer_norm(x: jax.Array, epsilon: float, param_dtype: Dtype, name: str) -> jax.Array:
    """LayerNorm computed in float32 (two-pass variance, like PyTorch), returned in x's dtype."""
    norm = nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False, name=name)
    return norm(x).astype(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (all with bias), scale 1/sqrt(head_dim)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """x: [B, T, D]; mask: boolean, broadcastable to [B, heads, T, T], True = may attend. Returns [B, T, D]."""
        batch, tokens, width = x.shape
        dense = partial(nn.Dense, width, dtype=self.dtype, param_dtype=self.param_dtype)
        heads = lambda y: y.reshape(batch, tokens, self.num_heads, width // self.num_heads)  # noqa: E731
        q = heads(dense(name="q_proj")(x))
        k = heads(dense(name="k_proj")(x))
        v = heads(dense(name="v_proj")(x))
        out = dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
        return dense(name="out_proj")(out.reshape(batch, tokens, width))


class MLP(nn.Module):
    """fc1 -> activation -> fc2, back to the input width."""

    hidden_features: int
    activation: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.activation](dense(self.hidden_features, name="fc1")(x))
        return dense(x.shape[-1], name="fc2")(h)


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
    """images: [N, H, W, C] -> [N, size, size, C]; bilinear, half-pixel centres, no antialiasing.

    This is what the original's `torchvision.transforms.Resize(224)` did to a square image tensor with
    torchvision 0.16 (antialiasing became the default for tensors in 0.17, and would change the features).
    Linear in `images`, hence differentiable.
    """
    n, _, _, c = images.shape
    return jax.image.resize(images, (n, size, size, c), method="bilinear", antialias=False)


# ----------------------------------------------------------------------------------------------------------
# Encoder (both towers)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: "CLIPTextConfig | CLIPVisionConfig"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        h = layer_norm(x, cfg.layer_norm_eps, self.param_dtype, "layer_norm1")
        attention = SelfAttention(cfg.num_attention_heads, self.dtype, self.param_dtype, self.attention_impl, name="self_attn")
        x = x + attention(h, mask)
        h = layer_norm(x, cfg.layer_norm_eps, self.param_dtype, "layer_norm2")
        return x + MLP(cfg.intermediate_size, cfg.hidden_act, self.dtype, self.param_dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` CLIPEncoderLayers named layers_<i>; `remat` recomputes each layer in the backward pass."""

    config: "CLIPTextConfig | CLIPVisionConfig"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        for i in range(self.config.num_hidden_layers):
            x = layer_cls(self.config, self.dtype, self.param_dtype, self.attention_impl, name=f"layers_{i}")(x, mask)
        return x


# ----------------------------------------------------------------------------------------------------------
# Text tower


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        embed = partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = embed(cfg.vocab_size, name="token_embedding")(input_ids)
        positions = embed(cfg.max_position_embeddings, name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return tokens + positions


class CLIPTextTransformer(nn.Module):
    """CLIP text encoder: token + position embeddings, pre-LN layers with causal + padding mask, final LayerNorm."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """input_ids: [B, L] int32; attention_mask: [B, L] in {0, 1} (0 = padding, masked as a key), or None.

        Returns last_hidden_state [B, L, hidden_size] in `dtype`. Position ids are 0..L-1. Padding must be on
        the right (every query keeps at least the first token visible), as the CLIP tokenizer pads.
        """
        cfg = self.config
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens, more than max_position_embeddings = {cfg.max_position_embeddings}")
        x = CLIPTextEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(input_ids)
        visible = jnp.tril(jnp.ones((length, length), bool))[None, None]  # causal: [1, 1, L, L]
        if attention_mask is not None:
            visible = visible & (attention_mask[:, None, None, :] != 0)  # padding keys: [B, 1, L, L]
        encoder = CLIPEncoder(cfg, self.dtype, self.param_dtype, self.attention_impl, self.remat, name="encoder")
        return layer_norm(encoder(x, visible), cfg.layer_norm_eps, self.param_dtype, "final_layer_norm")

    def param_shapes(self) -> Params:
        """The params tree as ShapeDtypeStructs (nothing is initialised or compiled)."""
        ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        return jax.eval_shape(self.init, jax.random.key(0), ids)["params"]


# ----------------------------------------------------------------------------------------------------------
# Vision tower


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B, S, S, C] -> [B, 1 + (S/patch)^2, D]: class token first, then patches in row-major order."""
        cfg = self.config
        patch = (cfg.patch_size, cfg.patch_size)
        patches = nn.Conv(
            cfg.hidden_size, patch, strides=patch, padding="VALID", use_bias=False,
            dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding",
        )(pixel_values)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, cfg.hidden_size)
        class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,), self.param_dtype)
        class_tokens = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size))
        x = jnp.concatenate([class_tokens, patches], axis=1)
        positions = nn.Embed(
            x.shape[1], cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="position_embedding"
        )(jnp.arange(x.shape[1]))
        return x + positions


class CLIPVisionTransformer(nn.Module):
    """CLIP ViT: embeddings, pre_layrnorm, encoder, post_layernorm of the class token (transformers' pooler_output)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        x = CLIPVisionEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
        x = layer_norm(x, cfg.layer_norm_eps, self.param_dtype, "pre_layrnorm")
        x = CLIPEncoder(cfg, self.dtype, self.param_dtype, self.attention_impl, self.remat, name="encoder")(x)
        return layer_norm(x[:, 0], cfg.layer_norm_eps, self.param_dtype, "post_layernorm")


class CLIPVisionWithProjection(nn.Module):
    """transformers' CLIPVisionModelWithProjection: image_embeds = visual_projection(pooled class token)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: [B, image_size, image_size, num_channels], CLIP-normalised. Returns [B, projection_dim]."""
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; this CLIP tower takes [B, *{expected}]")
        pooled = CLIPVisionTransformer(cfg, self.dtype, self.param_dtype, self.attention_impl, self.remat, name="vision_model")(
            pixel_values
        )
        projection = nn.Dense(
            cfg.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="visual_projection"
        )
        return projection(pooled)

    def param_shapes(self) -> Params:
        """The params tree as ShapeDtypeStructs (nothing is initialised or compiled)."""
        cfg = self.config
        pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), self.dtype)
        return jax.eval_shape(self.init, jax.random.key(0), pixels)["params"]


def clip_image_embeds(model: CLIPVisionWithProjection, params: Params, images: jax.Array) -> jax.Array:
    """The CLIP feature of the image-semantics loss (SPEC 1, 5.7); differentiable w.r.t. `images`.

    images: [N, H, W, 3] float32 in [-1, 1] (square) -> resized to the tower's image_size (`resize_bilinear`),
    mapped to [0, 1], CLIP mean/std normalised, image_embeds; returns [N, projection_dim] float32, unit L2 norm.
    """
    pixels = resize_bilinear(images.astype(jnp.float32), model.config.image_size)
    pixels = ((pixels + 1.0) * 0.5 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    embeds = model.apply({"params": params}, pixels.astype(model.dtype))
    return l2_normalize(embeds.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# Loading


def clip_text_params(model: CLIPTextTransformer, state_dict: Mapping[str, np.ndarray], source: str) -> Params:
    """A CLIPTextModel (or CLIPModel) state dict -> params of `model` (host numpy arrays, param_dtype)."""
    return convert_state_dict(
        state_dict, model.param_shapes(), source=source, rename_rules=TEXT_RENAME_RULES, ignore=TEXT_IGNORE
    )


def clip_vision_params(model: CLIPVisionWithProjection, state_dict: Mapping[str, np.ndarray], source: str) -> Params:
    """A CLIPVisionModelWithProjection (or CLIPModel) state dict -> params of `model` (host numpy arrays)."""
    return convert_state_dict(state_dict, model.param_shapes(), source=source, ignore=VISION_IGNORE)


def load_clip_text(
    folder: str | Path,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention_impl: AttentionImpl = "xla",
    remat: bool = False,
) -> tuple[CLIPTextTransformer, Params]:
    """A transformers CLIPTextModel folder (config.json + model.safetensors or pytorch_model.bin), e.g. SD v1-5's
    `text_encoder/`, or a CLIPModel folder -> (module, params). Params are host numpy arrays in `param_dtype`."""
    config = CLIPTextConfig.from_dict(read_config_json(folder))
    model = CLIPTextTransformer(config, dtype, param_dtype, attention_impl, remat)
    path = find_weights_file(folder, WEIGHT_STEMS)
    return model, clip_text_params(model, read_state_dict(path), str(path))


def load_clip_vision(
    folder: str | Path,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention_impl: AttentionImpl = "xla",
    remat: bool = False,
) -> tuple[CLIPVisionWithProjection, Params]:
    """A transformers CLIPVisionModelWithProjection folder, or a full CLIPModel folder (e.g.
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K; its text weights are skipped) -> (module, params)."""
    config = CLIPVisionConfig.from_dict(read_config_json(folder))
    model = CLIPVisionWithProjection(config, dtype, param_dtype, attention_impl, remat)
    path = find_weights_file(folder, WEIGHT_STEMS)
    return model, clip_vision_params(model, read_state_dict(path), str(path))
