"""CLIP text tower (Stable Diffusion's text encoder) in Flax.

Equal to transformers' `CLIPTextModel` (last_hidden_state); tests/test_clip.py proves it against transformers
with random weights.

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
from fairdiff_jax.nn.transformer import (
    WEIGHT_STEMS,
    CLIPEncoder,
    check_activation,
    check_heads,
    known_fields,
    layer_norm,
    sub_config,
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
        return cls(**known_fields(cls, sub_config(config, "text_config", ("clip_text_model", "clip"))))


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

