"""The decoder half of Stable Diffusion's AutoencoderKL (diffusers layout), in Flax.

Only decoding is needed: the sampler turns latents into images and the training loss
differentiates through this network. The encoder and `quant_conv` weights in a checkpoint are
skipped when loading.

Convention (as in diffusers' pipelines): the sampler's latents are divided by
`config.scaling_factor` (0.18215 for SD v1-5) before `AutoencoderKLDecoder` sees them.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairdiff_jax.nn import weights
from fairdiff_jax.nn.attention import AttentionImpl, dot_product_attention

# Older diffusers-format checkpoints (SD v1-5 included) name the mid-block attention projections
# query/key/value/proj_attn; diffusers renames them on load, and so do we.
DEPRECATED_ATTENTION_RENAMES = (
    (r"\.attentions\.(\d+)\.query\.", r".attentions.\1.to_q."),
    (r"\.attentions\.(\d+)\.key\.", r".attentions.\1.to_k."),
    (r"\.attentions\.(\d+)\.value\.", r".attentions.\1.to_v."),
    (r"\.attentions\.(\d+)\.proj_attn\.", r".attentions.\1.to_out.0."),
)
# Keys of the encoder half, which this decoder does not build.
ENCODER_KEYS = (r"^encoder\.", r"^quant_conv\.")

_EPS = 1e-6  # every GroupNorm of the decoder


def _layer(cls, remat: bool):
    """`cls`, or nn.remat(cls) (same params; its activations are recomputed in the backward pass)."""
    return nn.remat(cls) if remat else cls


@dataclasses.dataclass(frozen=True)
class VAEDecoderConfig:
    """The decoder-relevant fields of a diffusers AutoencoderKL `config.json` (defaults: SD v1-5)."""

    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def upsampling_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEDecoderConfig":
        """Reads a diffusers AutoencoderKL config.json; raises WeightLoadError naming the file and key it cannot honour."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise weights.WeightLoadError(f"VAE config not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise weights.WeightLoadError(f"cannot read VAE config {path}: {e}") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "VAE config") -> "VAEDecoderConfig":
        """From a diffusers AutoencoderKL config dict; `source` names it in errors."""
        if not isinstance(raw, Mapping):
            raise weights.WeightLoadError(f"{source}: expected a JSON object")
        unsupported = {
            "act_fn": ("silu", lambda v: v == "silu"),
            "up_block_types": ("only UpDecoderBlock2D", lambda v: all(b == "UpDecoderBlock2D" for b in v)),
            "shift_factor": ("null", lambda v: v is None),
            "latents_mean": ("null", lambda v: v is None),
            "latents_std": ("null", lambda v: v is None),
        }
        for key, (supported, ok) in unsupported.items():
            if key in raw and not ok(raw[key]):
                raise weights.WeightLoadError(f"{source}: {key} = {raw[key]!r} is not supported (supported: {supported})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in fields}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        if "up_block_types" in raw and len(raw["up_block_types"]) != len(kwargs.get("block_out_channels", cls.block_out_channels)):
            raise weights.WeightLoadError(f"{source}: up_block_types and block_out_channels differ in length")
        return cls(**kwargs)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, plus a 1x1 conv shortcut when the channel count changes (no time embedding)."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda n, k, name: nn.Conv(n, (k, k), padding=k // 2, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        norm = lambda name: nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        h = conv(self.out_channels, 3, "conv1")(nn.silu(norm("norm1")(x)))
        h = conv(self.out_channels, 3, "conv2")(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut")(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with GroupNorm in front and a residual."""

    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: AttentionImpl = "xla"

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        tokens = nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name="group_norm")(x)
        tokens = tokens.reshape(b, h * w, 1, c)  # one head of width c
        out = dot_product_attention(
            dense("to_q")(tokens), dense("to_k")(tokens), dense("to_v")(tokens), implementation=self.attention_impl
        )
        return x + dense("to_out_0")(out.reshape(b, h, w, c))


class MidBlock(nn.Module):
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        resnet = _layer(ResnetBlock, self.remat)
        x = resnet(c, self.groups, self.dtype, self.param_dtype, name="resnets_0")(x)
        if self.add_attention:
            attention = _layer(SpatialSelfAttention, self.remat)
            x = attention(self.groups, self.dtype, self.param_dtype, self.attention_impl, name="attentions_0")(x)
        return resnet(c, self.groups, self.dtype, self.param_dtype, name="resnets_1")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(x.shape[-1], (3, 3), padding=1, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = _layer(ResnetBlock, self.remat)(self.out_channels, self.groups, self.dtype, self.param_dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = _layer(Upsample, self.remat)(self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x


class Decoder(nn.Module):
    config: VAEDecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = tuple(reversed(cfg.block_out_channels))
        x = nn.Conv(channels[0], (3, 3), padding=1, name="conv_in", **kw)(z)
        x = MidBlock(
            cfg.norm_num_groups, cfg.mid_block_add_attention, attention_impl=self.attention_impl, remat=self.remat,
            name="mid_block", **kw,
        )(x)
        for i, c in enumerate(channels):
            x = UpDecoderBlock(
                c, cfg.layers_per_block + 1, cfg.norm_num_groups, add_upsample=i < len(channels) - 1, remat=self.remat,
                name=f"up_blocks_{i}", **kw,
            )(x)
        x = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=_EPS, name="conv_norm_out", **kw)(x))
        return nn.Conv(cfg.out_channels, (3, 3), padding=1, name="conv_out", **kw)(x)


class AutoencoderKLDecoder(nn.Module):
    """latents z: [B, h, w, latent_channels] (already divided by `config.scaling_factor`)
    -> images [B, f*h, f*w, out_channels] float32, roughly in [-1, 1] and NOT clamped (f = config.upsampling_factor).

    remat: wrap every resnet, the mid-block attention and every upsampler in nn.remat, so that a
    backward pass through the decoder recomputes their activations (at 512x512 the 128- and
    256-channel full-resolution maps dominate) instead of keeping them; same params, same values.
    """

    config: VAEDecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, z):
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = nn.Conv(self.config.latent_channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="post_quant_conv")(z)
        images = Decoder(self.config, self.dtype, self.param_dtype, self.attention_impl, self.remat, name="decoder")(z)
        return images.astype(jnp.float32)


def vae_decoder_param_shapes(module: AutoencoderKLDecoder) -> dict:
    """The params tree's ShapeDtypeStructs (no initialisation is compiled)."""
    z = jnp.zeros((1, 8, 8, module.config.latent_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), z)["params"]


def vae_decoder_params(module: AutoencoderKLDecoder, state_dict: Mapping[str, np.ndarray], source: str) -> dict:
    """A whole AutoencoderKL state dict (encoder keys are skipped) -> the decoder's params (numpy, `param_dtype`)."""
    return weights.convert_state_dict(
        state_dict,
        vae_decoder_param_shapes(module),
        source=source,
        rename_rules=DEPRECATED_ATTENTION_RENAMES,
        ignore=ENCODER_KEYS,
    )


def load_vae_decoder(
    folder: str | Path,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: AttentionImpl = "xla",
) -> tuple[AutoencoderKLDecoder, dict]:
    """Loads the decoder of a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.{safetensors,bin}).

    Returns (module, params); params are host numpy arrays of `param_dtype`. Raises WeightLoadError naming
    the folder, file or key at fault.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise weights.WeightLoadError(f"VAE folder not found: {folder}")
    module = AutoencoderKLDecoder(VAEDecoderConfig.from_json(folder / "config.json"), dtype, param_dtype, attention_impl)
    path = weights.find_weights_file(folder, ["diffusion_pytorch_model", "diffusion_pytorch_model.fp16"])
    return module, vae_decoder_params(module, weights.read_state_dict(path), str(path))
