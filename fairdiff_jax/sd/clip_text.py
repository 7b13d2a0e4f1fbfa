"""CLIP text tower (Stable Diffusion's text encoder) in Flax.

Equal to transformers' `CLIPTextModel` (last_hidden_state), and with `CLIPTextWithProjection` to a CLIPModel's
`get_text_features` (the EOS token's state through text_projection: CLIP-T's text side); tests/test_clip.py
proves both against transformers with random weights.

Parameter paths mirror transformers' module names, so that checkpoints convert with the generic rule of
`nn.weights.convert_state_dict`: `embeddings/token_embedding`, `embeddings/position_embedding`,
`encoder/layers_<i>/{layer_norm1, self_attn/{q_proj, k_proj, v_proj, out_proj}, layer_norm2, mlp/{fc1, fc2}}`,
`final_layer_norm`. transformers 4.x files (Stable Diffusion v1-5's text_encoder) prefix every key with
`text_model.`, transformers 5.x files do not: `TEXT_RENAME_RULES` drops the prefix, so the params tree is the
same for both. A PyTorch key is `text_model.` + the Flax path with `/` -> `.` and `layers_<i>` -> `layers.<i>`
(what LoRA files use).
"""

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.nn.attention import AttentionImpl
from fairdiff_jax.nn.layers import l2_normalize
from fairdiff_jax.nn.transformer import (
    WEIGHT_STEMS,
    check_activation,
    check_heads,
    clip_encoder,
    known_fields,
    layer_norm,
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

TEXT_RENAME_RULES = ((r"^text_model\.", ""),)
# position_ids is a buffer some files carry; the other keys belong to a CLIPModel's other tower or head.
TEXT_IGNORE = (r"position_ids$", r"^vision_model\.", r"^visual_projection\.", r"^text_projection\.", r"^logit_scale$")
# With the projection (CLIP-T): the tower stays under `text_model/`, only the vision half and the logit scale are skipped.
PROJECTED_TEXT_IGNORE = (r"position_ids$", r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$")


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
    # Only the pooled (EOS) output reads these: text_projection's width (a CLIPModel's top-level
    # projection_dim) and the EOS id (files written before transformers 4.31 say 2, see `eos_positions`).
    projection_dim: int = 512
    eos_token_id: int = 49407

    def __post_init__(self):
        check_activation(self.hidden_act)
        check_heads(self.hidden_size, self.num_attention_heads)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a CLIPTextModel config.json dict, or a CLIPModel one (its `text_config`; the projection width is
        the CLIPModel's top-level `projection_dim`, as for the vision tower)."""
        fields = tower_fields(config, "text_config", ("clip_text_model", "clip"), cls.projection_dim)
        return cls(**known_fields(cls, fields))


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
        encoder = clip_encoder(cfg, self.dtype, self.param_dtype, self.attention_impl, self.remat)
        return layer_norm(encoder(x, visible), cfg.layer_norm_eps, self.param_dtype, "final_layer_norm")

    def param_shapes(self) -> Params:
        """The params tree as ShapeDtypeStructs (nothing is initialised or compiled)."""
        ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        return jax.eval_shape(self.init, jax.random.key(0), ids)["params"]


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B] index of each row's EOS token, the token whose state CLIP pools: the first `eos_token_id`; for
    configs written before transformers 4.31 (eos_token_id 2, a wrong value) the largest id, as transformers
    still does for them (the real EOS, 49407, is the vocabulary's largest)."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextWithProjection(nn.Module):
    """A CLIPModel's text half: `get_text_features` = text_projection(last_hidden_state at the EOS token).

    Parameter paths: `text_model/...` (the CLIPTextTransformer above) and `text_projection` (no bias), the keys
    of a CLIPModel file without its vision half.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """input_ids, attention_mask: [B, L] (right padding) -> [B, projection_dim] in `dtype` (not normalised)."""
        cfg = self.config
        hidden = CLIPTextTransformer(cfg, self.dtype, self.param_dtype, self.attention_impl, name="text_model")(
            input_ids, attention_mask
        )
        pooled = hidden[jnp.arange(hidden.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
        projection = nn.Dense(
            cfg.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="text_projection"
        )
        return projection(pooled)

    def param_shapes(self) -> Params:
        ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        return jax.eval_shape(self.init, jax.random.key(0), ids)["params"]


def clip_text_embeds(model: CLIPTextWithProjection, params: Params, input_ids: jax.Array,
                     attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """CLIP-T's text feature: [B, projection_dim] float32, unit L2 norm."""
    return l2_normalize(model.apply({"params": params}, input_ids, attention_mask).astype(jnp.float32))


def clip_text_params(model: CLIPTextTransformer, state_dict: Mapping[str, np.ndarray], source: str) -> Params:
    """A CLIPTextModel (or CLIPModel) state dict -> params of `model` (host numpy arrays, param_dtype)."""
    return convert_state_dict(
        state_dict, model.param_shapes(), source=source, rename_rules=TEXT_RENAME_RULES, ignore=TEXT_IGNORE
    )



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


def load_clip_text_with_projection(
    folder: str | Path,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention_impl: AttentionImpl = "xla",
) -> tuple[CLIPTextWithProjection, Params]:
    """A transformers CLIPModel folder (e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K; the vision half is skipped) ->
    (module, params) of its text features. A folder without text_projection (a plain CLIPTextModel, e.g. SD's
    text_encoder/) fails with WeightLoadError naming the file and the key."""
    config = CLIPTextConfig.from_dict(read_config_json(folder))
    model = CLIPTextWithProjection(config, dtype, param_dtype, attention_impl)
    path = find_weights_file(folder, WEIGHT_STEMS)
    params = convert_state_dict(read_state_dict(path), model.param_shapes(), source=str(path), ignore=PROJECTED_TEXT_IGNORE)
    return model, params
