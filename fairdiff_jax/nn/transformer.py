"""The pre-norm transformer encoder that CLIP's text and vision towers (and DINOv2) are built from, and the
config helpers their config.json readers share.

Precision: `dtype` is the compute dtype of the dense layers and the residual stream, `param_dtype` the dtype
of the stored weights. LayerNorms compute in float32 (then cast back to `dtype`) and attention's softmax runs
in float32 (nn/attention.py), so a bfloat16 tower stays close to the float32 one.
"""

import dataclasses
from functools import partial
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairdiff_jax.nn.attention import AttentionImpl, dot_product_attention
from fairdiff_jax.nn.layers import l2_normalize

Dtype = Any

# Weight file stems a transformers folder may hold (safetensors preferred by find_weights_file).
WEIGHT_STEMS = ("model", "pytorch_model")

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP, SD v1-5's text encoder
    "gelu": partial(jax.nn.gelu, approximate=False),  # open_clip models such as ViT-H/14 laion2B
}


# ----------------------------------------------------------------------------------------------------------
# Config helpers


def check_activation(hidden_act: str) -> None:
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"config key 'hidden_act' = {hidden_act!r} is not supported (supported: {sorted(ACTIVATIONS)})")


def check_heads(hidden_size: int, num_attention_heads: int) -> None:
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"config key 'hidden_size' = {hidden_size} is not divisible by 'num_attention_heads' = {num_attention_heads}"
        )


def sub_config(config: Mapping[str, Any], key: str, model_types: tuple[str, ...]) -> dict[str, Any]:
    """The fields of one tower: the dict itself, or a CLIPModel dict's `key` (updated by old files' `<key>_dict`)."""
    model_type = config.get("model_type")
    if model_type is not None and model_type not in model_types:
        raise ValueError(f"config key 'model_type' = {model_type!r} is not one of {model_types}")
    if key in config or f"{key}_dict" in config:
        return {**(config.get(key) or {}), **(config.get(f"{key}_dict") or {})}
    return dict(config)


def tower_fields(config: Mapping[str, Any], key: str, model_types: tuple[str, ...], projection_default: int) -> dict[str, Any]:
    """`sub_config`, plus the projection width of a CLIPModel dict: its top-level `projection_dim` (what the
    tower's projection was built with; the nested config's own `projection_dim` is often a stale default)."""
    fields = sub_config(config, key, model_types)
    if key in config or f"{key}_dict" in config:
        fields["projection_dim"] = config.get("projection_dim", projection_default)
    return fields


def known_fields(cls, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a config.json dict that are fields of the dataclass `cls` (the rest describe training etc.)."""
    return {f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields}


# ----------------------------------------------------------------------------------------------------------
# Building blocks


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
# Encoder (CLIP text, CLIP vision, DINOv2)


@dataclasses.dataclass(frozen=True)
class LayerNames:
    """The parameter names of a pre-norm layer and of the encoder's layers, as each checkpoint spells them."""

    norm1: str
    attention: str
    norm2: str
    layer_prefix: str  # layer i is named f"{layer_prefix}{i}"


CLIP_LAYER_NAMES = LayerNames("layer_norm1", "self_attn", "layer_norm2", "layers_")
DINOV2_LAYER_NAMES = LayerNames("norm1", "attention", "norm2", "layer_")


@dataclasses.dataclass(frozen=True)
class PreNormSpec:
    """What a pre-norm layer computes: heads, MLP width and activation, LayerNorm epsilon, parameter names,
    and whether the two branches carry DINOv2's learned per-channel LayerScale."""

    num_heads: int
    mlp_features: int
    activation: str
    epsilon: float
    names: LayerNames
    layer_scale: bool = False


class PreNormLayer(nn.Module):
    """Pre-LN transformer layer: x + s1 * attn(norm1(x)), then x + s2 * mlp(norm2(x)); s1, s2 are the learned
    `layer_scale1/2` when `spec.layer_scale` (DINOv2), else absent (CLIP)."""

    spec: PreNormSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"

    def _scaled(self, h: jax.Array, name: str) -> jax.Array:
        if not self.spec.layer_scale:
            return h
        scale = self.param(name, nn.initializers.ones, (h.shape[-1],), self.param_dtype)
        return scale.astype(self.dtype) * h

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """x: [B, T, D]; mask: boolean, broadcastable to [B, heads, T, T], True = may attend."""
        spec, names = self.spec, self.spec.names
        h = layer_norm(x, spec.epsilon, self.param_dtype, names.norm1)
        attention = SelfAttention(spec.num_heads, self.dtype, self.param_dtype, self.attention_impl, name=names.attention)
        x = x + self._scaled(attention(h, mask), "layer_scale1")
        h = layer_norm(x, spec.epsilon, self.param_dtype, names.norm2)
        h = MLP(spec.mlp_features, spec.activation, self.dtype, self.param_dtype, name="mlp")(h)
        return x + self._scaled(h, "layer_scale2")


class PreNormEncoder(nn.Module):
    """`num_layers` PreNormLayers; `remat` recomputes each layer in the backward pass."""

    num_layers: int
    spec: PreNormSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        layer_cls = nn.remat(PreNormLayer) if self.remat else PreNormLayer
        for i in range(self.num_layers):
            layer = layer_cls(self.spec, self.dtype, self.param_dtype, self.attention_impl, name=f"{self.spec.names.layer_prefix}{i}")
            x = layer(x, mask)
        return x


def clip_encoder(config: Any, dtype: Dtype, param_dtype: Dtype, attention_impl: AttentionImpl, remat: bool) -> PreNormEncoder:
    """The encoder of a CLIP text or vision tower (config: num_hidden_layers, num_attention_heads,
    intermediate_size, hidden_act, layer_norm_eps), named `encoder` as in the checkpoints."""
    spec = PreNormSpec(config.num_attention_heads, config.intermediate_size, config.hidden_act, config.layer_norm_eps,
                       CLIP_LAYER_NAMES)
    return PreNormEncoder(config.num_hidden_layers, spec, dtype, param_dtype, attention_impl, remat, name="encoder")


def class_and_patch_tokens(module: nn.Module, pixel_values: jax.Array, width: int, patch_size: int, use_bias: bool,
                           conv_name: str, class_token: jax.Array) -> jax.Array:
    """[B, S, S, C] -> [B, 1 + (S/patch)^2, width]: `class_token` (any shape of `width` values) first, then the
    non-overlapping patches' linear embeddings (a stride-patch conv named `conv_name`) in row-major order.
    Call from `module`'s compact method; dtypes are the module's."""
    patch = (patch_size, patch_size)
    patches = nn.Conv(width, patch, strides=patch, padding="VALID", use_bias=use_bias, dtype=module.dtype,
                      param_dtype=module.param_dtype, parent=module, name=conv_name)(pixel_values)
    batch = patches.shape[0]
    class_tokens = jnp.broadcast_to(class_token.astype(module.dtype).reshape(1, 1, width), (batch, 1, width))
    return jnp.concatenate([class_tokens, patches.reshape(batch, -1, width)], axis=1)


def check_pixels(pixel_values: jax.Array, size: int, channels: int, tower: str) -> None:
    """Raises a ValueError naming the tower unless pixel_values is [B, size, size, channels]."""
    expected = (size, size, channels)
    if tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; this {tower} takes [B, *{expected}]")


def normalized_tower_features(apply: Callable[[jax.Array], jax.Array], images: jax.Array, size: int,
                              mean: tuple[float, ...], std: tuple[float, ...], dtype: Dtype) -> jax.Array:
    """The feature of an image tower, differentiable w.r.t. `images`.

    images: [N, H, W, 3] float32 in [-1, 1] (square) -> resized to size (`resize_bilinear`), mapped to [0, 1],
    mean/std normalised, cast to the tower's `dtype`, `apply`-ed; returns [N, D] float32 with unit L2 norm.
    """
    pixels = resize_bilinear(images.astype(jnp.float32), size)
    pixels = ((pixels + 1.0) * 0.5 - jnp.asarray(mean)) / jnp.asarray(std)
    return l2_normalize(apply(pixels.astype(dtype)).astype(jnp.float32))
