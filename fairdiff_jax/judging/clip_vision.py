"""CLIP vision tower with projection in Flax: the image-semantics tower.

Equal to transformers' `CLIPVisionModelWithProjection` (image_embeds); tests/test_clip.py proves it against
transformers with random weights. Parameter paths: `vision_model/{embeddings/{patch_embedding,
class_embedding, position_embedding}, pre_layrnorm, encoder/layers_<i>/..., post_layernorm}` and
`visual_projection`, exactly the keys of a CLIPVisionModelWithProjection file and the vision half of a
CLIPModel file. The feature function returns float32 whatever the tower's dtype.
"""

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.nn.attention import AttentionImpl
from fairdiff_jax.nn.transformer import (
    WEIGHT_STEMS,
    check_activation,
    check_heads,
    check_pixels,
    class_and_patch_tokens,
    clip_encoder,
    known_fields,
    layer_norm,
    normalized_tower_features,
    tower_fields,
)
from fairdiff_jax.nn.weights import (
    convert_state_dict,
    find_weights_file,
    read_config_json,
    read_state_dict,
)

Dtype = Any
Params = Mapping[str, Any]

VISION_IGNORE = (r"position_ids$", r"^text_model\.", r"^text_projection\.", r"^logit_scale$")

# Normalisation constants of the CLIP image processor, for pixels in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
        """From a CLIPVisionModelWithProjection config.json dict, or a CLIPModel one (`tower_fields`)."""
        fields = tower_fields(config, "vision_config", ("clip_vision_model", "clip"), cls.projection_dim)
        return cls(**known_fields(cls, fields))


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B, S, S, C] -> [B, 1 + (S/patch)^2, D]: class token first, then patches in row-major order."""
        cfg = self.config
        class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,), self.param_dtype)
        x = class_and_patch_tokens(self, pixel_values, cfg.hidden_size, cfg.patch_size, False, "patch_embedding", class_embedding)
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
        x = clip_encoder(cfg, self.dtype, self.param_dtype, self.attention_impl, self.remat)(x)
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
        check_pixels(pixel_values, cfg.image_size, cfg.num_channels, "CLIP tower")
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
    """The CLIP feature of the image-semantics loss (docs/method.md#the-loss); differentiable w.r.t. `images`.

    images: [N, H, W, 3] float32 in [-1, 1] (square) at the tower's image_size, CLIP mean/std normalised
    (`normalized_tower_features`); returns [N, projection_dim] float32, unit L2 norm.
    """
    apply = lambda pixels: model.apply({"params": params}, pixels)  # noqa: E731
    return normalized_tower_features(apply, images, model.config.image_size, CLIP_MEAN, CLIP_STD, model.dtype)


def clip_vision_params(model: CLIPVisionWithProjection, state_dict: Mapping[str, np.ndarray], source: str) -> Params:
    """A CLIPVisionModelWithProjection (or CLIPModel) state dict -> params of `model` (host numpy arrays)."""
    return convert_state_dict(state_dict, model.param_shapes(), source=source, ignore=VISION_IGNORE)



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
