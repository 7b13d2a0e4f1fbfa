"""The Stable Diffusion v1-x UNet (diffusers' `UNet2DConditionModel`, SD-1.x family) in Flax linen.

Submodules carry diffusers' PyTorch names (`down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q`,
`ff/net_0/proj`, `resnets_1/time_emb_proj`, `downsamplers_0/conv`, `mid_block/...`), so a diffusers
checkpoint converts with the generic rule of `fairdiff_jax.nn.weights` and no renaming, and LoRA finds
the attention kernels at those paths.

Precision: feature maps flow in the compute `dtype`; GroupNorm/LayerNorm statistics and outputs are
float32 (bf16 statistics over 4096 pixels drift); the timestep sinusoid is float32; attention softmax
is float32 (`dot_product_attention`), and with `upcast_attention` q/k/v are float32 too. The returned
noise prediction is float32 whatever the compute dtype, since the sampler's latents are float32.

Feature maps are NHWC: sample [B, h, w, in_channels] where PyTorch has [B, in_channels, h, w].
"""

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairdiff_jax.nn import weights
from fairdiff_jax.nn.attention import AttentionImpl, dot_product_attention
from fairdiff_jax.sd.unet_config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, UNetConfig, read_unet_config


def timestep_sinusoid(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """[B] (int or float) timesteps -> [B, dim] float32 sin/cos features, as diffusers' Timesteps."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    features = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(features, ((0, 0), (0, dim % 2)))


class _LayerFactory:
    """Builds the leaf layers with the owner's `dtype` / `param_dtype`; norms always run in float32."""

    def dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
        return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def conv(self, features: int, name: str, kernel: int = 3, stride: int = 1) -> nn.Conv:
        return nn.Conv(
            features, (kernel, kernel), strides=stride, padding=kernel // 2,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )

    def group_norm(self, groups: int, eps: float, name: str) -> nn.GroupNorm:
        return nn.GroupNorm(
            num_groups=groups, epsilon=eps, use_fast_variance=False,
            dtype=jnp.float32, param_dtype=self.param_dtype, name=name,
        )

    def layer_norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(
            epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, param_dtype=self.param_dtype, name=name
        )


class _Layers(_LayerFactory, nn.Module):
    """Base of the leaf-owning submodules."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


class TimestepEmbedding(_Layers):
    """Sinusoid [B, C0] -> linear_1 -> SiLU -> linear_2 -> [B, 4 * C0]."""

    features: int = 1280

    @nn.compact
    def __call__(self, sinusoid):
        return self.dense(self.features, "linear_2")(nn.silu(self.dense(self.features, "linear_1")(sinusoid)))


class ResnetBlock2D(_Layers):
    """GroupNorm-SiLU-conv twice, the time embedding added in between; 1x1 conv shortcut when widths differ."""

    out_channels: int = 320
    groups: int = 32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, temb):
        h = self.conv(self.out_channels, "conv1")(nn.silu(self.group_norm(self.groups, self.eps, "norm1")(x)))
        h = h + self.dense(self.out_channels, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = self.conv(self.out_channels, "conv2")(nn.silu(self.group_norm(self.groups, self.eps, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, "conv_shortcut", kernel=1)(x)
        return x + h


class Attention(_Layers):
    """Multi-head attention with bias-free to_q/to_k/to_v and a biased to_out_0 (diffusers' Attention)."""

    heads: int = 8
    attention_impl: AttentionImpl = "xla"
    upcast: bool = False

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        """x [B, Tq, width], context [B, Tk, D]; context_mask [B or 1, Tk] (True/1 = may attend) or None."""
        batch, width = x.shape[0], x.shape[-1]

        def split_heads(t):
            return t.reshape(batch, t.shape[1], self.heads, width // self.heads)

        sources = (("to_q", x), ("to_k", context), ("to_v", context))
        q, k, v = (split_heads(self.dense(width, name, use_bias=False)(src)) for name, src in sources)
        if self.upcast:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        mask = None if context_mask is None else (context_mask != 0)[:, None, None, :]  # [B, 1, 1, Tk]
        out = dot_product_attention(q, k, v, mask, implementation=self.attention_impl).astype(self.dtype)
        return self.dense(width, "to_out_0")(out.reshape(batch, -1, width))


class GEGLU(_Layers):
    """proj to 2 * features, then value * gelu(gate) (exact gelu, as torch's default)."""

    features: int = 1280

    @nn.compact
    def __call__(self, x):
        value, gate = jnp.split(self.dense(2 * self.features, "proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(_Layers):
    """GEGLU to 4x the width (net_0), back to the width (net_2)."""

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = GEGLU(self.dtype, self.param_dtype, features=4 * width, name="net_0")(x)
        return self.dense(width, "net_2")(h)


class BasicTransformerBlock(_Layers):
    """Pre-LayerNorm self-attention, cross-attention to the text tokens, GEGLU feed-forward."""

    heads: int = 8
    attention_impl: AttentionImpl = "xla"
    upcast_attention: bool = False

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        attn = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, heads=self.heads,
            attention_impl=self.attention_impl, upcast=self.upcast_attention,
        )
        h = self.layer_norm("norm1")(x)
        x = x + Attention(**attn, name="attn1")(h, h)
        x = x + Attention(**attn, name="attn2")(self.layer_norm("norm2")(x), context, context_mask)
        return x + FeedForward(self.dtype, self.param_dtype, name="ff")(self.layer_norm("norm3")(x))


class Transformer2DModel(_Layers):
    """GroupNorm, proj_in (1x1 conv or linear), one transformer block over the h*w tokens, proj_out, residual."""

    heads: int = 8
    groups: int = 32
    use_linear_projection: bool = False
    attention_impl: AttentionImpl = "xla"
    upcast_attention: bool = False

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        batch, height, width, channels = x.shape
        # On NHWC maps a 1x1 conv and a linear layer compute the same; they differ only in kernel rank,
        # which must match the checkpoint's.
        def project(name):
            return self.dense(channels, name) if self.use_linear_projection else self.conv(channels, name, kernel=1)

        h = project("proj_in")(self.group_norm(self.groups, 1e-6, "norm")(x))
        h = h.reshape(batch, height * width, channels)
        h = BasicTransformerBlock(
            self.dtype, self.param_dtype, heads=self.heads, attention_impl=self.attention_impl,
            upcast_attention=self.upcast_attention, name="transformer_blocks_0",
        )(h, context, context_mask)
        return x + project("proj_out")(h.reshape(batch, height, width, channels))


class Downsample2D(_Layers):
    """3x3 stride-2 conv, padding 1."""

    @nn.compact
    def __call__(self, x):
        return self.conv(x.shape[-1], "conv", stride=2)(x)


class Upsample2D(_Layers):
    """Nearest-neighbour x2, then a 3x3 conv."""

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x.shape[-1], "conv")(x)


class _Block(_Layers):
    """Shared fields of the down, mid and up blocks."""

    config: UNetConfig = UNetConfig()
    out_channels: int = 320
    heads: int = 8
    cross_attention: bool = True
    attention_impl: AttentionImpl = "xla"

    def resnet(self, name: str) -> ResnetBlock2D:
        c = self.config
        return ResnetBlock2D(
            self.dtype, self.param_dtype, out_channels=self.out_channels, groups=c.norm_num_groups, eps=c.norm_eps,
            name=name,
        )

    def transformer(self, name: str) -> Transformer2DModel:
        c = self.config
        return Transformer2DModel(
            self.dtype, self.param_dtype, heads=self.heads, groups=c.norm_num_groups,
            use_linear_projection=c.use_linear_projection, attention_impl=self.attention_impl,
            upcast_attention=c.upcast_attention, name=name,
        )


class DownBlock(_Block):
    """CrossAttnDownBlock2D (cross_attention=True) or DownBlock2D: returns (h, the skips it leaves)."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context, context_mask=None):
        skips = []
        for i in range(self.config.layers_per_block):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context, context_mask)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.dtype, self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_Block):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    @nn.compact
    def __call__(self, x, temb, context, context_mask=None):
        x = self.resnet("resnets_0")(x, temb)
        x = self.transformer("attentions_0")(x, context, context_mask)
        return self.resnet("resnets_1")(x, temb)


class UpBlock(_Block):
    """CrossAttnUpBlock2D (cross_attention=True) or UpBlock2D: each layer first concatenates the newest skip."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, context_mask=None):
        for i, skip in enumerate(reversed(skips)):
            x = self.resnet(f"resnets_{i}")(jnp.concatenate([x, skip], axis=-1), temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context, context_mask)
        if self.add_upsample:
            x = Upsample2D(self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x


class UNet2DConditionModel(_LayerFactory, nn.Module):
    """The SD-1.x noise-prediction UNet.

    Attributes:
      config: the architecture (UNetConfig.from_diffusers(config.json dict)).
      dtype: compute dtype (e.g. jnp.bfloat16); see the module docstring for what stays float32.
      param_dtype: dtype of the parameters a (shape-only) init gives.
      attention_impl: 'xla' | 'cudnn' | 'einsum' (see models.attention.dot_product_attention; cuDNN
        needs bf16/fp16 q/k/v, so not with upcast_attention).
      remat: wrap every down/mid/up block in nn.remat (recompute its activations in the backward
        pass) to trade compute for memory when differentiating through the UNet.
    """

    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: AttentionImpl = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, encoder_attention_mask=None):
        """Predicts the noise in `sample`.

        Args:
          sample: [B, h, w, in_channels] latents; h and w divisible by 2 ** (number of blocks - 1).
          timesteps: scalar or [B], int or float (0..999 in SD).
          encoder_hidden_states: [B, L, cross_attention_dim] text-encoder states, any L.
          encoder_attention_mask: [B or 1, L] bool or {0, 1}, or None (all tokens): the text tokens every
            cross-attention (attn2) may attend to, as diffusers' argument of that name. With it, text
            padded to a fixed length gives the outputs of the unpadded text, so one compilation serves
            every prompt length.

        Returns:
          [B, h, w, out_channels] float32.
        """
        c = self.config
        factor = 2 ** (len(c.block_out_channels) - 1)
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels or any(d % factor for d in sample.shape[1:3]):
            raise ValueError(
                f"sample must be [B, h, w, {c.in_channels}] with h, w divisible by {factor}; got {sample.shape}"
            )
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        layers = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = dict(layers, config=c, attention_impl=self.attention_impl)
        wrap = nn.remat if self.remat else (lambda cls: cls)

        sinusoid = timestep_sinusoid(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = TimestepEmbedding(**layers, features=c.time_embed_dim, name="time_embedding")(sinusoid)
        x = self.conv(c.block_out_channels[0], "conv_in")(sample)

        skips = [x]
        last = len(c.block_out_channels) - 1
        down = zip(c.down_block_types, c.block_out_channels, c.num_attention_heads)
        for i, (block_type, channels, heads) in enumerate(down):
            x, block_skips = wrap(DownBlock)(
                **blocks, out_channels=channels, heads=heads, cross_attention=block_type == CROSS_ATTN_DOWN,
                add_downsample=i < last, name=f"down_blocks_{i}",
            )(x, temb, encoder_hidden_states, encoder_attention_mask)
            skips.extend(block_skips)

        x = wrap(MidBlock)(
            **blocks, out_channels=c.block_out_channels[-1], heads=c.num_attention_heads[-1], name="mid_block",
        )(x, temb, encoder_hidden_states, encoder_attention_mask)

        up_layers = c.layers_per_block + 1
        for i, (block_type, channels, heads) in enumerate(
            zip(c.up_block_types, c.block_out_channels[::-1], c.num_attention_heads[::-1])
        ):
            block_skips, skips = tuple(skips[-up_layers:]), skips[:-up_layers]
            x = wrap(UpBlock)(
                **blocks, out_channels=channels, heads=heads, cross_attention=block_type == CROSS_ATTN_UP,
                add_upsample=i < last, name=f"up_blocks_{i}",
            )(x, block_skips, temb, encoder_hidden_states, encoder_attention_mask)

        x = nn.silu(self.group_norm(c.norm_num_groups, c.norm_eps, "conv_norm_out")(x))
        return self.conv(c.out_channels, "conv_out")(x).astype(jnp.float32)


def unet_param_shapes(module: UNet2DConditionModel) -> dict[str, Any]:
    """The module's `params` tree as jax.ShapeDtypeStructs (traced with eval_shape, nothing compiled)."""
    c = module.config
    size = 2 ** (len(c.block_out_channels) - 1)
    sample = jnp.zeros((1, size, size, c.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, c.cross_attention_dim), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), sample, jnp.zeros((1,)), context)["params"]




def load_unet(
    folder: str | Path,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: AttentionImpl = "xla",
    remat: bool = False,
) -> tuple[UNet2DConditionModel, dict[str, Any]]:
    """A diffusers `unet` folder (config.json + diffusion_pytorch_model.{safetensors,bin}) -> (module, params).

    params is a nested dict of numpy arrays in `param_dtype`; the names need no renaming.
    """
    module = UNet2DConditionModel(
        read_unet_config(folder), dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat
    )
    path = weights.find_weights_file(folder, ["diffusion_pytorch_model"])
    params = weights.convert_state_dict(weights.read_state_dict(path), unet_param_shapes(module), source=str(path))
    return module, params
