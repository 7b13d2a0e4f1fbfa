"""DINOv2 ViT (ViT-B/14 for the image-semantics loss) in Flax, equal to transformers' Dinov2Model and to the
torch-hub `dinov2_vitb14` the original used; tests/test_dinov2.py proves both.

The checkpoint's position embeddings are for its pretraining grid (518 px: 37x37 patches + CLS). The loss
feeds 224 px images (16x16 patches), so the embeddings are resampled ONCE, at load time, to the grid of the
model's `input_size`, with PyTorch's bicubic interpolation (a = -0.75, which jax.image.resize does not
offer) written in numpy. The two references differ in how they call it:
  - torch hub (the original) and transformers <= 4.4x: `scale_factor=(grid + 0.1) / 37` -> `interpolate_offset=0.1`;
  - transformers 5.x: `size=grid` -> `interpolate_offset=0.0`.
The offset shifts the sampling positions by up to 0.2 patches; use 0.1 to reproduce the original.

Parameter paths: `embeddings/{cls_token, position_embeddings, patch_embeddings}`,
`encoder/layer_<i>/{norm1, attention/{q_proj, k_proj, v_proj, out_proj}, layer_scale1, norm2, mlp/{fc1, fc2},
layer_scale2}`, `layernorm`. The encoder is CLIP's (nn/transformer.py) with LayerScale; the rename rules below map both the
transformers file names and the torch-hub names (whose fused `attn.qkv` is split into q/k/v first) onto them.
The unused `mask_token` is dropped.
"""

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.nn.attention import AttentionImpl
from fairdiff_jax.nn.transformer import (
    DINOV2_LAYER_NAMES,
    WEIGHT_STEMS,
    PreNormEncoder,
    PreNormSpec,
    check_activation,
    check_heads,
    check_pixels,
    class_and_patch_tokens,
    known_fields,
    layer_norm,
    normalized_tower_features,
)
from fairdiff_jax.nn.weights import (
    WeightLoadError,
    convert_state_dict,
    find_weights_file,
    read_config_json,
    read_state_dict,
)

Dtype = Any
Params = Mapping[str, Any]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# transformers Dinov2Model file keys (save_pretrained still writes the 4.x names) -> Flax paths.
TRANSFORMERS_RENAME_RULES = (
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.(output\.dense|o_proj)\.", ".attention.out_proj."),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embeddings."),
    (r"\.layer_scale(\d)\.lambda1$", r".layer_scale\1"),
)
TRANSFORMERS_IGNORE = (r"^embeddings\.mask_token$",)

# torch-hub DinoVisionTransformer keys (after `split_fused_qkv`) -> Flax paths.
HUB_RENAME_RULES = (
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.out_proj."),
    (r"^blocks\.(\d+)\.attn\.", r"encoder.layer.\1.attention."),
    (r"^blocks\.(\d+)\.ls(\d)\.gamma$", r"encoder.layer.\1.layer_scale\2"),
    (r"^blocks\.(\d+)\.", r"encoder.layer.\1."),
    (r"^norm\.", "layernorm."),
)
HUB_IGNORE = (r"^mask_token$",)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """The architecture fields of a transformers Dinov2Config; defaults are ViT-B/14 (facebook/dinov2-base,
    torch-hub dinov2_vitb14). `image_size` is the pretraining resolution the stored position embeddings are for."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False

    def __post_init__(self):
        check_activation(self.hidden_act)
        check_heads(self.hidden_size, self.num_attention_heads)
        # The released ViT-S/B/L use biased q/k/v and a plain MLP; ViT-g's SwiGLU is not built here.
        if not self.qkv_bias:
            raise ValueError("config key 'qkv_bias' = False is not supported")
        if self.use_swiglu_ffn:
            raise ValueError("config key 'use_swiglu_ffn' = True is not supported")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "Dinov2Config":
        """From a transformers Dinov2Model config.json dict."""
        model_type = config.get("model_type")
        if model_type is not None and model_type != "dinov2":
            raise ValueError(f"config key 'model_type' = {model_type!r} is not 'dinov2'")
        return cls(**known_fields(cls, config))


class Dinov2Embeddings(nn.Module):
    config: Dinov2Config
    input_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B, S, S, C] -> [B, 1 + (S/patch)^2, D]: CLS first, then patches row-major, plus position embeddings."""
        cfg = self.config
        cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, cfg.hidden_size), self.param_dtype)
        x = class_and_patch_tokens(self, pixel_values, cfg.hidden_size, cfg.patch_size, True, "patch_embeddings", cls_token)
        tokens = 1 + (self.input_size // cfg.patch_size) ** 2
        positions = self.param(
            "position_embeddings", nn.initializers.normal(0.02), (1, tokens, cfg.hidden_size), self.param_dtype
        )
        return x + positions.astype(self.dtype)


class Dinov2Model(nn.Module):
    """DINOv2 ViT for `input_size` x `input_size` images; returns the CLS token of the final LayerNorm (transformers'
    pooler_output, torch-hub's `x_norm_clstoken`). Position embeddings are stored for the input grid (see loaders)."""

    config: Dinov2Config
    input_size: int = 224
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: [B, input_size, input_size, num_channels], ImageNet-normalised. Returns [B, hidden_size]."""
        cfg = self.config
        check_pixels(pixel_values, self.input_size, cfg.num_channels, "DINOv2")
        x = Dinov2Embeddings(cfg, self.input_size, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
        spec = PreNormSpec(cfg.num_attention_heads, int(cfg.hidden_size * cfg.mlp_ratio), cfg.hidden_act,
                           cfg.layer_norm_eps, DINOV2_LAYER_NAMES, layer_scale=True)
        encoder = PreNormEncoder(cfg.num_hidden_layers, spec, self.dtype, self.param_dtype, self.attention_impl, self.remat,
                                 name="encoder")
        x = encoder(x)
        # LayerNorm is per token: normalising only the CLS token equals normalising all and taking the first.
        return layer_norm(x[:, 0], cfg.layer_norm_eps, self.param_dtype, "layernorm")

    def param_shapes(self) -> Params:
        """The params tree as ShapeDtypeStructs (nothing is initialised or compiled)."""
        pixels = jax.ShapeDtypeStruct((1, self.input_size, self.input_size, self.config.num_channels), self.dtype)
        return jax.eval_shape(self.init, jax.random.key(0), pixels)["params"]


def dino_image_embeds(model: Dinov2Model, params: Params, images: jax.Array) -> jax.Array:
    """The DINOv2 feature of the image-semantics loss (docs/method.md#the-loss); differentiable w.r.t. `images`.

    images: [N, H, W, 3] float32 in [-1, 1] (square) at `model.input_size`, ImageNet mean/std normalised
    (`normalized_tower_features`); returns the CLS embedding [N, hidden_size] float32, unit L2 norm.
    """
    apply = lambda pixels: model.apply({"params": params}, pixels)  # noqa: E731
    return normalized_tower_features(apply, images, model.input_size, IMAGENET_MEAN, IMAGENET_STD, model.dtype)


# ----------------------------------------------------------------------------------------------------------
# Position-embedding resampling (PyTorch bicubic, align_corners=False, no antialiasing)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fractions t: [n] -> [n, 4]."""
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """[out_size, in_size] matrix M with M @ signal == torch's 1-D bicubic resampling of the signal.

    Mirrors ATen's upsample_bicubic2d (align_corners=False): source = step * (dst + 0.5) - 0.5 with
    step = 1 / scale_factor when a scale factor was passed, else in_size / out_size; taps at
    floor(source) - 1 .. + 2 clamped to the border. Step and sample positions are rounded to float32 as in
    ATen's float32 kernel (they move the result by up to ~1e-5); the weights are float64, so the matrix
    agrees with torch's float32 output to that output's own rounding (~2e-6).
    """
    step = np.float32(1.0 / scale_factor) if scale_factor else np.float32(in_size) / np.float32(out_size)
    source = (np.float64(step) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    first = np.floor(source)
    weights = _cubic_weights((source - first).astype(np.float64))
    taps = np.clip(first.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def resize_position_embeddings(position_embeddings: np.ndarray, grid: int, interpolate_offset: float) -> np.ndarray:
    """[1, 1 + M*M, D] (CLS first, then an M x M grid) -> [1, 1 + grid*grid, D], as the references do per forward.

    interpolate_offset > 0: torch-hub's `scale_factor = (grid + offset) / M`; 0: transformers 5's `size = grid`.
    A grid equal to M is returned unchanged (both references skip the interpolation then).
    """
    tokens, width = position_embeddings.shape[1:]
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise ValueError(f"position embeddings hold {tokens - 1} patch positions, not a square grid")
    if side == grid:
        return position_embeddings
    scale_factor = (grid + interpolate_offset) / side if interpolate_offset else None
    if scale_factor is not None and math.floor(side * scale_factor) != grid:
        resized = math.floor(side * scale_factor)
        raise ValueError(f"interpolate_offset {interpolate_offset} turns a {side}-grid into {resized}, not {grid}")
    matrix = torch_bicubic_matrix(side, grid, scale_factor)
    patch_grid = position_embeddings[0, 1:].astype(np.float64).reshape(side, side, width)
    resized = np.einsum("hi,ijd,wj->hwd", matrix, patch_grid, matrix).reshape(1, grid * grid, width)
    return np.concatenate([position_embeddings[:, :1], resized.astype(position_embeddings.dtype)], axis=1)


# ----------------------------------------------------------------------------------------------------------
# Loading


def split_fused_qkv(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch-hub blocks hold one `attn.qkv` Linear ([3D, D], rows q then k then v): split it into q/k/v_proj."""
    out = {}
    for key, value in state_dict.items():
        prefix, dot, leaf = key.rpartition(".")
        if prefix.endswith(".attn.qkv"):
            if value.shape[0] % 3:
                raise WeightLoadError(f"{key} has shape {tuple(value.shape)}: first axis not divisible by 3")
            base = prefix[: -len("qkv")]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
                out[f"{base}{name}{dot}{leaf}"] = part
        else:
            out[key] = value
    return out


def dinov2_params(
    model: Dinov2Model,
    state_dict: Mapping[str, np.ndarray],
    source: str,
    interpolate_offset: float,
    hub_format: bool = False,
) -> Params:
    """A transformers Dinov2Model (or, with hub_format, a torch-hub DINOv2) state dict -> params of `model`
    (host numpy arrays), position embeddings resampled to the model's input grid."""
    grid = model.input_size // model.config.patch_size

    def resample(position_embeddings):
        try:
            return resize_position_embeddings(position_embeddings, grid, interpolate_offset)
        except ValueError as e:
            raise WeightLoadError(f"{source}: {e}") from e

    if hub_format:
        state_dict, rules, ignore = split_fused_qkv(state_dict), HUB_RENAME_RULES, HUB_IGNORE
    else:
        rules, ignore = TRANSFORMERS_RENAME_RULES, TRANSFORMERS_IGNORE
    return convert_state_dict(
        state_dict, model.param_shapes(), source=source, rename_rules=rules, ignore=ignore,
        transforms={"embeddings/position_embeddings": resample},
    )


def load_dinov2(
    folder: str | Path,
    input_size: int = 224,
    interpolate_offset: float = 0.0,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention_impl: AttentionImpl = "xla",
    remat: bool = False,
) -> tuple[Dinov2Model, Params]:
    """A transformers Dinov2Model folder (config.json + model.safetensors or pytorch_model.bin), e.g.
    facebook/dinov2-base -> (module for input_size images, params). The default offset reproduces transformers 5;
    pass 0.1 to reproduce torch hub (the original)."""
    config = Dinov2Config.from_dict(read_config_json(folder))
    model = Dinov2Model(config, input_size, dtype, param_dtype, attention_impl, remat)
    path = find_weights_file(folder, WEIGHT_STEMS)
    return model, dinov2_params(model, read_state_dict(path), str(path), interpolate_offset)


def load_dinov2_hub(
    path: str | Path,
    config: Dinov2Config = Dinov2Config(),
    input_size: int = 224,
    interpolate_offset: float = 0.1,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    attention_impl: AttentionImpl = "xla",
    remat: bool = False,
) -> tuple[Dinov2Model, Params]:
    """A torch-hub DINOv2 state dict file (e.g. dinov2_vitb14_pretrain.pth; keys cls_token, pos_embed,
    patch_embed.proj.*, blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma},
    norm.*) -> (module, params). The file holds no config: `config` must describe it (default ViT-B/14).
    The default offset 0.1 is torch hub's own, i.e. the features the original computed."""
    model = Dinov2Model(config, input_size, dtype, param_dtype, attention_impl, remat)
    return model, dinov2_params(model, read_state_dict(path), str(path), interpolate_offset, hub_format=True)
