"""opensphere's SFNet-20 (SphereFace2) in Flax: the 512-d face feature of the face-realism loss.

Two variants, as in opensphere's `model/backbone`:

- "sfnet20_deprecated" (the checkpoint the original uses): no normalisation. Each of the four
  stages (64, 128, 256, 512 channels; 112 -> 56 -> 28 -> 14 -> 7 pixels) is a 3x3 stride-2 conv
  with bias + ReLU, then 1, 2, 4, 1 residual blocks computing
  `x + relu(conv2(relu(conv1(x))))` (ReLU BEFORE the identity is added, nothing after: read off
  opensphere's `sfnet_deprecated.py`; docs/method.md#differences-from-the-papers-code).
- "sfnet20": every conv without bias and followed by BatchNorm (eps 1e-5), blocks computing
  `relu(x + bn2(conv2(relu(bn1(conv1(x))))))`, and a BatchNorm1d (`features`) on the output.

Both end with Linear(512 * 7 * 7, 512) over the 7 x 7 x 512 map flattened in PyTorch's
channel-major (C, H, W) order: the NHWC map is transposed before flattening, so `fc`'s kernel is
the checkpoint's, merely transposed (no permutation at load time).

The stage widths and the feature size are module fields, read from a checkpoint's shapes by
`load_sfnet`, so narrower nets of the same layout (the miniature world's) load too.

Names follow the PyTorch modules (`layer3_2/conv1`, `fc`, `features`), checkpoints saved through
`nn.DataParallel` (keys `module.*`) load as they are.
"""

import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairdiff_jax.nn import weights
from fairdiff_jax.nn.layers import l2_normalize

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_BLOCKS = (1, 2, 4, 1)  # SFNet-20
FEATURE_DIM = 512
INPUT_SIZE = 112
BATCH_NORM_EPS = 1e-5


class SFNet20(nn.Module):
    """Face feature net.

    Input: aligned faces [N, 112, 112, 3] in [-1, 1] (the aligned chip as is).
    Output: unnormalised features [N, feature_dim] float32.
    """

    batch_norm: bool = False  # False: "sfnet20_deprecated"; True: "sfnet20"
    stage_channels: tuple[int, ...] = STAGE_CHANNELS
    feature_dim: int = FEATURE_DIM
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, aligned_faces: jax.Array) -> jax.Array:
        x = aligned_faces.astype(self.dtype)
        for stage, (width, blocks) in enumerate(zip(self.stage_channels, STAGE_BLOCKS), start=1):
            x = _StageEntry(width, self.batch_norm, self.dtype, self.param_dtype, name=f"layer{stage}_0")(x)
            for block in range(1, blocks + 1):
                x = _ResidualBlock(self.batch_norm, self.dtype, self.param_dtype, name=f"layer{stage}_{block}")(x)
        # PyTorch flattens [N, C, H, W]: flatten in that order so that `fc` is the checkpoint's.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nn.Dense(self.feature_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
        if self.batch_norm:
            x = _batch_norm(self, "features")(x)
        return x.astype(jnp.float32)


def _batch_norm(module: nn.Module, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=True,
        epsilon=BATCH_NORM_EPS,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


def _conv3x3(module: nn.Module, features: int, name: str, stride: int = 1) -> nn.Conv:
    return nn.Conv(
        features,
        (3, 3),
        strides=stride,
        padding=((1, 1), (1, 1)),
        use_bias=not module.batch_norm,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


class _StageEntry(nn.Module):
    """opensphere's ConvBlock: relu([bn1](conv1(x))) with a 3x3 stride-2 conv1."""

    width: int
    batch_norm: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv3x3(self, self.width, "conv1", stride=2)(x)
        if self.batch_norm:
            x = _batch_norm(self, "bn1")(x)
        return nn.relu(x)


class _ResidualBlock(nn.Module):
    """opensphere's BasicBlock (same width in and out); see the module docstring for the two forms."""

    batch_norm: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        y = _conv3x3(self, width, "conv1")(x)
        if self.batch_norm:
            y = _batch_norm(self, "bn1")(y)
        y = _conv3x3(self, width, "conv2")(nn.relu(y))
        if self.batch_norm:
            return nn.relu(x + _batch_norm(self, "bn2")(y))
        return x + nn.relu(y)


def face_features(module: SFNet20, variables: dict, aligned_faces: jax.Array) -> jax.Array:
    """normalize(f(x) + f(flip_lr(x))): the face-realism feature of the original.

    Args:
      module, variables: as returned by `load_sfnet`.
      aligned_faces: [N, 112, 112, 3] in [-1, 1].

    Returns:
      [N, feature_dim] float32, unit L2 norm; differentiable w.r.t. `aligned_faces`.
    """
    n = aligned_faces.shape[0]
    # One forward over both orientations: a batch of 2N runs better than two of N.
    both = jnp.concatenate([aligned_faces, aligned_faces[:, :, ::-1, :]], axis=0)
    feats = module.apply(variables, both).astype(jnp.float32)
    return l2_normalize(feats[:n] + feats[n:])


def load_sfnet(
    path: str | Path, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> tuple[SFNet20, dict]:
    """An opensphere SFNet-20 backbone checkpoint (e.g. `backbone_100000.pth`) -> (module, variables).

    The variant comes from the keys: BatchNorm running statistics present -> "sfnet20", absent ->
    "sfnet20_deprecated"; the stage widths from `layer{s}.0.conv1.weight` and the feature size from
    `fc.weight`. A `module.` prefix on every key (nn.DataParallel) is stripped. Variables
    come back as numpy arrays: `{'params'}` or `{'params', 'batch_stats'}`.
    """
    state_dict = weights.read_state_dict(path)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    if "fc.weight" not in state_dict:
        raise weights.WeightLoadError(f"{path} has no 'fc.weight' (nor 'module.fc.weight'): not an SFNet checkpoint")
    state_dict = _renamed(state_dict)
    batch_norm = any(key.endswith(".running_mean") for key in state_dict)
    entry_keys = [f"layer{stage}.0.conv1.weight" for stage in range(1, len(STAGE_BLOCKS) + 1)]
    missing = [key for key in entry_keys if key not in state_dict]
    if missing:
        raise weights.WeightLoadError(f"{path} has no {missing}: not an SFNet-20 checkpoint")
    module = SFNet20(
        batch_norm=batch_norm,
        stage_channels=tuple(int(state_dict[key].shape[0]) for key in entry_keys),
        feature_dim=int(state_dict["fc.weight"].shape[0]),
        dtype=dtype,
        param_dtype=param_dtype,
    )
    dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    target = dict(jax.eval_shape(module.init, jax.random.key(0), dummy))
    variant = "sfnet20" if batch_norm else "sfnet20_deprecated"
    variables = weights.convert_with_batch_stats(state_dict, target, source=f"{path} (read as {variant})")
    return module, variables


def _renamed(state_dict: dict) -> dict:
    """Older opensphere releases named the stage-entry conv `conv` instead of `conv1`."""
    return {re.sub(r"^(layer\d+\.0)\.conv\.", r"\1.conv1.", key): value for key, value in state_dict.items()}
