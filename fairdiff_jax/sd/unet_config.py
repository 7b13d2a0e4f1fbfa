"""The configuration of the Stable Diffusion v1-x UNet: which diffusers `UNet2DConditionModel` options it
implements, and a `unet/config.json` reader that names every key it cannot honour."""

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from fairdiff_jax.nn import weights

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers config keys this UNet does not implement, with the one value (diffusers' default) under
# which they change nothing. A per-block list of that value is accepted too.
_FIXED_OPTIONS: dict[str, Any] = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "dropout": 0.0,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# Keys whose value only matters when an option above is switched on.
_INERT_OPTIONS = ("addition_embed_type_num_heads",)


def _is_fixed_value(value: Any, accepted: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(v == accepted for v in value)
    return value == accepted


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """What an SD-1.x UNet's shape depends on. Defaults are diffusers' `UNet2DConditionModel` defaults.

    `num_attention_heads` holds one head count per down block. diffusers reads it from the config key
    `attention_head_dim` (a naming slip it keeps for old configs): SD-1.5's 8 means 8 heads of
    width channels // 8, not heads of width 8.
    """

    sample_size: Optional[int] = None
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    cross_attention_dim: int = 1280
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_linear_projection: bool = False
    upcast_attention: bool = False

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        """Parses a diffusers unet/config.json dict; raises ValueError naming any key it cannot honour."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}  # _class_name, _diffusers_version
        for key, accepted in _FIXED_OPTIONS.items():
            if key in config and not _is_fixed_value(config[key], accepted):
                raise ValueError(f"UNet config option {key}={config[key]!r} is not supported (only {accepted!r})")
        act_fn = config.get("act_fn", "silu")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"UNet config option act_fn={act_fn!r} is not supported (only 'silu')")

        direct = {f.name for f in dataclasses.fields(cls)} - {"num_attention_heads"}
        understood = direct | {"attention_head_dim", "act_fn"} | set(_FIXED_OPTIONS) | set(_INERT_OPTIONS)
        unknown = sorted(set(config) - understood)
        if unknown:
            raise ValueError(f"unknown UNet config keys: {', '.join(unknown)}")

        fields = {k: v for k, v in config.items() if k in direct}
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if key in fields:
                fields[key] = tuple(fields[key])
        for key in ("layers_per_block", "cross_attention_dim", "norm_num_groups"):
            if key in fields and not isinstance(fields[key], int):
                raise ValueError(
                    f"UNet config option {key}={fields[key]!r} is not supported (only one int for all blocks)"
                )
        num_blocks = len(fields.get("down_block_types", cls.down_block_types))
        heads = config.get("attention_head_dim", 8)
        fields["num_attention_heads"] = (heads,) * num_blocks if isinstance(heads, int) else tuple(heads)
        unet_config = cls(**fields)
        unet_config.validate()
        return unet_config

    def validate(self) -> None:
        n = len(self.block_out_channels)
        for key in ("down_block_types", "up_block_types", "num_attention_heads"):
            if len(getattr(self, key)) != n:
                raise ValueError(
                    f"UNet config {key}={getattr(self, key)!r} needs one entry per block_out_channels ({n})"
                )
        allowed_types = {"down_block_types": (CROSS_ATTN_DOWN, PLAIN_DOWN), "up_block_types": (CROSS_ATTN_UP, PLAIN_UP)}
        for key, allowed in allowed_types.items():
            for block_type in getattr(self, key):
                if block_type not in allowed:
                    raise ValueError(f"UNet config {key} entry {block_type!r} is not supported (only {allowed})")
        for channels, heads in zip(self.block_out_channels, self.num_attention_heads):
            if channels % heads or channels % self.norm_num_groups:
                raise ValueError(
                    f"UNet config: block width {channels} is not divisible by its {heads} attention heads "
                    f"(attention_head_dim) and norm_num_groups={self.norm_num_groups}"
                )

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


def read_unet_config(folder: str | Path) -> UNetConfig:
    """folder/config.json -> UNetConfig; WeightLoadError naming the file when missing, invalid or unsupported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise weights.WeightLoadError(f"UNet folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise weights.WeightLoadError(f"UNet config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise weights.WeightLoadError(f"cannot read UNet config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise weights.WeightLoadError(f"UNet config {path} holds a {type(raw).__name__}, not a JSON object")
    try:
        return UNetConfig.from_diffusers(raw)
    except (ValueError, TypeError) as e:
        raise weights.WeightLoadError(f"{path}: {e}") from e
